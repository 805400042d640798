"""A lower bound of the memory a generation needs, checked before any work starts.

Sizes that pass the divisibility rules are otherwise unbounded: ``10001x10000x10000`` would end in an
allocator error after the models loaded and the prompts were encoded. :func:`check_generate_memory`
counts only what surely has to be allocated (the DiT weights, the packed token stream and its widest
activations, the decoded videos), so it never refuses a size that fits; it refuses clearly, naming the
estimate and the limit, when even that exceeds the device's memory (``torch.cuda.mem_get_info``'s total
on a GPU, the physical memory on a CPU).
"""
from __future__ import annotations

import math
import os
from typing import Optional, Sequence

import torch

__all__ = ["physical_memory", "device_memory", "estimate_generate_memory", "check_generate_memory"]


def physical_memory() -> Optional[int]:
    """The machine's physical memory in bytes (None where the OS does not say)."""
    try:
        pages, page = os.sysconf("SC_PHYS_PAGES"), os.sysconf("SC_PAGE_SIZE")
    except (AttributeError, ValueError, OSError):
        return None
    return pages * page if pages > 0 and page > 0 else None


def device_memory(device: torch.device) -> Optional[int]:
    """Total memory of ``device`` in bytes: the GPU's on CUDA, the physical memory otherwise."""
    if device.type == "cuda":
        try:
            return int(torch.cuda.mem_get_info(device)[1])
        except (RuntimeError, AssertionError):  # pragma: no cover - no usable CUDA runtime
            return None
    return physical_memory()


def _gib(n: float) -> str:
    return f"{n / 2**30:,.1f} GiB"


def estimate_generate_memory(pipe, shapes: Sequence[Sequence[int]], sizes: Sequence[Sequence[int]],
                             cfg: bool) -> dict:
    """Lower bounds in bytes of what :meth:`VideoPipeline.generate` allocates for latents ``shapes``
    ``(C, T', H', W')`` and videos ``sizes`` ``(T, H, W)``: ``weights`` (DiT(s) + VAE + text), ``stream``
    (the packed tokens, doubled by CFG, times the widest per-token activations), ``video`` (the largest
    decoded video, on the device) and ``videos`` (all decoded videos, kept on the CPU)."""
    cfg_d = pipe.dit.config
    p = math.prod(cfg_d.patch)
    tokens = sum(math.prod(s[1:]) // p for s in shapes) * (2 if cfg else 1)
    act = next(pipe.dit.parameters()).element_size()
    width = 4 * cfg_d.dim + cfg_d.ffn_dim        # hidden state, q/k/v and the FFN's inner activation
    models = (pipe.dit, getattr(pipe, "dit_2", None), pipe.vae, pipe.text_encoder)   # dit_2: a second expert
    weights = sum(t.numel() * t.element_size() for m in models if m is not None for t in m.parameters())
    video_bytes = [3 * math.prod(s) * 4 for s in sizes]       # float32 (3, T, H, W)
    return {"weights": weights, "stream": tokens * width * act, "video": max(video_bytes),
            "videos": sum(video_bytes), "tokens": tokens}


def check_generate_memory(pipe, shapes, sizes, cfg: bool, name: str = "size") -> dict:
    """Raise a ValueError naming the estimate and the limit when the lower bound of
    :func:`estimate_generate_memory` exceeds the memory of the pipeline's device (and, on a GPU, the
    decoded videos exceed the CPU's). Returns the estimate."""
    est = estimate_generate_memory(pipe, shapes, sizes, cfg)
    device = next(pipe.dit.parameters()).device
    dev_limit, host_limit = device_memory(device), physical_memory()
    if device.type == "cuda":
        checks = [(f"device {device}", dev_limit, est["weights"] + max(est["stream"], est["video"])),
                  ("the CPU", host_limit, est["videos"])]
    else:
        checks = [(f"device {device}", dev_limit, est["weights"] + max(est["stream"], est["videos"]))]
    for where, limit, need in checks:
        if limit is not None and need > limit:
            sz = ", ".join("x".join(str(v) for v in s) for s in sizes)
            raise ValueError(
                f"{name} {sz}: generating needs at least {_gib(need)} on {where} (weights {_gib(est['weights'])}, "
                f"{est['tokens']:,} tokens x activations {_gib(est['stream'])}, decoded video(s) "
                f"{_gib(est['videos'])}) but it has {_gib(limit)}; use a smaller size")
    return est
