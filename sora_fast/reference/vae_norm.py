"""VAE normalization + SiLU on video feature maps ``(B, C, T, H, W)`` in plain torch: the references and
their reference backwards.

    group_norm_silu:        GroupNorm over C/G channels x T x H x W, affine, then SiLU
    channel_rms_norm_silu:  Wan-VAE's norm: x / max(||x||_2 over C, eps) * sqrt(C) * weight + bias, then SiLU
"""
from __future__ import annotations

import math

import torch

from ._common import like_layout, math_dtype, reference_vjp

__all__ = ["group_norm_silu_ref", "channel_rms_norm_silu_ref"]


def _per_channel(p: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    return p.to(x.dtype).reshape(1, -1, *([1] * (x.dim() - 2)))


def group_norm_silu_ref(x, num_groups, weight=None, bias=None, *, eps=1e-6, silu=True):
    """Plain-torch GroupNorm (+ SiLU) in fp32; x's dtype and memory format out."""
    md = math_dtype(x.dtype)
    xf = x.to(md)
    g = xf.reshape(x.shape[0], num_groups, math.prod(x.shape[1:]) // num_groups)  # (B, G, C/G * T*H*W); B = 0 too
    mean = g.mean(dim=-1, keepdim=True)
    var = (g - mean).square().mean(dim=-1, keepdim=True)
    y = ((g - mean) * torch.rsqrt(var + eps)).reshape(x.shape)
    if weight is not None:
        y = y * _per_channel(weight, y)
    if bias is not None:
        y = y + _per_channel(bias, y)
    if silu:
        y = y * torch.sigmoid(y)
    return like_layout(y.to(x.dtype), x)


def channel_rms_norm_silu_ref(x, weight, bias=None, *, eps=1e-12, silu=True):
    """Plain-torch Wan-VAE channel RMS norm (+ SiLU) in fp32; x's dtype and memory format out."""
    md = math_dtype(x.dtype)
    xf = x.to(md)
    norm = xf.square().sum(dim=1, keepdim=True).sqrt().clamp_min(eps)  # as F.normalize
    y = xf / norm * (x.shape[1] ** 0.5) * _per_channel(weight, xf)
    if bias is not None:
        y = y + _per_channel(bias, y)
    if silu:
        y = y * torch.sigmoid(y)
    return like_layout(y.to(x.dtype), x)


def _gn_backward_ref(grad, x, num_groups, weight, bias, **kw):
    g = reference_vjp(group_norm_silu_ref, {"x": x, "num_groups": num_groups, "weight": weight, "bias": bias},
                      (grad,), ["x", "weight", "bias"], **kw)
    return g["x"], g["weight"], g["bias"]


def _rms_backward_ref(grad, x, weight, bias, **kw):
    g = reference_vjp(channel_rms_norm_silu_ref, {"x": x, "weight": weight, "bias": bias}, (grad,),
                      ["x", "weight", "bias"], **kw)
    return g["x"], g["weight"], g["bias"]
