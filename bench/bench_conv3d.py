"""Causal Conv3d: sora_fast's Triton implicit GEMM against cuDNN (F.conv3d, channels_last_3d), TFLOP/s, % of floor,
and the end-to-end chunked VAE decode with the Triton conv against the torch reference conv.

On a GPU, at Wan-VAE decoder shapes (one chunk of 4 frames, the cache holding the previous chunk's last
kt-1 frames), each provider is timed with ``triton.testing.do_bench`` (median):

- ``sora_fast``: ``causal_conv3d(..., cache=..., packed_weight=..., backend="triton")`` with the weight packed
  once outside the timed calls (as a module keeps it) — causal padding and the cache are read inside the
  kernel, channels-last in and out;
- ``cudnn``: ``F.conv3d`` on an input that is already padded (the conv alone, channels_last_3d): the
  number to beat for the math;
- ``eager``: what a chunked decoder does in PyTorch (``torch.cat`` of cache and chunk, ``F.pad``, then
  ``F.conv3d``, all in the input dtype): the conv plus its copies.

Each provider cycles through copies of its inputs that together exceed three times the L2 cache, so no
call reads inputs the previous call left in L2. Numerics gate the run: against an fp32 cuDNN reference
(TF32 off) on the same inputs, sora_fast's max error must be at most 2x cuDNN's own low-precision error
plus a few units in the last place (``sora_fast.bench.runner.REL_TOL`` x max(1, max |reference|));
otherwise the run exits 1 after writing its rows.

End to end (``e2e``): ``CausalVAE("wan2.1")`` (random weights) decodes a Wan 480p latent
``(1, 16, --e2e-frames, 60, 104)`` chunk by chunk, once with ``causal_conv3d`` on the ``triton`` backend and
once on the ``torch`` reference backend (fp32 math with ``torch.cat``/``F.pad`` copies), the other ops on
their default backend; warm-up call first (it packs the weights), then ``--e2e-reps`` interleaved timed
calls each (CUDA events, median). Rows also record how many weight packs happened in the timed calls (0:
the modules' packed weights were reused) and the largest output difference between the two.

FLOPs = 2·B·Cin·Cout·kt·kh·kw·T_out·H_out·W_out; the floor is the dense bf16/fp16 datasheet number
(989 TFLOP/s for H100 SXM and H200). Rows (kernel, provider, shape, dtype, metric, value, gpu, versions,
note) go to ``OUT/bench_conv3d.json`` and ``OUT/bench_conv3d.csv``.

Without a GPU (or with ``--cpu``) it says so and runs the CPU-side parts: a tiny conv under the Triton
interpreter against the fp64 reference, and a tiny chunked decode (``CausalVAE("tiny")``, 2 latent frames
of 1x1) with the Triton conv under the interpreter against the torch backend (interpreter seconds are not
a performance number). Exit status 1 when a numerical check fails.
"""
from __future__ import annotations

import os
import sys
import time
from dataclasses import dataclass
from pathlib import Path

if __package__ in (None, ""):   # run as a file: `bench` and `sora_fast` import from this checkout (bench/README.md)
    sys.path.append(str(Path(__file__).resolve().parents[1]))

from sora_fast.bench import args as cli
from sora_fast.bench.floors import check_tolerance, floor_for, pct_of_floor, throughput
from sora_fast.bench.report import Failures, versions_text
from sora_fast.bench.report import Rows as _Rows
from sora_fast.bench.timing import cycle as _cycle
from sora_fast.bench.timing import do_bench_median, interleaved_times, rotations

KERNEL = "causal_conv3d"


@dataclass(frozen=True)
class Case:
    name: str
    cin: int
    cout: int
    t: int
    h: int
    w: int
    k: tuple[int, int, int] = (3, 3, 3)
    b: int = 1

    @property
    def shape(self) -> str:
        return f"{self.name} B={self.b} {self.cin}->{self.cout} k={self.k} THW={self.t}x{self.h}x{self.w}"

    def flops(self) -> float:
        kt, kh, kw = self.k
        return 2.0 * self.b * self.cin * self.cout * kt * kh * kw * self.t * self.h * self.w  # stride 1, same pad


# Wan2.1 VAE decoder at 480p (latent 60x104), chunks of 4 frames; up-sampled stages double H and W.
CASES = [
    Case("mid_60x104", 384, 384, 4, 60, 104),
    Case("up1_120x208", 384, 384, 4, 120, 208),
    Case("up2_240x416", 192, 192, 4, 240, 416),
    Case("up3_480x832", 96, 96, 4, 480, 832),
    Case("time_up_60x104", 384, 768, 4, 60, 104, (3, 1, 1)),
    Case("head_480x832", 96, 3, 4, 480, 832),
]
QUICK = CASES[:2]


def versions() -> str:
    return versions_text(("torch", "triton", "python"))


class Rows(_Rows):
    """The shared result rows (:class:`sora_fast.bench.report.Rows`), written to bench_conv3d.json/.csv."""

    def __init__(self, gpu: str, dtype: str):
        super().__init__(gpu, dtype, None, kernel=KERNEL)

    def add(self, *args, **kwargs) -> None:
        # versions at the first row, not before: they import triton, which run_cpu must import after it has
        # chosen the interpreter
        self.versions = self.versions or versions()
        super().add(*args, **kwargs)

    def write(self, out: Path) -> None:
        super().write(out, "bench_conv3d")


# The tolerance of sora_fast vs the fp32 cuDNN reference: sora_fast.bench's rule, with cuDNN in the input
# dtype as PyTorch's own low-precision computation. Inputs rotate past L2 by sora_fast.bench.timing.rotations.
conv_tolerance = check_tolerance


def _count_packs():
    """Context manager counting weight packs (module-kept or in the launcher) inside it."""
    import contextlib

    from sora_fast.ops import conv3d as ops_conv3d
    from sora_fast.triton import conv3d as tri

    @contextlib.contextmanager
    def counting():
        calls = [0]
        real = ops_conv3d.causal_conv3d_pack_weight

        def spy(w):
            calls[0] += 1
            return real(w)

        ops_conv3d.causal_conv3d_pack_weight = tri.causal_conv3d_pack_weight = spy
        try:
            yield calls
        finally:
            ops_conv3d.causal_conv3d_pack_weight = tri.causal_conv3d_pack_weight = real

    return counting()


def run_gpu(args, rows: Rows, failures: Failures) -> None:
    import torch
    import torch.nn.functional as F

    from sora_fast.ops import causal_conv3d
    from sora_fast.ops.conv3d import causal_conv3d_pack_weight

    dtype = cli.GPU_DTYPES[args.dtype]
    gpu = torch.cuda.get_device_name()
    floor = floor_for(gpu, "TFLOP/s")
    l2 = torch.cuda.get_device_properties(0).L2_cache_size
    cl = torch.channels_last_3d
    for case in (QUICK if args.quick else CASES):
        kt, kh, kw = case.k
        pad = (kw // 2, kw // 2, kh // 2, kh // 2)
        set_bytes = case.b * case.cin * (case.t + kt - 1) * case.h * case.w * torch.finfo(dtype).bits // 8
        n = rotations(set_bytes, l2)

        def chunk():
            x = torch.randn(case.b, case.cin, case.t, case.h, case.w, device="cuda", dtype=dtype).contiguous(
                memory_format=cl)
            cache = torch.randn(case.b, case.cin, kt - 1, case.h, case.w, device="cuda", dtype=dtype).contiguous(
                memory_format=cl) if kt > 1 else None
            return x, cache

        sets = [chunk() for _ in range(n)]
        weight = torch.randn(case.cout, case.cin, kt, kh, kw, device="cuda", dtype=dtype)
        weight = weight / (case.cin * kt * kh * kw) ** 0.5
        weight_cl = weight.contiguous(memory_format=cl)
        packed = causal_conv3d_pack_weight(weight)   # once, as a module keeps it: no packing in the timed calls
        bias = torch.randn(case.cout, device="cuda", dtype=dtype)
        def stream(x, cache):
            return x if cache is None else torch.cat([cache, x], dim=2)
        padded = [F.pad(stream(*xc), pad).contiguous(memory_format=cl) for xc in sets]
        providers = {
            "sora_fast": _cycle(sets, lambda x, cache: causal_conv3d(x, weight, bias, cache=cache, packed_weight=packed,
                                                                     backend="triton")),
            "cudnn": _cycle([(p,) for p in padded], lambda p: F.conv3d(p, weight_cl, bias)),
            "eager": _cycle(sets, lambda x, cache: F.conv3d(F.pad(stream(x, cache), pad), weight_cl, bias)),
        }
        # numerics on the first input set, against fp32 cuDNN with TF32 off
        tf32 = torch.backends.cudnn.allow_tf32
        torch.backends.cudnn.allow_tf32 = False
        try:
            ref = F.conv3d(padded[0].float(), weight_cl.float(), bias.float())
        finally:
            torch.backends.cudnn.allow_tf32 = tf32
        x0, cache0 = sets[0]
        err = (causal_conv3d(x0, weight, bias, cache=cache0, packed_weight=packed, backend="triton").float()
               - ref).abs().max().item()
        err_cudnn = (F.conv3d(padded[0], weight_cl, bias).float() - ref).abs().max().item()
        tol = conv_tolerance(err_cudnn, ref.abs().max().item(), dtype)
        ok = failures.check(f"{case.shape} sora_fast vs fp32 cuDNN", err, tol)
        rows.add("sora_fast", case.shape, "max_abs_err_vs_fp32_cudnn", err, note=f"tolerance {tol:.3e}")
        rows.add("cudnn", case.shape, "max_abs_err_vs_fp32_cudnn", err_cudnn)
        print(f"{case.shape:60s} max |err| vs fp32 cuDNN: sora_fast {err:.2e}, cudnn {err_cudnn:.2e}, tolerance "
              f"{tol:.2e}{'' if ok else '  FAILED'}", flush=True)
        del ref
        for name, fn in providers.items():
            ms = do_bench_median(fn, warmup=args.warmup_ms, rep=args.rep_ms)
            tflops = throughput(case.flops(), ms, "TFLOP/s")
            pct = pct_of_floor(tflops, floor)
            rows.add(name, case.shape, "ms", ms, note=f"{n} rotating input sets")
            rows.add(name, case.shape, "tflops", tflops)
            if floor:
                rows.add(name, case.shape, "pct_of_floor", pct, note=f"floor {floor} TFLOP/s")
            print(f"{case.shape:60s} {name:10s} {ms:8.3f} ms {tflops:7.1f} TFLOP/s"
                  + (f" {pct:5.1f}% of floor" if floor else ""), flush=True)
        del sets, padded, providers
        torch.cuda.empty_cache()


E2E_PROVIDERS = {"sora_fast": "triton", "torch_ref": "torch"}   # the causal_conv3d backend of each


def run_e2e(rows: Rows, failures: Failures, *, preset: str, latent_shape, dtype, device: str, reps: int,
            note: str, tol: float = None, warmup: bool = True) -> None:
    """Chunked ``CausalVAE.decode`` with ``causal_conv3d`` on each backend of :data:`E2E_PROVIDERS`: one
    warm-up call each (``warmup``; it also packs the weights, else the modules pack them beforehand),
    then ``reps`` interleaved timed calls each."""
    import statistics

    import torch

    from sora_fast.models.vae import CausalVAE

    torch.manual_seed(0)
    vae = CausalVAE(preset).to(device=device, dtype=dtype).eval()
    z = torch.randn(*latent_shape, device=device, dtype=dtype)
    shape = f"e2e_decode {preset} latent={'x'.join(map(str, latent_shape))} chunked"
    sync = torch.cuda.synchronize if device == "cuda" else None

    def decode(backend):
        vae.backend = {"causal_conv3d": backend}
        with torch.no_grad():
            return vae.decode(z, chunked=True)

    if warmup:
        for backend in E2E_PROVIDERS.values():
            decode(backend)
    else:   # what the warm-up call does to the modules: pack each conv's weight for the triton backend
        for m in vae.modules():
            if hasattr(m, "packed_weight"):
                m.packed_weight(m.weight, E2E_PROVIDERS["sora_fast"])
    outs = {}
    with _count_packs() as packs:
        times = interleaved_times({name: lambda b=backend: decode(b) for name, backend in E2E_PROVIDERS.items()},
                                  reps, sync=sync, last=outs)
    times = {name: [1e3 * t for t in ts] for name, ts in times.items()}   # ms
    diff = (outs["sora_fast"].float() - outs["torch_ref"].float()).abs().max().item()
    for name in E2E_PROVIDERS:
        ms = statistics.median(times[name])
        rows.add(name, shape, "ms", ms, note=note)
        print(f"{shape:60s} {name:10s} {ms:10.2f} ms  ({note})", flush=True)
    ratio = statistics.median(times["torch_ref"]) / statistics.median(times["sora_fast"])
    rows.add("sora_fast", shape, "speedup_vs_torch_ref", ratio, note=note)
    rows.add("sora_fast", shape, "weight_packs_in_timed_calls", packs[0])
    rows.add("sora_fast", shape, "max_abs_diff_vs_torch_ref", diff,
             note="" if tol is None else f"tolerance {tol:.1e}")
    print(f"{shape:60s} sora_fast {ratio:.3g}x the torch reference; max |diff| {diff:.2e}; "
          f"{packs[0]} weight packs in the timed calls", flush=True)
    if tol is not None:
        failures.check(f"{shape} sora_fast vs torch_ref", diff, tol)
    if packs[0]:
        failures.append(f"{shape}: {packs[0]} weight packs in the timed calls (the packed weights were not reused)")


def run_cpu(rows: Rows, failures: Failures) -> None:
    """The same kernel under the Triton interpreter on tiny inputs, against the references."""
    os.environ["TRITON_INTERPRET"] = "1"       # before triton is imported
    import torch

    from sora_fast.ops import causal_conv3d
    from sora_fast.ops.conv3d import causal_conv3d_pack_weight, causal_conv3d_ref

    shape = "smoke B=1 5->7 k=(3, 3, 3) THW=3x5x7 cache=2"
    x = torch.randn(1, 5, 3, 5, 7).contiguous(memory_format=torch.channels_last_3d)
    weight, bias, cache = torch.randn(7, 5, 3, 3, 3), torch.randn(7), torch.randn(1, 5, 2, 5, 7)
    packed = causal_conv3d_pack_weight(weight)
    t0 = time.perf_counter()
    out = causal_conv3d(x, weight, bias, cache=cache, packed_weight=packed, backend="triton")
    t1 = time.perf_counter()
    ref = causal_conv3d_ref(x.double(), weight.double(), bias.double(), cache=cache.double())
    err = (out.double() - ref).abs().max().item()
    rows.add("sora_fast", shape, "max_abs_err_vs_fp64_ref", err, note="Triton interpreter")
    rows.add("sora_fast", shape, "interpreter_s", t1 - t0, note="Triton interpreter (not a performance number)")
    print(f"interpreter smoke: {shape}: max |err| vs fp64 reference {err:.2e} ({t1 - t0:.2f} s interpreted)")
    # fp32 accumulation of 135 terms of |x·w| <= ~30 each: ~1e-5 worst case; a wrong tap or mask is O(1)
    failures.check(f"{shape} vs fp64 reference", err, 1e-4)
    # fp32 throughout; the two backends differ by accumulation order only (~1e-6 measured): a bug is O(0.1)
    run_e2e(rows, failures, preset="tiny", latent_shape=(1, 4, 2, 1, 1), dtype=torch.float32, device="cpu", reps=1,
            note="Triton interpreter (not a performance number)", tol=1e-4, warmup=False)


def main(argv=None) -> int:
    parser = cli.script_parser(__doc__)
    parser.add_argument("--quick", action="store_true", help="GPU: only the first two decoder shapes and 1 latent "
                                                             "frame end to end")
    cli.add_cpu_flag(parser, "skip GPU timings even when a GPU is present")
    cli.add_dtype_flag(parser)
    cli.add_do_bench_flags(parser, 25.0, 100.0, warmup_help="do_bench warmup in milliseconds (default 25)",
                           rep_help="do_bench repetition time in ms (default 100)")
    parser.add_argument("--no-e2e", action="store_true", help="GPU: skip the end-to-end chunked VAE decode")
    parser.add_argument("--e2e-frames", type=int, default=3,
                        help="GPU: latent frames of the end-to-end decode (default 3: 9 video frames at 480x832)")
    parser.add_argument("--e2e-reps", type=int, default=3,
                        help="GPU: timed end-to-end decodes per provider (default 3)")
    cli.add_out_flag(parser, "folder for bench_conv3d.json/.csv (default bench/results)",
                     Path(__file__).resolve().parent / "results")
    args = parser.parse_args(argv)
    if args.e2e_frames < 1 or args.e2e_reps < 1:
        parser.error(f"--e2e-frames and --e2e-reps must be >= 1, got {args.e2e_frames} and {args.e2e_reps}")

    import torch
    has_gpu = cli.on_gpu(args)
    rows = Rows(torch.cuda.get_device_name() if has_gpu else "none", args.dtype if has_gpu else "fp32")
    failures = Failures()
    if has_gpu:
        run_gpu(args, rows, failures)
        if not args.no_e2e:
            dtype = cli.GPU_DTYPES[args.dtype]
            frames = 1 if args.quick else args.e2e_frames
            run_e2e(rows, failures, preset="wan2.1", latent_shape=(1, 16, frames, 60, 104), dtype=dtype,
                    device="cuda", reps=args.e2e_reps, note=f"median of {args.e2e_reps}, CUDA-synchronized wall time")
    else:
        print("no GPU (or --cpu): GPU timings are skipped; running the CPU-side parts under the Triton interpreter")
        run_cpu(rows, failures)
    rows.write(args.out)
    print(f"{len(rows.rows)} rows -> {args.out / 'bench_conv3d.json'}")
    return failures.exit_status()


if __name__ == "__main__":
    sys.exit(main())
