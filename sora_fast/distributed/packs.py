"""Cutting packed streams across ranks: contiguous video ranges and contiguous token shards.

Both keep the packing's invariants, so the pieces are ordinary :class:`~sora_fast.packing.PackedVideos`
the DiT accepts: a video range renumbers its sequences from 0; a token shard keeps all B sequences (its
``cu_seqlens`` are the global offsets clipped to the shard, so a sequence outside it has length 0 and
``seq_ids`` still index the per-video timestep and modulation tables). Timesteps follow a video range
with :func:`select_timesteps`, whichever of the DiT's two forms they take (per video or per latent frame).
"""
from __future__ import annotations

import dataclasses
from typing import Sequence

import torch

from ..packing import PackedSequences, PackedVideos

__all__ = ["even_splits", "video_ranges", "select_videos", "select_sequences", "select_timesteps",
           "token_shard"]


def even_splits(total: int, parts: int) -> list[int]:
    """``total`` items in ``parts`` contiguous pieces whose sizes differ by at most one (larger first)."""
    q, r = divmod(total, parts)
    return [q + (i < r) for i in range(parts)]


def video_ranges(seqlens: Sequence[int], parts: int) -> list[tuple[int, int]]:
    """Split B videos into ``parts`` contiguous non-empty ranges ``[lo, hi)`` with balanced token counts.

    Boundary i is the prefix closest to ``(i+1)/parts`` of the tokens, keeping at least one video for
    each range. Raises ValueError when B < parts.
    """
    b = len(seqlens)
    if b < parts:
        raise ValueError(f"a pack of {b} videos cannot be split across {parts} ranks (each needs one video); "
                         f"use larger batches (token_budget) or fewer data-parallel ranks")
    prefix = [0]
    for n in seqlens:
        prefix.append(prefix[-1] + n)
    bounds = [0]
    for i in range(1, parts):
        target = prefix[-1] * i / parts
        candidates = range(bounds[-1] + 1, b - (parts - i) + 1)
        bounds.append(min(candidates, key=lambda j: (abs(prefix[j] - target), j)))
    bounds.append(b)
    return list(zip(bounds[:-1], bounds[1:]))


def select_videos(x: PackedVideos, lo: int, hi: int) -> PackedVideos:
    """Videos ``lo:hi`` of ``x`` as their own pack (views of ``x``'s tokens; sequences renumbered from 0)."""
    if not 0 <= lo < hi <= x.num_sequences:
        raise ValueError(f"video range [{lo}, {hi}) must be non-empty inside [0, {x.num_sequences})")
    cu = x.cu_seqlens
    a, b = int(cu[lo]), int(cu[hi])
    lens = cu[lo + 1:hi + 1] - cu[lo:hi]
    return PackedVideos(tokens=x.tokens[a:b], cu_seqlens=cu[lo:hi + 1] - cu[lo], grid=x.grid[lo:hi],
                        coords=x.coords[a:b], seq_ids=x.seq_ids[a:b] - lo, max_seqlen=int(lens.max()),
                        patch=x.patch, frames=None if x.frames is None else x.frames[lo:hi], order=x.order,
                        tile=x.tile)


def select_sequences(s: PackedSequences, lo: int, hi: int) -> PackedSequences:
    """Sequences ``lo:hi`` of a packed text stream (renumbered from 0)."""
    if not 0 <= lo < hi <= s.num_sequences:
        raise ValueError(f"sequence range [{lo}, {hi}) must be non-empty inside [0, {s.num_sequences})")
    cu = s.cu_seqlens
    a, b = int(cu[lo]), int(cu[hi])
    lens = cu[lo + 1:hi + 1] - cu[lo:hi]
    return PackedSequences(tokens=s.tokens[a:b], cu_seqlens=cu[lo:hi + 1] - cu[lo], seq_ids=s.seq_ids[a:b] - lo,
                           max_seqlen=int(lens.max()))


def select_timesteps(x: PackedVideos, timesteps: torch.Tensor, lo: int, hi: int) -> torch.Tensor:
    """The timesteps of videos ``lo:hi`` of ``x``, in the form they came: ``(B,)`` per video -> rows
    ``lo:hi``; ``(F,)`` per latent frame (``F = x.grid[:, 0].sum()``, video by video) -> the rows of those
    videos' frames. When every video has one frame, B == F and both readings cut the same rows."""
    if not 0 <= lo < hi <= x.num_sequences:
        raise ValueError(f"video range [{lo}, {hi}) must be non-empty inside [0, {x.num_sequences})")
    b, frames = x.num_sequences, x.frames_per_video
    f = sum(frames)
    if timesteps.dim() != 1 or timesteps.shape[0] not in (b, f):
        raise ValueError(f"timesteps must have shape ({b},) or ({f},) for a pack of {b} videos with {f} latent "
                         f"frames, got {tuple(timesteps.shape)}")
    if timesteps.shape[0] == b:
        return timesteps[lo:hi]
    return timesteps[sum(frames[:lo]):sum(frames[:hi])]


def token_shard(x: PackedVideos, lo: int, hi: int) -> PackedVideos:
    """Tokens ``lo:hi`` of the stream with all B sequences kept: ``cu_seqlens`` clipped to the shard."""
    if not 0 <= lo < hi <= x.num_tokens:
        raise ValueError(f"token range [{lo}, {hi}) must be non-empty inside [0, {x.num_tokens})")
    cu = (x.cu_seqlens - lo).clamp(0, hi - lo)
    return dataclasses.replace(x, tokens=x.tokens[lo:hi], cu_seqlens=cu, coords=x.coords[lo:hi],
                               seq_ids=x.seq_ids[lo:hi], max_seqlen=int(cu.diff().max()))
