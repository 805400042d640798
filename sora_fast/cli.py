"""The ``sora-fast`` command: ``demo``, ``train``, ``generate``, ``report`` (``sora-fast <command> --help``)."""
from __future__ import annotations

import argparse
import dataclasses
import json
import os
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional, Sequence

__all__ = ["main", "TrainRunConfig", "load_run_config", "output_stems", "previous_run", "is_user_error"]


# --- train: a run described by one JSON / TOML file ---------------------------------------------------
@dataclass
class TrainRunConfig:
    """A ``sora-fast train --config FILE`` run (JSON, or TOML with Python >= 3.11).

    data:          a video folder (videos + images with .txt captions or a manifest.jsonl).
    out:           the run directory: latents/, checkpoints, metrics.jsonl, loss.png, pipeline/.
    pipeline:      a saved pipeline (``VideoPipeline.save``, e.g. the demo's ``pipeline/``) giving the VAE, the
                   text encoder and the starting DiT.
    dit:           optional DiT preset name: train a fresh DiT of that size instead of the pipeline's
                   (latent channels and text width are taken from the pipeline).
    diffusers_transformer: optional directory of a diffusers ``WanTransformer3DModel`` to fine-tune
                   (converted with ``VideoDiT.from_diffusers``).
    manifest, max_area, max_frames: passed to ``VideoFolder`` (captions, down-scaling only, never crops).
    allow_outside_root: passed to ``VideoFolder``: also read manifest paths and links outside ``data``.
    train:         :class:`sora_fast.training.TrainConfig` fields.
    """

    data: str
    out: str
    pipeline: str
    dit: Optional[str] = None
    diffusers_transformer: Optional[str] = None
    manifest: Optional[str] = None
    max_area: Optional[int] = None
    max_frames: Optional[int] = None
    allow_outside_root: bool = False
    train: dict = field(default_factory=dict)


def load_run_config(path: str) -> tuple[TrainRunConfig, Any]:
    """Read and validate a run file: unknown keys (top level or in ``train``) are named in the error."""
    from .training.trainer import TrainConfig, config_from_dict

    p = Path(path)
    if not p.is_file():
        raise FileNotFoundError(f"--config {path!r} does not exist")
    if p.suffix not in (".json", ".toml"):
        raise ValueError(f"--config must be a .json or .toml file, got {p.name!r}")
    try:
        text = p.read_text(encoding="utf-8")
    except UnicodeDecodeError as e:
        raise ValueError(f"--config {str(p)!r} is not UTF-8 text (byte {e.start}): expected a run file") from None
    if p.suffix == ".toml":
        try:
            import tomllib
        except ImportError:  # Python 3.10
            raise ValueError(f"--config {p.name}: TOML needs Python >= 3.11; use a .json file") from None
        try:
            raw = tomllib.loads(text)
        except tomllib.TOMLDecodeError as e:
            raise ValueError(f"--config {str(p)!r} is not valid TOML: {e}") from None
    else:
        try:
            raw = json.loads(text)
        except json.JSONDecodeError as e:
            raise ValueError(f"--config {str(p)!r} is not valid JSON: {e.msg} (line {e.lineno}, column "
                             f"{e.colno})") from None
    if not isinstance(raw, dict):
        raise ValueError(f"--config {str(p)!r} must hold a JSON object / TOML table of settings, got "
                         f"{type(raw).__name__}")
    for key in ("data", "out", "pipeline"):
        if key not in raw:
            raise ValueError(f"{p.name} is missing the required key {key!r}")
    run = config_from_dict(TrainRunConfig, raw, where=p.name)
    if run.dit is not None and run.diffusers_transformer is not None:
        raise ValueError(f"{p.name}: give at most one of 'dit' and 'diffusers_transformer'")
    train = config_from_dict(TrainConfig, run.train, where=f"{p.name} [train]")
    return run, train


# what a training run writes into its directory (the latent cache is keyed on its data and kept)
_RUN_NAMES = ("metrics.jsonl", "loss.png", "latest", "latest_dcp", "pipeline")
_RUN_PREFIXES = ("step_", "dcp_step_", "pipeline.")
_RUN_LEFTOVERS = (".tmp-", ".pipeline.")  # temporaries of interrupted writes, cleared by --overwrite


def previous_run(run_dir) -> list[str]:
    """Names of a training run's outputs in ``run_dir`` (checkpoints, ``pipeline/``, ``metrics.jsonl``):
    empty when there is no earlier run to lose."""
    run = Path(run_dir)
    if not run.is_dir():
        return []
    return sorted(p.name for p in run.iterdir() if p.name in _RUN_NAMES or p.name.startswith(_RUN_PREFIXES))


def _clear_run(run: Path) -> None:
    import shutil

    for p in run.iterdir():
        if p.name in _RUN_NAMES or p.name.startswith(_RUN_PREFIXES + _RUN_LEFTOVERS):
            if p.is_dir() and not p.is_symlink():
                shutil.rmtree(p)
            else:
                p.unlink()


def _check_run_dir(out: str, config: str, resume: bool, overwrite: bool, mesh) -> None:
    """Refuse to train into a directory that holds an earlier run unless ``--resume`` or ``--overwrite``
    says what to do with it (``--overwrite`` clears it here). Under torchrun rank 0 looks and broadcasts
    what it found before any rank writes, so every rank takes the same decision."""
    if resume and overwrite:
        raise ValueError("give at most one of --resume (continue the run in 'out') and --overwrite (delete it "
                         "and start over)")
    main = mesh is None or mesh.is_main
    found = previous_run(out) if main else None
    if mesh is not None:
        import torch.distributed as dist

        box = [found]
        dist.broadcast_object_list(box, src=0)
        found = box[0]
    if not found or resume:
        return
    if not overwrite:
        shown = ", ".join(found[:4]) + (f" and {len(found) - 4} more" if len(found) > 4 else "")
        raise ValueError(f"the run directory {out!r} (--config {config}: 'out') already holds a training run "
                         f"({shown}); pass --resume to continue it, --overwrite to delete it and start over, "
                         f"or set 'out' to another directory")
    if main:
        _clear_run(Path(out))
        print(f"--overwrite: deleted the earlier run in {out} ({', '.join(found)})", file=sys.stderr)
    if mesh is not None:
        from .distributed.launch import barrier

        barrier()


def cmd_train(args) -> int:
    import torch

    from .data import LatentDataset, VideoFolder, ensure_latent_cache, module_key, write_skip_report
    from .distributed.launch import barrier, has_checkpoint, make_trainer, save_pipeline, training_mesh
    from .models.dit import DiTConfig, VideoDiT
    from .pipeline import VideoPipeline
    from .training.checkpoint import check_writable
    from .training.lora import merge_lora

    mesh = training_mesh(args.sequence_parallel)  # None unless launched by torchrun
    run, train_cfg = load_run_config(args.config)
    if args.steps is not None:
        if args.steps < 1:
            raise ValueError(f"--steps must be >= 1, got {args.steps}")
        train_cfg = dataclasses.replace(train_cfg, steps=args.steps)
    _check_run_dir(run.out, args.config, args.resume, args.overwrite, mesh)  # before anything is written

    out = check_writable(run.out)
    pipe = VideoPipeline.load(run.pipeline, verify=not args.no_verify)
    vae, text = pipe.vae, pipe.text_encoder
    if run.dit is not None:
        dit = VideoDiT(DiTConfig.from_name(run.dit, in_channels=vae.latent_channels,
                                           out_channels=vae.latent_channels, text_dim=text.dim))
    elif run.diffusers_transformer is not None:
        dit = VideoDiT.from_diffusers_dir(run.diffusers_transformer)
    else:
        dit = pipe.dit
    pipe = VideoPipeline(dit, vae, text)  # checks channels and text width agree

    ph = dit.config.patch[1]
    folder = VideoFolder(run.data, manifest=run.manifest, max_area=run.max_area, max_frames=run.max_frames,
                         size_multiple=vae.spatial_factor * ph, frame_multiple=vae.temporal_factor, frame_offset=1,
                         allow_outside_root=run.allow_outside_root)
    cache = out / "latents"
    if mesh is None or mesh.is_main:  # re-encoded when the data, its settings or the VAE differ from the cache's
        with torch.no_grad():
            ensure_latent_cache(folder, lambda v: vae.normalize_latents(vae.encode(v[None]))[0], cache,
                                encoder_key=module_key(vae))
    barrier()
    latents = LatentDataset(cache)
    if mesh is None or mesh.is_main:
        print(write_skip_report(folder.skipped + latents.encode_skipped + latents.skipped, out / "skipped.jsonl"),
              file=sys.stderr)
    items = [{"latent": latents[i]["latent"].float(), "caption": latents[i]["caption"]} for i in range(len(latents))]
    model_config = {"dit": dataclasses.asdict(dit.config), "text": pipe.describe()["text"]}
    trainer = make_trainer(dit, text, items, train_cfg, out, mesh=mesh, model_config=model_config)
    if args.resume:
        if not has_checkpoint(out, mesh):
            print(f"--resume: no checkpoint in {out} yet, starting at step 0", file=sys.stderr)
        else:
            print(f"resuming from step {trainer.resume(verify=not args.no_verify)}", file=sys.stderr)
    if trainer.is_main:
        print(trainer.plan.summary(), file=sys.stderr)
    res = trainer.train()
    if trainer.ema is not None:
        trainer.ema.copy_to(trainer.model)
    if train_cfg.lora_rank:
        merge_lora(dit)
    if not save_pipeline(pipe, out / "pipeline", mesh):
        return 0  # ranks other than 0 print nothing
    state = "interrupted at" if res["interrupted"] else "finished"
    print(f"{state} step {res['steps']}; checkpoint {res['checkpoint']}; pipeline {out / 'pipeline'}")
    if not res["interrupted"]:
        return 0
    return 143 if res.get("signal") == "SIGTERM" else 130  # 128 + the signal's number


# --- generate --------------------------------------------------------------------------------------
def _size(text: str) -> tuple[int, int, int]:
    try:
        t, h, w = (int(v) for v in text.lower().split("x"))
    except ValueError:
        raise argparse.ArgumentTypeError(f"a size is FRAMESxHEIGHTxWIDTH, e.g. 9x32x48; got {text!r}") from None
    return t, h, w


MAX_NAME_BYTES = 100  # file names built from prompts, in UTF-8 bytes (file systems allow 255)


def output_stems(prompts: Sequence[str], max_bytes: int = MAX_NAME_BYTES) -> list[str]:
    """File names (without extension) for the videos of ``prompts``: the index, then the prompt's first
    words (letters and digits only), cut to at most ``max_bytes`` UTF-8 bytes on a character boundary, and
    unique (a hash of the prompt is appended should two ever agree)."""
    import hashlib

    width = max(2, len(str(len(prompts) - 1)))
    stems, used = [], set()
    for i, p in enumerate(prompts):
        words = ("".join(c for c in w if c.isalnum()) for w in p.split()[:6])
        stem = f"{i:0{width}d}_" + "_".join(w for w in words if w)
        stem = stem.encode("utf-8")[:max_bytes].decode("utf-8", errors="ignore").rstrip("_")
        if stem.lower() in used:
            tag = "_" + hashlib.sha1(f"{i}:{p}".encode("utf-8")).hexdigest()[:8]
            stem = stem.encode("utf-8")[:max_bytes - len(tag)].decode("utf-8", errors="ignore") + tag
        used.add(stem.lower())
        stems.append(stem)
    return stems


def _keyframe(text: str) -> tuple[str, int]:
    path, sep, frame = text.rpartition("@")
    try:
        if not sep or not path:
            raise ValueError
        return path, int(frame)
    except ValueError:
        raise argparse.ArgumentTypeError(f"a keyframe is PATH@FRAME (FRAME a pixel frame index, negative from the "
                                         f"end, e.g. last.png@-1); got {text!r}") from None


def _check_condition_args(args) -> None:
    """``--image`` / ``--video --extend`` / ``--keyframe`` -> ``args.conditions`` (a list of Condition for every
    prompt, media read) and ``args.condition_size`` (the default size they imply), checked without a model."""
    from .pipeline import Condition, read_media

    args.conditions, args.condition_size = [], None
    if args.extend is not None and args.video is None:
        raise ValueError("--extend needs --video PATH (the clip to extend)")
    if args.video is not None and args.extend is None:
        raise ValueError("--video needs --extend forward|backward (where the clip goes: at the start or the end)")
    if args.image is not None and args.video is not None:
        raise ValueError("--image and --video --extend both give the video's frames; use one (add frames at other "
                         "places with --keyframe PATH@FRAME)")
    keyframes = args.keyframe or []
    if args.edit is not None and (args.image is not None or args.video is not None or keyframes):
        raise ValueError("--edit cannot be combined with --image, --video or --keyframe on the command line (use "
                         "VideoPipeline.generate(init_videos=..., conditions=...) for both)")
    if args.image is not None:
        img = read_media(args.image, "--image")
        if img.shape[1] != 1:
            raise ValueError(f"--image {args.image!r} has {img.shape[1]} frames; give an image (use --video --extend "
                             "for a clip)")
        args.conditions.append(("--image", Condition(img, 0)))
        args.condition_size = (9, *img.shape[2:])
    if args.video is not None:
        clip = read_media(args.video, "--video")
        n = clip.shape[1]
        frame = 0 if args.extend == "forward" else -n
        args.conditions.append((f"--video (--extend {args.extend})", Condition(clip, frame)))
        args.condition_size = (2 * n - 1, *clip.shape[2:])
    for path, frame in keyframes:
        media = read_media(path, f"--keyframe {path}@{frame}")
        args.conditions.append((f"--keyframe {path}@{frame}", Condition(media, frame)))
        if args.condition_size is None:
            args.condition_size = (9, *media.shape[2:])
    for i, s in enumerate((args.size or [args.condition_size]) if args.conditions else []):
        t, h, w = s
        for flag, c in args.conditions:
            n, ch, cw = c.media.shape[1:]
            where = f"--size #{i + 1} {t}x{h}x{w}" if args.size else f"the default size {t}x{h}x{w}"
            if (ch, cw) != (h, w):
                raise ValueError(f"{flag} is {ch}x{cw} (height x width) but {where} was requested; a condition is "
                                 "never resized: pass --size with its height and width (or leave --size out)")
            if n > t:
                raise ValueError(f"{flag} has {n} frames, more than the {t} of {where}")
            if not -t <= c.frame < t:
                raise ValueError(f"{flag}: frame {c.frame} is outside the video ({where}: frames {-t}..{t - 1})")


def _finite(flag: str, value: float, positive: bool = False) -> float:
    import math

    if not math.isfinite(value) or (positive and value <= 0):
        raise ValueError(f"{flag} must be a {'positive ' if positive else ''}finite number, got {value!r}")
    return value


def _check_generate_args(args) -> None:
    """Every argument of ``generate`` that needs no model, checked before anything loads or runs."""
    _finite("--guidance", args.guidance)
    if args.shift != "auto":
        _finite("--shift", args.shift, positive=True)
    _finite("--fps", args.fps, positive=True)
    if args.steps < 1:
        raise ValueError(f"--steps must be >= 1, got {args.steps}")
    sizes = args.size or [(9, 32, 32)]
    if len(sizes) not in (1, len(args.prompt)):
        raise ValueError(f"--size given {len(sizes)} times; give it once or once per --prompt ({len(args.prompt)})")
    args.format = list(dict.fromkeys(args.format))  # each format once
    _check_long_args(args)  # before any media is read
    args.edit_video = None
    if args.strength is not None and args.edit is None:
        raise ValueError("--strength needs --edit VIDEO (the strength of an edit; plain generation has none)")
    if args.edit is not None:
        if args.strength is None:
            raise ValueError("--edit needs --strength S in [0, 1] (0 keeps the video, 1 generates anew)")
        if not 0.0 <= args.strength <= 1.0:  # NaN fails too
            raise ValueError(f"--strength must be a number in [0, 1], got {args.strength!r}")
        from .pipeline import read_media

        args.edit_video = read_media(args.edit, "--edit")
        have = tuple(args.edit_video.shape[1:])
        for i, s in enumerate(args.size or []):
            if tuple(s) != have:
                raise ValueError(f"--size #{i + 1} {'x'.join(map(str, s))} differs from the --edit video's size "
                                 f"{'x'.join(map(str, have))} (frames x height x width); an edited video is never "
                                 "resized: leave out --size, it defaults to the video's")
    _check_condition_args(args)
    if args.conditions and args.cfg_parallel:
        raise ValueError("--cfg-parallel does not take --image, --video or --keyframe yet (the conditioned frames "
                         "need per-frame timesteps); leave out --cfg-parallel")


def _check_long_args(args) -> None:
    """``--frames N --window W --overlap K`` (long videos): all three or none, not combined with the flags that
    condition or edit a video, a ``--size`` whose frames are ``--frames``; checked without a model (the VAE's
    frame rules are checked by ``VideoPipeline.plan_long`` once it is loaded, before any work)."""
    flags = {"--frames": args.frames, "--window": args.window, "--overlap": args.overlap}
    if all(v is None for v in flags.values()):
        return
    missing = [f for f, v in flags.items() if v is None]
    if missing:
        raise ValueError(f"long videos need --frames N --window W --overlap K together; missing {', '.join(missing)}")
    other = [f for f, v in (("--edit", args.edit), ("--image", args.image), ("--video", args.video),
                            ("--keyframe", args.keyframe)) if v]
    if other:
        raise ValueError(f"--frames/--window/--overlap (a long video) cannot be combined with {', '.join(other)}; "
                         "generate the long video without them")
    if args.cfg_parallel:
        raise ValueError("--cfg-parallel does not take --frames/--window/--overlap yet (the windows after the first "
                         "need per-frame timesteps); leave out --cfg-parallel")
    if args.window < 1:
        raise ValueError(f"--window must be a positive number of pixel frames (1 + 4m, m >= 1), got {args.window}")
    if args.frames < args.window:
        raise ValueError(f"--frames must be >= --window ({args.window}), got {args.frames}")
    if args.overlap < 1:
        raise ValueError(f"--overlap must be >= 1 latent frame, got {args.overlap}")
    for i, s in enumerate(args.size or []):
        if s[0] != args.frames:
            raise ValueError(f"--size #{i + 1} {'x'.join(map(str, s))} has {s[0]} frames but --frames is "
                             f"{args.frames}; with a long video --size is the whole video's (or give only --frames "
                             "and a size of the same frames)")


def _generate_long(pipe, args, sizes, mesh) -> list:
    """Every prompt rolled out alone by ``generate_long`` (prompt i with seed + i), a progress bar over its
    windows; returns the clips and sets ``pipe.last_timings`` to the sums over prompts."""
    from .distributed import make_denoiser
    from .training.metrics import ProgressBar

    plans = [pipe.plan_long(args.frames, args.window, args.overlap, tuple(s[1:])) for s in sizes]  # before work
    denoiser = None if mesh is None else make_denoiser(pipe.dit, mesh)
    clips, total = [], {"text": 0.0, "denoise": 0.0, "decode": 0.0}
    for i, (prompt, s, plan) in enumerate(zip(args.prompt, sizes, plans)):
        bar = ProgressBar(len(plan), desc=f"video {i + 1}/{len(sizes)} windows",
                          disable=mesh is not None and not mesh.is_main, print_every=1)
        clips.append(pipe.generate_long(prompt, args.frames, window=args.window, overlap=args.overlap,
                                        size=tuple(s[1:]), steps=args.steps, guidance=args.guidance,
                                        shift=args.shift, negative_prompt=args.negative_prompt, seed=args.seed + i,
                                        progress=lambda k, n: bar.update(), denoiser=denoiser))
        bar.close()
        for k in total:
            total[k] += pipe.last_timings[k]
    pipe.last_timings = total
    return clips


def cmd_generate(args) -> int:
    from .data import write_contact_sheet, write_video
    from .distributed import make_denoiser
    from .distributed.launch import sampling_mesh
    from .pipeline import VideoPipeline
    from .training.checkpoint import check_writable

    _check_generate_args(args)
    stems = output_stems(args.prompt)
    mesh = sampling_mesh(args.sequence_parallel, args.cfg_parallel, args.guidance)  # None unless under torchrun
    out = check_writable(args.out)
    pipe = VideoPipeline.load(args.pipeline, verify=not args.no_verify)
    edit = args.edit_video
    long = args.frames is not None
    sizes = args.size or [(args.frames, 32, 32) if long else
                          args.condition_size or ((9, 32, 32) if edit is None else tuple(edit.shape[1:]))]
    if len(sizes) not in (1, len(args.prompt)):
        raise ValueError(f"--size given {len(sizes)} times; give it once or once per --prompt ({len(args.prompt)})")
    sizes = sizes * len(args.prompt) if len(sizes) == 1 else sizes
    for i, s in enumerate(sizes):
        if not long:
            pipe.check_size(s, name=f"--edit {args.edit}" if edit is not None else f"--size #{i + 1}")
    kw = {} if edit is None else dict(init_videos=[edit] * len(args.prompt), strength=args.strength)
    if args.conditions:
        kw["conditions"] = [[c for _, c in args.conditions] for _ in args.prompt]
    if long:
        clips = _generate_long(pipe, args, sizes, mesh)
    else:
        clips = pipe.generate(args.prompt, sizes, steps=args.steps, guidance=args.guidance, shift=args.shift,
                              negative_prompt=args.negative_prompt, seed=args.seed, **kw,
                              denoiser=None if mesh is None else make_denoiser(pipe.dit, mesh))
    if mesh is not None and not mesh.is_main:
        return 0  # every rank holds the same clips; rank 0 writes them
    written = []
    for clip, stem in zip(clips, stems):
        for fmt in args.format:
            ext = "png" if fmt == "mp4" and clip.shape[1] == 1 else fmt
            written.append(write_video(out / f"{stem}.{ext}", clip, fps=args.fps))
    write_contact_sheet(out / "contact_sheet.png", clips, args.prompt)
    t = pipe.last_timings
    if long:
        print(f"text {t['text'] * 1e3:.0f} ms | denoise {t['denoise']:.2f} s (windows of {args.window} frames, "
              f"{args.steps} steps each) | decode {t['decode'] * 1e3:.0f} ms")
    else:
        print(f"text {t['text'] * 1e3:.0f} ms | denoise {t['denoise']:.2f} s ({args.steps} steps, "
              f"{1e3 * t['denoise'] / args.steps:.0f} ms/step) | decode {t['decode'] * 1e3:.0f} ms")
    print(f"wrote {len(written)} files and contact_sheet.png to {out}")
    return 0


def cmd_report(args) -> int:
    from .tools import kernel_report

    return kernel_report.main(args.args, prog="sora-fast report")


def cmd_bench(args) -> int:
    from .bench import runner

    return runner.main(args.args, prog="sora-fast bench")


def cmd_demo(args) -> int:
    from .demo import run_demo

    run_demo(args.out, quick=args.quick, progress=not args.no_progress)
    return 0


def cmd_profile(args) -> int:
    from .pipeline import VideoPipeline
    from .profile import PROFILE_PRESETS, build_preset_pipeline, default_size, format_report, profile_pipeline

    if args.preset is not None and args.pipeline is not None:
        raise ValueError(f"give at most one of --preset and --pipeline, got --preset {args.preset} and "
                         f"--pipeline {args.pipeline}")
    for flag, v, lo in (("--steps", args.steps, 1), ("--prompts", args.prompts, 1), ("--warmup", args.warmup, 0),
                        ("--top", args.top, 1)):
        if v < lo:
            raise ValueError(f"{flag} must be >= {lo}, got {v}")
    _finite("--guidance", args.guidance)
    if args.pipeline is not None:
        pipe = VideoPipeline.load(args.pipeline)
    else:
        if (args.preset or "tiny") not in PROFILE_PRESETS:
            raise ValueError(f"--preset must be one of {', '.join(PROFILE_PRESETS)}; got {args.preset!r}")
        pipe = build_preset_pipeline(args.preset or "tiny")
    size = pipe.check_size(args.size, name="--size") if args.size else default_size(pipe)
    prompts = [f"profile prompt {i}" for i in range(args.prompts)]
    report = profile_pipeline(pipe, prompts=prompts, size=size, steps=args.steps, guidance=args.guidance,
                              warmup=args.warmup, trace=args.trace, top=args.top)
    print(format_report(report, top=args.top))
    if args.json:
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json).write_text(json.dumps(report, indent=2))
        print(f"wrote {args.json}")
    return 0


# --- parser --------------------------------------------------------------------------------------
def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="sora-fast",
                                     description="sora_fast: packed video diffusion with custom kernels. "
                                                 "`sora-fast COMMAND --help` documents each command.")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    d = sub.add_parser("demo", help="data -> VAE -> packed DiT training -> sampling -> videos, on a CPU",
                       description="Runs every stage on a CPU with no download: synthetic captioned clips, a VAE "
                                   "and a DiT trained from scratch, packed CFG sampling, MP4/GIF + contact sheet, "
                                   "an automatic checker of the clips and a latency table. About 8 minutes on 2 "
                                   "cores (--quick: about 1 minute, a smoke run whose clips are not expected to "
                                   "pass the checker).")
    d.add_argument("--quick", action="store_true", help="a ~1-minute smoke run (tiny data and step counts)")
    d.add_argument("--out", default="sora_fast_demo", metavar="DIR", help="output directory (default: %(default)s)")
    d.add_argument("--no-progress", action="store_true", help="no progress bars (summary lines only)")
    d.set_defaults(func=cmd_demo)

    t = sub.add_parser("train", help="train or fine-tune the DiT on a video folder",
                       description="Train (or fine-tune, full or LoRA) the DiT of a saved pipeline on a folder of "
                                   "captioned videos and images at native resolution. " + TrainRunConfig.__doc__)
    t.add_argument("--config", required=True, metavar="FILE", help="run description (.json or .toml), see above")
    t.add_argument("--resume", action="store_true", help="continue from the run directory's latest checkpoint")
    t.add_argument("--overwrite", action="store_true",
                   help="delete the earlier run in the run directory (checkpoints, pipeline/, metrics.jsonl, "
                        "loss.png) and start over; without --resume or --overwrite an existing run is refused")
    t.add_argument("--steps", type=int, metavar="N", help="override train.steps")
    t.add_argument("--sequence-parallel", type=int, default=1, metavar="N",
                   help="under torchrun: split each packed batch's tokens over N ranks (Ulysses; N must divide the "
                        "DiT's heads); the world size / N groups train data-parallel; weights are FSDP2-sharded "
                        "over all ranks (default: %(default)s)")
    t.add_argument("--no-verify", action="store_true",
                   help="skip the sha256 check of the pipeline's and the resumed checkpoint's files (sizes are still "
                        "checked; a warning names what is skipped): for huge files on trusted storage")
    t.set_defaults(func=cmd_train)

    g = sub.add_parser("generate", help="generate videos from prompts with a saved pipeline",
                       description="All prompts are denoised together in one packed stream (CFG in the same "
                                   "forward), then decoded chunk by chunk.")
    g.add_argument("--pipeline", required=True, metavar="DIR", help="a saved pipeline (e.g. the demo's pipeline/)")
    g.add_argument("--prompt", required=True, action="append", metavar="TEXT", help="a prompt; repeat for several")
    g.add_argument("--size", action="append", type=_size, metavar="TxHxW",
                   help="frames x height x width, once for all or once per prompt (default 9x32x32, or the --edit "
                        "video's size)")
    g.add_argument("--steps", type=int, default=20, metavar="N", help="Euler steps (default: %(default)s)")
    g.add_argument("--guidance", type=float, default=4.0, metavar="G", help="CFG scale (default: %(default)s)")
    g.add_argument("--shift", default="auto", metavar="S",
                   help="schedule shift: a number, or 'auto' per video from its size (default: %(default)s)")
    g.add_argument("--negative-prompt", default="", metavar="TEXT", help="unconditional text (default: empty)")
    g.add_argument("--seed", type=int, default=0, metavar="N", help="video i uses seed + i (default: %(default)s)")
    g.add_argument("--edit", metavar="PATH",
                   help="edit this video or image (SDEdit) with every --prompt; the size defaults to its own "
                        "(a different --size is an error: it is never resized); needs --strength")
    g.add_argument("--strength", type=float, metavar="S",
                   help="with --edit: 0 keeps the video (VAE round trip), 1 generates anew from the seed's "
                        "noise; in between, re-noised to that level and denoised over the remaining steps")
    g.add_argument("--image", metavar="PATH",
                   help="image-to-video: this image is the first frame of every prompt's video; the size defaults "
                        "to 9 frames at the image's height and width")
    g.add_argument("--video", metavar="PATH",
                   help="extend this clip (needs --extend); the size defaults to 2n - 1 frames (n the clip's) at its "
                        "height and width")
    g.add_argument("--extend", choices=["forward", "backward"],
                   help="with --video: forward puts the clip at the start and generates what follows, backward "
                        "puts it at the end and generates what comes before")
    g.add_argument("--keyframe", action="append", type=_keyframe, metavar="PATH@FRAME",
                   help="an image (or clip) at pixel frame FRAME of every video (negative from the end: -1 is the "
                        "last); FRAME must land on a multiple of 4; repeat for several (e.g. first.png@0 "
                        "last.png@-1)")
    g.add_argument("--frames", type=int, metavar="N",
                   help="a long video of N pixel frames (1 + 4k) per prompt, rolled out in windows of --window "
                        "frames, each given the previous one's last --overlap latent frames; --size (if given) is "
                        "the whole video's (default Nx32x32)")
    g.add_argument("--window", type=int, metavar="W",
                   help="with --frames: pixel frames per window (1 + 4m, m >= 1; e.g. the trained length)")
    g.add_argument("--overlap", type=int, metavar="K",
                   help="with --frames: latent frames each window takes from the previous one (1 <= K < the "
                        "window's latent frames, 1 + (W - 1)/4)")
    g.add_argument("--format", nargs="+", default=["mp4", "gif"], choices=["mp4", "gif"],
                   help="files to write per clip (default: mp4 gif; 1-frame clips as png instead of mp4)")
    g.add_argument("--fps", type=float, default=8.0, metavar="F", help="frames per second (default: %(default)s)")
    g.add_argument("--out", default="samples", metavar="DIR", help="output directory (default: %(default)s)")
    g.add_argument("--sequence-parallel", type=int, default=1, metavar="N",
                   help="under torchrun: split the packed stream's tokens over N ranks at every step (Ulysses; N "
                        "must divide the DiT's heads) (default: %(default)s)")
    g.add_argument("--cfg-parallel", action="store_true",
                   help="under torchrun: conditional and unconditional CFG halves on different ranks "
                        "(world size = 2 x --sequence-parallel)")
    g.add_argument("--no-verify", action="store_true",
                   help="skip the sha256 check of the pipeline's weight files (sizes are still checked; a warning "
                        "names what is skipped): for huge files on trusted storage")
    g.set_defaults(func=cmd_generate)

    pr = sub.add_parser("profile", help="inference latency of a pipeline: stages, top ops, memory, throughput",
                        description="Warm-up run(s), then one timed run of generate (text encode, every denoising "
                                    "step, VAE decode), one under torch.profiler (top ops, optional Chrome trace) "
                                    "and, on a CPU, one under a tensor-memory tracker. With no --pipeline, a "
                                    "random-weight tiny pipeline is profiled (no checkpoint needed).")
    pr.add_argument("--preset", metavar="NAME",
                    help="random-weight pipeline to profile: tiny or demo (default: tiny unless --pipeline)")
    pr.add_argument("--pipeline", metavar="DIR", help="a saved pipeline to profile instead of a preset")
    pr.add_argument("--size", type=_size, metavar="TxHxW",
                    help="frames x height x width of every video (default 9x32x32, or the smallest valid size)")
    pr.add_argument("--prompts", type=int, default=1, metavar="N",
                    help="videos generated together in one packed stream (default: %(default)s)")
    pr.add_argument("--steps", type=int, default=10, metavar="N", help="Euler steps (default: %(default)s)")
    pr.add_argument("--guidance", type=float, default=4.0, metavar="G",
                    help="CFG scale; 1 runs without the unconditional copy (default: %(default)s)")
    pr.add_argument("--warmup", type=int, default=1, metavar="N",
                    help="unmeasured runs before the measured one (default: %(default)s)")
    pr.add_argument("--trace", metavar="PATH", help="write a Chrome trace of the profiled run (chrome://tracing)")
    pr.add_argument("--json", metavar="PATH", help="also write the full result as JSON")
    pr.add_argument("--top", type=int, default=15, metavar="K", help="ops listed in the table (default: %(default)s)")
    pr.set_defaults(func=cmd_profile)

    r = sub.add_parser("report", add_help=False,
                       help="offline sm_90 report of every shipped Triton config and CUDA kernel (registers, "
                            "spills, shared memory, tensor-core / vector-load counts, occupancy)",
                       description="See `sora-fast report --help`.")
    r.add_argument("args", nargs=argparse.REMAINDER,
                   help="the report's own options (`sora-fast report --help` lists them)")
    r.set_defaults(func=cmd_report)

    b = sub.add_parser("bench", add_help=False,
                       help="kernel benchmarks: every op across providers side by side (ms, TFLOP/s or GB/s, %% of "
                            "floor), checked against a reference before timing; JSON, CSV and plots",
                       description="See `sora-fast bench --help`.")
    b.add_argument("args", nargs=argparse.REMAINDER,
                   help="the benchmark's own options (`sora-fast bench --help` lists them)")
    b.set_defaults(func=cmd_bench)
    return parser


def is_user_error(e: BaseException) -> bool:
    """Errors the CLI reports as one line and exit status 2 (no traceback): bad arguments and values
    (ValueError, TypeError), files that are missing, unreadable or broken (OSError and its kinds, the
    safetensors parser's error), a missing optional package (ImportError), memory exhausted, and the
    project's own error classes (BackendUnavailableError, DiffusersHooksError, ...)."""
    if isinstance(e, (ValueError, TypeError, OSError, ImportError, MemoryError)):
        return True
    cls = type(e)
    module = cls.__module__ or ""
    return (module == "sora_fast" or module.startswith("sora_fast.")
            or any(c.__name__ in ("SafetensorError", "OutOfMemoryError") for c in cls.__mro__))


def main(argv: Optional[Sequence[str]] = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv[:1] == ["report"]:  # the report parses its own options (argparse's REMAINDER misses a leading flag)
        return cmd_report(argparse.Namespace(args=argv[1:]))
    if argv[:1] == ["bench"]:  # the same for the benchmark
        return cmd_bench(argparse.Namespace(args=argv[1:]))
    args = build_parser().parse_args(argv)
    if getattr(args, "shift", None) not in (None, "auto"):
        try:
            args.shift = float(args.shift)
        except ValueError:
            print(f"sora-fast {args.command}: error: --shift must be a number or 'auto', got {args.shift!r}",
                  file=sys.stderr)
            return 2
    try:
        return args.func(args)
    except Exception as e:
        if os.environ.get("SORA_FAST_DEBUG") or not is_user_error(e):
            raise
        print(f"sora-fast {args.command}: error: {e} (SORA_FAST_DEBUG=1 shows the traceback)", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"sora-fast {args.command}: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
