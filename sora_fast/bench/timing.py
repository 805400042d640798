"""How benchmarks time (docs/kernels.md §5), in one place for ``sora-fast bench`` and the ``bench/`` scripts.

- GPU: ``triton.testing.do_bench``, median; warm-up and measuring budgets by :func:`do_bench_budget`;
  inputs rotated past L2 (:func:`rotations`, :func:`cycle`) when one set of them would stay cached.
- CPU: the paths compared are interleaved in one process, warm-up first, so machine noise hits them alike
  (:func:`interleaved_times`, :func:`time_interleaved`); report ratios, not absolute times.
"""
from __future__ import annotations

import itertools
import statistics
import time
from typing import Any, Callable, Optional

__all__ = ["do_bench_budget", "do_bench_median", "rotations", "cycle", "interleaved_times", "time_interleaved"]


def do_bench_budget(quick: bool) -> tuple[float, float]:
    """(warm-up ms, measuring ms) for ``triton.testing.do_bench``: (25, 100) with ``quick``, else (100, 500)."""
    return (25.0, 100.0) if quick else (100.0, 500.0)


def do_bench_median(fn: Callable[[], Any], warmup: float = 25.0, rep: float = 100.0, **kw) -> float:
    """Median milliseconds per call of ``fn`` by ``triton.testing.do_bench`` (``kw``: e.g. ``grad_to_none``)."""
    import triton.testing

    return triton.testing.do_bench(fn, warmup=warmup, rep=rep, return_mode="median", **kw)


def rotations(bytes_per_set: int, l2_bytes: int) -> int:
    """How many input copies a provider cycles through: together more than 3x L2, at least 2."""
    return max(2, -(-3 * l2_bytes // max(1, bytes_per_set)))


def cycle(sets, fn: Callable[..., Any]) -> Callable[[], Any]:
    """A call of ``fn(*set)`` on the next of ``sets`` each time (see :func:`rotations`)."""
    it = itertools.cycle(sets)
    return lambda: fn(*next(it))


def interleaved_times(fns: dict[str, Callable[[], Any]], reps: int, warmup: int = 0,
                      sync: Optional[Callable[[], None]] = None, last: Optional[dict] = None) -> dict[str, list[float]]:
    """Seconds of each of ``reps`` calls of every function, the calls interleaved (``warmup`` untimed rounds first).

    ``sync`` (e.g. ``torch.cuda.synchronize``) runs before and after each timed call; ``last``, when given,
    receives each function's return value of its last call."""
    for _ in range(warmup):
        for f in fns.values():
            f()
    times: dict[str, list[float]] = {k: [] for k in fns}
    for _ in range(reps):
        for k, f in fns.items():
            if sync is not None:
                sync()
            t0 = time.perf_counter()
            out = f()
            if sync is not None:
                sync()
            times[k].append(time.perf_counter() - t0)
            if last is not None:
                last[k] = out
    return times


def time_interleaved(fns: dict[str, Callable[[], Any]], reps: int, warmup: int) -> dict[str, float]:
    """Median seconds per call of each function (and ``min:<name>``, the fastest repetition); calls
    interleaved so contention hits all alike."""
    times = interleaved_times(fns, reps, warmup)
    return {**{k: statistics.median(v) for k, v in times.items()}, **{f"min:{k}": min(v) for k, v in times.items()}}
