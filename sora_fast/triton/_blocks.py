"""Host-side block bookkeeping for the packed attention kernels.

The launch grid is the real list of (sequence, block) pairs of a pack, not ``cdiv(max_seqlen) x B``,
so one long video packed with many short clips wastes no programs.

Window sparsity: tokens are in t-major raster order (t slowest, then h, then w). A block of
consecutive rows has a coordinate bounding box: its t range, its h range when it stays inside one
frame (else all rows), its w range when it stays inside one image row (else all columns). A key block
whose box is farther than the window from the query block's box on some axis holds no key any query
of the block may see: the kernels skip it without loading it. :func:`window_block_density` runs the
same test on the host to report the fraction of blocks visited.
"""
from __future__ import annotations

from typing import Sequence

import torch


def block_table(seqlens: Sequence[int], block: int, device) -> torch.Tensor:
    """``(num_blocks, 2)`` int32 table of (sequence index, first row inside the sequence)."""
    rows = [(i, start) for i, n in enumerate(seqlens) for start in range(0, n, block)]
    if not rows:
        return torch.empty(0, 2, dtype=torch.int32, device=device)
    return torch.tensor(rows, dtype=torch.int32, device=device)


def _box(first: int, last: int, grid: Sequence[int]) -> tuple[tuple[int, int], ...]:
    """Bounding box ((t0, t1), (h0, h1), (w0, w1)) of rows first..last of a t-major (T, H, W) grid."""
    _, gh, gw = grid
    hw = gh * gw
    t0, t1 = first // hw, last // hw
    h0, h1 = (first // gw) % gh, (last // gw) % gh
    w0, w1 = first % gw, last % gw
    same_frame, same_row = t0 == t1, first // gw == last // gw
    return (t0, t1), (h0, h1) if same_frame else (0, gh - 1), (w0, w1) if same_row else (0, gw - 1)


def blocks_interact(q_first: int, q_last: int, k_first: int, k_last: int, grid: Sequence[int],
                    window: Sequence[int]) -> bool:
    """Whether some query in rows q_first..q_last may see some key in rows k_first..k_last."""
    for (a0, a1), (b0, b1), w in zip(_box(q_first, q_last, grid), _box(k_first, k_last, grid), window):
        if b0 - a1 > w or a0 - b1 > w:
            return False
    return True


def window_block_density(grids: Sequence[Sequence[int]], window: Sequence[int], block_m: int,
                         block_n: int) -> tuple[int, int]:
    """(visited, total) query-block x key-block pairs over a pack of videos with these grids.

    ``visited / total`` scales the dense attention FLOPs of a windowed run; ``1 - visited / total``
    is the fraction of key blocks the kernel skips without loading.
    """
    visited = total = 0
    for grid in grids:
        n = int(grid[0]) * int(grid[1]) * int(grid[2])
        for qs in range(0, n, block_m):
            for ks in range(0, n, block_n):
                total += 1
                visited += blocks_interact(qs, min(qs + block_m, n) - 1, ks, min(ks + block_n, n) - 1, grid, window)
    return visited, total
