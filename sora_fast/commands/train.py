"""``sora-fast train``: the run file, the run directory (refuse, resume or overwrite) and the training run."""
from __future__ import annotations

import dataclasses
import json
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional


# --- train: a run described by one JSON / TOML file ---------------------------------------------------
@dataclass
class TrainRunConfig:
    """A ``sora-fast train --config FILE`` run (JSON, or TOML with Python >= 3.11).

    data:          a video folder (videos + images with .txt captions or a manifest.jsonl).
    out:           the run directory: latents/, text/ (embeddings of a frozen text encoder), checkpoints,
                   metrics.jsonl, loss.png, pipeline/, lora/.
    pipeline:      a saved pipeline (``VideoPipeline.save``, e.g. the demo's ``pipeline/``) or a diffusers Wan
                   pipeline directory (``model_index.json``) giving the VAE, the text encoder and the starting DiT.
    dit:           optional DiT preset name: train a fresh DiT of that size instead of the pipeline's
                   (latent channels and text width are taken from the pipeline).
    diffusers_transformer: optional directory of a diffusers ``WanTransformer3DModel`` to fine-tune
                   (converted with ``VideoDiT.from_diffusers``).
    manifest, max_area, max_frames: passed to ``VideoFolder`` (captions, down-scaling only, never crops).
    fps, max_seconds: passed to ``VideoFolder``: resample videos to ``fps`` by their timestamps, keep their
                   first ``max_seconds``.
    allow_outside_root: passed to ``VideoFolder``: also read manifest paths and links outside ``data``.
    log:           ``"jsonl"`` (metrics.jsonl) or ``"tensorboard"`` (also TensorBoard scalars in out/tensorboard/).
    validation:    optional ``{"prompts": [...], "every": N, "size": [T, H, W], "steps", "guidance", "seed"}``:
                   samples of the model being trained every N steps in out/samples/step_XXXXXX/.
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
    fps: Optional[float] = None
    max_seconds: Optional[float] = None
    allow_outside_root: bool = False
    log: str = "jsonl"
    validation: Optional[dict] = None
    train: dict = field(default_factory=dict)


def load_run_config(path: str) -> tuple[TrainRunConfig, Any]:
    """Read and validate a run file: unknown keys (top level or in ``train``) are named in the error."""
    from ..training.trainer import TrainConfig, config_from_dict

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
    from ..training.run_logs import LOGS, check_validation, summary_writer

    if run.log not in LOGS:
        raise ValueError(f"{p.name}: 'log' must be one of {', '.join(map(repr, LOGS))}, got {run.log!r}")
    if run.log == "tensorboard":
        summary_writer()  # a missing package is said before any work
    run.validation = check_validation(run.validation, p.name)
    return run, train


# what a training run writes into its directory (the latent cache is keyed on its data and kept)
_RUN_NAMES = ("metrics.jsonl", "loss.png", "latest", "latest_dcp", "pipeline", "lora")
_RUN_PREFIXES = ("step_", "dcp_step_", "pipeline.")
_RUN_LEFTOVERS = (".tmp-", ".pipeline.", ".lora.")  # temporaries of interrupted writes, cleared by --overwrite


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
        from ..distributed.launch import barrier

        barrier()


def _cached_text(text, captions, train_cfg, out: Path, mesh, device):
    """A frozen text encoder (a T5, or any under LoRA) runs once per caption into ``out/text/`` and leaves memory;
    training reads the cache. A trainable one is returned as it is."""
    from ..data.text_cache import CachedTextEncoder, ensure_text_cache, release_text_encoder
    from ..distributed.launch import barrier
    from ..models.text import T5TextEncoder

    if not (isinstance(text, T5TextEncoder) or train_cfg.lora_rank):
        return text
    if mesh is None or mesh.is_main:
        ensure_text_cache(text, captions, out / "text")
    barrier()
    release_text_encoder(text)
    return CachedTextEncoder(out / "text", pad_to=getattr(text, "pad_to", None), device=device)


def cmd_train(args) -> int:
    import torch

    from ..captions.stats import CaptionStats
    from ..data import LatentDataset, VideoFolder, ensure_latent_cache, module_key, write_skip_report
    from ..distributed.launch import barrier, has_checkpoint, make_trainer, save_pipeline, training_mesh
    from ..models.dit import DiTConfig, VideoDiT
    from ..pipeline import VideoPipeline
    from ..training.checkpoint import check_writable
    from ..training.lora import merge_lora

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
    # Wan 2.2 A14B: both experts train (a new DiT from 'dit' / 'diffusers_transformer' is one DiT)
    dit_2, boundary = (pipe.dit_2, pipe.boundary) if run.dit is None and run.diffusers_transformer is None \
        else (None, None)
    if dit_2 is not None and mesh is not None:
        raise ValueError(f"pipeline {run.pipeline} has two experts (Wan 2.2 A14B: dit and dit_2); training both runs "
                         "in one process for now, not under torchrun")
    if run.dit is not None:
        dit = VideoDiT(DiTConfig.from_name(run.dit, in_channels=vae.latent_channels,
                                           out_channels=vae.latent_channels, text_dim=text.dim))
    elif run.diffusers_transformer is not None:
        dit = VideoDiT.from_diffusers_dir(run.diffusers_transformer)
    else:
        dit = pipe.dit
    pipe = VideoPipeline(dit, vae, text, sampling=pipe.sampling, dit_2=dit_2, boundary=boundary)  # checks they agree

    ph = dit.config.patch[1]
    folder = VideoFolder(run.data, manifest=run.manifest, max_area=run.max_area, max_frames=run.max_frames,
                         size_multiple=vae.spatial_factor * ph, frame_multiple=vae.temporal_factor, frame_offset=1,
                         allow_outside_root=run.allow_outside_root, fps=run.fps, max_seconds=run.max_seconds)
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
    # the saved pipeline carries the statistics of the captions this run trains on (prompt expansion fills from them)
    pipe.caption_stats = CaptionStats.from_captions([it["caption"] for it in items])
    if mesh is None or mesh.is_main:
        print(pipe.caption_stats.summary(), file=sys.stderr)
    model_config = {"dit": dataclasses.asdict(dit.config), "text": pipe.describe()["text"]}
    if dit_2 is not None:  # a one-DiT run's checkpoints stay as they were
        model_config["experts"] = {"boundary": boundary}
    val = run.validation
    if val is not None and mesh is not None:
        raise ValueError(f"{args.config}: 'validation' samples are not supported under torchrun yet; remove it")
    captions = [it["caption"] for it in items] + (val["prompts"] if val else [])
    text = _cached_text(text, captions, train_cfg, out, mesh, next(dit.parameters()).device)
    trainer = make_trainer(dit, text, items, train_cfg, out, mesh=mesh, model_config=model_config,
                           dit_2=dit_2, boundary=boundary)
    from ..training.run_logs import run_callbacks

    on_step, closers = run_callbacks(run.log, val, VideoPipeline(dit, vae, text, sampling=pipe.sampling, dit_2=dit_2,
                                                                 boundary=boundary), out,
                                     train_cfg.log_every, is_main=trainer.is_main)
    if args.resume:
        if not has_checkpoint(out, mesh):
            print(f"--resume: no checkpoint in {out} yet, starting at step 0", file=sys.stderr)
        else:
            print(f"resuming from step {trainer.resume(verify=not args.no_verify)}", file=sys.stderr)
    if trainer.is_main:
        print(trainer.plan.summary(), file=sys.stderr)
    try:
        res = trainer.train(on_step=on_step)
    finally:
        for close in closers:
            close()
    if trainer.ema is not None:
        trainer.ema.copy_to(trainer.model)
    if train_cfg.lora_rank:
        if mesh is None:  # the adapters alone, in diffusers' and ComfyUI's layouts, before they are merged
            from ..training.lora_formats import save_expert_lora_files, save_lora_files

            if dit_2 is None:
                save_lora_files(dit, out / "lora")
            else:
                save_expert_lora_files(dit, dit_2, out / "lora")
        merge_lora(dit)
        if dit_2 is not None:
            merge_lora(dit_2)
    if not save_pipeline(pipe, out / "pipeline", mesh):
        return 0  # ranks other than 0 print nothing
    state = "interrupted at" if res["interrupted"] else "finished"
    print(f"{state} step {res['steps']}; checkpoint {res['checkpoint']}; pipeline {out / 'pipeline'}")
    if not res["interrupted"]:
        return 0
    return 143 if res.get("signal") == "SIGTERM" else 130  # 128 + the signal's number
