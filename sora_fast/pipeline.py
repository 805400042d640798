"""Text-to-video generation end to end: text encoder → packed flow-matching DiT (CFG in one pass) → VAE.

``VideoPipeline.generate(prompts, sizes=...)`` takes several prompts at different resolutions and
durations in one call: their latents are denoised together in one packed stream, then decoded chunk by
chunk (memory flat in the number of frames). ``save``/``load`` keep the three models in one directory
(safetensors weights + a JSON description with the size and sha256 of every weight file), written atomically:
the new directory is written beside the old one and swapped in by two renames; a crash between them is
repaired by the next ``load`` or ``save`` (see :func:`sora_fast._files.recover_dir`).
"""
from __future__ import annotations

import contextlib
import dataclasses
import json
import math
import os
import time
import warnings
from pathlib import Path
from typing import Callable, Optional, Sequence, Union

import torch
from torch import nn

from ._files import atomic_dir, load_safetensors, read_json, recover_dir, verify_files, warn_unchecked
from ._pipeline_desc import DESC as _DESC
from ._pipeline_desc import FORMAT as _FORMAT
from ._pipeline_desc import check_description as _check_description
from ._pipeline_desc import check_experts as _check_experts
from ._pipeline_desc import check_sampling_settings as _check_sampling_settings
from ._pipeline_desc import text_encoder_from as _text_encoder
from .captions.expand import Expansion, PromptExpander, make_expander
from .captions.stats import CaptionStats
from .conditioning import Condition, Media, check_conditions, check_init_videos, check_media, read_media
from .long_video import LongVideoMixin
from .models.dit import DiTConfig, VideoDiT
from .models.text import T5TextEncoder, TextEncoder, TinyTextEncoder
from .models.vae import CausalVAE, VAEConfig
from .ops._common import check_window
from .sampling import sample

__all__ = ["Condition", "VideoPipeline", "check_video_size", "local_attention", "read_media"]

Size = tuple[int, int, int]  # (frames, height, width) in pixels


def check_video_size(size, temporal_factor: int, spatial_factor: int, patch: Sequence[int],
                     name: str = "size") -> Size:
    """Validate a ``(frames, height, width)`` request against the VAE and patch factors.

    Frames must be ``1 + temporal_factor·k`` (the causal VAE keeps the first frame alone and gives ``1 + k``
    latent frames) with ``1 + k`` a multiple of the temporal patch ``pt`` (the DiT takes latent frames ``pt``
    at a time), and height / width multiples of ``spatial_factor·ph`` / ``spatial_factor·pw``; the error says
    which and suggests the nearest valid values.
    """
    if not isinstance(size, (tuple, list)) or len(size) != 3 or not all(
            isinstance(v, int) and not isinstance(v, bool) and v >= 1 for v in size):
        raise ValueError(f"{name} must be (frames, height, width) positive ints, got {size!r}")
    t, h, w = size
    pt, ph, pw = patch
    tf = temporal_factor
    if pt == 1 and (t - 1) % tf:
        lo = 1 + (t - 1) // tf * tf
        raise ValueError(f"{name}: frames={t} must be 1 + {tf}k (VAE time factor {tf} x patch {pt}); nearest "
                         f"valid: {lo} or {lo + tf}")
    if pt > 1 and ((t - 1) % tf or (1 + (t - 1) // tf) % pt):
        m = (t - 1 + tf) // (tf * pt)                 # valid frames: tf·pt·m − tf + 1 (pt·m latent frames)
        lo, hi = tf * pt * m - tf + 1, tf * pt * (m + 1) - tf + 1
        near = f"{lo} or {hi}" if m >= 1 else f"{hi}"
        raise ValueError(f"{name}: frames={t} must be 1 + {tf}k with 1 + k a multiple of {pt} (the VAE, time factor "
                         f"{tf}, gives 1 + k latent frames, and the DiT takes them in temporal patches of {pt}); "
                         f"nearest valid: {near}")
    for axis, v, p in (("height", h, ph), ("width", w, pw)):
        m = spatial_factor * p
        if v % m:
            raise ValueError(f"{name}: {axis}={v} must be a multiple of {m} (VAE space factor {spatial_factor} x "
                             f"patch {p}); nearest valid: {max(m, v // m * m)} or {v // m * m + m}")
    return (t, h, w)


@contextlib.contextmanager
def local_attention(dit: VideoDiT, window):
    """Inside the block, every self-attention of ``dit`` uses the local window ``window`` ``(wt, wh, ww)`` (3 ints
    >= 0, half-sizes in latent patches; None: the DiT's own, ``dit.config.window``); its blocks' configs are put
    back on exit, also on an error. No weight changes: a training-free window on a model trained dense."""
    window = check_window("window", window)
    if window is None:
        yield dit
        return
    blocks = list(dit.blocks)
    saved = [b.cfg for b in blocks]
    try:
        for b in blocks:
            b.cfg = dataclasses.replace(b.cfg, window=window)
        yield dit
    finally:
        for b, cfg in zip(blocks, saved):
            b.cfg = cfg


class VideoPipeline(LongVideoMixin, nn.Module):
    """A DiT (or two experts), a causal VAE and a text encoder that generate videos from prompts.

    ``dit.config.in_channels`` must equal the VAE's latent channels and ``dit.config.text_dim`` the text
    encoder's ``dim``. The DiT works on normalized latents (:meth:`CausalVAE.normalize_latents`).
    After :meth:`generate`, ``last_timings`` holds seconds per stage (``expand`` when prompts were expanded,
    ``text``, ``encode`` (init videos), ``denoise``, per-step ``steps``, ``decode``). ``sampling`` (None, or the
    settings of a diffusers pipeline's scheduler: ``solver``, ``shift``, ``schedule``, and ``order`` for UniPC) gives
    :meth:`generate` its default solver, order and shift and its noise levels and timesteps
    (:func:`sora_fast.sampling.schedule_sigmas`). ``dit_2`` (None, or a second :class:`VideoDiT` of ``dit``'s
    config: Wan 2.2 A14B's low-noise expert) takes over from ``dit`` once a video's step timestep is below
    ``boundary`` (:class:`sora_fast.sampling.Experts`; diffusers' ``boundary_ratio · num_train_timesteps``).
    ``caption_stats`` (None, or the :class:`~sora_fast.captions.expand.CaptionStats` of the training captions, saved
    in ``pipeline.json``'s ``captions``) is what ``generate(expand="schema")`` fills prompts from; ``last_prompts``
    holds the last call's :class:`~sora_fast.captions.expand.Expansion` per prompt (original and expanded text).
    Long videos (:meth:`generate_long`, :meth:`plan_long`, :meth:`window_seed`) are :mod:`sora_fast.long_video`'s.
    """

    @classmethod
    def from_diffusers(cls, path_or_pipeline, *, dtype: Optional[torch.dtype] = None,
                       vae_dtype: Optional[torch.dtype] = torch.float32, device=None,
                       max_length: int = 512) -> "VideoPipeline":
        """A diffusers Wan 2.1 / 2.2 text-to-video pipeline: a directory as distributed (``model_index.json``,
        ``transformer/``, ``vae/``, ``text_encoder/`` umT5, ``tokenizer/``, ``scheduler/``; Wan 2.2 A14B's
        ``transformer_2/``) or a ``WanPipeline``.

        The transformer becomes a :class:`VideoDiT`, the VAE a :class:`CausalVAE` (``vae_dtype``, default fp32
        as Wan runs it), the text encoder a :class:`T5TextEncoder` (prompts cut to ``max_length`` tokens and
        padded with zero rows to it, as diffusers does), and the scheduler's solver (UniPC with its order for
        Wan's ``UniPCMultistepScheduler``, Euler for ``FlowMatchEulerDiscreteScheduler``), shift, levels and
        timesteps :attr:`sampling`, so :meth:`generate`'s defaults give ``WanPipeline.__call__``'s video. A
        ``transformer_2`` (the low-noise expert) becomes ``dit_2`` and ``boundary_ratio · num_train_timesteps``
        :attr:`boundary`. ``dtype`` None keeps the stored dtypes; otherwise the transformer and text encoder are
        cast (diffusers' fp32 modules stay fp32). Weights are read lazily, tensor by tensor, and never held
        twice; from a ``WanPipeline`` object the models share its tensors. Not a Wan pipeline, a missing
        component, a mismatched text encoder or an unsupported option raise errors naming what was found
        and what was expected (:mod:`sora_fast.integrations.diffusers.wan_pipeline`). :meth:`save` writes
        sora_fast's format. Wan 2.2 TI2V-5B (``expand_timesteps``, the residual 16x VAE) loads too; its
        image-to-video is :meth:`generate` with ``conditions=[[Condition(image)]]`` (diffusers'
        ``WanImageToVideoPipeline`` with ``expand_timesteps=True``)."""
        from .integrations.diffusers.wan_pipeline import load_wan_pipeline

        return load_wan_pipeline(path_or_pipeline, dtype=dtype, vae_dtype=vae_dtype, device=device,
                                 max_length=max_length)

    def __init__(self, dit: VideoDiT, vae: CausalVAE, text_encoder: TextEncoder, sampling: Optional[dict] = None,
                 caption_stats: Optional[CaptionStats] = None, dit_2: Optional[VideoDiT] = None,
                 boundary: Optional[float] = None):
        super().__init__()
        self.sampling = _check_sampling_settings(sampling)
        self.boundary = _check_experts(dit, dit_2, boundary)
        if caption_stats is not None and not isinstance(caption_stats, CaptionStats):
            raise TypeError(f"caption_stats must be a CaptionStats or None, got {type(caption_stats).__name__}")
        self.caption_stats = caption_stats
        if dit.config.in_channels != vae.latent_channels or dit.config.out_channels != vae.latent_channels:
            raise ValueError(f"dit in/out channels ({dit.config.in_channels}/{dit.config.out_channels}) must equal "
                             f"the VAE's latent channels ({vae.latent_channels})")
        if dit.config.text_dim != text_encoder.dim:
            raise ValueError(f"dit.config.text_dim={dit.config.text_dim} must equal the text encoder's "
                             f"dim={text_encoder.dim}")
        self.dit, self.vae, self.text_encoder, self.dit_2 = dit, vae, text_encoder, dit_2
        self.last_timings: dict = {}
        self.last_prompts: list[Expansion] = []

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

    DEFAULT_SIZE: Size = (9, 32, 32)

    def _expander(self, expand) -> Optional[PromptExpander]:
        """``expand`` (None, ``"schema"`` or a PromptExpander) as an expander, checked before any work."""
        if expand == "chat":
            raise ValueError("expand='chat' needs a chat server: pass expand=ChatExpander(base_url, model) "
                             "(sora_fast.captions.expand)")
        return make_expander(expand, stats=self.caption_stats)

    def _expand(self, prompts: Sequence[str], expander: Optional[PromptExpander]) -> list[str]:
        """The prompts the text encoder gets; sets :attr:`last_prompts`."""
        self.last_prompts = ([Expansion(p, p) for p in prompts] if expander is None
                             else expander.expand_many(list(prompts)))
        return [e.expanded for e in self.last_prompts]

    def _shift(self, shift):
        """``shift`` as given, or (None) the pipeline's: its scheduler's shift, else ``"auto"``."""
        return shift if shift is not None else self.sampling["shift"] if self.sampling else "auto"

    def solver_settings(self, solver: Optional[str] = None, order: Optional[int] = None) -> tuple[str, Optional[int]]:
        """``(solver, order)`` :meth:`generate` runs: ``solver`` None takes :attr:`sampling`'s (a diffusers
        pipeline's scheduler: ``"unipc"`` with its ``solver_order`` for Wan's UniPC), else ``"euler"``; ``order``
        None takes :attr:`sampling`'s when the solver is its, else the solver's default."""
        s = self.sampling or {}
        solver = s.get("solver", "euler") if solver is None else solver
        if order is None and solver == s.get("solver"):
            order = s.get("order")
        return solver, order

    @property
    def experts(self) -> list[VideoDiT]:
        """The DiTs, highest noise first: ``[dit]``, or ``[dit, dit_2]``."""
        return [self.dit] if self.dit_2 is None else [self.dit, self.dit_2]

    def denoiser(self, wrap: Optional[Callable] = None):
        """What :meth:`generate` runs at every step: the DiT, or (two experts) an
        :class:`~sora_fast.sampling.Experts` that gives each video ``dit`` while its step timestep is >= ``boundary``,
        then ``dit_2``. ``wrap`` (e.g. ``lambda dit: make_denoiser(dit, mesh)`` for a parallel run) maps every DiT
        to the denoiser that runs it."""
        from .sampling import Experts

        runs = [d if wrap is None else wrap(d) for d in self.experts]
        return runs[0] if len(runs) == 1 else Experts(runs, [self.boundary])

    def _guidance(self, guidance, guidance_2, denoiser):
        """The CFG scale ``sample`` takes: ``guidance``, or ``[guidance, guidance_2]`` for an Experts denoiser
        (``guidance_2`` None: ``guidance``, as diffusers)."""
        from .sampling import Experts

        if guidance_2 is None:
            return guidance
        if not isinstance(denoiser, Experts):
            raise ValueError(f"guidance_2 is the low-noise expert's CFG scale; this pipeline runs one DiT (no dit_2), "
                             f"expected guidance_2=None, got {guidance_2!r}")
        if isinstance(guidance_2, bool) or not isinstance(guidance_2, (int, float)) or not math.isfinite(guidance_2):
            raise ValueError(f"guidance_2 must be a finite number or None, got {guidance_2!r}")
        return [guidance, guidance_2]

    @contextlib.contextmanager
    def _attention_window(self, window):
        """:func:`local_attention` on every expert."""
        with contextlib.ExitStack() as stack:
            for dit in self.experts:
                stack.enter_context(local_attention(dit, window))
            yield

    def _denoise(self, noise, text, *, denoiser=None, attention_window=None, **kw) -> list[torch.Tensor]:
        """:func:`sora_fast.sampling.sample` of ``noise`` with ``denoiser`` (default :meth:`denoiser`: the DiT, or
        both experts) under the local attention window ``attention_window`` (on every expert), in the DiT's patch
        and token order, on :attr:`sampling`'s schedule; ``kw`` are the other arguments of ``sample``."""
        c = self.dit.config
        with self._attention_window(attention_window):
            return sample(self.denoiser() if denoiser is None else denoiser, noise, text, patch=c.patch,
                          token_order=c.token_order, token_tile=c.token_tile,
                          schedule=self.sampling and self.sampling["schedule"], **kw)


    @torch.no_grad()
    def generate(self, prompts: Sequence[str], sizes: Union[Size, Sequence[Optional[Size]], None] = None, *,
                 steps: int = 30, guidance: float = 5.0, negative_prompt: str = "",
                 shift: Union[float, str, Sequence[float], None] = None, seed: Union[int, Sequence[int]] = 0,
                 progress: Optional[Callable[[int, int], None]] = None,
                 denoiser: Optional[Callable] = None,
                 init_videos: Optional[Sequence[Optional[Media]]] = None,
                 strength: Union[float, Sequence[float]] = 1.0,
                 conditions: Optional[Sequence[Sequence[Condition]]] = None,
                 solver: Optional[str] = None, order: Optional[int] = None, cache=None,
                 expand: Union[str, PromptExpander, None] = None,
                 attention_window: Optional[Sequence[int]] = None,
                 guidance_2: Optional[float] = None) -> list[torch.Tensor]:
        """Videos for ``prompts``, all denoised in one packed stream.

        Args:
            prompts: B strings.
            sizes: one ``(frames, height, width)`` for all, or one per prompt (images: frames = 1). None (or
                a None entry): the prompt's init video's size; else, with conditions, :attr:`DEFAULT_SIZE`'s
                frames at its first condition's height and width; else :attr:`DEFAULT_SIZE` ``(9, 32, 32)``.
            steps, guidance, shift: see :func:`sora_fast.sampling.sample`; ``negative_prompt`` is the
                unconditional text of CFG. ``shift`` None: :attr:`sampling`'s, else ``"auto"``.
            guidance_2: with two experts (``dit_2``), the CFG scale of the steps ``dit_2`` runs (diffusers'
                ``guidance_scale_2``); None: ``guidance``.
            solver, order: ``"euler"``, ``"unipc"`` (order 1-3, default 2) or ``"dpm++"`` (order 1-2, default 2), one
                DiT forward per step each (:func:`sora_fast.sampling.sample`); None: :meth:`solver_settings` (a
                diffusers pipeline's scheduler's, else ``"euler"``).
            cache: None, or a step cache such as ``"first-block:0.05"`` or ``"teacache:0.1"``
                (:func:`sora_fast.sampling.parse_cache`): deep features reused per video and CFG half on steps
                where its input barely changed; with two experts, one cache per expert. ``last_timings
                ["evaluations"]`` counts the full DiT evaluations of every prompt (its CFG copies apart).
            denoiser: what runs the DiT at each step (default :meth:`denoiser`: the DiT itself, or both experts),
                e.g. a CFG- or sequence-parallel one from :func:`sora_fast.distributed.make_denoiser`
                (``pipe.denoiser(lambda dit: make_denoiser(dit, mesh))``).
            expand: prompt expansion (:mod:`sora_fast.captions.expand`) before the text encoder: None (the
                prompts as given), ``"schema"`` (:class:`~sora_fast.captions.expand.SchemaExpander` of
                :attr:`caption_stats`; uniform over the grammar without them) or any ``PromptExpander``, e.g.
                ``ChatExpander(base_url, model, stats=pipe.caption_stats)``. The expanded prompts are what the
                model sees; :attr:`last_prompts` holds each prompt's ``Expansion``. A prompt that cannot be
                expanded is kept (its note or error says why), so generation goes on.
            attention_window: None (the DiT's own self-attention: dense unless its ``config.window`` is set) or
                ``(wt, wh, ww)``, 3 ints >= 0: a training-free local window for this call only -- a token attends
                to the tokens of its own video with ``|dt| <= wt``, ``|dh| <= wh``, ``|dw| <= ww`` in latent
                patches (cross-attention stays dense). Half-sizes covering the grid give the dense result.
                Not to be confused with :meth:`generate_long`'s ``window`` (pixel frames per rollout window).
            seed: one int (video i uses ``seed + i``) or one per prompt; the noise of a video depends only
                on its seed and size, so a prompt gives the same video alone or with others.
            init_videos: editing (SDEdit): one entry per prompt, None (generate from noise) or the video to
                edit, a ``(3, T, H, W)`` float tensor in [-1, 1] (what this method returns) or a path to a
                video or image file (read whole, never resized). Its ``(T, H, W)`` must equal the prompt's
                requested size (a ValueError otherwise; leave the size None to take the video's).
            strength: a number for every prompt, or one per prompt, in [0, 1]: how far the edit may move
                from the input. The input is encoded (posterior mean, normalized) to ``x0``; with the
                prompt's shift ``s`` the sampler starts at ``σ0 = s·strength / (1 + (s − 1)·strength)`` from
                ``(1 − σ0)·x0 + σ0·ε`` (``ε`` the seed's noise) and runs the remaining
                ``ceil(strength·steps)`` steps (:func:`sora_fast.sampling.strength_sigmas`). Strength 1 is
                plain generation (the input only sets the size; the result equals generating without
                it); strength 0 runs no step and returns ``vae.decode(vae.encode(input))``. A prompt
                without an init video must have strength 1. Edited and plain prompts of any strengths go
                in one pack, CFG still one forward per step; each equals its run alone.
            conditions: image-to-video, extension and keyframes: one list of :class:`Condition` per prompt
                (``[]`` for none). Every latent frame carries its own noise level: the latent frames a
                condition gives are held at level ``σc = 1 − condition.strength`` (0: kept exactly) from
                ``(1 − σc)·x0 + σc·ε`` and never updated; the others are denoised; the DiT gets per-frame
                timesteps (``1000·σc`` at given frames), CFG still one forward per step, and prompts with
                different conditions and sizes share one pack (each equals its run alone).

                **Encoding and placement.** A condition of ``n = 1 + 4m`` frames (``m = 0``: an image) is
                encoded *on its own* with the causal VAE (posterior mean, normalized), giving ``1 + m`` latent
                frames: the first encodes its first pixel frame alone, each next one 4 frames. Its first
                frame goes to pixel frame ``p = frame`` (``frame + frames`` when negative), which must be a
                multiple of 4, and its latents are written into latent frames ``p/4 .. p/4 + m`` of the
                video. So at ``p = 0`` they are exactly the video's own first latents (an image at frame 0 or
                a clip at the start: extension forward); at ``p > 0`` the condition's first latent (one
                pixel frame) sits at latent frame ``p/4`` -- the one whose frames end at pixel ``p`` -- at
                its RoPE time coordinate, as LTX-Video places conditions, and its next latents line up with
                the video's groups of 4 (``frame=-n``: a clip at the end, extension backward; ``frame=-1``:
                an image as the last keyframe). The returned latents hold the condition's latents exactly at
                those frames, so its frames come back up to the VAE's round trip (exactly
                ``vae.decode(vae.encode(media))`` at ``p = 0``; at ``p > 0`` the decoder sees them in the
                video's context).

                Refused before any work (ValueError / TypeError naming ``conditions[i][j]``): not a list of
                B lists of Condition, media not ``(3, 1 + 4m, H, W)`` in [-1, 1] or of another height /
                width than the prompt's (never resized), more frames than the video, a frame outside
                ``[-frames, frames)`` or not a multiple of 4 after resolving, frames running past the end,
                strength outside [0, 1] or NaN, two conditions giving the same latent frame. Conditions
                combine with editing: given frames are held, the others follow the edit's schedule.
        Returns B float tensors ``(3, frames, height, width)`` in [-1, 1] on the CPU.

        Every argument is checked before any work starts (non-finite ``guidance`` / ``shift`` included), and
        sizes whose lower-bound memory need exceeds the device's are refused
        (:func:`sora_fast.memory.check_generate_memory`); latents or frames with NaN / Inf values raise a
        ValueError with their count.
        """
        if isinstance(prompts, str) or not isinstance(prompts, Sequence) or not prompts:
            raise TypeError("prompts must be a non-empty list of strings")
        b = len(prompts)
        inits = check_init_videos(init_videos, b)
        if sizes is None:
            sizes = [None] * b
        elif isinstance(sizes, (tuple, list)) and len(sizes) == 3 and all(isinstance(v, int) for v in sizes):
            sizes = [tuple(sizes)] * b
        if not isinstance(sizes, (tuple, list)) or len(sizes) != b:
            raise ValueError(f"sizes must be one (frames, height, width) or a list of {b} of them, got {sizes!r}")
        sizes = list(sizes)
        if conditions is not None and not (isinstance(conditions, (list, tuple)) and len(conditions) == b):
            check_conditions(conditions, sizes, b, self.vae.temporal_factor)  # raises, naming what was expected
        for i, (sz, v) in enumerate(zip(sizes, inits)):
            if v is None:
                if sz is None and conditions is not None and isinstance(conditions[i], (list, tuple)) \
                        and conditions[i] and isinstance(conditions[i][0], Condition):
                    m = check_media(conditions[i][0].media, f"conditions[{i}][0].media")
                    sz = (self.DEFAULT_SIZE[0], *m.shape[2:])
                    conditions = list(conditions)   # the media read once: check_conditions below takes it
                    conditions[i] = [dataclasses.replace(conditions[i][0], media=m), *conditions[i][1:]]
                sizes[i] = self.DEFAULT_SIZE if sz is None else sz
                continue
            have = tuple(v.shape[1:])
            self.check_size(have, name=f"init_videos[{i}]")
            if sz is not None and tuple(sz) != have:
                raise ValueError(f"init_videos[{i}] is {have[0]}x{have[1]}x{have[2]} (frames x height x width) but "
                                 f"size {tuple(sz)!r} was requested for prompt {i}; an init video is never "
                                 "resized: pass a video of the requested size, or leave its size None")
            sizes[i] = have
        shapes = [self.latent_shape(s) for s in sizes]
        conds = check_conditions(conditions, [self.check_size(s) for s in sizes], b, self.vae.temporal_factor,
                                 self.dit.config.patch[0])
        seeds = [seed + i for i in range(b)] if isinstance(seed, int) else list(seed)
        if len(seeds) != b or not all(isinstance(s, int) for s in seeds):
            raise ValueError(f"seed must be an int or a list of {b} ints, got {seed!r}")
        # every argument is checked before any work (text encoding, denoising) starts
        from .memory import check_generate_memory
        from .sampling import check_finite, check_sampling, check_strength
        if not all(isinstance(p, str) for p in prompts):
            raise TypeError(f"prompts must be strings, got {[type(p).__name__ for p in prompts]}")
        if not isinstance(negative_prompt, str):
            raise TypeError(f"negative_prompt must be a string, got {type(negative_prompt).__name__}")
        shift = self._shift(shift)
        solver, order = self.solver_settings(solver, order)
        denoiser = self.denoiser() if denoiser is None else denoiser
        check_sampling(steps, guidance, shift, b, solver=solver, order=order, cache=cache, denoiser=denoiser)
        guidances = self._guidance(guidance, guidance_2, denoiser)
        cfg = guidance != 1.0 or guidance_2 not in (None, 1.0)
        attention_window = check_window("attention_window", attention_window)
        expander = self._expander(expand)
        strengths = check_strength(strength, b)
        for i, (v, st) in enumerate(zip(inits, strengths)):
            if v is None and st != 1.0:
                raise ValueError(f"strength {st} for prompt {i} needs an init video (init_videos[{i}] is None; a "
                                 "prompt without one is generated from noise at strength 1)")
        check_generate_memory(self, shapes, [self.check_size(s) for s in sizes], cfg=cfg)
        self.eval()
        dev, timings = self.device, {}

        t0 = time.perf_counter()
        prompts = self._expand(prompts, expander)
        if expander is not None:
            timings["expand"] = time.perf_counter() - t0
        t0 = time.perf_counter()
        text = self.text_encoder.encode(prompts).to(dev)
        uncond = self.text_encoder.encode([negative_prompt] * b).to(dev) if cfg else None
        timings["text"] = time.perf_counter() - t0

        noise = [torch.randn(s, generator=torch.Generator().manual_seed(sd)).to(dev) for s, sd in zip(shapes, seeds)]
        t0 = time.perf_counter()
        vae_dtype = next(self.vae.parameters()).dtype
        raw = [None if v is None or st == 1.0 else self.vae.encode(v[None].to(dev, vae_dtype))
               for v, st in zip(inits, strengths)]                    # strength 1: the input only sets the size
        x0 = [None if z is None else self.vae.normalize_latents(z)[0].to(e.dtype) for z, e in zip(raw, noise)]
        given, levels = [], []
        for cs, e in zip(conds, noise):
            if not cs:
                given.append(None)
                levels.append(None)
                continue
            g = torch.zeros_like(e)
            lv = torch.full((e.shape[1],), float("nan"), dtype=torch.float64)
            for media, first, level in cs:  # each condition encoded on its own, written at its latent frames
                z = self.vae.normalize_latents(self.vae.encode(media[None].to(dev, vae_dtype)))[0].to(e.dtype)
                g[:, first:first + z.shape[1]] = z
                lv[first:first + z.shape[1]] = level
            given.append(g)
            levels.append(lv)
        timings["encode"] = time.perf_counter() - t0
        step_times, last = [], [time.perf_counter()]

        def on_step(i, n):
            now = time.perf_counter()
            step_times.append(now - last[0])
            last[0] = now
            if progress is not None:
                progress(i, n)

        t0, stats = time.perf_counter(), {}
        latents = self._denoise(noise, text, denoiser=denoiser, attention_window=attention_window, steps=steps,
                                guidance=guidances, uncond_text=uncond, shift=shift, progress=on_step,
                                init=x0 if any(z is not None for z in x0) else None, strength=strengths,
                                given=given if any(conds) else None, given_levels=levels if any(conds) else None,
                                solver=solver, order=order, cache=cache, stats=stats)
        timings["denoise"], timings["steps"] = time.perf_counter() - t0, step_times
        timings["evaluations"] = stats["evaluations"]

        t0 = time.perf_counter()
        # strength 0: the input's own latents, decoded without the normalize / denormalize round trip
        videos = [self.vae.decode(r if st == 0.0 and not cs else self.vae.denormalize_latents(z[None]))[0]
                  .float().cpu() for z, r, st, cs in zip(latents, raw, strengths, conds)]
        check_finite(videos, "the decoded videos")
        timings["decode"] = time.perf_counter() - t0
        self.last_timings = timings
        return videos

    # --- persistence ---------------------------------------------------------------------------
    def describe(self) -> dict:
        """JSON description of the three models (enough to rebuild them empty; with two experts ``dit_2`` and
        ``boundary`` too), the sampling settings and the training captions' statistics (``captions``) when the
        pipeline has them."""
        te = self.text_encoder
        if isinstance(te, TinyTextEncoder):
            text = {"kind": "tiny", "config": dataclasses.asdict(te.config)}
        elif isinstance(te, T5TextEncoder):  # by path; an encoder from memory is saved inside (see save)
            inside = te.path is None
            path, tok = ("text_encoder", "tokenizer") if inside else (te.path, te.tokenizer_path)
            text = {"kind": "t5", "path": path, "tokenizer_path": tok, "max_length": te.max_length,
                    "pad_to": te.pad_to, **({"inside": True} if inside else {})}
        else:
            raise TypeError(f"cannot describe a text encoder of type {type(te).__name__}")
        desc = {"format": _FORMAT, "dit": dataclasses.asdict(self.dit.config),
                "vae": dataclasses.asdict(self.vae.config), "text": text}
        if self.dit_2 is not None:
            desc.update(dit_2=dataclasses.asdict(self.dit_2.config), boundary=self.boundary)
        if self.sampling is not None:
            desc["sampling"] = self.sampling
        if self.caption_stats is not None:
            if not isinstance(self.caption_stats, CaptionStats):
                raise TypeError(f"caption_stats must be a CaptionStats or None, got "
                                f"{type(self.caption_stats).__name__}")
            desc["captions"] = self.caption_stats.to_dict()
        return desc

    def save(self, directory: Union[str, os.PathLike]) -> Path:
        """Write ``pipeline.json`` + ``dit``/``vae``/``text.safetensors`` (and ``dit_2.safetensors``, the second
        expert) to ``directory`` atomically (a crash leaves the previous contents or the new ones, never a
        half-written pipeline). ``pipeline.json``, written last, records the size and sha256 of every weight file.
        A frozen T5 is stored by path only (one wrapped from memory, :meth:`T5TextEncoder.from_model`, is written
        inside: ``text_encoder/``, ``tokenizer/``)."""
        from safetensors.torch import save_file

        from ._files import file_records

        final, desc = Path(directory), self.describe()

        def write(tmp: Path):
            parts = {"dit": self.dit, "vae": self.vae}
            if self.dit_2 is not None:
                parts["dit_2"] = self.dit_2
            if desc["text"]["kind"] == "tiny":
                parts["text"] = self.text_encoder
            for name, m in parts.items():
                save_file({k: v.detach().contiguous().cpu() for k, v in m.state_dict().items()},
                          str(tmp / f"{name}.safetensors"))
            names = [f"{name}.safetensors" for name in parts]
            if desc["text"]["kind"] == "t5" and self.text_encoder.path is None:
                self.text_encoder.model.save_pretrained(tmp / "text_encoder", safe_serialization=True)
                self.text_encoder.tokenizer.save_pretrained(tmp / "tokenizer")
                names += [str(f.relative_to(tmp)) for sub in ("text_encoder", "tokenizer")
                          for f in sorted((tmp / sub).rglob("*")) if f.is_file()]
            sizes, hashes = file_records(tmp, names)
            (tmp / _DESC).write_text(json.dumps({**desc, "files": sizes, "sha256": hashes}, indent=2))

        atomic_dir(final, write, _DESC)
        return final

    @classmethod
    def load(cls, directory: Union[str, os.PathLike], *, device=None, verify: bool = True) -> "VideoPipeline":
        """A pipeline written by :meth:`save` (safetensors only; nothing is unpickled).

        Every weight file is checked against the size and sha256 ``pipeline.json`` records (``verify=False``:
        sizes only, with a warning saying so). A directory left missing by a crash in the middle of a save's
        swap is recovered first (with a warning). A missing, truncated or corrupt file, broken JSON, an
        unknown ``format`` or text-encoder ``kind`` or malformed ``captions`` statistics raise FileNotFoundError /
        ValueError naming the file. A pipeline saved without ``captions`` loads with ``caption_stats`` None.
        """
        from .models._convert import load_converted

        d = Path(directory)
        from .integrations.diffusers.wan_pipeline import is_diffusers_pipeline_dir

        if is_diffusers_pipeline_dir(d) and not (d / _DESC).exists():  # a diffusers Wan pipeline as distributed
            return cls.from_diffusers(d, device=device)
        recover_dir(d, _DESC)
        desc_path = d / _DESC
        if not desc_path.is_file():
            raise FileNotFoundError(f"{d} is not a saved pipeline: {desc_path} is missing (and so is the "
                                    "model_index.json of a diffusers Wan pipeline)")
        desc = read_json(desc_path, "a pipeline description (format, dit, vae, text, files, sha256)")
        _check_description(desc, desc_path)
        text_desc = desc["text"]
        parts = ["dit", "vae"] + (["text"] if text_desc["kind"] == "tiny" else [])
        parts += ["dit_2"] if "dit_2" in desc else []
        sizes, hashes = desc.get("files"), desc.get("sha256")
        if sizes is None:
            warnings.warn(f"{str(desc_path)!r} records no file sizes or hashes (saved by an older version): the "
                          "weight files are not checked", stacklevel=2)
        else:
            verify_files(d, sizes, hashes, verify=verify, record=_DESC)
            warn_unchecked("pipeline", d, hashes, verify, stacklevel=2)
        vae_desc = {k: tuple(v) if isinstance(v, list) else v for k, v in desc["vae"].items()}
        models = {}
        for name, build in (("dit", lambda: VideoDiT(DiTConfig(**desc["dit"]))),
                            ("vae", lambda: CausalVAE(VAEConfig(**vae_desc))),
                            ("text", lambda: _text_encoder(text_desc, d)),
                            ("dit_2", lambda: VideoDiT(DiTConfig(**desc["dit_2"])) if "dit_2" in desc else None)):
            try:
                models[name] = build()
            except (TypeError, ValueError, KeyError) as e:
                raise ValueError(f"{str(desc_path)!r}: its {name!r} entry does not describe a valid model "
                                 f"({type(e).__name__}: {e})") from e
        dit, vae, text = models["dit"], models["vae"], models["text"]
        what = {"dit": "the DiT's weights", "vae": "the VAE's weights", "text": "the text encoder's weights",
                "dit_2": "the second expert DiT's weights"}
        for name in parts:
            f = d / f"{name}.safetensors"
            load_converted(models[name], load_safetensors(f, what[name]), str(f))
        try:
            stats = None if desc.get("captions") is None else CaptionStats.from_dict(desc["captions"])
            pipe = cls(dit, vae, text, sampling=desc.get("sampling"), caption_stats=stats, dit_2=models["dit_2"],
                       boundary=desc.get("boundary"))
        except ValueError as e:
            raise ValueError(f"{str(desc_path)!r}: {e}") from e
        return pipe.to(device) if device is not None else pipe
