"""What a benchmark number is read against: the hardware floors (docs/kernels.md §4), the roofline units, and the
numerical tolerance a provider must meet before it is timed.

One home for the rules every benchmark applies (``sora-fast bench`` and the ``bench/bench_<op>.py`` scripts).
"""
from __future__ import annotations

from typing import Optional

import torch

__all__ = ["FLOORS", "REL_TOL", "UNIT_SCALE", "floor_for", "throughput", "pct_of_floor", "check_tolerance"]

# Datasheet floors (docs/kernels.md §4): dense bf16/fp16 tensor-core math and HBM bandwidth (SXM parts).
FLOORS = {"H100": {"TFLOP/s": 989.0, "GB/s": 3350.0}, "H200": {"TFLOP/s": 989.0, "GB/s": 4800.0}}
# A few units in the last place of each dtype (unit roundoff: fp32 6e-8, fp16 4.9e-4, bf16 3.9e-3), relative to
# the largest reference output: the allowance on top of 2x the reference's own error at that dtype.
REL_TOL = {torch.float32: 1e-5, torch.float16: 2e-3, torch.bfloat16: 2e-2, torch.float64: 1e-12}
# Work per second -> the roofline unit: FLOPs -> TFLOP/s, bytes -> GB/s.
UNIT_SCALE = {"TFLOP/s": 1e12, "GB/s": 1e9}


def floor_for(device_name: str, unit: str) -> Optional[float]:
    """The datasheet floor in ``unit`` of the first GPU in :data:`FLOORS` named in ``device_name`` (None: unknown)."""
    return next((f[unit] for k, f in FLOORS.items() if k in device_name), None)


def throughput(work: float, ms: float, unit: str) -> float:
    """``work`` (FLOPs for TFLOP/s, bytes for GB/s) done in ``ms`` milliseconds, in ``unit``."""
    return work / (ms * 1e-3) / UNIT_SCALE[unit]


def pct_of_floor(value: float, floor: Optional[float]) -> Optional[float]:
    """``value`` as a percentage of ``floor`` (None when no floor is known)."""
    return 100 * value / floor if floor else None


def check_tolerance(lowp_error: float, ref_max: float, dtype: torch.dtype) -> float:
    """flash-attn's rule: 2x the error of PyTorch's own low-precision computation against the high-precision
    reference, plus a few units in the last place of ``dtype`` (:data:`REL_TOL`) x max(1, max |reference|)."""
    return 2 * lowp_error + REL_TOL[dtype] * max(1.0, ref_max)
