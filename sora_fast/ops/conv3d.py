"""Causal 3D convolution, the workhorse of the video VAE: validation, the ``causal_conv3d`` op (+ fake +
autograd), the function, the packed-weight cache and the module. The meaning (reference, output shape,
weight packing, streaming cache) is :mod:`sora_fast.reference.conv3d`.
"""
from __future__ import annotations

import weakref
from typing import Optional, Sequence, Union

import torch

from ..reference.conv3d import (
    PAD_MODES,
    _backward_ref,
    causal_conv3d_next_cache,
    causal_conv3d_output_shape,
    causal_conv3d_pack_weight,
    causal_conv3d_ref,
)
from . import _dispatch
from ._common import check_float, check_int_tuple, check_same_dtype, check_shape, empty_grad, like_layout

OP = "causal_conv3d"

__all__ = ["causal_conv3d_ref", "causal_conv3d_output_shape", "causal_conv3d_next_cache", "causal_conv3d_pack_weight",
           "causal_conv3d", "PackedConv3dWeight", "CausalConv3d"]


# --- validation ---------------------------------------------------------------------------------
def _check_static(x, weight, bias, stride, padding, pad_mode, cache, residual, packed_weight=None, grad=None,
                  fake=False):
    """The one static check of causal_conv3d (shapes, dtypes, devices, scalars; no tensor values read): run
    by the public function, the ops (``torch.ops.sora_fast.*`` callers skip the public checks) and their
    fakes. ``grad``: the backward's incoming gradient (the output's shape). ``fake``: under torch.compile
    stride and padding may hold symbols, so they are taken as given there. Returns ``(stride, padding)``
    as tuples (padding defaulted from the kernel size)."""
    check_float("x", x, ndim=5, layout="(B, Cin, T, H, W)")
    check_float("weight", weight, ndim=5, layout="(Cout, Cin, kt, kh, kw)", device=x.device)
    check_same_dtype("weight", weight, "x", x)
    b, cin, t, h, w = x.shape
    cout, wcin, kt, kh, kw = weight.shape
    if wcin != cin:
        raise ValueError(f"weight must have x's {cin} input channels in dim 1, got shape {tuple(weight.shape)}")
    if min(b, cin, t, h, w) < 1 or min(cout, kt, kh, kw) < 1:
        raise ValueError(f"x {tuple(x.shape)} and weight {tuple(weight.shape)} must have no empty dims")
    if fake:
        stride, padding = tuple(stride), (kh // 2, kw // 2) if padding is None else tuple(padding)
    else:
        stride = check_int_tuple("stride", stride, 3, minimum=1)
        padding = (kh // 2, kw // 2) if padding is None else check_int_tuple("padding", padding, 2)
    if h + 2 * padding[0] < kh or w + 2 * padding[1] < kw:
        raise ValueError(f"the padded input ({h + 2 * padding[0]}, {w + 2 * padding[1]}) is smaller than the kernel "
                         f"({kh}, {kw}); x shape {tuple(x.shape)}, padding {padding}")
    if pad_mode not in PAD_MODES:
        raise ValueError(f"pad_mode must be one of {PAD_MODES}, got {pad_mode!r}")
    if bias is not None:
        check_float("bias", bias, ndim=1, layout="(Cout,)", device=x.device)
        check_shape("bias", bias, (cout,))
    if cache is not None:
        check_float("cache", cache, ndim=5, layout="(B, Cin, frames, H, W)", device=x.device)
        check_same_dtype("cache", cache, "x", x)
        if cache.shape[:2] != x.shape[:2] or cache.shape[3:] != x.shape[3:] or cache.shape[2] > kt - 1:
            raise ValueError(f"cache must have shape ({b}, {cin}, f, {h}, {w}) with f <= kt-1 = {kt - 1} "
                             f"(the previous chunk's last input frames), got {tuple(cache.shape)}")
    if residual is not None:
        check_float("residual", residual, ndim=5, device=x.device)
        check_shape("residual", residual, causal_conv3d_output_shape(x.shape, weight.shape, stride, padding),
                    "(the output's)")
    if packed_weight is not None:
        if not isinstance(packed_weight, torch.Tensor):
            raise TypeError(f"packed_weight must be a tensor (causal_conv3d_pack_weight(weight)) or None, got "
                            f"{type(packed_weight).__name__}")
        want = (kt * kh * kw * cin, cout)
        if (tuple(packed_weight.shape) != want or packed_weight.dtype != weight.dtype
                or packed_weight.device != weight.device or not packed_weight.is_contiguous()):
            raise ValueError(f"packed_weight must be causal_conv3d_pack_weight(weight): a contiguous {want} tensor "
                             f"of {weight.dtype} on {weight.device}, got {tuple(packed_weight.shape)} "
                             f"{packed_weight.dtype} on {packed_weight.device}"
                             f"{'' if packed_weight.is_contiguous() else ' (not contiguous)'}")
    if grad is not None:
        check_float("grad", grad, ndim=5, device=x.device)
        check_shape("grad", grad, causal_conv3d_output_shape(x.shape, weight.shape, stride, padding), "(the output's)")
    return stride, padding


# --- custom op ----------------------------------------------------------------------------------
@torch.library.custom_op("sora_fast::causal_conv3d", mutates_args=())
def _conv_op(x: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor], stride: Sequence[int],
             padding: Sequence[int], pad_mode: str, cache: Optional[torch.Tensor], residual: Optional[torch.Tensor],
             backend: str, packed_weight: Optional[torch.Tensor] = None) -> torch.Tensor:
    stride, padding = _check_static(x, weight, bias, stride, padding, pad_mode, cache, residual, packed_weight)
    kernel = _dispatch.get_kernel(OP, backend, x.device)
    return kernel(x, weight, bias, stride=stride, padding=padding, pad_mode=pad_mode, cache=cache,
                  residual=residual, packed_weight=packed_weight)


@_conv_op.register_fake
def _(x, weight, bias, stride, padding, pad_mode, cache, residual, backend, packed_weight=None):
    stride, padding = _check_static(x, weight, bias, stride, padding, pad_mode, cache, residual, packed_weight,
                                    fake=True)
    out = x.new_empty(causal_conv3d_output_shape(x.shape, weight.shape, stride, padding))
    return like_layout(out, x)


@torch.library.custom_op("sora_fast::causal_conv3d_backward", mutates_args=())
def _conv_bwd_op(grad: torch.Tensor, x: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor],
                 stride: Sequence[int], padding: Sequence[int], pad_mode: str, cache: Optional[torch.Tensor],
                 residual: Optional[torch.Tensor], backend: str
                 ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    stride, padding = _check_static(x, weight, bias, stride, padding, pad_mode, cache, residual, grad=grad)
    kernel = _dispatch.get_kernel(OP + "_backward", backend, x.device)
    dx, dw, db, dcache, dres = kernel(grad, x, weight, bias, stride=stride, padding=padding,
                                      pad_mode=pad_mode, cache=cache, residual=residual)
    return dx, dw, empty_grad(db, x), empty_grad(dcache, x), empty_grad(dres, x)


@_conv_bwd_op.register_fake
def _(grad, x, weight, bias, stride, padding, pad_mode, cache, residual, backend):
    _check_static(x, weight, bias, stride, padding, pad_mode, cache, residual, grad=grad, fake=True)
    return tuple(torch.empty_like(t) if t is not None else x.new_empty(0) for t in (x, weight, bias, cache, residual))


def _setup(ctx, inputs, output):
    x, weight, bias, stride, padding, pad_mode, cache, residual, backend, packed_weight = inputs
    # the residual's gradient is the output's: only its dtype is kept, not the tensor (nor the packed
    # weight, a constant layout of weight; weight's gradient goes to weight)
    ctx.save_for_backward(x, weight, bias, cache)
    ctx.residual_dtype = None if residual is None else residual.dtype
    ctx.args = (stride, padding, pad_mode)
    ctx.backend = backend


def _backward(ctx, grad):
    x, weight, bias, cache = ctx.saved_tensors
    stride, padding, pad_mode = ctx.args
    dx, dw, db, dcache, _ = _conv_bwd_op(grad, x, weight, bias, stride, padding, pad_mode, cache, None, ctx.backend)
    dres = None if ctx.residual_dtype is None else grad.to(ctx.residual_dtype)
    return (dx, dw, db if bias is not None else None, None, None, None,
            dcache if cache is not None else None, dres, None, None)


_conv_op.register_autograd(_backward, setup_context=_setup)


_dispatch.register_kernel(OP, "torch", causal_conv3d_ref)
_dispatch.register_kernel(OP + "_backward", "torch", _backward_ref)
_dispatch.register_kernel(OP, "triton", "sora_fast.triton.conv3d:causal_conv3d_forward")
_dispatch.register_kernel(OP + "_backward", "triton", _backward_ref)  # reference VJP for now


# --- public API ---------------------------------------------------------------------------------
def causal_conv3d(x: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor] = None, *,
                  stride: Union[int, Sequence[int]] = 1, padding: Union[None, int, Sequence[int]] = None,
                  pad_mode: str = "zeros", cache: Optional[torch.Tensor] = None,
                  residual: Optional[torch.Tensor] = None, packed_weight: Optional[torch.Tensor] = None,
                  backend: Optional[str] = None) -> torch.Tensor:
    """Causal 3D convolution with fused bias and residual.

    Args:
        x: ``(B, Cin, T, H, W)``, contiguous or channels_last_3d; fp16/bf16/fp32.
        weight: ``(Cout, Cin, kt, kh, kw)`` in x's dtype. bias: ``(Cout,)`` or None.
        stride: int or ``(st, sh, sw)``.
        padding: ``(ph, pw)`` symmetric zero padding of H and W (int for both); default
            ``(kh // 2, kw // 2)``. Time is always padded causally with ``kt - 1`` frames in front.
        pad_mode: ``"zeros"`` or ``"replicate"`` (copies of the first frame) for the causal frames.
        cache: ``(B, Cin, f, H, W)``, ``f <= kt - 1``: the last input frames of the previous chunk
            (see :func:`causal_conv3d_next_cache`); replaces that much of the causal padding.
        residual: added to the output, shape ``(B, Cout, T_out, H_out, W_out)``.
        packed_weight: ``causal_conv3d_pack_weight(weight)``, kept by the caller so the triton backend does
            not pack the weight on every call (:class:`PackedConv3dWeight` keeps it up to date); other
            backends ignore it. It must be the current weight's packing: it is not compared with weight.
            It gets no gradient (weight does).

    Returns ``(B, Cout, (T-1)//st + 1, (H + 2ph - kh)//sh + 1, (W + 2pw - kw)//sw + 1)`` in x's dtype
    and memory format. Differentiable in x, weight, bias, cache and residual.

    The ``triton`` backend: fp16/bf16 products are exact with fp32 accumulation; fp32 inputs use three
    tf32 products (``tf32x3``, relative error about 2**-21 per product) on a GPU. The kernel reads and
    writes channels_last_3d, so a contiguous x (cache, residual) is copied in and the output copied back:
    pass channels_last_3d tensors to avoid the copies. Its backward is the torch reference's (a
    vector-Jacobian product through :func:`causal_conv3d_ref`, which recomputes the forward in fp32);
    only the forward is the Triton kernel.
    """
    stride, padding = _check_static(x, weight, bias, stride, padding, pad_mode, cache, residual, packed_weight)
    backend = _dispatch.resolve_backend(OP, backend, x.device)
    if _dispatch.eager_reference(backend):
        return causal_conv3d_ref(x, weight, bias, stride=stride, padding=padding, pad_mode=pad_mode, cache=cache,
                                 residual=residual)
    return _conv_op(x, weight, bias, list(stride), list(padding), pad_mode, cache, residual, backend, packed_weight)


class PackedConv3dWeight:
    """Keeps ``causal_conv3d_pack_weight(weight)`` for a module and repacks only when the weight changed.

    Call it with the module's weight parameter and the backend: it returns the packed weight for the
    ``triton`` backend (None for the others, which do not read it). The pack is reused only for the very
    tensor object it was made from (held by a weak reference, so a new tensor that happens to land at a
    freed address is never mistaken for the old one: weights recomputed every forward, as under
    ``weight_norm`` or parametrizations, are packed every call) and only while its ``_version`` (bumped by
    every in-place change: optimizer steps, ``load_state_dict``, ``weight.copy_()``), ``data_ptr``, dtype,
    device and shape are those it was packed at, so ``.to()`` and parameter replacement are seen too. A
    change through ``weight.data`` (``p.data.copy_()``) bypasses the version counter: call :meth:`clear`
    after one. A weight created under ``torch.inference_mode()`` has no version counter and is packed on
    every call.
    """

    def __init__(self):
        self._source: Optional[weakref.ref] = None   # the weight tensor the pack was made from
        self._key = None
        self._packed: Optional[torch.Tensor] = None

    def clear(self) -> None:
        self._source, self._key, self._packed = None, None, None

    def __call__(self, weight: torch.Tensor, backend: Optional[str]) -> Optional[torch.Tensor]:
        if _dispatch.resolve_backend(OP, backend, weight.device) != "triton" or torch.compiler.is_compiling():
            return None
        if weight.is_inference():   # no version counter to tell an in-place change: pack every call
            return causal_conv3d_pack_weight(weight)
        key = (weight._version, weight.data_ptr(), weight.dtype, weight.device, tuple(weight.shape))
        source = self._source() if self._source is not None else None
        if source is not weight or key != self._key:
            self._packed = causal_conv3d_pack_weight(weight)
            self._source, self._key = weakref.ref(weight), key
        return self._packed


class CausalConv3d(torch.nn.Module):
    """Causal Conv3d layer with an optional streaming cache for chunk-by-chunk processing.

    ``forward(x, residual=None, stream=False)``: with ``stream=True`` the layer reads and updates its
    cache, so calling it on consecutive chunks equals calling it once on the whole video;
    :meth:`reset_cache` starts a new video. With a time stride, every chunk but the last must hold a
    multiple of the stride's frames (else the output frames would fall off the whole video's grid).
    With the ``triton`` backend the layer keeps its weight packed for the kernel (:class:`PackedConv3dWeight`:
    repacked only after the weight changed); the gradient still goes to ``weight``.
    """

    def __init__(self, in_channels: int, out_channels: int, kernel_size: Union[int, Sequence[int]] = 3,
                 stride: Union[int, Sequence[int]] = 1, padding: Union[None, int, Sequence[int]] = None,
                 bias: bool = True, pad_mode: str = "zeros", backend: Optional[str] = None):
        super().__init__()
        kt, kh, kw = check_int_tuple("kernel_size", kernel_size, 3, minimum=1)
        self.stride = check_int_tuple("stride", stride, 3, minimum=1)
        self.padding = (kh // 2, kw // 2) if padding is None else check_int_tuple("padding", padding, 2)
        if pad_mode not in PAD_MODES:
            raise ValueError(f"pad_mode must be one of {PAD_MODES}, got {pad_mode!r}")
        self.pad_mode, self.backend = pad_mode, backend
        ref = torch.nn.Conv3d(in_channels, out_channels, (kt, kh, kw), bias=bias)  # PyTorch's default init
        self.weight = torch.nn.Parameter(ref.weight.detach().clone())
        self.bias = torch.nn.Parameter(ref.bias.detach().clone()) if bias else None
        self.packed_weight = PackedConv3dWeight()
        self._cache: Optional[torch.Tensor] = None
        self._frames_seen = 0

    def reset_cache(self) -> None:
        self._cache = None
        self._frames_seen = 0

    def forward(self, x: torch.Tensor, residual: Optional[torch.Tensor] = None, stream: bool = False) -> torch.Tensor:
        cache = self._cache if stream else None
        if stream and self._frames_seen % self.stride[0]:
            raise ValueError(f"streaming with time stride {self.stride[0]}: the previous chunks held "
                             f"{self._frames_seen} frames, not a multiple of the stride; split the video on "
                             f"multiples of {self.stride[0]} frames (or call reset_cache() for a new video)")
        out = causal_conv3d(x, self.weight, self.bias, stride=self.stride, padding=self.padding,
                            pad_mode=self.pad_mode, cache=cache, residual=residual,
                            packed_weight=self.packed_weight(self.weight, self.backend), backend=self.backend)
        if stream:
            self._cache = causal_conv3d_next_cache(x.detach(), cache, self.weight.shape[2])
            self._frames_seen += x.shape[2]
        return out

    def extra_repr(self) -> str:
        cout, cin, *k = self.weight.shape
        return f"{cin}, {cout}, kernel_size={tuple(k)}, stride={self.stride}, padding={self.padding}, " \
               f"pad_mode={self.pad_mode!r}"
