"""Ulysses sequence parallelism for packed video streams.

The packed stream of B videos (N tokens) is cut into P contiguous token shards, one per rank of the
sequence-parallel group (:func:`~sora_fast.distributed.packs.even_splits`: shard sizes differ by at most
one token, whatever the videos' boundaries). Everything in a DiT block is per token (linears, adaLN by
``seq_ids``, cross-attention of a token to its own video's text) and runs on the shard, except
self-attention, which needs whole sequences. Around it, one all-to-all turns token shards of all H heads
into all N tokens of H/P heads:

    q, k, v (N_r, H, d) --all-to-all--> (N, H/P, d) --spacetime_attention(global cu_seqlens, grid,
    coords: windows and fused RoPE as in one process)--> (N, H/P, d) --all-to-all--> (N_r, H, d)

so each rank runs the varlen kernel on complete sequences for its heads (QK RMSNorm over all heads runs
before, on the shard, where every head is present). Memory per rank: activations N/P tokens; attention
state H/P heads. The output tokens are gathered back into the full stream at the end of the forward.

Gradients: every rank computes the same loss from the gathered output, so the backward of the gather is
the rank's own rows of the output gradient, and the parameter gradients of the P ranks are partial sums
that add up (FSDP2's reduce-scatter with a divide factor of 1, :mod:`sora_fast.distributed.fsdp`).
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any, Optional, Sequence

import torch
import torch.distributed as dist
from torch import nn

from .. import ops
from ..models.dit import Attention, VideoDiT
from ..packing import PackedSequences, PackedVideos
from .packs import even_splits, token_shard

__all__ = ["ShardedPackedVideos", "shard_videos", "ulysses_attention", "UlyssesAttention",
           "enable_sequence_parallel", "sequence_parallel_forward", "SequenceParallelDenoiser"]


def _world(group) -> int:
    return 1 if group is None else dist.get_world_size(group)


def _rank(group) -> int:
    return 0 if group is None else dist.get_rank(group)


def _all_to_all(x: torch.Tensor, send: Sequence[int], recv: Sequence[int], group) -> torch.Tensor:
    out = x.new_empty((sum(recv),) + tuple(x.shape[1:]))
    dist.all_to_all_single(out, x.contiguous(), list(recv), list(send), group=group)
    return out


class _AllToAll(torch.autograd.Function):
    """Rows ``x[sum(send[:j]) : sum(send[:j+1])]`` go to rank j; rows from rank i arrive in block i.
    Its gradient is the same exchange with ``send`` and ``recv`` swapped."""

    @staticmethod
    def forward(ctx, x, send, recv, group):
        ctx.args = (send, recv, group)
        return _all_to_all(x, send, recv, group)

    @staticmethod
    def backward(ctx, grad):
        send, recv, group = ctx.args
        return _all_to_all(grad, recv, send, group), None, None, None


class _GatherTokens(torch.autograd.Function):
    """All ranks' token shards ``(N_r, D)`` -> the full stream ``(N, D)`` on every rank. Backward keeps
    this rank's rows: the loss computed from the gathered stream is the same on every rank."""

    @staticmethod
    def forward(ctx, x, splits, group):
        p, r = len(splits), _rank(group)
        ctx.rows = (sum(splits[:r]), sum(splits[:r + 1]))
        return _all_to_all(x.repeat(p, 1), [splits[r]] * p, splits, group)

    @staticmethod
    def backward(ctx, grad):
        lo, hi = ctx.rows
        return grad[lo:hi], None, None


@dataclass(eq=False)
class ShardedPackedVideos(PackedVideos):
    """This rank's token shard of a packed stream (fields as :func:`~sora_fast.distributed.packs.token_shard`)
    plus what self-attention needs to see the whole stream: ``full`` (the unsharded pack), ``splits``
    (tokens per rank) and the sequence-parallel ``group``."""

    full: PackedVideos = None
    splits: tuple = ()
    group: Any = None


def shard_videos(x: PackedVideos, group) -> ShardedPackedVideos:
    """This rank's contiguous share of ``x``'s tokens (sizes from :func:`even_splits`)."""
    p, r = _world(group), _rank(group)
    if x.num_tokens < p:
        raise ValueError(f"a pack of {x.num_tokens} tokens cannot be split across {p} sequence-parallel ranks; "
                         f"each rank needs at least one token")
    splits = tuple(even_splits(x.num_tokens, p))
    lo = sum(splits[:r])
    shard = token_shard(x, lo, lo + splits[r])
    return ShardedPackedVideos(**{f.name: getattr(shard, f.name) for f in dataclasses.fields(PackedVideos)},
                               full=x, splits=splits, group=group)


def ulysses_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, x: ShardedPackedVideos, *,
                      window: Optional[Sequence[int]] = None, rope_theta: float = 10000.0,
                      backend: Optional[str] = None) -> torch.Tensor:
    """Self-attention of the whole packed stream from token shards: q, k, v ``(N_r, H, d)`` -> ``(N_r, H, d)``.

    H must be divisible by the group size P. The exchange packs q, k and v into one all-to-all each way.
    """
    p, splits, group = len(x.splits), list(x.splits), x.group
    n_r, heads, d = q.shape
    if heads % p:
        raise ValueError(f"Ulysses sequence parallelism needs the heads ({heads}) divisible by the "
                         f"sequence-parallel size, got {p}")
    qkv = torch.stack([q, k, v], dim=2).unflatten(1, (p, heads // p))           # (N_r, P, H/P, 3, d)
    qkv = _AllToAll.apply(qkv.transpose(0, 1).flatten(0, 1), [n_r] * p, splits, group)  # (N, H/P, 3, d)
    full = x.full
    o = ops.spacetime_attention(*qkv.unbind(2), full.cu_seqlens, max_seqlen_q=full.max_seqlen, window=window,
                                grid=full.grid, rope_coords=full.coords, rope_theta=rope_theta,
                                coords=full.coords, backend=backend)            # (N, H/P, d)
    o = _AllToAll.apply(o, splits, [n_r] * p, group)                            # (P·N_r, H/P, d)
    return o.unflatten(0, (p, n_r)).transpose(0, 1).flatten(1, 2)               # (N_r, H, d)


class UlyssesAttention(Attention):
    """:class:`~sora_fast.models.dit.Attention` whose self-attention on a :class:`ShardedPackedVideos`
    runs :func:`ulysses_attention`; on anything else (cross-attention, an unsharded pack) it is the
    parent's forward, unchanged."""

    def forward(self, y, x, context=None, text=None, *, window=None, rope_theta: float = 10000.0,
                backend: Optional[str] = None):
        if context is not None or not isinstance(x, ShardedPackedVideos):
            return super().forward(y, x, context, text, window=window, rope_theta=rope_theta, backend=backend)
        v = self.to_v(y).unflatten(1, (self.num_heads, -1))                      # (N_r, H, d)
        q = self._rms(self.norm_q, self.to_q(y), v.dtype)                         # (N_r, H, d)
        k = self._rms(self.norm_k, self.to_k(y), v.dtype)                         # (N_r, H, d)
        o = ulysses_attention(q, k, v, x, window=window, rope_theta=rope_theta, backend=backend)  # (N_r, H, d)
        return self.to_out(o.flatten(1))                                          # (N_r, D)


def enable_sequence_parallel(dit: VideoDiT, sp_size: int) -> VideoDiT:
    """Make ``dit``'s self-attention layers :class:`UlyssesAttention` (same parameters, in place) after
    checking the heads divide over ``sp_size`` ranks. A plain pack still runs exactly as before."""
    heads = dit.config.num_heads
    if isinstance(sp_size, bool) or not isinstance(sp_size, int) or sp_size < 1:
        raise ValueError(f"sp_size must be a positive int, got {sp_size!r}")
    if heads % sp_size:
        raise ValueError(f"sequence_parallel={sp_size} must divide the DiT's num_heads={heads} (Ulysses "
                         f"gives each rank num_heads / sequence_parallel whole heads)")
    for blk in dit.blocks:
        if type(blk.attn1) is Attention:
            blk.attn1.__class__ = UlyssesAttention
    return dit


def sequence_parallel_forward(dit: nn.Module, x: PackedVideos, timesteps: torch.Tensor, text: PackedSequences,
                              group) -> torch.Tensor:
    """``dit(x, timesteps, text)`` with ``x``'s tokens split over ``group``: returns the full ``(N, D_out)``
    prediction on every rank. Every rank of ``group`` must pass the same ``x``, ``timesteps`` and ``text``."""
    if _world(group) == 1:
        return dit(x, timesteps, text)
    xs = shard_videos(x, group)
    out = dit(xs, timesteps, text)                                               # (N_r, D_out)
    return _GatherTokens.apply(out, list(xs.splits), group)                      # (N, D_out)


class SequenceParallelDenoiser:
    """A denoiser for :func:`sora_fast.sampling.sample_euler` that runs ``dit`` sequence-parallel over
    ``group`` (call :func:`enable_sequence_parallel` on it first)."""

    def __init__(self, dit: nn.Module, group):
        self.dit, self.group = dit, group

    def __call__(self, x: PackedVideos, timesteps: torch.Tensor, text: PackedSequences) -> torch.Tensor:
        return sequence_parallel_forward(self.dit, x, timesteps, text, self.group)
