"""The caption schema: what a captioner fills in, validated JSON in and out, rendered to training-style text.

A :class:`CaptionSchema` describes one clip in the spirit of SkyCaptioner-V1's and HunyuanVideo's structured
captions: its subjects (type, appearance, colour, shape, action with motion direction and speed, position),
the camera motion, shot type, background and environment, lighting and style. Content that changes over time
(an object that bounces off a wall, leaves the frame or stops) is one :class:`Span` per frame range, and the
rendered caption describes the spans in order ("maps multiple frames to a single description").

Rendering (:meth:`CaptionSchema.render`) writes the synthetic world's grammar (:mod:`sora_fast.data.synthetic`,
:mod:`sora_fast.data.world`) for what that grammar can say, so for a synthetic clip the rendered caption of a
correct schema is exactly the generator's own caption and ``parse_caption`` reads it back
(:meth:`CaptionSchema.from_prompt` and :meth:`CaptionSchema.to_prompt` convert). Fields the grammar lacks
(appearance, position, shot type, lighting, style, a free-text action of a real video) are rendered after it
when they are set, in a fixed order, so real-video captions read the same way every time.

JSON (:meth:`CaptionSchema.from_json` / :meth:`CaptionSchema.to_json`) names every field, ``null`` where it is
unknown: a missing or unknown field, a wrong type or a value outside a field's choices is a ValueError that
names the field's path (``spans[0].subjects[1].speed``). :meth:`CaptionSchema.json_schema` is the JSON Schema of
the same shape (strict: every property required, no others), what a chat model's structured output is asked for.
"""
from __future__ import annotations

import json
from dataclasses import dataclass, fields, replace
from typing import Any, Optional, Union

__all__ = ["Subject", "Span", "CaptionSchema", "ACTIONS", "DIRECTIONS", "SPEEDS", "CAMERA_MOTIONS",
           "INTERACTIONS", "SCHEMA_VERSION"]

SCHEMA_VERSION = 1

#: Actions the synthetic grammar names; a real video's subject may give any other short phrase ("walking").
ACTIONS = ("still", "moving", "bouncing", "dropped", "thrown", "leaving the frame", "entering the frame")
#: Motion directions: a way (``moving``, ``thrown``) or, for ``bouncing``, an axis.
DIRECTIONS = ("left", "right", "up", "down", "left and right", "up and down", "towards the camera",
              "away from the camera")
SPEEDS = ("slow", "medium", "fast")
#: Camera motions: ``static``, a pan, or a zoom.
CAMERA_MOTIONS = ("static", "panning left", "panning right", "panning up", "panning down", "zooming in",
                  "zooming out")
INTERACTIONS = ("passing each other", "colliding")

_SPEED_WORDS = {"slow": "slowly", "medium": "at a medium speed", "fast": "quickly"}
_AXES = ("left and right", "up and down")


class _Schema:
    """JSON in and out for the schema's dataclasses (every field named, nested ones converted)."""

    _nested: dict = {}

    def to_dict(self) -> dict:
        out = {}
        for f in fields(self):
            v = getattr(self, f.name)
            if f.name in self._nested:
                v = [x.to_dict() for x in v]
            elif isinstance(v, tuple):
                v = list(v)
            out[f.name] = v
        return out

    @classmethod
    def from_dict(cls, data: Any, path: str = ""):
        where = path or cls.__name__
        if not isinstance(data, dict):
            raise ValueError(f"{where} must be a JSON object, got {type(data).__name__}")
        names = [f.name for f in fields(cls)]
        unknown = sorted(set(data) - set(names))
        if unknown:
            raise ValueError(f"{where} has unknown field(s) {unknown}; the fields are {names}")
        missing = [n for n in names if n not in data]
        if missing:
            raise ValueError(f"{where} is missing field(s) {missing} (give null for an unknown value)")
        kw = {}
        for n in names:
            v = data[n]
            if n in cls._nested:
                if not isinstance(v, list):
                    raise ValueError(f"{_join(path, n)} must be a list, got {type(v).__name__}")
                v = tuple(cls._nested[n].from_dict(x, f"{_join(path, n)}[{i}]") for i, x in enumerate(v))
            elif isinstance(v, list):
                v = tuple(v)
            kw[n] = v
        try:
            return cls(**kw)
        except (TypeError, ValueError) as e:
            msg = str(e)
            if path:   # "speed must be ..." -> "spans[0].subjects[1].speed must be ..."
                msg = f"{path}.{msg}" if msg.split(" ", 1)[0] in names else f"{path}: {msg}"
            raise ValueError(msg) from None


def _join(path: str, name: str) -> str:
    return f"{path}.{name}" if path else name


def _text(name: str, v, *, choices=None, optional: bool = True) -> None:
    if v is None:
        if optional:
            return
        raise ValueError(f"{name} must be given (a string), got null")
    if not isinstance(v, str) or not v.strip():
        raise ValueError(f"{name} must be a non-empty string{' or null' if optional else ''}, got {v!r}")
    if choices is not None and v not in choices:
        raise ValueError(f"{name} must be one of {list(choices)}{' or null' if optional else ''}, got {v!r}")


def _int(name: str, v, lo: int = 0) -> None:
    if isinstance(v, bool) or not isinstance(v, int) or v < lo:
        raise ValueError(f"{name} must be an int >= {lo}, got {v!r}")


@dataclass(frozen=True)
class Subject(_Schema):
    """One subject of a span.

    type: what it is (``"object"`` for the synthetic world's shapes; ``"person"``, ``"dog"``, ``"car"`` ...).
    shape, colour: for the synthetic world a name of ``sora_fast.data.synthetic.SHAPES`` / ``COLORS``; free
        text for real videos. appearance: other visual attributes ("striped", "wearing a red coat").
    action: one of :data:`ACTIONS` or a short phrase of a real video ("walking"). direction: one of
        :data:`DIRECTIONS` (for ``bouncing`` the axis). speed: one of :data:`SPEEDS`.
    position: where it is in the frame ("left third", "center").
    """

    type: str = "object"
    shape: Optional[str] = None
    colour: Optional[str] = None
    appearance: Optional[str] = None
    action: Optional[str] = None
    direction: Optional[str] = None
    speed: Optional[str] = None
    position: Optional[str] = None

    def __post_init__(self):
        _text("type", self.type, optional=False)
        for name in ("shape", "colour", "appearance", "action", "position"):
            _text(name, getattr(self, name))
        _text("direction", self.direction, choices=DIRECTIONS)
        _text("speed", self.speed, choices=SPEEDS)
        if self.action == "bouncing" and self.direction is not None and self.direction not in _AXES:
            raise ValueError(f"direction of a bouncing subject must be an axis {list(_AXES)}, got {self.direction!r}")
        if self.action in ("moving", "thrown") and self.direction in _AXES:
            raise ValueError(f"direction of a {self.action} subject must be a way, not the axis {self.direction!r}")

    def noun(self) -> str:
        """``"a red circle"``, ``"a striped dog"``: its words before the action."""
        text = self.bare_noun()
        return ("an " if text[0] in "aeiou" else "a ") + text

    def bare_noun(self) -> str:
        """The noun without its article: ``"red circle"``."""
        return " ".join([w for w in (self.appearance, self.colour) if w] + [self.shape or self.type])

    def motion(self) -> str:
        """The action's words (``"moving left slowly"``, ``"bouncing up and down quickly"``, ``"dropped"``);
        empty for a still or unknown action."""
        a = self.action
        if a in (None, "still"):
            return ""
        if a == "dropped":
            return "dropped"
        words = [a]
        if self.direction:
            words.append(self.direction)
        if self.speed:
            words.append(_SPEED_WORDS[self.speed])
        return " ".join(words)


@dataclass(frozen=True)
class Span(_Schema):
    """What happens in frames ``start`` .. ``end`` (inclusive): its subjects, their interaction (one of
    :data:`INTERACTIONS` or null) and the camera (one of :data:`CAMERA_MOTIONS` with its ``camera_speed``)."""

    start: int
    end: int
    subjects: tuple = ()
    interaction: Optional[str] = None
    camera_motion: Optional[str] = None
    camera_speed: Optional[str] = None

    _nested = {"subjects": Subject}

    def __post_init__(self):
        _int("start", self.start)
        _int("end", self.end)
        if self.end < self.start:
            raise ValueError(f"end must be >= start ({self.start}), got {self.end}")
        subs = tuple(self.subjects)
        object.__setattr__(self, "subjects", subs)
        if not subs or not all(isinstance(s, Subject) for s in subs):
            raise ValueError(f"subjects must be a non-empty list of Subject, got {self.subjects!r}")
        _text("interaction", self.interaction, choices=INTERACTIONS)
        if self.interaction is not None and len(subs) < 2:
            raise ValueError(f"interaction {self.interaction!r} needs >= 2 subjects, got {len(subs)}")
        _text("camera_motion", self.camera_motion, choices=CAMERA_MOTIONS)
        _text("camera_speed", self.camera_speed, choices=SPEEDS)


@dataclass(frozen=True)
class CaptionSchema(_Schema):
    """One clip's structured caption (module docstring).

    spans: one or more :class:`Span` in frame order, not overlapping. background: ``"plain"`` (the synthetic
    world's dark background, not rendered), ``"textured"`` or free text ("a beach"). environment: what else is
    in the scene; for the synthetic world ``"gray bar"`` or ``"wide gray bar"`` (an occluder the subjects pass
    behind). shot_type ("close-up", "wide shot"), lighting, style: free text or null.
    """

    spans: tuple
    background: Optional[str] = None
    environment: Optional[str] = None
    shot_type: Optional[str] = None
    lighting: Optional[str] = None
    style: Optional[str] = None

    _nested = {"spans": Span}

    def __post_init__(self):
        spans = tuple(self.spans)
        object.__setattr__(self, "spans", spans)
        if not spans or not all(isinstance(s, Span) for s in spans):
            raise ValueError(f"spans must be a non-empty list of Span, got {self.spans!r}")
        for i, (a, b) in enumerate(zip(spans, spans[1:])):
            if b.start <= a.end:
                raise ValueError(f"spans must be in frame order without overlap: spans[{i + 1}] starts at {b.start}, "
                                 f"spans[{i}] ends at {a.end}")
        for name in ("background", "environment", "shot_type", "lighting", "style"):
            _text(name, getattr(self, name))

    # ---- JSON ---------------------------------------------------------------------------------------------

    def to_json(self, **kw) -> str:
        """The schema as JSON text (every field, null where unknown) with a ``version`` key; ``kw`` go to
        :func:`json.dumps`. :meth:`json_schema` describes :meth:`to_dict` (what a model answers), without it."""
        return json.dumps({"version": SCHEMA_VERSION, **self.to_dict()}, **kw)

    @classmethod
    def from_json(cls, data: Union[str, bytes, dict]) -> "CaptionSchema":
        """Read JSON text (or its parsed dict): ValueError naming the field on a missing or unknown field, a wrong
        type or a value outside its choices. A ``version`` key is optional; another version than ours is refused."""
        if isinstance(data, (str, bytes)):
            try:
                data = json.loads(data)
            except json.JSONDecodeError as e:
                raise ValueError(f"caption JSON does not parse: {e}") from None
        if isinstance(data, dict) and "version" in data:
            data = dict(data)
            v = data.pop("version")
            if v != SCHEMA_VERSION:
                raise ValueError(f"version must be {SCHEMA_VERSION}, got {v!r}")
        return cls.from_dict(data)

    @classmethod
    def json_schema(cls) -> dict:
        """The JSON Schema (draft 2020-12) of :meth:`to_dict`'s shape: strict (every property required, no
        others), the choices as enums; what a chat model is asked to answer with, as it is (no ``$schema`` or
        ``title`` keys, which some servers' structured-output modes refuse; the name goes in ``response_format``).
        Rules across fields (a bounce's axis, span order, an interaction's two subjects) are checked by
        :meth:`from_json`, not expressible here."""
        def opt(choices=None) -> dict:
            if choices is None:
                return {"type": ["string", "null"]}
            return {"type": ["string", "null"], "enum": [*choices, None]}

        def obj(props: dict, desc: str) -> dict:
            return {"type": "object", "description": desc, "properties": props, "required": list(props),
                    "additionalProperties": False}

        subject = obj({"type": {"type": "string"}, "shape": opt(), "colour": opt(), "appearance": opt(),
                       "action": opt(), "direction": opt(DIRECTIONS), "speed": opt(SPEEDS), "position": opt()},
                      "one subject: what it is, how it looks, what it does and where")
        span = obj({"start": {"type": "integer", "minimum": 0}, "end": {"type": "integer", "minimum": 0},
                    "subjects": {"type": "array", "items": subject, "minItems": 1},
                    "interaction": opt(INTERACTIONS), "camera_motion": opt(CAMERA_MOTIONS),
                    "camera_speed": opt(SPEEDS)},
                   "what happens in frames start..end (inclusive)")
        top = obj({"spans": {"type": "array", "items": span, "minItems": 1}, "background": opt(),
                   "environment": opt(), "shot_type": opt(), "lighting": opt(), "style": opt()},
                  "a video clip's structured caption; one span per frame range whose content differs")
        return top

    # ---- text ---------------------------------------------------------------------------------------------

    def render(self) -> str:
        """The caption text: the synthetic world's grammar for what it can say, then the other fields set."""
        first = self.spans[0]
        text = self._subjects_text(first, first.subjects)
        if self.environment in ("gray bar", "wide gray bar"):
            text += f" behind a {self.environment}"
        elif self.environment:
            text += f", {self.environment}"
        if self.background not in (None, "plain"):
            text += f" on a {self.background} background" if self.background == "textured" else f", {self.background}"
        if first.camera_motion not in (None, "static"):
            text += f", camera {first.camera_motion}"
            if first.camera_speed:
                text += f" {_SPEED_WORDS[first.camera_speed]}"
        for prev, span in zip(self.spans, self.spans[1:]):
            text += ", then " + self._change_text(prev, span)
        tail = [f"the {s.bare_noun()} {s.position}" for s in first.subjects if s.position]
        tail += [self.shot_type, self.lighting, self.style]
        tail = [t for t in tail if t]
        if tail:
            text += ". " + ". ".join(t[0].upper() + t[1:] for t in tail)
        return text

    @staticmethod
    def _subjects_text(span: Span, subjects) -> str:
        parts = []
        for s in subjects:
            m = s.motion()
            parts.append(s.noun() + (f" {m}" if m else ""))
        text = " and ".join(parts)
        if span.interaction:
            text += f", {span.interaction}"
        return text

    @staticmethod
    def _change_text(prev: Span, span: Span) -> str:
        """A later span: each subject's new action (``"the red circle moving right quickly"``), its camera."""
        parts = []
        for s in span.subjects:
            m = s.motion() or ("still" if s.action == "still" else "")   # an unknown action says nothing
            parts.append(f"the {s.bare_noun()}" + (f" {m}" if m else ""))
        text = " and ".join(parts)
        if span.interaction:
            text += f", {span.interaction}"
        if span.camera_motion is not None and span.camera_motion != prev.camera_motion:
            text += f", camera {span.camera_motion}" + (f" {_SPEED_WORDS[span.camera_speed]}" if span.camera_speed
                                                       else "")
        return text

    # ---- the synthetic grammar ----------------------------------------------------------------------------

    @classmethod
    def from_prompt(cls, prompt, frames: int = 1) -> "CaptionSchema":
        """The schema of a synthetic or world :class:`~sora_fast.data.synthetic.Prompt` over ``frames`` frames
        (one span); ``render()`` gives the generator's caption of it."""
        from ..data.synthetic import Prompt

        if not isinstance(prompt, Prompt):
            raise TypeError(f"prompt must be a sora_fast.data.synthetic.Prompt, got {type(prompt).__name__}")
        _int("frames", frames, 1)
        subjects = [_subject_of(prompt)] + ([_subject_of(prompt.other)] if prompt.other is not None else [])
        interaction = {"passing": "passing each other", "colliding": "colliding"}.get(prompt.interaction)
        camera = speed = None
        if prompt.camera:
            camera = f"panning {prompt.camera}" if prompt.camera in ("left", "right", "up", "down") else \
                f"zooming {prompt.camera}"
            speed = prompt.camera_speed
        env = ("wide gray bar" if prompt.wide_occluder else "gray bar") if prompt.occluder else None
        return cls(spans=(Span(0, frames - 1, tuple(subjects), interaction, camera, speed),),
                   background="textured" if prompt.camera else "plain", environment=env)

    @classmethod
    def from_caption(cls, text: str, frames: int = 1) -> "CaptionSchema":
        """The schema of a caption of the synthetic or world grammar (``parse_caption``'s ValueError otherwise)."""
        from ..data.synthetic import parse_caption

        return cls.from_prompt(parse_caption(text), frames)

    def to_prompt(self):
        """The :class:`~sora_fast.data.synthetic.Prompt` this schema says, when the synthetic grammar can say it
        (one span, shapes and colours of the grammar); ValueError naming what it cannot say otherwise."""
        from ..data.synthetic import parse_caption

        if len(self.spans) != 1:
            raise ValueError(f"the synthetic grammar says one span, this schema has {len(self.spans)}")
        return parse_caption(self.render())

    def with_spans(self, spans) -> "CaptionSchema":
        return replace(self, spans=tuple(spans))


def _subject_of(p) -> Subject:
    axis_words = {"x": "left and right", "y": "up and down"}
    if p.gravity == "dropped":
        return Subject(shape=p.shape, colour=p.color, action="dropped")
    if p.gravity == "thrown":
        return Subject(shape=p.shape, colour=p.color, action="thrown", direction=p.direction, speed=p.speed)
    if p.bounce:
        return Subject(shape=p.shape, colour=p.color, action="bouncing", direction=axis_words[p.axis], speed=p.speed)
    if p.direction is not None:
        return Subject(shape=p.shape, colour=p.color, action="moving", direction=p.direction, speed=p.speed)
    return Subject(shape=p.shape, colour=p.color, action="still")

