"""Packed attention on diffusers' ``(B, S, H, D)`` layout: the batch as packed sequences, key-padding
masks as dropped keys (no padding is computed)."""
from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F

from ... import ops

__all__ = ["packed_attention", "MASKED_BIAS"]

MASKED_BIAS = -1e3  # an additive mask value at or below this drops the key (exp underflows to 0 in fp32)


def _offsets(batch: int, length: int, device) -> torch.Tensor:
    return torch.arange(0, (batch + 1) * length, length, dtype=torch.int32, device=device)


def _key_padding(mask: Optional[torch.Tensor], shape: tuple) -> Optional[torch.Tensor]:
    """An SDPA ``attn_mask`` that only hides keys -> ``(B, Sk)`` bool of the kept keys (None: all).

    Bool masks keep True; additive masks keep 0 and drop values <= ``MASKED_BIAS`` (diffusers writes
    -10000 or -inf). A row whose every key is dropped by an additive mask keeps all of them, which is
    what the softmax of a constant bias does. A mask that differs between heads or queries, or holds
    other values, raises ValueError: it is not a key-padding mask.
    """
    if mask is None:
        return None
    b, h, sq, sk = shape
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
    if m.dtype == torch.bool:
        keep = m
    else:
        keep, drop = m == 0, m <= MASKED_BIAS
        if not bool((keep | drop).all()):
            raise ValueError(f"attn_mask must be a key-padding mask (bool, or additive 0 / <= {MASKED_BIAS:g}); "
                             f"got other additive values, e.g. {m[~(keep | drop)][0].item():g}")
    first = keep[:, :1, :1, :]
    if (keep.shape[1] > 1 or keep.shape[2] > 1) and not torch.equal(keep, first.expand_as(keep)):
        raise ValueError("attn_mask must be a key-padding mask (the same for every head and query); got one that "
                         f"differs between heads or queries, shape {tuple(mask.shape)}")
    keep = first[:, 0, 0, :].expand(b, sk)
    if m.dtype != torch.bool:
        keep = keep | ~keep.any(dim=1, keepdim=True)
    return None if bool(keep.all()) else keep.contiguous()


def packed_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, attn_mask: Optional[torch.Tensor] = None,
                     *, scale: Optional[float] = None, rope_coords: Optional[torch.Tensor] = None,
                     backend: Optional[str] = None) -> torch.Tensor:
    """Attention of diffusers' layout q ``(B, Sq, H, D)``, k/v ``(B, Sk, H, D)`` through
    :func:`sora_fast.ops.spacetime_attention`: the batch becomes B packed sequences, a key-padding
    mask drops the hidden keys from the packed keys (no padding is computed). ``rope_coords``
    ``(B*Sq, 3)`` int32 fuses 3D RoPE on q and k (self-attention). Returns ``(B, Sq, H, Dv)``."""
    b, sq, heads, _ = q.shape
    sk = k.shape[1]
    if k.shape[0] != b or v.shape[:2] != k.shape[:2] or k.shape[2] != heads or v.shape[2] != heads:
        raise ValueError(f"key/value must be (B, Sk, H, D) with query's B={b} and H={heads}, got key "
                         f"{tuple(k.shape)}, value {tuple(v.shape)}")
    keep = _key_padding(attn_mask, (b, heads, sq, sk))
    qp, cu_q = q.reshape(b * sq, heads, -1), _offsets(b, sq, q.device)
    if keep is None:
        kp, vp, cu_k = k.reshape(b * sk, heads, -1), v.reshape(b * sk, heads, -1), _offsets(b, sk, q.device)
    else:
        kp, vp = k[keep], v[keep]                                         # (Nk, H, D): kept keys only
        cu_k = F.pad(keep.sum(dim=1).cumsum(0), (1, 0)).to(torch.int32)
    if rope_coords is not None:
        if keep is not None or sk != sq:
            raise ValueError("rope_coords needs unmasked self-attention (keys = queries)")
        out = ops.spacetime_attention(qp, kp, vp, cu_q, None, sq, scale=scale, rope_coords=rope_coords,
                                      backend=backend)
    else:
        out = ops.spacetime_attention(qp, kp, vp, cu_q, cu_k, sq, sk, scale=scale, backend=backend)
    return out.view(b, sq, heads, -1)                                     # (B, Sq, H, Dv)
