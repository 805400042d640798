"""What ``sora-fast train`` / ``generate`` need to run under ``torchrun`` with the flags they take alone.

Outside torchrun these return None / do nothing, so a single-process command is unchanged; under it they
join the process group (:func:`~sora_fast.distributed.mesh.init_distributed`) and build the mesh the
flags describe, checking the flags against the world size on every rank.
"""
from __future__ import annotations

from typing import Optional

import torch.distributed as dist
from torch import nn

from .fsdp import full_state_dict
from .mesh import ParallelMesh, check_same_on_all_ranks, init_distributed, make_mesh

__all__ = ["training_mesh", "sampling_mesh", "barrier", "load_unsharded", "make_trainer", "has_checkpoint",
           "save_pipeline"]


def _check_sp(sequence_parallel) -> None:
    if isinstance(sequence_parallel, bool) or not isinstance(sequence_parallel, int) or sequence_parallel < 1:
        raise ValueError(f"--sequence-parallel must be a positive int, got {sequence_parallel!r}")


def training_mesh(sequence_parallel: int = 1) -> Optional[ParallelMesh]:
    """``(dp, sp)`` mesh of ``sora-fast train``: ``world / sp`` data-parallel groups of ``sp`` ranks.
    None in a single process (where ``--sequence-parallel`` must be 1)."""
    _check_sp(sequence_parallel)
    if not init_distributed():
        if sequence_parallel != 1:
            raise ValueError(f"--sequence-parallel {sequence_parallel} needs {sequence_parallel} processes: launch "
                             f"with torchrun --nproc_per_node {sequence_parallel} -m sora_fast.cli train ...")
        return None
    return make_mesh(sequence_parallel, outer="dp")


def sampling_mesh(sequence_parallel: int = 1, cfg_parallel: bool = False,
                  guidance: Optional[float] = None) -> Optional[ParallelMesh]:
    """``(cfg, sp)`` mesh of ``sora-fast generate``: with ``cfg_parallel`` the world is 2 x sp (the two
    CFG halves), without it the world is sp. None in a single process (where both flags must be off)."""
    _check_sp(sequence_parallel)
    if not isinstance(cfg_parallel, bool):
        raise TypeError(f"cfg_parallel must be a bool, got {type(cfg_parallel).__name__}")
    want = sequence_parallel * (2 if cfg_parallel else 1)
    if not init_distributed():
        if want != 1:
            raise ValueError(f"--sequence-parallel {sequence_parallel}{' --cfg-parallel' if cfg_parallel else ''} "
                             f"needs {want} processes: launch with torchrun --nproc_per_node {want} -m sora_fast.cli "
                             f"generate ...")
        return None
    check_same_on_all_ranks("the flags (--sequence-parallel, --cfg-parallel, --guidance)",
                            (sequence_parallel, cfg_parallel, guidance))
    world = dist.get_world_size()
    if world != want:
        raise ValueError(f"--sequence-parallel {sequence_parallel}{' --cfg-parallel' if cfg_parallel else ''} "
                         f"needs a world size of {want}, torchrun started {world} processes")
    if cfg_parallel and guidance == 1.0:
        raise ValueError("--cfg-parallel needs --guidance != 1 (with guidance 1 there is no unconditional half)")
    return make_mesh(sequence_parallel, outer="cfg")


def barrier() -> None:
    """Wait for every rank (bounded by the process group's timeout); no-op in a single process."""
    if dist.is_initialized():
        dist.barrier()


def load_unsharded(target: nn.Module, sharded: nn.Module) -> bool:
    """Copy the full weights of an FSDP2-sharded module into ``target`` (a plain module of the same
    architecture) on rank 0. Returns True on rank 0, False elsewhere (``target`` untouched). A collective:
    every rank must call it."""
    sd = full_state_dict(sharded)
    if dist.is_initialized() and dist.get_rank() != 0:
        return False
    target.load_state_dict(sd)
    return True


def make_trainer(dit: nn.Module, text_encoder: nn.Module, items, config, run_dir, *, mesh: Optional[ParallelMesh],
                 model_config: dict, dit_2: Optional[nn.Module] = None, boundary: Optional[float] = None):
    """The single-process :class:`~sora_fast.training.trainer.Trainer` when ``mesh`` is None (with ``dit_2`` and
    ``boundary``: two experts), else a :class:`~sora_fast.distributed.trainer.DistributedTrainer` on it (one DiT)."""
    from ..training.trainer import Trainer
    from .trainer import DistributedTrainer

    if mesh is None:
        return Trainer(dit, text_encoder, items, config, run_dir, model_config=model_config, dit_2=dit_2,
                       boundary=boundary)
    if dit_2 is not None:
        raise ValueError("two experts (dit_2) train in one process for now, not under torchrun")
    return DistributedTrainer(dit, text_encoder, items, config, run_dir, mesh=mesh, model_config=model_config)


def has_checkpoint(run_dir, mesh: Optional[ParallelMesh]) -> bool:
    """Whether ``run_dir`` holds a checkpoint of the kind the run writes (sharded under a mesh)."""
    from ..training.checkpoint import latest_checkpoint
    from .checkpoint import latest_sharded

    return (latest_checkpoint(run_dir) if mesh is None else latest_sharded(run_dir)) is not None


def save_pipeline(pipe, directory, mesh: Optional[ParallelMesh]) -> bool:
    """``pipe.save(directory)``; under a mesh, rank 0 saves unsharded copies of the FSDP2-sharded DiT and
    (tiny, trained) text encoder. A collective under a mesh. Returns True where the pipeline was written."""
    if mesh is None:
        pipe.save(directory)
        return True
    from ..models.dit import VideoDiT
    from ..models.text import TinyTextEncoder
    from ..pipeline import VideoPipeline

    dit, text = VideoDiT(pipe.dit.config), pipe.text_encoder
    main = load_unsharded(dit, pipe.dit)
    if isinstance(text, TinyTextEncoder):
        text = TinyTextEncoder(pipe.text_encoder.config)
        load_unsharded(text, pipe.text_encoder)
    if main:
        VideoPipeline(dit, pipe.vae, text, sampling=pipe.sampling, caption_stats=pipe.caption_stats).save(directory)
    barrier()
    return main
