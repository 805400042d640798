"""How one tracked object moves, for the pixel captioner (:mod:`~sora_fast.captions.pixel`): its path in
looked-at frames classified into phases (still, moving, bouncing, dropped, thrown, leaving or entering the frame)
with their directions and speeds in the synthetic grammar's words."""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import TYPE_CHECKING, Optional

import numpy as np

from ..data.synthetic import SPEEDS
from ..data.world import GRAVITY

if TYPE_CHECKING:
    from .pixel import PixelThresholds

_AXES = ("left and right", "up and down")
_WAYS = {(0, -1): "left", (0, 1): "right", (1, -1): "up", (1, 1): "down"}


def _boundary(speeds: dict) -> float:
    return math.sqrt(speeds["slow"] * speeds["fast"])


def _speed_word(rel: float, boundary: float) -> str:
    return "fast" if rel >= boundary else "slow"


@dataclass
class _Phase:
    """What one object does from looked-at frame ``start`` on."""

    start: int
    action: Optional[str]
    direction: Optional[str] = None
    speed: Optional[str] = None


class _Motion:
    """Classifies an object's path (looked-at frames ``idx`` at times ``tt``, world coordinates ``xy``)."""

    def __init__(self, tt: np.ndarray, xy: np.ndarray, shape_hw: tuple, size: float, th: PixelThresholds,
                 edges: Optional[np.ndarray] = None):
        self.tt, self.xy, self.th = tt.astype(np.float64), xy, th
        self.h, self.w = shape_hw
        self.size = size
        self.edges = edges  # (T, 4) the blob's box in the frame (None when the camera moves)
        self.slow = np.array([SPEEDS["slow"] * self.w, SPEEDS["slow"] * self.h])  # px per frame along x, y

    def speed(self, v: float, k: int) -> str:
        return _speed_word(abs(v) / (self.w, self.h)[k], _boundary(SPEEDS))

    def fit(self, use: np.ndarray) -> np.ndarray:
        t, xy = self.tt[use], self.xy[use]
        tc = t - t.mean()
        return (tc[:, None] * (xy - xy.mean(0))).sum(0) / (tc * tc).sum()

    def still(self, use: np.ndarray) -> bool:
        """Its range is within ``still`` of the slow speed times the time (or ``still_px``) and so is its median
        speed over about 4 frames (a bounce near a wall turns back within a small range; over one frame a blob
        moves in whole pixels)."""
        xy, t = self.xy[use], self.tt[use]
        reach = np.maximum(self.th.still_px, self.th.still * self.slow * (t[-1] - t[0]))
        lag = min(use.size - 1, max(1, round(4 / float(np.median(np.diff(t))))))
        speed = np.median(np.abs(xy[lag:] - xy[:-lag]) / (t[lag:] - t[:-lag])[:, None], axis=0)
        return bool((np.ptp(xy, axis=0) <= reach).all() and (speed < self.th.still * self.slow).all())

    def classify(self, use: np.ndarray, *, splits: bool = True) -> list[_Phase]:
        """Phases over the looked-at frames ``use`` (sorted, >= 1)."""
        start = int(use[0])
        if use.size < 2:
            return [_Phase(start, None)]
        if self.still(use):
            return [_Phase(start, "still")]
        fall = self._fall(use)
        if fall is not None:
            return [fall]
        if splits:
            split = self._stop(use)
            if split is not None:
                return self.classify(use[:split], splits=False) + self.classify(use[split:], splits=False)
        v = self.fit(use)
        k = int(np.argmax(np.ptp(self.xy[use], axis=0)))
        turns, walls = self._turns(use, k)
        if turns and all(walls):
            return [_Phase(start, "bouncing", _AXES[k], self.speed(self._bounce_speed(use, turns, k), k))]
        if turns and splits:  # turns back in mid-frame: one phase per way
            cut = np.searchsorted(use, turns[0]) + 1
            return self.classify(use[:cut], splits=False) + self.classify(use[cut:], splits=True)
        return [_Phase(start, "moving", _WAYS[k, int(np.sign(v[k]) or 1)], self.speed(v[k], k))]

    @staticmethod
    def _stretches(use: np.ndarray, turns: list) -> list:
        """``use`` cut at the turning frames, which are left out (the wall or floor is hit next to them)."""
        pos = np.searchsorted(use, turns)
        bounds = [-1, *pos.tolist(), use.size]
        return [use[a + 1:b] for a, b in zip(bounds[:-1], bounds[1:])]

    def _bounce_speed(self, use: np.ndarray, turns: list, k: int) -> float:
        """px per frame along ``k``: the slopes of the stretches between turns, weighted by their frames; the
        longest step when no stretch has two frames."""
        num = den = 0.0
        for seg in self._stretches(use, turns):
            if seg.size >= 2:
                num += abs(float(self.fit(seg)[k])) * seg.size
                den += seg.size
        if den:
            return num / den
        return float(np.max(np.abs(np.diff(self.xy[use, k]) / np.diff(self.tt[use]))))

    def _fall(self, use: np.ndarray) -> Optional[_Phase]:
        """A fall: >= 6 frames over >= ``fall`` of the frame height whose height, cut where it bounces up off the
        floor, is parabolas of one curvature -- the world's gravity within ``gravity`` -- leaving under half the
        residual variance of straight stretches cut at every turn, where those leave two degrees of freedom (a wall
        bounce up and down is straight stretches; a thrown object's apex is smooth)."""
        y = self.xy[use, 1]
        if use.size < 6 or np.ptp(y) < self.th.fall * self.h:
            return None
        turns, _ = self._turns(use, 1)
        pos = np.searchsorted(use, turns)
        floor = [p for p in pos if y[p] > y[p - 1]]
        # a floor bounce between two looked-at frames may show no turn: one more cut where the object is near the
        # floor, if that leaves two degrees of freedom (with one, a cut anywhere fits any path)
        near = [] if self.edges is None else [
            p for p in range(2, use.size - 1) if p not in floor
            and self.h - np.nanmax(self.edges[use[p - 1:p + 1], 3]) <= 2.0 + abs(y[p] - y[p - 1])]
        fits = [self._piecewise(use, floor, quadratic=True)]
        fits += [f for f in (self._piecewise(use, sorted({*floor, p}), quadratic=True) for p in near)
                 if f is not None and f[2] >= 2]
        fits = [f for f in fits if f is not None]
        if not fits:
            return None
        rss, curvature, dof = min(fits, key=lambda f: f[0] / f[2])
        g = GRAVITY * self.h
        lo, hi = self.th.gravity
        straight = self._piecewise(use, list(pos), quadratic=False)  # with one degree of freedom it fits anything
        if not lo * g <= curvature <= hi * g or (straight is not None and straight[2] >= 2
                                                 and straight[0] / straight[2] < 2 * rss / dof):
            return None
        vx = float(self.fit(use)[0])
        if abs(vx) < self.th.still * self.slow[0]:
            return _Phase(int(use[0]), "dropped")
        return _Phase(int(use[0]), "thrown", _WAYS[0, int(np.sign(vx))], self.speed(vx, 0))

    def _piecewise(self, use: np.ndarray, cuts: list, *, quadratic: bool) -> Optional[tuple]:
        """The least-squares fit of the height over ``use`` cut at positions ``cuts`` into stretches, each its own
        line, plus (``quadratic``) one curvature for all: ``(residual sum of squares, 2 x the t^2 coefficient,
        degrees of freedom)``, the best over which side each cut's frame joins (the contact is between it and a
        neighbour); None without a degree of freedom left."""
        t, y = self.tt[use], self.xy[use, 1]
        best = None
        for sides in np.ndindex(*([2] * len(cuts))):
            bounds = [0, *[c + s for c, s in zip(cuts, sides)], use.size]
            cols = [t * t] if quadratic else []
            for a, b in zip(bounds[:-1], bounds[1:]):
                on = np.zeros(use.size)
                on[a:b] = 1.0
                cols += [on, on * t]
            x = np.stack(cols, 1)
            x = x[:, np.abs(x).sum(0) > 0]
            if use.size - x.shape[1] < 1 or np.linalg.matrix_rank(x) < x.shape[1]:
                continue
            coef, *_ = np.linalg.lstsq(x, y, rcond=None)
            rss = float(((x @ coef - y) ** 2).sum())
            if best is None or rss < best[0]:
                best = (rss, 2 * float(coef[0]) if quadratic else 0.0, use.size - x.shape[1])
        return best

    def _stop(self, use: np.ndarray) -> Optional[int]:
        """Where a still run of >= still_frames frames at the end (a stop) or the start (a start) begins or ends,
        as a position in ``use``; None without one."""
        n, t = use.size, self.tt[use]
        for j in range(n - 2):  # the longest still suffix
            tail = use[j:]
            if t[-1] - t[j] + 1 >= self.th.still_frames and tail.size >= 2 and j >= 2 and self.still_run(tail):
                return j if not self.still(use[:j]) else None
        for j in range(n, 2, -1):  # the longest still prefix
            head = use[:j]
            if t[j - 1] - t[0] + 1 >= self.th.still_frames and n - j >= 2 and self.still_run(head):
                return j if not self.still(use[j:]) else None
        return None

    def still_run(self, use: np.ndarray) -> bool:
        return bool((np.ptp(self.xy[use], axis=0) <= self.th.still_px).all())

    def _turns(self, use: np.ndarray, k: int) -> tuple[list, list]:
        """The looked-at frames where the path along ``k`` turns back, and whether each is at a wall: the blob's
        edge within the world's 1 px margin plus half the steps around the turn (and 1 px) of the border, or
        (no box edge to trust) its centre within that plus ``wall_slack`` of its size of where it touches."""
        u, t = self.xy[use, k], self.tt[use]
        du = np.diff(u) / np.diff(t)
        sig = np.nonzero(np.abs(du) >= self.th.step * self.slow[k])[0]
        side = (self.w, self.h)[k]
        lo, hi = 1.0 + self.size / 2, side - 1.0 - self.size / 2
        turns, walls = [], []
        for a, b in zip(sig[:-1], sig[1:]):
            if du[a] * du[b] >= 0:
                continue
            seg = np.arange(a + 1, b + 1)  # the extremum lies between the two steps
            j = int(seg[np.argmax(u[seg] * np.sign(du[a]))])
            reach = abs(du[a]) * (t[b + 1] - t[a]) / 2 + 1.0
            edge = np.nan if self.edges is None else self.edges[use[j], k + 2 if du[a] > 0 else k]
            if np.isfinite(edge):
                at_wall = (side - edge if du[a] > 0 else edge) <= 1.0 + reach
            else:
                at_wall = abs(u[j] - (hi if du[a] > 0 else lo)) <= reach + self.th.wall_slack * self.size
            turns.append(int(use[j]))
            walls.append(bool(at_wall))
        return turns, walls


# ----------------------------------------------------------------------------------------------
# the captioner
