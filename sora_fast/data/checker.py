"""Automatic checker for generated clips of synthetic prompts (:mod:`sora_fast.data.synthetic`).

Given a clip and its prompt (e.g. ``"a red circle moving left slowly"``), the checker finds the prompted
colour's blob in every frame, tracks its centroid and reports whether the clip shows what the prompt says:

1. **Colour match** per pixel, in HSV: a chromatic colour (red, green, blue, yellow) matches when its hue
   is within ``hue_tol`` degrees of the palette hue, saturation >= ``min_saturation`` and value
   >= ``min_value``; white matches when saturation <= ``white_max_saturation`` and value
   >= ``white_min_value``. The dark background and the gray occluder match no colour.
2. **Presence** per frame: the object is the largest 4-connected component of matching pixels plus the
   components of at least a quarter of the minimum area (and >= 2 px) whose centroids lie within
   ``merge_radius_frac * min(H, W)`` of its centroid (an occluder may cut the object in two). It must
   have at least ``max(min_area_px, min_area_frac * min(H, W)**2)`` pixels *and* hold at least
   ``concentration`` of all matching pixels of the frame (scattered matches — noise — are not an object).
   ``present_fraction`` = frames with the object / frames. The object may hide behind an occluder for a
   few frames, which is why a clip needs ``present_fraction >= min_present`` (0.9), not 1.0.
3. **Colour**: every pixel matching any palette colour votes for it over the whole clip; ``color_ok``
   when the prompted colour wins (so a blue object for a red prompt fails as "wrong colour", not only as
   "absent").
4. **Direction** (clips of >= 2 frames with a moving prompt): the centroid track over the frames where
   the object is present, leaving out frames where it is much smaller than usual (``< full_area_frac``
   of the median area: partly hidden, centroid biased), gets a least-squares line; its displacement over
   the clip ``(dx, dy)`` (px, +x right, +y down) must have the stated sign along the stated axis,
   magnitude >= ``max(min_travel_px, travel_frac * slow_travel)`` where ``slow_travel`` is what the
   *slow* speed covers in the clip (so both speeds pass, a static object fails), and be ``dominance``
   times larger than across the axis. A bouncing prompt needs the range of the centroid along its axis
   (over all present frames) to be at least half that magnitude (a bounce may turn back half way) and
   ``dominance`` times the range across (no sign). For a 1-frame clip, or a prompt without
   motion, direction is not checkable: ``direction_ok`` is None and only presence and colour are judged.

``passed`` = present in >= 90 % of frames and ``color_ok`` and ``direction_ok`` (where checkable).
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Optional, Sequence, Union

import numpy as np
import torch

from .io import to_uint8
from .synthetic import COLORS, SPEEDS, parse_caption

__all__ = ["CheckerThresholds", "CheckResult", "Track", "track_object", "check_clip", "check_clips", "summary",
           "color_masks", "blob_boxes", "blob_diagonals", "classify_shape", "SHAPE_BOUNDS"]


@dataclass(frozen=True)
class CheckerThresholds:
    """Every threshold of the checker (module docstring says how each is used)."""

    hue_tol: float = 25.0  # degrees; palette hues are >= 50 degrees apart
    min_saturation: float = 0.4
    min_value: float = 0.35
    white_max_saturation: float = 0.25
    white_min_value: float = 0.7
    min_area_px: int = 4
    min_area_frac: float = 0.004  # of min(H, W)**2; the synthetic object covers ~0.03-0.05
    concentration: float = 0.5
    merge_radius_frac: float = 0.3  # of min(H, W); the synthetic object is 0.25 across
    min_present: float = 0.9
    full_area_frac: float = 0.6
    travel_frac: float = 0.5
    min_travel_px: float = 1.0
    dominance: float = 1.5


@dataclass
class CheckResult:
    """The checker's verdict on one clip.

    present_frames / frames = present_fraction. dominant_color: the colour with most matching pixels
    (None when no pixel matches any). displacement: ``(dx, dy)`` px of the fitted centroid track over
    the clip (for bounces: the centroid's range along x and y), None when not measured.
    direction_ok: None when not checkable (1-frame clip or prompt without motion).
    reasons: why it failed (empty when passed). notes: what was not checked, and why.
    """

    prompt: str
    frames: int
    present_frames: int
    present_fraction: float
    color_ok: bool
    dominant_color: Optional[str]
    direction_ok: Optional[bool]
    displacement: Optional[tuple[float, float]]
    passed: bool
    reasons: list[str] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)

    def __str__(self) -> str:
        verdict = "PASS" if self.passed else "FAIL"
        why = "; ".join(self.reasons + self.notes)
        return f"{verdict} {self.prompt!r} ({self.frames} frames)" + (f": {why}" if why else "")


# ----------------------------------------------------------------------------------------------
# pixels


def _hsv(frames: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """uint8 ``(..., 3)`` RGB -> hue in degrees [0, 360), saturation and value in [0, 1] (float32)."""
    rgb = frames.astype(np.float32) / 255.0
    r, g, b = rgb[..., 0], rgb[..., 1], rgb[..., 2]
    v = rgb.max(-1)
    c = v - rgb.min(-1)
    s = np.where(v > 0, c / np.maximum(v, 1e-12), 0.0)
    safe = np.maximum(c, 1e-12)
    h = np.where(v == r, (g - b) / safe, np.where(v == g, 2.0 + (b - r) / safe, 4.0 + (r - g) / safe))
    h = np.mod(h * 60.0, 360.0)
    return h.astype(np.float32), s.astype(np.float32), v


def _palette_hue(name: str) -> float:
    rgb = np.asarray(COLORS[name], np.uint8)[None]
    return float(_hsv(rgb)[0][0])


def color_masks(frames: np.ndarray, th: CheckerThresholds = CheckerThresholds()) -> dict[str, np.ndarray]:
    """``(T, H, W, 3)`` uint8 -> per palette colour a ``(T, H, W)`` bool mask of matching pixels."""
    h, s, v = _hsv(frames)
    out = {}
    for name in COLORS:
        if name == "white":
            out[name] = (s <= th.white_max_saturation) & (v >= th.white_min_value)
        else:
            dh = np.abs(h - _palette_hue(name))
            dh = np.minimum(dh, 360.0 - dh)
            out[name] = (dh <= th.hue_tol) & (s >= th.min_saturation) & (v >= th.min_value)
    return out


def _label(mask: np.ndarray) -> np.ndarray:
    """4-connected components of a ``(T, H, W)`` bool mask, per frame (components never cross frames):
    every pixel of a component gets the same label (a flat pixel index), background gets int64 max.
    Label propagation with pointer jumping, vectorized over all frames."""
    big = np.iinfo(np.int64).max
    lab = np.where(mask, np.arange(mask.size, dtype=np.int64).reshape(mask.shape), big)
    while True:
        new = lab.copy()
        np.minimum(new[:, 1:], lab[:, :-1], out=new[:, 1:])
        np.minimum(new[:, :-1], lab[:, 1:], out=new[:, :-1])
        np.minimum(new[:, :, 1:], lab[:, :, :-1], out=new[:, :, 1:])
        np.minimum(new[:, :, :-1], lab[:, :, 1:], out=new[:, :, :-1])
        new = np.where(mask, new, big)
        flat = new.reshape(-1)
        on = flat != big
        flat[on] = flat[flat[on]]  # pointer jumping: a label is a pixel of the same component
        if np.array_equal(new, lab):
            return lab
        lab = new


def _objects(mask: np.ndarray, radius: float, min_piece: float) -> tuple[np.ndarray, np.ndarray]:
    """Per frame of a ``(T, H, W)`` bool mask: the object's area ``(T,)`` and centroid ``(T, 2)`` as
    ``(x, y)`` px (NaN without pixels). The object is the largest component plus every component of at
    least ``min_piece`` px whose centroid lies within ``radius`` px of the largest one's: an occluder
    that cuts the object in two leaves two pieces of one object, not two objects."""
    t, h, w = mask.shape
    area = np.zeros(t, np.int64)
    cent = np.full((t, 2), np.nan)
    lab = _label(mask)
    _, ys, xs = np.nonzero(mask)  # same (C) order as lab[mask]
    labels, inv, counts = np.unique(lab[mask], return_inverse=True, return_counts=True)
    if labels.size == 0:
        return area, cent
    cx = np.bincount(inv, weights=xs + 0.5) / counts
    cy = np.bincount(inv, weights=ys + 0.5) / counts
    frame_of = labels // (h * w)
    for f in np.unique(frame_of):
        sel = np.nonzero(frame_of == f)[0]
        a, x, y = counts[sel], cx[sel], cy[sel]
        big = np.argmax(a)
        near = (np.hypot(x - x[big], y - y[big]) <= radius) & (a >= min_piece)
        near[big] = True
        area[f] = a[near].sum()
        cent[f] = ((a * x)[near].sum() / area[f], (a * y)[near].sum() / area[f])
    return area, cent


@dataclass(frozen=True)
class Track:
    """One colour's object, frame by frame (what :func:`track_object` returns; the checker's tracker).

    present: ``(T,)`` bool, the object found (rule 2 of the module docstring). area: ``(T,)`` px.
    centers: ``(T, 2)`` centroid ``(x, y)`` px (+x right, +y down), NaN without a pixel of the colour.
    votes: pixels of every palette colour over the clip (rule 3). min_area: the presence threshold in px.
    """

    color: str
    present: np.ndarray
    area: np.ndarray
    centers: np.ndarray
    votes: dict
    min_area: float
    full_area_frac: float

    @property
    def frames(self) -> int:
        return int(self.present.shape[0])

    @property
    def dominant(self) -> Optional[str]:
        """The palette colour with the most matching pixels (None when no pixel matches any)."""
        return max(self.votes, key=self.votes.get) if max(self.votes.values()) > 0 else None

    def usable(self, frames: Optional[Sequence[int]] = None, *, partial: bool = False) -> np.ndarray:
        """Indices of the frames (of ``frames``, default all) where the object is present, leaving out
        partly hidden ones (area ``< full_area_frac`` of the median) when two or more full ones remain
        (``partial=True`` keeps them)."""
        idx = np.arange(self.frames) if frames is None else np.asarray(list(frames), dtype=np.int64)
        use = idx[self.present[idx]]
        if use.size >= 2 and not partial:
            full = use[self.area[use] >= self.full_area_frac * np.median(self.area[use])]
            if full.size >= 2:
                use = full
        return use

    def velocity(self, frames: Optional[Sequence[int]] = None) -> Optional[np.ndarray]:
        """``(vx, vy)`` px per frame: the least-squares slope of the centroid over :meth:`usable` frames of
        ``frames`` (default all); None when fewer than two are usable."""
        use = self.usable(frames)
        if use.size < 2:
            return None
        tt = use.astype(np.float64) - use.mean()
        xy = self.centers[use]
        return (tt[:, None] * (xy - xy.mean(0))).sum(0) / (tt * tt).sum()


def track_object(clip: Union[torch.Tensor, np.ndarray], color: str, *,
                 thresholds: Optional[CheckerThresholds] = None, masks: Optional[dict] = None) -> Track:
    """Track the ``color`` object of a clip (``(T, H, W, 3)`` uint8 or ``(3, T, H, W)`` float in [-1, 1]):
    per frame its presence, area and centroid, with the palette votes of the whole clip. ``masks``: the
    clip's :func:`color_masks` when the caller has them (tracking several colours computes them once)."""
    if color not in COLORS:
        raise ValueError(f"color must be one of {list(COLORS)}, got {color!r}")
    th = thresholds or CheckerThresholds()
    frames = _as_frames(clip)
    t, h, w, _ = frames.shape
    masks = color_masks(frames, th) if masks is None else masks
    mask = masks[color]
    min_area = max(th.min_area_px, th.min_area_frac * min(h, w) ** 2)
    area, cent = _objects(mask, th.merge_radius_frac * min(h, w), max(2.0, min_area / 4))
    total = mask.reshape(t, -1).sum(1)
    present = (area >= min_area) & (area >= th.concentration * np.maximum(total, 1))
    return Track(color=color, present=present, area=area, centers=cent,
                 votes={name: int(m.sum()) for name, m in masks.items()}, min_area=float(min_area),
                 full_area_frac=th.full_area_frac)


#: Boundaries of :func:`classify_shape`. ``depth``: the blob's centroid height within its box from the top
#: (0.5 for a circle or a square, 2/3 for the apex-up triangle); ``fill``: blob pixels / box pixels (a square
#: fills its box, a circle pi/4). Anti-aliased edges and colour thresholds move small renders by up to ~0.08
#: (tests/test_probes.py measures them on renders). ``diagonal`` (:func:`blob_diagonals`): sqrt(2) for a square,
#: 0.94-1.16 for a circle on renders; a pixel of colour bled around the blob (video compression, a texture)
#: moves it less than it moves the fill.
SHAPE_BOUNDS = {"triangle_depth": 0.553, "square_fill": 0.88, "square_diagonal": 1.21}


def _blob_pixels(clip, track: Track, th: CheckerThresholds, masks: Optional[dict]):
    """``(frame, xs, ys)`` of the tracked blob's pixels in every frame it is present in: the pixels of the
    track's colour within the tracker's merge radius of its centroid (rule 2 of the module docstring)."""
    frames = _as_frames(clip)
    t, h, w, _ = frames.shape
    mask = (color_masks(frames, th) if masks is None else masks)[track.color]
    radius = th.merge_radius_frac * min(h, w)
    for i in np.nonzero(track.present)[0]:
        ys, xs = np.nonzero(mask[i])
        near = np.hypot(xs + 0.5 - track.centers[i, 0], ys + 0.5 - track.centers[i, 1]) <= radius
        if near.any():
            yield i, xs[near], ys[near]


def blob_boxes(clip: Union[torch.Tensor, np.ndarray], track: Track, *, thresholds: Optional[CheckerThresholds] = None,
               masks: Optional[dict] = None) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """The tracked object's bounding box, fill ratio and depth per frame: ``(T, 4)`` ``(x0, y0, x1, y1)`` px
    (pixel edges), ``(T,)`` pixels / box area and ``(T,)`` the centroid's height in the box from its top edge
    (a fraction), NaN where it is absent. The blob is the pixels of the track's colour within the tracker's
    merge radius of its centroid (rule 2 of the module docstring). ``masks``: as in :func:`track_object`."""
    th = thresholds or CheckerThresholds()
    t = track.frames
    boxes, fill, depth = np.full((t, 4), np.nan), np.full(t, np.nan), np.full(t, np.nan)
    for i, xs, ys in _blob_pixels(clip, track, th, masks):
        boxes[i] = (xs.min(), ys.min(), xs.max() + 1, ys.max() + 1)
        fill[i] = xs.size / ((boxes[i, 2] - boxes[i, 0]) * (boxes[i, 3] - boxes[i, 1]))
        depth[i] = (ys.mean() + 0.5 - boxes[i, 1]) / (boxes[i, 3] - boxes[i, 1])
    return boxes, fill, depth


def blob_diagonals(clip: Union[torch.Tensor, np.ndarray], track: Track, *,
                   thresholds: Optional[CheckerThresholds] = None, masks: Optional[dict] = None) -> np.ndarray:
    """``(T,)`` the tracked blob's mean extent along the two diagonals over its mean extent along x and y (its
    pixels' squares projected), NaN where it is absent: a square's corners make it sqrt(2), a circle's about 1
    (:data:`SHAPE_BOUNDS`). The blob is :func:`blob_boxes`'."""
    th = thresholds or CheckerThresholds()
    out = np.full(track.frames, np.nan)
    r2 = np.sqrt(2.0)
    for i, xs, ys in _blob_pixels(clip, track, th, masks):
        along = (np.ptp(xs) + np.ptp(ys)) / 2 + 1.0
        u, v = (xs + ys) / r2, (xs - ys) / r2
        out[i] = ((np.ptp(u) + np.ptp(v)) / 2 + r2) / along
    return out


def classify_shape(fill: float, depth: float, diagonal: Optional[float] = None) -> Optional[str]:
    """``"square" | "circle" | "triangle"`` from a blob's fill ratio and centroid depth (:data:`SHAPE_BOUNDS`),
    square or circle by its ``diagonal`` ratio (:func:`blob_diagonals`) instead of its fill when given; None for
    NaN."""
    if not (np.isfinite(fill) and np.isfinite(depth)):
        return None
    if depth >= SHAPE_BOUNDS["triangle_depth"]:
        return "triangle"
    if diagonal is not None and np.isfinite(diagonal):
        return "square" if diagonal >= SHAPE_BOUNDS["square_diagonal"] else "circle"
    return "square" if fill >= SHAPE_BOUNDS["square_fill"] else "circle"


# ----------------------------------------------------------------------------------------------
# the check


def _as_frames(clip) -> np.ndarray:
    if isinstance(clip, (torch.Tensor, np.ndarray)) and clip.ndim == 4:
        is_u8 = clip.dtype in (torch.uint8, np.uint8)
        if is_u8 and clip.shape[-1] != 3:
            raise ValueError(f"clip must be (T, H, W, 3) uint8 or (3, T, H, W) float in [-1, 1], got uint8 of shape"
                             f" {tuple(clip.shape)}")
        if not is_u8 and clip.shape[0] != 3:
            raise ValueError(f"clip must be (T, H, W, 3) uint8 or (3, T, H, W) float in [-1, 1], got {clip.dtype}"
                             f" of shape {tuple(clip.shape)}")
        return to_uint8(clip)
    shape = tuple(clip.shape) if hasattr(clip, "shape") else type(clip).__name__
    raise ValueError(f"clip must be a 4-D (T, H, W, 3) uint8 or (3, T, H, W) float tensor/array, got {shape}")


def check_clip(clip: Union[torch.Tensor, np.ndarray], prompt: str, *,
               thresholds: Optional[CheckerThresholds] = None) -> CheckResult:
    """Check one generated clip against its synthetic prompt.

    clip:   ``(T, H, W, 3)`` uint8 RGB, or ``(3, T, H, W)`` floating point in ``[-1, 1]`` (torch or numpy).
    prompt: a caption of the synthetic grammar (:func:`~sora_fast.data.synthetic.parse_caption`; ValueError
            otherwise).
    returns: a :class:`CheckResult`; thresholds default to :class:`CheckerThresholds()`.
    """
    th = thresholds or CheckerThresholds()
    spec = parse_caption(prompt)
    frames = _as_frames(clip)
    t, h, w, _ = frames.shape
    reasons: list[str] = []
    notes: list[str] = []

    tr = track_object(frames, spec.color, thresholds=th)
    votes, dominant = tr.votes, tr.dominant
    color_ok = dominant == spec.color
    if dominant is None:
        reasons.append("no pixel of any palette colour (empty or unrecognisable frames)")
    elif not color_ok:
        share = votes[dominant] / sum(votes.values())
        reasons.append(f"wrong colour: mostly {dominant} ({share:.0%} of coloured pixels), prompt says {spec.color}")

    present, min_area = tr.present, tr.min_area
    n_present = int(present.sum())
    fraction = n_present / t
    if fraction < th.min_present:
        reasons.append(f"{spec.color} object present in {n_present}/{t} frames (< {th.min_present:.0%};"
                       f" needs a blob of >= {min_area:.0f} px holding >= {th.concentration:.0%} of the"
                       f" {spec.color} pixels in one place)")

    direction_ok: Optional[bool] = None
    displacement: Optional[tuple[float, float]] = None
    if t == 1 or not spec.moving:
        notes.append("direction not checkable: " + ("1-frame clip" if t == 1 else "the prompt states no motion")
                     + "; judged on presence and colour only")
    else:
        k = 0 if spec.axis == "x" else 1
        side = (w, h)[k]
        min_travel = max(th.min_travel_px, th.travel_frac * SPEEDS["slow"] * side * (t - 1))
        if spec.bounce:  # a bounce may turn back half way: its range is at least half its travel
            min_travel = max(th.min_travel_px, min_travel / 2)
        use = tr.usable(partial=spec.bounce)
        if use.size < 2:
            direction_ok = False
            reasons.append(f"direction unknown: the object is present in {use.size} frame(s), 2 are needed")
        else:
            xy = tr.centers[use]
            if spec.bounce:
                d = xy.max(0) - xy.min(0)
                displacement = (float(d[0]), float(d[1]))
                along, across = d[k], d[1 - k]
                direction_ok = bool(along >= min_travel and along >= th.dominance * across)
                if not direction_ok:
                    reasons.append(f"no bounce along {spec.axis}: centroid range {along:.1f} px along {spec.axis},"
                                   f" {across:.1f} px across (needs >= {min_travel:.1f} px and"
                                   f" {th.dominance:g}x the range across)")
            else:
                d = tr.velocity() * (t - 1)
                displacement = (float(d[0]), float(d[1]))
                sign = -1.0 if spec.direction in ("left", "up") else 1.0
                along, across = sign * d[k], abs(d[1 - k])
                direction_ok = bool(along >= min_travel and abs(d[k]) >= th.dominance * across)
                if not direction_ok:
                    axis = "xy"[k]
                    if along < min_travel:
                        why = (f"moved {d[k]:+.1f} px along {axis} over the clip, '{spec.direction}' needs"
                               f" {'<= -' if sign < 0 else '>= +'}{min_travel:.1f} px")
                    else:
                        why = (f"moved {d[k]:+.1f} px along {axis} but {d[1 - k]:+.1f} px across"
                               f" (needs {th.dominance:g}x more along)")
                    reasons.append(f"wrong direction: {why}")

    passed = fraction >= th.min_present and color_ok and direction_ok is not False
    return CheckResult(prompt=prompt, frames=t, present_frames=n_present, present_fraction=fraction,
                       color_ok=color_ok, dominant_color=dominant, direction_ok=direction_ok,
                       displacement=displacement, passed=bool(passed), reasons=reasons, notes=notes)


def check_clips(clips: Sequence, prompts: Sequence[str], *,
                thresholds: Optional[CheckerThresholds] = None) -> list[CheckResult]:
    """:func:`check_clip` over matching lists of clips and prompts."""
    if len(clips) != len(prompts):
        raise ValueError(f"clips and prompts must have the same length, got {len(clips)} clips and"
                         f" {len(prompts)} prompts")
    return [check_clip(c, p, thresholds=thresholds) for c, p in zip(clips, prompts)]


def summary(results: Sequence[CheckResult], *, details: bool = False) -> str:
    """``"checker pass rate: 7/8"``; with ``details``, one more line per failed clip saying why."""
    n_pass = sum(r.passed for r in results)
    line = f"checker pass rate: {n_pass}/{len(results)}"
    if details:
        line += "".join(f"\n  {r}" for r in results if not r.passed)
    return line
