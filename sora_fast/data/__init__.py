"""Data layer: video folders, synthetic captioned clips, an automatic clip checker, latent caches, writers.

- :class:`VideoFolder` — videos and images of a folder with captions, native size (optional downscale to a
  pixel budget and frame-count rule), broken files skipped and named (:func:`write_skip_report`); camera
  files read upright and, with ``fps``, resampled by their timestamps (:mod:`~sora_fast.data.video_decode`).
- :mod:`~sora_fast.data.synthetic` — deterministic clips of coloured shapes moving in captioned directions,
  written as a video folder by :func:`make_synthetic_dataset`.
- :mod:`~sora_fast.data.world` — the synthetic world: wall and floor bounces under gravity, full occlusion,
  two objects passing or colliding, camera pans and zooms over a textured background (:func:`make_world_dataset`).
- :mod:`~sora_fast.data.checker` — :func:`check_clip` judges whether a generated clip matches its synthetic
  prompt (presence, colour, direction); :func:`checker_summary` gives ``"checker pass rate: 7/8"``.
- :func:`cache_latents` / :class:`LatentDataset` — encode once into safetensors shards, train from latents;
  :func:`ensure_latent_cache` reuses a cache only while its key (data files, settings, VAE) matches.
- :func:`write_video`, :func:`write_contact_sheet`, :func:`to_uint8` — mp4/gif/png output.

PyAV and Pillow (the ``video`` extra) are imported only when a file is read or written.
"""
from . import checker, synthetic, world
from .checker import CheckerThresholds, CheckResult, check_clip, check_clips
from .checker import summary as checker_summary
from .io import to_uint8, write_contact_sheet, write_video
from .latents import LatentDataset, cache_key, cache_latents, ensure_latent_cache, module_key
from .synthetic import (
    ClipSpec,
    Prompt,
    SyntheticClip,
    caption_for,
    make_synthetic_dataset,
    parse_caption,
    prompts,
    render_clip,
    sample_spec,
)
from .video_folder import Skipped, UnreadableFileError, VideoFolder, write_skip_report

__all__ = [
    "checker",
    "synthetic",
    "world",
    "VideoFolder",
    "Skipped",
    "UnreadableFileError",
    "write_skip_report",
    "ClipSpec",
    "Prompt",
    "SyntheticClip",
    "caption_for",
    "parse_caption",
    "prompts",
    "sample_spec",
    "render_clip",
    "make_synthetic_dataset",
    "CheckerThresholds",
    "CheckResult",
    "check_clip",
    "check_clips",
    "checker_summary",
    "cache_latents",
    "ensure_latent_cache",
    "cache_key",
    "module_key",
    "LatentDataset",
    "write_video",
    "write_contact_sheet",
    "to_uint8",
]
