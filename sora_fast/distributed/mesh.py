"""Process groups and the 2D device mesh of a sora_fast run on ``torch.distributed``.

Every multi-process feature (FSDP2 training, Ulysses sequence parallelism, CFG-parallel sampling) runs
on one ``(outer, "sp")`` :class:`~torch.distributed.device_mesh.DeviceMesh` over all ranks: ``"sp"``
groups the ranks that share one packed stream (tokens split across them), ``outer`` is ``"dp"`` for
training (each group of ``sp`` ranks trains on its own videos) or ``"cfg"`` for sampling (the conditional
and unconditional halves of classifier-free guidance). FSDP2 shards the weights over all ranks of the
mesh (both dimensions flattened), so adding sequence parallelism never duplicates weights.

Collectives are guarded by the process group's timeout (:func:`init_distributed`), and every check of
the arguments either runs identically on every rank or compares the ranks' arguments first
(:func:`check_same_on_all_ranks`), so bad input raises the same clear error on every rank instead of
leaving some ranks waiting in a collective.
"""
from __future__ import annotations

import datetime
import os
from dataclasses import dataclass
from typing import Any, Optional

import torch
import torch.distributed as dist

__all__ = ["DEFAULT_TIMEOUT_S", "ParallelMesh", "init_distributed", "launched_by_torchrun", "check_same_on_all_ranks",
           "make_mesh"]

DEFAULT_TIMEOUT_S = 300.0
_OUTER_NAMES = ("dp", "cfg")


def launched_by_torchrun() -> bool:
    """True inside a process started by ``torchrun`` (it sets ``WORLD_SIZE``, ``RANK`` and ``LOCAL_RANK``)."""
    return all(k in os.environ for k in ("WORLD_SIZE", "RANK", "LOCAL_RANK"))


def init_distributed(backend: Optional[str] = None, *, timeout_s: float = DEFAULT_TIMEOUT_S) -> bool:
    """Join the process group described by torchrun's environment (no-op when already joined).

    backend: ``"nccl"`` when CUDA is available, else ``"gloo"`` (CPU). timeout_s: every collective
    that waits longer raises instead of hanging (a rank that died or took another code path).
    Returns False, and does nothing, outside torchrun (a single-process run).
    """
    if isinstance(timeout_s, bool) or not isinstance(timeout_s, (int, float)) or not timeout_s > 0:
        raise ValueError(f"timeout_s must be a positive number of seconds, got {timeout_s!r}")
    if dist.is_initialized():
        return True
    if not launched_by_torchrun():
        return False
    backend = backend or ("nccl" if torch.cuda.is_available() else "gloo")
    if backend == "nccl":
        torch.cuda.set_device(int(os.environ["LOCAL_RANK"]))
    dist.init_process_group(backend, timeout=datetime.timedelta(seconds=timeout_s))
    return True


def check_same_on_all_ranks(name: str, value: Any, group: Optional[dist.ProcessGroup] = None) -> None:
    """Raise the same ValueError on every rank of ``group`` unless all ranks passed an equal ``value``.

    One ``all_gather_object`` (bounded by the process group's timeout); call it before any check that
    could fail on some ranks only, so no rank is left waiting in a later collective.
    """
    if not dist.is_initialized() or dist.get_world_size(group) == 1:
        return
    values: list = [None] * dist.get_world_size(group)
    dist.all_gather_object(values, value, group=group)
    if any(v != values[0] for v in values):
        shown = ", ".join(f"rank {i}: {v!r}" for i, v in enumerate(values))
        raise ValueError(f"{name} must be the same on every rank, got {shown}")


def _device_type() -> str:
    if dist.is_initialized() and dist.get_backend() == "nccl":
        return "cuda"
    return "cpu"


@dataclass
class ParallelMesh:
    """The ranks of a run as an ``(outer, "sp")`` grid; ``mesh`` is None for a single process.

    outer:      ``"dp"`` (training: data parallel) or ``"cfg"`` (sampling: CFG halves).
    Properties give each dimension's size, this rank's coordinate and its process group (None when the
    dimension has one rank), and ``fsdp_mesh``: the 1D mesh over all ranks that FSDP2 shards over.
    """

    mesh: Optional[Any]
    outer: str = "dp"

    @classmethod
    def single(cls, outer: str = "dp") -> "ParallelMesh":
        return cls(None, outer)

    def _size(self, dim: str) -> int:
        return 1 if self.mesh is None else self.mesh[dim].size()

    def _rank(self, dim: str) -> int:
        return 0 if self.mesh is None else self.mesh[dim].get_local_rank()

    def _group(self, dim: str):
        return None if self.mesh is None or self._size(dim) == 1 else self.mesh[dim].get_group()

    @property
    def sp_size(self) -> int:
        return self._size("sp")

    @property
    def sp_rank(self) -> int:
        return self._rank("sp")

    @property
    def sp_group(self):
        return self._group("sp")

    @property
    def outer_size(self) -> int:
        return self._size(self.outer)

    @property
    def outer_rank(self) -> int:
        return self._rank(self.outer)

    @property
    def outer_group(self):
        return self._group(self.outer)

    @property
    def world_size(self) -> int:
        return self.sp_size * self.outer_size

    @property
    def is_main(self) -> bool:
        """Rank 0 of the run: the one that writes logs, metadata and outputs."""
        return self.mesh is None or dist.get_rank() == 0

    @property
    def fsdp_mesh(self):
        """All ranks as one mesh dimension (the flattened ``(outer, "sp")`` grid), for ``fully_shard``."""
        if self.mesh is None:
            return None
        name = f"{self.outer}_sp"
        try:
            return self.mesh[name]
        except (KeyError, RuntimeError):
            return self.mesh[(self.outer, "sp")]._flatten(name)

    def describe(self) -> dict:
        return {self.outer: self.outer_size, "sp": self.sp_size}


def make_mesh(sequence_parallel: int = 1, *, outer: str = "dp") -> ParallelMesh:
    """The run's ``(outer, "sp")`` mesh: ``world_size // sequence_parallel`` x ``sequence_parallel``.

    Outside a process group (a single process) only ``sequence_parallel=1`` is valid and the mesh is
    :meth:`ParallelMesh.single`. The ranks' arguments are compared first, so a rank launched with other
    flags (mismatched meshes) makes every rank raise the same error.
    """
    if outer not in _OUTER_NAMES:
        raise ValueError(f"outer must be one of {_OUTER_NAMES}, got {outer!r}")
    check_same_on_all_ranks("the mesh (sequence_parallel, outer)", (sequence_parallel, outer))
    if isinstance(sequence_parallel, bool) or not isinstance(sequence_parallel, int) or sequence_parallel < 1:
        raise ValueError(f"sequence_parallel must be a positive int, got {sequence_parallel!r}")
    world = dist.get_world_size() if dist.is_initialized() else 1
    if world % sequence_parallel:
        raise ValueError(f"sequence_parallel={sequence_parallel} must divide the world size {world} "
                         f"(the mesh is world_size/sequence_parallel x sequence_parallel)")
    if not dist.is_initialized():
        return ParallelMesh.single(outer)
    from torch.distributed.device_mesh import init_device_mesh

    mesh = init_device_mesh(_device_type(), (world // sequence_parallel, sequence_parallel),
                            mesh_dim_names=(outer, "sp"))
    return ParallelMesh(mesh, outer)
