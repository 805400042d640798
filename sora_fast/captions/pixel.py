"""The pixel captioner: a clip of the synthetic world captioned from its pixels alone, by tracking.

:class:`PixelCaptioner` fills a :class:`~sora_fast.captions.CaptionSchema` with what the clip checker's tracker
(:func:`~sora_fast.data.checker.track_object`, one track per palette colour seen) and the world probes' helpers
(:func:`~sora_fast.eval.probes.bar_interval`, :func:`~sora_fast.eval.probes.camera_motion`) measure:

- subjects: every palette colour whose object is present in ``min_present`` of the frames looked at, in palette
  order; the shape is the majority of :func:`~sora_fast.data.checker.classify_shape` (square or circle by
  :func:`~sora_fast.data.checker.blob_diagonals`) over frames where the blob is whole (not cut by the frame, the
  bar or the other object).
- background: ``"textured"`` when the pixels outside objects and bar vary (the world's camera scenes), else
  ``"plain"``; on a textured background the camera motion (a pan's direction or a zoom, and its speed) comes
  from the global motion between frames, and object tracks are taken back to the first frame's coordinates.
- environment: a gray bar across the frame, ``"wide gray bar"`` when it is at least ``wide_bar`` of the
  object's size across (the world's full occluder, :data:`~sora_fast.data.world.WIDE_BAR`), else ``"gray bar"``.
- action per object: ``dropped`` / ``thrown`` when its height between floor bounces is parabolas of the world's
  gravity; ``bouncing`` along an axis when its path turns back at the walls; ``moving`` one way; ``still``. Speeds are
  px per frame over the frame side, nearest of the grammar's :data:`~sora_fast.data.synthetic.SPEEDS` (the
  boundary is their geometric mean); with ``every_n`` the time between looked-at frames is ``every_n``.
- two objects: ``passing each other`` when their order along the axis swaps, ``colliding`` when it does not
  and they touch; their directions and speeds are the ones before they meet.

Spans: the grammar's own events (a wall or floor bounce, an occlusion, a collision) are one span, as the
generator captions them. Content the grammar cannot summarise gets one span per frame range: an object that
leaves (``"leaving the frame"``) or enters (``"entering the frame"``) through the border, stops or starts
(``still`` for >= ``still_frames`` frames), or turns back away from any wall.

:func:`~sora_fast.captions.accuracy.caption_accuracy` measures it on held-out clips against their generators'
captions.
"""
from __future__ import annotations

import math
import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Optional, Union

import numpy as np
import torch

from ..data.checker import CheckerThresholds, blob_boxes, blob_diagonals, classify_shape, color_masks, track_object
from ..data.io import to_uint8
from ..data.synthetic import COLORS, SPEEDS
from ..data.world import ZOOM_RATES
from ..eval.probes import bar_interval, camera_motion
from ._motion import _WAYS, _boundary, _Motion, _Phase, _speed_word
from .base import Captioner, CaptionOutcome
from .schema import CaptionSchema, Span, Subject

__all__ = ["PixelThresholds", "PixelCaptioner"]

_PANS = {"left": "panning right", "right": "panning left", "up": "panning down", "down": "panning up"}
_CAMERA_PAIRS = 4


@dataclass(frozen=True)
class PixelThresholds:
    """Every threshold of the pixel captioner (module docstring says how each is used)."""

    # the tracker's, keeping the pixels an object covers about half of or more in every colour, so a blob has one
    # outline whatever its colour: the checker's white keeps only a small circle's square core, and its colours
    # take in the dark pixels video compression tints; white this dark must be unsaturated, unlike the gray bar
    # blended with a colour
    tracker: CheckerThresholds = CheckerThresholds(min_value=0.4, white_min_value=0.5, white_max_saturation=0.1)
    min_present: float = 0.15     # of the frames looked at; a colour seen less is a blend at a contact, no object
    still: float = 0.4            # of the slow speed: slower is still (objects and camera)
    still_frames: int = 5         # a stop (or a start) lasts at least this many frames to be its own span
    still_px: float = 0.5         # px: the path's range while still (a still object's frames are alike)
    step: float = 0.5             # of the slow speed: a step this long counts towards a turn
    gravity: tuple = (0.5, 1.6)   # vertical acceleration over the world's GRAVITY * H that is a fall
    fall: float = 0.25            # of the frame height: a fall's least vertical range
    wall_slack: float = 0.25      # of the object's size: a turn's centre this much farther from a wall still
    #                               bounces off it, when no box edge is to be trusted (the bar cuts it)
    contact_px: float = 1.5       # px, plus one step: a gap this small between two objects is a contact
    bar_slack: float = 1.5        # px: a blob beside the bar this close to the object's size is not cut by it
    wide_bar: float = 0.9         # bar width / object size from which the bar is the wide one
    border_cut: float = 0.8       # of the full area: a blob smaller than this touching the border is cut by it
    texture_level: float = 6.0    # gray levels from the background's median that count as texture
    texture_frac: float = 0.25    # of the background pixels beyond texture_level: a textured background

    def __post_init__(self):
        if not isinstance(self.tracker, CheckerThresholds):
            raise TypeError(f"tracker must be a CheckerThresholds, got {type(self.tracker).__name__}")


# ----------------------------------------------------------------------------------------------
# one object


class _Object:
    """One tracked colour: its track over the looked-at frames, blob boxes, shape and where it is whole."""

    def __init__(self, frames: np.ndarray, tr, th: PixelThresholds, bar, masks: dict):
        n, h, w, _ = frames.shape
        self.tr, self.color = tr, tr.color
        self.boxes, fill, depth = blob_boxes(frames, tr, thresholds=th.tracker, masks=masks)
        self.diagonal = blob_diagonals(frames, tr, thresholds=th.tracker, masks=masks)
        pres = tr.present
        ext = np.maximum(self.boxes[:, 2] - self.boxes[:, 0], self.boxes[:, 3] - self.boxes[:, 1])
        self.size = float(np.nanpercentile(ext[pres], 90)) if pres.any() else 0.0
        b = self.boxes
        self.at_border = pres & ((b[:, 0] <= 0) | (b[:, 1] <= 0) | (b[:, 2] >= w) | (b[:, 3] >= h))
        inside = pres & ~self.at_border
        ref = np.median(tr.area[inside]) if inside.any() else (tr.area[pres].max() if pres.any() else 0.0)
        self.cut = self.at_border & (tr.area < th.border_cut * ref)      # partly outside the frame
        self.in_frame = pres & ~self.cut
        self.on_bar = np.zeros(n, bool)
        self.bar = bar
        self.centers = tr.centers.copy()
        self.edges = b.copy()  # the object's extent: the blob's box, along the bar's axis from the edges it shows
        self.fill, self.depth = fill, depth
        if bar is not None:  # along the bar's axis, the box edges the bar does not make are the object's
            k, (a, z) = bar
            lo, hi = b[:, k], b[:, k + 2]
            near = pres & (lo < z + 1) & (hi > a - 1)
            # cut by the bar: it splits the blob, or the blob beside it is short of the object's size
            self.on_bar = near & (((lo < a - 0.5) & (hi > z + 0.5)) | (hi - lo < self.size - th.bar_slack))
            lo_ok, hi_ok = (lo < a - 0.5) | (lo > z + 1.5), (hi > z + 0.5) | (hi < a - 1.5)
            self.centers[:, k] = np.where(lo_ok & hi_ok, (lo + hi) / 2, np.where(
                lo_ok, lo + self.size / 2, np.where(hi_ok, hi - self.size / 2, np.nan)))
            inside = self.on_bar & (lo < a - 0.5) & (hi > z + 0.5)  # the bar splits the blob: leave its gap out
            across = b[:, 3 - k] - b[:, 1 - k]
            box = (hi - lo) * across
            self.fill = np.where(inside, fill * box / np.maximum(box - (z - a) * across, 1.0), fill)
            self.split = inside
            self.edges[:, k] = self.centers[:, k] - self.size / 2
            self.edges[:, k + 2] = self.centers[:, k] + self.size / 2
        else:
            self.split = np.zeros(n, bool)
        self.touching = np.zeros(n, bool)  # the blob shares pixels with another one's (set by the caller)
        self.beside = np.zeros(n, bool)    # within a pixel of another one's (set by the caller)

    def in_bar_band(self) -> bool:
        """Seen only within 2 px of the bar (every frame it is present in)."""
        if self.bar is None:
            return False
        k, (a, z) = self.bar
        b = self.boxes[self.tr.present]
        return bool(((b[:, k] >= a - 2) & (b[:, k + 2] <= z + 2)).all())

    def whole(self) -> np.ndarray:
        """Frames where the blob is the whole object: in the frame, off the bar, apart from the other object."""
        ok = self.in_frame & ~self.at_border & ~self.on_bar & ~self.touching
        if ok.sum() >= 1:
            big = np.median(self.tr.area[ok])
            ok &= self.tr.area >= self.tr.full_area_frac * big
        return ok

    def shape(self) -> Optional[str]:
        """The majority shape of the whole frames (those apart from another object, when there are any); an object
        always under the narrow bar: of the frames the bar splits (their fill without the bar's gap), else of those
        it shows most of itself in."""
        use = self.whole()
        if (use & ~self.beside).any():
            use &= ~self.beside
        if not use.any():
            use = self.split & self.in_frame & ~self.touching
        if not use.any():
            use = self.in_frame & ~self.touching
            if use.any():
                use &= self.tr.area >= 0.9 * self.tr.area[use].max()
        labels = [classify_shape(f, d, g) for f, d, g in zip(self.fill[use], self.depth[use], self.diagonal[use])]
        labels = [x for x in labels if x is not None]
        return max(sorted(set(labels)), key=labels.count) if labels else None

    def usable(self) -> np.ndarray:
        """Frames whose centroid is the object's: the whole ones when they are at least half the frames it is
        in, else the checker's usable ones (most of its area shows: under the narrow bar, a slow object is
        always cut, and two whole frames at one end are too short a time to tell a slow object from a still one)."""
        ok = self.whole()
        idx = np.nonzero(self.in_frame & ~self.touching)[0]
        if self.bar is not None:  # positions from the box edges clear of the bar
            return idx[np.isfinite(self.centers[idx, self.bar[0]])]
        if ok.sum() >= max(2, idx.size / 2):
            return np.nonzero(ok)[0]
        return self.tr.usable(idx) if idx.size else idx


def _separation(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Per frame, the gap in px between two ``(T, 4)`` boxes (the larger of the x and y gaps; <= 0 overlapping,
    NaN boxes compare False)."""
    dx = np.maximum(a[:, 0] - b[:, 2], b[:, 0] - a[:, 2])
    dy = np.maximum(a[:, 1] - b[:, 3], b[:, 1] - a[:, 3])
    return np.maximum(dx, dy)


# ----------------------------------------------------------------------------------------------
# motion


def _check_frames(frames) -> np.ndarray:
    """``frames`` as ``(T, H, W, 3)`` uint8 (:func:`~sora_fast.data.io.to_uint8`), or a TypeError / ValueError
    naming it."""
    if not isinstance(frames, (torch.Tensor, np.ndarray)):
        raise TypeError(f"frames must be a torch.Tensor or numpy.ndarray, got {type(frames).__name__}")
    shape = tuple(frames.shape)
    want = "(T, H, W, 3) uint8 or (3, T, H, W) float in [-1, 1]"
    if frames.dtype in (torch.uint8, np.uint8):
        if len(shape) != 4 or shape[-1] != 3:
            raise ValueError(f"frames must be {want}, got uint8 of shape {shape}")
    else:
        floating = frames.is_floating_point() if isinstance(frames, torch.Tensor) else \
            np.issubdtype(frames.dtype, np.floating)
        if not floating:
            raise TypeError(f"frames must be uint8 or floating point ({want}), got dtype {frames.dtype}")
        if len(shape) != 4 or shape[0] != 3:
            raise ValueError(f"frames must be {want}, got {frames.dtype} of shape {shape}")
        bad = int((~torch.as_tensor(frames).isfinite()).sum())
        if bad:
            raise ValueError(f"frames must be finite, got {bad} NaN/Inf values")
    if 0 in shape:
        raise ValueError(f"frames must have T, H, W >= 1, got shape {shape}")
    return to_uint8(frames)


class PixelCaptioner(Captioner):
    """Captions clips of the synthetic world from their pixels (module docstring).

    every_n: look at every ``every_n``-th frame (frames 0, n, 2n, ...); speeds are per frame all the same.
    thresholds: :class:`PixelThresholds` (the tracker's are its ``tracker``).
    """

    name = "pixel"

    def __init__(self, every_n: int = 1, thresholds: Optional[PixelThresholds] = None):
        if isinstance(every_n, bool) or not isinstance(every_n, (int, np.integer)) or every_n < 1:
            raise ValueError(f"every_n must be an int >= 1, got {every_n!r}")
        if thresholds is not None and not isinstance(thresholds, PixelThresholds):
            raise TypeError(f"thresholds must be a PixelThresholds or None, got {type(thresholds).__name__}")
        self.every_n = int(every_n)
        self.thresholds = thresholds or PixelThresholds()

    def frames_of(self, t: int) -> list[int]:
        """The frame indices looked at in a ``t``-frame clip."""
        return list(range(0, t, self.every_n))

    def caption_file(self, path: Union[str, "os.PathLike[str]"]) -> CaptionOutcome:
        """Read a video or image file whole (:func:`~sora_fast.conditioning.read_media`) and caption it."""
        from ..conditioning import read_media

        t0 = time.perf_counter()
        video = read_media(path, name="path")
        schema = self.caption_frames(video)
        return CaptionOutcome(Path(path), schema, frames=self.frames_of(video.shape[1]),
                              seconds=time.perf_counter() - t0)

    def caption_frames(self, frames: Union[torch.Tensor, np.ndarray]) -> CaptionSchema:
        """The :class:`CaptionSchema` of one clip: ``frames`` ``(T, H, W, 3)`` uint8 or ``(3, T, H, W)`` float in
        [-1, 1] (torch or numpy); a 1-frame clip is an image (its objects ``still``)."""
        video = _check_frames(frames)
        th = self.thresholds
        t_all, h, w, _ = video.shape
        idx = np.asarray(self.frames_of(t_all))
        v = video[idx]
        n = idx.size

        bar = None
        for k in (0, 1):
            b = bar_interval(v, k)
            if b is not None and (bar is None or b[1] - b[0] > bar[1][1] - bar[1][0]):
                bar = (k, b)
        masks = color_masks(v, th.tracker)
        need = max(1, math.ceil(th.min_present * n))
        objs = []
        for c in COLORS:
            if masks[c].reshape(n, -1).any(1).sum() < need:
                continue
            tr = track_object(v, c, thresholds=th.tracker, masks=masks)
            if tr.present.sum() >= need:
                o = _Object(v, tr, th, bar, masks)
                if not o.in_bar_band():  # a blend of the bar's edge with an object: the bar hides what is under it
                    objs.append(o)

        textured = self._textured(v, masks, bar)
        camera, camera_speed, world = None, None, None
        if textured:
            camera, camera_speed, world = self._camera(v, idx)
        environment = None
        if bar is not None:
            size = max([o.size for o in objs], default=0.0)
            environment = "wide gray bar" if bar[1][1] - bar[1][0] >= th.wide_bar * size > 0 else "gray bar"
        background = "textured" if textured else "plain"
        if not objs:
            span = Span(0, t_all - 1, (Subject(),), None, camera, camera_speed)
            return CaptionSchema((span,), background=background, environment=environment)

        for o in objs:  # centroids in the first frame's coordinates (the camera taken back)
            o.xy = o.centers if world is None else world(o.centers)
        for i, a in enumerate(objs):  # blobs sharing pixels with another one (a contact): their edges blend
            for b in objs[i + 1:]:
                gap = _separation(a.boxes, b.boxes)
                a.touching |= gap < 0
                b.touching |= gap < 0
                a.beside |= gap <= 1  # compressed video mixes the colours of neighbouring pixels
                b.beside |= gap <= 1
        interaction, phases = None, None
        if len(objs) == 2 and n >= 3:
            interaction, phases = self._pair(objs, idx, (h, w))
        if phases is None:
            phases = [self._phases(o, idx, (h, w), t_all) for o in objs]
        return self._schema(objs, phases, idx, t_all, interaction, camera, camera_speed, background, environment)

    # ---- the scene --------------------------------------------------------------------------------------

    def _textured(self, v: np.ndarray, masks: dict, bar) -> bool:
        th = self.thresholds
        fg = np.zeros(v.shape[:3], bool)
        for m in masks.values():
            fg |= m
        grown = fg.copy()  # one pixel around every coloured pixel: the anti-aliased edges
        grown[:, 1:] |= fg[:, :-1]
        grown[:, :-1] |= fg[:, 1:]
        grown[:, :, 1:] |= fg[:, :, :-1]
        grown[:, :, :-1] |= fg[:, :, 1:]
        if bar is not None:
            k, (a, z) = bar
            lo, hi = max(0, int(a) - 1), int(z) + 1
            if k == 0:
                grown[:, :, lo:hi] = True
            else:
                grown[:, lo:hi] = True
        gray = v.astype(np.float32).mean(-1)[~grown]
        if gray.size == 0:
            return False
        return bool((np.abs(gray - np.median(gray)) > th.texture_level).mean() > th.texture_frac)

    def _camera(self, v: np.ndarray, idx: np.ndarray):
        """The camera's motion word, speed and the map of a track's ``(T, 2)`` image centres to the first
        frame's coordinates; static (and no map) when it moves slower than ``still`` of the slow speed.
        Measured between about :data:`_CAMERA_PAIRS` pairs of frames spread over the clip (a zoom's scale
        search is the cost), so the camera is taken to move at one rate, as the world's does."""
        th = self.thresholds
        n, h, w, _ = v.shape
        if n < 2:
            return None, None, None
        stride = max(1, (n - 1) // _CAMERA_PAIRS)
        pick = np.arange(0, n, stride)
        gap = float(idx[stride] - idx[0])  # frames between the compared ones
        shifts, pan_err = camera_motion(v[pick], zoom=False)
        log_fast = math.log1p(ZOOM_RATES["fast"])
        scales, zoom_err = camera_motion(v[pick], zoom=True, max_zoom=max(0.06, 2 * log_fast * gap), steps=25)
        c, tt = np.array([w / 2, h / 2]), idx.astype(np.float64)[:, None]
        if np.median(pan_err) <= np.median(zoom_err):
            d = np.median(np.asarray(shifts), axis=0) / gap  # the content's px per frame
            k = int(np.argmax(np.abs(d)))
            rel = abs(d[k]) / (w, h)[k]
            if rel < th.still * SPEEDS["slow"]:
                return "static", None, None
            motion = _PANS[_WAYS[k, int(np.sign(d[k]))]]
            return motion, _speed_word(rel, _boundary(SPEEDS)), lambda xy: xy - tt * d
        rate = float(np.median(np.log(scales))) / gap  # log scale per frame
        if abs(rate) < th.still * math.log1p(ZOOM_RATES["slow"]):
            return "static", None, None
        boundary = _boundary({s: math.log1p(r) for s, r in ZOOM_RATES.items()})
        return ("zooming in" if rate > 0 else "zooming out"), _speed_word(abs(rate), boundary), \
            lambda xy: c + (xy - c) / np.exp(rate * tt)

    # ---- objects ----------------------------------------------------------------------------------------

    def _phases(self, o: _Object, idx: np.ndarray, hw: tuple, t_all: int) -> list[_Phase]:
        """One object's phases: entering, its motion in the frame (one or more), leaving. It leaves after the last
        frame it is wholly in the frame in, when the border cuts it in a later one or it is out of sight with the
        border near before (out of sight away from the border, behind the bar, it has not left); the leaving
        starts where it first touches the side it leaves through. It enters likewise."""
        if t_all == 1:
            return [_Phase(0, "still")]
        inside = np.nonzero(o.in_frame)[0]
        if inside.size == 0:
            return [_Phase(0, None)]
        h, w = hw
        b = o.boxes
        sides = np.stack([b[:, 0] <= 0, b[:, 1] <= 0, b[:, 2] >= w, b[:, 3] >= h], 1) & o.tr.present[:, None]
        first, last = int(inside[0]), int(inside[-1])
        gone = ~o.tr.present
        enters = first > 0 and (o.cut[:first].any() or gone[:first].any() and self._near_border(o, first, hw))
        leaves = last < idx.size - 1 and (o.cut[last + 1:].any() or gone[last + 1:].any()
                                          and self._near_border(o, last, hw))
        if leaves:  # back over the frames touching the side it leaves through
            side = sides[last + 1:].any(0) | sides[last]
            while last > first and (sides[last] & side).any():
                last -= 1
        if enters:
            side = sides[:first].any(0) | sides[first]
            while first < last and (sides[first] & side).any():
                first += 1
        use = o.usable()
        use = use[(use >= first) & (use <= last)]
        motion = _Motion(idx, o.xy, hw, o.size, self.thresholds, o.edges if o.xy is o.centers else None)
        body = motion.classify(use) if use.size else [_Phase(first, None)]
        body[0].start = 0
        out = body

        def moving(p: _Phase) -> tuple:
            return (p.direction, p.speed) if p.action == "moving" else (None, None)

        if enters:
            out = [_Phase(0, "entering the frame", *moving(body[0]))] + body
            body[0].start = first
        if leaves:
            out = out + [_Phase(last + 1, "leaving the frame", *moving(out[-1]))]
        return out

    def _near_border(self, o: _Object, i: int, hw: tuple) -> bool:
        """The blob at looked-at frame ``i`` is within one step (and 2 px) of the border."""
        h, w = hw
        b = o.boxes[i]
        reach = 2.0 + 2 * SPEEDS["fast"] * max(h, w) * self.every_n
        return bool(min(b[0], b[1], w - b[2], h - b[3]) <= reach)

    def _pair(self, objs: list, idx: np.ndarray, hw: tuple):
        """Two objects meeting along one axis: the interaction and each one's motion before they meet; (None,
        None) when they do not meet (each is then captioned on its own)."""
        th = self.thresholds
        a, b = objs
        both = np.nonzero(a.in_frame & b.in_frame)[0]
        if both.size < 3 or a.cut.any() or b.cut.any():
            return None, None
        k = int(np.argmax(np.ptp(a.xy[both], axis=0) + np.ptp(b.xy[both], axis=0)))
        d = a.xy[both, k] - b.xy[both, k]
        m = int(both[np.argmin(np.abs(d))])
        step = 2 * SPEEDS["fast"] * hw[1 - k] * self.every_n
        swapped = np.sign(d[0]) != np.sign(d[-1])
        if not swapped and _separation(a.boxes[both], b.boxes[both]).min() > th.contact_px + step:
            return None, None
        phases = []
        for o in objs:
            motion = _Motion(idx, o.xy, hw, o.size, th)
            use = o.usable()
            before = use[use <= m] if not swapped else use
            if before.size < 2:
                return None, None
            v = motion.fit(before)
            if abs(v[k]) < th.still * motion.slow[k]:
                return None, None
            phases.append([_Phase(0, "moving", _WAYS[k, int(np.sign(v[k]))], motion.speed(v[k], k))])
        if phases[0][0].direction == phases[1][0].direction:  # one way: not meeting head on
            return None, None
        return ("passing each other" if swapped else "colliding"), phases

    def _schema(self, objs, phases, idx, t_all, interaction, camera, camera_speed, background, environment):
        starts = sorted({int(idx[p.start]) for ph in phases for p in ph})
        shapes = [o.shape() for o in objs]
        spans = []
        for j, s in enumerate(starts):
            end = starts[j + 1] - 1 if j + 1 < len(starts) else t_all - 1
            subjects = []
            for o, shape, ph in zip(objs, shapes, phases):
                cur = [p for p in ph if int(idx[p.start]) <= s][-1]
                subjects.append(Subject(shape=shape, colour=o.color, action=cur.action, direction=cur.direction,
                                        speed=cur.speed))
            span = Span(s, end, tuple(subjects), interaction, camera, camera_speed)
            if spans and spans[-1].subjects == span.subjects:
                spans[-1] = Span(spans[-1].start, end, span.subjects, interaction, camera, camera_speed)
            else:
                spans.append(span)
        return CaptionSchema(tuple(spans), background=background, environment=environment)
