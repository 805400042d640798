"""Synthetic captioned clips: one coloured shape moving on a dark background, learnable in CPU-minutes.

Each clip shows one object (circle, square or triangle) in one of five easily separated colours, moving
left / right / up / down at a slow or fast speed, optionally passing behind a gray bar (an occluder,
drawn over the object, narrower than it so part of the object stays visible), on a plain dark
background. Sizes, aspect ratios and lengths vary, 1-frame clips (images) included. Everything is a
pure function of a seed.

Caption grammar (:func:`caption_for` writes it, :func:`parse_caption` reads it back)::

    caption  := "a " COLOR " " SHAPE [motion] [" behind a gray bar"]
    motion   := " moving " DIRECTION " " SPEED | " bouncing " AXIS " " SPEED
    COLOR    := red | green | blue | yellow | white
    SHAPE    := circle | square | triangle
    DIRECTION:= left | right | up | down
    AXIS     := "left and right" | "up and down"
    SPEED    := slowly | quickly

e.g. ``"a red circle moving left slowly"``, ``"a blue square bouncing up and down quickly"``,
``"a white triangle"`` (a 1-frame clip). Videos always have a motion; images never do.

Captions stay true: a clip captioned "moving left" never bounces (its start position and speed are
chosen so the whole path stays inside the frame); bouncing is an explicit ``bounce=True`` in the spec,
captioned "bouncing …". Speeds are fractions of the frame side along the motion per frame
(:data:`SPEEDS`), so "slow" and "fast" mean the same thing at every resolution.
"""
from __future__ import annotations

import dataclasses
import json
import os
import re
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Optional, Sequence, Union

import numpy as np

from .io import _AtomicFile, _progress, write_video

__all__ = [
    "COLORS",
    "SHAPES",
    "DIRECTIONS",
    "SPEEDS",
    "BACKGROUND",
    "OCCLUDER",
    "DEFAULT_SIZES",
    "DEFAULT_LENGTHS",
    "Prompt",
    "ClipSpec",
    "SyntheticClip",
    "caption_for",
    "parse_caption",
    "prompts",
    "sample_spec",
    "render_clip",
    "make_synthetic_dataset",
    "write_clip_folder",
]

#: Object colours, RGB uint8. Hues 0, 54, 131, 224 degrees (>= 50 apart) plus an unsaturated white.
COLORS: dict[str, tuple[int, int, int]] = {
    "red": (225, 35, 35),
    "green": (40, 200, 70),
    "blue": (45, 95, 235),
    "yellow": (235, 215, 35),
    "white": (240, 240, 240),
}
SHAPES = ("circle", "square", "triangle")
DIRECTIONS = ("left", "right", "up", "down")
#: Speed in fractions of the frame side along the motion axis per frame.
SPEEDS: dict[str, float] = {"slow": 0.02, "fast": 0.04}
_SPEED_WORDS = {"slow": "slowly", "fast": "quickly"}
_AXIS_WORDS = {"x": "left and right", "y": "up and down"}
BACKGROUND = (18, 18, 26)
OCCLUDER = (120, 120, 120)

#: Default (H, W): 1:1, 4:3, 3:4, 2:1 (16:9-ish), 3:2; every side a multiple of 16 (VAE 8x times patch 2).
DEFAULT_SIZES: tuple[tuple[int, int], ...] = ((32, 32), (48, 48), (48, 64), (64, 48), (32, 64), (32, 48))
#: Default lengths, all 1 + 4k (what a 4x causal video VAE needs); 1 is an image.
DEFAULT_LENGTHS: tuple[int, ...] = (1, 5, 9, 13, 17)

_OBJECT_SIZE = 0.25  # object diameter / side, in fractions of min(H, W)
_MARGIN = 1.0  # px kept between the object and the frame border
_SUPERSAMPLE = 4  # anti-aliasing: coverage from 4x4 sub-pixel samples
_CLIP_NAME = re.compile(r"^\d{5}\.(mp4|png|txt)$")


# ----------------------------------------------------------------------------------------------
# captions


@dataclass(frozen=True)
class Prompt:
    """What a caption says.

    color, shape: names from :data:`COLORS` / :data:`SHAPES`.
    direction:    ``"left" | "right" | "up" | "down"`` for a moving object, None for an image or a bounce.
    axis:         ``"x"`` (horizontal) or ``"y"`` (vertical) for moving and bouncing objects, else None.
    speed:        ``"slow" | "fast"`` for moving and bouncing objects, else None.
    bounce:       the object bounces back and forth along ``axis`` (no single direction).
    occluder:     a gray bar crosses the object's path.

    The synthetic world (:mod:`~sora_fast.data.world`, its captions extend this grammar) adds:
    gravity:      ``"dropped"`` or ``"thrown"`` (``direction`` ``left``/``right`` and ``speed`` horizontal).
    wide_occluder: the bar is wider than the object, which passes fully behind it (``occluder`` is True too).
    other, interaction: a second object's :class:`Prompt` and ``"passing"`` or ``"colliding"``.
    camera, camera_speed: ``left|right|up|down`` (a pan) or ``in|out`` (a zoom), and ``slow|fast``.
    """

    color: str
    shape: str
    direction: Optional[str] = None
    axis: Optional[str] = None
    speed: Optional[str] = None
    bounce: bool = False
    occluder: bool = False
    gravity: Optional[str] = None
    wide_occluder: bool = False
    other: Optional["Prompt"] = None
    interaction: Optional[str] = None
    camera: Optional[str] = None
    camera_speed: Optional[str] = None

    @property
    def moving(self) -> bool:
        return self.axis is not None

    @property
    def world(self) -> bool:
        """Whether the caption needs the world's grammar (gravity, a wide bar, two objects, a camera)."""
        return bool(self.gravity or self.wide_occluder or self.other is not None or self.camera)


def _axis_of(direction: str) -> str:
    return "x" if direction in ("left", "right") else "y"


def caption_for(spec: Union["ClipSpec", Prompt]) -> str:
    """The caption of a :class:`ClipSpec` or :class:`Prompt`, in the module's grammar."""
    p = spec if isinstance(spec, Prompt) else spec.prompt
    if p.world:
        from .world import world_caption

        return world_caption(p)
    text = f"a {p.color} {p.shape}"
    if p.bounce:
        text += f" bouncing {_AXIS_WORDS[p.axis]} {_SPEED_WORDS[p.speed]}"
    elif p.direction is not None:
        text += f" moving {p.direction} {_SPEED_WORDS[p.speed]}"
    if p.occluder:
        text += " behind a gray bar"
    return text


_CAPTION_RE = re.compile(
    r"^an? (?P<color>{c}) (?P<shape>{s})"
    r"(?: moving (?P<direction>{d}) (?P<speed>{v})| bouncing (?P<axis>{a}) (?P<bspeed>{v}))?"
    r"(?P<occluder> behind a gr[ae]y bar)?$".format(
        c="|".join(COLORS), s="|".join(SHAPES), d="|".join(DIRECTIONS),
        v="|".join(_SPEED_WORDS.values()), a="|".join(_AXIS_WORDS.values()),
    )
)


def parse_caption(text: str) -> Prompt:
    """Parse a caption of the synthetic grammar (module docstring) or of the synthetic world's
    (:mod:`~sora_fast.data.world`) into a :class:`Prompt`.

    Case, surrounding whitespace, repeated spaces and a final period are ignored. Raises ValueError
    naming the text when it does not follow the grammar.
    """
    if not isinstance(text, str):
        raise TypeError(f"text must be a str caption, got {type(text).__name__}")
    norm = " ".join(text.strip().lower().rstrip(".").split())
    m = _CAPTION_RE.match(norm)
    if m is None:
        from .world import parse_world_caption

        world = parse_world_caption(norm)
        if world is not None:
            return world
        raise ValueError(
            f"caption {text!r} does not follow the synthetic grammar; expected 'a COLOR SHAPE"
            f" [moving DIRECTION SPEED | bouncing AXIS SPEED] [behind a gray bar]' with COLOR in"
            f" {list(COLORS)}, SHAPE in {list(SHAPES)}, DIRECTION in {list(DIRECTIONS)}, SPEED in"
            f" ['slowly', 'quickly'], e.g. 'a red circle moving left slowly' (or a caption of the synthetic"
            f" world's grammar, sora_fast.data.world)"
        )
    words_to_speed = {w: s for s, w in _SPEED_WORDS.items()}
    words_to_axis = {w: a for a, w in _AXIS_WORDS.items()}
    if m["direction"]:
        return Prompt(m["color"], m["shape"], direction=m["direction"], axis=_axis_of(m["direction"]),
                      speed=words_to_speed[m["speed"]], occluder=bool(m["occluder"]))
    if m["axis"]:
        return Prompt(m["color"], m["shape"], axis=words_to_axis[m["axis"]], speed=words_to_speed[m["bspeed"]],
                      bounce=True, occluder=bool(m["occluder"]))
    return Prompt(m["color"], m["shape"], occluder=bool(m["occluder"]))


def prompts(n: int, *, seed: int = 0, images: bool = False) -> list[str]:
    """``n`` captions to generate from: moving objects (``images=False``) or still ones (``images=True``).

    The captions cycle through a seeded shuffle of every colour x shape (x direction x speed) combination,
    so the first ``len(combinations)`` are all distinct. No occluders, no bounces.
    """
    if isinstance(n, bool) or not isinstance(n, int) or n < 0:
        raise ValueError(f"n must be a non-negative int, got {n!r}")
    if images:
        combos = [Prompt(c, s) for c in COLORS for s in SHAPES]
    else:
        combos = [Prompt(c, s, direction=d, axis=_axis_of(d), speed=v)
                  for c in COLORS for s in SHAPES for d in DIRECTIONS for v in SPEEDS]
    order = np.random.default_rng(seed).permutation(len(combos))
    return [caption_for(combos[order[i % len(combos)]]) for i in range(n)]


# ----------------------------------------------------------------------------------------------
# clip specs


@dataclass(frozen=True)
class ClipSpec:
    """Everything needed to render one clip (:func:`render_clip` is a pure function of it).

    shape, color, direction, speed, bounce, occluder: as in :class:`Prompt`; for ``bounce=True``
        ``direction`` is the initial direction (the caption names only the axis).
    height, width, frames: clip size ``(T, H, W)``; ``frames == 1`` is an image (no motion, no occluder).
    size:          object diameter / side / triangle base and height, px.
    start:         object centre ``(x, y)`` at frame 0, px (pixel ``(i, j)`` covers ``[j, j+1) x [i, i+1)``).
    occluder_center, occluder_width: the gray bar's centre along the motion axis and its width, px;
        the bar spans the whole frame across the motion (a vertical bar for horizontal motion).
    """

    shape: str
    color: str
    height: int
    width: int
    frames: int
    size: float
    start: tuple[float, float]
    direction: Optional[str] = None
    speed: Optional[str] = None
    bounce: bool = False
    occluder: bool = False
    occluder_center: float = 0.0
    occluder_width: float = 0.0

    @property
    def axis(self) -> Optional[str]:
        return None if self.direction is None else _axis_of(self.direction)

    @property
    def prompt(self) -> Prompt:
        return Prompt(self.color, self.shape, direction=None if self.bounce else self.direction, axis=self.axis,
                      speed=self.speed, bounce=self.bounce, occluder=self.occluder)

    @property
    def caption(self) -> str:
        return caption_for(self)

    @property
    def velocity(self) -> float:
        """Signed px per frame along :attr:`axis` (+x right, +y down); 0 for an image."""
        if self.direction is None:
            return 0.0
        side = self.width if self.axis == "x" else self.height
        return SPEEDS[self.speed] * side * (-1.0 if self.direction in ("left", "up") else 1.0)

    def centers(self) -> np.ndarray:
        """``(T, 2)`` float64 object centres ``(x, y)`` per frame, px, bounces applied."""
        t = np.arange(self.frames, dtype=np.float64)
        xy = np.tile(np.asarray(self.start, dtype=np.float64), (self.frames, 1))
        if self.direction is None:
            return xy
        k = 0 if self.axis == "x" else 1
        lo, hi = _center_range(self.width if k == 0 else self.height, self.size)
        u = xy[:, k] - lo + self.velocity * t
        if self.bounce:  # reflect into [0, hi - lo]: a triangle wave of period 2 (hi - lo)
            span = hi - lo
            u = np.mod(u, 2 * span)
            u = np.where(u > span, 2 * span - u, u)
        xy[:, k] = lo + u
        return xy


@dataclass(frozen=True)
class SyntheticClip:
    """One written clip: its file, caption and spec."""

    path: Path
    caption: str
    spec: ClipSpec


def _center_range(side: int, size: float) -> tuple[float, float]:
    return _MARGIN + size / 2, side - _MARGIN - size / 2


def _check_sizes(sizes) -> list[tuple[int, int]]:
    if isinstance(sizes, (str, bytes)) or not isinstance(sizes, Sequence) or len(sizes) == 0:
        raise ValueError(f"sizes must be a non-empty list of (height, width) pairs, got {sizes!r}")
    out = []
    for s in sizes:
        if (not isinstance(s, Sequence) or len(s) != 2
                or not all(isinstance(v, (int, np.integer)) and not isinstance(v, bool) for v in s)):
            raise ValueError(f"sizes must hold (height, width) int pairs, got {s!r} in sizes={sizes!r}")
        if min(s) < 16:
            raise ValueError(f"sizes must have sides >= 16 px (the object is a quarter of the short side), "
                             f"got {tuple(s)}")
        out.append((int(s[0]), int(s[1])))
    return out


def _check_lengths(lengths) -> list[int]:
    if isinstance(lengths, (str, bytes)) or not isinstance(lengths, Sequence) or len(lengths) == 0:
        raise ValueError(f"lengths must be a non-empty list of frame counts >= 1, got {lengths!r}")
    for t in lengths:
        if isinstance(t, bool) or not isinstance(t, (int, np.integer)) or t < 1:
            raise ValueError(f"lengths must hold frame counts >= 1, got {t!r} in lengths={lengths!r}")
    return [int(t) for t in lengths]


def _check_prob(name: str, p) -> float:
    if isinstance(p, bool) or not isinstance(p, (int, float)) or not 0.0 <= p <= 1.0:
        raise ValueError(f"{name} must be a probability in [0, 1], got {p!r}")
    return float(p)


def sample_spec(rng: Union[int, np.random.Generator], *, sizes: Sequence[tuple[int, int]] = DEFAULT_SIZES,
                lengths: Sequence[int] = DEFAULT_LENGTHS, colors: Sequence[str] = tuple(COLORS),
                shapes: Sequence[str] = SHAPES, occluder_prob: float = 0.3, bounce_prob: float = 0.0,
                object_size: float = _OBJECT_SIZE) -> ClipSpec:
    """Draw one random :class:`ClipSpec` (deterministic for an int seed or a seeded Generator).

    sizes:   ``(H, W)`` choices (uniform), sides >= 16. lengths: frame-count choices (uniform); 1 = image.
    colors, shapes: name choices (uniform).
    object_size: the object's diameter / side as a fraction of min(H, W), in (0, 0.6].
    occluder_prob: chance of a gray bar across the path, for videos whose object travels at least its
        own size (so it passes the bar). bounce_prob: chance of a bouncing clip.
    A non-bouncing clip gets a speed at which its whole path fits inside the frame (the caption stays true);
    when neither speed fits (a very long clip), the clip bounces instead.
    """
    rng = np.random.default_rng(rng) if not isinstance(rng, np.random.Generator) else rng
    sizes, lengths = _check_sizes(sizes), _check_lengths(lengths)
    occluder_prob, bounce_prob = _check_prob("occluder_prob", occluder_prob), _check_prob("bounce_prob", bounce_prob)
    for name, values, allowed in (("colors", colors, COLORS), ("shapes", shapes, SHAPES)):
        bad = [v for v in values if v not in allowed]
        if not values or bad:
            raise ValueError(f"{name} must be a non-empty subset of {list(allowed)}, got {list(values)!r}")
    h, w = sizes[rng.integers(len(sizes))]
    t = lengths[rng.integers(len(lengths))]
    color = colors[rng.integers(len(colors))]
    shape = shapes[rng.integers(len(shapes))]
    if isinstance(object_size, bool) or not isinstance(object_size, (int, float)) or not 0 < object_size <= 0.6:
        raise ValueError(f"object_size must be a number in (0, 0.6], got {object_size!r}")
    size = float(max(4, round(object_size * min(h, w))))
    (xlo, xhi), (ylo, yhi) = _center_range(w, size), _center_range(h, size)
    start = [rng.uniform(xlo, xhi), rng.uniform(ylo, yhi)]
    base = dict(shape=shape, color=color, height=h, width=w, frames=t, size=size)
    if t == 1:
        return ClipSpec(start=tuple(start), **base)
    direction = DIRECTIONS[rng.integers(len(DIRECTIONS))]
    k = 0 if _axis_of(direction) == "x" else 1
    side = (w, h)[k]
    lo, hi = ((xlo, xhi), (ylo, yhi))[k]
    speed = list(SPEEDS)[rng.integers(len(SPEEDS))]
    bounce = bool(rng.random() < bounce_prob)
    if not bounce:
        fitting = [s for s in SPEEDS if SPEEDS[s] * side * (t - 1) <= hi - lo]
        if not fitting:
            bounce = True
        elif speed not in fitting:
            speed = fitting[0]
    travel = 0.0 if bounce else SPEEDS[speed] * side * (t - 1)
    if not bounce:  # start so that the whole path stays inside [lo, hi]
        s0 = rng.uniform(lo, hi - travel)
        start[k] = s0 if direction in ("right", "down") else s0 + travel
    occluder, oc, ow = False, 0.0, 0.0
    # a bounce travels its speed's distance too (back and forth): a bar across a path shorter than the object
    # would hide the same part of it in every frame, and its centroid, biased to the visible part, barely moves
    can_occlude = (SPEEDS[speed] * side * (t - 1) if bounce else travel) >= size
    if can_occlude and rng.random() < occluder_prob:
        occluder, ow = True, max(2.0, round(0.4 * size))
        if bounce:
            oc = rng.uniform(lo, hi)
        else:  # the bar sits near the middle of the path, so the object is clear of it at both ends
            mid = start[k] + (travel / 2 if direction in ("right", "down") else -travel / 2)
            oc = mid + rng.uniform(-travel / 6, travel / 6)
    return ClipSpec(start=tuple(start), direction=direction, speed=speed, bounce=bounce, occluder=occluder,
                    occluder_center=float(oc), occluder_width=float(ow), **base)


# ----------------------------------------------------------------------------------------------
# rendering


def _coverage(shape: str, cx: float, cy: float, size: float, h: int, w: int) -> np.ndarray:
    """``(H, W)`` float32 fraction of each pixel covered by the shape (4x4 supersampling)."""
    s = _SUPERSAMPLE
    ys = (np.arange(h * s, dtype=np.float32) + 0.5) / s
    xs = (np.arange(w * s, dtype=np.float32) + 0.5) / s
    dx, dy = xs[None, :] - cx, ys[:, None] - cy
    r = size / 2
    if shape == "circle":
        inside = dx * dx + dy * dy <= r * r
    elif shape == "square":
        inside = (np.abs(dx) <= r) & (np.abs(dy) <= r)
    elif shape == "triangle":  # apex up, base at the bottom; base width = height = size
        depth = dy + r  # distance below the apex
        inside = (depth >= 0) & (depth <= size) & (np.abs(dx) <= depth / 2)
    else:
        raise ValueError(f"shape must be one of {list(SHAPES)}, got {shape!r}")
    return inside.reshape(h, s, w, s).mean(axis=(1, 3), dtype=np.float32)


def _bar(axis: str, center: float, width: float, h: int, w: int) -> np.ndarray:
    """The gray bar's opacity per pixel (its overlap with each pixel's extent), broadcastable to ``(H, W, 1)``:
    a vertical bar for ``axis="x"`` (motion across it), a horizontal one for ``"y"``."""
    coords = np.arange(w if axis == "x" else h, dtype=np.float32) + 0.5
    a, b = center - width / 2, center + width / 2
    band = np.clip(np.minimum(coords + 0.5, b) - np.maximum(coords - 0.5, a), 0.0, 1.0)  # pixel overlap
    return band[None, :, None] if axis == "x" else band[:, None, None]


def render_clip(spec: ClipSpec) -> np.ndarray:
    """Render a clip: ``(T, H, W, 3)`` uint8 RGB frames, anti-aliased, deterministic.

    Raises ValueError when a non-bouncing object would leave the frame (its caption would lie).
    """
    if spec.shape not in SHAPES:
        raise ValueError(f"spec.shape must be one of {list(SHAPES)}, got {spec.shape!r}")
    if spec.color not in COLORS:
        raise ValueError(f"spec.color must be one of {list(COLORS)}, got {spec.color!r}")
    if spec.direction is not None and (spec.direction not in DIRECTIONS or spec.speed not in SPEEDS):
        raise ValueError(f"spec.direction must be one of {list(DIRECTIONS)} and spec.speed one of {list(SPEEDS)},"
                         f" got direction={spec.direction!r}, speed={spec.speed!r}")
    h, w, t = spec.height, spec.width, spec.frames
    centers = spec.centers()
    if not spec.bounce:
        (xlo, xhi), (ylo, yhi) = _center_range(w, spec.size), _center_range(h, spec.size)
        eps = 1e-6
        if (centers[:, 0].min() < xlo - eps or centers[:, 0].max() > xhi + eps
                or centers[:, 1].min() < ylo - eps or centers[:, 1].max() > yhi + eps):
            raise ValueError(
                f"the {spec.shape} leaves the {h}x{w} frame within {t} frames (centres x in"
                f" [{centers[:, 0].min():.1f}, {centers[:, 0].max():.1f}], y in [{centers[:, 1].min():.1f},"
                f" {centers[:, 1].max():.1f}]); a non-bouncing clip must stay inside (set bounce=True otherwise)"
            )
    bg = np.asarray(BACKGROUND, np.float32)
    fg = np.asarray(COLORS[spec.color], np.float32)
    out = np.empty((t, h, w, 3), np.float32)
    bar = None
    if spec.occluder and spec.direction is not None:
        bar = _bar(spec.axis, spec.occluder_center, spec.occluder_width, h, w)
    for i, (cx, cy) in enumerate(centers):
        cov = _coverage(spec.shape, cx, cy, spec.size, h, w)[..., None]
        frame = bg + cov * (fg - bg)
        if bar is not None:
            frame = frame + bar * (np.asarray(OCCLUDER, np.float32) - frame)
        out[i] = frame
    return np.clip(np.rint(out), 0, 255).astype(np.uint8)


# ----------------------------------------------------------------------------------------------
# dataset folders


def make_synthetic_dataset(out_dir: Union[str, "os.PathLike[str]"], n: int, *, seed: int = 0,
                           sizes: Sequence[tuple[int, int]] = DEFAULT_SIZES,
                           lengths: Sequence[int] = DEFAULT_LENGTHS, fps: float = 8, occluder_prob: float = 0.3,
                           bounce_prob: float = 0.0, colors: Sequence[str] = tuple(COLORS),
                           shapes: Sequence[str] = SHAPES, overwrite: bool = False,
                           object_size: float = _OBJECT_SIZE,
                           progress: bool = True) -> list[SyntheticClip]:
    """Write ``n`` synthetic clips to ``out_dir`` as a video folder :class:`~sora_fast.data.VideoFolder` reads.

    Files: ``{i:05d}.mp4`` (H.264 through PyAV) for videos, ``{i:05d}.png`` for 1-frame clips, a
    ``{i:05d}.txt`` caption beside each, and ``manifest.jsonl`` (one ``{"path", "caption", ...spec}`` line
    per clip, usable as a VideoFolder manifest). Clip ``i`` is drawn from its own child of
    ``numpy.random.SeedSequence(seed)``, so the same ``(seed, i)`` gives the same clip whatever ``n`` is.
    Options as in :func:`sample_spec`; ``fps`` of the mp4 files.
    overwrite: allow writing into a non-empty ``out_dir``: files of the same names are replaced and clip
        files of an earlier run (``NNNNN.mp4|png|txt``) that this run did not write are removed, so the
        folder then holds exactly these ``n`` clips (other files are left alone). Without it a non-empty
        ``out_dir`` is a FileExistsError.
    returns: one :class:`SyntheticClip` per clip, in order.
    """
    def draw(rng: np.random.Generator) -> ClipSpec:
        return sample_spec(rng, sizes=sizes, lengths=lengths, colors=colors, shapes=shapes,
                           occluder_prob=occluder_prob, bounce_prob=bounce_prob, object_size=object_size)

    def describe(clips: list[SyntheticClip]) -> str:
        n_img = sum(c.spec.frames == 1 for c in clips)
        n_occ = sum(c.spec.occluder for c in clips)
        n_bounce = sum(c.spec.bounce for c in clips)
        return (f"{len(clips) - n_img} videos, {n_img} images, {n_occ} with occluders, {n_bounce} bouncing")

    return write_clip_folder(out_dir, n, seed=seed, draw=draw, render=render_clip, fps=fps, overwrite=overwrite,
                             progress=progress, name="synthetic", describe=describe)


def write_clip_folder(out_dir: Union[str, "os.PathLike[str]"], n: int, *, seed: int,
                      draw: Callable[[np.random.Generator], object], render: Callable[[object], np.ndarray],
                      fps: float = 8, overwrite: bool = False, progress: bool = True, name: str = "synthetic",
                      describe: Optional[Callable[[list], str]] = None) -> list[SyntheticClip]:
    """Write ``n`` clips ``render(draw(rng_i))`` to ``out_dir`` as :func:`make_synthetic_dataset` describes
    (files, ``manifest.jsonl``, ``overwrite``); ``rng_i`` is the ``i``-th child of ``SeedSequence(seed)``.
    A spec is a dataclass with ``frames`` and ``caption``. ``describe(clips)`` words the summary line."""
    if isinstance(n, bool) or not isinstance(n, int) or n < 1:
        raise ValueError(f"n must be a positive int (number of clips), got {n!r}")
    if isinstance(seed, bool) or not isinstance(seed, (int, np.integer)) or seed < 0:
        raise ValueError(f"seed must be a non-negative int, got {seed!r}")
    out = Path(os.fspath(out_dir)).expanduser()
    if out.exists() and not out.is_dir():
        raise NotADirectoryError(f"out_dir must be a folder, got the file {str(out)!r}")
    if out.is_dir() and any(out.iterdir()) and not overwrite:
        raise FileExistsError(f"out_dir {str(out)!r} is not empty; pass overwrite=True to write into it anyway")
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise OSError(f"out_dir={str(out)!r} cannot be created: {e}") from e
    if not os.access(out, os.W_OK | os.X_OK):
        raise PermissionError(f"out_dir={str(out)!r} is not writable")
    t0 = time.perf_counter()
    clips: list[SyntheticClip] = []
    rows = []
    children = np.random.SeedSequence(int(seed)).spawn(n)
    for i in _progress(range(n), total=n, desc=f"{name} clips", enable=progress):
        spec = draw(np.random.default_rng(children[i]))
        video = render(spec)
        path = out / f"{i:05d}{'.png' if spec.frames == 1 else '.mp4'}"
        write_video(path, video, fps)
        caption = spec.caption
        with _AtomicFile(path.with_suffix(".txt")) as tmp:
            tmp.write_text(caption + "\n", encoding="utf-8")
        clips.append(SyntheticClip(path, caption, spec))
        row = {"path": path.name, "caption": caption}
        row.update({k: v for k, v in dataclasses.asdict(spec).items()})
        rows.append(row)
    with _AtomicFile(out / "manifest.jsonl") as tmp:
        tmp.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    written = {c.path.name for c in clips} | {c.path.with_suffix(".txt").name for c in clips}
    for old in out.iterdir():  # clips of an earlier, larger or different run: the folder holds exactly this set
        if _CLIP_NAME.match(old.name) and old.name not in written and old.is_file():
            old.unlink()
    if progress:
        what = f" ({describe(clips)})" if describe is not None else ""
        print(f"{name}: wrote {n} clips{what} to {out} in {time.perf_counter() - t0:.1f}s", file=sys.stderr)
    return clips
