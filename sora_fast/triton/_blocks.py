"""Block bookkeeping for the packed attention kernels: the launch table and the window's block lists.

The launch grid is the real list of (sequence, block) pairs of a pack, not ``cdiv(max_seqlen) x B``,
so one long video packed with many short clips wastes no programs.

Window sparsity, in the style of FlexAttention's ``kv_indices``: each program's block of rows (query
rows in the forward and the dQ kernel, key rows in the dK/dV kernel) gets the list of the other side's
blocks it must visit, built once per pack, window and tile shape on the device from the tokens'
``(t, h, w)`` coordinates (any token order: t-major or tile-major). A block's coordinate box is the
min and max of its tokens' coordinates on each axis. Two blocks interact when their boxes are within the
window on every axis (some pair may then be inside it; the kernel masks the pairs that are not); the
other block is **full** when even its farthest pair is inside the window on every axis and it lies wholly
inside its sequence: every pair of the tile is attended, so the kernel runs it without a mask. The box
test is exact for fullness (the extremes are attained by real tokens) and conservative for interaction.
The lists put the full blocks first, then the partial ones; a block that does not interact is never
listed, so the kernels neither load nor test it.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import torch

from ..reference._order import order_coords

__all__ = ["block_table", "BlockLists", "window_block_lists", "window_block_stats", "pack_coords"]


def block_table(seqlens: Sequence[int], block: int, device) -> torch.Tensor:
    """``(num_blocks, 2)`` int32 table of (sequence index, first row inside the sequence)."""
    rows = [(i, start) for i, n in enumerate(seqlens) for start in range(0, n, block)]
    if not rows:
        return torch.empty(0, 2, dtype=torch.int32, device=device)
    return torch.tensor(rows, dtype=torch.int32, device=device)


@dataclass(frozen=True)
class BlockLists:
    """Per row block ``p`` of a pack (``block_table(seqlens, row_block)`` order), the column blocks to visit.

    indices:   ``(P, W)`` int32, column block numbers inside the row block's sequence (block ``j`` is rows
               ``j * col_block ..`` of it): ``indices[p, :num_full[p]]`` are full blocks (no mask needed),
               ``indices[p, num_full[p]:num_visit[p]]`` partial ones (masked per element); the rest is
               padding. ``W >= 1``.
    num_full:  ``(P,)`` int32.
    num_visit: ``(P,)`` int32, full + partial.
    total:     the number of (row block, column block) pairs of the pack's sequences (the dense count).
    """

    indices: torch.Tensor
    num_full: torch.Tensor
    num_visit: torch.Tensor
    total: int

    @property
    def visited(self) -> int:
        return int(self.num_visit.sum())

    @property
    def full(self) -> int:
        return int(self.num_full.sum())


def pack_coords(grids: Sequence[Sequence[int]], device=None, order: str = "t-major",
                tile: Sequence[int] | None = None) -> torch.Tensor:
    """``(N, 3)`` int32 (t, h, w) of every token of a pack of videos with these grids, in ``order``
    (``"t-major"`` or ``"tile"``, as ``pack_videos`` lays them out)."""
    if not grids:
        return torch.empty(0, 3, dtype=torch.int32, device=device)
    return torch.cat([order_coords(g, order, tile, device) for g in grids]).to(torch.int32)



def _boxes(coords: torch.Tensor, seqlens: Sequence[int], block: int):
    """Per block of ``block`` consecutive rows of each sequence: (lo (P, 3), hi (P, 3), complete (P,), the
    sequence of each block (P,), its block number inside the sequence (P,)), int64 on coords' device."""
    dev = coords.device
    counts = torch.tensor([-(-n // block) for n in seqlens], dtype=torch.int64, device=dev)
    lens = torch.tensor(list(seqlens), dtype=torch.int64, device=dev)
    seq = torch.repeat_interleave(torch.arange(len(seqlens), device=dev), counts)      # (P,)
    first_block = torch.cumsum(counts, 0) - counts
    local = torch.arange(seq.numel(), device=dev) - first_block[seq]                  # block number in its sequence
    n = coords.shape[0]
    tok_seq = torch.repeat_interleave(torch.arange(len(seqlens), device=dev), lens, output_size=n)
    starts = torch.cumsum(lens, 0) - lens
    tok_block = first_block[tok_seq] + (torch.arange(n, device=dev) - starts[tok_seq]) // block
    c = coords.to(torch.int64)
    idx = tok_block[:, None].expand(-1, 3)
    big = torch.iinfo(torch.int64).max
    lo = torch.full((seq.numel(), 3), big, dtype=torch.int64, device=dev).scatter_reduce(0, idx, c, "amin")
    hi = torch.full((seq.numel(), 3), -big, dtype=torch.int64, device=dev).scatter_reduce(0, idx, c, "amax")
    complete = (local + 1) * block <= lens[seq]
    return lo, hi, complete, seq, local


def window_block_lists(seqlens: Sequence[int], coords: torch.Tensor, window: Sequence[int], row_block: int,
                       col_block: int) -> BlockLists:
    """The block lists of a self-attention pack (module docstring), on ``coords``' device, without a host
    loop over sequences or blocks.

    seqlens:   the sequences' lengths (host ints; rows and columns share them: self-attention).
    coords:    ``(N, 3)`` int (t, h, w) of every token inside its own video, in packing order.
    window:    ``(wt, wh, ww)`` half-sizes >= 0.
    row_block, col_block: the kernel's tile heights on the two sides.
    """
    dev = coords.device
    rlo, rhi, _, rseq, _ = _boxes(coords, seqlens, row_block)
    clo, chi, ccomplete, _, _ = _boxes(coords, seqlens, col_block)
    ncols = torch.tensor([-(-n // col_block) for n in seqlens], dtype=torch.int64, device=dev)
    col_first = torch.cumsum(ncols, 0) - ncols
    rows = rseq.numel()
    width = int(ncols.max()) if len(seqlens) else 0
    if rows == 0 or width == 0:
        z = torch.zeros(rows, dtype=torch.int32, device=dev)
        return BlockLists(torch.zeros(rows, 1, dtype=torch.int32, device=dev), z, z.clone(), 0)
    # every (row block, column block of its sequence) pair, as a (P, width) matrix; columns past a
    # sequence's own count are padding
    j = torch.arange(width, device=dev)
    exists = j[None, :] < ncols[rseq][:, None]                                       # (P, width)
    col = (col_first[rseq][:, None] + j[None, :]).clamp_max(clo.shape[0] - 1)       # global column block
    w = torch.tensor([int(x) for x in window], dtype=torch.int64, device=dev)
    a_lo, a_hi = rlo[:, None, :], rhi[:, None, :]
    b_lo, b_hi = clo[col], chi[col]                                                  # (P, width, 3)
    near = ((b_lo - a_hi <= w) & (a_lo - b_hi <= w)).all(-1) & exists
    full = ((b_hi - a_lo <= w) & (a_hi - b_lo <= w)).all(-1) & near & ccomplete[col]
    key = torch.where(full, 0, torch.where(near, 1, 2)).to(torch.int8)
    order = torch.sort(key, dim=1, stable=True).indices                             # full, partial, skipped
    num_full = full.sum(1)
    num_visit = near.sum(1)
    keep = max(1, int(num_visit.max()))
    return BlockLists(order[:, :keep].to(torch.int32).contiguous(), num_full.to(torch.int32),
                      num_visit.to(torch.int32), int(ncols[rseq].sum()))


def window_block_stats(grids: Sequence[Sequence[int]], window: Sequence[int], block_m: int, block_n: int,
                       order: str = "t-major", tile: Sequence[int] | None = None,
                       granule: Sequence[int] | None = None) -> dict:
    """What a windowed launch over videos of these grids, packed in ``order`` (``tile`` for ``"tile"``),
    visits at tiles ``block_m x block_n`` (query rows x key rows): ``{"visited", "full", "total"}`` block
    pairs. ``visited / total`` scales the dense attention FLOPs; ``full / visited`` is the share of visited
    blocks run without a mask. ``granule``: the window counted in whole cells of this size (coordinates
    ``// granule``, Sliding Tile Attention's tile-granular mask; the kernels run it when given those
    coordinates as ``coords``); None: centred on each token."""
    seqlens = [int(t) * int(h) * int(w) for t, h, w in grids]
    coords = pack_coords(grids, "cpu", order, tile)
    if granule is not None:
        coords = (coords // torch.tensor([int(g) for g in granule], dtype=torch.int32)).to(torch.int32)
    lists = window_block_lists(seqlens, coords, window, block_m, block_n)
    return {"visited": lists.visited, "full": lists.full, "total": lists.total}
