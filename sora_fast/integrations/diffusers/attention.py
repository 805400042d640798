"""Packed attention on diffusers' ``(B, S, H, D)`` layout: the batch as packed sequences, key-padding
masks as dropped keys (no padding is computed)."""
from __future__ import annotations

from typing import Optional

import torch

from ... import ops
from ...reference._plan import PackPlan

__all__ = ["packed_attention", "MASKED_BIAS"]

MASKED_BIAS = -1e3  # an additive mask value at or below this drops the key (exp underflows to 0 in fp32)

_OFFSETS: dict = {}     # (batch, length, device) -> int32 offsets: made once, never modified
_OFFSETS_KEPT = 64


def _offsets(batch: int, length: int, device) -> torch.Tensor:
    """``(batch + 1,)`` int32 offsets of ``batch`` sequences of ``length`` rows (cached outside torch.compile)."""
    if torch.compiler.is_compiling():
        return torch.arange(0, (batch + 1) * length, length, dtype=torch.int32, device=device)
    key = (batch, length, str(device))
    if key not in _OFFSETS:
        if len(_OFFSETS) >= _OFFSETS_KEPT:
            _OFFSETS.clear()
        with torch.inference_mode(False):
            _OFFSETS[key] = torch.arange(0, (batch + 1) * length, length, dtype=torch.int32, device=device)
    return _OFFSETS[key]


def _dense_plan(batch: int, sq: int, sk: int, device) -> tuple[torch.Tensor, torch.Tensor, Optional[PackPlan]]:
    """Offsets of B query and B key sequences of equal lengths and the plan of that layout, from the host
    sizes (no device read); no plan under torch.compile."""
    cu_q, cu_k = _offsets(batch, sq, device), _offsets(batch, sk, device)
    if torch.compiler.is_compiling():
        return cu_q, cu_k, None
    plan = PackPlan(cu_q, host_cu=range(0, (batch + 1) * sq, sq))
    plan.keys_host(cu_k, host=range(0, (batch + 1) * sk, sk))
    return cu_q, cu_k, plan


def _key_padding(mask: Optional[torch.Tensor], shape: tuple) -> Optional[torch.Tensor]:
    """An SDPA ``attn_mask`` that only hides keys -> ``(B, Sk)`` bool of the kept keys (None: no mask).

    Bool masks keep True; additive masks keep 0 and drop values <= ``MASKED_BIAS`` (diffusers writes
    -10000 or -inf). A row whose every key is dropped by an additive mask keeps all of them, which is
    what the softmax of a constant bias does. A mask that differs between heads or queries, or holds
    other values, raises ValueError: it is not a key-padding mask. The shapes are checked here; the
    values inside :func:`_key_padding_op`, an op that torch.compile keeps whole (no data-dependent
    branch enters a graph, and the checks still run on the real values).
    """
    if mask is None:
        return None
    if not isinstance(mask, torch.Tensor) or not 1 <= mask.dim() <= 4:
        raise ValueError(f"attn_mask must be None or a tensor broadcastable to (B, H, Sq, Sk) = {shape}, "
                         f"got {type(mask).__name__} {tuple(getattr(mask, 'shape', ()))}")
    m = mask.reshape((1,) * (4 - mask.dim()) + tuple(mask.shape))
    try:
        ok = torch.broadcast_shapes(m.shape, shape) == torch.Size(shape)
    except RuntimeError:
        ok = False
    if not ok:
        raise ValueError(f"attn_mask must broadcast to (B, H, Sq, Sk) = {shape}, got {tuple(mask.shape)}")
    return _key_padding_op(m, shape[0], shape[3])


@torch.library.custom_op("sora_fast::diffusers_key_padding", mutates_args=())
def _key_padding_op(mask: torch.Tensor, batch: int, keys: int) -> torch.Tensor:
    """The kept keys ``(batch, keys)`` bool of a 4-D mask broadcastable to ``(batch, H, Sq, keys)``,
    after checking that it is a key-padding mask (see :func:`_key_padding`)."""
    if mask.dtype == torch.bool:
        keep = mask
    else:
        keep, drop = mask == 0, mask <= MASKED_BIAS
        if not bool((keep | drop).all()):
            raise ValueError(f"attn_mask must be a key-padding mask (bool, or additive 0 / <= {MASKED_BIAS:g}); "
                             f"got other additive values, e.g. {mask[~(keep | drop)][0].item():g}")
    first = keep[:, :1, :1, :]
    if (keep.shape[1] > 1 or keep.shape[2] > 1) and not torch.equal(keep, first.expand_as(keep)):
        raise ValueError("attn_mask must be a key-padding mask (the same for every head and query); got one that "
                         f"differs between heads or queries, shape {tuple(mask.shape)}")
    keep = first[:, 0, 0, :].expand(batch, keys)
    if mask.dtype != torch.bool:
        keep = keep | ~keep.any(dim=1, keepdim=True)
    return keep.clone()


@_key_padding_op.register_fake
def _(mask, batch, keys):
    return mask.new_empty((batch, keys), dtype=torch.bool)


def _pack_kept(keep: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The row order that packs the kept keys of every batch element first (in order), then the dropped
    ones, and the key offsets ``(B+2,)``: sequence ``i < B`` is element ``i``'s kept keys, sequence ``B``
    the dropped keys, which no query attends (its query sequence is empty). Shapes do not depend on the
    mask's values (tensor ops only: torch.compile traces it without a data-dependent guard)."""
    flat = keep.reshape(-1)
    n = flat.numel()
    kept = flat.to(torch.int64)
    kept_pos = kept.cumsum(0) - 1
    drop_pos = kept.sum() + (1 - kept).cumsum(0) - 1
    pos = torch.where(flat, kept_pos, drop_pos)                        # where each key goes
    order = torch.empty_like(pos).scatter_(0, pos, torch.arange(n, device=pos.device))
    lengths = keep.sum(dim=1)
    cu_k = torch.cat([lengths.new_zeros(1), lengths.cumsum(0), lengths.new_full((1,), n)]).to(torch.int32)
    return order, cu_k


def packed_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, attn_mask: Optional[torch.Tensor] = None,
                     *, scale: Optional[float] = None, rope_coords: Optional[torch.Tensor] = None,
                     window: Optional[tuple] = None, grid: Optional[torch.Tensor] = None,
                     backend: Optional[str] = None, plan: Optional[PackPlan] = None) -> torch.Tensor:
    """Attention of diffusers' layout q ``(B, Sq, H, D)``, k/v ``(B, Sk, H, D)`` through
    :func:`sora_fast.ops.spacetime_attention`: the batch becomes B packed sequences, a key-padding
    mask drops the hidden keys from the packed keys (no padding is computed). ``rope_coords``
    ``(B*Sq, 3)`` int32 fuses 3D RoPE on q and k (self-attention). ``window`` ``(wt, wh, ww)`` with
    ``grid`` ``(B, 3)`` int32: a local 3D window over each element's t-major (T', H', W') token raster
    (self-attention, no mask). ``plan``: the
    :class:`~sora_fast.reference._plan.PackPlan` of the B query sequences (its offsets, and ``rope_coords``
    when given, are the ones attended with), kept by the caller across layers and calls; without one, an
    unmasked call makes a plan of its own from the shapes. Returns ``(B, Sq, H, Dv)``."""
    b, sq, heads, _ = q.shape
    sk = k.shape[1]
    if k.shape[0] != b or v.shape[:2] != k.shape[:2] or k.shape[2] != heads or v.shape[2] != heads:
        raise ValueError(f"key/value must be (B, Sk, H, D) with query's B={b} and H={heads}, got key "
                         f"{tuple(k.shape)}, value {tuple(v.shape)}")
    keep = _key_padding(attn_mask, (b, heads, sq, sk))
    if (rope_coords is not None or window is not None) and (keep is not None or sk != sq):
        raise ValueError("rope_coords and window need unmasked self-attention (keys = queries)")
    qp = q.reshape(b * sq, heads, -1)
    if keep is None:
        kp, vp = k.reshape(b * sk, heads, -1), v.reshape(b * sk, heads, -1)
        cu_q, cu_k, own = _dense_plan(b, sq, sk, q.device)
        if plan is None:
            plan = own
        else:
            cu_q = plan.cu_seqlens
            plan.keys_host(cu_k, host=range(0, (b + 1) * sk, sk))
        max_k = sk
    else:      # kept keys packed per element, the dropped ones after them in a sequence no query sees
        cu_q, plan = _offsets(b, sq, q.device), None
        order, cu_k = _pack_kept(keep)
        kp, vp = k.reshape(b * sk, heads, -1)[order], v.reshape(b * sk, heads, -1)[order]
        cu_q = torch.cat([cu_q, cu_q[-1:]])                               # (B+2,): an empty last query sequence
        max_k = None
    if rope_coords is not None or window is not None:
        out = ops.spacetime_attention(qp, kp, vp, cu_q, None, sq, scale=scale, window=window, grid=grid,
                                      rope_coords=rope_coords, backend=backend, plan=plan)
    else:
        out = ops.spacetime_attention(qp, kp, vp, cu_q, cu_k, sq, max_k, scale=scale, backend=backend, plan=plan)
    return out.view(b, sq, heads, -1)                                     # (B, Sq, H, Dv)
