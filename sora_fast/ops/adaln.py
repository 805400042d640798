"""The adaLN family: validation, the ops (+ fake + autograd), functions and modules. The meaning (references,
eager paths, reference backwards) is :mod:`sora_fast.reference.adaln`.
"""
from __future__ import annotations

from typing import Optional

import torch

from ..reference.adaln import (
    NORMS,
    _adaln_eager,
    _gated_backward_ref,
    _gated_eager,
    _modulate_backward_ref,
    adaln_modulate_ref,
    gated_residual_adaln_ref,
    token_blocks,
)
from . import _dispatch
from ._common import check_float, check_index_values, check_positive, check_tensor, empty_grad

__all__ = ["adaln_modulate_ref", "gated_residual_adaln_ref", "adaln_modulate", "gated_residual_adaln",
           "AdaLNModulate", "GatedResidualAdaLN"]


# --- validation ---------------------------------------------------------------------------------
def _check_static(x, tables: dict, seq_ids, norm, weight, bias, eps, extra: Optional[dict] = None,
                  grads: Optional[dict] = None, fake: bool = False) -> None:
    """The one static check of the family (shapes, dtypes, devices, scalars; no tensor values read): run by
    the public functions, the torch.library ops (which callers of ``torch.ops.sora_fast.*``, torch.compile
    and opcheck reach directly) and their fakes. ``tables``: the ``(R, D)`` tables indexed by the row ids
``seq_ids`` (R rows: one per sequence, per latent frame, ...; any R), or per-token ``(N, D)`` ones;
    ``extra``: other ``(N, D)`` inputs; ``grads``: the backward's incoming ``(N, D)`` gradients (None
    entries absent). ``fake``: under torch.compile eps may be a symbol, so it is not checked there."""
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
        check_float(name, t, ndim=2, layout="(R, D) or (N, D)", device=x.device)
        if t.shape[1] != d:
            raise ValueError(f"{name} must have x's hidden size {d} in dim 1, got shape {tuple(t.shape)}")
        if seq_ids is None and t.shape[0] != n:
            raise ValueError(f"{name} must be per token, shape ({n}, {d}), when seq_ids is None; "
                             f"got {tuple(t.shape)} (pass seq_ids, row ids, for (R, D) tables)")
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
    if not fake:
        check_positive("eps", eps)
    for name, g in (grads or {}).items():
        if g is not None:
            check_float(name, g, ndim=2, layout="(N, D)", device=x.device)
            if g.shape != x.shape:
                raise ValueError(f"{name} must have x's shape {tuple(x.shape)}, got {tuple(g.shape)}")


def _check_values(seq_ids, table):
    """The one value check: the row ids seq_ids in [0, R), R the rows of the tables (every table has the
    same number of rows, so one bound), read from the device once."""
    if seq_ids is not None:
        check_index_values("seq_ids", seq_ids, table.shape[0], "row ids into the tables' rows")


def _op_kernel(op, backend, x, tables: dict, seq_ids, norm, weight, bias, eps, grads: Optional[dict] = None,
               extra: Optional[dict] = None):
    """Inside the ops: the static check, then the value check unless the kernel checks that range itself
    before its launch (``checks_index_values``: the cuda backend, in a device-to-host copy it needs
    anyway). Returns the kernel."""
    _check_static(x, tables, seq_ids, norm, weight, bias, eps, extra, grads)
    kernel = _dispatch.get_kernel(op, backend, x.device)
    if not getattr(kernel, "checks_index_values", False):
        _check_values(seq_ids, next(iter(tables.values())))
    return kernel


def _present(tables: dict) -> dict:
    return {k: t for k, t in tables.items() if t is not None}


def _eager_blocks(seq_ids, tables: dict) -> int:
    """The eager paths' one value check: the tokens' block layout (:func:`token_blocks`; 0 when there is
    none), which implies the row ids are in range; without one, the range check of :func:`_check_values`."""
    present = _present(tables)
    if not present:
        return 0
    table = next(iter(present.values()))
    block = token_blocks(seq_ids, table.shape[0]) or 0
    if not block:
        _check_values(seq_ids, table)
    return block


def _filled(x, seq_ids, tables: dict, fills: dict) -> tuple:
    """Absent (None) tables as explicit ones for the ops and kernels: ``fills[name]`` (0 or 1) in a table of
    the present tables' rows, or per token ``(N, D)`` (and seq_ids None) when all are absent."""
    present = _present(tables)
    like = next(iter(present.values()), None)
    if like is None:
        like, seq_ids = x.new_empty(x.shape, dtype=torch.float32), None
    out = tuple(t if t is not None else torch.full_like(like, fills[k]) for k, t in tables.items())
    return (*out, seq_ids)


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
    _check_static(x, {"shift": shift, "scale": scale}, seq_ids, norm, weight, bias, eps, fake=True)
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
    _check_static(x, {"shift": shift, "scale": scale}, seq_ids, norm, weight, bias, eps, grads={"dy": dy}, fake=True)
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


_dispatch.register_kernel("adaln_modulate", "torch", adaln_modulate_ref)
_dispatch.register_kernel("adaln_modulate_backward", "torch", _modulate_backward_ref)
_dispatch.register_kernel("adaln_modulate", "cuda", "sora_fast.cuda.launchers:adaln_modulate")
_dispatch.register_kernel("adaln_modulate_backward", "cuda", "sora_fast.cuda.launchers:adaln_modulate_backward")


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
    _check_static(x, {"gate": gate, "shift": shift, "scale": scale}, seq_ids, norm, weight, bias, eps,
                  extra={"branch": branch}, fake=True)
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
    _check_static(x, {"gate": gate, "shift": shift, "scale": scale}, seq_ids, norm, weight, bias, eps,
                  extra={"branch": branch}, grads={"dx_new": dx_new, "dy": dy}, fake=True)
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


_dispatch.register_kernel("gated_residual_adaln", "torch", gated_residual_adaln_ref)
_dispatch.register_kernel("gated_residual_adaln_backward", "torch", _gated_backward_ref)
_dispatch.register_kernel("gated_residual_adaln", "cuda", "sora_fast.cuda.launchers:gated_residual_adaln")
_dispatch.register_kernel("gated_residual_adaln_backward", "cuda",
                          "sora_fast.cuda.launchers:gated_residual_adaln_backward")


# --- public API ---------------------------------------------------------------------------------
def adaln_modulate(x: torch.Tensor, shift: torch.Tensor, scale: torch.Tensor, seq_ids: Optional[torch.Tensor],
                   *, norm: str = "layer", weight: Optional[torch.Tensor] = None,
                   bias: Optional[torch.Tensor] = None, eps: float = 1e-6,
                   backend: Optional[str] = None) -> torch.Tensor:
    """``y = N(x) * (1 + scale[seq_ids]) + shift[seq_ids]``.

    Args:
        x: ``(N, D)`` packed tokens, fp16/bf16/fp32.
        shift, scale: ``(R, D)`` tables of R rows read through ``seq_ids`` (one row per sequence, or
            per latent frame as the DiT's per-frame timesteps, or any other grouping of tokens), or
            ``(N, D)`` per-token tables (``seq_ids=None``); any float dtype.
        seq_ids: ``(N,)`` int32 row id of each token, values in ``[0, R)`` (any order; rows no token
            reads get zero gradients), or None. Tables stay O(R x D): no per-token copy is made (the torch
            backend broadcasts them where each row is read by one contiguous block of tokens, in row order,
            and gathers them otherwise).
        norm: ``"layer"`` (LayerNorm) or ``"rms"`` (RMSNorm), over the last dim, with ``eps``.
        weight, bias: optional ``(D,)`` affine of the norm.

    Returns y ``(N, D)`` in x's dtype (N = 0 gives an empty y). Differentiable in x, shift, scale,
    weight, bias; with ``backend="cuda"`` every gradient comes from the CUDA kernels, the per-row
    ones reduced in a fixed order (bitwise reproducible).

    Layouts: any strides work on every backend. ``backend="cuda"`` reads operands whose last dim has
    unit stride in place (any row stride, e.g. a column slice of a wider buffer) and copies any other
    layout (e.g. a transposed tensor) to contiguous first: one extra read and write of that operand.
    """
    tables = {"shift": shift, "scale": scale}
    _check_static(x, tables, seq_ids, norm, weight, bias, eps)
    backend = _dispatch.resolve_backend("adaln_modulate", backend, x.device)
    if _dispatch.eager_reference(backend):
        return _adaln_eager(x, shift, scale, seq_ids, norm=norm, weight=weight, bias=bias, eps=float(eps),
                            block=_eager_blocks(seq_ids, tables))
    return _modulate_op(x, shift, scale, seq_ids, norm, weight, bias, float(eps), backend)


def gated_residual_adaln(x: torch.Tensor, branch: torch.Tensor, gate: Optional[torch.Tensor],
                         shift: Optional[torch.Tensor], scale: Optional[torch.Tensor],
                         seq_ids: Optional[torch.Tensor], *, norm: str = "layer",
                         weight: Optional[torch.Tensor] = None, bias: Optional[torch.Tensor] = None,
                         eps: float = 1e-6, backend: Optional[str] = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Gated residual add, then adaLN of the result, in one pass.

    ``x_new = x + gate[seq_ids] * branch`` (fp32 math, rounded to x's dtype) and
    ``y = adaln_modulate(x_new, shift, scale, seq_ids, ...)``. x, branch ``(N, D)``; gate, shift,
    scale ``(R, D)`` with seq_ids (``(N,)`` int32 row ids in ``[0, R)``) or ``(N, D)`` without. Any of them
    may be None: gate None is an ungated add (``x + branch``), shift None no shift, scale None no scale (both
    None: ``y`` is the plain norm, affine with weight / bias); the torch backend then skips that work.
    Returns ``(x_new, y)`` in x's dtype. Differentiable in x, branch, gate, shift, scale, weight, bias.
    Empty inputs and layouts as in :func:`adaln_modulate`.
    """
    tables = {"gate": gate, "shift": shift, "scale": scale}
    _check_static(x, _present(tables), seq_ids, norm, weight, bias, eps, extra={"branch": branch})
    backend = _dispatch.resolve_backend("gated_residual_adaln", backend, x.device)
    if _dispatch.eager_reference(backend):
        block = _eager_blocks(seq_ids, tables)
        return _gated_eager(x, branch, gate, shift, scale, seq_ids, norm=norm, weight=weight, bias=bias,
                            eps=float(eps), block=block)
    gate, shift, scale, seq_ids = _filled(x, seq_ids, tables, {"gate": 1, "shift": 0, "scale": 0})
    return _gated_op(x, branch, gate, shift, scale, seq_ids, norm, weight, bias, float(eps), backend)


class AdaLNModulate(torch.nn.Module):
    """Norm (optionally affine) + modulation from ``(R, D)`` tables and row ids:
    ``forward(x, shift, scale, seq_ids)``."""

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
