"""diffusers models before and after ``sora_fast.integrations.diffusers.accelerate``, timed in one run.

Three measurements, fp32 on the CPU (on a GPU the same script times the kernel backends), each checked
for correctness before it is timed (a failed check is a row without timings):

1. ``wan``: a random diffusers ``WanTransformer3DModel`` forward (no grad) before and after
   ``accelerate`` (attention with fused RoPE, adaLN chains); max relative difference and latency.
2. ``packed``: ``wan_packed_forward`` on latents of different sizes (one packed forward) against one
   diffusers forward per latent (diffusers cannot batch different sizes); every output checked.
3. ``vae``: a random ``AutoencoderKLWan`` decode before and after ``accelerate`` (causal convs, RMS
   norm + SiLU).
4. ``wan small``: the Wan forward of 1. at small latents (32 and 192 tokens), where on a CPU the accelerated
   model hands blocks and attention calls back to diffusers' own code (``wan.CPU_MIN_ELEMENTS``).

Timing, as ``bench_system.py`` (whose model builders it uses): both paths interleaved, warm-up first, median
of ``--reps``; ratio = before / after (> 1: the accelerated path is faster). Each row names the path every
accelerated op took (``accelerate``'s ``handle.choices``): on the CPU the torch backend, whose path for each
op is the fastest correct one measured (attention on torch's fused SDPA with a RoPE table made once per
latent grid, the adaLN chains with broadcast tables, the causal conv through oneDNN, which PyTorch's own
CPU heuristic, used by diffusers' Conv3d, skips at batch 1); on a GPU the kernels.

    python bench/bench_diffusers_accelerate.py [--quick] [--reps 5] [--threads 1] [--json P]
"""
from __future__ import annotations

import argparse
import copy
import sys
from pathlib import Path

if __package__ in (None, ""):   # run as a file: `bench` and `sora_fast` import from this checkout (bench/README.md)
    sys.path.append(str(Path(__file__).resolve().parents[1]))

import torch

from bench.bench_system import make_dits, make_vaes, rel_err
from sora_fast.bench import args as cli
from sora_fast.bench.report import write_json
from sora_fast.bench.timing import time_interleaved

REL_TOL = 1e-5  # fp32 max|a - b| / max|b|; fp32 rounding of the same math in another order is ~1e-6


def settings(quick: bool) -> dict:
    if quick:
        return dict(dit=dict(heads=2, head_dim=32, layers=1, ffn=128, text_dim=32, in_ch=4), latent=(2, 8, 8),
                    mixed=[(1, 8, 8), (2, 6, 10), (3, 4, 4)], text_len=8, vae=dict(base_dim=8, latent=(2, 4, 4)),
                    small=[(2, 4, 4)], reps=1, warmup=0)
    return dict(dit=dict(heads=4, head_dim=64, layers=4, ffn=1024, text_dim=64, in_ch=16), latent=(3, 24, 40),
                mixed=[(1, 32, 32), (3, 24, 40), (5, 16, 16), (2, 30, 18)], text_len=32,
                vae=dict(base_dim=16, latent=(3, 16, 16)), small=[(2, 8, 8), (3, 16, 16)], reps=5, warmup=1)


def _accelerated_copy(model):
    """The same weights twice: the original, and a deep copy accelerated (so both are timed as they are,
    interleaved, without undo/redo between repetitions). Returns the copy and the path each op takes."""
    from sora_fast.integrations.diffusers import accelerate

    twin = copy.deepcopy(model)
    return twin, accelerate(twin).choices


def _row(case, shape, before, after, outputs, s, paths) -> dict:
    """Check ``outputs()`` -> (accelerated, original) pairs, then time both paths."""
    with torch.no_grad():
        err = max(rel_err(a, b) for a, b in outputs())
        row = dict(case=case, shape=shape, max_rel_err=err, passed=err <= REL_TOL, paths=paths)
        if row["passed"]:
            ts = time_interleaved({"before": before, "after": after}, s["reps"], s["warmup"])
            row.update(ms_before=1e3 * ts["before"], ms_after=1e3 * ts["after"], ratio=ts["before"] / ts["after"],
                       ratio_of_min=ts["min:before"] / ts["min:after"])
    return row


def bench_wan(s, wan, device, latent=None, case="wan forward") -> dict:
    c = s["dit"]
    fast, paths = _accelerated_copy(wan)
    kw = dict(hidden_states=torch.randn(1, c["in_ch"], *(latent or s["latent"]), device=device),
              timestep=torch.tensor([500.0], device=device),
              encoder_hidden_states=torch.randn(1, s["text_len"], c["text_dim"], device=device), return_dict=False)
    before, after = (lambda: wan(**kw)[0]), (lambda: fast(**kw)[0])
    return _row(case, f"latent {tuple(kw['hidden_states'].shape)}", before, after,
                lambda: [(after(), before())], s, paths)


def bench_packed(s, wan, device) -> dict:
    from sora_fast.integrations.diffusers import wan_packed_forward

    c = s["dit"]
    lats = [torch.randn(c["in_ch"], *thw, device=device) for thw in s["mixed"]]
    texts = [torch.randn(s["text_len"], c["text_dim"], device=device) for _ in lats]
    t = torch.linspace(10, 990, len(lats), device=device)
    alone = lambda: [wan(hidden_states=x[None], timestep=t[i:i + 1], encoder_hidden_states=texts[i][None],  # noqa: E731
                         return_dict=False)[0][0] for i, x in enumerate(lats)]
    packed = lambda: wan_packed_forward(wan, lats, t, texts)  # noqa: E731
    paths = {f"VideoDiT.{f}": f"torch on {device}: {_torch_path(f)}" for f in ("attention", "adaln")}
    return _row("packed mixed sizes", f"latents {s['mixed']}", alone, packed,
                lambda: list(zip(packed(), alone())), s, paths)


def bench_vae(s, device) -> dict:
    v = s["vae"]
    dv = make_vaes(v["base_dim"])[0].to(device)
    fast, paths = _accelerated_copy(dv)
    z = torch.randn(1, 4, *v["latent"], device=device)
    before, after = (lambda: dv.decode(z).sample), (lambda: fast.decode(z).sample)
    return _row("wan vae decode", f"latent {tuple(z.shape)}", before, after, lambda: [(after(), before())], s, paths)


def _torch_path(family: str) -> str:
    from sora_fast.integrations.diffusers._accelerate import TORCH_PATHS

    return TORCH_PATHS[family]


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--quick", action="store_true", help="tiny sizes, one repetition (smoke test)")
    cli.add_reps_flag(p, "path")
    cli.add_threads_flag(p)
    p.add_argument("--json", default=None, help="write the rows to this JSON file")
    args = p.parse_args(argv)
    cli.check_counts(args, p.error)
    s = settings(args.quick)
    if args.reps is not None:
        s["reps"] = args.reps
    with cli.torch_threads(args.threads):
        return run(args, s)


def run(args, s) -> int:
    device = "cuda" if torch.cuda.is_available() else "cpu"
    torch.manual_seed(0)
    wan, _ = make_dits(s["dit"])
    wan = wan.to(device)
    rows = [bench_wan(s, wan, device), bench_packed(s, wan, device), bench_vae(s, device)]
    rows += [bench_wan(s, wan, device, lat, "wan forward, small") for lat in s["small"]]
    print(f"{device}, fp32, {torch.get_num_threads()} threads, median of {s['reps']}")
    for r in rows:
        timing = (f"before {r['ms_before']:.1f} ms, after {r['ms_after']:.1f} ms, ratio {r['ratio']:.2f}"
                  if "ratio" in r else "not timed")
        print(f"  {r['case']:<20} {r['shape']:<48} max rel err {r['max_rel_err']:.1e} "
              f"{'ok' if r['passed'] else 'FAILED'}; {timing}")
        for op, path in r["paths"].items():
            print(f"      {op}: {path}")
    if args.json:
        write_json(args.json, rows, indent=2, newline=False)
    return 0 if all(r["passed"] for r in rows) else 1


if __name__ == "__main__":
    sys.exit(main())
