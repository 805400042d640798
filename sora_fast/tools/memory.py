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

__all__ = ["PeakMemory"]


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
