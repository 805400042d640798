"""``sora-fast demo``: every stage of the engine on a CPU in minutes, with no download.

data (a synthetic captioned video folder) → VAE (trained from scratch) → latent cache → packed DiT
training on mixed resolutions and durations, with a conditioning mix (:data:`DEMO_COND_MIX`: every latent
frame its own noise level) → packed CFG sampling of several prompts at different sizes → chunked VAE decode
→ MP4/GIF files and a contact sheet → an automatic checker of every generated clip (right color, present,
moving the prompted way) → each conditioned mode (image-to-video, extension both ways, keyframes, editing,
long rollouts) scored on held-out clips (:mod:`sora_fast.eval.conditioning`) → a latency table per stage.
"""
from __future__ import annotations

import dataclasses
import json
import sys
import time
from dataclasses import dataclass
from typing import Callable, Optional, TextIO

import torch

__all__ = ["DemoConfig", "run_demo", "train_demo_dit", "DEMO_PRESETS", "DEMO_COND_MIX"]


#: The demo's conditioning mix (probabilities per training video and step, :data:`COND_MODES`).
DEMO_COND_MIX = {"t2v": 0.4, "i2v": 0.15, "extend_forward": 0.1, "extend_backward": 0.1, "interpolate": 0.1,
                 "keyframes": 0.05, "diffusion_forcing": 0.1}


@dataclass
class DemoConfig:
    """Sizes of a demo run (the defaults are the full demo; ``quick`` is a smoke run)."""

    clips: int = 160
    sizes: tuple = ((32, 32), (32, 48), (48, 32))
    lengths: tuple = (1, 5, 9)
    object_size: float = 0.4
    bounce_prob: float = 0.2  # bouncing clips: what the long rollout needs to stay in frame (docs/results.md)
    vae_steps: int = 1100
    vae_focus: float = 4.0
    dit_steps: int = 3200     # more steps scored no better on held-out prompts (docs/results.md)
    token_budget: int = 1152
    lr: float = 1.5e-3
    # the conditioning mix (TrainConfig.cond_mix): text-to-video keeps the largest share; every mode the
    # demo scores (image-to-video, extension both ways, keyframes, long rollouts) is trained
    cond_mix: dict = dataclasses.field(default_factory=lambda: dict(DEMO_COND_MIX))
    cond_frames: int = 3      # extension gives up to 3 of a 9-frame clip's 5 latent frames
    sample_steps: int = 20
    guidance: float = 5.0     # the best scale measured on held-out prompts (docs/results.md)
    prompts: int = 8
    gen_sizes: tuple = ((9, 32, 32), (9, 32, 48), (9, 48, 32))
    seed: int = 0
    eval_clips: int = 24      # held-out clips per conditioned mode (sora_fast.eval.conditioning); 0: skip
    eval_prompts: int = 48    # held-out text-to-video prompts scored with them
    world: bool = False       # train on the synthetic world (sora_fast.data.world) instead of the plain clips
    vae_from: Optional[str] = None  # a saved pipeline whose VAE (trained on the same data) replaces training one


DEMO_PRESETS = {
    "default": DemoConfig(),
    "quick": DemoConfig(clips=24, vae_steps=20, dit_steps=40, sample_steps=6, prompts=4, eval_clips=1,
                        eval_prompts=2),
    # the synthetic world: 17-frame clips (a full occlusion and a floor bounce need them), text-to-video only;
    # bench/bench_world_model.py scores its probes
    "world": DemoConfig(world=True, clips=210, sizes=((32, 48), (48, 32)), lengths=(17,), object_size=0.3,
                        dit_steps=2400, cond_mix={"t2v": 0.75, "i2v": 0.25}, cond_frames=1,
                        gen_sizes=((17, 32, 48), (17, 48, 32)), eval_clips=0),
    "world-quick": DemoConfig(world=True, clips=14, sizes=((32, 48), (48, 32)), lengths=(17,), object_size=0.3,
                              vae_steps=20, dit_steps=40, cond_mix={"t2v": 0.75, "i2v": 0.25}, cond_frames=1,
                              sample_steps=6,
                              prompts=2, gen_sizes=((17, 32, 48), (17, 48, 32)), eval_clips=0),
}


class _Timer:
    def __init__(self):
        self.rows: list[tuple[str, float, str]] = []

    def stage(self, name: str, detail: str = ""):
        timer = self

        class _Stage:
            def __enter__(self):
                self.t0 = time.perf_counter()
                return self

            def __exit__(self, *exc):
                timer.rows.append((name, time.perf_counter() - self.t0, getattr(self, "detail", detail)))

        return _Stage()

    def table(self) -> str:
        width = max(len(r[0]) for r in self.rows)
        lines = [f"{'stage':<{width}}  {'seconds':>8}  detail", f"{'-' * width}  {'-' * 8}  ------"]
        lines += [f"{n:<{width}}  {s:8.2f}  {d}" for n, s, d in self.rows]
        lines.append(f"{'total':<{width}}  {sum(r[1] for r in self.rows):8.2f}")
        return "\n".join(lines)


def _say(out: TextIO, msg: str) -> None:
    print(msg, file=out, flush=True)


def _vae_check(vae, captions, videos, per_color: int = 6) -> dict:
    """The checker on the VAE's reconstructions of up to ``per_color`` moving training clips of each colour
    (no bounce, no occluder): a VAE that lost a colour shows here, before the DiT is blamed for it."""
    from .data import check_clips, parse_caption

    picked, count = [], {}
    for i, v in enumerate(videos):
        p = parse_caption(captions[i])
        if v.shape[1] > 1 and p.direction is not None and not p.bounce and not p.occluder and not p.world \
                and count.get(p.color, 0) < per_color:
            picked.append((i, p.color))
            count[p.color] = count.get(p.color, 0) + 1
    with torch.no_grad():
        recon = [vae.decode(vae.encode(videos[i][None]))[0] for i, _ in picked]
    results = check_clips(recon, [captions[i] for i, _ in picked])
    by_color: dict = {}
    for (_, color), r in zip(picked, results):
        ok, n = by_color.get(color, (0, 0))
        by_color[color] = (ok + r.passed, n + 1)
    return {"passed": sum(r.passed for r in results), "clips": len(results),
            "per_color": {c: list(v) for c, v in sorted(by_color.items())}}


def run_demo(out_dir: str = "sora_fast_demo", *, quick: bool = False, world: bool = False,
             config: Optional[DemoConfig] = None,
             progress: bool = True, stream: Optional[TextIO] = None,
             on_dit_step: Optional[Callable[[int, object, object], None]] = None) -> dict:
    """Run the demo into ``out_dir`` and return a summary dict (timings, checker results, paths).

    Writes ``data/`` (the synthetic folder), ``latents/``, ``dit_run/`` (checkpoints, metrics.jsonl,
    loss.png), ``pipeline/`` (the trained models), ``samples/*.mp4|gif``, ``contact_sheet.png`` and
    ``summary.json`` (with ``conditioning``: per mode passed / clips / rate / target and why clips failed;
    ``conditioning/<mode>.png`` shows 8 clips of each). ``on_dit_step(step, trainer, vae)``, when given, runs
    after every DiT training step (``bench/bench_demo_quality.py`` evaluates checkpoints with it); its time
    counts in the DiT stage.
    """
    from .data import (
        LatentDataset,
        VideoFolder,
        cache_latents,
        check_clips,
        checker_summary,
        make_synthetic_dataset,
        write_contact_sheet,
        write_video,
    )
    from .data import prompts as synthetic_prompts
    from .models.vae import CausalVAE
    from .training.checkpoint import check_writable
    from .training.conditioning import standalone_latents
    from .training.vae import VAETrainConfig, fit_latent_stats, train_vae

    preset = ("world-quick" if world else "quick") if quick else ("world" if world else "default")
    cfg = config or DEMO_PRESETS[preset]
    out = check_writable(out_dir)
    torch.manual_seed(cfg.seed)
    timer = _Timer()
    stream = sys.stdout if stream is None else stream  # looked up per call: a default bound at import goes stale
    _say(stream, f"sora-fast demo -> {out} ({'quick' if quick else 'full'}; torch {torch.__version__}, "
                 f"{torch.get_num_threads()} threads)")

    # 1. data: a real video folder of captioned synthetic clips, read back at native size
    with timer.stage("data: synthetic clips") as st:
        if cfg.world:
            from .data.world import make_world_dataset

            make_world_dataset(out / "data", cfg.clips, seed=cfg.seed, sizes=cfg.sizes, lengths=cfg.lengths,
                               object_size=cfg.object_size, overwrite=True, progress=progress)
        else:
            make_synthetic_dataset(out / "data", cfg.clips, seed=cfg.seed, sizes=cfg.sizes, lengths=cfg.lengths,
                                   object_size=cfg.object_size, bounce_prob=cfg.bounce_prob, overwrite=True,
                                   progress=progress)
        st.detail = f"{cfg.clips} clips, sizes {list(cfg.sizes)}, frames {list(cfg.lengths)}"
    vae = CausalVAE("demo")
    tf, sf = vae.temporal_factor, vae.spatial_factor
    with timer.stage("data: read folder") as st:
        folder = VideoFolder(out / "data", size_multiple=sf * 2, frame_multiple=tf, frame_offset=1,
                             progress=progress)
        read = [folder[i] for i in range(len(folder))]      # each file decoded once
        videos, captions = [r["video"] for r in read], [r["caption"] for r in read]
        del read
        st.detail = f"{len(videos)} readable, {len(folder.skipped)} skipped"

    # 2. VAE from scratch (or a saved pipeline's, trained on the same data), then its latent statistics
    with timer.stage("train vae" if cfg.vae_from is None else "load vae") as st:
        if cfg.vae_from is None:
            r = train_vae(vae, videos, VAETrainConfig(steps=cfg.vae_steps, focus=cfg.vae_focus, seed=cfg.seed),
                          progress=progress)
            fit_latent_stats(vae, videos)
            how = f"{cfg.vae_steps} steps, recon MSE {sum(r['recon'][-20:]) / len(r['recon'][-20:]):.4f}"
        else:
            from .pipeline import VideoPipeline

            vae = VideoPipeline.load(cfg.vae_from).vae
            how = f"from {cfg.vae_from}"
        vae_check = _vae_check(vae, captions, videos)
        weak = [f"{c} {ok}/{n}" for c, (ok, n) in vae_check["per_color"].items() if ok < n]
        st.detail = (f"{how}, checker passes {vae_check['passed']}/{vae_check['clips']} reconstructions"
                     + (f" (weak: {', '.join(weak)})" if weak else ""))

    # 3. latent cache
    with timer.stage("encode latents") as st:
        with torch.no_grad():
            cache_latents(folder, lambda v: vae.normalize_latents(vae.encode(v[None]))[0], out / "latents",
                          overwrite=True, progress=progress)
        latents = LatentDataset(out / "latents")
        items = [{"latent": latents[i]["latent"].float(), "caption": latents[i]["caption"]}
                 for i in range(len(latents))]
        # every suffix of a clip encoded on its own: what given frames after the first hold in training,
        # as sampling encodes a condition placed later in a video (sora_fast.training.conditioning)
        with torch.no_grad():
            for it, v, cap in zip(items, videos, captions):
                if cap != it["caption"] or 1 + (v.shape[1] - 1) // tf != it["latent"].shape[1]:
                    raise RuntimeError("the latent cache and the video folder disagree on the order of clips")
                it["alone"] = standalone_latents(lambda x: vae.normalize_latents(vae.encode(x)), v, tf)
        st.detail = (f"{len(items)} latents (and their suffixes encoded alone), {vae.latent_channels} channels, "
                     f"/{tf} time, /{sf} space")

    # 4. packed DiT training on mixed sizes
    with timer.stage("train dit") as st:
        pipe, st.detail = train_demo_dit(vae, items, cfg, out / "dit_run", progress=progress, on_step=on_dit_step)
    pipe.save(out / "pipeline")

    # 5. generation: prompts at several sizes in one packed call, CFG in one pass
    prompt_list = synthetic_prompts(cfg.prompts, seed=cfg.seed + 1)
    sizes = [cfg.gen_sizes[i % len(cfg.gen_sizes)] for i in range(len(prompt_list))]
    with timer.stage("generate") as st:
        clips = pipe.generate(prompt_list, sizes, steps=cfg.sample_steps, guidance=cfg.guidance, seed=cfg.seed)
        lt = pipe.last_timings
        st.detail = (f"{len(clips)} clips, {cfg.sample_steps} steps x 1 packed CFG forward "
                     f"({1000 * sum(lt['steps']) / len(lt['steps']):.0f} ms/step), text {lt['text'] * 1000:.0f} ms, "
                     f"decode {lt['decode'] * 1000:.0f} ms")
    with timer.stage("write videos") as st:
        (out / "samples").mkdir(exist_ok=True)
        for i, (clip, p) in enumerate(zip(clips, prompt_list)):
            stem = f"{i:02d}_" + "_".join(p.split()[:6])
            write_video(out / "samples" / f"{stem}.mp4", clip, fps=8)
            write_video(out / "samples" / f"{stem}.gif", clip, fps=8)
        write_contact_sheet(out / "contact_sheet.png", clips, prompt_list)
        st.detail = f"{2 * len(clips)} files in samples/, contact_sheet.png"

    scores = {}
    if cfg.eval_clips:
        from .eval import evaluate_conditioning, format_table
        with timer.stage("score modes") as st:
            scores = evaluate_conditioning(pipe, clips=cfg.eval_clips, t2v_prompts=cfg.eval_prompts,
                                           sizes=cfg.gen_sizes, steps=cfg.sample_steps, guidance=cfg.guidance)
            (out / "conditioning").mkdir(exist_ok=True)
            for mode, sc in scores.items():
                shown = sc.pop("clips_out")[:8]
                write_contact_sheet(out / "conditioning" / f"{mode}.png", [v for _, v in shown], [c for c, _ in shown])
            st.detail = (f"{len(scores)} modes, {cfg.eval_clips} held-out clips each ({cfg.eval_prompts} for "
                         "text-to-video), conditioning/*.png")
    results = check_clips(clips, prompt_list)
    _say(stream, "")
    _say(stream, timer.table())
    if scores:
        _say(stream, "")
        _say(stream, format_table(scores))
    _say(stream, "")
    for p, r in zip(prompt_list, results):
        _say(stream, f"  {'PASS' if r.passed else 'fail'}  {p}  ({r})")
    line = checker_summary(results)
    summary = {"out_dir": str(out), "quick": quick, "config": dataclasses.asdict(cfg),
               "timings": {n: s for n, s, _ in timer.rows}, "prompts": prompt_list,
               "passed": [r.passed for r in results], "checker": line, "vae_check": vae_check,
               "conditioning": scores,
               "samples": sorted(p.name for p in (out / "samples").iterdir())}
    (out / "summary.json").write_text(json.dumps(summary, indent=2))
    _say(stream, f"outputs in {out}: samples/, contact_sheet.png, pipeline/, dit_run/loss.png")
    _say(stream, line)
    return summary


def train_demo_dit(vae, items: list, cfg: DemoConfig, run_dir, *, progress: bool = True,
                   on_step: Optional[Callable] = None):
    """The demo's DiT stage: a fresh tiny text encoder and demo DiT trained on ``items`` (``{"latent", "caption"}``
    dicts, ``"alone"`` too for the conditioning mix) with ``cfg``'s steps, budget, learning rate, mix and seed; the
    EMA weights copied in. Returns the :class:`~sora_fast.pipeline.VideoPipeline` (not saved) and a one-line
    summary. ``on_step(step, trainer, vae)`` is called after each step."""
    from .captions.stats import CaptionStats
    from .models.dit import DiTConfig, VideoDiT
    from .models.text import TinyTextEncoder
    from .pipeline import VideoPipeline
    from .training.trainer import TrainConfig, Trainer

    torch.manual_seed(cfg.seed)
    text = TinyTextEncoder(dim=64)
    dit = VideoDiT(DiTConfig.from_name("demo", in_channels=vae.latent_channels, out_channels=vae.latent_channels,
                                       text_dim=text.dim))
    train_cfg = TrainConfig(steps=cfg.dit_steps, token_budget=cfg.token_budget, lr=cfg.lr, warmup_steps=50,
                            ema_decay=0.995, save_every=max(cfg.dit_steps // 2, 1), log_every=10, seed=cfg.seed,
                            cond_mix=dict(cfg.cond_mix), cond_frames=cfg.cond_frames)
    trainer = Trainer(dit, text, items, train_cfg, run_dir, progress=progress,
                      model_config={"dit": dataclasses.asdict(dit.config), "text": dataclasses.asdict(text.config)})
    res = trainer.train(on_step=None if on_step is None else lambda step, _: on_step(step, trainer, vae))
    tail = res["losses"][-50:]
    if trainer.ema is not None:
        trainer.ema.copy_to(trainer.model)
    detail = (f"{res['steps']} steps, loss {sum(tail) / len(tail):.3f} (last 50), "
              f"{trainer.plan.summary().split(' -> ')[1]}")
    # the training captions' statistics go with the model: generate(expand="schema") fills prompts from them
    stats = CaptionStats.from_captions([it["caption"] for it in items])
    return VideoPipeline(dit, vae, text, caption_stats=stats), detail
