"""Long videos: :class:`LongVideoMixin` gives :class:`~sora_fast.pipeline.VideoPipeline` its autoregressive
rollout in windows (:meth:`~LongVideoMixin.generate_long`), the window plan (:meth:`~LongVideoMixin.plan_long`)
and the per-window seeds (:meth:`~LongVideoMixin.window_seed`). Each window is one call of the pipeline's
sampler over one window's tokens, so memory is flat in the total length. Conditions and an init video are
placed in the whole video's latent frames once, and every window takes the part its frames hold."""
from __future__ import annotations

import time
from typing import Callable, Optional, Sequence, Union

import torch

from .captions.expand import PromptExpander
from .conditioning import Condition, Media, check_condition_list, check_media
from .memory import check_generate_memory
from .ops._common import check_window
from .sampling import FRAME_SCHEDULES, check_ar_step, check_finite, check_sampling, check_strength

__all__ = ["LongVideoMixin"]


class LongVideoMixin:
    """The long-video methods of :class:`~sora_fast.pipeline.VideoPipeline` (it supplies ``dit``, ``vae``,
    ``text_encoder``, ``DEFAULT_SIZE``, ``check_size``, ``latent_shape`` and the private helpers used here)."""

    @staticmethod
    def window_seed(seed: int, w: int) -> int:
        """The seed of window ``w`` of a :meth:`generate_long` rollout: ``seed`` itself for window 0 (so the
        first window is ``generate``'s video), then a fixed odd-multiplier mix of ``(seed, w)`` mod 2**64."""
        return seed if w == 0 else (seed + w * 0x9E3779B97F4A7C15) % 2**64

    def plan_long(self, frames: int, window: int, overlap: int, size=None) -> list[int]:
        """Check :meth:`generate_long`'s ``frames`` / ``window`` / ``overlap`` / ``size`` and return the first
        latent frame of every window (see :meth:`generate_long` for the rule); raises ValueError / TypeError
        naming the argument, what was expected and what was received."""
        for name, v in (("frames", frames), ("window", window), ("overlap", overlap)):
            if isinstance(v, bool) or not isinstance(v, int):
                raise TypeError(f"{name} must be an int, got {type(v).__name__} {v!r}")
        h, w = self.DEFAULT_SIZE[1:] if size is None else (size if isinstance(size, (tuple, list)) and len(size) == 2
                                                           else (None, None))
        if h is None:
            raise ValueError(f"size must be (height, width), got {size!r}")
        tf, pt = self.vae.temporal_factor, self.dit.config.patch[0]
        if window < 1 + tf:
            raise ValueError(f"window must be at least {1 + tf} pixel frames (1 + {tf}m, m >= 1: two latent frames "
                             f"or more), got {window}")
        self.check_size((1 + tf * (pt - 1), h, w), name="size")
        self.check_size((window, h, w), name="window")
        self.check_size((frames, h, w), name="frames")
        if frames < window:
            raise ValueError(f"frames must be >= window ({window}), got {frames}; for a shorter video use generate")
        wl, lat = 1 + (window - 1) // tf, 1 + (frames - 1) // tf
        if not 0 < overlap < wl:
            raise ValueError(f"overlap must be in [1, {wl - 1}] latent frames (the window of {window} pixel frames "
                             f"has {wl}), got {overlap}")
        if overlap % pt:  # given frames are whole patch frames; so are the strides and every window's start
            valid = ", ".join(str(v) for v in range(pt, wl, pt))
            raise ValueError(f"overlap must be a multiple of the DiT's temporal patch {pt} (the DiT has one timestep "
                             f"per {pt} latent frames, so a window is given whole patch frames), got {overlap}; "
                             f"valid: {valid}")
        stride = wl - overlap
        n = 1 + -(-(lat - wl) // stride)                               # ceil((lat - overlap) / stride)
        return [min(k * stride, lat - wl) for k in range(n)]

    @torch.no_grad()
    def generate_long(self, prompt: str, frames: int, *, window: int, overlap: int, size=None, steps: int = 30,
                      guidance: float = 5.0, negative_prompt: str = "", shift: Union[float, str, None] = None,
                      seed: int = 0, progress: Optional[Callable[[int, int], None]] = None,
                      denoiser: Optional[Callable] = None, return_latents: bool = False,
                      solver: Optional[str] = None, order: Optional[int] = None, cache=None,
                      expand: Union[str, PromptExpander, None] = None,
                      attention_window: Optional[Sequence[int]] = None,
                      conditions: Optional[Sequence[Condition]] = None, init_video: Optional[Media] = None,
                      strength: float = 1.0, schedule: str = "synchronous", ar_step: Optional[int] = None):
        """One long video of ``frames`` pixel frames, rolled out in autoregressive windows of ``window`` frames.

        **Design.** The rollout works in latent space. A window is a video of ``window = 1 + 4m`` pixel frames
        (``W = 1 + m`` latent frames), denoised by :func:`sora_fast.sampling.sample` exactly as
        :meth:`generate` denoises one prompt. Window 0 is plain generation. Every next window starts
        ``W − overlap`` latent frames later: its first ``overlap`` latent frames are the previous window's
        last ``overlap`` generated latents, given at level 0 through the per-frame held levels
        (``given=`` / ``given_levels=``: never updated, timestep 0 at those frames, returned exactly), and the
        rest is denoised. The last window is not trimmed: it keeps ``W`` latent frames and is moved back
        to end at the video's last latent frame, so it may be given more than ``overlap`` frames (all already
        generated). Windows: ``1 + ceil((L − W) / (W − overlap))`` for ``L = 1 + (frames − 1)/4`` latent
        frames. Note that in windows after the first, latent frame 0 of the window is a 4-frame latent
        (the causal VAE's single-frame latent is only the video's first). With a DiT of temporal patch
        ``pt > 1``, ``W``, ``L`` (the frame rule of :meth:`check_size`) and ``overlap`` are multiples of ``pt``,
        so every window starts on a patch boundary and is given whole patch frames.

        **Schedule.** ``"synchronous"`` (default): every denoised frame of a window is on the same level at
        every step (``steps`` DiT forwards per window). ``"staggered"`` (Diffusion Forcing; SkyReels-V2's
        asynchronous ``ar_step``): within a window, the r-th denoised frame (a DiT frame, counted in time
        order from the first frame after the given ones; given keyframes do not count) runs the same levels
        ``ar_step·r`` steps after the first, so at every step later frames are as noisy or noisier than earlier
        ones, early frames are clean while later ones are still being denoised, and all end at 0; a window
        of ``D`` denoised frames takes ``steps + ar_step·(D − 1)`` forwards
        (:func:`sora_fast.sampling.frame_schedule` states the levels exactly). Each window is denoised to the
        end before the next starts, and hands on clean latents, as SkyReels-V2's long videos do. With
        ``frames == window`` (one window) it is Diffusion Forcing generation of the whole video from
        :meth:`generate`'s noise; ``ar_step=0`` is the synchronous schedule bit for bit.

        **Conditions and editing.** ``conditions`` (image-to-video, extension, keyframes) are placed exactly as
        :meth:`generate` places them, in the latent frames of the *whole* video: each is encoded on its own,
        its first frame goes to pixel frame ``p = frame`` (``frame + frames`` when negative; a multiple of 4) and
        its latents to latent frames ``p/4 ..`` (at ``p > 0`` its first, single-frame latent sits at its RoPE
        time coordinate, latent frame ``p/4``, the one whose frames end at pixel ``p``). Every window is given
        the condition latents that fall in its frames, at ``σc = 1 − strength``, in window coordinates
        (latent frame ``p/4 − start``): a frame 0 image goes to window 0, a keyframe to the window that first
        covers it, a clip across a window boundary to both. A frame the previous window already generated is
        given from it at level 0 (it holds the condition's latents exactly). ``init_video`` (SDEdit of a long
        video, ``(3, frames, H, W)`` or a file) is encoded once (posterior mean, normalized) and every window
        starts from its own frames noised to the level ``strength`` gives (:func:`~sora_fast.sampling.
        strength_sigmas`, with that window's noise), running the remaining steps; strength 1 ignores the
        frames (plain rollout), strength 0 returns ``vae.decode(vae.encode(init_video))`` (no condition). Given
        frames come back unchanged up to the VAE round trip, as in :meth:`generate`.

        **Memory** is flat in the total length: each window is one ``sample`` call over one window's
        tokens (no activation of an earlier window is kept; every DiT forward sees one window, CFG doubled);
        only the latents (a list of per-window chunks of new frames, ``L`` latent frames in all, and those of
        the conditions and the init video) are kept, and they are decoded at the end by the causal VAE's
        chunked decode (one latent frame per chunk, a frame cache between chunks), so decode memory does not
        grow with the length except for the output.

        **Seeds.** Window ``w`` draws its noise from :meth:`window_seed` ``(seed, w)``; window 0 uses ``seed``,
        so ``generate_long(p, window, window=window, ...)`` equals ``generate([p], (window, H, W), seed=seed)``
        (with the same conditions, init video and strength) and the first window's latents are generate's. A
        rollout is reproducible from its seed.

        Args:
            prompt: the text.
            frames: total pixel frames, ``1 + 4k`` and ``>= window``.
            window: pixel frames per window, ``1 + 4m`` with ``m >= 1``.
            overlap: latent frames each window takes from the previous one, ``0 < overlap < W`` (a multiple of
                the DiT's temporal patch).
            size: ``(height, width)`` in pixels; None: the init video's, else the first condition's, else
                :attr:`DEFAULT_SIZE`'s.
            steps, guidance, negative_prompt, shift, denoiser, solver, order, cache, expand, attention_window: as
                in :meth:`generate`, for every window (the prompt is expanded once).
            seed: an int (see Seeds).
            progress: called with ``(windows done, windows)`` after every window.
            return_latents: also return the list of every window's normalized latents ``(C, W, h, w)``.
            conditions: a list of :class:`Condition` (``frame`` a pixel frame of the whole video, negative from
                its end), as one prompt's list in :meth:`generate`.
            init_video: the video to edit, ``(3, frames, H, W)`` float in [-1, 1] or a path (never cut or
                resized), with ``strength`` in [0, 1] (1 without an init video).
            schedule: ``"synchronous"`` or ``"staggered"`` (see Schedule).
            ar_step: with ``"staggered"``, the steps each denoised frame lags the one before, an int >= 0
                (default 1); with ``"synchronous"``, None or 0.
        Returns a float tensor ``(3, frames, height, width)`` in [-1, 1] on the CPU (and the list of window
        latents with ``return_latents=True``). Every argument is checked before any work (generate's checks
        for conditions and init videos, naming ``conditions[j]`` and ``init_video``); ``last_timings`` holds
        ``text``, ``encode`` (conditions, init video), ``denoise`` (all windows), ``windows`` (seconds per
        window), ``decode`` and ``evaluations`` (full DiT evaluations over all windows).
        """
        if not isinstance(prompt, str):
            raise TypeError(f"prompt must be a string, got {type(prompt).__name__}")
        if not isinstance(negative_prompt, str):
            raise TypeError(f"negative_prompt must be a string, got {type(negative_prompt).__name__}")
        init = None if init_video is None else check_media(init_video, "init_video")
        conditions = self._long_condition_media(conditions)
        if size is None:
            size = (tuple(init.shape[2:]) if init is not None else tuple(conditions[0].media.shape[2:]) if conditions
                    else None)
        starts = self.plan_long(frames, window, overlap, size)
        h, w = self.DEFAULT_SIZE[1:] if size is None else tuple(size)
        if init is not None and tuple(init.shape[1:]) != (frames, h, w):
            raise ValueError(f"init_video is {'x'.join(map(str, init.shape[1:]))} (frames x height x width) but the "
                             f"long video is {frames}x{h}x{w}; an init video is never cut or resized: pass a video of "
                             f"{frames} frames at {h}x{w} (or leave size None to take its height and width)")
        placed = check_condition_list(conditions or [], (frames, h, w), self.vae.temporal_factor,
                                      self.dit.config.patch[0], name="conditions", video="the long video")
        (strength,) = check_strength(strength, 1)
        if init is None and strength != 1.0:
            raise ValueError(f"strength {strength} needs an init_video (without one the video is generated from "
                             "noise at strength 1)")
        ar_step = _check_schedule(schedule, ar_step)
        if ar_step and self.dit_2 is not None:
            raise ValueError("schedule='staggered' needs one DiT: this pipeline has two experts (dit_2), picked per "
                             "video by its step timestep, which staggered frames do not share; use 'synchronous'")
        shift = self._shift(shift)
        solver, order = self.solver_settings(solver, order)
        denoiser = self.denoiser() if denoiser is None else denoiser
        check_sampling(steps, guidance, shift, 1, solver=solver, order=order, cache=cache, denoiser=denoiser)
        if isinstance(seed, bool) or not isinstance(seed, int):
            raise ValueError(f"seed must be an int, got {seed!r}")
        if not isinstance(return_latents, bool):
            raise TypeError(f"return_latents must be a bool, got {type(return_latents).__name__}")
        attention_window = check_window("attention_window", attention_window)
        shape = self.latent_shape((window, h, w))
        check_generate_memory(self, [shape], [(frames, h, w)], cfg=guidance != 1.0)  # one window; the whole output
        expander = self._expander(expand)
        self.eval()
        dev, timings = self.device, {}

        t0 = time.perf_counter()
        (prompt,) = self._expand([prompt], expander)
        if expander is not None:
            timings["expand"] = time.perf_counter() - t0
        t0 = time.perf_counter()
        text = self.text_encoder.encode([prompt]).to(dev)
        uncond = self.text_encoder.encode([negative_prompt]).to(dev) if guidance != 1.0 else None
        timings["text"] = time.perf_counter() - t0

        t0 = time.perf_counter()
        raw, x0, held, held_levels = self._long_encode(init, strength, placed, self.latent_shape((frames, h, w)))
        if init is not None or placed:
            timings["encode"] = time.perf_counter() - t0

        wl = shape[1]
        chunks: list[torch.Tensor] = []   # new latent frames of every window, on the device
        windows, window_times, end, evaluations = [], [], 0, 0
        prev, prev_start = None, 0
        t0 = time.perf_counter()
        for k, s in enumerate(starts):
            tw = time.perf_counter()
            noise = torch.randn(shape, generator=torch.Generator().manual_seed(self.window_seed(seed, k))).to(dev)
            have = end - s                                            # latent frames already generated
            given = levels = None
            if have > 0 or placed:  # conditions in this window's frames, the previous window's last latents at 0
                g = torch.zeros_like(noise) if held is None else held[:, s:s + wl].to(noise.dtype).clone()
                lv = (torch.full((wl,), float("nan"), dtype=torch.float64) if held_levels is None
                      else held_levels[s:s + wl].clone())
                if have > 0:
                    g[:, :have] = prev[:, s - prev_start:].to(noise.dtype)
                    lv[:have] = 0.0
                if not bool(torch.isnan(lv).all()):
                    given, levels = [g], [lv]
            stats = {}
            (z,) = self._denoise([noise], text, denoiser=denoiser, attention_window=attention_window, steps=steps,
                                 guidance=guidance, uncond_text=uncond, shift=shift, given=given,
                                 given_levels=levels, solver=solver, order=order, cache=cache, stats=stats,
                                 init=None if x0 is None else [x0[:, s:s + wl]], strength=strength,
                                 ar_step=ar_step)
            evaluations += stats["evaluations"][0]
            chunks.append(z[:, have:])
            prev, prev_start, end = z, s, s + wl
            if return_latents:
                windows.append(z.cpu())
            window_times.append(time.perf_counter() - tw)
            if progress is not None:
                progress(k + 1, len(starts))
        timings["denoise"], timings["windows"] = time.perf_counter() - t0, window_times
        timings["evaluations"] = evaluations

        t0 = time.perf_counter()
        # strength 0 without conditions: the input's own latents, decoded without the normalize round trip
        latents = raw if strength == 0.0 and not placed else self.vae.denormalize_latents(torch.cat(chunks, 1)[None])
        video = self.vae.decode(latents, chunked=True)[0].float().cpu()
        check_finite([video], "the decoded video")
        timings["decode"] = time.perf_counter() - t0
        self.last_timings = timings
        return (video, windows) if return_latents else video

    def _long_condition_media(self, conditions) -> Optional[list]:
        """``conditions`` with the first one's media read (it may set the size); every rule is checked later
        against the whole video (:func:`~sora_fast.conditioning.check_condition_list`)."""
        if conditions is None:
            return None
        if isinstance(conditions, Condition) or not isinstance(conditions, (list, tuple)):
            raise TypeError(f"conditions must be a list of Condition (empty for none; one long video, so not a "
                            f"list per prompt), got {type(conditions).__name__}")
        conditions = list(conditions)
        if conditions and isinstance(conditions[0], Condition):
            c = conditions[0]
            conditions[0] = Condition(check_media(c.media, "conditions[0].media"), c.frame, c.strength)
        return conditions

    def _long_encode(self, init, strength: float, placed: list, shape: tuple):
        """The VAE latents of the init video (``raw``, as encoded, and ``x0``, normalized; None when unused) and
        of the conditions placed in the whole video's latent frames: ``held`` ``(C, L, h, w)`` and
        ``held_levels`` ``(L,)`` float64 (NaN: not given); None without conditions."""
        dev, vae_dtype = self.device, next(self.vae.parameters()).dtype
        raw = x0 = held = held_levels = None
        if init is not None and strength != 1.0:                           # strength 1: the input only sets the size
            raw = self.vae.encode(init[None].to(dev, vae_dtype))
            x0 = self.vae.normalize_latents(raw)[0].float()
        if placed:
            held = torch.zeros(shape, device=dev)
            held_levels = torch.full((shape[1],), float("nan"), dtype=torch.float64)
            for media, first, level in placed:  # each condition encoded on its own, written at its latent frames
                z = self.vae.normalize_latents(self.vae.encode(media[None].to(dev, vae_dtype)))[0].float()
                held[:, first:first + z.shape[1]] = z
                held_levels[first:first + z.shape[1]] = level
        return raw, x0, held, held_levels


def _check_schedule(schedule, ar_step) -> int:
    """``schedule`` / ``ar_step`` of :meth:`LongVideoMixin.generate_long` -> the sampler's ``ar_step``."""
    if schedule not in FRAME_SCHEDULES:
        raise ValueError(f"schedule must be one of {', '.join(map(repr, FRAME_SCHEDULES))}, got {schedule!r}")
    if schedule == "synchronous":
        if ar_step not in (None, 0) or isinstance(ar_step, bool):
            raise ValueError(f"ar_step={ar_step!r} needs schedule='staggered' (the synchronous schedule has every "
                             "frame on one level; leave ar_step None)")
        return 0
    return 1 if ar_step is None else check_ar_step(ar_step)
