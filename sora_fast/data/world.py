"""The synthetic world: the synthetic clips (:mod:`~sora_fast.data.synthetic`) with physics known exactly.

Scenes (:data:`SCENES`), each a pure function of a seed (:func:`sample_world`, :func:`render_world`):

- ``moving``: one object moving one way (the synthetic grammar's "moving").
- ``bounce``: one object bouncing off the frame's walls along one axis, restitution :data:`WALL_RESTITUTION`
  (the speed is kept); the start is chosen so that it hits a wall inside the clip.
- ``gravity``: an object ``dropped`` from rest near the top, or ``thrown`` left or right (constant horizontal
  speed, an upward start): a parabola under :data:`GRAVITY`, bouncing on the floor with restitution
  :data:`FLOOR_RESTITUTION` (the vertical speed after a bounce is that fraction of the one before).
- ``occlusion``: an object passing fully behind an opaque gray bar :data:`WIDE_BAR` times its size wide
  (it is wholly hidden in at least one frame) and coming out the other side.
- ``passing``: two objects of different colours moving in opposite directions on separate lanes; they pass.
- ``collision``: two objects on one lane moving towards each other; at contact (their extents along the
  motion axis touch) they collide elastically with equal masses: they exchange velocities.
- ``camera``: one still object on a textured background; the camera pans (the whole image content shifts by
  the caption's speed per frame: a camera panning left moves the content right) or zooms (the content scales
  about the frame's centre by ``(1 + rate) ** ±t``, :data:`ZOOM_RATES`).

Captions extend the synthetic grammar (:func:`world_caption` writes them, ``parse_caption`` reads them)::

    caption := object [motion] [" and " object motion ", " ("passing each other" | "colliding")]
               [" behind a wide gray bar"] [" on a textured background, camera " camera " " SPEED]
    motion  := " moving " DIRECTION " " SPEED | " bouncing " AXIS " " SPEED | " dropped"
             | " thrown " ("left" | "right") " " SPEED
    camera  := "panning " DIRECTION | "zooming " ("in" | "out")

e.g. ``"a red circle dropped"``, ``"a blue square moving right quickly behind a wide gray bar"``,
``"a red circle moving right quickly and a green triangle moving left slowly, colliding"``,
``"a white square on a textured background, camera zooming in slowly"``. Captions stay true: the samplers
choose starts and speeds so that every stated event happens inside the clip and nothing else does (no
wall is hit unless the caption says "bouncing").
"""
from __future__ import annotations

import re
from dataclasses import dataclass, replace
from typing import Optional, Sequence, Union

import numpy as np

from .synthetic import (
    _AXIS_WORDS,
    _MARGIN,
    _SPEED_WORDS,
    BACKGROUND,
    COLORS,
    DIRECTIONS,
    OCCLUDER,
    SHAPES,
    SPEEDS,
    Prompt,
    _axis_of,
    _bar,
    _center_range,
    _coverage,
    write_clip_folder,
)

__all__ = ["SCENES", "CAMERA_MOTIONS", "WALL_RESTITUTION", "FLOOR_RESTITUTION", "GRAVITY", "ZOOM_RATES", "WIDE_BAR",
           "WORLD_SIZES", "WORLD_LENGTHS", "TEXTURE_RANGE", "Body", "WorldSpec", "world_caption",
           "parse_world_caption", "sample_world", "render_world", "held_out_world", "make_world_dataset"]

SCENES = ("moving", "bounce", "gravity", "occlusion", "passing", "collision", "camera")
CAMERA_MOTIONS = ("left", "right", "up", "down", "in", "out")
#: Speed kept at a wall bounce (elastic).
WALL_RESTITUTION = 1.0
#: Fraction of the vertical speed kept at a floor bounce.
FLOOR_RESTITUTION = 0.7
#: Gravity, in fractions of the frame height per frame squared (px/frame^2 = GRAVITY * H).
GRAVITY = 0.02
#: Relative change of the image scale per frame of a camera zoom.
ZOOM_RATES: dict[str, float] = {"slow": 0.01, "fast": 0.02}
#: The full occluder's width over the object's size.
WIDE_BAR = 1.4
#: Default (H, W): the long side fits a full occlusion at the fast speed in 17 frames.
WORLD_SIZES: tuple[tuple[int, int], ...] = ((32, 48), (48, 32))
WORLD_LENGTHS: tuple[int, ...] = (17,)
#: The background texture's darkest and brightest RGB: unsaturated and dark, so no palette colour matches.
TEXTURE_RANGE = ((16, 16, 24), (64, 64, 80))
_WORLD_OBJECT_SIZE = 0.3
_TRIES = 200


@dataclass(frozen=True)
class Body:
    """One object: ``start`` centre ``(x, y)`` px at frame 0 (world coordinates: frame 0's pixels) and its
    initial ``velocity`` ``(vx, vy)`` px per frame (+x right, +y down)."""

    shape: str
    color: str
    size: float
    start: tuple[float, float]
    velocity: tuple[float, float] = (0.0, 0.0)


@dataclass(frozen=True)
class WorldSpec:
    """Everything needed to render one world clip (:func:`render_world` is a pure function of it).

    scene: one of :data:`SCENES`. prompt: what the caption says. bodies: one or two :class:`Body`.
    gravity: px/frame^2 (+y down), floor bounces keep ``restitution`` of the vertical speed (gravity scenes);
    walls: reflect at the walls along the motion axis (bounce scenes, ``restitution`` of the speed kept).
    occluder_center, occluder_width: the wide bar along the prompt's axis, px (``prompt.occluder``).
    camera_shift: image px per frame the content moves (a pan); zoom: the content's scale is
    ``(1 + zoom) ** t`` about the frame's centre (negative zooms out). texture_seed: the background texture
    (camera scenes), None for the plain dark background.
    """

    scene: str
    prompt: Prompt
    height: int
    width: int
    frames: int
    bodies: tuple
    gravity: float = 0.0
    restitution: float = WALL_RESTITUTION
    walls: bool = False
    occluder_center: float = 0.0
    occluder_width: float = 0.0
    camera_shift: tuple[float, float] = (0.0, 0.0)
    zoom: float = 0.0
    texture_seed: Optional[int] = None

    @property
    def caption(self) -> str:
        return world_caption(self.prompt)

    def scales(self) -> np.ndarray:
        """``(T,)`` image scale of the content per frame (1 without a zoom)."""
        return (1.0 + self.zoom) ** np.arange(self.frames, dtype=np.float64)

    def trajectories(self) -> np.ndarray:
        """``(bodies, T, 2)`` float64 centres ``(x, y)`` in world coordinates, every event applied."""
        t = np.arange(self.frames, dtype=np.float64)
        out = np.stack([np.asarray(b.start, np.float64) + np.outer(t, b.velocity) for b in self.bodies])
        if self.walls:
            for i, b in enumerate(self.bodies):
                k = 0 if self.prompt.axis == "x" else 1
                lo, hi = _center_range((self.width, self.height)[k], b.size)
                span = hi - lo
                u = np.mod(out[i, :, k] - lo, 2 * span)
                out[i, :, k] = lo + np.where(u > span, 2 * span - u, u)
        if self.gravity:
            for i, b in enumerate(self.bodies):
                floor = self.height - _MARGIN - b.size / 2
                out[i, :, 1] = _ballistic(b.start[1], b.velocity[1], self.gravity, floor, self.restitution, t)
        if self.prompt.interaction == "colliding":
            out = _collide(self, out, t)
        return out

    def image_centers(self) -> np.ndarray:
        """``(bodies, T, 2)`` centres in the frames (the camera applied)."""
        return _to_image(self, self.trajectories())


def _ballistic(y0: float, vy0: float, g: float, floor: float, e: float, t: np.ndarray) -> np.ndarray:
    """Heights at times ``t`` of a body falling under ``g`` from ``y0`` with speed ``vy0``, bouncing on
    ``floor`` (+y down) with restitution ``e``: piecewise parabolas, each from one floor contact to the next."""
    segs = [(0.0, y0, vy0)]
    while len(segs) < 64:
        ts, ys, vs = segs[-1]
        tau = (-vs + np.sqrt(vs * vs + 2 * g * (floor - ys))) / g
        if ts + tau > t[-1] or e * (vs + g * tau) < 1e-3:
            break
        segs.append((ts + tau, floor, -e * (vs + g * tau)))
    starts = np.array([s[0] for s in segs])
    k = np.searchsorted(starts, t, side="right") - 1
    tau = t - starts[k]
    ys, vs = np.array([s[1] for s in segs])[k], np.array([s[2] for s in segs])[k]
    return np.minimum(ys + vs * tau + 0.5 * g * tau * tau, floor)


def _contact_time(spec: WorldSpec) -> float:
    a, b = spec.bodies
    k = 0 if spec.prompt.axis == "x" else 1
    gap = abs(b.start[k] - a.start[k]) - (a.size + b.size) / 2
    closing = abs(a.velocity[k] - b.velocity[k])
    return gap / closing


def _collide(spec: WorldSpec, out: np.ndarray, t: np.ndarray) -> np.ndarray:
    """Two bodies on one lane exchange velocities at contact (elastic, equal masses)."""
    tc = _contact_time(spec)
    after = t > tc
    a, b = spec.bodies
    for i, (me, you) in enumerate(((a, b), (b, a))):
        at = np.asarray(me.start) + tc * np.asarray(me.velocity)
        out[i, after] = at + np.outer(t[after] - tc, you.velocity)
    return out


def _to_image(spec: WorldSpec, world_xy: np.ndarray) -> np.ndarray:
    c = np.array([spec.width / 2, spec.height / 2])
    t = np.arange(spec.frames, dtype=np.float64)
    s = spec.scales()
    return c + s[None, :, None] * (world_xy - c) + np.outer(t, spec.camera_shift)[None]


# ----------------------------------------------------------------------------------------------
# captions


def _motion_words(p: Prompt) -> str:
    if p.gravity == "dropped":
        return " dropped"
    if p.gravity == "thrown":
        return f" thrown {p.direction} {_SPEED_WORDS[p.speed]}"
    if p.bounce:
        return f" bouncing {_AXIS_WORDS[p.axis]} {_SPEED_WORDS[p.speed]}"
    if p.direction is not None:
        return f" moving {p.direction} {_SPEED_WORDS[p.speed]}"
    return ""


def world_caption(p: Prompt) -> str:
    """The caption of a world :class:`~sora_fast.data.synthetic.Prompt`, in the grammar above."""
    text = f"a {p.color} {p.shape}" + _motion_words(p)
    if p.other is not None:
        o = p.other
        text += f" and a {o.color} {o.shape}" + _motion_words(o)
        text += ", passing each other" if p.interaction == "passing" else ", colliding"
    if p.occluder:
        text += " behind a wide gray bar" if p.wide_occluder else " behind a gray bar"
    if p.camera:
        move = f"panning {p.camera}" if p.camera in DIRECTIONS else f"zooming {p.camera}"
        text += f" on a textured background, camera {move} {_SPEED_WORDS[p.camera_speed]}"
    return text


def _motion_re(n: int) -> str:
    v = "|".join(_SPEED_WORDS.values())
    axes = "|".join(_AXIS_WORDS.values())
    return (f"(?: moving (?P<d{n}>{'|'.join(DIRECTIONS)}) (?P<v{n}>{v})| bouncing (?P<a{n}>{axes})"
            f" (?P<bv{n}>{v})| (?P<drop{n}>dropped)| thrown (?P<td{n}>left|right) (?P<tv{n}>{v}))?")


_OBJ = "an? (?P<c{n}>" + "|".join(COLORS) + ") (?P<s{n}>" + "|".join(SHAPES) + ")"
_WORLD_RE = re.compile(
    "^" + _OBJ.format(n=1) + _motion_re(1) + "(?: and " + _OBJ.format(n=2) + _motion_re(2)
    + ", (?P<inter>passing each other|colliding))?(?P<occ> behind a (?P<wide>wide )?gr[ae]y bar)?"
    + "(?: on a textured background, camera (?:panning (?P<pan>" + "|".join(DIRECTIONS) + ")|zooming (?P<zoom>in|out))"
    + " (?P<cv>" + "|".join(_SPEED_WORDS.values()) + "))?$")


def _object_prompt(m, n: int) -> Prompt:
    speed = {w: s for s, w in _SPEED_WORDS.items()}
    axis = {w: a for a, w in _AXIS_WORDS.items()}
    c, s = m[f"c{n}"], m[f"s{n}"]
    if m[f"d{n}"]:
        return Prompt(c, s, direction=m[f"d{n}"], axis=_axis_of(m[f"d{n}"]), speed=speed[m[f"v{n}"]])
    if m[f"a{n}"]:
        return Prompt(c, s, axis=axis[m[f"a{n}"]], speed=speed[m[f"bv{n}"]], bounce=True)
    if m[f"drop{n}"]:
        return Prompt(c, s, gravity="dropped")
    if m[f"td{n}"]:
        return Prompt(c, s, direction=m[f"td{n}"], axis="x", speed=speed[m[f"tv{n}"]], gravity="thrown")
    return Prompt(c, s)


def parse_world_caption(text: str) -> Optional[Prompt]:
    """A normalized caption (lower case, single spaces, no final period) of the world's grammar as a
    :class:`~sora_fast.data.synthetic.Prompt`, or None when it is not one (``parse_caption`` then raises)."""
    m = _WORLD_RE.match(text)
    if m is None:
        return None
    p = _object_prompt(m, 1)
    speed = {w: s for s, w in _SPEED_WORDS.items()}
    extra = dict(occluder=bool(m["occ"]), wide_occluder=bool(m["wide"]))
    if m["c2"]:
        inter = "passing" if m["inter"].startswith("passing") else "colliding"
        extra.update(other=_object_prompt(m, 2), interaction=inter)
    if m["cv"]:
        extra.update(camera=m["pan"] or m["zoom"], camera_speed=speed[m["cv"]])
    p = replace(p, **extra)
    return p if p.world else None


# ----------------------------------------------------------------------------------------------
# sampling


def _pick(rng: np.random.Generator, seq):
    return seq[int(rng.integers(len(seq)))]


def _sign(direction: str) -> float:
    return -1.0 if direction in ("left", "up") else 1.0


def sample_world(rng: Union[int, np.random.Generator], scene: Optional[str] = None, *,
                 sizes: Sequence[tuple[int, int]] = WORLD_SIZES, lengths: Sequence[int] = WORLD_LENGTHS,
                 colors: Sequence[str] = tuple(COLORS), shapes: Sequence[str] = SHAPES,
                 object_size: float = _WORLD_OBJECT_SIZE) -> WorldSpec:
    """Draw one :class:`WorldSpec` of ``scene`` (one of :data:`SCENES`; None draws one uniformly), at an
    ``(H, W)`` of ``sizes`` and a length of ``lengths`` (>= 9 frames), the object ``object_size`` of
    min(H, W) across (an occlusion shrinks it until it fits fully behind the bar and out again).
    Raises ValueError when the scene cannot happen at the drawn size and length (e.g. a full occlusion
    in too few frames)."""
    rng = np.random.default_rng(rng) if not isinstance(rng, np.random.Generator) else rng
    if scene is None:
        scene = _pick(rng, SCENES)
    if scene not in SCENES:
        raise ValueError(f"scene must be one of {list(SCENES)} or None, got {scene!r}")
    for name, values, allowed in (("colors", colors, COLORS), ("shapes", shapes, SHAPES)):
        if not values or any(v not in allowed for v in values):
            raise ValueError(f"{name} must be a non-empty subset of {list(allowed)}, got {list(values)!r}")
    if scene in ("passing", "collision") and len(colors) < 2:
        raise ValueError(f"colors must hold >= 2 colours for a two-object scene, got {list(colors)!r}")
    if isinstance(object_size, bool) or not isinstance(object_size, (int, float)) or not 0 < object_size <= 0.45:
        raise ValueError(f"object_size must be a number in (0, 0.45], got {object_size!r}")
    h, w = (int(v) for v in _pick(rng, list(sizes)))
    t = int(_pick(rng, list(lengths)))
    if min(h, w) < 16 or t < 9:
        raise ValueError(f"sizes must have sides >= 16 and lengths >= 9 frames, got {(h, w)} and {t}")
    size = float(max(4, round(object_size * min(h, w))))
    if scene == "occlusion":  # at most the largest object that passes fully behind the bar at the fast speed
        size = min(size, float(np.floor((SPEEDS["fast"] * max(h, w) * (t - 1) - 2) / (1 + WIDE_BAR))))
        if size < 4:
            raise ValueError(f"an 'occlusion' scene does not fit a {h}x{w} frame in {t} frames (an object of >= 4 px "
                             f"must pass fully behind the bar and out); use longer clips or larger frames")
    base = dict(scene=scene, height=h, width=w, frames=t)
    for _ in range(_TRIES):
        spec = _SAMPLERS[scene](rng, h, w, t, size, colors, shapes)
        if spec is not None:
            return WorldSpec(prompt=spec.pop("prompt"), **base, **spec)
    raise ValueError(f"a {scene!r} scene does not fit a {h}x{w} frame in {t} frames with a {size:.0f} px object; "
                     f"use longer clips or larger frames")


def _one(rng, color, shape, size, start, velocity=(0.0, 0.0)) -> Body:
    return Body(shape=shape, color=color, size=size, start=(float(start[0]), float(start[1])),
                velocity=(float(velocity[0]), float(velocity[1])))


def _linear(rng, h, w, t, size, colors, shapes, *, bounce=False):
    d, speed = _pick(rng, DIRECTIONS), _pick(rng, list(SPEEDS))
    k = 0 if _axis_of(d) == "x" else 1
    side = (w, h)[k]
    (xlo, xhi), (ylo, yhi) = _center_range(w, size), _center_range(h, size)
    lo, hi = ((xlo, xhi), (ylo, yhi))[k]
    v = SPEEDS[speed] * side * _sign(d)
    travel = abs(v) * (t - 1)
    start = [rng.uniform(xlo, xhi), rng.uniform(ylo, yhi)]
    if bounce:  # the wall ahead is reached between 20% and 80% of the way
        wall = hi if v > 0 else lo
        start[k] = wall - np.sign(v) * rng.uniform(0.2, 0.8) * min(travel, hi - lo)
    else:
        if travel > hi - lo:
            return None
        s0 = rng.uniform(lo, hi - travel)
        start[k] = s0 if v > 0 else s0 + travel
    vel = (v, 0.0) if k == 0 else (0.0, v)
    body = _one(rng, _pick(rng, colors), _pick(rng, shapes), size, start, vel)
    p = Prompt(body.color, body.shape, direction=None if bounce else d, axis=_axis_of(d), speed=speed, bounce=bounce)
    return dict(prompt=p, bodies=(body,), walls=bounce)


def _gravity(rng, h, w, t, size, colors, shapes):
    g = GRAVITY * h
    (xlo, xhi), (ylo, _) = _center_range(w, size), _center_range(h, size)
    floor = h - _MARGIN - size / 2
    color, shape = _pick(rng, colors), _pick(rng, shapes)
    if rng.random() < 0.5:
        x, vx, vy = rng.uniform(xlo, xhi), 0.0, 0.0
        y = rng.uniform(ylo, ylo + 0.15 * h)
        p = Prompt(color, shape, gravity="dropped")
    else:
        d, speed = _pick(rng, ("left", "right")), _pick(rng, list(SPEEDS))
        vx = SPEEDS[speed] * w * _sign(d)
        if abs(vx) * (t - 1) > xhi - xlo:
            return None
        s0 = rng.uniform(xlo, xhi - abs(vx) * (t - 1))
        x = s0 if vx > 0 else s0 + abs(vx) * (t - 1)
        vy = -rng.uniform(0.0, 0.06) * h
        y = rng.uniform(ylo + vy * vy / (2 * g), ylo + 0.3 * h)
        p = Prompt(color, shape, direction=d, axis="x", speed=speed, gravity="thrown")
    hit = (-vy + np.sqrt(vy * vy + 2 * g * (floor - y))) / g
    if not 3 <= hit <= t - 4 or y > floor:  # a floor bounce with >= 3 frames on either side
        return None
    return dict(prompt=p, bodies=(_one(rng, color, shape, size, (x, y), (vx, vy)),), gravity=g,
                restitution=FLOOR_RESTITUTION)


def _occlusion(rng, h, w, t, size, colors, shapes):
    d = _pick(rng, DIRECTIONS)
    k = 0 if _axis_of(d) == "x" else 1
    side = (w, h)[k]
    fits = [s for s in SPEEDS if size * (1 + WIDE_BAR) + 2 <= SPEEDS[s] * side * (t - 1) <= side - 2 * _MARGIN - size]
    if not fits:
        return None
    speed = _pick(rng, fits)
    v = SPEEDS[speed] * side * _sign(d)
    lo, hi = _center_range(side, size)
    travel = abs(v) * (t - 1)
    bar = WIDE_BAR * size
    s0 = rng.uniform(lo, hi - travel)
    x0 = s0 if v > 0 else s0 + travel
    clear = bar / 2 + size / 2 + 1
    a, b = sorted((x0 + np.sign(v) * clear, x0 + v * (t - 1) - np.sign(v) * clear))
    center = rng.uniform(a, b)
    path = x0 + v * np.arange(t)
    if not (np.abs(path - center) <= bar / 2 - size / 2 - 0.05).any():  # wholly hidden in some frame
        return None
    across = _center_range((h, w)[k], size)
    start = [0.0, 0.0]
    start[k], start[1 - k] = x0, rng.uniform(*across)
    body = _one(rng, _pick(rng, colors), _pick(rng, shapes), size, start, (v, 0.0) if k == 0 else (0.0, v))
    p = Prompt(body.color, body.shape, direction=d, axis=_axis_of(d), speed=speed, occluder=True, wide_occluder=True)
    return dict(prompt=p, bodies=(body,), occluder_center=float(center), occluder_width=float(bar))


def _pair(rng, h, w, t, size, colors, shapes, *, collide: bool):
    axis = _pick(rng, ("x", "y"))
    k = 0 if axis == "x" else 1
    side, cross = (w, h)[k], (h, w)[k]
    lo, hi = _center_range(side, size)
    clo, chi = _center_range(cross, size)
    sa, sb = _pick(rng, list(SPEEDS)), _pick(rng, list(SPEEDS))
    va, vb = SPEEDS[sa] * side, -SPEEDS[sb] * side  # a moves +, b moves -
    tc = rng.uniform(0.3, 0.7) * (t - 1)
    m = rng.uniform(lo, hi)
    if collide:  # touching at tc, then exchanging velocities
        ca, cb = m - size / 2, m + size / 2
        ends = [ca - va * tc, cb - vb * tc, ca + vb * (t - 1 - tc), cb + va * (t - 1 - tc)]
        lane_a = lane_b = rng.uniform(clo, chi)
    else:  # crossing at tc on lanes >= size + 1 apart
        ends = [m - va * tc, m - vb * tc, m + va * (t - 1 - tc), m + vb * (t - 1 - tc)]
        if chi - clo < size + 1:
            return None
        lane_a = rng.uniform(clo, chi - size - 1)
        lane_b = rng.uniform(lane_a + size + 1, chi)
        if rng.random() < 0.5:
            lane_a, lane_b = lane_b, lane_a
    if min(ends) < lo or max(ends) > hi:
        return None
    ca, cb = rng.choice(len(colors), 2, replace=False)
    bodies = []
    for pos, lane, v, c in ((ends[0], lane_a, va, ca), (ends[1], lane_b, vb, cb)):
        start = (pos, lane) if k == 0 else (lane, pos)
        bodies.append(_one(rng, colors[int(c)], _pick(rng, shapes), size, start, (v, 0.0) if k == 0 else (0.0, v)))
    if rng.random() < 0.5:
        bodies.reverse()
    dirs = {("x", 1): "right", ("x", -1): "left", ("y", 1): "down", ("y", -1): "up"}
    ps = [Prompt(b.color, b.shape, direction=dirs[axis, int(np.sign(b.velocity[k]))], axis=axis,
                 speed=sa if np.sign(b.velocity[k]) > 0 else sb) for b in bodies]
    p = replace(ps[0], other=ps[1], interaction="colliding" if collide else "passing")
    return dict(prompt=p, bodies=tuple(bodies))


def _camera(rng, h, w, t, size, colors, shapes):
    motion, speed = _pick(rng, CAMERA_MOTIONS), _pick(rng, list(SPEEDS))
    c = np.array([w / 2, h / 2])
    shift, zoom = np.zeros(2), 0.0
    if motion in DIRECTIONS:
        k = 0 if _axis_of(motion) == "x" else 1
        shift[k] = -_sign(motion) * SPEEDS[speed] * (w, h)[k]  # the content moves against the camera
        smax = 1.0
    else:
        zoom = ZOOM_RATES[speed] if motion == "in" else 1 / (1 + ZOOM_RATES[speed]) - 1
        smax = max(1.0, (1 + zoom) ** (t - 1))
    start = np.array([rng.uniform(*_center_range(w, size)), rng.uniform(*_center_range(h, size))])
    if zoom:
        start = c + (start - c) * rng.uniform(0.0, 0.6) / smax
    ends = [c + s * (start - c) + shift * i for i, s in ((0, 1.0), (t - 1, (1 + zoom) ** (t - 1)))]
    half = smax * size / 2 + _MARGIN
    if any(e[0] < half or e[0] > w - half or e[1] < half or e[1] > h - half for e in ends):
        return None
    body = _one(rng, _pick(rng, colors), _pick(rng, shapes), size, start)
    p = Prompt(body.color, body.shape, camera=motion, camera_speed=speed)
    return dict(prompt=p, bodies=(body,), camera_shift=(float(shift[0]), float(shift[1])), zoom=float(zoom),
                texture_seed=int(rng.integers(2**31)))


_SAMPLERS = {
    "moving": _linear,
    "bounce": lambda *a: _linear(*a, bounce=True),
    "gravity": _gravity,
    "occlusion": _occlusion,
    "passing": lambda *a: _pair(*a, collide=False),
    "collision": lambda *a: _pair(*a, collide=True),
    "camera": _camera,
}


# ----------------------------------------------------------------------------------------------
# rendering


def _texture(spec: WorldSpec, i: int) -> np.ndarray:
    """``(H, W, 3)`` float32 background of frame ``i``: a seeded sum of plane waves (wavelengths 5-14 px) in
    world coordinates, seen through the camera."""
    rng = np.random.default_rng(spec.texture_seed)
    n = 8
    theta, lam, phase = rng.uniform(0, np.pi, n), rng.uniform(5.0, 14.0, n), rng.uniform(0, 2 * np.pi, n)
    c = np.array([spec.width / 2, spec.height / 2])
    s = (1.0 + spec.zoom) ** i
    qx = (np.arange(spec.width) + 0.5 - c[0] - spec.camera_shift[0] * i) / s + c[0]
    qy = (np.arange(spec.height) + 0.5 - c[1] - spec.camera_shift[1] * i) / s + c[1]
    val = np.zeros((spec.height, spec.width))
    for th, la, ph in zip(theta, lam, phase):
        val += np.cos(2 * np.pi * (np.cos(th) * qx[None, :] + np.sin(th) * qy[:, None]) / la + ph)
    val = np.clip(0.5 + val / (2 * np.sqrt(n)), 0.0, 1.0)[..., None]
    lo, hi = (np.asarray(x, np.float32) for x in TEXTURE_RANGE)
    return (lo + val * (hi - lo)).astype(np.float32)


def render_world(spec: WorldSpec, *, centers: Optional[np.ndarray] = None) -> np.ndarray:
    """Render a world clip: ``(T, H, W, 3)`` uint8 RGB, anti-aliased, deterministic.

    centers: optional ``(bodies, T, 2)`` world-coordinate centres replacing the simulated ones (tests draw
    clips whose physics is wrong with it); a centre far outside the frame hides its body.
    """
    if not isinstance(spec, WorldSpec):
        raise TypeError(f"spec must be a WorldSpec, got {type(spec).__name__}")
    h, w, t = spec.height, spec.width, spec.frames
    traj = spec.trajectories() if centers is None else np.asarray(centers, np.float64)
    if traj.shape != (len(spec.bodies), t, 2):
        raise ValueError(f"centers must have shape {(len(spec.bodies), t, 2)}, got {traj.shape}")
    xy, scales = _to_image(spec, traj), spec.scales()
    bar = None
    if spec.prompt.occluder:
        bar = _bar(spec.prompt.axis, spec.occluder_center, spec.occluder_width, h, w)
    out = np.empty((t, h, w, 3), np.float32)
    flat = np.broadcast_to(np.asarray(BACKGROUND, np.float32), (h, w, 3))
    for i in range(t):
        frame = _texture(spec, i) if spec.texture_seed is not None else flat
        for b, body in enumerate(spec.bodies):
            cov = _coverage(body.shape, xy[b, i, 0], xy[b, i, 1], body.size * scales[i], h, w)[..., None]
            frame = frame + cov * (np.asarray(COLORS[body.color], np.float32) - frame)
        if bar is not None:
            frame = frame + bar * (np.asarray(OCCLUDER, np.float32) - frame)
        out[i] = frame
    return np.clip(np.rint(out), 0, 255).astype(np.uint8)


# ----------------------------------------------------------------------------------------------
# held-out specs and dataset folders


def held_out_world(n: int, scene: str, *, seed: int, sizes: Sequence[tuple[int, int]] = WORLD_SIZES,
                   lengths: Sequence[int] = WORLD_LENGTHS, object_size: float = _WORLD_OBJECT_SIZE) -> list[WorldSpec]:
    """``n`` specs of ``scene`` from ``numpy.random.SeedSequence([seed, 23, scene's index])``: a stream of its
    own, never the one :func:`make_world_dataset` draws training clips from."""
    if isinstance(n, bool) or not isinstance(n, int) or n < 1:
        raise ValueError(f"n must be an int >= 1, got {n!r}")
    if scene not in SCENES:
        raise ValueError(f"scene must be one of {list(SCENES)}, got {scene!r}")
    rng = np.random.default_rng(np.random.SeedSequence([seed, 23, SCENES.index(scene)]))
    return [_redraw(lambda: sample_world(rng, scene, sizes=sizes, lengths=lengths, object_size=object_size))
            for _ in range(n)]


def _redraw(draw, attempts: int = 20) -> WorldSpec:
    """``draw()`` again (its generator has moved on: another size, length and start) when the drawn size and length
    cannot hold the scene (a two-object scene in a small frame runs out of tries now and then); the last error
    after ``attempts`` draws, when the sizes and lengths cannot hold it at all."""
    for i in range(attempts):
        try:
            return draw()
        except ValueError:
            if i == attempts - 1:
                raise
    raise AssertionError("unreachable")


def make_world_dataset(out_dir, n: int, *, seed: int = 0, scenes: Sequence[str] = SCENES,
                       sizes: Sequence[tuple[int, int]] = WORLD_SIZES, lengths: Sequence[int] = WORLD_LENGTHS,
                       object_size: float = _WORLD_OBJECT_SIZE, fps: float = 8, overwrite: bool = False,
                       progress: bool = True) -> list:
    """Write ``n`` world clips (scenes drawn uniformly from ``scenes``) to ``out_dir`` as a video folder, with
    captions and ``manifest.jsonl``, as :func:`~sora_fast.data.synthetic.make_synthetic_dataset` does."""
    bad = [s for s in scenes if s not in SCENES]
    if isinstance(scenes, str) or not scenes or bad:
        raise ValueError(f"scenes must be a non-empty list from {list(SCENES)}, got {scenes!r}")
    scenes = tuple(scenes)

    def draw(rng):
        scene = _pick(rng, scenes)
        return _redraw(lambda: sample_world(rng, scene, sizes=sizes, lengths=lengths, object_size=object_size))

    def describe(clips) -> str:
        counts = {s: sum(c.spec.scene == s for c in clips) for s in scenes}
        return ", ".join(f"{v} {k}" for k, v in counts.items())

    return write_clip_folder(out_dir, n, seed=seed, draw=draw, render=render_world, fps=fps, overwrite=overwrite,
                             progress=progress, name="world", describe=describe)
