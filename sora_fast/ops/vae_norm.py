"""VAE normalization + SiLU on video feature maps ``(B, C, T, H, W)`` (contiguous or channels_last_3d):
validation, the ops (+ fake + autograd), functions and modules; references in
:mod:`sora_fast.reference.vae_norm`.

    group_norm_silu:        GroupNorm over C/G channels x T x H x W, affine, then SiLU
    channel_rms_norm_silu:  Wan-VAE's norm: x / max(||x||_2 over C, eps) * sqrt(C) * weight + bias, then SiLU
"""
from __future__ import annotations

from typing import Optional

import torch

from ..reference.vae_norm import _gn_backward_ref, _rms_backward_ref, channel_rms_norm_silu_ref, group_norm_silu_ref
from . import _dispatch
from ._common import check_float, check_positive, check_shape, empty_grad, like_layout

__all__ = ["group_norm_silu_ref", "channel_rms_norm_silu_ref", "group_norm_silu", "channel_rms_norm_silu",
           "GroupNormSiLU", "ChannelRMSNormSiLU"]


# --- validation ---------------------------------------------------------------------------------
def _check_static(x, weight, bias, eps, silu, num_groups=None, grad=None, fake=False):
    """The one static check of the VAE norms (shapes, dtypes, devices, scalars; no tensor values read):
    run by the public functions, the ops (``torch.ops.sora_fast.*`` callers skip the public checks) and
    their fakes. ``grad``: the backward's incoming gradient. ``fake``: under torch.compile the scalars
    (num_groups, eps) may be symbols, so only the tensors are checked there."""
    check_float("x", x, ndim=5, layout="(B, C, T, H, W)")
    c = x.shape[1]
    if num_groups is not None and not fake:
        if isinstance(num_groups, bool) or not isinstance(num_groups, int) or num_groups < 1 or c % num_groups:
            raise ValueError(f"num_groups must be a positive int dividing the {c} channels, got {num_groups!r}")
    for name, t in (("weight", weight), ("bias", bias)):
        if t is not None:
            check_float(name, t, ndim=1, layout="(C,)", device=x.device)
            check_shape(name, t, (c,))
    if not fake:
        check_positive("eps", eps)
        if not isinstance(silu, bool):
            raise TypeError(f"silu must be a bool, got {type(silu).__name__}")
    if grad is not None:
        check_float("grad", grad, ndim=5, layout="(B, C, T, H, W)", device=x.device)
        check_shape("grad", grad, x.shape, "(x's shape)")


def _optional_grads(g, weight, bias):
    return g[0], (g[1] if weight is not None else None), (g[2] if bias is not None else None)


# --- group_norm_silu op --------------------------------------------------------------------------
@torch.library.custom_op("sora_fast::group_norm_silu", mutates_args=())
def _gn_op(x: torch.Tensor, num_groups: int, weight: Optional[torch.Tensor], bias: Optional[torch.Tensor],
           eps: float, silu: bool, backend: str) -> torch.Tensor:
    _check_static(x, weight, bias, eps, silu, num_groups)
    kernel = _dispatch.get_kernel("group_norm_silu", backend, x.device)
    return kernel(x, num_groups, weight, bias, eps=eps, silu=silu)


@_gn_op.register_fake
def _(x, num_groups, weight, bias, eps, silu, backend):
    _check_static(x, weight, bias, eps, silu, num_groups, fake=True)
    return like_layout(torch.empty_like(x), x)


@torch.library.custom_op("sora_fast::group_norm_silu_backward", mutates_args=())
def _gn_bwd_op(grad: torch.Tensor, x: torch.Tensor, num_groups: int, weight: Optional[torch.Tensor],
               bias: Optional[torch.Tensor], eps: float, silu: bool, backend: str
               ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    _check_static(x, weight, bias, eps, silu, num_groups, grad)
    kernel = _dispatch.get_kernel("group_norm_silu_backward", backend, x.device)
    dx, dw, db = kernel(grad, x, num_groups, weight, bias, eps=eps, silu=silu)
    return dx, empty_grad(dw, x), empty_grad(db, x)


@_gn_bwd_op.register_fake
def _(grad, x, num_groups, weight, bias, eps, silu, backend):
    _check_static(x, weight, bias, eps, silu, num_groups, grad, fake=True)
    return tuple(torch.empty_like(t) if t is not None else x.new_empty(0) for t in (x, weight, bias))


def _gn_setup(ctx, inputs, output):
    x, num_groups, weight, bias, eps, silu, backend = inputs
    ctx.save_for_backward(x, weight, bias)
    ctx.args = (num_groups, eps, silu, backend)


def _gn_backward(ctx, grad):
    x, weight, bias = ctx.saved_tensors
    num_groups, eps, silu, backend = ctx.args
    dx, dw, db = _optional_grads(_gn_bwd_op(grad, x, num_groups, weight, bias, eps, silu, backend), weight, bias)
    return dx, None, dw, db, None, None, None


_gn_op.register_autograd(_gn_backward, setup_context=_gn_setup)


_dispatch.register_kernel("group_norm_silu", "torch", group_norm_silu_ref)
_dispatch.register_kernel("group_norm_silu_backward", "torch", _gn_backward_ref)
_dispatch.register_kernel("group_norm_silu", "cuda", "sora_fast.cuda.launchers:group_norm_silu")
_dispatch.register_kernel("group_norm_silu_backward", "cuda", "sora_fast.cuda.launchers:group_norm_silu_backward")


# --- channel_rms_norm_silu op ----------------------------------------------------------------------
@torch.library.custom_op("sora_fast::channel_rms_norm_silu", mutates_args=())
def _rms_op(x: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor], eps: float, silu: bool,
            backend: str) -> torch.Tensor:
    _check_static(x, weight, bias, eps, silu)
    kernel = _dispatch.get_kernel("channel_rms_norm_silu", backend, x.device)
    return kernel(x, weight, bias, eps=eps, silu=silu)


@_rms_op.register_fake
def _(x, weight, bias, eps, silu, backend):
    _check_static(x, weight, bias, eps, silu, fake=True)
    return like_layout(torch.empty_like(x), x)


@torch.library.custom_op("sora_fast::channel_rms_norm_silu_backward", mutates_args=())
def _rms_bwd_op(grad: torch.Tensor, x: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor],
                eps: float, silu: bool, backend: str) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    _check_static(x, weight, bias, eps, silu, grad=grad)
    kernel = _dispatch.get_kernel("channel_rms_norm_silu_backward", backend, x.device)
    dx, dw, db = kernel(grad, x, weight, bias, eps=eps, silu=silu)
    return dx, dw, empty_grad(db, x)


@_rms_bwd_op.register_fake
def _(grad, x, weight, bias, eps, silu, backend):
    _check_static(x, weight, bias, eps, silu, grad=grad, fake=True)
    return torch.empty_like(x), torch.empty_like(weight), torch.empty_like(bias) if bias is not None else x.new_empty(0)


def _rms_setup(ctx, inputs, output):
    x, weight, bias, eps, silu, backend = inputs
    ctx.save_for_backward(x, weight, bias)
    ctx.args = (eps, silu, backend)


def _rms_backward(ctx, grad):
    x, weight, bias = ctx.saved_tensors
    dx, dw, db = _optional_grads(_rms_bwd_op(grad, x, weight, bias, *ctx.args), weight, bias)
    return dx, dw, db, None, None, None


_rms_op.register_autograd(_rms_backward, setup_context=_rms_setup)


_dispatch.register_kernel("channel_rms_norm_silu", "torch", channel_rms_norm_silu_ref)
_dispatch.register_kernel("channel_rms_norm_silu_backward", "torch", _rms_backward_ref)
_dispatch.register_kernel("channel_rms_norm_silu", "cuda", "sora_fast.cuda.launchers:channel_rms_norm_silu")
_dispatch.register_kernel("channel_rms_norm_silu_backward", "cuda",
                          "sora_fast.cuda.launchers:channel_rms_norm_silu_backward")


# --- public API ---------------------------------------------------------------------------------
def group_norm_silu(x: torch.Tensor, num_groups: int, weight: Optional[torch.Tensor] = None,
                    bias: Optional[torch.Tensor] = None, *, eps: float = 1e-6, silu: bool = True,
                    backend: Optional[str] = None) -> torch.Tensor:
    """GroupNorm + SiLU of ``x`` ``(B, C, T, H, W)`` (contiguous or channels_last_3d).

    Statistics over each group of ``C / num_groups`` channels and all of T, H, W, in fp32; optional
    ``(C,)`` affine ``weight``/``bias``; SiLU unless ``silu=False``. Returns x's dtype and memory
    format (an empty x, e.g. T = 0, gives an empty result). Differentiable in x, weight, bias.

    ``backend="cuda"``: the forward is the CUDA kernel (kernels/vae_norm.cuh; on CPU tensors its host
    emulation). It reads contiguous and channels_last_3d x in place and copies any other layout to
    contiguous first (one extra read and write of x). Its backward is, for now, the plain-torch
    reference VJP (``group_norm_silu_ref`` differentiated by autograd): correct, not fused.
    """
    _check_static(x, weight, bias, eps, silu, num_groups)
    backend = _dispatch.resolve_backend("group_norm_silu", backend, x.device)
    if _dispatch.eager_reference(backend):
        return group_norm_silu_ref(x, num_groups, weight, bias, eps=float(eps), silu=silu)
    return _gn_op(x, num_groups, weight, bias, float(eps), silu, backend)


def channel_rms_norm_silu(x: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor] = None, *,
                          eps: float = 1e-12, silu: bool = True, backend: Optional[str] = None) -> torch.Tensor:
    """Wan-VAE's channel norm + SiLU of ``x`` ``(B, C, T, H, W)``.

    ``y = x / max(||x||_2 over C, eps) * sqrt(C) * weight + bias`` at every (b, t, h, w), in fp32
    (``F.normalize`` semantics), then SiLU unless ``silu=False``. weight ``(C,)``, bias ``(C,)`` or
    None. Returns x's dtype and memory format (an empty x gives an empty result). Differentiable in
    x, weight, bias.

    ``backend="cuda"``: the forward is the CUDA kernel (kernels/vae_norm.cuh; on CPU tensors its host
    emulation). It reads contiguous and channels_last_3d x in place and copies any other layout to
    contiguous first (one extra read and write of x). Its backward is, for now, the plain-torch
    reference VJP (``channel_rms_norm_silu_ref`` differentiated by autograd): correct, not fused.
    """
    if weight is None:
        raise TypeError("weight must be a (C,) tensor, got None")
    _check_static(x, weight, bias, eps, silu)
    backend = _dispatch.resolve_backend("channel_rms_norm_silu", backend, x.device)
    if _dispatch.eager_reference(backend):
        return channel_rms_norm_silu_ref(x, weight, bias, eps=float(eps), silu=silu)
    return _rms_op(x, weight, bias, float(eps), silu, backend)


class GroupNormSiLU(torch.nn.Module):
    """``GroupNorm(num_groups, C)`` followed by SiLU, in one op."""

    def __init__(self, num_groups: int, num_channels: int, eps: float = 1e-6, affine: bool = True,
                 silu: bool = True, backend: Optional[str] = None):
        super().__init__()
        if (isinstance(num_groups, bool) or not isinstance(num_groups, int) or num_groups < 1
                or num_channels % num_groups):
            raise ValueError(f"num_groups must be a positive int dividing num_channels ({num_channels}), "
                             f"got {num_groups!r}")
        self.num_groups, self.eps, self.silu, self.backend = num_groups, eps, silu, backend
        self.weight = torch.nn.Parameter(torch.ones(num_channels)) if affine else None
        self.bias = torch.nn.Parameter(torch.zeros(num_channels)) if affine else None

    def forward(self, x):
        return group_norm_silu(x, self.num_groups, self.weight, self.bias, eps=self.eps, silu=self.silu,
                               backend=self.backend)


class ChannelRMSNormSiLU(torch.nn.Module):
    """Wan-VAE ``RMS_norm`` over channels followed by SiLU, in one op."""

    def __init__(self, num_channels: int, bias: bool = False, silu: bool = True, backend: Optional[str] = None):
        super().__init__()
        self.silu, self.backend = silu, backend
        self.weight = torch.nn.Parameter(torch.ones(num_channels))
        self.bias = torch.nn.Parameter(torch.zeros(num_channels)) if bias else None

    def forward(self, x):
        return channel_rms_norm_silu(x, self.weight, self.bias, silu=self.silu, backend=self.backend)
