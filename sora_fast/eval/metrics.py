"""Model-free video metrics for any clip, real ones included (VBench's model-free dimensions, PSNR, SSIM).

Clips are ``(T, H, W, 3)`` uint8 RGB or ``(3, T, H, W)`` float in [-1, 1]. Optical flow is OpenCV's
Farneback (``cv2.calcOpticalFlowFarneback`` on gray frames) and PSNR / SSIM are scikit-image's: both are the
``eval`` extra (``pip install "sora-fast[eval]"``); a metric whose library is missing raises an ImportError
that says which.

- ``temporal_flickering`` (VBench): ``1 - mean |frame[t+1] - frame[t]| / 255`` over the static regions of
  consecutive frames (pixels whose flow moves them less than ``static_px``); NaN when no pixel is static.
  VBench averages over whole frames of videos it selects as static; restricting to static pixels lets the
  metric run on any clip. Higher is steadier.
- ``dynamic_degree`` (VBench): per consecutive pair, the mean of the largest 5% of flow magnitudes; the clip
  is dynamic (1.0, else 0.0) when at least ``round(4 · T / 16)`` pairs exceed ``6 · min(H, W) / 256`` px
  (VBench's thresholds scaled to the frame, as it does; VBench uses RAFT flow, this uses Farneback).
- ``motion_smoothness``: every odd frame is predicted from its neighbours by a flow-based interpolator (the
  Farneback flow from ``t-1`` to ``t+1``, both neighbours warped half way along it and averaged) and scored
  ``1 - mean |predicted - actual| / 255``. VBench predicts the frames with AMT-S, a learned interpolation
  network that handles occlusion and large motion; this linear-flow interpolator does neither, so the
  scores are lower on fast or occluding motion and are comparable only with each other, not with VBench's.
- ``psnr`` / ``ssim`` against a reference clip of the same shape: per frame (``data_range=255``; SSIM over
  the colour channels with scikit-image's default 7x7 window, smaller for tiny frames), averaged.
"""
from __future__ import annotations

from typing import Optional

import numpy as np

from ..data.io import to_uint8

__all__ = ["METRICS", "temporal_flickering", "dynamic_degree", "motion_smoothness", "psnr", "ssim",
           "missing_libraries"]

METRICS = ("temporal_flickering", "dynamic_degree", "motion_smoothness", "psnr", "ssim")
_NEEDS = {"temporal_flickering": "cv2", "dynamic_degree": "cv2", "motion_smoothness": "cv2", "psnr": "skimage",
          "ssim": "skimage"}
_PACKAGE = {"cv2": "opencv-python-headless", "skimage": "scikit-image"}


def _import(module: str, metric: str):
    try:
        if module == "cv2":
            import cv2

            return cv2
        import skimage.metrics
        from skimage.metrics import peak_signal_noise_ratio, structural_similarity  # noqa: F401 (loads them)

        return skimage.metrics
    except ImportError as e:
        raise ImportError(f"{metric} needs {_PACKAGE[module]} (import {module} failed: {e}); install the eval extra: "
                          f"pip install \"sora-fast[eval]\"") from e


def missing_libraries() -> dict:
    """``{metric: why}`` for every metric of :data:`METRICS` whose library cannot be imported."""
    out = {}
    for m, mod in _NEEDS.items():
        try:
            _import(mod, m)
        except ImportError as e:
            out[m] = str(e)
    return out


def _frames(clip, name: str = "clip", min_frames: int = 2) -> np.ndarray:
    try:
        f = to_uint8(clip)
    except (TypeError, ValueError) as e:
        raise ValueError(f"{name} must be a (T, H, W, 3) uint8 or (3, T, H, W) float video, got {e}") from e
    if f.shape[0] < min_frames:
        raise ValueError(f"{name} must have >= {min_frames} frames, got {f.shape[0]}")
    return f


def _flows(frames: np.ndarray, step: int = 1) -> list[np.ndarray]:
    """Farneback flow ``(H, W, 2)`` from frame ``t`` to ``t + step`` for every ``t``."""
    cv2 = _import("cv2", "optical flow")
    gray = [cv2.cvtColor(f, cv2.COLOR_RGB2GRAY) for f in frames]
    win = int(max(5, min(15, min(frames.shape[1:3]) // 4)))
    return [cv2.calcOpticalFlowFarneback(a, b, None, 0.5, 3, win, 3, 5, 1.2, 0)
            for a, b in zip(gray[:-step], gray[step:])]


def temporal_flickering(clip, *, static_px: float = 0.5) -> float:
    """VBench's temporal flickering on static regions (module docstring); in [0, 1], NaN without static pixels."""
    f = _frames(clip)
    _import("cv2", "temporal_flickering")
    total, count = 0.0, 0
    for i, flow in enumerate(_flows(f)):
        still = np.hypot(flow[..., 0], flow[..., 1]) < static_px
        diff = np.abs(f[i + 1].astype(np.float64) - f[i].astype(np.float64))[still]
        total, count = total + diff.sum(), count + diff.size
    return float("nan") if count == 0 else float(1.0 - total / count / 255.0)


def dynamic_degree(clip) -> float:
    """VBench's dynamic degree of one clip: 1.0 when it moves, else 0.0 (module docstring)."""
    f = _frames(clip)
    _import("cv2", "dynamic_degree")
    t, h, w, _ = f.shape
    thres, need = 6.0 * min(h, w) / 256.0, max(1, round(4 * t / 16))
    scores = []
    for flow in _flows(f):
        mag = np.sort(np.hypot(flow[..., 0], flow[..., 1]).ravel())[::-1]
        scores.append(float(mag[:max(1, int(mag.size * 0.05))].mean()))
    return float(sum(s > thres for s in scores) >= need)


def motion_smoothness(clip) -> float:
    """Frame-interpolation score of the odd frames (module docstring); in [0, 1], needs >= 3 frames."""
    cv2 = _import("cv2", "motion_smoothness")
    f = _frames(clip, min_frames=3)
    h, w = f.shape[1:3]
    gx, gy = np.meshgrid(np.arange(w, dtype=np.float32), np.arange(h, dtype=np.float32))
    errs = []
    for i in range(1, f.shape[0] - 1, 2):
        flow = _flows(f[[i - 1, i + 1]])[0]
        prev = cv2.remap(f[i - 1], gx - flow[..., 0] / 2, gy - flow[..., 1] / 2, cv2.INTER_LINEAR,
                         borderMode=cv2.BORDER_REPLICATE)
        nxt = cv2.remap(f[i + 1], gx + flow[..., 0] / 2, gy + flow[..., 1] / 2, cv2.INTER_LINEAR,
                        borderMode=cv2.BORDER_REPLICATE)
        pred = (prev.astype(np.float64) + nxt.astype(np.float64)) / 2
        errs.append(np.abs(pred - f[i]).mean())
    return float(1.0 - np.mean(errs) / 255.0)


def _pair(clip, reference) -> tuple[np.ndarray, np.ndarray]:
    a, b = _frames(clip, min_frames=1), _frames(reference, "reference", min_frames=1)
    if a.shape != b.shape:
        raise ValueError(f"reference must have the clip's shape {a.shape}, got {b.shape}")
    return a, b


def psnr(clip, reference) -> float:
    """Mean per-frame PSNR (dB) against ``reference``; inf for identical frames is capped at 100 dB."""
    sm = _import("skimage", "psnr")
    a, b = _pair(clip, reference)
    vals = []
    for x, y in zip(a, b):
        vals.append(100.0 if np.array_equal(x, y) else float(sm.peak_signal_noise_ratio(y, x, data_range=255)))
    return float(np.mean(vals))


def ssim(clip, reference, *, win_size: Optional[int] = None) -> float:
    """Mean per-frame SSIM against ``reference`` (scikit-image, colour channels; window 7 or the largest odd
    size that fits)."""
    sm = _import("skimage", "ssim")
    a, b = _pair(clip, reference)
    win = win_size or min(7, (min(a.shape[1:3]) - 1) // 2 * 2 + 1)
    return float(np.mean([sm.structural_similarity(y, x, data_range=255, channel_axis=-1, win_size=win)
                          for x, y in zip(a, b)]))
