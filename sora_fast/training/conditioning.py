"""The conditioning mix of training (:attr:`TrainConfig.cond_mix`): which latent frames of a video are given,
at which noise levels (:func:`draw_conditioning`), and what a given frame holds (:func:`swap_given`).

**Given frames that do not start the video.** A causal VAE's latents depend on the frames before them, so
the in-context latent of a clip's frame ``j > 0`` is not what sampling gives there: a condition placed at
pixel frame ``p = tf·j`` is encoded *on its own* (:meth:`sora_fast.pipeline.VideoPipeline.generate`), its
first latent a single frame. A model trained only on in-context given frames sees something else at
inference (it shows in extension backward and keyframes). :func:`standalone_latents` encodes every suffix of
a clip on its own, exactly as a condition is encoded, and :func:`swap_given` puts them in place of the given
frames of every run of given frames that starts after frame 0 (a run from frame 0 is the same either way:
causal). Items without them (``LatentItem.alone`` None) train on in-context given frames.
"""
from __future__ import annotations

from typing import Callable, Mapping, Optional, Sequence, Union

import torch

from .flow import sample_timesteps

__all__ = ["COND_MODES", "draw_conditioning", "standalone_latents", "swap_given", "suffix_offset"]

# The conditioning modes of TrainConfig.cond_mix, and the fewest latent frames each needs (a video with
# fewer is trained as text-to-video: every mode keeps at least one frame to denoise).
COND_MODES = {
    "t2v": 1,                # nothing given: text-to-video
    "i2v": 2,                # the first frame given: image-to-video
    "extend_forward": 2,     # the first k frames given
    "extend_backward": 2,    # the last k frames given
    "interpolate": 3,        # the first and the last frame given
    "keyframes": 2,          # a random non-empty proper subset of the frames given
    "diffusion_forcing": 2,  # nothing given; every frame its own independent level
}


def draw_conditioning(frames: Sequence[int], t: torch.Tensor, shift: Union[float, torch.Tensor],
                      mix: Mapping[str, float], cond_frames: int = 1, cond_noise: float = 0.0,
                      generator: Optional[torch.Generator] = None) -> tuple[list[str], torch.Tensor, torch.Tensor]:
    """Per-frame levels and given frames of one step's videos (on the CPU).

    frames: latent frames ``T'`` of each of the B videos; t: ``(B,)`` their timesteps in [0, 1];
    shift: the timestep shift (a float, or ``(B,)`` per video) that Diffusion Forcing's per-frame levels
    are drawn with; mix, cond_frames, cond_noise: as :class:`TrainConfig`'s.
    Returns ``(modes, levels, given)``: the mode each video is trained in (after the too-short rule),
    ``(F,)`` float32 levels (``t`` of the video; ``cond_noise`` at given frames; independent
    logit-normal draws for ``diffusion_forcing``) and ``(F,)`` bool given frames, video by video.
    Every video keeps at least one frame that is not given.

    Draws from ``generator`` only when some mode other than ``t2v`` has a probability > 0, always the same
    amount for the same videos: ``B`` (mode), ``B`` (k / number of keyframes), ``F`` (keyframe choice),
    ``F`` (Diffusion Forcing levels), in that order.
    """
    b = len(frames)
    t = t.detach().to("cpu", torch.float32)
    video = torch.repeat_interleave(torch.arange(b), torch.as_tensor(list(frames), dtype=torch.long))
    levels, given = t[video].clone(), torch.zeros(len(video), dtype=torch.bool)
    names = [m for m in COND_MODES if mix.get(m, 0.0) > 0]
    if names == ["t2v"]:
        return ["t2v"] * b, levels, given
    f = len(video)
    weights = torch.tensor([mix[m] for m in names], dtype=torch.float64)
    cum = torch.cumsum(weights, 0) / weights.sum()
    u_mode = torch.rand(b, generator=generator, dtype=torch.float64)
    u_k = torch.rand(b, generator=generator, dtype=torch.float64)
    u_pick = torch.rand(f, generator=generator)
    frame_shift = (shift.detach().to("cpu", torch.float32)[video] if isinstance(shift, torch.Tensor)
                   and shift.dim() else shift)
    df = sample_timesteps(f, generator=generator, shift=frame_shift, device="cpu")
    picks = torch.searchsorted(cum, u_mode, right=True).clamp_max(len(names) - 1).tolist()
    modes, start = [], 0
    for j, n in enumerate(int(x) for x in frames):
        mode = names[picks[j]]
        if n < COND_MODES[mode]:
            mode = "t2v"
        sl, g = slice(start, start + n), given[start:start + n]
        if mode == "i2v":
            g[0] = True
        elif mode in ("extend_forward", "extend_backward"):
            k = 1 + int(u_k[j] * min(cond_frames, n - 1))
            g[slice(0, k) if mode == "extend_forward" else slice(n - k, n)] = True
        elif mode == "interpolate":
            g[0] = g[-1] = True
        elif mode == "keyframes":
            m = 1 + int(u_k[j] * (n - 1))                  # 1..n-1 frames given
            g[torch.argsort(u_pick[sl], stable=True)[:m]] = True
        elif mode == "diffusion_forcing":
            levels[sl] = df[sl]
        levels[sl] = torch.where(g, torch.full_like(levels[sl], float(cond_noise)), levels[sl])
        modes.append(mode)
        start += n
    return modes, levels, given


def suffix_offset(frames: int, start: int) -> int:
    """Where the standalone suffix from latent frame ``start`` (1 .. frames - 1) begins in
    :func:`standalone_latents`' output for a video of ``frames`` latent frames."""
    return sum(frames - i for i in range(1, start))


def standalone_latents(encode: Callable[[torch.Tensor], torch.Tensor], video: torch.Tensor,
                       temporal_factor: int) -> Optional[torch.Tensor]:
    """Every suffix of ``video`` ``(3, 1 + tf·m, H, W)`` from pixel frame ``tf·j`` (``j = 1 .. m``), encoded
    on its own by ``encode`` (``(1, 3, T, H, W)`` -> normalized ``(1, C, T', H, W)``, as sampling encodes a
    condition), concatenated along time: ``(C, m(m+1)/2, H, W)``; the suffix from latent frame ``j`` is at
    :func:`suffix_offset` ``(1 + m, j)``. None for an image (``m = 0``)."""
    tf = temporal_factor
    t = video.shape[1]
    if (t - 1) % tf:
        raise ValueError(f"video must have 1 + {tf}k frames, got {t}")
    m = (t - 1) // tf
    if m == 0:
        return None
    parts = [encode(video[None, :, tf * j:])[0] for j in range(1, m + 1)]
    for j, z in zip(range(1, m + 1), parts):
        if z.shape[1] != m + 1 - j:
            raise ValueError(f"encode gave {z.shape[1]} latent frames for {t - tf * j} pixel frames; expected "
                             f"{m + 1 - j}")
    return torch.cat(parts, dim=1)


def swap_given(latents: Sequence[torch.Tensor], alone: Sequence[Optional[torch.Tensor]],
               given: torch.Tensor) -> list[torch.Tensor]:
    """``latents`` (per video ``(C, T, H, W)``) with every run of given frames (``given`` ``(F,)`` bool, video by
    video) that starts at latent frame ``j0 > 0`` replaced by the standalone suffix from ``j0``
    (:func:`standalone_latents`, per video or None to keep the in-context latents). Videos without such a
    run come back as the same tensors."""
    out, start = [], 0
    for z, a in zip(latents, alone):
        n = z.shape[1]
        g = given[start:start + n].tolist()
        start += n
        runs = [j for j in range(1, n) if g[j] and not g[j - 1]]
        if a is None or not runs:
            out.append(z)
            continue
        z = z.clone()
        for j0 in runs:
            j1 = j0
            while j1 < n and g[j1]:
                j1 += 1
            o = suffix_offset(n, j0)
            z[:, j0:j1] = a[:, o:o + (j1 - j0)].to(z.device, z.dtype)
        out.append(z)
    return out
