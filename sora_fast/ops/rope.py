"""3D rotary position embedding over (t, h, w) token coordinates: validation, the ``apply_rope3d`` op,
function and module. Its meaning (the split of a head over the axes, the angles, the reference) is
:mod:`sora_fast.reference.rope`.
"""
from __future__ import annotations

from typing import Optional, Sequence

import torch

from ..reference.rope import _rope_backward_ref, apply_rope3d_ref, rope3d_angles, rope3d_split
from . import _dispatch
from ._common import check_float, check_int_tuple, check_positive, check_shape, check_tensor

OP = "apply_rope3d"

__all__ = ["rope3d_split", "rope3d_angles", "apply_rope3d_ref", "apply_rope3d", "Rope3D"]


# --- validation ---------------------------------------------------------------------------------
def validate_rope_args(x: torch.Tensor, coords, theta, split, *, name: str = "x",
                       cname: str = "coords") -> tuple[int, int, int]:
    """Checks shared with attention's fused RoPE; returns the resolved split."""
    head_dim = x.shape[-1]
    if head_dim % 2:
        raise ValueError(f"3D RoPE needs an even head dim, got {name}.shape[-1]={head_dim}")
    check_tensor(cname, coords, ndim=2, layout="(N, 3)", dtypes=(torch.int32,), device=x.device)
    if coords.shape != (x.shape[0], 3):
        raise ValueError(f"{cname} must have shape ({x.shape[0]}, 3) (one (t, h, w) per row of {name}), "
                         f"got {tuple(coords.shape)}")
    check_positive("theta" if name == "x" else "rope_theta", theta)
    if split is None:
        return rope3d_split(head_dim)
    split = check_int_tuple("split", split, 3)
    if any(s % 2 for s in split) or sum(split) != head_dim:
        raise ValueError(f"split must be 3 even dim counts summing to the head dim {head_dim}, got {split}")
    return split


def _check_static(x, coords, theta, split, fake=False) -> tuple[int, int, int]:
    """The one static check of apply_rope3d (shapes, dtypes, devices, scalars): run by the public function,
    the ops and their fakes. ``fake``: under torch.compile theta and split may be symbols, so only the
    tensors are checked there. Returns the resolved split."""
    check_float("x", x, ndim=3, layout="(N, H, D)")
    if fake:
        check_tensor("coords", coords, ndim=2, layout="(N, 3)", dtypes=(torch.int32,), device=x.device)
        return tuple(split)
    return validate_rope_args(x, coords, theta, split)


# --- custom op ----------------------------------------------------------------------------------
@torch.library.custom_op("sora_fast::apply_rope3d", mutates_args=())
def _rope_op(x: torch.Tensor, coords: torch.Tensor, theta: float, split: Sequence[int], backend: str) -> torch.Tensor:
    split = _check_static(x, coords, theta, split)
    kernel = _dispatch.get_kernel(OP, backend, x.device)
    return kernel(x, coords, theta=theta, split=split)


@_rope_op.register_fake
def _(x, coords, theta, split, backend):
    _check_static(x, coords, theta, split, fake=True)
    return torch.empty_like(x)


@torch.library.custom_op("sora_fast::apply_rope3d_backward", mutates_args=())
def _rope_bwd_op(grad: torch.Tensor, x: torch.Tensor, coords: torch.Tensor, theta: float,
                 split: Sequence[int], backend: str) -> torch.Tensor:
    split = _check_static(x, coords, theta, split)
    check_float("grad", grad, ndim=3, layout="(N, H, D)", device=x.device)
    check_shape("grad", grad, x.shape, "(x's shape)")
    kernel = _dispatch.get_kernel(OP + "_backward", backend, x.device)
    return kernel(grad, x, coords, theta=theta, split=split)


@_rope_bwd_op.register_fake
def _(grad, x, coords, theta, split, backend):
    _check_static(x, coords, theta, split, fake=True)
    return torch.empty_like(x)


def _setup(ctx, inputs, output):
    x, coords, theta, split, backend = inputs
    ctx.save_for_backward(x, coords)
    ctx.args = (theta, split, backend)


def _backward(ctx, grad):
    x, coords = ctx.saved_tensors
    return _rope_bwd_op(grad, x, coords, *ctx.args), None, None, None, None


_rope_op.register_autograd(_backward, setup_context=_setup)


_dispatch.register_kernel(OP, "torch", apply_rope3d_ref)
_dispatch.register_kernel(OP + "_backward", "torch", _rope_backward_ref)


# --- public API ---------------------------------------------------------------------------------
def apply_rope3d(x: torch.Tensor, coords: torch.Tensor, *, theta: float = 10000.0,
                 split: Optional[Sequence[int]] = None, backend: Optional[str] = None) -> torch.Tensor:
    """Rotate ``x`` ``(N, H, D)`` by 3D RoPE at token coordinates ``coords`` ``(N, 3)`` int32 (t, h, w).

    ``split``: dims given to (t, h, w), even, summing to D (default Wan2.1's, :func:`rope3d_split`).
    Returns a tensor like ``x``. Differentiable in ``x``.
    """
    split = _check_static(x, coords, theta, split)
    backend = _dispatch.resolve_backend(OP, backend, x.device)
    if _dispatch.eager_reference(backend):
        return apply_rope3d_ref(x, coords, theta=float(theta), split=split)
    return _rope_op(x, coords, float(theta), list(split), backend)


class Rope3D(torch.nn.Module):
    """Module form of :func:`apply_rope3d` with a fixed ``theta`` and ``split``."""

    def __init__(self, theta: float = 10000.0, split: Optional[Sequence[int]] = None, backend: Optional[str] = None):
        super().__init__()
        self.theta, self.split, self.backend = theta, split, backend

    def forward(self, x: torch.Tensor, coords: torch.Tensor) -> torch.Tensor:
        return apply_rope3d(x, coords, theta=self.theta, split=self.split, backend=self.backend)

    def extra_repr(self) -> str:
        return f"theta={self.theta}, split={self.split}"
