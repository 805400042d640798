"""Long videos: :class:`LongVideoMixin` gives :class:`~sora_fast.pipeline.VideoPipeline` its autoregressive
rollout in windows (:meth:`~LongVideoMixin.generate_long`), the window plan (:meth:`~LongVideoMixin.plan_long`)
and the per-window seeds (:meth:`~LongVideoMixin.window_seed`). Each window is one call of the pipeline's
sampler over one window's tokens, so memory is flat in the total length."""
from __future__ import annotations

import time
from typing import Callable, Optional, Sequence, Union

import torch

from .captions.expand import PromptExpander
from .memory import check_generate_memory
from .ops._common import check_window
from .sampling import check_finite, check_sampling

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
        self.check_size((1, h, w), name="size")
        self.check_size((window, h, w), name="window")
        self.check_size((frames, h, w), name="frames")
        if frames < window:
            raise ValueError(f"frames must be >= window ({window}), got {frames}; for a shorter video use generate")
        wl, lat = 1 + (window - 1) // tf, 1 + (frames - 1) // tf
        if not 0 < overlap < wl:
            raise ValueError(f"overlap must be in [1, {wl - 1}] latent frames (the window of {window} pixel frames "
                             f"has {wl}), got {overlap}")
        stride = wl - overlap
        n = 1 + -(-(lat - wl) // stride)                               # ceil((lat - overlap) / stride)
        starts = [min(k * stride, lat - wl) for k in range(n)]
        if pt > 1 and n > 1:  # a window of 1 + pt*k latent frames cannot hold given frames per patch frame
            raise ValueError(f"frames={frames} needs {n} windows, but the DiT's temporal patch is {pt}: windows after "
                             "the first are given latent frames, which the sampler takes with a temporal patch of 1 "
                             f"only; use frames={window} (one window) or a DiT with patch (1, ph, pw)")
        return starts

    @torch.no_grad()
    def generate_long(self, prompt: str, frames: int, *, window: int, overlap: int, size=None, steps: int = 30,
                      guidance: float = 5.0, negative_prompt: str = "", shift: Union[float, str, None] = None,
                      seed: int = 0, progress: Optional[Callable[[int, int], None]] = None,
                      denoiser: Optional[Callable] = None, return_latents: bool = False,
                      solver: str = "euler", order: Optional[int] = None, cache=None,
                      expand: Union[str, PromptExpander, None] = None,
                      attention_window: Optional[Sequence[int]] = None):
        """One long video of ``frames`` pixel frames, rolled out in autoregressive windows of ``window`` frames.

        **Design.** The rollout works in latent space. A window is a video of ``window = 1 + 4m`` pixel frames
        (``W = 1 + m`` latent frames), denoised by :func:`sora_fast.sampling.sample` exactly as
        :meth:`generate` denoises one prompt. Window 0 is plain generation. Every next window starts
        ``W − overlap`` latent frames later: its first ``overlap`` latent frames are the previous window's
        last ``overlap`` generated latents, given at level 0 through the per-frame held levels
        (``given=`` / ``given_levels=``: never updated, timestep 0 at those frames, returned exactly), and the
        rest is denoised. The schedule is **synchronous**: every non-given frame of a window is on the same
        level at every step. The last window is not trimmed: it keeps ``W`` latent frames and is moved back
        to end at the video's last latent frame, so it may be given more than ``overlap`` frames (all already
        generated). Windows: ``1 + ceil((L − W) / (W − overlap))`` for ``L = 1 + (frames − 1)/4`` latent
        frames. Note that in windows after the first, latent frame 0 of the window is a 4-frame latent
        (the causal VAE's single-frame latent is only the video's first).

        **Memory** is flat in the total length: each window is one ``sample`` call over one window's
        tokens (no activation of an earlier window is kept; every DiT forward sees one window, CFG doubled);
        only the latents (a list of per-window chunks of new frames, ``L`` latent frames in all) are kept,
        and they are decoded at the end by the causal VAE's chunked decode (one latent frame per chunk, a
        frame cache between chunks), so decode memory does not grow with the length except for the output.

        **Seeds.** Window ``w`` draws its noise from :meth:`window_seed` ``(seed, w)``; window 0 uses ``seed``,
        so ``generate_long(p, window, window=window, ...)`` equals ``generate([p], (window, H, W), seed=seed)``
        and the first window's latents are generate's. A rollout is reproducible from its seed.

        Args:
            prompt: the text.
            frames: total pixel frames, ``1 + 4k`` and ``>= window``.
            window: pixel frames per window, ``1 + 4m`` with ``m >= 1``.
            overlap: latent frames each window takes from the previous one, ``0 < overlap < W``.
            size: ``(height, width)`` in pixels (default: :attr:`DEFAULT_SIZE`'s).
            steps, guidance, negative_prompt, shift, denoiser, solver, order, cache, expand, attention_window: as
                in :meth:`generate`, for every window (the prompt is expanded once).
            seed: an int (see Seeds).
            progress: called with ``(windows done, windows)`` after every window.
            return_latents: also return the list of every window's normalized latents ``(C, W, h, w)``.
        Returns a float tensor ``(3, frames, height, width)`` in [-1, 1] on the CPU (and the list of window
        latents with ``return_latents=True``). Every argument is checked before any work; ``last_timings``
        holds ``text``, ``denoise`` (all windows), ``windows`` (seconds per window), ``decode`` and
        ``evaluations`` (full DiT evaluations over all windows).
        """
        if not isinstance(prompt, str):
            raise TypeError(f"prompt must be a string, got {type(prompt).__name__}")
        if not isinstance(negative_prompt, str):
            raise TypeError(f"negative_prompt must be a string, got {type(negative_prompt).__name__}")
        starts = self.plan_long(frames, window, overlap, size)
        h, w = self.DEFAULT_SIZE[1:] if size is None else tuple(size)
        shift = self._shift(shift)
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
            if have > 0:  # the previous window's last latents, given at level 0
                g = torch.zeros_like(noise)
                g[:, :have] = prev[:, s - prev_start:].to(noise.dtype)
                lv = torch.full((wl,), float("nan"), dtype=torch.float64)
                lv[:have] = 0.0
                given, levels = [g], [lv]
            stats = {}
            (z,) = self._denoise([noise], text, denoiser=denoiser, attention_window=attention_window, steps=steps,
                                 guidance=guidance, uncond_text=uncond, shift=shift, given=given,
                                 given_levels=levels, solver=solver, order=order, cache=cache, stats=stats)
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
        latents = torch.cat(chunks, dim=1)
        video = self.vae.decode(self.vae.denormalize_latents(latents[None]), chunked=True)[0].float().cpu()
        check_finite([video], "the decoded video")
        timings["decode"] = time.perf_counter() - t0
        self.last_timings = timings
        return (video, windows) if return_latents else video
