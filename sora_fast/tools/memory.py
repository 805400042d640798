"""Peak tensor memory of a block of code, deterministic on any device (the CPU included).

``torch.cuda.max_memory_allocated`` answers "how much memory did this take" on a GPU, but the CPU has no
such counter and the process RSS is noisy (allocator caches, other threads). :class:`PeakMemory` counts
the bytes of tensor storage created while it is active and still alive, and the peak of that count.
"""
from __future__ import annotations

import weakref
from typing import Iterable

import torch
from torch.utils import _pytree as pytree
from torch.utils._python_dispatch import TorchDispatchMode, is_traceable_wrapper_subclass

try:  # the registry of torch.library.custom_op definitions (a private module: absent on some versions)
    from torch._library.custom_ops import OPDEFS as _OPDEFS
except ImportError:  # pragma: no cover
    _OPDEFS = {}

__all__ = ["PeakMemory", "saved_activations", "memory_plan"]


def _storages(t: torch.Tensor) -> list:
    """The storages holding ``t``'s data: its own, or its inner tensors' for a wrapper subclass such as the
    DTensor of an FSDP2-sharded parameter (which has no storage of its own)."""
    if is_traceable_wrapper_subclass(t):
        inner = (getattr(t, name) for name in t.__tensor_flatten__()[0])
        return [s for x in inner if isinstance(x, torch.Tensor) for s in _storages(x)]
    return [t.untyped_storage()]


class PeakMemory(TorchDispatchMode):
    """Live bytes of tensor storage allocated while active (``live``) and their maximum (``peak``).

    Every op output's storage is counted once when it first appears and uncounted when it is freed (a
    weakref finalizer on the storage object, which lives exactly as long as the storage), so the numbers
    are exact and the same on every run. sora_fast's custom ops (``torch.library.custom_op``) run their
    Python body inside the mode, so their temporaries count too.

    Tensors created before the mode, and views of them or in-place results on them made inside it, are not
    counted (an op output that shares an input's storage allocated nothing). Storages of ``exclude``
    (inputs, parameters, buffers) are never counted, however they are reached. Tensors created by factory
    functions (``torch.empty``, ``torch.zeros``) count: they dispatch too.

    Example::

        with torch.no_grad(), PeakMemory(exclude=model.parameters()) as mem:
            out = model(x)
        print(mem.peak, "bytes at peak,", mem.live, "still alive")
    """

    def __init__(self, exclude: Iterable[torch.Tensor] = ()):
        super().__init__()
        self.live = 0  # bytes of counted storages alive now
        self.peak = 0  # max of ``live`` while active
        self._excluded = {st.data_ptr() for t in exclude for st in _storages(t)}
        self._counted: set[int] = set()

    def reset_peak(self) -> None:
        """Start a new peak from the bytes alive now."""
        self.peak = self.live

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        opdef = _OPDEFS.get(func._schema.name) if func.namespace == "sora_fast" else None
        if opdef is not None:
            with self:  # the op's Python body: its intermediate tensors are counted as well
                out = opdef._init_fn(*args, **kwargs)
        else:
            out = func(*args, **kwargs)
        # an output sharing an input's storage (a view, an in-place or out= op) allocated nothing
        aliased = {st.data_ptr() for t in pytree.tree_leaves((args, kwargs)) if isinstance(t, torch.Tensor)
                   for st in _storages(t)}
        for st in (st for t in pytree.tree_leaves(out) if isinstance(t, torch.Tensor) for st in _storages(t)):
            ptr, n = st.data_ptr(), st.nbytes()
            if n and ptr not in self._excluded and ptr not in self._counted and ptr not in aliased:
                self._counted.add(ptr)
                self.live += n
                self.peak = max(self.peak, self.live)
                weakref.finalize(st, self._free, ptr, n)
        return out

    def _free(self, ptr: int, n: int) -> None:
        self._counted.discard(ptr)
        self.live -= n


# --- the memory plan of a fine-tune: ``python -m sora_fast.tools.memory`` ---------------------------------
def saved_activations(config, tokens: int = 1024, *, checkpointing: bool, layers: int = 1, text_tokens: int = 128,
                      dtype=torch.float32) -> int:
    """Bytes a ``VideoDiT`` of ``config`` with ``layers`` blocks keeps for backward after a forward over one video
    of ``tokens`` patch tokens (measured with :class:`PeakMemory`: the tensors alive after the forward, weights
    excluded)."""
    import dataclasses

    from ..models.dit import VideoDiT
    from ..packing import pack_sequences, pack_videos

    cfg = dataclasses.replace(config, num_layers=layers)
    dit = VideoDiT(cfg, checkpointing=checkpointing).to(dtype)
    pt, ph, pw = cfg.patch
    x = pack_videos([torch.randn(cfg.in_channels, pt, ph * tokens, pw, dtype=dtype)], patch=cfg.patch)
    text = pack_sequences([torch.randn(text_tokens, cfg.text_dim, dtype=dtype)])
    with torch.enable_grad(), PeakMemory(exclude=[*dit.parameters(), x.tokens, text.tokens]) as mem:
        out = dit(x, torch.tensor([500.0]), text)          # holds the graph, so the saved tensors stay alive
    return mem.live - out.untyped_storage().nbytes()     # the output is the loss's input, not saved for backward


def memory_plan(name: str, tokens: int = 1024, *, lora_rank: int = 0, weight_bytes: int = 2, text_tokens: int = 512,
                text_dim: int = 4096) -> dict:
    """The memory a fine-tune of preset ``name`` needs, in bytes: ``weights`` (bf16), ``grads_optimizer`` (fp32
    gradients + AdamW moments of what trains: all weights, or the LoRA adapters of rank ``lora_rank``), saved
    activations per ``tokens`` tokens without and with checkpointing (measured at full width on one and two
    blocks in fp32, extrapolated linearly in blocks, halved for bf16), and ``text_cache_per_caption`` (one
    caption's ``text_tokens`` rows of the encoder's width in bf16; the real tokens only are stored)."""
    from ..models.dit import DiTConfig

    cfg = DiTConfig.from_name(name)
    d, f, n_layers = cfg.dim, cfg.ffn_dim, cfg.num_layers
    with torch.device("meta"):
        from ..models.dit import VideoDiT

        n_params = sum(p.numel() for p in VideoDiT(cfg).parameters())
    trained = n_params if not lora_rank else n_layers * lora_rank * (8 * 2 * d + 2 * (d + f))
    act = {}
    for ckpt in (False, True):
        one, two = (saved_activations(cfg, tokens, checkpointing=ckpt, layers=k) for k in (1, 2))
        act[ckpt] = (one + (two - one) * (n_layers - 1)) // 2            # fp32 measured -> bf16
    return {"preset": name, "params": n_params, "weights": n_params * weight_bytes,
            "grads_optimizer": trained * 4 * 3, "activations_per_1k_tokens": act[False] * 1024 // tokens,
            "activations_per_1k_tokens_checkpointed": act[True] * 1024 // tokens,
            "text_cache_per_caption": text_tokens * text_dim * 2}


def _gib(b: int) -> str:
    return f"{b / 2**30:.2f} GiB"


def main(argv=None) -> int:
    import argparse

    p = argparse.ArgumentParser(prog="python -m sora_fast.tools.memory",
                                description="Memory plan of a Wan2.1 fine-tune: weights, gradients and optimizer, "
                                            "activations per 1k tokens with and without checkpointing, text cache.")
    p.add_argument("--preset", action="append", help="DiT preset(s) (default: wan2.1-1.3b and wan2.1-14b)")
    p.add_argument("--tokens", type=int, default=1024, help="tokens of the measured forward (default: %(default)s)")
    p.add_argument("--lora-rank", type=int, default=0, help="plan a LoRA fine-tune of this rank (default: full)")
    args = p.parse_args(argv)
    torch.set_grad_enabled(True)
    print("| preset | params | weights (bf16) | grads + AdamW (fp32) | activations / 1k tokens | "
          "checkpointed | text cache / caption |")
    print("|---|---|---|---|---|---|---|")
    for name in args.preset or ["wan2.1-1.3b", "wan2.1-14b"]:
        r = memory_plan(name, args.tokens, lora_rank=args.lora_rank)
        print(f"| {name} | {r['params'] / 1e9:.2f} B | {_gib(r['weights'])} | {_gib(r['grads_optimizer'])} | "
              f"{_gib(r['activations_per_1k_tokens'])} | {_gib(r['activations_per_1k_tokens_checkpointed'])} | "
              f"{r['text_cache_per_caption'] / 2**20:.1f} MiB |", flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
