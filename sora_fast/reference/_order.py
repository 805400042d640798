"""Token orders of one video's ``(T', H', W')`` patch grid, as pure index math.

``"t-major"``: raster order, t slowest, then h, then w (what :func:`sora_fast.packing.pack_videos` gives by
default). ``"tile"``: the grid is cut into ``tile = (tt, th, tw)`` tiles (the far tiles of an axis the grid
does not divide are smaller: no padding), tiles are visited in t-major order over the tile grid, and the
tokens inside a tile in t-major raster order. A tile as large as the grid is the t-major order.

Everything here is a permutation of the t-major raster: :func:`order_rows` gives, for each token of the
order, its row in the t-major raster; :func:`pack_t_major_rows` does the same for a whole pack from each
token's ``(t, h, w)``, whatever order it came in.
"""
from __future__ import annotations

import numbers
from typing import Optional, Sequence

import torch

__all__ = ["ORDERS", "DEFAULT_TILE", "check_tile", "check_order", "order_rows", "order_coords", "pack_t_major_rows",
           "coords_counts", "t_major_permutation", "t_major_order"]

ORDERS = ("t-major", "tile")
DEFAULT_TILE = (4, 8, 8)


def check_tile(tile, name: str = "tile") -> tuple[int, int, int]:
    """``tile`` as 3 positive ints (None: :data:`DEFAULT_TILE`); TypeError / ValueError naming ``name``."""
    tile = DEFAULT_TILE if tile is None else tile
    if not isinstance(tile, (tuple, list, torch.Size)):
        raise TypeError(f"{name} must be a tuple of 3 positive ints (tt, th, tw), got {tile!r} ({type(tile).__name__})")
    if len(tile) != 3 or not all(isinstance(s, numbers.Integral) and not isinstance(s, bool) and s >= 1
                                 for s in tile):
        raise ValueError(f"{name} must be 3 positive ints (tt, th, tw), in latent patches, got {tuple(tile)!r}")
    return tuple(int(s) for s in tile)


def check_order(order, tile, name: str = "order", tile_name: str = "tile"
                ) -> tuple[str, Optional[tuple[int, int, int]]]:
    """``(order, tile)`` checked: the order name and the tile (:func:`check_tile`), or None for ``"t-major"``
    (which has no tile; a given one is still checked). Errors name ``name`` / ``tile_name``."""
    if not isinstance(order, str):
        raise TypeError(f"{name} must be a str, one of {', '.join(map(repr, ORDERS))}, "
                        f"got {order!r} ({type(order).__name__})")
    if order not in ORDERS:
        raise ValueError(f"{name} must be one of {', '.join(map(repr, ORDERS))}, got {order!r}")
    tile = check_tile(tile, tile_name)
    return order, (None if order == "t-major" else tile)


def order_rows(grid_thw: Sequence[int], order: str = "t-major", tile: Optional[Sequence[int]] = None,
               device=None) -> torch.Tensor:
    """``(T*H*W,)`` int64: for each token of one video in ``order``, its row in the t-major raster."""
    t, h, w = (int(g) for g in grid_thw)
    rows = torch.arange(t * h * w, device=device)
    if order == "t-major":
        return rows
    tt, th, tw = tile
    nh, nw = -(-h // th), -(-w // tw)                                        # tiles per axis (ceil)
    c = grid_coords_t_major((t, h, w), device)                               # (L, 3)
    tile_id = ((c[:, 0] // tt) * nh + c[:, 1] // th) * nw + c[:, 2] // tw    # (L,) t-major over the tiles
    return torch.sort(tile_id, stable=True).indices                          # stable: raster inside a tile


def grid_coords_t_major(grid_thw: Sequence[int], device=None) -> torch.Tensor:
    """``(T*H*W, 3)`` int64 ``(t, h, w)`` of every token in the t-major raster."""
    axes = [torch.arange(int(n), device=device) for n in grid_thw]
    return torch.stack(torch.meshgrid(*axes, indexing="ij"), dim=-1).reshape(-1, 3)


def order_coords(grid_thw: Sequence[int], order: str = "t-major", tile: Optional[Sequence[int]] = None,
                 device=None) -> torch.Tensor:
    """``(T*H*W, 3)`` int64 ``(t, h, w)`` of every token of one video in ``order``."""
    c = grid_coords_t_major(grid_thw, device)
    return c if order == "t-major" else c[order_rows(grid_thw, order, tile, device)]


def _sequence_of_rows(cu_seqlens: torch.Tensor, n: int, device) -> torch.Tensor:
    """``(N,)`` int64 sequence of every row (no host sync; rows past the last offset count as the last one)."""
    seq = torch.searchsorted(cu_seqlens[1:].long(), torch.arange(n, device=device), right=True)
    return seq.clamp_max(max(cu_seqlens.shape[0] - 2, 0))


def _placed(cu_seqlens: torch.Tensor, grid: torch.Tensor, coords: torch.Tensor
            ) -> tuple[torch.Tensor, torch.Tensor]:
    """``(rows, outside)``: :func:`pack_t_major_rows` and the 0-d count of tokens outside their grid, from one
    lookup of every token's sequence (no host sync)."""
    seq = _sequence_of_rows(cu_seqlens, coords.shape[0], coords.device)                              # (N,)
    g, c = grid.long()[seq], coords.long()                                                             # (N, 3)
    rows = cu_seqlens.long()[seq] + (c[:, 0] * g[:, 1] + c[:, 1]) * g[:, 2] + c[:, 2]
    return rows, ((c < 0) | (c >= g)).any(dim=1).sum()


def pack_t_major_rows(cu_seqlens: torch.Tensor, grid: torch.Tensor, coords: torch.Tensor) -> torch.Tensor:
    """``(N,)`` int64: the row each token would have in the t-major pack of the same sequences, from its
    ``(t, h, w)`` (``coords`` ``(N, 3)``) and its sequence's grid. A permutation of ``0..N-1`` when every
    sequence's coords are a permutation of its grid (not checked here). No host sync."""
    return _placed(cu_seqlens, grid, coords)[0]


def coords_counts(cu_seqlens: torch.Tensor, grid: torch.Tensor, coords: torch.Tensor) -> torch.Tensor:
    """``(2,)`` int64 on the device: how many tokens have a ``(t, h, w)`` outside their sequence's grid, and how
    many are not at their row of the t-major raster (0: the coords are the raster of ``grid``); no sync."""
    rows, outside = _placed(cu_seqlens, grid, coords)
    return torch.stack([outside, (rows != torch.arange(coords.shape[0], device=coords.device)).sum()])


def t_major_permutation(cu_seqlens: torch.Tensor, grid: torch.Tensor, coords: torch.Tensor
                        ) -> Optional[tuple[torch.Tensor, torch.Tensor]]:
    """``(rows, inverse)`` ``(N,)`` int64 with ``t_major = x[inverse]`` and ``x = t_major[rows]`` for tokens
    ``x`` at ``coords``; None when the tokens already are in the t-major raster. Checks (one host sync) that
    each sequence's coords are a permutation of its grid: ValueError naming ``coords`` otherwise."""
    n = coords.shape[0]
    rows, outside = _placed(cu_seqlens, grid, coords)                                   # (N,), ()
    counts = torch.bincount(rows.clamp(0, max(n - 1, 0)), minlength=n)[:n]
    outside, repeated = torch.stack([outside, (counts != 1).sum()]).tolist()
    if outside or repeated:
        raise ValueError(f"coords must hold each token's (t, h, w) inside its own video's grid, every position of "
                         f"the grid once per sequence (a permutation of the grid), got {outside} tokens outside "
                         f"the grid and {repeated} grid positions not covered exactly once")
    arange = torch.arange(n, device=coords.device)
    if torch.equal(rows, arange):
        return None
    return rows, torch.empty_like(rows).scatter_(0, rows, arange)


def t_major_order(plan, cu_seqlens: torch.Tensor, grid: torch.Tensor, coords: torch.Tensor
                  ) -> Optional[tuple[torch.Tensor, torch.Tensor]]:
    """:func:`t_major_permutation` once per pack: ``plan`` is the pack's
    :class:`~sora_fast.reference._plan.PackPlan`, made from these tensors."""
    return plan.memo("t-major order", lambda: t_major_permutation(cu_seqlens, grid, coords))
