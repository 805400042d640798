"""Measured memory per rank of a distributed training step and a sequence-parallel denoising step.

    python -m sora_fast.distributed.memory                                   # one process
    torchrun --nproc_per_node 2 -m sora_fast.distributed.memory --sequence-parallel 2

For a random-weight DiT preset and one packed batch, each rank reports:
  * ``state``: bytes it holds between steps: parameters, AdamW moments and EMA shadow (its FSDP2 shards);
  * ``train step``: peak bytes of tensors created during one training step (forward, backward, optimizer
    step): activations, all-gathered weights, gradients (:class:`~sora_fast.tools.memory.PeakMemory`,
    exact on the CPU);
  * ``denoise step``: peak bytes of one inference forward of the same pack (sequence-parallel over
    ``--sequence-parallel`` ranks, weights gathered by FSDP2 unit by unit).
"""
from __future__ import annotations

import argparse
import json
import sys
from typing import Optional, Sequence

import torch
import torch.distributed as dist

from ..models.dit import VideoDiT
from ..models.text import TinyTextEncoder
from ..tools.memory import PeakMemory
from ..training.trainer import TrainConfig
from .launch import training_mesh
from .trainer import DistributedTrainer

__all__ = ["measure", "main"]


def _bytes(tensors) -> int:
    seen, total = set(), 0
    for t in tensors:
        t = t.to_local() if hasattr(t, "to_local") else t
        st = t.untyped_storage()
        if st.data_ptr() not in seen:
            seen.add(st.data_ptr())
            total += st.nbytes()
    return total


def measure(preset: str = "tiny", latent: Sequence[int] = (4, 8, 16, 16), videos: int = 2,
            sequence_parallel: int = 1, run_dir: str = "memory_run") -> dict:
    """Memory of this rank for ``videos`` latents of shape ``latent`` packed in one batch (see module doc)."""
    mesh = training_mesh(sequence_parallel)
    torch.manual_seed(0)
    dit = VideoDiT.from_name(preset, in_channels=latent[0], out_channels=latent[0])
    text = TinyTextEncoder(dim=dit.config.text_dim)
    items = [{"latent": torch.randn(*latent, generator=torch.Generator().manual_seed(i)), "caption": f"clip {i}"}
             for i in range(videos)]
    tokens = videos * (latent[1] * latent[2] * latent[3]) // dit.config.patch_volume
    cfg = TrainConfig(steps=2, token_budget=tokens, warmup_steps=0, save_every=100, log_every=100, caption_dropout=0.0)
    tr = DistributedTrainer(dit, text, items, cfg, run_dir, mesh=mesh, progress=False)
    tr.train_step(0)                                   # builds the optimizer state
    tr.optimizer.zero_grad(set_to_none=True)
    params = list(tr.model.parameters())
    opt = [v for s in tr.optimizer.state.values() for v in s.values() if isinstance(v, torch.Tensor) and v.dim()]
    ema = list(tr.ema.params.values()) if tr.ema is not None else []
    with PeakMemory() as mem:
        tr.train_step(1)
    train_peak = mem.peak
    tr.optimizer.zero_grad(set_to_none=True)
    d = tr.draw(0)
    from .ulysses import sequence_parallel_forward

    with torch.no_grad(), PeakMemory() as mem:
        sequence_parallel_forward(tr.dit, d["x0"], d["t"] * 1000, tr.text_encoder.encode(d["captions"]),
                                  None if mesh is None else mesh.sp_group)
    return {"rank": dist.get_rank() if dist.is_initialized() else 0, "world": mesh.world_size if mesh else 1,
            "sequence_parallel": sequence_parallel, "tokens": tokens, "params": _bytes(params),
            "optimizer": _bytes(opt), "ema": _bytes(ema), "state": _bytes(params) + _bytes(opt) + _bytes(ema),
            "train_step_peak": train_peak, "denoise_step_peak": mem.peak}


def main(argv: Optional[Sequence[str]] = None) -> int:
    p = argparse.ArgumentParser(prog="python -m sora_fast.distributed.memory", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--preset", default="tiny", help="DiT preset (default: %(default)s)")
    p.add_argument("--latent", default="4x8x16x16", metavar="CxTxHxW",
                   help="latent of each video (default: %(default)s)")
    p.add_argument("--videos", type=int, default=2, help="videos in the packed batch (default: %(default)s)")
    p.add_argument("--sequence-parallel", type=int, default=1, metavar="N",
                   help="ranks sharing one pack (under torchrun; default: %(default)s)")
    p.add_argument("--run-dir", default="memory_run", help="scratch run directory (default: %(default)s)")
    args = p.parse_args(argv)
    latent = tuple(int(v) for v in args.latent.lower().split("x"))
    r = measure(args.preset, latent, args.videos, args.sequence_parallel, args.run_dir)
    rows = [r]
    if dist.is_initialized():
        rows = [None] * dist.get_world_size()
        dist.all_gather_object(rows, r)
    if r["rank"] == 0:
        mib = 2.0 ** 20
        print(f"{args.preset} DiT, {r['tokens']} tokens in one pack, world {r['world']}, sequence parallel "
              f"{r['sequence_parallel']}")
        for row in rows:
            print(f"rank {row['rank']}: state {row['state'] / mib:.2f} MiB (params {row['params'] / mib:.2f}, "
                  f"AdamW {row['optimizer'] / mib:.2f}, EMA {row['ema'] / mib:.2f}) | train step peak "
                  f"{row['train_step_peak'] / mib:.2f} MiB | denoise step peak "
                  f"{row['denoise_step_peak'] / mib:.2f} MiB")
        print(json.dumps(rows))
    if dist.is_initialized():
        dist.destroy_process_group()
    return 0


if __name__ == "__main__":
    sys.exit(main())
