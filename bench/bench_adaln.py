"""adaLN family (CUDA C++ kernels): GB/s and % of measured copy bandwidth, against eager torch and
torch.compile of the reference, forward and backward.

On a GPU, for Wan 1.3B (32,760 tokens x 1536) and Wan 14B 720p (75,600 x 5120), bf16 x, fp32
per-sequence tables (two packed videos), LayerNorm without affine (Wan's norm), each of
``adaln_modulate`` and ``gated_residual_adaln`` is timed forward and backward with
``triton.testing.do_bench`` (median) for three providers: sora_fast (backend="cuda"), eager torch
(the ``*_ref`` reference) and ``torch.compile`` of the reference. GB/s counts the bytes the op must
move (docs/kernels.md §4): modulate fwd 2·N·D·s (read x, write y), gated fwd 4·N·D·s (x, branch in;
x_new, y out), modulate bwd 3·N·D·s (x, dy in; dx out), gated bwd 6·N·D·s (x, branch, dy, dx_new
in; dx, dbranch out); the same count for every provider. The floor is the measured device-to-device
copy bandwidth (``dst.copy_(src)`` of 1 GiB). Inputs are larger than L2 (50 MiB), so each call
streams from HBM. Target: >= 85% of copy bandwidth forward; each sora_fast forward line says whether
it meets it, and the last line counts them.

Without a GPU (or with ``--cpu``) it says so, runs a tiny correctness smoke of the emulated kernels
(CPU): exit status 0 when they agree with the reference, 1 otherwise.
Rows (kernel, provider, shape, dtype, metric, value, gpu, versions) go to OUT/bench_adaln.json/.csv.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

if __package__ in (None, ""):   # run as a file: `bench` and `sora_fast` import from this checkout (bench/README.md)
    sys.path.append(str(Path(__file__).resolve().parents[1]))

import torch

from sora_fast.bench import args as cli
from sora_fast.bench.floors import pct_of_floor, throughput
from sora_fast.bench.report import Rows, versions_text, write_csv, write_json
from sora_fast.bench.timing import do_bench_median

SHAPES = {"wan1.3b-480p": (32760, 1536), "wan14b-720p": (75600, 5120)}
TARGET_PCT_OF_COPY = 85.0  # forward
BYTES_PER_ELEM_PASS = {("adaln_modulate", "fwd"): 2, ("gated_residual_adaln", "fwd"): 4,
                       ("adaln_modulate", "bwd"): 3, ("gated_residual_adaln", "bwd"): 6}


def _versions() -> str:
    return versions_text(("torch", "sora_fast", "python"))


def _copy_bandwidth() -> float:
    src = torch.randn(256 * 1024 * 1024, device="cuda")  # 1 GiB fp32
    dst = torch.empty_like(src)
    ms = do_bench_median(lambda: dst.copy_(src))
    return throughput(2 * src.numel() * 4, ms, "GB/s")


def _inputs(n, d, dtype):
    half = n // 2
    ids = torch.cat([torch.zeros(half, dtype=torch.int32), torch.ones(n - half, dtype=torch.int32)]).cuda()
    mk = lambda *s, dt=dtype: torch.randn(*s, device="cuda", dtype=dt)  # noqa: E731
    return {"x": mk(n, d), "branch": mk(n, d), "gate": mk(2, d, dt=torch.float32) * 0.1,
            "shift": mk(2, d, dt=torch.float32) * 0.1, "scale": mk(2, d, dt=torch.float32) * 0.1, "seq_ids": ids}


def _callables(op, provider, a):
    import sora_fast.ops as O

    if provider == "sora_fast":
        f_mod = lambda x, sh, sc, g, br: O.adaln_modulate(x, sh, sc, a["seq_ids"], backend="cuda")  # noqa: E731
        f_gat = lambda x, sh, sc, g, br: O.gated_residual_adaln(x, br, g, sh, sc, a["seq_ids"], backend="cuda")  # noqa: E731
    else:
        f_mod = lambda x, sh, sc, g, br: O.adaln_modulate_ref(x, sh, sc, a["seq_ids"])  # noqa: E731
        f_gat = lambda x, sh, sc, g, br: O.gated_residual_adaln_ref(x, br, g, sh, sc, a["seq_ids"])  # noqa: E731
        if provider == "torch.compile":
            f_mod, f_gat = torch.compile(f_mod), torch.compile(f_gat)
    return f_mod if op == "adaln_modulate" else f_gat


def run_gpu() -> list[dict]:
    gpu = torch.cuda.get_device_name()
    copy_gbs = _copy_bandwidth()
    print(f"{gpu}: measured copy bandwidth {copy_gbs:.0f} GB/s")
    rows = Rows(gpu, "bfloat16", _versions(), notes=False)
    rows.add("torch", "1GiB", "GB/s", copy_gbs, kernel="copy", dtype="float32")
    dtype = torch.bfloat16
    targets: list[bool] = []
    for shape_name, (n, d) in SHAPES.items():
        a = _inputs(n, d, dtype)
        for op in ("adaln_modulate", "gated_residual_adaln"):
            for provider in ("sora_fast", "eager", "torch.compile"):
                f = _callables(op, provider, a)
                args = [a["x"], a["shift"], a["scale"], a["gate"], a["branch"]]
                for direction in ("fwd", "bwd"):
                    try:
                        if direction == "fwd":
                            ms = do_bench_median(lambda: f(*args))
                        else:
                            leaves = [t.detach().requires_grad_(True) for t in args]
                            outs = f(*leaves)
                            outs = outs if isinstance(outs, tuple) else (outs,)
                            grads = [torch.randn_like(o) for o in outs]
                            ms = do_bench_median(lambda: torch.autograd.backward(outs, grads, retain_graph=True),
                                                 grad_to_none=leaves)
                    except Exception as e:  # a provider that cannot run this case is reported, not fatal
                        print(f"  {op} {direction} {provider}: failed: {type(e).__name__}: {e}")
                        continue
                    nbytes = BYTES_PER_ELEM_PASS[(op, direction)] * n * d * 2
                    gbs = throughput(nbytes, ms, "GB/s")
                    pct = pct_of_floor(gbs, copy_gbs)
                    verdict = ""
                    if provider == "sora_fast" and direction == "fwd":
                        met = pct >= TARGET_PCT_OF_COPY
                        targets.append(met)
                        verdict = f"  target >= {TARGET_PCT_OF_COPY:.0f}%: {'met' if met else 'MISSED'}"
                    print(f"  {shape_name} {op:22s} {direction} {provider:14s} {ms:8.3f} ms {gbs:7.0f} GB/s "
                          f"{pct:5.1f}% of copy{verdict}")
                    for metric, value in (("ms", ms), ("GB/s", gbs), ("%copy", pct)):
                        rows.add(provider, f"{shape_name} ({n}x{d})", metric, value, kernel=f"{op}_{direction}")
        del a
    print(f"sora_fast forward at >= {TARGET_PCT_OF_COPY:.0f}% of copy bandwidth: {sum(targets)} of "
          f"{len(targets)} cases")
    return rows.rows


def cpu_smoke() -> bool:
    """A tiny check that the emulated CUDA kernels agree with the reference (not a benchmark): x_new bit
    for bit (the contract rounds x + gate * branch once), y within one bf16 ulp of the reference (both
    compute in fp32 and round once; only the fp32 reduction order differs). True when they agree."""
    import sora_fast.ops as O
    from sora_fast import _ext

    if not _ext.build_info().get("emulation", False):
        print("sora_fast._C is not built (or has no host emulation): nothing to run on CPU")
        return False
    x, br = torch.randn(4, 64, dtype=torch.bfloat16), torch.randn(4, 64, dtype=torch.bfloat16)
    g, sh, sc = torch.randn(2, 64), torch.randn(2, 64), torch.randn(2, 64)
    ids = torch.tensor([0, 0, 1, 1], dtype=torch.int32)
    (x_new, y), (x_new_ref, y_ref) = (O.gated_residual_adaln(x, br, g, sh, sc, ids, backend="cuda"),
                                      O.gated_residual_adaln_ref(x, br, g, sh, sc, ids))
    err = (y.double() - y_ref.double()).abs()
    # a bf16 ulp is at most 2^-7 of the value (8-bit significand); 1e-5 for fp32 noise near zero
    ok = torch.equal(x_new, x_new_ref) and bool((err <= y_ref.double().abs() * 2.0 ** -7 + 1e-5).all())
    print(f"emulated gated_residual_adaln (4 x 64, bf16) vs reference: x_new "
          f"{'identical' if torch.equal(x_new, x_new_ref) else 'DIFFERS'}, y max abs difference "
          f"{err.max().item():.3g} -> {'OK' if ok else 'FAIL'}")
    return ok


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    cli.add_out_flag(p, "directory for the JSON and CSV rows", Path("bench_results"))
    cli.add_cpu_flag(p, "skip the GPU timings even when a GPU is present: run the CPU smoke of the emulated kernels")
    args = p.parse_args(argv)
    if not cli.on_gpu(args):
        why = "--cpu given" if args.cpu else "no CUDA GPU here"
        print(f"bench_adaln: {why}: GB/s needs a GPU (H100/H200). Running the CPU smoke only.")
        return 0 if cpu_smoke() else 1
    rows = run_gpu()
    write_json(args.out / "bench_adaln.json", rows)
    write_csv(args.out / "bench_adaln.csv", rows, list(rows[0]))
    print(f"{len(rows)} rows -> {args.out}/bench_adaln.json, .csv")
    return 0


if __name__ == "__main__":
    sys.exit(main())
