"""The pack's metadata (cu_seqlens, grid, the range of the RoPE coordinates, the window coordinates outside
the grid) read to the host in one device-to-host transfer, shared by an op's value checks, the references and
the kernels' launch tables."""
from __future__ import annotations

from typing import NamedTuple, Optional

import torch

from ._order import coords_counts

__all__ = ["PackOnHost", "read_pack"]


class PackOnHost(NamedTuple):
    """The pack's metadata read to the host: cu_seqlens_q, cu_seqlens_k and grid (None without one)
    as lists, ``rope_max``, the largest ``|coordinate|`` of the RoPE coordinates (None when they were not
    read; 0 for none), and of the window coordinates ``coords_outside``, how many lie outside their
    sequence's grid, and ``coords_moved``, how many tokens are not at their t-major raster row (0: the
    coordinates are the raster; both None when not read). The checks and the kernels' launch tables share
    it, so an op call waits for the device once (one transfer, see :func:`read_pack`) instead of once per
    ``.tolist()``."""
    cu_q: list
    cu_k: list
    grid: Optional[list]
    rope_max: Optional[int] = None
    coords_outside: Optional[int] = None
    coords_moved: Optional[int] = None


def read_pack(cu_seqlens_q: torch.Tensor, cu_seqlens_k: torch.Tensor, grid: Optional[torch.Tensor],
              rope_coords: Optional[torch.Tensor] = None, coords: Optional[torch.Tensor] = None) -> PackOnHost:
    """The values of cu_seqlens_q, cu_seqlens_k and grid, the largest ``|rope_coords|`` and the counts of
    ``coords`` outside the grid and off the raster when given, in one device-to-host transfer (reduced on
    their device first)."""
    counts = None
    if coords is not None and grid is not None:
        counts = coords_counts(cu_seqlens_q, grid, coords)
    parts = [cu_seqlens_q.reshape(-1), cu_seqlens_k.reshape(-1)] + ([] if grid is None else [grid.reshape(-1)])
    if counts is not None:
        parts.insert(0, counts)
    if rope_coords is not None and rope_coords.numel():
        parts.append(torch.stack([rope_coords.amax(), rope_coords.amin()]))
    flat = torch.cat([t.to(torch.int64) for t in parts]).tolist()
    outside = moved = None
    if counts is not None:
        (outside, moved), flat = flat[:2], flat[2:]
    rope_max = None
    if rope_coords is not None:
        rope_max = max(flat[-2], -flat[-1]) if rope_coords.numel() else 0
        flat = flat[:-2] if rope_coords.numel() else flat
    nq, nk = cu_seqlens_q.numel(), cu_seqlens_k.numel()
    g = None if grid is None else [flat[i:i + 3] for i in range(nq + nk, len(flat), 3)]
    return PackOnHost(flat[:nq], flat[nq:nq + nk], g, rope_max, outside, moved)
