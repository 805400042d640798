"""3D rotary position embedding over (t, h, w) token coordinates, as Wan2.1 and diffusers' Wan apply it.

The D/2 rotary pairs of a head are split over the three axes (default: D - 4*(D//6), 2*(D//6),
2*(D//6) dims for t, h, w); pairs are interleaved ``(x[2i], x[2i+1])`` and rotated by
``coord_axis * theta ** (-2j / d_axis)`` for the j-th pair of that axis.
"""
from __future__ import annotations

from typing import Optional, Sequence

import torch

from ._common import math_dtype, reference_vjp

__all__ = ["rope3d_split", "rope3d_angles", "apply_rope3d_ref", "rope3d_tables", "rope3d_rotate"]


def rope3d_split(head_dim: int) -> tuple[int, int, int]:
    """Wan2.1's split of a head's ``head_dim`` dims over (t, h, w)."""
    hw = 2 * (head_dim // 6)
    return head_dim - 2 * hw, hw, hw


def rope3d_angles(coords: torch.Tensor, split: Sequence[int], theta: float = 10000.0) -> torch.Tensor:
    """Rotation angle of every rotary pair: ``(N, sum(split) // 2)`` float64 (exact for long videos)."""
    parts = []
    for axis, dims in enumerate(split):
        freqs = theta ** (-torch.arange(0, dims, 2, dtype=torch.float64, device=coords.device) / dims)
        parts.append(coords[:, axis, None].to(torch.float64) * freqs)
    return torch.cat(parts, dim=-1)


def apply_rope3d_ref(x: torch.Tensor, coords: torch.Tensor, *, theta: float = 10000.0,
                     split: Optional[Sequence[int]] = None) -> torch.Tensor:
    """Plain-torch 3D RoPE. x ``(N, H, D)``, coords ``(N, 3)`` int; fp32 math, x's dtype out."""
    split = tuple(split) if split is not None else rope3d_split(x.shape[-1])
    md = math_dtype(x.dtype)
    angles = rope3d_angles(coords, split, theta)[:, None, :]        # (N, 1, D/2)
    cos, sin = angles.cos().to(md), angles.sin().to(md)
    pairs = x.to(md).unflatten(-1, (-1, 2))                           # (N, H, D/2, 2)
    x1, x2 = pairs[..., 0], pairs[..., 1]
    out = torch.stack((x1 * cos - x2 * sin, x1 * sin + x2 * cos), dim=-1)
    return out.flatten(-2).to(x.dtype)


def rope3d_tables(coords: torch.Tensor, head_dim: int, theta: float = 10000.0, dtype: torch.dtype = torch.float32
                  ) -> torch.Tensor:
    """The rotation of every token as a complex table ``(N, 1, head_dim // 2)`` for :func:`rope3d_rotate`,
    ``cos + i sin`` of the reference's angles (float64, each part rounded once to ``dtype``, the real dtype
    of the math). A pack computes it once (``PackedVideos.plan``)."""
    angles = rope3d_angles(coords, rope3d_split(head_dim), theta)              # (N, D/2) float64
    return torch.complex(angles.cos().to(dtype), angles.sin().to(dtype))[:, None]


def rope3d_rotate(x: torch.Tensor, rot: torch.Tensor) -> torch.Tensor:
    """3D RoPE of ``x`` ``(N, H, D)`` from :func:`rope3d_tables`: each pair ``(x1, x2)`` as ``x1 + i x2`` times
    the table, which is the reference's ``(x1 cos - x2 sin, x1 sin + x2 cos)`` in one vectorized pass.
    Math in the table's real dtype, ``x``'s dtype out."""
    xf = x.to(rot.real.dtype).contiguous()
    return torch.view_as_real(torch.view_as_complex(xf.unflatten(-1, (-1, 2))) * rot).flatten(-2).to(x.dtype)


def _rope_backward_ref(grad, x, coords, *, theta, split):
    return reference_vjp(apply_rope3d_ref, {"x": x, "coords": coords}, (grad,), ["x"],
                         theta=theta, split=split)["x"]
