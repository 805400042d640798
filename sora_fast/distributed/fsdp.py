"""FSDP2 (``torch.distributed.fsdp.fully_shard``) for the DiT and its text encoder.

Each DiT block's self-attention, cross-attention and FFN are FSDP units (their weights are all-gathered
just before they run and freed after); the root unit holds the rest (embedders, output head, the blocks'
small modulation tables and norms, which the DiT reads for all blocks before the first one runs).
Parameters, gradients and the optimizer state built on them are sharded over every rank of the run's
mesh (:attr:`ParallelMesh.fsdp_mesh`).

Gradient reduction is a plain sum (divide factor 1): the trainer scales each data-parallel rank's loss
by its share of the batch's videos, and sequence-parallel ranks hold partial gradients of one replicated
loss, so the sum over all ranks is exactly the single-process gradient.
"""
from __future__ import annotations

from typing import Optional

import torch
from torch import nn

from ..models.dit import DiTBlock
from .mesh import ParallelMesh

__all__ = ["apply_fsdp", "full_state_dict", "default_param_dtype"]


def default_param_dtype(device: torch.device) -> Optional[torch.dtype]:
    """bf16 compute weights on CUDA (fp32 master weights and fp32 gradient reduction), none on the CPU."""
    return torch.bfloat16 if torch.device(device).type == "cuda" else None


def apply_fsdp(model: nn.Module, mesh: ParallelMesh, *, param_dtype: Optional[torch.dtype] = None,
               reduce_dtype: Optional[torch.dtype] = torch.float32, reshard_after_forward: bool = True) -> nn.Module:
    """Shard ``model`` in place with FSDP2 over all ranks of ``mesh`` (returns it; no-op for one process).

    param_dtype: dtype the weights are gathered in for compute (``MixedPrecisionPolicy.param_dtype``;
    None keeps their own); reduce_dtype: dtype of the gradient reduce-scatter. The attention and FFN
    modules of every ``DiTBlock`` become FSDP units; the top-level models (``model`` itself, or each entry
    of a ``ModuleDict`` such as the trainer's ``{"dit", "text"}``, which has no forward of its own) become
    root units, and a text encoder's ``encode`` gathers its weights like a forward does. Build the
    optimizer after this call.
    """
    if mesh.mesh is None:
        return model
    from torch.distributed.fsdp import FSDPModule, MixedPrecisionPolicy, fully_shard, register_fsdp_forward_method

    kw = dict(mesh=mesh.fsdp_mesh, mp_policy=MixedPrecisionPolicy(param_dtype=param_dtype, reduce_dtype=reduce_dtype),
              reshard_after_forward=reshard_after_forward)
    for m in list(model.modules()):
        if isinstance(m, DiTBlock):
            for unit in (m.attn1, m.attn2, m.ffn):
                fully_shard(unit, **kw)
    roots = list(model.values()) if isinstance(model, nn.ModuleDict) else [model]
    for m in roots:
        fully_shard(m, **kw)
        if callable(getattr(m, "encode", None)):
            register_fsdp_forward_method(m, "encode")
    for m in model.modules():
        if isinstance(m, FSDPModule):
            m.set_gradient_divide_factor(1.0)
            m.set_force_sum_reduction_for_comms(True)  # SUM, not PREMUL_SUM(1.0): gloo has no PREMUL_SUM
    return model


def full_state_dict(model: nn.Module) -> dict:
    """The unsharded state dict of an FSDP2 (or plain) model on the CPU: complete on rank 0, empty on the
    other ranks. A collective: every rank must call it."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

    return get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
