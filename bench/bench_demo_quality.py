"""How good is the default demo's generator, measured on more prompts than the demo's eight.

Runs ``sora-fast demo`` (the default configuration, or ``--dit-steps`` / ``--vae-steps`` overrides) and, at
chosen DiT training steps, generates ``--val`` held-out prompts (``sora_fast.data.prompts(N, seed=777)``:
every colour x shape x direction x speed combination in a seeded order, no occluders, no bounces) at the
demo's generation sizes, sampler steps and guidance, with a fixed sampling seed, and runs the automatic
checker on every clip. Both the raw weights and the EMA weights (what the demo ships) are scored.
``--guidance 4,5,8`` scores several CFG scales (default: the demo's). ``--pipeline DIR`` skips training and
scores a pipeline the demo saved (``OUT/pipeline``): the held-out prompts and the demo's own eight, with
the demo's sampling seed, so its printed pass rate is reproduced at every guidance asked for.

Each row: step, weights (raw | ema), clips passed, and the three parts of the check on their own: the
object present in >= 90% of frames, the right colour, motion in the prompted direction. The demo's own
last line (its eight prompts, EMA weights) closes the report. CPU training is not bit-reproducible from
run to run, so differences of a few clips between runs are noise; compare configurations on the same
``--val`` set and several runs.

    python bench/bench_demo_quality.py [--out DIR] [--val 48] [--eval-at 1600,3200] [--dit-steps N]
                                       [--vae-steps N] [--guidance 5] [--threads N] [--json PATH]
    python bench/bench_demo_quality.py --pipeline sora_fast_demo/pipeline --guidance 4,5,6,8

Evaluation time is counted in the demo's "train dit" stage; the demo's own timings are in its table.
"""
from __future__ import annotations

import argparse
import copy
import dataclasses
import sys
import time
from pathlib import Path

if __package__ in (None, ""):   # run as a file: `bench` and `sora_fast` import from this checkout (bench/README.md)
    sys.path.append(str(Path(__file__).resolve().parents[1]))

import torch

from sora_fast.bench import args as cli
from sora_fast.bench.report import write_json


def _parse_steps(text: str) -> list[int]:
    try:
        steps = sorted({int(v) for v in text.split(",") if v.strip()})
    except ValueError:
        raise SystemExit(f"--eval-at must be comma-separated step numbers, got {text!r}") from None
    if not steps or steps[0] < 1:
        raise SystemExit(f"--eval-at must hold step numbers >= 1, got {text!r}")
    return steps


def _parse_guidance(text: str) -> list[float]:
    try:
        values = [float(v) for v in text.split(",") if v.strip()]
    except ValueError:
        raise SystemExit(f"--guidance must be comma-separated numbers, got {text!r}") from None
    if not values or min(values) < 0:
        raise SystemExit(f"--guidance must hold numbers >= 0, got {text!r}")
    return values


def score(pipe, prompts: list[str], sizes: list[tuple], *, steps: int, guidance: float, seed: int) -> dict:
    """Generate ``prompts`` and count what the checker accepts (passed, present, colour, direction)."""
    from sora_fast.data import check_clips
    from sora_fast.data.checker import CheckerThresholds

    clips = pipe.generate(prompts, sizes, steps=steps, guidance=guidance, seed=seed)
    results = check_clips(clips, prompts)
    th = CheckerThresholds()
    return {
        "clips": len(results),
        "passed": sum(r.passed for r in results),
        "present": sum(r.present_frames >= th.min_present * r.frames for r in results),
        "color": sum(bool(r.color_ok) for r in results),
        "direction": sum(r.direction_ok is not False for r in results),
    }


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", default="demo_quality", help="demo output folder (default: demo_quality)")
    ap.add_argument("--val", type=int, default=48, help="held-out prompts per evaluation (default: 48)")
    ap.add_argument("--eval-at", default="", help="DiT steps to evaluate at (default: half-way and the last step)")
    ap.add_argument("--dit-steps", type=int, default=None, help="override the demo's DiT training steps")
    ap.add_argument("--vae-steps", type=int, default=None, help="override the demo's VAE training steps")
    ap.add_argument("--seed", type=int, default=100, help="sampling seed of the evaluation (default: 100)")
    cli.add_threads_flag(ap, "torch threads (default: torch's choice)")
    ap.add_argument("--guidance", default=None,
                    help="CFG scale(s) to score, comma-separated (default: the demo's)")
    ap.add_argument("--pipeline", default=None,
                    help="score this saved pipeline (a demo's OUT/pipeline) instead of training one")
    ap.add_argument("--json", default=None,
                    help="write the rows here (default: OUT/quality.json; with --pipeline only when given)")
    args = ap.parse_args(argv)
    cli.check_counts(args, cli.exit_with, ("val", "threads"))
    with cli.torch_threads(args.threads):
        return _run(args)


def _run(args) -> int:

    from sora_fast.data import prompts as synthetic_prompts
    from sora_fast.demo import DEMO_PRESETS, run_demo
    from sora_fast.pipeline import VideoPipeline

    cfg = DEMO_PRESETS["default"]
    overrides = {k: v for k, v in (("dit_steps", args.dit_steps), ("vae_steps", args.vae_steps)) if v is not None}
    for k, v in overrides.items():
        cli.check_at_least(f"--{k.replace('_', '-')}", v, 1, cli.exit_with)
    cfg = dataclasses.replace(cfg, **overrides)
    if args.pipeline and (overrides or args.eval_at):
        raise SystemExit("--pipeline scores a trained pipeline; --dit-steps, --vae-steps and --eval-at need a "
                         "training run")
    eval_at = _parse_steps(args.eval_at) if args.eval_at else sorted({max(cfg.dit_steps // 2, 1), cfg.dit_steps})
    if eval_at[-1] > cfg.dit_steps:
        raise SystemExit(f"--eval-at step {eval_at[-1]} is past the last DiT step {cfg.dit_steps}")
    guidances = _parse_guidance(args.guidance) if args.guidance else [cfg.guidance]
    val = synthetic_prompts(args.val, seed=777)
    sizes = [cfg.gen_sizes[i % len(cfg.gen_sizes)] for i in range(len(val))]
    rows, t0 = [], time.perf_counter()

    def add_rows(pipe, step, tag):
        for g in guidances:
            row = {"step": step, "weights": tag, "guidance": g, "prompts": "held-out",
                   **score(pipe, val, sizes, steps=cfg.sample_steps, guidance=g, seed=args.seed)}
            rows.append(row)
            print(f"step {step or '-':>5} {tag:5s} guidance {g:g}: passed {row['passed']:3d}/{row['clips']}  "
                  f"present {row['present']:3d}  colour {row['color']:3d}  direction {row['direction']:3d}   "
                  f"({time.perf_counter() - t0:.0f} s)", file=sys.stderr, flush=True)

    if args.pipeline:
        pipe = VideoPipeline.load(args.pipeline)
        add_rows(pipe, None, "saved")
        demo_prompts = synthetic_prompts(cfg.prompts, seed=cfg.seed + 1)   # what run_demo generates
        demo_sizes = [cfg.gen_sizes[i % len(cfg.gen_sizes)] for i in range(len(demo_prompts))]
        for g in guidances:
            rows.append({"step": None, "weights": "saved", "guidance": g, "prompts": "demo",
                         **score(pipe, demo_prompts, demo_sizes, steps=cfg.sample_steps, guidance=g, seed=cfg.seed)})
        return _report(args, {"pipeline": str(args.pipeline), "config": dataclasses.asdict(cfg),
                              "val_prompts": val, "demo_prompts": demo_prompts, "eval_seed": args.seed,
                              "rows": rows}, rows, Path(args.json) if args.json else None)

    def evaluate(step, trainer, vae):
        if step not in eval_at:
            return
        with torch.no_grad():
            weights = [("raw", trainer.model)]
            if trainer.ema is not None:
                ema_model = copy.deepcopy(trainer.model)
                trainer.ema.copy_to(ema_model)
                weights.append(("ema", ema_model))
            for tag, model in weights:
                add_rows(VideoPipeline(model["dit"], vae, model["text"]), step, tag)
        trainer.model.train()

    summary = run_demo(args.out, config=cfg, progress=False, on_dit_step=evaluate)
    report = {"config": dataclasses.asdict(cfg), "val_prompts": val, "eval_seed": args.seed, "rows": rows,
              "demo_checker": summary["checker"], "demo_timings": summary["timings"],
              "torch": torch.__version__, "threads": torch.get_num_threads()}
    return _report(args, report, rows, Path(args.json) if args.json else Path(args.out) / "quality.json",
                   demo_line=summary["checker"])


def _report(args, report: dict, rows: list[dict], path, demo_line: str = "") -> int:
    if path is not None:
        write_json(path, report, indent=2, newline=False)
    print(f"\nsampling seed {args.seed} for the {args.val} held-out prompts (the demo's seed for its own prompts):")
    print(f"{'step':>6}  {'weights':7}  {'guidance':>8}  {'prompts':8}  {'passed':>8}  {'present':>7}  {'colour':>6}"
          f"  {'direction':>9}")
    for r in rows:
        print(f"{r['step'] or '-':>6}  {r['weights']:7}  {r['guidance']:8g}  {r['prompts']:8}  "
              f"{r['passed']:4d}/{r['clips']:<3d}  {r['present']:7d}  {r['color']:6d}  {r['direction']:9d}")
    if demo_line:
        print(f"demo prompts: {demo_line}")
    if path is not None:
        print(f"rows in {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
