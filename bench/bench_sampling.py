"""Fewer DiT evaluations at equal quality: solvers and step caches on the demo pipeline, in one run.

Generates ``--val`` held-out prompts (``sora_fast.data.prompts(N, seed=777)``) at the demo's generation sizes
and guidance with one sampling seed, for Euler at 10/20/30/50 steps, UniPC and DPM++ at 5/8/10/20, and each
step cache (first-block, TeaCache) at two thresholds on ``--cache-base`` (default UniPC 20). Each row: the
automatic checker's pass rate, PSNR and SSIM of the decoded clips against the 50-step Euler clips (the
reference; a cache row also has its PSNR against its own uncached run), full DiT evaluations per video (CFG
halves counted apart), and the denoising wall time. TeaCache's polynomial is fitted first on other prompts
(``sora_fast.data.prompts(8, seed=1)``) with the base solver (``sora-fast calibrate-cache`` does the same).

``--pipeline DIR`` scores a saved pipeline (a demo's ``OUT/pipeline``); otherwise the demo is trained first
(``--quick``: the quick preset, minutes; else the default one). SSIM needs scikit-image or torchmetrics; without
either it is reported as n/a.

    python bench/bench_sampling.py --pipeline sora_fast_demo/pipeline [--val 24] [--json PATH]
    python bench/bench_sampling.py --quick --out bench_sampling_demo
    python bench/bench_sampling.py --pipeline DIR --val 48 --solvers unipc:20 --caches teacache:0.15,first-block:0.15

``--solvers`` / ``--caches`` replace the lists of settings (``SOLVER:STEPS`` / ``CACHE:THRESHOLD``, comma-separated);
Euler 50 (the reference) and the cache base always run.
"""
from __future__ import annotations

import argparse
import dataclasses
import math
import sys
import time
from pathlib import Path

if __package__ in (None, ""):   # run as a file: `bench` and `sora_fast` import from this checkout (bench/README.md)
    sys.path.append(str(Path(__file__).resolve().parents[1]))

import torch

from sora_fast.bench import args as cli
from sora_fast.bench.report import write_json

SOLVER_RUNS = [("euler", s) for s in (10, 20, 30, 50)] + [(sv, s) for sv in ("unipc", "dpm++") for s in (5, 8, 10, 20)]
CACHE_RUNS = [("first-block", 0.1), ("first-block", 0.2), ("teacache", 0.1), ("teacache", 0.2)]


def _ssim_fn():
    """A maintained SSIM ``(a, b) -> float`` on ``(3, T, H, W)`` clips in [0, 1], or None."""
    try:
        from skimage.metrics import structural_similarity

        def ssim(a, b):
            return float(sum(structural_similarity(x.permute(1, 2, 0).numpy(), y.permute(1, 2, 0).numpy(),
                                                   channel_axis=2, data_range=1.0)
                             for x, y in zip(a.unbind(1), b.unbind(1)))) / a.shape[1]
        return ssim, "scikit-image"
    except ImportError:
        pass
    try:
        from torchmetrics.functional.image import structural_similarity_index_measure

        def ssim(a, b):
            return float(structural_similarity_index_measure(a.transpose(0, 1), b.transpose(0, 1), data_range=1.0))
        return ssim, "torchmetrics"
    except ImportError:
        return None, "n/a (install scikit-image or torchmetrics)"


def psnr(a, b) -> float:
    """PSNR in dB (peak 1) of clips in [0, 1]: two tensors, or two lists of clips pooled (the mean of their
    per-clip MSEs, so that one identical clip does not make the set's PSNR infinite); inf when identical."""
    pairs = list(zip(a, b)) if isinstance(a, list) else [(a, b)]
    mse = sum(float(((x - y) ** 2).mean()) for x, y in pairs) / len(pairs)
    return math.inf if mse == 0 else 10 * math.log10(1.0 / mse)


def _mean(xs):
    xs = [x for x in xs if x is not None]
    return sum(xs) / len(xs) if xs else None


def run(pipe, prompts, sizes, *, guidance: float, seed: int, base: tuple, teacache_coef: tuple, log,
        solver_runs=SOLVER_RUNS, cache_runs=CACHE_RUNS) -> list[dict]:
    """One row per setting (see the module docstring); ``solver_runs`` must hold ``("euler", 50)`` (the
    reference) and ``base``."""
    from sora_fast.data import check_clips

    ssim, _ = _ssim_fn()
    runs = [dict(solver=sv, steps=s, cache=None) for sv, s in solver_runs]
    runs += [dict(solver=base[0], steps=base[1], cache=f"{name}:{t:g}" + (
        ":" + ",".join(f"{c:.6g}" for c in teacache_coef) if name == "teacache" else "")) for name, t in cache_runs]
    runs.sort(key=lambda r: (r["solver"], r["steps"]) != ("euler", 50) or r["cache"] is not None)  # reference first
    clips, rows, t0 = {}, [], time.perf_counter()
    for r in runs:
        out = pipe.generate(prompts, sizes, steps=r["steps"], guidance=guidance, seed=seed, solver=r["solver"],
                            cache=r["cache"])
        t = pipe.last_timings
        key = (r["solver"], r["steps"], r["cache"])
        clips[key] = [(c.float() + 1) / 2 for c in out]           # [0, 1]
        ref = clips[("euler", 50, None)]
        own = clips.get((r["solver"], r["steps"], None)) if r["cache"] else None
        passed = sum(c.passed for c in check_clips(out, prompts))
        row = {**r, "passed": passed, "clips": len(out), "pass_rate": passed / len(out),
               "psnr_vs_euler50": psnr(clips[key], ref),
               "ssim_vs_euler50": _mean([ssim(a, b) for a, b in zip(clips[key], ref)]) if ssim else None,
               "psnr_vs_uncached": psnr(clips[key], own) if own else None,
               "evaluations_per_video": sum(t["evaluations"]) / len(out), "denoise_s": t["denoise"]}
        rows.append(row)
        log(f"{_label(row):28s} passed {passed:3d}/{len(out)}  evals/video {row['evaluations_per_video']:5.1f}  "
            f"denoise {t['denoise']:6.1f} s   ({time.perf_counter() - t0:.0f} s)")
    return rows


def _label(r: dict) -> str:
    c = r["cache"].split(":")[0] + ":" + r["cache"].split(":")[1] if r["cache"] else ""
    return f"{r['solver']} {r['steps']}" + (f" + {c}" if c else "")


def _fmt(v, spec):
    width = spec.split(".")[0]
    return format("n/a" if v is None else "inf", f">{width}") if v is None or v == math.inf else format(v, spec)


def report(rows: list[dict], ssim_name: str) -> str:
    lines = [f"{'setting':28s} {'pass rate':>9} {'PSNR dB':>8} {'SSIM':>6} {'vs uncached':>11} {'evals/video':>11} "
             f"{'denoise s':>9}"]
    for r in rows:
        lines.append(f"{_label(r):28s} {100 * r['pass_rate']:8.1f}% {_fmt(r['psnr_vs_euler50'], '8.2f')} "
                     f"{_fmt(r['ssim_vs_euler50'], '6.3f')} {_fmt(r['psnr_vs_uncached'], '11.2f')} "
                     f"{r['evaluations_per_video']:11.1f} {r['denoise_s']:9.1f}")
    lines.append(f"PSNR (pooled MSE) / SSIM ({ssim_name}, mean) of decoded clips in [0, 1] against Euler 50 steps, "
                 "same seed; 'vs uncached': a cache row's PSNR against its solver without the cache")
    return "\n".join(lines)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--pipeline", default=None, help="score this saved pipeline instead of training the demo")
    ap.add_argument("--quick", action="store_true", help="without --pipeline: train the quick demo preset")
    ap.add_argument("--out", default="bench_sampling_demo", help="demo output folder when training")
    ap.add_argument("--val", type=int, default=24, help="held-out prompts (default: 24)")
    ap.add_argument("--seed", type=int, default=100, help="sampling seed (default: 100)")
    ap.add_argument("--guidance", type=float, default=None, help="CFG scale (default: the demo's)")
    ap.add_argument("--cache-base", default="unipc:20", metavar="SOLVER:STEPS",
                    help="solver and steps the caches run on (default: unipc:20)")
    ap.add_argument("--solvers", default=None, metavar="SOLVER:STEPS,...",
                    help="solver settings to run (default: Euler 10/20/30/50, UniPC and DPM++ 5/8/10/20)")
    ap.add_argument("--caches", default=None, metavar="CACHE:THRESHOLD,...",
                    help="cache settings on --cache-base (default: first-block and teacache at 0.1 and 0.2)")
    ap.add_argument("--json", default=None, help="write the rows here")
    cli.add_threads_flag(ap, "torch threads (default: torch's choice)")
    args = ap.parse_args(argv)
    cli.check_counts(args, cli.exit_with, ("val", "threads"))
    solver, _, steps = args.cache_base.partition(":")
    if solver not in ("euler", "unipc", "dpm++") or not steps.isdigit() or int(steps) < 2:
        raise SystemExit(f"--cache-base must be SOLVER:STEPS (euler|unipc|dpm++, steps >= 2), got {args.cache_base!r}")
    base = (solver, int(steps))
    solver_runs, cache_runs = SOLVER_RUNS, CACHE_RUNS
    if args.solvers is not None:
        solver_runs = _parse_list(args.solvers, "--solvers", lambda a, b: (a, int(b)),
                                  lambda a, b: a in ("euler", "unipc", "dpm++") and b.isdigit() and int(b) >= 1)
    if args.caches is not None:
        cache_runs = _parse_list(args.caches, "--caches", lambda a, b: (a, float(b)),
                                 lambda a, b: a in ("first-block", "teacache") and _positive(b))
    solver_runs = list(dict.fromkeys([("euler", 50), base, *solver_runs]))
    with cli.torch_threads(args.threads):
        return _run(args, base, solver_runs, cache_runs)


def _positive(text: str) -> bool:
    try:
        return math.isfinite(float(text)) and float(text) > 0
    except ValueError:
        return False


def _parse_list(text: str, flag: str, make, valid) -> list:
    out = []
    for item in text.split(","):
        a, _, b = item.strip().partition(":")
        if not valid(a, b):
            raise SystemExit(f"{flag} must be comma-separated NAME:VALUE settings, e.g. "
                             f"{'unipc:10,euler:20' if flag == '--solvers' else 'teacache:0.15'}; got {item!r}")
        out.append(make(a, b))
    return out


def _run(args, base, solver_runs=SOLVER_RUNS, cache_runs=CACHE_RUNS) -> int:
    from sora_fast.commands.generate import calibrate_pipeline_teacache
    from sora_fast.data import prompts as synthetic_prompts
    from sora_fast.demo import DEMO_PRESETS, run_demo
    from sora_fast.pipeline import VideoPipeline

    cfg = DEMO_PRESETS["quick" if args.quick else "default"]
    if args.pipeline is None:
        run_demo(args.out, quick=args.quick, config=cfg, progress=False)
        args.pipeline = str(Path(args.out) / "pipeline")
    pipe = VideoPipeline.load(args.pipeline)
    guidance = cfg.guidance if args.guidance is None else args.guidance
    val = synthetic_prompts(args.val, seed=777)
    sizes = [cfg.gen_sizes[i % len(cfg.gen_sizes)] for i in range(len(val))]
    coef = calibrate_pipeline_teacache(pipe, synthetic_prompts(8, seed=1), cfg.gen_sizes[0], steps=base[1],
                                       guidance=guidance, solver=base[0], degree=2, seed=1)
    print(f"TeaCache polynomial ({base[0]} {base[1]} steps, 8 calibration prompts): {[round(c, 4) for c in coef]}",
          file=sys.stderr)
    rows = run(pipe, val, sizes, guidance=guidance, seed=args.seed, base=base, teacache_coef=coef,
               log=lambda m: print(m, file=sys.stderr, flush=True), solver_runs=solver_runs, cache_runs=cache_runs)
    ssim_name = _ssim_fn()[1]
    print(f"\n{len(val)} held-out prompts, guidance {guidance:g}, seed {args.seed}, pipeline {args.pipeline}, "
          f"torch threads {torch.get_num_threads()}")
    print(report(rows, ssim_name))
    if args.json:
        write_json(Path(args.json), {"pipeline": args.pipeline, "config": dataclasses.asdict(cfg), "val_prompts": val,
                                     "seed": args.seed, "guidance": guidance, "teacache_coefficients": list(coef),
                                     "ssim": ssim_name, "rows": rows}, indent=2, newline=False)
        print(f"rows in {args.json}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
