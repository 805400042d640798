"""Activations the models share.

:class:`GELUTanh` is ``nn.GELU(approximate="tanh")`` (Wan's and diffusers' ``gelu-approximate``) with a faster
CPU forward. The function is the same: ``0.5·x·(1 + tanh(u)) = x·σ(2u)``, ``u = √(2/π)·(x + 0.044715·x³)``. On a
CPU torch's ``tanh`` is several times slower than its ``sigmoid``, so the forward takes the sigmoid form
(in-place passes and a sigmoid on one buffer, block by block); its rounding is also closer to the exact value, as
``1 + tanh(u)`` cancels for negative ``x``. The backward is torch's own ``gelu_backward`` (the derivative of
the same function). Anything else (CUDA, half precision, torch.compile) takes ``F.gelu``.
"""
import math

import torch
import torch.nn.functional as F
from torch import nn

__all__ = ["GELUTanh", "gelu_tanh"]

_C2 = 2 * math.sqrt(2 / math.pi)         # σ(2u): 2u = C2·(x + K·x³)
_K = 0.044715
_FAST_DTYPES = (torch.float32, torch.float64)
_CHUNK_BYTES = 1 << 20                  # a block of the input that the five passes reuse from cache


def _gelu_sigmoid(x: torch.Tensor) -> torch.Tensor:
    """``x·σ(C2·(x + K·x³))`` into one new contiguous buffer, in blocks of ``_CHUNK_BYTES`` so that the passes
    over a block stay in cache."""
    x = x.contiguous()
    out = torch.empty_like(x)
    n = max(1, _CHUNK_BYTES // x.element_size())
    for xs, ys in zip(x.view(-1).split(n), out.view(-1).split(n)):
        torch.mul(xs, xs, out=ys).mul_(_C2 * _K).add_(_C2).mul_(xs)    # C2·x·(1 + K·x²)
        ys.sigmoid_().mul_(xs)
    return out


class _GELUTanhFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x):
        ctx.save_for_backward(x)
        return _gelu_sigmoid(x)

    @staticmethod
    def backward(ctx, grad):
        (x,) = ctx.saved_tensors
        return torch.ops.aten.gelu_backward(grad, x, approximate="tanh")


def _fast(x: torch.Tensor) -> bool:
    return x.device.type == "cpu" and x.dtype in _FAST_DTYPES and not torch.compiler.is_compiling()


def gelu_tanh(x: torch.Tensor) -> torch.Tensor:
    """``F.gelu(x, approximate="tanh")``, through the sigmoid form for fp32 / fp64 tensors on a CPU."""
    if not _fast(x):
        return F.gelu(x, approximate="tanh")
    if torch.is_grad_enabled() and x.requires_grad:
        return _GELUTanhFunction.apply(x)
    return _gelu_sigmoid(x)


class GELUTanh(nn.GELU):
    """``nn.GELU(approximate="tanh")`` computed by :func:`gelu_tanh` (same module type, no parameters)."""

    def __init__(self):
        super().__init__(approximate="tanh")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return gelu_tanh(x)
