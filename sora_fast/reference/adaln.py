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


def _rows_fast(table: torch.Tensor, seq_ids: Optional[torch.Tensor], dtype: torch.dtype) -> torch.Tensor:
    table = table.to(dtype)
    return table if seq_ids is None else table.index_select(0, seq_ids.long())


def _adaln_eager(x, shift, scale, seq_ids, *, norm="layer", weight=None, bias=None, eps=1e-6):
    """The eager path of :func:`adaln_modulate`: the reference's math with torch's fused norm kernels
    (``F.layer_norm`` / ``F.rms_norm``) and one ``addcmul`` for the modulation, a few ops instead of a
    dozen per call."""
    md = math_dtype(x.dtype)
    d = (x.shape[-1],)
    w = None if weight is None else weight.to(md)
    if norm == "layer":
        xn = F.layer_norm(x.to(md), d, w, None if bias is None else bias.to(md), eps)
    else:
        xn = F.rms_norm(x.to(md), d, w, eps)
        if bias is not None:
            xn = xn + bias.to(md)
    return torch.addcmul(_rows_fast(shift, seq_ids, md), xn, 1 + _rows_fast(scale, seq_ids, md)).to(x.dtype)


def _gated_eager(x, branch, gate, shift, scale, seq_ids, *, norm="layer", weight=None, bias=None, eps=1e-6):
    """The eager path of :func:`gated_residual_adaln` (see :func:`_adaln_eager`)."""
    md = math_dtype(x.dtype)
    # a separate multiply and add, as the contract says (an fma would round once, not twice)
    x_new = (x.to(md) + _rows_fast(gate, seq_ids, md) * branch.to(md)).to(x.dtype)
    return x_new, _adaln_eager(x_new, shift, scale, seq_ids, norm=norm, weight=weight, bias=bias, eps=eps)


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
