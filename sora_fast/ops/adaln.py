"""The adaLN family: LayerNorm/RMSNorm + per-sequence modulation, and gated residual + norm + modulation.

Per-sequence conditioning is a ``(B, D)`` table indexed by ``seq_ids`` (one row per packed video);
with ``seq_ids=None`` the tables are per token, ``(N, D)``. All math is fp32; outputs keep x's dtype.

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

from . import _dispatch
from ._common import (check_float, check_index_values, check_positive, check_tensor, empty_grad, math_dtype,
                      reference_vjp)

NORMS = ("layer", "rms")

__all__ = ["adaln_modulate_ref", "gated_residual_adaln_ref", "adaln_modulate", "gated_residual_adaln",
           "AdaLNModulate", "GatedResidualAdaLN"]


# --- reference ---------------------------------------------------------------------------------
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


# --- validation ---------------------------------------------------------------------------------
def _validate(x, tables: dict, seq_ids, norm, weight, bias, eps, extra: Optional[dict] = None):
    check_float("x", x, ndim=2, layout="(N, D)")
    n, d = x.shape
    for name, t in (extra or {}).items():
        check_float(name, t, ndim=2, layout="(N, D)", device=x.device)
        if t.shape != x.shape:
            raise ValueError(f"{name} must have x's shape ({n}, {d}), got {tuple(t.shape)}")
    if seq_ids is not None:
        check_tensor("seq_ids", seq_ids, ndim=1, layout="(N,)", dtypes=(torch.int32,), device=x.device)
        if seq_ids.shape[0] != n:
            raise ValueError(f"seq_ids must have one entry per row of x ({n}), got {seq_ids.shape[0]}")
    rows = None
    for name, t in tables.items():
        check_float(name, t, ndim=2, layout="(B, D) or (N, D)", device=x.device)
        if t.shape[1] != d:
            raise ValueError(f"{name} must have x's hidden size {d} in dim 1, got shape {tuple(t.shape)}")
        if seq_ids is None and t.shape[0] != n:
            raise ValueError(f"{name} must be per token, shape ({n}, {d}), when seq_ids is None; "
                             f"got {tuple(t.shape)} (pass seq_ids for per-sequence (B, D) tables)")
        if rows is not None and t.shape[0] != rows[1]:
            raise ValueError(f"{name} must have {rows[0]}'s number of rows ({rows[1]}), got {t.shape[0]}")
        rows = rows or (name, t.shape[0])
    if norm not in NORMS:
        raise ValueError(f"norm must be one of {NORMS}, got {norm!r}")
    for name, t in (("weight", weight), ("bias", bias)):
        if t is not None:
            check_float(name, t, ndim=1, layout="(D,)", device=x.device)
            if t.shape[0] != d:
                raise ValueError(f"{name} must have shape ({d},), got {tuple(t.shape)}")
    check_positive("eps", eps)


def _check_values(seq_ids, table):
    if seq_ids is not None:
        check_index_values("seq_ids", seq_ids, table.shape[0], "rows of the per-sequence tables")


def _op_kernel(op, backend, x, tables: dict, seq_ids, norm, weight, bias, eps, grads: Optional[dict] = None,
               extra: Optional[dict] = None):
    """The checks of the public functions, again inside the torch.library ops, which callers of
    ``torch.ops.sora_fast.*`` (and torch.compile, opcheck) reach directly: shapes, dtypes and devices
    (cheap), and the range of seq_ids against the tables (every table has the same number of rows, so
    one bound), unless the kernel checks that range itself before its launch (``checks_index_values``:
    the cuda backend, in a device-to-host copy it needs anyway). Returns the kernel."""
    _validate(x, tables, seq_ids, norm, weight, bias, eps, extra)
    for name, g in (grads or {}).items():
        if g is not None:
            check_float(name, g, ndim=2, layout="(N, D)", device=x.device)
            if g.shape != x.shape:
                raise ValueError(f"{name} must have x's shape {tuple(x.shape)}, got {tuple(g.shape)}")
    kernel = _dispatch.get_kernel(op, backend, x.device)
    if not getattr(kernel, "checks_index_values", False):
        _check_values(seq_ids, next(iter(tables.values())))
    return kernel


def _none_if_absent(g, present):
    return g if present else None


# --- adaln_modulate op ---------------------------------------------------------------------------
@torch.library.custom_op("sora_fast::adaln_modulate", mutates_args=())
def _modulate_op(x: torch.Tensor, shift: torch.Tensor, scale: torch.Tensor, seq_ids: Optional[torch.Tensor],
                 norm: str, weight: Optional[torch.Tensor], bias: Optional[torch.Tensor], eps: float,
                 backend: str) -> torch.Tensor:
    kernel = _op_kernel("adaln_modulate", backend, x, {"shift": shift, "scale": scale}, seq_ids, norm, weight,
                        bias, eps)
    return kernel(x, shift, scale, seq_ids, norm=norm, weight=weight, bias=bias, eps=eps)


@_modulate_op.register_fake
def _(x, shift, scale, seq_ids, norm, weight, bias, eps, backend):
    return torch.empty_like(x)


@torch.library.custom_op("sora_fast::adaln_modulate_backward", mutates_args=())
def _modulate_bwd_op(dy: torch.Tensor, x: torch.Tensor, shift: torch.Tensor, scale: torch.Tensor,
                     seq_ids: Optional[torch.Tensor], norm: str, weight: Optional[torch.Tensor],
                     bias: Optional[torch.Tensor], eps: float, backend: str
                     ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    kernel = _op_kernel("adaln_modulate_backward", backend, x, {"shift": shift, "scale": scale}, seq_ids, norm,
                        weight, bias, eps, grads={"dy": dy})
    dx, dshift, dscale, dweight, dbias = kernel(dy, x, shift, scale, seq_ids, norm=norm, weight=weight,
                                                bias=bias, eps=eps)
    return dx, dshift, dscale, empty_grad(dweight, x), empty_grad(dbias, x)


@_modulate_bwd_op.register_fake
def _(dy, x, shift, scale, seq_ids, norm, weight, bias, eps, backend):
    return (torch.empty_like(x), torch.empty_like(shift), torch.empty_like(scale),
            torch.empty_like(weight) if weight is not None else x.new_empty(0),
            torch.empty_like(bias) if bias is not None else x.new_empty(0))


def _modulate_setup(ctx, inputs, output):
    x, shift, scale, seq_ids, norm, weight, bias, eps, backend = inputs
    ctx.save_for_backward(x, shift, scale, seq_ids, weight, bias)
    ctx.args = (norm, eps, backend)


def _modulate_backward(ctx, dy):
    x, shift, scale, seq_ids, weight, bias = ctx.saved_tensors
    norm, eps, backend = ctx.args
    dx, dshift, dscale, dweight, dbias = _modulate_bwd_op(dy, x, shift, scale, seq_ids, norm, weight, bias, eps,
                                                          backend)
    return (dx, dshift, dscale, None, None, _none_if_absent(dweight, weight is not None),
            _none_if_absent(dbias, bias is not None), None, None)


_modulate_op.register_autograd(_modulate_backward, setup_context=_modulate_setup)


def _modulate_backward_ref(dy, x, shift, scale, seq_ids, **kw):
    g = reference_vjp(adaln_modulate_ref, {"x": x, "shift": shift, "scale": scale, "seq_ids": seq_ids,
                                           "weight": kw.pop("weight"), "bias": kw.pop("bias")},
                      (dy,), ["x", "shift", "scale", "weight", "bias"], **kw)
    return g["x"], g["shift"], g["scale"], g["weight"], g["bias"]


_dispatch.register_kernel("adaln_modulate", "torch", adaln_modulate_ref)
_dispatch.register_kernel("adaln_modulate_backward", "torch", _modulate_backward_ref)
_dispatch.register_kernel("adaln_modulate", "cuda", "sora_fast.ops._cuda:adaln_modulate")
_dispatch.register_kernel("adaln_modulate_backward", "cuda", "sora_fast.ops._cuda:adaln_modulate_backward")


# --- gated_residual_adaln op ---------------------------------------------------------------------
@torch.library.custom_op("sora_fast::gated_residual_adaln", mutates_args=())
def _gated_op(x: torch.Tensor, branch: torch.Tensor, gate: torch.Tensor, shift: torch.Tensor,
              scale: torch.Tensor, seq_ids: Optional[torch.Tensor], norm: str, weight: Optional[torch.Tensor],
              bias: Optional[torch.Tensor], eps: float, backend: str) -> tuple[torch.Tensor, torch.Tensor]:
    kernel = _op_kernel("gated_residual_adaln", backend, x, {"gate": gate, "shift": shift, "scale": scale}, seq_ids,
                        norm, weight, bias, eps, extra={"branch": branch})
    return kernel(x, branch, gate, shift, scale, seq_ids, norm=norm, weight=weight, bias=bias, eps=eps)


@_gated_op.register_fake
def _(x, branch, gate, shift, scale, seq_ids, norm, weight, bias, eps, backend):
    return torch.empty_like(x), torch.empty_like(x)


@torch.library.custom_op("sora_fast::gated_residual_adaln_backward", mutates_args=())
def _gated_bwd_op(dx_new: Optional[torch.Tensor], dy: Optional[torch.Tensor], x: torch.Tensor,
                  branch: torch.Tensor, gate: torch.Tensor, shift: torch.Tensor, scale: torch.Tensor,
                  seq_ids: Optional[torch.Tensor], norm: str, weight: Optional[torch.Tensor],
                  bias: Optional[torch.Tensor], eps: float, backend: str
                  ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor,
                             torch.Tensor]:
    kernel = _op_kernel("gated_residual_adaln_backward", backend, x, {"gate": gate, "shift": shift, "scale": scale},
                        seq_ids, norm, weight, bias, eps, grads={"dx_new": dx_new, "dy": dy}, extra={"branch": branch})
    dx, dbranch, dgate, dshift, dscale, dweight, dbias = kernel(
        dx_new, dy, x, branch, gate, shift, scale, seq_ids, norm=norm, weight=weight, bias=bias, eps=eps)
    return dx, dbranch, dgate, dshift, dscale, empty_grad(dweight, x), empty_grad(dbias, x)


@_gated_bwd_op.register_fake
def _(dx_new, dy, x, branch, gate, shift, scale, seq_ids, norm, weight, bias, eps, backend):
    return (torch.empty_like(x), torch.empty_like(branch), torch.empty_like(gate), torch.empty_like(shift),
            torch.empty_like(scale), torch.empty_like(weight) if weight is not None else x.new_empty(0),
            torch.empty_like(bias) if bias is not None else x.new_empty(0))


def _gated_setup(ctx, inputs, output):
    x, branch, gate, shift, scale, seq_ids, norm, weight, bias, eps, backend = inputs
    ctx.save_for_backward(x, branch, gate, shift, scale, seq_ids, weight, bias)
    ctx.args = (norm, eps, backend)


def _gated_backward(ctx, dx_new, dy):
    x, branch, gate, shift, scale, seq_ids, weight, bias = ctx.saved_tensors
    norm, eps, backend = ctx.args
    dx, dbranch, dgate, dshift, dscale, dweight, dbias = _gated_bwd_op(
        dx_new, dy, x, branch, gate, shift, scale, seq_ids, norm, weight, bias, eps, backend)
    return (dx, dbranch, dgate, dshift, dscale, None, None, _none_if_absent(dweight, weight is not None),
            _none_if_absent(dbias, bias is not None), None, None)


_gated_op.register_autograd(_gated_backward, setup_context=_gated_setup)


def _gated_backward_ref(dx_new, dy, x, branch, gate, shift, scale, seq_ids, **kw):
    names = ["x", "branch", "gate", "shift", "scale", "weight", "bias"]
    inputs = {"x": x, "branch": branch, "gate": gate, "shift": shift, "scale": scale, "seq_ids": seq_ids,
              "weight": kw.pop("weight"), "bias": kw.pop("bias")}
    g = reference_vjp(gated_residual_adaln_ref, inputs, (dx_new, dy), names, **kw)
    return tuple(g[k] for k in names)


_dispatch.register_kernel("gated_residual_adaln", "torch", gated_residual_adaln_ref)
_dispatch.register_kernel("gated_residual_adaln_backward", "torch", _gated_backward_ref)
_dispatch.register_kernel("gated_residual_adaln", "cuda", "sora_fast.ops._cuda:gated_residual_adaln")
_dispatch.register_kernel("gated_residual_adaln_backward", "cuda", "sora_fast.ops._cuda:gated_residual_adaln_backward")


# --- public API ---------------------------------------------------------------------------------
def adaln_modulate(x: torch.Tensor, shift: torch.Tensor, scale: torch.Tensor, seq_ids: Optional[torch.Tensor],
                   *, norm: str = "layer", weight: Optional[torch.Tensor] = None,
                   bias: Optional[torch.Tensor] = None, eps: float = 1e-6,
                   backend: Optional[str] = None) -> torch.Tensor:
    """``y = N(x) * (1 + scale[seq_ids]) + shift[seq_ids]``.

    Args:
        x: ``(N, D)`` packed tokens, fp16/bf16/fp32.
        shift, scale: ``(B, D)`` per-sequence tables (with ``seq_ids``) or ``(N, D)`` per-token tables
            (``seq_ids=None``); any float dtype.
        seq_ids: ``(N,)`` int32 sequence of each token, values in ``[0, B)``, or None.
        norm: ``"layer"`` (LayerNorm) or ``"rms"`` (RMSNorm), over the last dim, with ``eps``.
        weight, bias: optional ``(D,)`` affine of the norm.

    Returns y ``(N, D)`` in x's dtype (N = 0 gives an empty y). Differentiable in x, shift, scale,
    weight, bias; with ``backend="cuda"`` every gradient comes from the CUDA kernels, the per-sequence
    ones reduced in a fixed order (bitwise reproducible).

    Layouts: any strides work on every backend. ``backend="cuda"`` reads operands whose last dim has
    unit stride in place (any row stride, e.g. a column slice of a wider buffer) and copies any other
    layout (e.g. a transposed tensor) to contiguous first: one extra read and write of that operand.
    """
    _validate(x, {"shift": shift, "scale": scale}, seq_ids, norm, weight, bias, eps)
    backend = _dispatch.resolve_backend("adaln_modulate", backend, x.device)
    if _dispatch.eager_reference(backend):
        _check_values(seq_ids, shift)
        return _adaln_eager(x, shift, scale, seq_ids, norm=norm, weight=weight, bias=bias, eps=float(eps))
    return _modulate_op(x, shift, scale, seq_ids, norm, weight, bias, float(eps), backend)


def gated_residual_adaln(x: torch.Tensor, branch: torch.Tensor, gate: torch.Tensor, shift: torch.Tensor,
                         scale: torch.Tensor, seq_ids: Optional[torch.Tensor], *, norm: str = "layer",
                         weight: Optional[torch.Tensor] = None, bias: Optional[torch.Tensor] = None,
                         eps: float = 1e-6, backend: Optional[str] = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Gated residual add, then adaLN of the result, in one pass.

    ``x_new = x + gate[seq_ids] * branch`` (fp32 math, rounded to x's dtype) and
    ``y = adaln_modulate(x_new, shift, scale, seq_ids, ...)``. x, branch ``(N, D)``; gate, shift,
    scale ``(B, D)`` with seq_ids or ``(N, D)`` without. Returns ``(x_new, y)`` in x's dtype.
    Differentiable in x, branch, gate, shift, scale, weight, bias. Empty inputs and layouts as in
    :func:`adaln_modulate`.
    """
    _validate(x, {"gate": gate, "shift": shift, "scale": scale}, seq_ids, norm, weight, bias, eps,
              extra={"branch": branch})
    backend = _dispatch.resolve_backend("gated_residual_adaln", backend, x.device)
    if _dispatch.eager_reference(backend):
        _check_values(seq_ids, shift)
        return _gated_eager(x, branch, gate, shift, scale, seq_ids, norm=norm, weight=weight, bias=bias,
                            eps=float(eps))
    return _gated_op(x, branch, gate, shift, scale, seq_ids, norm, weight, bias, float(eps), backend)


class AdaLNModulate(torch.nn.Module):
    """Norm (optionally affine) + per-sequence modulation: ``forward(x, shift, scale, seq_ids)``."""

    def __init__(self, dim: int, norm: str = "layer", elementwise_affine: bool = False, eps: float = 1e-6,
                 backend: Optional[str] = None):
        super().__init__()
        if norm not in NORMS:
            raise ValueError(f"norm must be one of {NORMS}, got {norm!r}")
        self.dim, self.norm, self.eps, self.backend = dim, norm, eps, backend
        self.weight = torch.nn.Parameter(torch.ones(dim)) if elementwise_affine else None
        self.bias = torch.nn.Parameter(torch.zeros(dim)) if elementwise_affine and norm == "layer" else None

    def forward(self, x, shift, scale, seq_ids):
        return adaln_modulate(x, shift, scale, seq_ids, norm=self.norm, weight=self.weight, bias=self.bias,
                              eps=self.eps, backend=self.backend)

    def extra_repr(self) -> str:
        return f"{self.dim}, norm={self.norm!r}, affine={self.weight is not None}, eps={self.eps}"


class GatedResidualAdaLN(AdaLNModulate):
    """``forward(x, branch, gate, shift, scale, seq_ids) -> (x_new, y)``: gated residual then adaLN."""

    def forward(self, x, branch, gate, shift, scale, seq_ids):
        return gated_residual_adaln(x, branch, gate, shift, scale, seq_ids, norm=self.norm, weight=self.weight,
                                    bias=self.bias, eps=self.eps, backend=self.backend)
