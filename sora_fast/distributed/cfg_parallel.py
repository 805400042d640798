"""CFG-parallel denoising: the conditional and unconditional halves of a guided pack on different ranks.

:func:`sora_fast.sampling.sample_euler` packs the B conditional copies of the videos, then the B
unconditional ones, into one stream of 2B videos and calls the denoiser once per step.
:class:`CFGParallelDenoiser` is such a denoiser: on a ``cfg`` group of G ranks it runs only its own G-th of
the pack's videos (rank 0 the conditional half, rank 1 the unconditional half when G = 2), optionally
sequence-parallel over an ``sp`` group, and gathers the velocities of all videos on every rank, so the
sampler, its schedule and its guidance formula stay exactly the single-process ones. Timesteps may be
per video ``(B,)`` or per latent frame ``(F,)`` (the sampler's form when some frames are given): each rank
takes those of its own videos (:func:`~sora_fast.distributed.packs.select_timesteps`).
"""
from __future__ import annotations

import torch
import torch.distributed as dist
from torch import nn

from ..packing import PackedSequences, PackedVideos
from .mesh import ParallelMesh
from .packs import select_sequences, select_timesteps, select_videos
from .ulysses import enable_sequence_parallel, sequence_parallel_forward

__all__ = ["CFGParallelDenoiser", "make_denoiser"]


def _gather_rows(x: torch.Tensor, splits: list[int], group) -> torch.Tensor:
    """Row blocks of every rank (sizes ``splits``, in rank order) concatenated, on every rank."""
    p, r = len(splits), dist.get_rank(group)
    out = x.new_empty((sum(splits),) + tuple(x.shape[1:]))
    dist.all_to_all_single(out, x.repeat(p, 1).contiguous(), splits, [splits[r]] * p, group=group)
    return out


class CFGParallelDenoiser:
    """Run ``dit`` on this rank's share of the pack's videos, return the whole pack's velocities.

    cfg_group: the ranks that split the videos (G ranks: the pack's video count must be a multiple of G,
    2B with guidance); sp_group: optional sequence-parallel group inside each share (the DiT must have
    gone through :func:`~sora_fast.distributed.ulysses.enable_sequence_parallel`). Inference only.
    """

    def __init__(self, dit: nn.Module, cfg_group, sp_group=None):
        self.dit, self.cfg_group, self.sp_group = dit, cfg_group, sp_group

    @torch.no_grad()
    def __call__(self, x: PackedVideos, timesteps: torch.Tensor, text: PackedSequences) -> torch.Tensor:
        g = 1 if self.cfg_group is None else dist.get_world_size(self.cfg_group)
        if g == 1:
            return sequence_parallel_forward(self.dit, x, timesteps, text, self.sp_group)
        b = x.num_sequences
        if b % g:
            raise ValueError(f"CFG-parallel over {g} ranks needs a pack whose video count is a multiple of {g} "
                             f"(the conditional and unconditional copies: guidance != 1), got {b} videos")
        r, k = dist.get_rank(self.cfg_group), b // g
        lo, hi = r * k, (r + 1) * k
        out = sequence_parallel_forward(self.dit, select_videos(x, lo, hi), select_timesteps(x, timesteps, lo, hi),
                                        select_sequences(text, lo, hi), self.sp_group)   # (N_r, D_out)
        cu = x.cu_seqlens.tolist()
        return _gather_rows(out, [cu[(i + 1) * k] - cu[i * k] for i in range(g)], self.cfg_group)


def make_denoiser(dit: nn.Module, mesh: ParallelMesh):
    """The denoiser for a ``("cfg", "sp")`` mesh: ``dit`` itself for one process, else a
    :class:`CFGParallelDenoiser` (sequence-parallel inside each CFG half when ``sp > 1``)."""
    if mesh.outer != "cfg":
        raise ValueError(f"a sampling mesh must be ('cfg', 'sp'), got outer dimension {mesh.outer!r}")
    if mesh.mesh is None:
        return dit
    enable_sequence_parallel(dit, mesh.sp_size)
    return CFGParallelDenoiser(dit, mesh.outer_group, mesh.sp_group)
