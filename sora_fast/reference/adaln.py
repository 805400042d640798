"""The adaLN family in plain torch: LayerNorm/RMSNorm + per-sequence modulation, and gated residual + norm +
modulation; the references, their eager fast paths and reference backwards.

Conditioning is an ``(R, D)`` table whose rows the tokens read through the int32 row ids ``seq_ids``
(one row per packed video, or per latent frame, ...; values in ``[0, R)``); with ``seq_ids=None`` the
tables are per token, ``(N, D)``. All math is fp32; outputs keep x's dtype.

    adaln_modulate:        y = N(x) * (1 + scale[seq_ids]) + shift[seq_ids]
    gated_residual_adaln:  x_new = x + gate[seq_ids] * branch   (fp32, rounded to x's dtype)
                           y     = adaln_modulate(x_new, ...)    (from the rounded x_new)

``N`` is LayerNorm (``norm="layer"``) or RMSNorm (``norm="rms"``) over the last dim, then the optional
affine ``* weight + bias``.
"""
from __future__ import annotations

import weakref
from typing import Optional

import torch
import torch.nn.functional as F

from ._common import math_dtype, reference_vjp

NORMS = ("layer", "rms")

__all__ = ["adaln_modulate_ref", "gated_residual_adaln_ref"]


def _rows(table: torch.Tensor, seq_ids: Optional[torch.Tensor], dtype: torch.dtype) -> torch.Tensor:
    return (table if seq_ids is None else table[seq_ids.long()]).to(dtype)


def _normalize(x: torch.Tensor, norm: str, weight, bias, eps: float) -> torch.Tensor:
    if norm == "layer":
        mean = x.mean(dim=-1, keepdim=True)
        var = (x - mean).square().mean(dim=-1, keepdim=True)
        xn = (x - mean) * torch.rsqrt(var + eps)
    else:
        xn = x * torch.rsqrt(x.square().mean(dim=-1, keepdim=True) + eps)
    if weight is not None:
        xn = xn * weight.to(x.dtype)
    if bias is not None:
        xn = xn + bias.to(x.dtype)
    return xn


def adaln_modulate_ref(x, shift, scale, seq_ids, *, norm="layer", weight=None, bias=None, eps=1e-6):
    """Plain-torch ``N(x) * (1 + scale[seq_ids]) + shift[seq_ids]`` in fp32; x's dtype out."""
    md = math_dtype(x.dtype)
    xn = _normalize(x.to(md), norm, weight, bias, eps)
    return (xn * (1 + _rows(scale, seq_ids, md)) + _rows(shift, seq_ids, md)).to(x.dtype)


def gated_residual_adaln_ref(x, branch, gate, shift, scale, seq_ids, *, norm="layer", weight=None, bias=None,
                             eps=1e-6):
    """Plain-torch gated residual then adaLN; returns ``(x_new, y)`` in x's dtype."""
    md = math_dtype(x.dtype)
    x_new = (x.to(md) + _rows(gate, seq_ids, md) * branch.to(md)).to(x.dtype)
    return x_new, adaln_modulate_ref(x_new, shift, scale, seq_ids, norm=norm, weight=weight, bias=bias, eps=eps)


_LAST_BLOCKS: list = [None]     # one (weakref to the ids, their version, rows, answer), replaced whole


def token_blocks(seq_ids: Optional[torch.Tensor], rows: int) -> Optional[int]:
    """``b`` when ``seq_ids`` is ``arange(rows).repeat_interleave(b)`` (each table row read by one contiguous
    block of b tokens, in row order: the per-frame rows of a pack of same-size videos, the per-video rows of
    a batch), else None. One comparison over the ids (an eager path then broadcasts the tables over
    ``(rows, b, D)`` views instead of gathering ``(N, D)`` copies of them); the answer for the last ids
    tensor is remembered while that tensor lives unmodified (a model's layers pass the same one)."""
    if seq_ids is None or rows < 1 or seq_ids.numel() % rows:
        return None
    last = _LAST_BLOCKS[0]
    tracked = not seq_ids.is_inference()
    if tracked and last is not None and last[0]() is seq_ids and last[1:3] == (seq_ids._version, rows):
        return last[3]
    b = seq_ids.numel() // rows
    ids = seq_ids.view(rows, b)
    want = torch.arange(rows, dtype=ids.dtype, device=ids.device)[:, None]
    answer = b if bool((ids == want).all()) else None
    if tracked:
        _LAST_BLOCKS[0] = (weakref.ref(seq_ids), seq_ids._version, rows, answer)
    return answer


def _table(t: Optional[torch.Tensor], seq_ids, block: Optional[int], dtype, one: bool = False):
    """An ``(R, D)`` (or per-token ``(N, D)``) table as the tokens read it, in ``dtype``: an ``(R, 1, D)`` view
    broadcast over blocks, else gathered rows ``(N, D)``. ``one``: ``1 + t``, added on the table's R rows."""
    if t is None:
        return None
    t = t.to(dtype)
    t = 1 + t if one else t
    if seq_ids is None:
        return t
    return t[:, None] if block else t.index_select(0, seq_ids.long())


def _normalize_fast(x, norm, weight, bias, eps):
    d, md = (x.shape[-1],), x.dtype
    w = None if weight is None else weight.to(md)
    if norm == "layer":
        return F.layer_norm(x, d, w, None if bias is None else bias.to(md), eps)
    xn = F.rms_norm(x, d, w, eps)
    return xn if bias is None else xn + bias.to(md)


def _modulated(xn, shift, scale, seq_ids, block):
    """``xn * (1 + scale) + shift`` in xn's dtype (``(N, D)`` out), either table may be None (no term)."""
    md = xn.dtype
    s, sc = _table(shift, seq_ids, block, md), _table(scale, seq_ids, block, md, one=True)
    v = xn.view(-1, block, xn.shape[-1]) if block and (s is not None or sc is not None) else xn
    if sc is None:
        y = v if s is None else v + s
    else:
        y = v * sc if s is None else torch.addcmul(s, v, sc)
    return y.reshape(xn.shape)


def _rows_of(*tables) -> int:
    return next((t.shape[0] for t in tables if t is not None), 0)


def _adaln_eager(x, shift, scale, seq_ids, *, norm="layer", weight=None, bias=None, eps=1e-6, block=None):
    """The eager path of :func:`adaln_modulate`: the reference's math with torch's fused norm kernels
    (``F.layer_norm`` / ``F.rms_norm``) and one ``addcmul`` for the modulation (``1 + scale`` on the table's
    rows), the tables broadcast over blocks of tokens where :func:`token_blocks` finds them. ``shift`` /
    ``scale`` None: that term is absent (the plain norm when both are). ``block``: token_blocks' answer, if
    known (0: not blocks)."""
    block = block if block is not None else token_blocks(seq_ids, _rows_of(shift, scale))
    xn = _normalize_fast(x.to(math_dtype(x.dtype)), norm, weight, bias, eps)
    return _modulated(xn, shift, scale, seq_ids, block).to(x.dtype)


def _gated_eager(x, branch, gate, shift, scale, seq_ids, *, norm="layer", weight=None, bias=None, eps=1e-6,
                 block=None):
    """The eager path of :func:`gated_residual_adaln` (see :func:`_adaln_eager`); ``gate`` None: an ungated add.
    The low-precision residual is not copied to fp32 for the gated add: torch promotes the product and sum."""
    md = math_dtype(x.dtype)
    block = block if block is not None else token_blocks(seq_ids, _rows_of(gate, shift, scale))
    g = _table(gate, seq_ids, block, md)
    if g is None:
        x_new = x.to(md) + branch
    else:
        # a separate multiply and add, as the contract says (an fma would round once, not twice); the
        # product is a fresh tensor, so the add is done in place on it (x + g*b == g*b + x exactly)
        v = branch.view(-1, block, branch.shape[-1]) if block else branch
        x_new = (v * g).add_(x.view(v.shape)).reshape(x.shape)
    x_new = x_new.to(x.dtype)
    return x_new, _adaln_eager(x_new, shift, scale, seq_ids, norm=norm, weight=weight, bias=bias, eps=eps,
                               block=block or 0)


def _modulate_backward_ref(dy, x, shift, scale, seq_ids, **kw):
    g = reference_vjp(adaln_modulate_ref, {"x": x, "shift": shift, "scale": scale, "seq_ids": seq_ids,
                                           "weight": kw.pop("weight"), "bias": kw.pop("bias")},
                      (dy,), ["x", "shift", "scale", "weight", "bias"], **kw)
    return g["x"], g["shift"], g["scale"], g["weight"], g["bias"]


def _gated_backward_ref(dx_new, dy, x, branch, gate, shift, scale, seq_ids, **kw):
    names = ["x", "branch", "gate", "shift", "scale", "weight", "bias"]
    inputs = {"x": x, "branch": branch, "gate": gate, "shift": shift, "scale": scale, "seq_ids": seq_ids,
              "weight": kw.pop("weight"), "bias": kw.pop("bias")}
    g = reference_vjp(gated_residual_adaln_ref, inputs, (dx_new, dy), names, **kw)
    return tuple(g[k] for k in names)
