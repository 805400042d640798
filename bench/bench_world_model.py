"""World-model probes of a model trained on the synthetic world: per probe, the pass rate of generated clips on
held-out prompts of every scene (``sora_fast.eval.probes``, ``sora_fast.data.world``).

Trains the world demo (``sora-fast demo --world``: a VAE and a DiT on 17-frame clips of the world's scenes) and
generates, for each scene, ``--clips`` held-out prompts (``sora_fast.data.world.held_out_world``: a seed stream
the training data never uses) at the clips' sizes; each clip is probed against its caption. The same prompts are
generated again conditioned on their ground truth's first frame (image-to-video, ``sora_fast.Condition``) and
probed the same way. The rendered ground truth of the same prompts is probed too (it must pass: a column of
100%). With ``--pipeline DIR`` a saved
pipeline is scored without training. Targets: permanence >= 70%, bounce >= 70%, camera >= 80%.

    python bench/bench_world_model.py [--out DIR] [--clips 24] [--seed 2300] [--threads N] [--json PATH]
    python bench/bench_world_model.py --pipeline world_bench/pipeline
    python bench/bench_world_model.py --quick        # a smoke run: tiny training, 2 prompts per scene
"""
from __future__ import annotations

import argparse
import dataclasses
import sys
import time
from pathlib import Path

if __package__ in (None, ""):   # run as a file: `bench` and `sora_fast` import from this checkout (bench/README.md)
    sys.path.append(str(Path(__file__).resolve().parents[1]))

import torch

from sora_fast.bench import args as cli
from sora_fast.bench.report import write_json

TARGETS = {"permanence": 0.70, "bounce": 0.70, "camera": 0.80}


def score(pipe, *, clips: int, seed: int, steps: int, guidance: float, sizes, lengths, conditioned: bool = True,
          object_size: float = 0.3) -> dict:
    """Per scene: generated (text-to-video and, with ``conditioned``, image-to-video from the ground truth's first
    frame) and ground-truth probe reports of ``clips`` held-out prompts."""
    from sora_fast import Condition
    from sora_fast.data.world import SCENES, held_out_world, render_world
    from sora_fast.eval.probes import probe_clip

    out = {}
    for scene in SCENES:
        specs = held_out_world(clips, scene, seed=seed, sizes=sizes, lengths=lengths, object_size=object_size)
        caps = [s.caption for s in specs]
        sizes_ = [(s.frames, s.height, s.width) for s in specs]
        truth = [render_world(s) for s in specs]
        t0 = time.perf_counter()
        videos = pipe.generate(caps, sizes_, steps=steps, guidance=guidance, seed=seed)
        out[scene] = {"generated": [probe_clip(v, c) for v, c in zip(videos, caps)],
                      "truth": [probe_clip(r, c) for r, c in zip(truth, caps)],
                      "videos": videos, "captions": caps}
        if conditioned:
            firsts = [[Condition(torch.from_numpy(r[:1]).permute(3, 0, 1, 2).float() / 127.5 - 1.0, frame=0)]
                      for r in truth]
            cond = pipe.generate(caps, sizes_, steps=steps, guidance=guidance, seed=seed, conditions=firsts)
            out[scene]["conditioned"] = [probe_clip(v, c) for v, c in zip(cond, caps)]
        out[scene]["seconds"] = time.perf_counter() - t0
        print(f"  {scene}: {clips} prompts in {out[scene]['seconds']:.0f}s", file=sys.stderr, flush=True)
    return out


def _pct(rate) -> str:
    return "    -" if rate is None else f"{rate:5.0%}"


def table(scored: dict) -> tuple[str, dict]:
    from sora_fast.eval.probes import PROBES, pass_rates

    gen = pass_rates([r for s in scored.values() for r in s["generated"]])
    truth = pass_rates([r for s in scored.values() for r in s["truth"]])
    cond = pass_rates([r for s in scored.values() for r in s.get("conditioned", [])])
    has_cond = any("conditioned" in s for s in scored.values())
    head, rule = (f"{'image-to-video':>14} {'rate':>5}  ", f"{'-' * 14} {'-' * 5}  ") if has_cond else ("", "")
    lines = [f"{'probe':<11} {'text-to-video':>13} {'rate':>5}  {head}{'truth':>5}  target (text-to-video)",
             f"{'-' * 11} {'-' * 13} {'-' * 5}  {rule}{'-' * 5}  ------"]
    for p in PROBES:
        g, t, c = gen[p], truth[p], cond[p]
        if not g["judged"]:
            continue
        tgt = TARGETS.get(p)
        mark = "" if tgt is None else f">= {tgt:.0%} {'met' if g['rate'] >= tgt else 'MISSED'}"
        ctext = f"{c['passed']:>6}/{c['judged']:<7} {_pct(c['rate'])}  " if has_cond else ""
        lines.append(f"{p:<11} {g['passed']:>6}/{g['judged']:<6} {_pct(g['rate'])}  {ctext}{_pct(t['rate'])}  {mark}")
    rates = {"generated": gen, "truth": truth}
    if has_cond:
        rates["conditioned"] = cond
    return "\n".join(lines), rates


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", default="world_bench", help="demo output folder (default: world_bench)")
    ap.add_argument("--pipeline", default=None, help="score this saved pipeline instead of training one")
    ap.add_argument("--clips", type=int, default=None, help="held-out prompts per scene (default: 24; --quick: 2)")
    ap.add_argument("--seed", type=int, default=2300, help="held-out prompts and sampling seed (default: 2300)")
    ap.add_argument("--dit-steps", type=int, default=None, help="DiT training steps (default: the preset's)")
    ap.add_argument("--vae-from", default=None,
                    help="take the VAE of this saved world pipeline (same data) instead of training one")
    ap.add_argument("--no-conditioned", action="store_true", help="skip the image-to-video pass")
    ap.add_argument("--quick", action="store_true", help="a smoke run: the world-quick demo preset, 2 prompts a scene")
    cli.add_threads_flag(ap, "torch threads (default: torch's choice)")
    ap.add_argument("--json", default=None, help="write the rates here (default: OUT/world_model.json)")
    args = ap.parse_args(argv)
    if args.clips is None:
        args.clips = 2 if args.quick else 24
    cli.check_counts(args, cli.exit_with, ("clips", "threads"))
    cli.check_at_least("--dit-steps", args.dit_steps, 1, cli.exit_with)
    with cli.torch_threads(args.threads):
        return _run(args)


def _run(args) -> int:
    from sora_fast.data.io import write_contact_sheet
    from sora_fast.demo import DEMO_PRESETS, run_demo
    from sora_fast.pipeline import VideoPipeline

    cfg = DEMO_PRESETS["world-quick" if args.quick else "world"]
    cfg = dataclasses.replace(cfg, dit_steps=args.dit_steps or cfg.dit_steps, vae_from=args.vae_from)
    t0 = time.perf_counter()
    if args.pipeline:
        pipe, source = VideoPipeline.load(args.pipeline), {"pipeline": str(args.pipeline)}
    else:
        summary = run_demo(args.out, config=cfg, progress=False)
        pipe = VideoPipeline.load(Path(args.out) / "pipeline")
        source = {"demo": str(args.out), "demo_timings": summary["timings"]}
    sizes = cfg.sizes
    scored = score(pipe, clips=args.clips, seed=args.seed, steps=cfg.sample_steps, guidance=cfg.guidance,
                   sizes=sizes, lengths=cfg.lengths, conditioned=not args.no_conditioned, object_size=cfg.object_size)
    text, rates = table(scored)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    for scene, s in scored.items():
        write_contact_sheet(out / f"world_{scene}.png", s["videos"][:8], s["captions"][:8])
    failures = {scene: [{"caption": r.caption, "reasons": r.reasons} for r in s["generated"] if not r.passed][:5]
                for scene, s in scored.items()}
    report = {**source, "config": dataclasses.asdict(cfg), "clips_per_scene": args.clips, "seed": args.seed,
              "rates": rates, "failures": failures, "seconds": time.perf_counter() - t0, "quick": args.quick,
              "torch": torch.__version__, "threads": torch.get_num_threads()}
    print()
    print(text)
    path = Path(args.json) if args.json else out / "world_model.json"
    write_json(path, report, indent=2, newline=False)
    print(f"rates in {path}; contact sheets {out}/world_<scene>.png")
    return 0


if __name__ == "__main__":
    sys.exit(main())
