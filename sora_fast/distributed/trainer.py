"""Training on a ``(dp, sp)`` mesh: FSDP2-sharded weights and optimizer state, Ulysses sequence
parallelism, sharded (DCP) checkpoints.

A step is the single-process step of :class:`~sora_fast.training.trainer.Trainer`, cut across ranks:
every rank draws the same batch and random numbers (seeded by the step), the ``dp`` groups each take a
contiguous range of its videos (balanced by tokens), and the ``sp`` ranks of a group split that range's
tokens (:mod:`sora_fast.distributed.ulysses`). Each dp group's loss is scaled by its share of the batch's
videos, so the gradients summed by FSDP2's reduce-scatter, and the reported loss summed over dp groups,
are the single-process ones: the loss curve does not depend on the mesh (up to rounding).
SIGTERM on any rank stops every rank after the same step, with a checkpoint (as Ctrl-C does).
"""
from __future__ import annotations

import dataclasses
import math
from pathlib import Path
from typing import Any, Optional, Sequence, Union

import torch
import torch.distributed as dist
from torch import nn

from ..training.flow import add_noise, flow_matching_loss, token_levels
from ..training.trainer import TrainConfig, Trainer
from .checkpoint import latest_sharded, load_sharded, save_sharded
from .fsdp import apply_fsdp, default_param_dtype
from .mesh import ParallelMesh, check_same_on_all_ranks
from .packs import select_videos, video_ranges
from .ulysses import enable_sequence_parallel, sequence_parallel_forward

__all__ = ["DistributedTrainer"]


class DistributedTrainer(Trainer):
    """:class:`~sora_fast.training.trainer.Trainer` on a :class:`ParallelMesh` (``make_mesh(sp)``).

    Arguments as the Trainer's, plus ``mesh`` (None: one process, which still writes sharded
    checkpoints) and ``param_dtype`` (FSDP2 compute dtype of the weights; default bf16 on CUDA, the
    weights' own on the CPU). Checkpoints are :mod:`sora_fast.distributed.checkpoint` directories and
    resume at any world size. Every rank must construct it with the same arguments.
    """

    def __init__(self, dit: nn.Module, text_encoder: nn.Module, items: Sequence, config: TrainConfig,
                 run_dir: Union[str, Path], *, mesh: Optional[ParallelMesh] = None,
                 model_config: Optional[dict] = None, progress: bool = True,
                 param_dtype: Optional[torch.dtype] = None):
        self.mesh = mesh or ParallelMesh.single()
        if self.mesh.outer != "dp":
            raise ValueError(f"a training mesh must be ('dp', 'sp'), got outer dimension {self.mesh.outer!r}")
        if config.lora_rank:
            raise ValueError(f"lora_rank={config.lora_rank}: LoRA fine-tuning runs in one process; distributed "
                             f"training supports full training (lora_rank=0)")
        check_same_on_all_ranks("the model config", dataclasses.asdict(dit.config) if dataclasses.is_dataclass(
            getattr(dit, "config", None)) else None)
        enable_sequence_parallel(dit, self.mesh.sp_size)
        device = next(dit.parameters()).device
        self._param_dtype = param_dtype if param_dtype is not None else default_param_dtype(device)
        self.is_main = self.mesh.is_main
        super().__init__(dit, text_encoder, items, config, run_dir, model_config=model_config,
                         progress=progress and self.mesh.is_main)
        dp = self.mesh.outer_size
        small = [len(b) for b in self.plan.batches if len(b) < dp]
        if small:
            raise ValueError(f"{len(small)} planned batches hold fewer videos ({min(small)}) than the {dp} "
                             f"data-parallel groups, each of which needs one; raise token_budget "
                             f"({config.token_budget}) or use fewer data-parallel groups (more --sequence-parallel)")

    def _wrap_model(self, model: nn.Module) -> nn.Module:
        return apply_fsdp(model, self.mesh, param_dtype=self._param_dtype)

    def _local_batch(self, d: dict) -> tuple[Any, torch.Tensor, torch.Tensor, torch.Tensor, list[str]]:
        """This dp group's contiguous range of the step's videos: ``(x0, noise, levels, given, captions)``
        (``levels`` / ``given`` per latent frame of those videos)."""
        x0, noise, levels, given, captions = d["x0"], d["noise"], d["levels"], d["given"], d["captions"]
        if self.mesh.outer_size == 1:
            return x0, noise, levels, given, captions
        lo, hi = video_ranges(x0.seqlens, self.mesh.outer_size)[self.mesh.outer_rank]
        a, b = int(x0.cu_seqlens[lo]), int(x0.cu_seqlens[hi])
        frames = x0.frames_per_video
        fa, fb = sum(frames[:lo]), sum(frames[:hi])
        return (select_videos(x0, lo, hi), noise[a:b], levels[fa:fb], given[fa:fb], captions[lo:hi])

    def train_step(self, step: int) -> dict[str, float]:
        cfg = self.config
        d = self.draw(step)
        num_videos = len(d["indices"])
        x0, noise, levels, given, captions = self._local_batch(d)
        xt = add_noise(x0.tokens, noise, token_levels(x0, levels))                 # (N_dp, C·p)

        for group in self.optimizer.param_groups:
            group["lr"] = self._lr(step)
        self.model.train()
        with self._autocast():
            text = self.text_encoder.encode(captions)
            pred = sequence_parallel_forward(self.dit, x0.with_tokens(xt), levels * 1000, text,
                                             self.mesh.sp_group)                   # (N_dp, C·p)
        # the mean over this group's videos, weighted by its share of the batch's videos (every video keeps
        # a denoised frame, so each counts once whatever the conditioning mix gives)
        loss = flow_matching_loss(pred.float(), x0.tokens, noise, x0.seq_ids, x0.num_sequences,
                                  mask=self._loss_mask(x0, given)) * (x0.num_sequences / num_videos)
        self.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        params = [p for p in self.model.parameters() if p.requires_grad]
        gnorm = torch.nn.utils.clip_grad_norm_(params, cfg.grad_clip if cfg.grad_clip > 0 else math.inf)
        self.optimizer.step()
        if self.ema is not None:
            self.ema.update()
        total = loss.detach().clone()
        if self.mesh.outer_group is not None:
            dist.all_reduce(total, group=self.mesh.outer_group)
        if hasattr(gnorm, "full_tensor"):
            gnorm = gnorm.full_tensor()
        return {"loss": total.item(), "grad_norm": float(gnorm), "lr": self._lr(step),
                "tokens": d["x0"].num_tokens, "videos": num_videos}

    def _stop_requested(self) -> bool:
        """True on every rank once any rank received SIGTERM (one tiny all-reduce per step), so all ranks
        leave the loop after the same step and write the checkpoint together."""
        if not dist.is_initialized() or self.mesh.world_size == 1:
            return super()._stop_requested()
        device = "cuda" if dist.get_backend() == "nccl" else "cpu"
        flag = torch.tensor([1 if super()._stop_requested() else 0], dtype=torch.int32, device=device)
        dist.all_reduce(flag, op=dist.ReduceOp.MAX)
        return bool(flag.item())

    # --- sharded checkpoints ----------------------------------------------------------------------
    def save(self) -> Path:
        """Write the sharded checkpoint of the current step (every rank must call it)."""
        meta = {"config": self.model_config, "train": dataclasses.asdict(self.config), "mesh": self.mesh.describe()}
        return save_sharded(self.run_dir, self.step, self.model, self.optimizer, self.ema, meta=meta,
                            keep_last=self.config.keep_last)

    def resume(self, path: Optional[Union[str, Path]] = None, *, verify: bool = True) -> int:
        """Load ``path`` (default: this run's latest sharded checkpoint, or the newest older one that passes
        its integrity check, with a warning), saved at any world size. ``verify``: check file hashes."""
        if path is None and latest_sharded(self.run_dir) is None:
            raise FileNotFoundError(f"no complete sharded checkpoint to resume from in {self.run_dir}")
        record = load_sharded(path or self.run_dir, self.model, self.optimizer, self.ema, config=self.model_config,
                              verify=verify)
        self.step = int(record["step"])
        return self.step
