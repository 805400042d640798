"""What a training-free local self-attention window costs on the demo pipeline (trained dense).

For the dense run and each window ``(wt, wh, ww)`` (half-sizes in latent patches, ``VideoPipeline.generate(...,
attention_window=...)``), generates the same held-out prompts (``sora_fast.data.prompts(N, seed=777)``, as
``bench_sampling.py`` and ``bench_demo_quality.py``) at the demo's generation sizes, sampler steps and guidance,
with one sampling seed (video i uses seed + i), and reports per row: the automatic checker's pass rate (and its
three parts: present, colour, direction), PSNR of the decoded clips in [0, 1] against the dense run's (pooled
MSE, ``bench_sampling.psnr``), the fraction of query-key pairs of the self-attention the window keeps (over
all the clips' patch grids), and the denoising time.

    python bench/_window_quality.py --pipeline sora_fast_demo/pipeline [--windows 2,2,2 2,1,1] [--prompts 24]
                                    [--seed 100] [--threads 1] [--json PATH]

``window_quality(pipeline_dir, windows, prompts=24, seed=100)`` returns the rows (``bench_attention.py`` calls it).
"""
from __future__ import annotations

import argparse
import math
import sys
import time
from pathlib import Path
from typing import Callable, Optional, Sequence

if __package__ in (None, ""):   # run as a file: `bench` and `sora_fast` import from this checkout (bench/README.md)
    sys.path.append(str(Path(__file__).resolve().parents[1]))

import torch

from bench.bench_sampling import psnr
from sora_fast.bench import args as cli
from sora_fast.bench.report import write_json

__all__ = ["window_quality", "pairs_kept", "report", "DEFAULT_WINDOWS"]

# On the demo's generation grids (latent 5 x 4 x 4, 5 x 4 x 6 and 5 x 6 x 4 patches: 9 frames, VAE 2x time, 4x
# space, patch (1, 2, 2)): (2, 2, 2) keeps 47% of the pairs, a 5x5x5 neighbourhood (the middle frame still sees
# the whole clip, the corners of a frame are cut); (2, 1, 1) keeps 23%, a 5x3x3 one: every frame of the motion
# but only the neighbouring patches (+-8 pixels, about the demo object's size).
DEFAULT_WINDOWS = ((2, 2, 2), (2, 1, 1))


def _axis_pairs(n: int, w: int) -> int:
    """Ordered pairs (i, j) of ``range(n)`` with ``|i - j| <= w``."""
    w = min(w, n - 1)
    return n + 2 * sum(n - d for d in range(1, w + 1)) if n else 0


def pairs_kept(grids: Sequence[Sequence[int]], window: Optional[Sequence[int]]) -> float:
    """Fraction of the self-attention's query-key pairs (each video attends to itself) that ``window`` keeps,
    over videos of patch grids ``grids`` ``[(T', H', W'), ...]``; 1.0 for None (dense)."""
    total = sum(math.prod(g) ** 2 for g in grids)
    if window is None or total == 0:
        return 1.0
    return sum(math.prod(_axis_pairs(n, w) for n, w in zip(g, window)) for g in grids) / total


def _load(pipeline):
    from sora_fast.pipeline import VideoPipeline

    return pipeline if isinstance(pipeline, VideoPipeline) else VideoPipeline.load(pipeline)


def window_quality(pipeline_dir, windows: Sequence[Sequence[int]] = DEFAULT_WINDOWS, prompts: int = 24,
                   seed: int = 100, *, sizes: Optional[Sequence[tuple]] = None, steps: Optional[int] = None,
                   guidance: Optional[float] = None,
                   log: Optional[Callable[[str], None]] = None) -> list[dict]:
    """Rows ``[dense, *windows]``, each ``{"window", "label", "pairs_kept", "passed", "clips", "pass_rate",
    "present", "color", "direction", "psnr_vs_dense", "denoise_s"}`` (``window`` None and ``psnr_vs_dense`` inf
    for the dense row).

    ``pipeline_dir``: a saved pipeline (a demo's ``OUT/pipeline``) or a loaded ``VideoPipeline``; ``windows``: a
    list of ``(wt, wh, ww)``; ``prompts``: how many held-out prompts; ``seed``: the sampling seed (100, as the
    other demo-quality benches). ``sizes``, ``steps``, ``guidance``: default the demo's (``DEMO_PRESETS
    ["default"]``: sizes cycled over the prompts, 20 steps, guidance 5). ``log``: called with a line per row."""
    from sora_fast.data import check_clips
    from sora_fast.data import prompts as synthetic_prompts
    from sora_fast.data.checker import CheckerThresholds
    from sora_fast.demo import DEMO_PRESETS
    from sora_fast.ops._common import check_window

    if isinstance(windows, (str, bytes)) or not isinstance(windows, Sequence):
        raise TypeError(f"windows must be a list of (wt, wh, ww), got {type(windows).__name__}")
    windows = [check_window(f"windows[{i}]", w) for i, w in enumerate(windows)]
    if any(w is None for w in windows):
        raise ValueError("windows must not hold None: the dense run is always the first row")
    if isinstance(prompts, bool) or not isinstance(prompts, int) or prompts < 1:
        raise ValueError(f"prompts must be an int >= 1, got {prompts!r}")
    if isinstance(seed, bool) or not isinstance(seed, int):
        raise ValueError(f"seed must be an int, got {seed!r}")
    cfg = DEMO_PRESETS["default"]
    pipe = _load(pipeline_dir)
    val = synthetic_prompts(prompts, seed=777)
    gen_sizes = list(cfg.gen_sizes if sizes is None else sizes)
    sizes = [tuple(gen_sizes[i % len(gen_sizes)]) for i in range(len(val))]
    steps = cfg.sample_steps if steps is None else steps
    guidance = cfg.guidance if guidance is None else guidance
    patch = pipe.dit.config.patch
    grids = [tuple(n // p for n, p in zip(pipe.latent_shape(s)[1:], patch)) for s in sizes]
    th = CheckerThresholds()
    rows, dense, t0 = [], None, time.perf_counter()
    for window in [None, *windows]:
        out = pipe.generate(val, sizes, steps=steps, guidance=guidance, seed=seed, attention_window=window)
        clips = [(c.float() + 1) / 2 for c in out]                       # [0, 1]
        dense = clips if dense is None else dense
        results = check_clips(out, val)
        passed = sum(r.passed for r in results)
        row = {"window": None if window is None else list(window),
               "label": "dense" if window is None else ",".join(map(str, window)),
               "pairs_kept": pairs_kept(grids, window), "passed": passed, "clips": len(out),
               "pass_rate": passed / len(out),
               "present": sum(r.present_frames >= th.min_present * r.frames for r in results),
               "color": sum(bool(r.color_ok) for r in results),
               "direction": sum(r.direction_ok is not False for r in results),
               "psnr_vs_dense": psnr(clips, dense), "denoise_s": pipe.last_timings["denoise"]}
        rows.append(row)
        if log is not None:
            log(f"{row['label']:>8}: keeps {100 * row['pairs_kept']:5.1f}% of pairs, passed {passed:3d}/{len(out)}, "
                f"PSNR vs dense {row['psnr_vs_dense']:6.2f} dB, denoise {row['denoise_s']:6.1f} s   "
                f"({time.perf_counter() - t0:.0f} s)")
    return rows


def report(rows: list[dict]) -> str:
    """The rows as a table."""
    lines = [f"{'window':>8} {'pairs kept':>10} {'pass rate':>9} {'passed':>7} {'present':>7} {'colour':>6} "
             f"{'direction':>9} {'PSNR dB':>8} {'denoise s':>9}"]
    for r in rows:
        p = "inf" if r["psnr_vs_dense"] == math.inf else f"{r['psnr_vs_dense']:.2f}"
        lines.append(f"{r['label']:>8} {100 * r['pairs_kept']:9.1f}% {100 * r['pass_rate']:8.1f}% "
                     f"{r['passed']:3d}/{r['clips']:<3d} {r['present']:7d} {r['color']:6d} {r['direction']:9d} "
                     f"{p:>8} {r['denoise_s']:9.1f}")
    lines.append("window: (wt, wh, ww) half-sizes in latent patches; PSNR (pooled MSE) of decoded clips in [0, 1] "
                 "against the dense run, same prompts and seeds")
    return "\n".join(lines)


def _window_arg(text: str) -> tuple:
    from sora_fast.commands.generate import attention_window_arg

    return attention_window_arg(text)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--pipeline", required=True, metavar="DIR", help="a saved pipeline (a demo's OUT/pipeline)")
    ap.add_argument("--windows", nargs="+", type=_window_arg, default=list(DEFAULT_WINDOWS), metavar="WT,WH,WW",
                    help="windows to score against dense (default: 2,2,2 2,1,1)")
    ap.add_argument("--prompts", type=int, default=24, help="held-out prompts (default: 24)")
    ap.add_argument("--seed", type=int, default=100, help="sampling seed (default: 100)")
    ap.add_argument("--json", default=None, help="write the rows here")
    cli.add_threads_flag(ap, "torch threads (default: torch's choice)")
    args = ap.parse_args(argv)
    cli.check_counts(args, cli.exit_with, ("prompts", "threads"))
    with cli.torch_threads(args.threads):
        rows = window_quality(args.pipeline, args.windows, prompts=args.prompts, seed=args.seed,
                              log=lambda m: print(m, file=sys.stderr, flush=True))
        threads = torch.get_num_threads()
    print(f"\n{args.prompts} held-out prompts, seed {args.seed}, pipeline {args.pipeline}, torch {torch.__version__}, "
          f"{threads} threads")
    print(report(rows))
    if args.json:
        write_json(Path(args.json), {"pipeline": str(args.pipeline), "prompts": args.prompts, "seed": args.seed,
                                     "rows": rows}, indent=2, newline=False)
        print(f"rows in {args.json}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
