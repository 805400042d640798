"""Flow-matching generation on packed latents: Euler steps with the resolution shift and packed CFG.

Convention (Wan / SD3 rectified flow): ``x_σ = (1 − σ)·x0 + σ·ε``, the DiT predicts ``v = ε − x0`` at
timestep ``1000·σ``, and one Euler step from σ to σ' is ``x ← x + (σ' − σ)·v``. σ runs from 1 (noise)
to 0 (data) on the shifted schedule ``σ' = sσ / (1 + (s − 1)σ)``.

Everything is packed: several prompts at different resolutions and durations denoise in one stream,
and classifier-free guidance puts the conditional and unconditional copies of every video in the same
pack, so each step is **one** DiT forward. Because timesteps are per sequence, each video may use its
own shift (``shift="auto"``: from its token count), which a padded batch could not do.
"""
from __future__ import annotations

import math
from typing import Callable, Optional, Sequence, Union

import torch

from .packing import PackedSequences, PackedVideos, pack_sequences, pack_videos
from .training.flow import resolution_shift, sigma_schedule

__all__ = ["concat_text", "sample_euler", "check_finite"]

DenoiseFn = Callable[[PackedVideos, torch.Tensor, PackedSequences], torch.Tensor]


def concat_text(*packs: PackedSequences) -> PackedSequences:
    """Packed text streams one after another: sequence order ``packs[0]``'s, then ``packs[1]``'s, ..."""
    seqs = [s for p in packs for s in p.unpack(p.tokens)]
    return pack_sequences(seqs)


def _check_shift(shift, n: int) -> list:
    if isinstance(shift, str):
        if shift != "auto":
            raise ValueError(f"shift must be a positive number, a list of them or 'auto', got {shift!r}")
        return [shift] * n
    values = list(shift) if isinstance(shift, (list, tuple)) else [shift] * n
    if len(values) != n:
        raise ValueError(f"shift has {len(values)} values, expected one per video ({n})")
    for i, s in enumerate(values):
        if isinstance(s, bool) or not isinstance(s, (int, float)) or not s > 0 or not math.isfinite(s):
            raise ValueError(f"shift[{i}] must be a positive number, finite, got {s!r}")
    return [float(s) for s in values]


@torch.no_grad()
def sample_euler(denoise: DenoiseFn, noise: Sequence[torch.Tensor], text: PackedSequences, *,
                 patch: Sequence[int] = (1, 2, 2), steps: int = 30, guidance: float = 5.0,
                 uncond_text: Optional[PackedSequences] = None,
                 shift: Union[float, Sequence[float], str] = 5.0,
                 progress: Optional[Callable[[int, int], None]] = None) -> list[torch.Tensor]:
    """Denoise a list of noise latents with flow-matching Euler steps, all videos in one pack.

    Args:
        denoise: ``f(x: PackedVideos, timesteps (B,), text: PackedSequences) -> (N, C·pt·ph·pw)`` velocity
            tokens, e.g. a :class:`sora_fast.models.VideoDiT`.
        noise: B latents ``(C, T, H, W)`` of standard normal noise, any sizes divisible by ``patch``.
        text: packed conditional text, B sequences.
        guidance: CFG scale g; ``v = v_u + g·(v_c − v_u)``. ``g == 1`` or ``uncond_text=None`` runs the
            conditional branch alone; otherwise both branches go in one pack of 2B videos.
        uncond_text: packed unconditional text (e.g. the empty prompt), B sequences.
        shift: the schedule shift s, one for all, one per video, or ``"auto"`` (per video, from its
            token count: :func:`sora_fast.training.flow.resolution_shift`).
        steps: Euler steps (DiT forwards).
        progress: called as ``progress(step, steps)`` after every step.

    Returns the B denoised latents ``(C, T, H, W)`` in the noise's dtype. Non-finite arguments are refused
    up front; latents that end with NaN / Inf values (a diverged or corrupt model) raise a ValueError with
    their count instead of being returned.
    """
    if not isinstance(steps, int) or isinstance(steps, bool) or steps < 1:
        raise ValueError(f"steps must be a positive int, got {steps!r}")
    if isinstance(guidance, bool) or not isinstance(guidance, (int, float)):
        raise TypeError(f"guidance must be a number, got {type(guidance).__name__}")
    if not math.isfinite(guidance):
        raise ValueError(f"guidance must be a finite number, got {guidance!r}")
    x = pack_videos(list(noise), patch=tuple(patch))
    b = x.num_sequences
    if text.num_sequences != b:
        raise ValueError(f"text has {text.num_sequences} sequences, expected one per video ({b})")
    cfg = uncond_text is not None and guidance != 1.0
    if cfg and uncond_text.num_sequences != b:
        raise ValueError(f"uncond_text has {uncond_text.num_sequences} sequences, expected one per video ({b})")

    shifts = _check_shift(shift, b)
    shifts = [resolution_shift(n) if s == "auto" else s for s, n in zip(shifts, x.seqlens)]
    sigmas = torch.stack([sigma_schedule(steps, s, dtype=torch.float64) for s in shifts])  # (B, steps+1)

    if cfg:  # the conditional copies, then the unconditional ones, in one stream
        both = pack_videos(list(noise) * 2, patch=tuple(patch))
        text_in = concat_text(text, uncond_text)
    else:
        both, text_in = x, text
    seq_ids = x.seq_ids.long()
    md = torch.promote_types(x.tokens.dtype, torch.float32)                    # state in >= fp32
    tokens = x.tokens.to(md)                                                   # (N, D)
    n = tokens.shape[0]
    for i in range(steps):
        sig = sigmas[:, i]                                                     # (B,)
        t = (sig * 1000).to(md).to(tokens.device)
        inp = torch.cat([tokens, tokens]) if cfg else tokens
        v = denoise(both.with_tokens(inp.to(x.tokens.dtype)), torch.cat([t, t]) if cfg else t, text_in)
        v = v.to(md)                                                           # (N or 2N, D)
        if cfg:
            v_c, v_u = v[:n], v[n:]
            v = v_u + guidance * (v_c - v_u)
        dsig = (sigmas[:, i + 1] - sig).to(md).to(tokens.device)               # (B,)
        tokens = tokens + dsig[seq_ids, None] * v
        if progress is not None:
            progress(i + 1, steps)
    out = x.unpack(tokens.to(x.tokens.dtype))
    check_finite(out, f"the latents after {steps} denoising steps")
    return out


def check_finite(tensors: Sequence[torch.Tensor], what: str, names: Optional[Sequence[str]] = None) -> None:
    """Raise a ValueError naming the count of NaN / Inf values of each tensor that has any (never let them
    through to become flat grey frames)."""
    bad = []
    for i, t in enumerate(tensors):
        finite = torch.isfinite(t)
        if not bool(finite.all()):
            n_nan = int(torch.isnan(t).sum())
            n_bad = int((~finite).sum())
            label = names[i] if names is not None else f"video {i}"
            bad.append(f"{label}: {n_bad} of {t.numel()} values ({n_nan} NaN, {n_bad - n_nan} Inf)")
    if bad:
        raise ValueError(f"{what} are not finite -- " + "; ".join(bad)
                         + " (the model diverged or its weights are corrupt; nothing was written)")
