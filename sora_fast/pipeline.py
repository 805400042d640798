"""Text-to-video generation end to end: text encoder → packed flow-matching DiT (CFG in one pass) → VAE.

``VideoPipeline.generate(prompts, sizes=...)`` takes several prompts at different resolutions and
durations in one call: their latents are denoised together in one packed stream, then decoded chunk by
chunk (memory flat in the number of frames). ``save``/``load`` keep the three models in one directory
(safetensors weights + a JSON description), written atomically.
"""
from __future__ import annotations

import dataclasses
import json
import os
import shutil
import tempfile
import time
from pathlib import Path
from typing import Callable, Optional, Sequence, Union

import torch
from torch import nn

from .models.dit import DiTConfig, VideoDiT
from .models.text import T5TextEncoder, TextEncoder, TinyTextConfig, TinyTextEncoder
from .models.vae import CausalVAE, VAEConfig
from .sampling import sample_euler

__all__ = ["VideoPipeline", "check_video_size"]

Size = tuple[int, int, int]  # (frames, height, width) in pixels


def check_video_size(size, temporal_factor: int, spatial_factor: int, patch: Sequence[int],
                     name: str = "size") -> Size:
    """Validate a ``(frames, height, width)`` request against the VAE and patch factors.

    Frames must be ``1 + temporal_factor·k·pt`` (the causal VAE keeps the first frame alone) and height /
    width multiples of ``spatial_factor·ph`` / ``spatial_factor·pw``; the error says which and suggests
    the nearest valid values.
    """
    if not isinstance(size, (tuple, list)) or len(size) != 3 or not all(
            isinstance(v, int) and not isinstance(v, bool) and v >= 1 for v in size):
        raise ValueError(f"{name} must be (frames, height, width) positive ints, got {size!r}")
    t, h, w = size
    pt, ph, pw = patch
    ft = temporal_factor * pt
    if (t - 1) % ft:
        lo = 1 + (t - 1) // ft * ft
        raise ValueError(f"{name}: frames={t} must be 1 + {ft}k (VAE time factor {temporal_factor} x patch "
                         f"{pt}); nearest valid: {lo} or {lo + ft}")
    for axis, v, p in (("height", h, ph), ("width", w, pw)):
        m = spatial_factor * p
        if v % m:
            raise ValueError(f"{name}: {axis}={v} must be a multiple of {m} (VAE space factor {spatial_factor} x "
                             f"patch {p}); nearest valid: {max(m, v // m * m)} or {v // m * m + m}")
    return (t, h, w)


def _atomic_dir(final: Path, write: Callable[[Path], None]) -> None:
    """Write a directory under a temporary name beside ``final``, then swap it in."""
    final.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{final.name}.", dir=final.parent))
    try:
        write(tmp)
        old = None
        if final.exists():
            old = final.with_name(f".{final.name}.old")
            shutil.rmtree(old, ignore_errors=True)
            os.replace(final, old)
        os.replace(tmp, final)
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


class VideoPipeline(nn.Module):
    """A DiT, a causal VAE and a text encoder that generate videos from prompts.

    ``dit.config.in_channels`` must equal the VAE's latent channels and ``dit.config.text_dim`` the text
    encoder's ``dim``. The DiT works on normalized latents (:meth:`CausalVAE.normalize_latents`).
    After :meth:`generate`, ``last_timings`` holds seconds per stage (``text``, ``denoise``, per-step
    ``steps``, ``decode``).
    """

    def __init__(self, dit: VideoDiT, vae: CausalVAE, text_encoder: TextEncoder):
        super().__init__()
        if dit.config.in_channels != vae.latent_channels or dit.config.out_channels != vae.latent_channels:
            raise ValueError(f"dit in/out channels ({dit.config.in_channels}/{dit.config.out_channels}) must equal "
                             f"the VAE's latent channels ({vae.latent_channels})")
        if dit.config.text_dim != text_encoder.dim:
            raise ValueError(f"dit.config.text_dim={dit.config.text_dim} must equal the text encoder's "
                             f"dim={text_encoder.dim}")
        self.dit, self.vae, self.text_encoder = dit, vae, text_encoder
        self.last_timings: dict = {}

    @property
    def device(self) -> torch.device:
        return next(self.dit.parameters()).device

    def check_size(self, size, name: str = "size") -> Size:
        return check_video_size(size, self.vae.temporal_factor, self.vae.spatial_factor, self.dit.config.patch, name)

    def latent_shape(self, size) -> tuple[int, int, int, int]:
        """``(C, T', H', W')`` of the latent of a ``(frames, height, width)`` video."""
        t, h, w = self.check_size(size)
        f, s = self.vae.temporal_factor, self.vae.spatial_factor
        return (self.vae.latent_channels, 1 + (t - 1) // f, h // s, w // s)

    @torch.no_grad()
    def generate(self, prompts: Sequence[str], sizes: Union[Size, Sequence[Size]] = (9, 32, 32), *,
                 steps: int = 30, guidance: float = 5.0, negative_prompt: str = "",
                 shift: Union[float, str, Sequence[float]] = "auto", seed: Union[int, Sequence[int]] = 0,
                 progress: Optional[Callable[[int, int], None]] = None,
                 denoiser: Optional[Callable] = None) -> list[torch.Tensor]:
        """Videos for ``prompts``, all denoised in one packed stream.

        Args:
            prompts: B strings.
            sizes: one ``(frames, height, width)`` for all, or one per prompt (images: frames = 1).
            steps, guidance, shift: see :func:`sora_fast.sampling.sample_euler`; ``negative_prompt`` is the
                unconditional text of CFG.
            denoiser: what runs the DiT at each step (default the DiT itself), e.g. a CFG- or
                sequence-parallel one from :func:`sora_fast.distributed.make_denoiser`.
            seed: one int (video i uses ``seed + i``) or one per prompt; the noise of a video depends only
                on its seed and size, so a prompt gives the same video alone or with others.
        Returns B float tensors ``(3, frames, height, width)`` in [-1, 1] on the CPU.

        Every argument is checked before any work starts (non-finite ``guidance`` / ``shift`` included), and
        sizes whose lower-bound memory need exceeds the device's are refused
        (:func:`sora_fast.memory.check_generate_memory`); latents or frames with NaN / Inf values raise a
        ValueError with their count.
        """
        if isinstance(prompts, str) or not isinstance(prompts, Sequence) or not prompts:
            raise TypeError("prompts must be a non-empty list of strings")
        b = len(prompts)
        if isinstance(sizes, (tuple, list)) and len(sizes) == 3 and all(isinstance(v, int) for v in sizes):
            sizes = [tuple(sizes)] * b
        if not isinstance(sizes, (tuple, list)) or len(sizes) != b:
            raise ValueError(f"sizes must be one (frames, height, width) or a list of {b} of them, got {sizes!r}")
        shapes = [self.latent_shape(s) for s in sizes]
        seeds = [seed + i for i in range(b)] if isinstance(seed, int) else list(seed)
        if len(seeds) != b or not all(isinstance(s, int) for s in seeds):
            raise ValueError(f"seed must be an int or a list of {b} ints, got {seed!r}")
        # every argument is checked before any work (text encoding, denoising) starts
        import math

        from .memory import check_generate_memory
        from .sampling import _check_shift, check_finite
        if not all(isinstance(p, str) for p in prompts):
            raise TypeError(f"prompts must be strings, got {[type(p).__name__ for p in prompts]}")
        if not isinstance(negative_prompt, str):
            raise TypeError(f"negative_prompt must be a string, got {type(negative_prompt).__name__}")
        if isinstance(steps, bool) or not isinstance(steps, int) or steps < 1:
            raise ValueError(f"steps must be a positive int, got {steps!r}")
        if isinstance(guidance, bool) or not isinstance(guidance, (int, float)):
            raise TypeError(f"guidance must be a number, got {type(guidance).__name__}")
        if not math.isfinite(guidance):
            raise ValueError(f"guidance must be a finite number, got {guidance!r}")
        _check_shift(shift, b)
        check_generate_memory(self, shapes, [self.check_size(s) for s in sizes], cfg=guidance != 1.0)
        self.eval()
        dev, timings = self.device, {}

        t0 = time.perf_counter()
        text = self.text_encoder.encode(list(prompts)).to(dev)
        uncond = self.text_encoder.encode([negative_prompt] * b).to(dev) if guidance != 1.0 else None
        timings["text"] = time.perf_counter() - t0

        noise = [torch.randn(s, generator=torch.Generator().manual_seed(sd)).to(dev) for s, sd in zip(shapes, seeds)]
        step_times, last = [], [time.perf_counter()]

        def on_step(i, n):
            now = time.perf_counter()
            step_times.append(now - last[0])
            last[0] = now
            if progress is not None:
                progress(i, n)

        t0 = time.perf_counter()
        latents = sample_euler(denoiser or self.dit, noise, text, patch=self.dit.config.patch, steps=steps,
                               guidance=guidance, uncond_text=uncond, shift=shift, progress=on_step)
        timings["denoise"], timings["steps"] = time.perf_counter() - t0, step_times

        t0 = time.perf_counter()
        videos = [self.vae.decode(self.vae.denormalize_latents(z[None]))[0].float().cpu() for z in latents]
        check_finite(videos, "the decoded videos")
        timings["decode"] = time.perf_counter() - t0
        self.last_timings = timings
        return videos

    # --- persistence ---------------------------------------------------------------------------
    def describe(self) -> dict:
        """JSON description of the three models (enough to rebuild them empty)."""
        te = self.text_encoder
        if isinstance(te, TinyTextEncoder):
            text = {"kind": "tiny", "config": dataclasses.asdict(te.config)}
        elif isinstance(te, T5TextEncoder):
            text = {"kind": "t5", "path": getattr(te, "path", None), "max_length": te.max_length, "pad_to": te.pad_to}
        else:
            raise TypeError(f"cannot describe a text encoder of type {type(te).__name__}")
        return {"format": 1, "dit": dataclasses.asdict(self.dit.config), "vae": dataclasses.asdict(self.vae.config),
                "text": text}

    def save(self, directory: Union[str, os.PathLike]) -> Path:
        """Write ``pipeline.json`` + ``dit``/``vae``/``text.safetensors`` to ``directory`` atomically (a crash
        leaves the previous contents, never a half-written pipeline). A frozen T5 is stored by path only."""
        from safetensors.torch import save_file

        final, desc = Path(directory), self.describe()

        def write(tmp: Path):
            parts = {"dit": self.dit, "vae": self.vae}
            if desc["text"]["kind"] == "tiny":
                parts["text"] = self.text_encoder
            for name, m in parts.items():
                save_file({k: v.detach().contiguous().cpu() for k, v in m.state_dict().items()},
                          str(tmp / f"{name}.safetensors"))
            (tmp / "pipeline.json").write_text(json.dumps(desc, indent=2))

        _atomic_dir(final, write)
        return final

    @classmethod
    def load(cls, directory: Union[str, os.PathLike], *, device=None) -> "VideoPipeline":
        """A pipeline written by :meth:`save` (safetensors only; nothing is unpickled)."""
        from safetensors.torch import load_file

        from .models._convert import load_converted

        d = Path(directory)
        if not (d / "pipeline.json").is_file():
            raise FileNotFoundError(f"{d} is not a saved pipeline: {d / 'pipeline.json'} is missing")
        desc = json.loads((d / "pipeline.json").read_text())
        dit = VideoDiT(DiTConfig(**desc["dit"]))
        vae = CausalVAE(VAEConfig(**{k: tuple(v) if isinstance(v, list) else v for k, v in desc["vae"].items()}))
        if desc["text"]["kind"] == "tiny":
            text = TinyTextEncoder(TinyTextConfig(**desc["text"]["config"]))
        else:
            text = T5TextEncoder(desc["text"]["path"], max_length=desc["text"]["max_length"],
                                 pad_to=desc["text"]["pad_to"])
        parts = {"dit": dit, "vae": vae} | ({"text": text} if desc["text"]["kind"] == "tiny" else {})
        for name, m in parts.items():
            load_converted(m, load_file(str(d / f"{name}.safetensors")), f"{d / name}.safetensors")
        pipe = cls(dit, vae, text)
        return pipe.to(device) if device is not None else pipe
