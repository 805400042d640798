"""Where the CPU time of the DiT goes: top ops by self CPU time under ``torch.profiler``.

Two cases, fp32, the same sizes as the benchmarks they explain:

- ``forward``: the ``diffusers`` row of ``bench_system.py``: VideoDiT and diffusers' ``WanTransformer3DModel``
  with the same random weights, one no-grad forward of 4 videos of 9x192x192 (1,728 tokens), each profiled
  on its own after a warm-up;
- ``train``: the demo's DiT stage (``sora_fast.demo.train_demo_dit``'s model, optimizer, EMA, token budget
  and conditioning mix) on random latents of the demo's shapes (8 channels, 1/3/5 latent frames of 8x8,
  8x12 or 12x8), a few training steps (forward + backward + AdamW + EMA) after a warm-up.

    python bench/profile_cpu.py [--case forward,train] [--threads 1] [--steps 5] [--top 10]
"""
from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path

if __package__ in (None, ""):   # run as a file: `bench` and `sora_fast` import from this checkout (bench/README.md)
    sys.path.append(str(Path(__file__).resolve().parents[1]))

import torch
from torch.profiler import ProfilerActivity, profile

from sora_fast.bench import args as cli

CASES = ("forward", "train")


def top_ops(fn, steps: int, top: int) -> str:
    """The profiler's table of ``fn`` run ``steps`` times (after one untimed call), top ops by self CPU time."""
    fn()
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        for _ in range(steps):
            fn()
    return prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=top, max_name_column_width=40)


def forward_case(steps: int, top: int) -> list[tuple[str, str]]:
    from bench.bench_system import latent_shape, make_dits, settings

    s = settings(False)
    wan, dit = make_dits(s["dit"])
    gen = torch.Generator().manual_seed(0)
    c, n = dit.config, s["batch"]
    lat = [torch.randn(c.in_channels, *latent_shape(s["same_size"]), generator=gen) for _ in range(n)]
    txt = [torch.randn(s["text_len"], c.text_dim, generator=gen) for _ in range(n)]
    t = torch.rand(n, generator=gen) * 1000
    hs, enc = torch.stack(lat), torch.stack(txt)
    with torch.no_grad():
        return [(f"VideoDiT forward, {n} x {s['same_size']}",
                 top_ops(lambda: dit.forward_videos(lat, t, txt), steps, top)),
                (f"diffusers forward, {n} x {s['same_size']}",
                 top_ops(lambda: wan(hs, t, enc, return_dict=False)[0], steps, top))]


def demo_items(n: int = 160, seed: int = 0) -> list[dict]:
    """Random latents shaped as the demo's (its VAE: 8 channels, 2x time, 4x space; clips of 1, 5 or 9 frames
    at 32x32, 32x48 or 48x32), each with its standalone suffix latents as the demo caches them, and captions
    of the demo's synthetic clips."""
    from sora_fast.data.synthetic import prompts

    g = torch.Generator().manual_seed(seed)
    sizes, lengths = ((8, 8), (8, 12), (12, 8)), (1, 3, 5)
    captions = prompts(n, seed=seed)
    items = []
    for i in range(n):
        (h, w), f = sizes[int(torch.randint(3, (1,), generator=g))], lengths[int(torch.randint(3, (1,), generator=g))]
        items.append({"latent": torch.randn(8, f, h, w, generator=g), "caption": captions[i],
                      "alone": torch.randn(8, f * (f - 1) // 2, h, w, generator=g)})
    return items


def demo_trainer(run_dir, steps: int):
    """The Trainer that ``train_demo_dit`` builds for the default demo, on :func:`demo_items`."""
    import dataclasses

    from sora_fast.demo import DemoConfig
    from sora_fast.models.dit import DiTConfig, VideoDiT
    from sora_fast.models.text import TinyTextEncoder
    from sora_fast.training.trainer import TrainConfig, Trainer

    cfg = DemoConfig()
    torch.manual_seed(cfg.seed)
    text = TinyTextEncoder(dim=64)
    dit = VideoDiT(DiTConfig.from_name("demo", in_channels=8, out_channels=8, text_dim=text.dim))
    train_cfg = TrainConfig(steps=steps, token_budget=cfg.token_budget, lr=cfg.lr, warmup_steps=50, ema_decay=0.995,
                            save_every=steps, log_every=10, seed=cfg.seed, cond_mix=dict(cfg.cond_mix),
                            cond_frames=cfg.cond_frames)
    return Trainer(dit, text, demo_items(), train_cfg, run_dir, progress=False,
                   model_config={"dit": dataclasses.asdict(dit.config)})


def train_case(steps: int, top: int) -> list[tuple[str, str]]:
    with tempfile.TemporaryDirectory() as d:
        tr = demo_trainer(d, 1000)
        step = iter(range(1000))
        return [(f"demo DiT training step x {steps} ({tr.plan.summary()})",
                 top_ops(lambda: tr.train_step(next(step)), steps, top))]


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--case", default=",".join(CASES), help=f"comma-separated cases from {', '.join(CASES)}")
    p.add_argument("--steps", type=int, default=5, help="profiled calls per case (after one warm-up call)")
    p.add_argument("--top", type=int, default=10, help="rows of each table")
    cli.add_threads_flag(p)
    args = p.parse_args(argv)
    cases = [c.strip() for c in args.case.split(",") if c.strip()]
    if not cases or any(c not in CASES for c in cases):
        p.error(f"--case takes cases from {CASES}, got {args.case!r}")
    with cli.torch_threads(args.threads):
        for case in cases:
            for title, table in (forward_case if case == "forward" else train_case)(args.steps, args.top):
                print(f"\n## {title}, {torch.get_num_threads()} thread(s)\n{table}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
