"""Per-pack work done once: what every layer, every call and every sampling step on the same packed
sequences needs besides the tokens (the offsets and grid read to the host, row ids, RoPE tables, the
attention layout), computed on first use and reused.

A :class:`PackPlan` holds the pack's metadata tensors and a memo. It stays valid while those tensors are
the same objects, unmodified (their version counters are recorded when the plan is made): a pack whose
metadata is replaced or changed in place gets a new plan (:meth:`PackPlan.describes`). Under
``torch.compile`` nothing is memoized (every call builds its value), so no cached tensor enters a graph.
"""
from __future__ import annotations

from typing import Any, Callable, Optional, Sequence

import torch

__all__ = ["PackPlan"]


def _version(t: Optional[torch.Tensor]) -> Optional[int]:
    """The in-place version counter of ``t`` (inference tensors have none: they are never modified
    outside inference mode)."""
    if t is None or t.is_inference():
        return None
    return t._version


class PackPlan:
    """The memo of one pack of sequences: ``cu_seqlens`` ``(B+1,)`` int32 and optionally ``grid`` ``(B, 3)``
    int32, ``coords`` ``(N, 3)`` int32 and ``seq_ids`` ``(N,)`` int32 (videos), or ``frames`` (host ints).

    ``host_cu`` / ``host_grid``: the values of cu_seqlens / grid when the caller already has them on the
    host (then they are not read back from the device); they must be the tensors' values.
    """

    _KEYS_KEPT = 4      # key packs (cross-attention) remembered at once: conditional + unconditional text, ...

    def __init__(self, cu_seqlens: torch.Tensor, grid: Optional[torch.Tensor] = None,
                 coords: Optional[torch.Tensor] = None, seq_ids: Optional[torch.Tensor] = None,
                 frames: Optional[tuple] = None, *, host_cu: Optional[Sequence[int]] = None,
                 host_grid: Optional[Sequence[Sequence[int]]] = None):
        self.cu_seqlens, self.grid, self.coords, self.seq_ids, self.frames = cu_seqlens, grid, coords, seq_ids, frames
        self._signature = self._sign(cu_seqlens, grid, coords, seq_ids, frames)
        self._memo: dict = {}
        self._keys: list = []   # (cu_seqlens_k, its version, its host values), newest last
        if host_cu is not None:
            self._memo["host"] = (list(host_cu), None if host_grid is None else [list(g) for g in host_grid])

    @staticmethod
    def _sign(cu_seqlens, grid, coords, seq_ids, frames) -> tuple:
        return tuple((t, _version(t)) for t in (cu_seqlens, grid, coords, seq_ids)) + (frames,)

    def describes(self, cu_seqlens, grid=None, coords=None, seq_ids=None, frames=None) -> bool:
        """Whether this plan was made from exactly these tensors (same objects, not modified since)."""
        sig = self._sign(cu_seqlens, grid, coords, seq_ids, frames)
        return all(a[0] is b[0] and a[1] == b[1] for a, b in zip(sig[:4], self._signature[:4])) \
            and sig[4] == self._signature[4]

    def made_from(self, mine: Optional[torch.Tensor], t: torch.Tensor) -> bool:
        """Whether ``t`` is ``mine`` (one of this plan's tensors), unmodified since the plan was made."""
        return mine is t and any(m is t and v == _version(t) for m, v in self._signature[:4])

    def memo(self, key, build: Callable[[], Any]) -> Any:
        """``build()`` once per ``key`` (any hashable naming the value and its parameters)."""
        if torch.compiler.is_compiling():
            return build()
        if key not in self._memo:
            with torch.no_grad(), torch.inference_mode(False):   # constants: no graph, usable in training
                self._memo[key] = build()
        return self._memo[key]

    # --- the pack on the host -------------------------------------------------------------------
    def _host(self) -> tuple[list, Optional[list]]:
        def read():
            parts = [self.cu_seqlens.reshape(-1)] + ([] if self.grid is None else [self.grid.reshape(-1)])
            flat = torch.cat([p.to(torch.int64) for p in parts]).tolist()   # one device-to-host transfer
            n = self.cu_seqlens.numel()
            grid = None if self.grid is None else [flat[i:i + 3] for i in range(n, len(flat), 3)]
            return flat[:n], grid
        return self.memo("host", read)

    @property
    def host_cu(self) -> list:
        """cu_seqlens as a list of ints."""
        return self._host()[0]

    @property
    def host_grid(self) -> Optional[list]:
        """grid as a list of ``[T', H', W']`` (None without a grid)."""
        return self._host()[1]

    def keys_host(self, cu_seqlens_k: Optional[torch.Tensor], host: Optional[Sequence[int]] = None) -> list:
        """The values of a key pack's cu_seqlens (cross-attention), read once per key pack (the last few
        are kept); None or this pack's own cu_seqlens: :attr:`host_cu`. ``host``: the values, when the
        caller has them on the host (remembered, not read)."""
        if cu_seqlens_k is None or cu_seqlens_k is self.cu_seqlens:
            return self.host_cu
        if torch.compiler.is_compiling():
            return cu_seqlens_k.tolist()
        version = _version(cu_seqlens_k)
        for t, v, known in self._keys:
            if t is cu_seqlens_k and v == version:
                return known
        host = cu_seqlens_k.tolist() if host is None else list(host)
        self._keys = [*self._keys[-(self._KEYS_KEPT - 1):], (cu_seqlens_k, version, host)]
        return host
