"""What the Triton launchers share: the interpreter switch, fp32 dot precision, bf16 store rounding
under the interpreter, 64-bit-offset strides and tensor extents."""
from __future__ import annotations

import os

import torch
import triton
import triton.language as tl

# fp32 inputs: every dot as three tf32 products (hi*hi + hi*lo + lo*hi) on the tensor cores: relative
# error about 2**-21 per product (the dropped lo*lo term), not tf32's 2**-11; exact fp32 ("ieee") runs on
# the FMA units, several times slower, without wgmma (docs/triton_kernels.md).
FP32_PRECISION = "tf32x3"


def interpreting() -> bool:
    """Whether kernels run under the Triton interpreter (TRITON_INTERPRET=1: CPU tensors, numpy math)."""
    return os.environ.get("TRITON_INTERPRET") == "1"


def dot_precision(dtype: torch.dtype) -> str:
    """tl.dot input precision: fp32 inputs get FP32_PRECISION; for 16-bit inputs it is unused."""
    return FP32_PRECISION if dtype == torch.float32 else "tf32"


def extent(t: torch.Tensor) -> int:
    """1 + the largest element offset of a view from its data pointer (0 for an empty tensor): what a
    kernel's offsets into it must reach."""
    if t.numel() == 0:
        return 0
    return 1 + sum((n - 1) * s for n, s in zip(t.shape, t.stride()))


@triton.jit
def to_store(x, dtype: tl.constexpr, UPCAST: tl.constexpr):
    """Cast for a store. The interpreter truncates fp32 -> bf16 (the GPU rounds to nearest even), so
    under UPCAST round to nearest even on the fp32 bits first; the truncating cast is then exact."""
    if UPCAST:
        bits = x.to(tl.uint32, bitcast=True)
        bits = (bits + 0x7FFF + ((bits >> 16) & 1)) & 0xFFFF0000
        x = bits.to(tl.float32, bitcast=True)
    return x.to(dtype)


@triton.jit
def wide(stride_a, stride_b, OFF64: tl.constexpr):
    """A (row, head) stride pair, 64-bit under OFF64: every row * stride product, and so every offset
    made from them, is then 64-bit."""
    if OFF64:
        stride_a, stride_b = tl.cast(stride_a, tl.int64), tl.cast(stride_b, tl.int64)
    return stride_a, stride_b
