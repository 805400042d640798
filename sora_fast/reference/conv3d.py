"""Causal 3D convolution, the workhorse of the video VAE, in plain torch: its reference, output shape,
the weight packing the triton kernel reads and the streaming cache rule.

Time is padded causally: output frame ``j`` sees input frames ``j*st - (kt-1) ... j*st``. The ``kt-1``
frames in front of the first are zeros or copies of the first frame (``pad_mode``), or come from
``cache``: the last input frames of the previous chunk, so a long video decoded chunk by chunk gives
exactly the result of decoding it at once (chunk boundaries on multiples of the time stride). A cache
shorter than ``kt-1`` frames (the stream so far was shorter) is padded in front by ``pad_mode``, just
as the whole video would be. Height and width get symmetric zero padding.
"""
from __future__ import annotations

from typing import Optional, Sequence

import torch
import torch.nn.functional as F

from ._common import like_layout, math_dtype, reference_vjp

PAD_MODES = ("zeros", "replicate")

__all__ = ["causal_conv3d_ref", "causal_conv3d_output_shape", "causal_conv3d_next_cache", "causal_conv3d_pack_weight"]


def causal_conv3d_output_shape(x_shape: Sequence[int], weight_shape: Sequence[int], stride: Sequence[int],
                               padding: Sequence[int]) -> tuple[int, int, int, int, int]:
    """``(B, Cout, T_out, H_out, W_out)`` of a causal conv (time padded by kt-1 frames in front)."""
    b, _, t, h, w = x_shape
    cout, _, kt, kh, kw = weight_shape
    (st, sh, sw), (ph, pw) = stride, padding
    return b, cout, (t - 1) // st + 1, (h + 2 * ph - kh) // sh + 1, (w + 2 * pw - kw) // sw + 1


def _front_frames(x: torch.Tensor, kt: int, pad_mode: str, cache: Optional[torch.Tensor]) -> torch.Tensor:
    """The kt-1 frames that stand before x in the stream: [pad ..., cache ...]."""
    have = cache if cache is not None else x[:, :, :0]
    missing = kt - 1 - have.shape[2]
    if missing > 0:
        first = have[:, :, :1] if have.shape[2] else x[:, :, :1]
        pad = first.expand(-1, -1, missing, -1, -1) if pad_mode == "replicate" else torch.zeros_like(first).expand(
            -1, -1, missing, -1, -1)
        have = torch.cat([pad, have], dim=2)
    return have


def causal_conv3d_ref(x, weight, bias=None, *, stride=1, padding=None, pad_mode="zeros", cache=None, residual=None,
                      packed_weight=None):
    """Plain-torch causal conv3d in fp32 (fp64 for fp64 inputs); x's dtype and memory format out.
    ``packed_weight`` (a layout of ``weight`` for the triton kernel) is ignored."""
    md = math_dtype(x.dtype)
    kt, kh, kw = weight.shape[2:]
    stride = (stride,) * 3 if isinstance(stride, int) else tuple(stride)
    padding = (kh // 2, kw // 2) if padding is None else ((padding,) * 2 if isinstance(padding, int)
                                                          else tuple(padding))
    xf = x.to(md)
    if kt > 1:
        xf = torch.cat([_front_frames(xf, kt, pad_mode, None if cache is None else cache.to(md)), xf], dim=2)
    b = None if bias is None else bias.to(md)
    if xf.device.type == "cpu" and md == torch.float32 and torch.backends.mkldnn.is_available():
        # For batch 1 PyTorch's CPU heuristic picks the unfold-based slow_conv3d, 2x slower forward and
        # 3x slower backward than oneDNN, which it uses from batch 2 on. Same math, another summation order.
        out = torch.ops.aten.mkldnn_convolution(xf, weight.to(md), b, [0, *padding], list(stride), [1, 1, 1], 1)
    else:
        out = F.conv3d(xf, weight.to(md), b, stride=stride, padding=(0, *padding))
    if residual is not None:
        out = out + residual.to(md)
    return like_layout(out.to(x.dtype), x)


def causal_conv3d_pack_weight(weight: torch.Tensor) -> torch.Tensor:
    """The weight as the triton kernel reads it: ``(Cout, Cin, kt, kh, kw)`` -> ``(kt·kh·kw·Cin, Cout)``
    contiguous, K ordered (dt, dh, dw, cin); a constant (no autograd history)."""
    cout = weight.shape[0]
    return weight.detach().permute(2, 3, 4, 1, 0).reshape(-1, cout).contiguous()


def causal_conv3d_next_cache(x: torch.Tensor, cache: Optional[torch.Tensor], kernel_t: int) -> Optional[torch.Tensor]:
    """The cache for the next chunk: the last ``kernel_t - 1`` frames of the stream ``[cache, x]`` (fewer
    while the stream is shorter). Only those frames are copied: x's tail, and the cache's tail in front
    of it when x holds fewer than ``kernel_t - 1`` frames."""
    if kernel_t <= 1:
        return None
    keep = kernel_t - 1
    if cache is None or cache.shape[2] == 0 or x.shape[2] >= keep:
        return x[:, :, -keep:].clone()
    return torch.cat([cache[:, :, -(keep - x.shape[2]):], x], dim=2)


def _backward_ref(grad, x, weight, bias, **kw):
    names = ["x", "weight", "bias", "cache", "residual"]
    inputs = {"x": x, "weight": weight, "bias": bias, "cache": kw.pop("cache"), "residual": kw.pop("residual")}
    g = reference_vjp(causal_conv3d_ref, inputs, (grad,), names, **kw)
    return tuple(g[k] for k in names)
