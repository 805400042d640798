"""World-model probes: a clip judged against what its caption of the synthetic world implies.

Every probe (:data:`PROBES`) is True (passed), False (failed, with a reason) or None (the caption does not
call for it). Objects are followed by the clip checker's tracker (:func:`~sora_fast.data.checker.track_object`,
one track per colour named in the caption) and shapes by its blob classifier
(:func:`~sora_fast.data.checker.classify_shape`, majority over the frames where the object shows its full
area). ``side`` is the frame's side along the motion axis; speeds are px per frame; tolerances are
:class:`ProbeTolerances`.

- ``present``: each object found in >= 90% of the frames (the checker's rule); behind a wide bar, found in the
  first and the last frame and in at least half of them.
- ``colour``: the caption's colour holds most palette pixels (two objects: its two colours are the top two).
- ``shape``: the majority shape of each object's blob is the captioned one.
- ``direction``: the captioned way (the checker's rule for one object moving or bouncing; a thrown object's
  horizontal velocity; a dropped one falls at first; two objects: each one before they meet).
- ``speed``: the measured speed along the axis within ``speed_tol`` (relative) of the caption's speed
  (bouncing: the median step; two objects: before they meet).
- ``identity``: in every window of ``identity_window`` frames with any palette pixel, the caption's colours
  win the window's palette vote and each object's shape holds at least a third of its window's shape votes.
- ``permanence`` (a wide bar): the object starts on one side of the detected bar, is wholly hidden in some
  frame, comes out on the other side in the last frame where the line fitted to its path before the bar
  puts it (within ``permanence_tol_frac`` of the side), with its shape.
- ``bounce`` (bouncing, dropped, thrown): every reversal of the path along the axis happens with the blob's
  edge at the wall / floor (within ``wall_tol_frac`` of the side plus one step), the speed after over the
  speed before is the world's restitution (:data:`~sora_fast.data.world.WALL_RESTITUTION`,
  :data:`~sora_fast.data.world.FLOOR_RESTITUTION`) within ``restitution_tol``; an object that reaches the
  floor bounces; none leaves the frame through a wall.
- ``gravity`` (dropped, thrown): each stretch between floor bounces with >= 4 frames fits a parabola
  (RMS <= ``fit_tol_px``) whose curvature is :data:`~sora_fast.data.world.GRAVITY` · H within
  ``gravity_tol`` (relative).
- ``collision`` (two objects): split at their closest approach along the axis; colliding: each leaves with
  the other's velocity (within ``collision_tol`` of the faster speed + 0.1 px/frame) and their extents touch
  at contact; passing: each keeps its velocity and their order along the axis swaps.
- ``camera`` (a camera): the global motion between consecutive frames (a pan: phase correlation, numpy FFT;
  a zoom: the scale that best maps one frame onto the next) is the captioned one within ``camera_tol``
  (relative; the content moves against the camera), and the frames warped by it match the next ones: median
  mean absolute error <= ``camera_error`` gray levels (the background texture stays consistent).
"""
from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field
from typing import Optional, Sequence

import numpy as np

from ..data.checker import blob_boxes, check_clip, classify_shape, color_masks, track_object
from ..data.io import to_uint8
from ..data.synthetic import DIRECTIONS, OCCLUDER, SPEEDS, parse_caption
from ..data.world import FLOOR_RESTITUTION, GRAVITY, WALL_RESTITUTION, ZOOM_RATES

__all__ = ["PROBES", "ProbeTolerances", "ProbeReport", "probe_clip", "pass_rates", "phase_correlate",
           "camera_motion", "bar_interval"]

PROBES = ("present", "colour", "shape", "direction", "speed", "identity", "permanence", "bounce", "gravity",
          "collision", "camera")


@dataclass(frozen=True)
class ProbeTolerances:
    """The tolerance of every probe (module docstring)."""

    speed_tol: float = 0.35          # relative; slow and fast are 2x apart
    identity_window: int = 5
    permanence_tol_frac: float = 0.12
    wall_tol_frac: float = 0.08
    restitution_tol: float = 0.25
    gravity_tol: float = 0.35
    fit_tol_px: float = 1.0
    collision_tol: float = 0.35
    contact_tol_px: float = 2.0
    camera_tol: float = 0.35
    camera_error: float = 10.0       # gray levels (0-255) of the warped-frame error


@dataclass
class ProbeReport:
    """One clip's probes: ``probes[name]`` True / False / None, ``reasons[name]`` why a probe failed."""

    caption: str
    probes: dict
    reasons: dict = field(default_factory=dict)

    @property
    def passed(self) -> bool:
        return all(v is not False for v in self.probes.values())


_WHOLE = 0.85  # of the 90th percentile of the area: in full view behind a wide bar's scene


class _Obj:
    """One captioned object: its prompt, track, blob boxes, full-area frames and shape per frame."""

    def __init__(self, frames: np.ndarray, prompt):
        self.p = prompt
        self.tr = track_object(frames, prompt.color)
        self.boxes, fill, depth = blob_boxes(frames, self.tr)
        pres = self.tr.present
        if prompt.wide_occluder:  # in full view: neither its centroid nor its shape cut by the bar
            ref, frac = (np.percentile(self.tr.area[pres], 90) if pres.any() else 0.0), _WHOLE
        else:  # the checker's rule
            ref, frac = (np.median(self.tr.area[pres]) if pres.any() else 0.0), self.tr.full_area_frac
        self.full = pres & (self.tr.area >= frac * ref)
        self.whole = [classify_shape(f, d) if ok else None for f, d, ok in zip(fill, depth, self.full)]
        self.labels = self.whole
        if prompt.occluder:  # a blob the bar cuts is no shape: leave out frames where it touches the bar
            k = _axis_k(prompt)
            bar = bar_interval(frames, k)
            self.labels = [None if bar is None or (self.boxes[i, k] < bar[1] + 2 and self.boxes[i, k + 2] > bar[0] - 2)
                           else lab for i, lab in enumerate(self.whole)]

    def shape_vote(self, idx) -> Optional[str]:
        votes = Counter(self.labels[i] for i in idx if self.labels[i] is not None)
        return votes.most_common(1)[0][0] if votes else None

    def velocity(self, idx) -> Optional[np.ndarray]:
        idx = [i for i in idx if self.full[i]]
        return self.tr.velocity(idx) if len(idx) >= 2 else None


def _axis_k(p) -> int:
    return 0 if p.axis == "x" else 1


def _sign(direction: str) -> float:
    return -1.0 if direction in ("left", "up") else 1.0


def probe_clip(clip, caption: str, tolerances: Optional[ProbeTolerances] = None) -> ProbeReport:
    """Run every probe on one clip (``(T, H, W, 3)`` uint8 or ``(3, T, H, W)`` float in [-1, 1]) against its
    ``caption`` (the synthetic or world grammar; ValueError otherwise)."""
    if not isinstance(caption, str):
        raise TypeError(f"caption must be a str, got {type(caption).__name__}")
    tol = tolerances or ProbeTolerances()
    p = parse_caption(caption)
    frames = to_uint8(clip)
    t, h, w, _ = frames.shape
    objs = [_Obj(frames, q) for q in ([p] if p.other is None else [p, p.other])]
    out, why = {}, {}

    def judge(name: str, fn):
        res = fn(frames, p, objs, tol)
        ok, reason = res if isinstance(res, tuple) else (res, "")
        out[name] = None if ok is None else bool(ok)
        if ok is False:
            why[name] = reason

    for name in PROBES:
        judge(name, _JUDGES[name])
    return ProbeReport(caption, out, why)


def _present(frames, p, objs, tol):
    for o in objs:
        pres = o.tr.present
        if p.wide_occluder:
            if not (pres[0] and pres[-1] and pres.mean() >= 0.5):
                return False, (f"{o.p.color} object not seen at both ends or in half the frames "
                               f"({pres.sum()}/{pres.size})")
        elif pres.mean() < 0.9:
            return False, f"{o.p.color} object present in {pres.sum()}/{pres.size} frames (< 90%)"
    return True


def _colour(frames, p, objs, tol):
    votes = objs[0].tr.votes
    top = sorted(votes, key=votes.get, reverse=True)[:len(objs)]
    want = {o.p.color for o in objs}
    if max(votes.values()) == 0 or set(top) != want:
        top3 = dict(sorted(votes.items(), key=lambda kv: -kv[1])[:3])
        return False, f"palette vote {top3}, caption says {sorted(want)}"
    return True


def _shape(frames, p, objs, tol):
    for o in objs:
        got = o.shape_vote(range(frames.shape[0]))
        if got is None and p.occluder:
            return None  # always touching the bar: no uncut view of the shape
        if got != o.p.shape:
            return False, f"the {o.p.color} blob looks like a {got}, caption says {o.p.shape}"
    return True


def _split(objs) -> Optional[int]:
    """The frame of closest approach of two objects along the axis (both present), or None."""
    a, b = objs
    k = _axis_k(a.p)
    both = np.nonzero(a.tr.present & b.tr.present)[0]
    if both.size == 0:
        return None
    d = np.abs(a.tr.centers[both, k] - b.tr.centers[both, k])
    return int(both[np.argmin(d)])


def _nominal(p, frames) -> float:
    t, h, w, _ = frames.shape
    return SPEEDS[p.speed] * (w if p.axis == "x" else h)


def _direction(frames, p, objs, tol):
    t = frames.shape[0]
    if t == 1 or p.camera:
        return None
    if p.other is not None:
        ks = _split(objs)
        if ks is None:
            return False, "the two objects are never seen together"
        for o in objs:
            v = o.velocity(range(ks))
            if v is None:
                return False, f"the {o.p.color} object is tracked in < 2 frames before they meet"
            along = _sign(o.p.direction) * v[_axis_k(o.p)]
            if along < 0.5 * SPEEDS["slow"] * (frames.shape[2] if o.p.axis == "x" else frames.shape[1]):
                return False, f"the {o.p.color} object moves {v[_axis_k(o.p)]:+.2f} px/frame, not {o.p.direction}"
        return True
    o = objs[0]
    if p.gravity == "dropped":
        v = o.velocity(range(min(4, t)))
        if v is None or v[1] <= 0:
            return False, "a dropped object does not fall at first"
        return True
    if p.gravity == "thrown":
        v = o.velocity(range(t))
        if v is None or _sign(p.direction) * v[0] < 0.5 * SPEEDS["slow"] * frames.shape[2]:
            got = None if v is None else round(float(v[0]), 2)
            return False, f"a thrown object's horizontal velocity is {got}, not {p.direction}"
        return True
    if not p.moving:
        return None
    r = check_clip(frames, caption_of_one(p))
    return r.direction_ok, "; ".join(x for x in r.reasons if "direction" in x or "bounce" in x)


def caption_of_one(p) -> str:
    """The base-grammar caption of one moving object (what the checker reads)."""
    from ..data.synthetic import Prompt, caption_for

    return caption_for(Prompt(p.color, p.shape, direction=p.direction, axis=p.axis, speed=p.speed, bounce=p.bounce))


def _speed(frames, p, objs, tol):
    t = frames.shape[0]
    if t == 1 or p.speed is None or p.camera:
        return None
    ks = _split(objs) if p.other is not None else None
    for o in objs:
        k, v0 = _axis_k(o.p), _nominal(o.p, frames)
        if o.p.bounce:
            idx = np.nonzero(o.tr.present)[0]
            steps = np.abs(np.diff(o.tr.centers[idx, k]))[np.diff(idx) == 1]
            got = float(np.median(steps)) if steps.size >= 2 else None
        else:
            v = o.velocity(range(t) if ks is None else range(ks))
            got = None if v is None else abs(float(v[k]))
        if got is None:
            return False, f"the {o.p.color} object's speed is not measurable"
        if abs(got / v0 - 1) > tol.speed_tol:
            return False, (f"the {o.p.color} object moves {got:.2f} px/frame, '{o.p.speed}' is {v0:.2f} "
                           f"(±{tol.speed_tol:.0%})")
    return True


def _identity(frames, p, objs, tol):
    t = frames.shape[0]
    if t < 2:
        return None
    win = min(tol.identity_window, t)
    for s in range(0, max(1, t - win + 1), win - 1 if win > 1 else 1):
        idx = list(range(s, min(s + win, t)))
        masks = color_masks(frames[idx])
        votes = {c: int(m.sum()) for c, m in masks.items()}
        top = set(sorted(votes, key=votes.get, reverse=True)[:len(objs)])
        if sum(votes.values()) == 0:
            continue  # nothing in view (behind a bar)
        for o in objs:
            if o.p.color not in top or votes[o.p.color] == 0:
                won = max(votes, key=votes.get)
                return False, f"frames {idx[0]}..{idx[-1]}: the palette vote is {won}, not {o.p.color}"
            labels = [o.labels[i] for i in idx if o.labels[i] is not None]
            got = o.shape_vote(idx)
            if labels and labels.count(o.p.shape) < len(labels) / 3:  # its shape in under a third of the window
                return False, f"frames {idx[0]}..{idx[-1]}: the {o.p.color} object looks like a {got}, not {o.p.shape}"
    return True


def bar_interval(frames, axis_k) -> Optional[tuple[float, float]]:
    """The gray bar (:data:`~sora_fast.data.synthetic.OCCLUDER`) across ``(T, H, W, 3)`` uint8 frames: its pixel
    interval ``(start, end)`` along x (``axis_k=0``, a vertical bar) or y (``1``), None when there is none."""
    gray = (np.abs(frames.astype(np.int16) - np.asarray(OCCLUDER, np.int16)) <= 25).all(-1)  # (T, H, W)
    frac = gray.mean(axis=(0, 1)) if axis_k == 0 else gray.mean(axis=(0, 2))
    idx = np.nonzero(frac >= 0.6)[0]
    return None if idx.size == 0 else (float(idx.min()), float(idx.max() + 1))


def _permanence(frames, p, objs, tol):
    if not p.wide_occluder:
        return None
    o, k, t = objs[0], _axis_k(p), frames.shape[0]
    side = frames.shape[2] if k == 0 else frames.shape[1]
    bar = bar_interval(frames, k)
    if bar is None:
        return False, "no gray bar across the path"
    pres = o.tr.present
    if not (pres[0] and pres[-1]):
        return False, "the object is not seen " + ("at the start" if not pres[0] else "coming out at the end")
    hidden = np.nonzero(~pres)[0]
    if hidden.size == 0:
        return False, "the object is never wholly hidden behind the bar"
    centre, sign = (bar[0] + bar[1]) / 2, _sign(p.direction)
    x0, x1 = o.tr.centers[0, k], o.tr.centers[-1, k]
    if not (sign * (centre - x0) > 0 and sign * (x1 - centre) > 0):
        return False, f"the object goes from {x0:.1f} to {x1:.1f} px, not across the bar at {centre:.1f} px"
    before = [i for i in range(hidden[0]) if pres[i]]
    after = [i for i in range(hidden[-1] + 1, t) if o.full[i]]
    if len(before) < 2 or not after:
        return False, "too few frames before or after the bar to time the crossing"
    edge = k if sign > 0 else k + 2  # the trailing edge: the bar hides the leading side first, last to show
    slope, icpt = np.polyfit(np.asarray(before, np.float64), o.boxes[before, edge], 1)
    err = abs(slope * (t - 1) + icpt - o.boxes[t - 1, edge])
    if err > tol.permanence_tol_frac * side:
        return False, (f"it comes out {err:.1f} px from where its speed puts it (> {tol.permanence_tol_frac:.0%} "
                       f"of {side})")
    votes = Counter(o.whole[i] for i in after if o.whole[i] is not None)  # after: in full view, whole
    got = votes.most_common(1)[0][0] if votes else None
    if got != p.shape:
        return False, f"it comes out as a {got}, went in as a {p.shape}"
    return True


def _turns(u: np.ndarray, idx: np.ndarray, min_step: float = 0.2) -> list[int]:
    """Positions ``j`` (into idx) where consecutive steps of ``u`` reverse, both steps >= min_step px."""
    du = np.diff(u)
    ok = (np.diff(idx) == 1) & (np.abs(du) >= min_step)
    out = []
    last = None
    for i in range(len(du)):
        if not ok[i]:
            continue
        if last is not None and du[last] * du[i] < 0 and i - last <= 2:
            seg = np.arange(last + 1, i + 1)  # the extremum: the farthest point between the two steps
            out.append(int(seg[np.argmax(u[seg] * np.sign(du[last]))]))
        last = i
    return out


def _bounce(frames, p, objs, tol):
    if not (p.bounce or p.gravity):
        return None
    o, t = objs[0], frames.shape[0]
    k = 1 if p.gravity else _axis_k(p)
    side = frames.shape[2] if k == 0 else frames.shape[1]
    idx = np.nonzero(o.tr.present)[0]
    if idx.size < 3:
        return False, "the object is tracked in fewer than 3 frames"
    u = o.tr.centers[idx, k]
    lo_edge, hi_edge = o.boxes[idx, k], o.boxes[idx, k + 2]
    at_wall = (hi_edge >= side - 0.5) if p.gravity else (lo_edge <= 0.5) | (hi_edge >= side - 0.5)
    touched = np.nonzero(at_wall)[0]
    if touched.size and idx[touched[0]] < t - 1 and not o.tr.present[idx[touched[0]] + 1:].all():
        return False, "the object leaves the frame through a wall or the floor"
    turns = _turns(u, idx)
    e_want = FLOOR_RESTITUTION if p.gravity else WALL_RESTITUTION
    for j in turns:  # the step j (idx[j] -> idx[j+1]) reverses the one before: the extremum is idx[j]
        step = abs(u[j] - u[j - 1])
        down = u[j] > u[j - 1]
        if p.gravity and not down:
            continue  # an apex, not a bounce
        near = side - tol.wall_tol_frac * side - step
        if not ((down and hi_edge[j] >= near) or (not down and lo_edge[j] <= tol.wall_tol_frac * side + step)):
            return False, f"the path turns back at frame {idx[j]} away from the {'floor' if p.gravity else 'wall'}"
        e = _restitution(o, idx, u, j, turns, p.gravity is not None)
        if e is not None and abs(e - e_want) > tol.restitution_tol:
            return False, f"restitution {e:.2f} at frame {idx[j]}, the world's is {e_want:.2f}"
    if p.gravity:
        floor_hits = np.nonzero(hi_edge >= frames.shape[1] - 1.0)[0]
        for f in floor_hits:
            if idx[f] <= t - 3 and not any(abs(j - f) <= 2 for j in turns):
                return False, f"the object reaches the floor at frame {idx[f]} and does not bounce"
    return True


def _restitution(o, idx, u, j, turns, parabolic: bool) -> Optional[float]:
    """Speed after / before the reversal at idx[j]: parabolas (gravity) or median steps (walls) fitted to the
    frames on either side, the frames next to the contact left out."""
    prev = max([x for x in turns if x < j] + [-1])
    nxt = min([x for x in turns if x > j] + [len(u)])
    before = [i for i in range(prev + 1, j) if idx[i] == idx[j] - (j - i)]
    after = [i for i in range(j + 1, nxt) if idx[i] == idx[j] + (i - j)]
    if len(before) < 3 or len(after) < 3:
        return None
    if not parabolic:
        vb, va = np.polyfit(idx[before], u[before], 1)[0], np.polyfit(idx[after], u[after], 1)[0]
        return float(abs(va) / abs(vb)) if vb != 0 else None
    fb = np.polyfit(idx[before], u[before], 2)
    fa = np.polyfit(idx[after], u[after], 2)
    roots = np.roots(fb - fa)
    roots = [r.real for r in np.atleast_1d(roots) if abs(r.imag) < 1e-9 and abs(r.real - idx[j]) <= 1.5]
    tc = roots[0] if roots else float(idx[j])
    vb, va = np.polyval(np.polyder(fb), tc), np.polyval(np.polyder(fa), tc)
    return float(-va / vb) if vb > 0 else None


def _gravity(frames, p, objs, tol):
    if not p.gravity:
        return None
    o, h = objs[0], frames.shape[1]
    idx = np.nonzero(o.tr.present)[0]
    u = o.tr.centers[idx, 1]
    cuts = [j for j in _turns(u, idx) if u[j] > u[j - 1]] if idx.size >= 3 else []
    bounds = [-1] + cuts + [len(idx)]
    g0, fitted = GRAVITY * h, 0
    for a, b in zip(bounds[:-1], bounds[1:]):
        seg = [i for i in range(a + 1, b) if o.full[idx[i]]]
        if len(seg) < 4:
            continue
        tt, yy = idx[seg].astype(np.float64), u[seg]
        coef = np.polyfit(tt, yy, 2)
        rms = float(np.sqrt(np.mean((np.polyval(coef, tt) - yy) ** 2)))
        fitted += 1
        if rms > tol.fit_tol_px or abs(2 * coef[0] / g0 - 1) > tol.gravity_tol:
            return False, (f"frames {idx[seg[0]]}..{idx[seg[-1]]}: acceleration {2 * coef[0]:.3f} px/frame^2 (the "
                           f"world's {g0:.3f}), parabola RMS {rms:.2f} px")
    if not fitted:
        return False, "no stretch of >= 4 frames between bounces to fit a parabola to"
    return True


def _collision(frames, p, objs, tol):
    if p.other is None:
        return None
    a, b = objs
    k = _axis_k(a.p)
    ks = _split(objs)
    t = frames.shape[0]
    if ks is None:
        return False, "the two objects are never seen together"
    v = [[o.velocity(range(ks)), o.velocity(range(ks + 1, t))] for o in objs]
    if any(x is None for pair in v for x in pair):
        return False, f"too few frames before or after they meet (frame {ks}) to measure velocities"
    (ab, aa), (bb, ba) = [[x[k] for x in pair] for pair in v]
    vt = tol.collision_tol * max(abs(ab), abs(bb)) + 0.1
    if p.interaction == "colliding":
        if abs(aa - bb) > vt or abs(ba - ab) > vt:
            return False, (f"velocities {ab:+.2f}, {bb:+.2f} before and {aa:+.2f}, {ba:+.2f} after frame {ks}: not "
                           "exchanged")
        ext = [np.nanmedian(o.boxes[:, k + 2] - o.boxes[:, k]) for o in objs]
        gap = abs(a.tr.centers[ks, k] - b.tr.centers[ks, k]) - (ext[0] + ext[1]) / 2
        if abs(gap) > max(abs(ab), abs(bb)) + tol.contact_tol_px:
            return False, f"the objects turn {gap:+.1f} px apart instead of at contact"
        return True
    if abs(aa - ab) > vt or abs(ba - bb) > vt:
        return False, f"velocities {ab:+.2f}, {bb:+.2f} before and {aa:+.2f}, {ba:+.2f} after frame {ks}: changed"
    both = np.nonzero(a.tr.present & b.tr.present)[0]
    d0 = a.tr.centers[both[0], k] - b.tr.centers[both[0], k]
    d1 = a.tr.centers[both[-1], k] - b.tr.centers[both[-1], k]
    if d0 * d1 >= 0:
        return False, "the objects do not pass each other"
    return True


# ----------------------------------------------------------------------------------------------
# camera


def _hann(n: int) -> np.ndarray:
    return 0.5 - 0.5 * np.cos(2 * np.pi * (np.arange(n) + 0.5) / n)


def phase_correlate(a: np.ndarray, b: np.ndarray) -> tuple[float, float]:
    """The shift ``(dx, dy)`` px with ``b(x) ≈ a(x - d)`` between two ``(H, W)`` gray frames: phase correlation
    (Hann window, numpy FFT) with a parabolic sub-pixel peak."""
    win = _hann(a.shape[0])[:, None] * _hann(a.shape[1])[None, :]
    fa, fb = np.fft.fft2((a - a.mean()) * win), np.fft.fft2((b - b.mean()) * win)
    r = fb * np.conj(fa)
    r = np.real(np.fft.ifft2(r / (np.abs(r) + 1e-9)))
    py, px = np.unravel_index(np.argmax(r), r.shape)

    def sub(c_m, c_0, c_p) -> float:
        den = c_m - 2 * c_0 + c_p
        return 0.0 if abs(den) < 1e-12 else 0.5 * (c_m - c_p) / den

    h, w = r.shape
    dy = py + sub(r[(py - 1) % h, px], r[py, px], r[(py + 1) % h, px])
    dx = px + sub(r[py, (px - 1) % w], r[py, px], r[py, (px + 1) % w])
    return (float((dx + w / 2) % w - w / 2), float((dy + h / 2) % h - h / 2))


def _warp(a: np.ndarray, scale: float, shift: tuple[float, float]) -> tuple[np.ndarray, np.ndarray]:
    """``a`` seen through ``q = c + scale (p - c) + shift`` (bilinear), and where it is defined."""
    h, w = a.shape
    c = np.array([w / 2, h / 2])
    qx, qy = np.meshgrid(np.arange(w) + 0.5, np.arange(h) + 0.5)
    px = (qx - c[0] - shift[0]) / scale + c[0] - 0.5
    py = (qy - c[1] - shift[1]) / scale + c[1] - 0.5
    valid = (px >= 0) & (px <= w - 1) & (py >= 0) & (py <= h - 1)
    x0, y0 = np.clip(np.floor(px).astype(int), 0, w - 2), np.clip(np.floor(py).astype(int), 0, h - 2)
    fx, fy = np.clip(px - x0, 0, 1), np.clip(py - y0, 0, 1)
    out = (a[y0, x0] * (1 - fx) * (1 - fy) + a[y0, x0 + 1] * fx * (1 - fy) + a[y0 + 1, x0] * (1 - fx) * fy
           + a[y0 + 1, x0 + 1] * fx * fy)
    return out, valid


def _warp_error(a, b, scale, shift, border: int = 2) -> float:
    out, valid = _warp(a, scale, shift)
    valid[:border], valid[-border:], valid[:, :border], valid[:, -border:] = False, False, False, False
    return float(np.abs(out - b)[valid].mean()) if valid.any() else float("inf")


def camera_motion(frames: np.ndarray, zoom: bool, max_zoom: float = 0.06, steps: int = 61) -> tuple[list, list]:
    """Per consecutive pair of ``(T, H, W, 3)`` uint8 frames: the global motion (``(dx, dy)`` px by phase
    correlation, or when ``zoom`` the best of ``steps`` scales in ``exp([-max_zoom, max_zoom])``, refined by a
    parabola) and the warped-frame error (gray levels)."""
    gray = frames.astype(np.float64).mean(-1)
    motion, errors = [], []
    grid = np.exp(np.linspace(-max_zoom, max_zoom, steps))
    for a, b in zip(gray[:-1], gray[1:]):
        if zoom:
            errs = np.array([_warp_error(a, b, s, (0.0, 0.0), border=4) for s in grid])
            i = int(np.argmin(errs))
            s = grid[i]
            if 0 < i < len(grid) - 1:
                den = errs[i - 1] - 2 * errs[i] + errs[i + 1]
                s = float(np.exp(np.log(grid[i]) + (0.5 * (errs[i - 1] - errs[i + 1]) / den if den > 0 else 0.0)
                                 * (np.log(grid[1]) - np.log(grid[0]))))
            motion.append(s)
            errors.append(_warp_error(a, b, s, (0.0, 0.0), border=4))
        else:
            d = phase_correlate(a, b)
            motion.append(d)
            errors.append(_warp_error(a, b, 1.0, d, border=2 + int(np.ceil(max(map(abs, d))))))
    return motion, errors


def _camera(frames, p, objs, tol):
    if not p.camera:
        return None
    t, h, w, _ = frames.shape
    if t < 2:
        return False, "a camera motion needs 2 frames or more"
    zoom = p.camera not in DIRECTIONS
    motion, errors = camera_motion(frames, zoom)
    err = float(np.median(errors))
    if zoom:
        want = np.log1p(ZOOM_RATES[p.camera_speed]) * (1 if p.camera == "in" else -1)
        got = float(np.median(np.log(motion)))
        if abs(got / want - 1) > tol.camera_tol:
            return False, f"zoom {np.expm1(got):+.3f} per frame, 'zooming {p.camera}' is {np.expm1(want):+.3f}"
    else:
        k = 0 if p.camera in ("left", "right") else 1
        want = -_sign(p.camera) * SPEEDS[p.camera_speed] * (w, h)[k]
        d = np.median(np.asarray(motion), axis=0)
        if abs(d[k] / want - 1) > tol.camera_tol or abs(d[1 - k]) > tol.camera_tol * abs(want) + 0.25:
            return False, (f"global motion ({d[0]:+.2f}, {d[1]:+.2f}) px/frame, 'panning {p.camera}' moves the "
                           f"content {want:+.2f} along {'xy'[k]}")
    if err > tol.camera_error:
        return False, f"warped frames differ from the next by {err:.1f} gray levels (> {tol.camera_error:g})"
    return True


_JUDGES = {"present": _present, "colour": _colour, "shape": _shape, "direction": _direction, "speed": _speed,
           "identity": _identity, "permanence": _permanence, "bounce": _bounce, "gravity": _gravity,
           "collision": _collision, "camera": _camera}


def pass_rates(reports: Sequence[ProbeReport]) -> dict:
    """Per probe ``{"passed", "judged", "rate"}`` over the reports that call for it (rate None when none do)."""
    out = {}
    for name in PROBES:
        judged = [r.probes[name] for r in reports if r.probes.get(name) is not None]
        out[name] = {"passed": int(sum(judged)), "judged": len(judged),
                     "rate": (sum(judged) / len(judged)) if judged else None}
    return out

