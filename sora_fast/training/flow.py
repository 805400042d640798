"""Flow matching (rectified flow) on packed spacetime patches: noising, timesteps, loss, sampler schedule.

Convention (Wan2.1, SD3): time ``t ∈ [0, 1]`` runs from data to noise,

    x_t = (1 − t)·x0 + t·ε,          v = dx_t/dt = ε − x0,

and the model predicts ``v`` from ``(x_t, t)``. The noise level σ equals ``t``, so the sampler walks
σ from 1 down to 0 with Euler steps ``x ← x + (σ_next − σ)·v``.

Every sequence of a packed batch has its own timestep: ``t`` is ``(B,)`` and ``t[seq_ids]`` gives the
per-token ``(N,)`` values. Levels may also be per latent frame: ``(F,)``, one per frame of every video,
video by video, and ``t[frame_ids(x)]`` gives the per-token values (:func:`token_levels` does either).
Frames given as conditioning are left out of the loss with a per-token ``mask``.

Larger videos (more tokens) need more noise to destroy the same amount of
signal, so timesteps and sampler schedules are moved towards 1 by the resolution shift
``σ' = s·σ / (1 + (s − 1)·σ)`` (:func:`shift_sigmas`, the one definition shared by training and sampling),
with ``s`` growing with the token count (:func:`resolution_shift`).
"""
from __future__ import annotations

import math
import numbers
from typing import Optional, Union

import torch

from ..packing import PackedVideos, frame_ids, segment_mean

__all__ = [
    "shift_sigmas",
    "resolution_shift",
    "sample_timesteps",
    "add_noise",
    "token_levels",
    "flow_target",
    "sequence_mse",
    "flow_matching_loss",
    "sigma_schedule",
    "BASE_TOKENS",
    "BASE_SHIFT",
    "MAX_TOKENS",
    "MAX_SHIFT",
]

ShiftLike = Union[float, torch.Tensor]

# Anchors of the default resolution shift (see resolution_shift):
# Flux's shift at 256 tokens (exp(0.5), a 256x256 image under an 8x VAE and 2x2 patches) and Wan2.1's
# sampling shift 5.0 at 480p x 81 frames (21 x 30 x 52 = 32,760 tokens with patch (1, 2, 2)).
BASE_TOKENS = 256
BASE_SHIFT = math.exp(0.5)
MAX_TOKENS = 21 * 30 * 52
MAX_SHIFT = 5.0


def _is_number(x) -> bool:
    return isinstance(x, numbers.Real) and not isinstance(x, bool)


def _check_shift(shift: ShiftLike, name: str = "shift") -> None:
    if isinstance(shift, torch.Tensor):
        if not shift.is_floating_point():
            raise TypeError(f"{name} must be a float or a floating-point tensor, got a {shift.dtype} tensor")
        # One host sync; callers pass small (B,) tensors.
        if shift.numel() and not bool(torch.all(torch.isfinite(shift) & (shift > 0))):
            raise ValueError(f"{name} must be finite and > 0 everywhere, got min {shift.min().item():g}")
    elif _is_number(shift):
        if not (math.isfinite(shift) and shift > 0):
            raise ValueError(f"{name} must be a finite number > 0, got {shift!r}")
    else:
        raise TypeError(f"{name} must be a float or a tensor, got {type(shift).__name__}")


def shift_sigmas(sigma: ShiftLike, shift: ShiftLike) -> ShiftLike:
    """The resolution shift ``σ' = s·σ / (1 + (s − 1)·σ)`` (SD3 eq. 23, Wan2.1's ``sample_shift``).

    sigma: float or tensor of any shape with values in [0, 1].
    shift: ``s > 0``; a float or a tensor broadcastable against ``sigma`` (e.g. ``(B, 1)`` against
           ``(B, steps+1)``). ``s = 1`` is the identity, ``s > 1`` moves every σ in (0, 1) towards 1
           (more noise); 0 and 1 are fixed points, and σ ↦ σ' is strictly increasing for every s.
    Returns a float for float inputs, else a tensor of the broadcast shape.
    """
    _check_shift(shift)
    return shift * sigma / (1 + (shift - 1) * sigma)


def resolution_shift(
    num_tokens: Union[int, torch.Tensor],
    *,
    base_tokens: int = BASE_TOKENS,
    base_shift: float = BASE_SHIFT,
    max_tokens: int = MAX_TOKENS,
    max_shift: float = MAX_SHIFT,
) -> ShiftLike:
    """The shift ``s`` for sequences of ``num_tokens`` tokens: a power law through two anchors, clamped.

        s(n) = base_shift · (n / base_tokens) ** k,   k = log(max_shift / base_shift) / log(max_tokens / base_tokens)

    clamped to ``[base_shift, max_shift]`` (n below ``base_tokens`` gets ``base_shift``, above
    ``max_tokens`` gets ``max_shift``). Equivalently, ``mu = log s`` is linear in ``log n``.

    Why this rule: SD3's resolution shift is a power law (``s = sqrt(m/n)``, exponent 1/2), and Flux uses
    ``mu`` linear in ``n`` between 256 and 4096 image tokens. Video spans a 100x wider range of token
    counts than images; a line in ``n`` through Flux's 256-token point and Wan2.1's 480p video point gives
    a shift of only 1.9 to a 1024x1024 image (4096 tokens), whereas the power law gives 3.1 there —
    Flux's own 3.16 — while still meeting both anchors. Clamping keeps the shift bounded for very long
    videos instead of extrapolating. The shifts are in σ' units (not logs): Flux's ``mu`` values
    0.5 / 1.15 are shifts ``exp(0.5) ≈ 1.65`` / ``exp(1.15) ≈ 3.16``.

    num_tokens: int, or an integer / float tensor ``(B,)`` of per-sequence token counts
                (``cu_seqlens.diff()``); every count must be >= 1.
    Returns a float for an int, else a float32 tensor of ``num_tokens``' shape and device.
    """
    for name, v in (("base_tokens", base_tokens), ("max_tokens", max_tokens)):
        if not _is_number(v) or not v >= 1:
            raise ValueError(f"{name} must be a number >= 1, got {v!r}")
    for name, v in (("base_shift", base_shift), ("max_shift", max_shift)):
        if not _is_number(v) or not (math.isfinite(v) and v > 0):
            raise ValueError(f"{name} must be a finite number > 0, got {v!r}")
    if not max_tokens > base_tokens:
        raise ValueError(f"max_tokens must be > base_tokens={base_tokens}, got {max_tokens}")
    k = math.log(max_shift / base_shift) / math.log(max_tokens / base_tokens)
    lo, hi = min(base_shift, max_shift), max(base_shift, max_shift)
    if isinstance(num_tokens, torch.Tensor):
        n = num_tokens.to(torch.float32)
        if n.numel() and not bool(torch.all(n >= 1)):
            raise ValueError(f"num_tokens must be >= 1 everywhere, got min {n.min().item():g}")
        return (base_shift * (n / base_tokens) ** k).clamp(lo, hi)
    if not _is_number(num_tokens) or not num_tokens >= 1:
        raise ValueError(f"num_tokens must be a number >= 1 or a tensor, got {num_tokens!r}")
    return min(max(base_shift * (num_tokens / base_tokens) ** k, lo), hi)


def sample_timesteps(
    n: int,
    *,
    generator: Optional[torch.Generator] = None,
    mean: float = 0.0,
    std: float = 1.0,
    shift: ShiftLike = 1.0,
    device: Optional[Union[str, torch.device]] = None,
) -> torch.Tensor:
    """``n`` training timesteps ``t = shift_sigmas(sigmoid(u), shift)``, ``u ~ N(mean, std²)``.

    The logit-normal distribution (SD3) puts most samples in the middle of [0, 1], where the velocity
    is hardest to predict; the shift then moves them towards noise for large sequences.
    generator: drawn from (on its own device) for reproducibility; the global RNG when None.
    shift:     float, or ``(n,)`` tensor: one shift per sequence (:func:`resolution_shift` of its tokens).
    device:    where the result lives; default the shift tensor's device, else the generator's, else CPU.
    Returns ``(n,)`` float32 in [0, 1].
    """
    if not isinstance(n, numbers.Integral) or isinstance(n, bool) or n < 0:
        raise ValueError(f"n must be an int >= 0, got {n!r}")
    if not _is_number(mean) or not math.isfinite(mean):
        raise ValueError(f"mean must be a finite number, got {mean!r}")
    if not _is_number(std) or not (math.isfinite(std) and std > 0):
        raise ValueError(f"std must be a finite number > 0, got {std!r}")
    _check_shift(shift)
    if isinstance(shift, torch.Tensor) and shift.dim() != 0 and tuple(shift.shape) != (n,):
        raise ValueError(f"shift must be a float, a 0-d tensor or a ({n},) tensor, got shape {tuple(shift.shape)}")
    if device is None:
        device = shift.device if isinstance(shift, torch.Tensor) else (
            generator.device if generator is not None else torch.device("cpu"))
    gen_device = generator.device if generator is not None else device
    u = torch.randn(n, generator=generator, device=gen_device, dtype=torch.float32).to(device)
    t = torch.sigmoid(u * std + mean)
    if isinstance(shift, torch.Tensor):
        shift = shift.to(device=device, dtype=torch.float32)
    return shift_sigmas(t, shift)


def add_noise(x0: torch.Tensor, noise: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    """``x_t = (1 − t)·x0 + t·ε`` for packed tokens.

    x0, noise: ``(N, D)``, same shape (any float dtype; computed in at least fp32, returned in x0's dtype).
    t:         ``(N,)`` or ``(N, 1)`` per-token time, e.g. ``t_seq[seq_ids]`` from a ``(B,)`` ``t_seq``.
    """
    if x0.shape != noise.shape:
        raise ValueError(f"noise must have x0's shape {tuple(x0.shape)}, got {tuple(noise.shape)}")
    if x0.dim() != 2:
        raise ValueError(f"x0 must be 2-D packed tokens (N, D), got shape {tuple(x0.shape)}")
    if t.dim() == 1:
        t = t[:, None]
    if tuple(t.shape) != (x0.shape[0], 1):
        raise ValueError(f"t must be per-token, shape ({x0.shape[0]},) or ({x0.shape[0]}, 1), got {tuple(t.shape)}")
    ct = torch.promote_types(x0.dtype, torch.float32)  # fp32 math for half types, fp64 stays fp64
    t = t.to(ct)
    return ((1 - t) * x0.to(ct) + t * noise.to(ct)).to(x0.dtype)


def token_levels(x: PackedVideos, t: torch.Tensor) -> torch.Tensor:
    """Per-token levels ``(N,)`` of a packed batch from per-video ``(B,)`` or per-frame ``(F,)`` levels
    (``F = int(x.grid[:, 0].sum())``, video by video, frames in time order): ``t[seq_ids]`` or
    ``t[frame_ids(x)]``. When ``B == F`` (every video one frame) both read the same values."""
    b, f = x.num_sequences, x.num_frames
    if t.dim() != 1 or t.shape[0] not in (b, f):
        raise ValueError(f"levels must be ({b},) per video or ({f},) per frame, got shape {tuple(t.shape)}")
    ids = x.seq_ids if t.shape[0] == b else frame_ids(x)
    return t[ids.long().to(t.device)]


def flow_target(x0: torch.Tensor, noise: torch.Tensor) -> torch.Tensor:
    """The velocity target ``v = ε − x0``, ``(N, D)`` in fp32 (fp64 for fp64 inputs)."""
    if x0.shape != noise.shape:
        raise ValueError(f"noise must have x0's shape {tuple(x0.shape)}, got {tuple(noise.shape)}")
    ct = torch.promote_types(torch.promote_types(x0.dtype, noise.dtype), torch.float32)
    return noise.to(ct) - x0.to(ct)


def _check_mask(mask: Optional[torch.Tensor], n: int) -> None:
    if mask is None:
        return
    if not isinstance(mask, torch.Tensor) or mask.dtype != torch.bool or tuple(mask.shape) != (n,):
        raise ValueError(f"mask must be None or a ({n},) bool tensor (True = in the loss), got "
                         f"{getattr(mask, 'dtype', type(mask).__name__)} {tuple(getattr(mask, 'shape', ()))}")


def _check_packed(pred: torch.Tensor, target: torch.Tensor, seq_ids: torch.Tensor, num_seqs: int) -> None:
    if pred.dim() != 2:
        raise ValueError(f"pred_tokens must be 2-D packed tokens (N, D), got shape {tuple(pred.shape)}")
    if target.shape != pred.shape:
        raise ValueError(f"target tokens must have pred_tokens' shape {tuple(pred.shape)}, got {tuple(target.shape)}")
    if seq_ids.dim() != 1 or seq_ids.shape[0] != pred.shape[0]:
        raise ValueError(f"seq_ids must be ({pred.shape[0]},), one id per token, got shape {tuple(seq_ids.shape)}")
    if seq_ids.dtype not in (torch.int32, torch.int64):
        raise TypeError(f"seq_ids must be int32 or int64, got {seq_ids.dtype}")
    if not isinstance(num_seqs, numbers.Integral) or isinstance(num_seqs, bool) or num_seqs < 1:
        raise ValueError(f"num_seqs must be an int >= 1, got {num_seqs!r}")


def sequence_mse(
    pred: torch.Tensor, target: torch.Tensor, seq_ids: torch.Tensor, num_seqs: int,
    mask: Optional[torch.Tensor] = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-sequence mean squared error of packed tokens, in fp32, without a host sync.

    pred, target: ``(N, D)``; seq_ids: ``(N,)`` int, values in ``[0, num_seqs)``.
    mask: optional ``(N,)`` bool, True for the tokens in the loss (False: e.g. conditioning frames; they
          add exactly 0 to the loss and its gradient). None: every token.
    Returns ``(mse (B,), counts (B,))``: the MSE over each sequence's (masked-in) tokens and features, and
    their token count (``B = num_seqs``; a sequence without such tokens has mse 0 and count 0).
    """
    _check_packed(pred, target, seq_ids, num_seqs)
    _check_mask(mask, pred.shape[0])
    per_token = (pred.float() - target.float()).pow(2).mean(dim=1)  # (N,)
    if mask is None:
        return segment_mean(per_token, seq_ids, num_seqs)             # (B,), (B,)
    per_token = torch.where(mask, per_token, torch.zeros_like(per_token))
    ids = seq_ids.long()
    sums = per_token.new_zeros(num_seqs).index_add_(0, ids, per_token)
    counts = per_token.new_zeros(num_seqs).index_add_(0, ids, mask.to(per_token.dtype))
    return sums / counts.clamp_min(1), counts


def flow_matching_loss(
    pred_tokens: torch.Tensor,
    x0_tokens: torch.Tensor,
    noise_tokens: torch.Tensor,
    seq_ids: torch.Tensor,
    num_seqs: int,
    *,
    weighting: str = "sequence",
    mask: Optional[torch.Tensor] = None,
) -> torch.Tensor:
    """Flow-matching loss ``‖pred − (ε − x0)‖²`` on a packed batch; a scalar fp32 tensor.

    pred_tokens, x0_tokens, noise_tokens: ``(N, D)`` (the model's velocity, the clean latents, the noise).
    seq_ids: ``(N,)`` int; num_seqs: B.
    mask: optional ``(N,)`` bool, True for the tokens that are denoised (in the loss). Tokens outside it
          (frames given as conditioning) are left out of every mean below, as if absent: they contribute
          exactly zero loss and zero gradient. None (every token in) is today's loss, bit for bit.
    weighting:
      ``"sequence"`` (default): MSE over each sequence's tokens and features, then the mean over the
          sequences — every video weighs the same whatever its token count, so a batch mixing one long
          video with many images does not train almost only on the video. Empty sequences are left out
          of the mean.
      ``"token"``: the plain mean over all (masked-in) tokens — long videos weigh in proportion to their
          tokens.
    """
    target = flow_target(x0_tokens, noise_tokens)
    if weighting == "sequence":
        mse, counts = sequence_mse(pred_tokens, target, seq_ids, num_seqs, mask)
        present = (counts > 0).to(torch.float32)
        return (mse * present).sum() / present.sum().clamp_min(1)
    if weighting == "token":
        _check_packed(pred_tokens, target, seq_ids, num_seqs)
        _check_mask(mask, pred_tokens.shape[0])
        if mask is None:
            return (pred_tokens.float() - target).pow(2).mean()
        per_token = (pred_tokens.float() - target).pow(2).mean(dim=1)
        per_token = torch.where(mask, per_token, torch.zeros_like(per_token))
        return per_token.sum() / mask.sum().clamp_min(1).to(per_token.dtype)
    raise ValueError(f"weighting must be 'sequence' or 'token', got {weighting!r}")


def sigma_schedule(
    steps: int,
    shift: ShiftLike = 1.0,
    *,
    device: Optional[Union[str, torch.device]] = None,
    dtype: torch.dtype = torch.float32,
) -> torch.Tensor:
    """Noise levels for a ``steps``-step sampler: ``shift_sigmas(linspace(1, 0, steps + 1), shift)``.

    Returns ``(steps + 1,)`` strictly decreasing from exactly 1 to exactly 0 (Euler step i goes from
    ``sigmas[i]`` to ``sigmas[i + 1]``). With a ``(B,)`` tensor of per-sequence shifts it returns
    ``(B, steps + 1)``: one schedule per sequence of a packed batch.
    """
    if not isinstance(steps, numbers.Integral) or isinstance(steps, bool) or steps < 1:
        raise ValueError(f"steps must be an int >= 1, got {steps!r}")
    _check_shift(shift)
    if isinstance(shift, torch.Tensor) and shift.dim() > 1:
        raise ValueError(f"shift must be a float or a (B,) tensor, got shape {tuple(shift.shape)}")
    if device is None and isinstance(shift, torch.Tensor):
        device = shift.device
    # Shift in float64 so the endpoints stay exact and neighbours stay distinct after the cast.
    sigmas = torch.linspace(1.0, 0.0, steps + 1, dtype=torch.float64, device=device)
    if isinstance(shift, torch.Tensor):
        s = shift.to(device=sigmas.device, dtype=torch.float64)
        sigmas = shift_sigmas(sigmas, s[..., None]) if s.dim() == 1 else shift_sigmas(sigmas, s)
    else:
        sigmas = shift_sigmas(sigmas, float(shift))
    return sigmas.to(dtype)
