"""Prompt expansion: a short prompt rewritten into one caption in the style of the training captions.

A model only knows the captions it was trained on. A short prompt ("red circle left") leaves out what every
training caption says (here the speed), and the text encoder then sees a sentence unlike any it learned.
An expander rewrites the prompt first:

- :class:`SchemaExpander` reads the prompt's words into a partial :class:`~sora_fast.captions.CaptionSchema`,
  fills each field the prompt leaves out with the training captions' most frequent value among the captions
  that agree with everything already known (:class:`~sora_fast.captions.stats.CaptionStats`, saved with the
  pipeline), and renders it with :meth:`~sora_fast.captions.CaptionSchema.render`, so the result is written
  exactly as the training captions are. Deterministic, no network.
- :class:`ChatExpander` asks an OpenAI-compatible chat model, giving it examples of the training captions.

Every expander returns an :class:`Expansion` per prompt (the original, the expanded text, the fields filled,
a note or an error) and never raises for a prompt it cannot expand: it keeps the prompt, so generation runs.
"""
from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import Optional, Sequence, Union

from .schema import INTERACTIONS, CaptionSchema, Span, Subject
from .stats import _SCENE_FIELDS, _SUBJECT_FIELDS, MAX_SUBJECTS, STATS_VERSION, CaptionStats, _field_of, _key

__all__ = ["CaptionStats", "Expansion", "PromptExpander", "SchemaExpander", "ChatExpander", "make_expander",
           "EXPANDERS", "STATS_VERSION"]

EXPANDERS = ("schema", "chat")

# The grammar's values of each field, in the order that breaks ties (and fills a field no statistics cover).
_ORDER = {
    "colour": ("red", "green", "blue", "yellow", "white"),
    "shape": ("circle", "square", "triangle"),
    "action": ("moving", "bouncing", "dropped", "thrown", "still"),
    "direction": ("left", "right", "up", "down", "left and right", "up and down"),
    "speed": ("slow", "fast"),
    "interaction": INTERACTIONS,
    "environment": (None, "gray bar", "wide gray bar"),
    "background": ("plain", "textured"),
    "camera_motion": (None, "panning left", "panning right", "panning up", "panning down", "zooming in",
                      "zooming out"),
    "camera_speed": (None, "slow", "fast"),
}
_WAYS = {"moving": ("left", "right", "up", "down"), "thrown": ("left", "right"),
         "bouncing": ("left and right", "up and down"), "dropped": (None,), "still": (None,)}
_OPPOSITE = {"left": "right", "right": "left", "up": "down", "down": "up"}
# what a field holds when it adds nothing to the caption: such fills are not listed in Expansion.filled
_NOTHING = {"environment": None, "background": "plain", "camera_motion": None, "camera_speed": None}


# ----------------------------------------------------------------------------------------------
# expansions and expanders


@dataclass
class Expansion:
    """One prompt's expansion.

    original: the prompt as given. expanded: what the text encoder gets (the original when nothing was done).
    schema: the expanded caption's :class:`CaptionSchema` (one span over frame 0) when it is in the grammar,
    else None. filled: the fields the expander chose (``{"subjects[0].speed": "fast"}``), not those the prompt
    stated; a fill that adds nothing (no occluder, a static camera, the plain background) is not listed.
    expander: the expander's name (None: no expansion asked). note: why the prompt was kept or how it was read
    (words left out, statistics missing). error: the failure that kept the prompt (a chat request, a reply).
    """

    original: str
    expanded: str
    expander: Optional[str] = None
    schema: Optional[CaptionSchema] = None
    filled: dict = field(default_factory=dict)
    note: Optional[str] = None
    error: Optional[str] = None

    @property
    def changed(self) -> bool:
        return self.expanded != self.original

    def to_dict(self) -> dict:
        """JSON-ready: every field but ``schema`` (see :meth:`CaptionSchema.to_json` for it)."""
        return {"original": self.original, "expanded": self.expanded, "expander": self.expander,
                "filled": dict(self.filled), "note": self.note, "error": self.error}

    def describe(self) -> str:
        """One line for a terminal: ``'red circle left' -> 'a red circle moving left quickly' (filled ...)``."""
        if not self.changed:
            why = self.error or self.note or "unchanged"
            return f"{self.original!r} kept ({why})"
        extra = [", ".join(f"{k}={v}" for k, v in self.filled.items())] if self.filled else []
        extra += [self.note] if self.note else []
        return f"{self.original!r} -> {self.expanded!r}" + (f" (filled {'; '.join(extra)})" if extra else "")


def _check_prompt(prompt) -> str:
    if not isinstance(prompt, str):
        raise TypeError(f"prompt must be a str, got {type(prompt).__name__}")
    return prompt


class PromptExpander:
    """Base of the expanders: subclasses set :attr:`name` and implement :meth:`expand`, which returns an
    :class:`Expansion` and keeps a prompt it cannot expand (never raises for one, unless :attr:`strict`)."""

    name = "expander"
    strict = False

    def expand(self, prompt: str) -> Expansion:   # pragma: no cover - abstract
        raise NotImplementedError

    def expand_many(self, prompts: Sequence[str]) -> list[Expansion]:
        """:meth:`expand` of each prompt, in order; an exception out of it becomes that prompt's error (the
        prompt kept) unless :attr:`strict`."""
        if isinstance(prompts, str) or not isinstance(prompts, Sequence):
            raise TypeError(f"prompts must be a list of strings, got {type(prompts).__name__}")
        out = []
        for p in prompts:
            _check_prompt(p)
            try:
                out.append(self.expand(p))
            except Exception as e:   # noqa: BLE001 - one prompt's failure keeps that prompt, generation goes on
                if self.strict:
                    raise
                out.append(Expansion(p, p, self.name, error=f"{type(e).__name__}: {e}"))
        return out


# ---- reading a short prompt ------------------------------------------------------------------

def _words(*groups) -> dict:
    return {w: value for value, words in groups for w in words.split()}


_COLOUR_WORDS = {c: c for c in _ORDER["colour"]}
_SHAPE_WORDS = _words(("circle", "circle circles ball balls disc disk dot"),
                      ("square", "square squares box boxes block"), ("triangle", "triangle triangles"))
_DIRECTION_WORDS = _words(("left", "left leftward leftwards"), ("right", "right rightward rightwards"),
                          ("up", "up upward upwards rising"), ("down", "down downward downwards"),
                          ("left and right", "left_and_right horizontally"), ("up and down", "up_and_down vertically"))
_SPEED_WORDS = _words(("slow", "slow slowly slower gently"), ("fast", "fast quickly quick rapidly swiftly faster"))
_ACTION_WORDS = _words(("moving", "moving moves move going goes sliding slides travelling traveling"),
                       ("bouncing", "bouncing bounces bounce bouncy"),
                       ("dropped", "dropped drop drops dropping falling falls fall"),
                       ("thrown", "thrown throw throws throwing tossed toss"),
                       ("still", "still static stationary resting motionless"))
_INTERACTION_WORDS = _words(("passing each other", "passing pass passes"),
                            ("colliding", "colliding collide collides collision crashing crash hitting"))
_OCCLUDER_WORDS = set("bar occluder occluded behind hidden".split())
_BACKGROUND_WORDS = _words(("textured", "textured texture"), ("plain", "plain"))
_PAN, _ZOOM = set("pan pans panning".split()), set("zoom zooms zooming".split())
_FILLER = set("a an the and with of is are on to background gray object objects shape shapes it its then very at "
              "speed scene video clip in out while as that which from across along frame there".split())
_BOUNDARY = {",", "and"}


@dataclass
class _Reading:
    subjects: list            # one dict per subject: colour, shape, action, direction, speed (the words given)
    clip: dict                # given clip fields (record keys)
    camera_choices: Optional[tuple] = None   # camera motions the words allow, when they name only its kind
    unknown: list = field(default_factory=list)
    notes: list = field(default_factory=list)


def _tokens(prompt: str) -> list[str]:
    t = prompt.lower().replace("grey", "gray")
    t = re.sub(r"\bside[\s-]+to[\s-]+side\b|\bleft[\s-]+and[\s-]+right\b|\bleft-right\b", " left_and_right ", t)
    t = re.sub(r"\bup[\s-]+and[\s-]+down\b|\bup-down\b", " up_and_down ", t)
    t = re.sub(r"\beach other\b|\bone another\b", " ", t)
    return re.findall(r"[a-z_]+|,", t)


def _read(prompt: str) -> _Reading:
    """The fields a short prompt states, word by word (see :class:`SchemaExpander`)."""
    subjects: list[dict] = [{}]
    clip: dict = {}
    cam = {"on": False, "kind": None, "way": None, "speed": None, "static": False, "given": False}
    unknown, notes = [], []
    boundary = False

    def put(d: dict, name: str, value, word: str, whose: str):
        if d.get(name) not in (None, value):
            notes.append(f"'{word}' left out: {whose} already has {name} {d[name]!r}")
        else:
            d[name] = value

    for tok in _tokens(prompt):
        if tok in _BOUNDARY:
            cam["on"], boundary = False, True
            continue
        if tok == "camera" or tok in _PAN or tok in _ZOOM:
            cam.update(on=True, given=True)
            if tok != "camera":
                kind = "pan" if tok in _PAN else "zoom"
                if cam["kind"] not in (None, kind):
                    notes.append(f"'{tok}' left out: the camera already {cam['kind']}s")
                else:
                    cam["kind"] = kind
            continue
        if cam["on"]:
            if tok in ("in", "out") and cam["way"] is None and cam["kind"] in (None, "zoom"):
                cam.update(kind="zoom", way=tok)
                continue
            if tok in _DIRECTION_WORDS and " " not in _DIRECTION_WORDS[tok] and cam["way"] is None \
                    and cam["kind"] in (None, "pan"):
                cam.update(kind="pan", way=_DIRECTION_WORDS[tok])
                continue
            if tok in _SPEED_WORDS and cam["speed"] is None:
                cam["speed"] = _SPEED_WORDS[tok]
                continue
            if tok in ("static", "still", "fixed", "steady"):
                cam["static"] = True
                continue
            if tok in _FILLER:
                continue
            cam["on"] = False            # the camera's words end here: the word belongs to the subjects
        cur = subjects[-1]
        if tok in _COLOUR_WORDS or tok in _SHAPE_WORDS:
            name, value = ("colour", _COLOUR_WORDS[tok]) if tok in _COLOUR_WORDS else ("shape", _SHAPE_WORDS[tok])
            if name in cur or (boundary and ("colour" in cur or "shape" in cur)):
                subjects.append({})      # a second noun: the next subject
                cur = subjects[-1]
            cur[name] = value
            boundary = False
            continue
        whose = f"subject {len(subjects)}"
        if tok in _DIRECTION_WORDS:
            put(cur, "direction", _DIRECTION_WORDS[tok], tok, whose)
        elif tok in _SPEED_WORDS:
            put(cur, "speed", _SPEED_WORDS[tok], tok, whose)
        elif tok in _ACTION_WORDS:
            put(cur, "action", _ACTION_WORDS[tok], tok, whose)
        elif tok in _INTERACTION_WORDS:
            put(clip, "interaction", _INTERACTION_WORDS[tok], tok, "the prompt")
        elif tok in _OCCLUDER_WORDS or tok in ("wide", "wider"):
            if tok in ("wide", "wider"):
                clip["wide"] = True
            else:
                clip["occluder"] = True
        elif tok in _BACKGROUND_WORDS:
            put(clip, "background", _BACKGROUND_WORDS[tok], tok, "the prompt")
        elif tok not in _FILLER:
            unknown.append(tok)

    given: dict = {}
    if clip.pop("occluder", False):
        given["environment"] = "wide gray bar" if clip.get("wide") else "gray bar"
    elif clip.get("wide"):
        unknown.append("wide")
    clip.pop("wide", None)
    given.update(clip)
    choices = None
    if cam["given"]:
        if cam["static"] and cam["kind"] is None:
            given["camera_motion"] = None
        elif cam["way"] is not None:
            given["camera_motion"] = ("panning " if cam["kind"] == "pan" else "zooming ") + cam["way"]
        else:
            choices = tuple(m for m in _ORDER["camera_motion"] if m is not None
                            and (cam["kind"] is None or m.startswith("panning" if cam["kind"] == "pan" else "zoom")))
        if cam["speed"] is not None:
            given["camera_speed"] = cam["speed"]
    for s in subjects:             # "moving left and right" is the grammar's bounce
        if s.get("action") == "moving" and s.get("direction") in _WAYS["bouncing"]:
            s["action"] = "bouncing"
    return _Reading(subjects, given, choices, unknown, notes)


# ---- the schema expander ---------------------------------------------------------------------

def _parses(text: str) -> bool:
    from ..data.synthetic import parse_caption

    try:
        parse_caption(text)
    except ValueError:
        return False
    return True


class SchemaExpander(PromptExpander):
    """Expand a short prompt by filling a :class:`CaptionSchema` from the training captions' statistics.

    **Reading.** The prompt's words are read against the synthetic world's grammar (case and punctuation
    ignored): colours, shapes (``ball`` is a circle, ``box`` a square), directions (``left and right`` /
    ``side to side`` / ``horizontally`` and ``up and down`` / ``vertically`` are the bounce axes), speeds
    (``slow``/``slowly``, ``fast``/``quickly``), actions (``moving``, ``bouncing``, ``dropped``/``falling``,
    ``thrown``/``tossed``, ``still``), an occluder (``bar``, ``behind``, ``occluder``; ``wide`` makes it the wide
    bar), the background (``textured``), the camera (``camera``, ``pan``/``panning`` with a direction,
    ``zoom``/``zooming`` with ``in``/``out``; a speed word right after it is the camera's) and two subjects
    (a second colour or shape, or one after ``and`` / a comma, starts the next) with their interaction
    (``passing``, ``colliding``). Words outside the grammar are left out and named in the note.

    **Filling.** Each field the prompt leaves out takes, in this order: interaction, camera motion, camera
    speed, background, occluder, then each subject's action, direction and speed, the value most frequent
    among the training captions whose fields equal every field known so far (stated or filled), of the
    values the grammar allows with them (a thrown subject moves left or right, a camera needs the textured
    background ...). When no training caption agrees, the stated fields alone condition, then the subject
    count, then nothing; without any count the grammar's first allowed value is taken. Colours and shapes
    take their most frequent value over all subjects (a second subject a colour other than the first's).
    Ties go to the grammar's order. Without statistics (``stats=None``, or none counted) every fill is the
    grammar's first allowed value, and the note says so; statistics of training captions none of which is in
    the grammar (a model of real videos) keep every prompt, with a note.

    A prompt that already parses as a caption (``parse_caption``) is returned unchanged; note that
    ``"a red circle"`` is a full caption (an image's) while ``"red circle"`` gets a motion. A prompt with no
    colour or shape, or more than two subjects, is returned unchanged with a note (``strict=True``: a
    ValueError instead).
    """

    name = "schema"

    def __init__(self, stats: Optional[CaptionStats] = None, *, strict: bool = False):
        if stats is not None and not isinstance(stats, CaptionStats):
            raise TypeError(f"stats must be a CaptionStats or None, got {type(stats).__name__}")
        if not isinstance(strict, bool):
            raise TypeError(f"strict must be a bool, got {type(strict).__name__}")
        self.stats = stats if stats is not None else CaptionStats()
        self.strict = strict
        self._no_stats = stats is None

    def _keep(self, prompt: str, why: str) -> Expansion:
        if self.strict:
            raise ValueError(f"prompt {prompt!r} cannot be expanded: {why}")
        return Expansion(prompt, prompt, self.name, note=why)

    def expand(self, prompt: str) -> Expansion:
        _check_prompt(prompt)
        if _parses(prompt):
            return Expansion(prompt, prompt, self.name, schema=CaptionSchema.from_caption(prompt),
                             note="already a caption of the grammar")
        if not self._no_stats and self.stats.uniform and self.stats.skipped:
            return self._keep(prompt, f"none of the {self.stats.skipped} training captions is in the caption grammar, "
                                      "so its captions would be unlike them (a ChatExpander writes in their style)")
        r = _read(prompt)
        if not any("colour" in s or "shape" in s for s in r.subjects):
            words = f" (read no colour {list(_ORDER['colour'])} or shape {list(_ORDER['shape'])})"
            return self._keep(prompt, "no subject the caption grammar can say" + words)
        if len(r.subjects) > MAX_SUBJECTS:
            return self._keep(prompt, f"the caption grammar says at most {MAX_SUBJECTS} subjects, the prompt names "
                                      f"{len(r.subjects)}")
        notes = list(r.notes)
        n = len(r.subjects)
        if n == 1 and "interaction" in r.clip:
            notes.append(f"interaction {r.clip.pop('interaction')!r} left out: it needs two subjects")
        given = {"subjects": n, **r.clip}
        for i, s in enumerate(r.subjects):
            given.update({_key(i, k): s[k] for k in _SUBJECT_FIELDS if k in s})
        known, filled, from_grammar = dict(given), {}, []

        order = (["interaction"] if n == 2 else []) + ["camera_motion", "camera_speed", "background", "environment"]
        order += [_key(i, k) for i in range(n) for k in _SUBJECT_FIELDS]
        for key in order:
            if key in known:
                continue
            ok = self._allowed(key, known, r.camera_choices)
            if ok == [None]:                      # not applicable (no camera speed without a camera ...)
                known[key] = None
                continue
            if not ok:
                return self._keep(prompt, f"no {key} the caption grammar allows fits its other fields "
                                          f"({', '.join(f'{k}={v}' for k, v in given.items())})")
            value, source = self._choose(key, known, given, ok)
            known[key] = value
            if source == "grammar":
                from_grammar.append(key)
            if value != _NOTHING.get(key, object()):
                filled[key] = value
        nouns = []
        for i, s in enumerate(r.subjects):
            noun = {}
            for name in ("colour", "shape"):
                if name in s:
                    noun[name] = s[name]
                    continue
                taken = set()
                if name == "colour":   # two subjects of one colour: the grammar allows it, the world never draws it
                    taken = {o.get("colour") for o in r.subjects[:i] + r.subjects[i + 1:]} | \
                        {x["colour"] for x in nouns}
                value, source = self._choose_noun(name, taken)
                noun[name] = filled[_key(i, name)] = value
                if source == "grammar":
                    from_grammar.append(_key(i, name))
            nouns.append(noun)
        try:
            subjects = tuple(Subject(shape=nn["shape"], colour=nn["colour"],
                                     **{k: known[_key(i, k)] for k in _SUBJECT_FIELDS}) for i, nn in enumerate(nouns))
            span = Span(0, 0, subjects, known.get("interaction"), known["camera_motion"], known["camera_speed"])
            schema = CaptionSchema(spans=(span,), background=known["background"], environment=known["environment"])
        except ValueError as e:
            return self._keep(prompt, f"its fields cannot be said in the caption grammar ({e})")
        text = schema.render()
        if not _parses(text):
            return self._keep(prompt, f"its fields render to {text!r}, which the caption grammar does not parse")
        if r.unknown:
            notes.append("words outside the caption grammar left out: " + ", ".join(dict.fromkeys(r.unknown)))
        if self.stats.uniform:
            notes.append("no caption statistics: unstated fields took the grammar's first choice")
        elif from_grammar:
            notes.append("no training caption agreed, the grammar's first choice taken for " + ", ".join(from_grammar))
        keys = [_key(i, k) for i in range(n) for k in ("colour", "shape") + _SUBJECT_FIELDS] + list(_SCENE_FIELDS)
        filled = {k: filled[k] for k in keys if k in filled}    # in the order a reader meets them
        return Expansion(prompt, text, self.name, schema=schema, filled=filled, note="; ".join(notes) or None)

    @staticmethod
    def _allowed(key: str, known: dict, camera_choices) -> list:
        """The values of ``key`` the grammar allows with the fields ``known`` (grammar order)."""
        name = _field_of(key)
        if key.startswith("subjects["):
            prefix = key[: -len(name)]
            action = known.get(prefix + "action")
            if name == "action":
                way, speed = known.get(prefix + "direction"), known.get(prefix + "speed")
                return [a for a in _ORDER["action"] if (way is None or way in _WAYS[a])
                        and (speed is None or None not in _WAYS[a])]
            if name == "direction":   # two subjects move on one axis, towards or past each other
                i = int(key[len("subjects["):].split("]")[0])
                other = known.get(_key(1 - i, "direction")) if known["subjects"] == 2 else None
                return [d for d in _WAYS[action] if d not in _OPPOSITE or other not in _OPPOSITE
                        or d == _OPPOSITE[other]]
            return [None] if None in _WAYS[action] else list(_ORDER["speed"])
        cam = known.get("camera_motion", "?")
        if key == "camera_motion":   # a camera moves over the textured background only, and has a speed
            bg, speed = known.get("background"), known.get("camera_speed")
            values = list(_ORDER[key])
            if bg == "plain":
                values = [None]
            elif bg == "textured" or speed is not None:
                values = values[1:]
            return [m for m in values if camera_choices is None or m in camera_choices]
        if key == "camera_speed":
            return [None] if cam is None else list(_ORDER["speed"])
        if key == "background":
            return ["plain"] if cam is None else ["textured"]
        return list(_ORDER[key])

    def _choose(self, key: str, known: dict, given: dict, ok: list) -> tuple:
        """The most frequent allowed value among the captions agreeing with ``known``, then ``given``, then the
        subject count, then all; the grammar's first allowed value when none counts. Returns (value, source)."""
        rank = {v: i for i, v in enumerate(_ORDER[_field_of(key)])}
        levels = (known, given, {"subjects": known["subjects"]}, {})
        for where in levels:
            counts = self.stats.counts(key, {k: v for k, v in where.items() if k != key})
            for value in sorted(counts, key=lambda v: (-counts[v], rank.get(v, len(rank)))):
                if value in ok:
                    return value, "statistics"
        return ok[0], "grammar"

    def _choose_noun(self, name: str, taken: set) -> tuple:
        counts = self.stats.counts(name)
        rank = {v: i for i, v in enumerate(_ORDER[name])}
        for value in sorted(counts, key=lambda v: (-counts[v], rank.get(v, len(rank)))):
            if value not in taken and value in rank:
                return value, "statistics"
        return next(v for v in _ORDER[name] if v not in taken), "grammar"


# ---- the chat expander -----------------------------------------------------------------------

SYSTEM_PROMPT = """You rewrite short prompts for a text-to-video model into captions the model understands.
The model learned from captions written in one fixed style; it understands that style and little else.
Rewrite the user's prompt into exactly one caption in that style:
- Keep everything the user asked for: every subject, colour, shape, motion, direction, speed and camera move.
- Add only what a caption of this style always states and the prompt leaves out (for example a speed or a
  direction), choosing what is usual in the examples; never add a subject, an object or an event.
- Use the examples' words and word order; do not add adjectives, mood, lighting or style they never use.
- If the prompt already is such a caption, return it unchanged.
Answer with the caption alone, on one line, without quotes or any other text.

Captions of the training set:
{examples}"""

SCHEMA_SYSTEM_PROMPT = """You turn short prompts for a text-to-video model into a structured caption (JSON).
Fill the JSON schema you are given for the video the user asks for: one span (start 0, end 0) with its
subjects in the prompt's order. Keep everything the user asked for; fill a field the prompt leaves out with
what is usual in the examples of the training set below, and use null where those examples never state it.
Never add a subject, an object or an event the user did not ask for.

Captions of the training set:
{examples}"""


def _reply_text(reply) -> str:
    """A chat reply as one caption line: code fences, a "Caption:" label and wrapping quotes removed; a line
    of the grammar preferred, else all lines joined. ValueError for an empty reply."""
    if not isinstance(reply, str):
        raise ValueError(f"the chat reply must be text, got {type(reply).__name__}")
    lines = [ln.strip() for ln in reply.strip().strip("`").splitlines()]
    lines = [re.sub(r"^(?:caption|prompt|rewritten prompt|expanded prompt)\s*:\s*", "", ln, flags=re.I)
             for ln in lines if ln and not ln.startswith("```")]
    lines = [ln.strip().strip("\"'`“”").strip() for ln in lines]
    lines = [ln for ln in lines if ln]
    if not lines:
        raise ValueError(f"the chat reply holds no caption: {reply!r}")
    return next((ln for ln in lines if _parses(ln)), " ".join(" ".join(lines).split()))


class ChatExpander(PromptExpander):
    """Expand prompts with an OpenAI-compatible chat model (:class:`~sora_fast.captions.chat.ChatClient`).

    client_or_base_url: a ``ChatClient`` (or any object with its ``complete(messages, *, response_format=None,
        temperature=0.0) -> str``), or the server's base URL, with ``model`` its model name (``client_kw``,
        e.g. ``api_key_env``, ``timeout``, ``max_retries``, go to the ``ChatClient``).
    examples: training captions shown to the model (default: ``stats.examples``); ``max_examples`` of them.
    structured: False (default) asks for the caption as plain text: the reply is cut to one line (a line the
        grammar parses preferred, else all lines joined) and refused when empty or over ``max_chars``. True asks
        for :meth:`CaptionSchema.json_schema` JSON (``response_format`` ``json_schema``, strict): the reply is
        validated by :meth:`CaptionSchema.from_json` and rendered, so the caption is written exactly in the
        grammar's words; it needs a server with structured output.
    A failed request (after the client's retries) or an invalid reply keeps the prompt and records the error.
    """

    name = "chat"

    def __init__(self, client_or_base_url, model: Optional[str] = None, *, examples: Optional[Sequence[str]] = None,
                 stats: Optional[CaptionStats] = None, structured: bool = False, temperature: float = 0.0,
                 max_examples: int = 8, max_chars: int = 1000, **client_kw):
        if isinstance(client_or_base_url, str):
            if not isinstance(model, str) or not model:
                raise ValueError(f"model must name the chat model when a base URL is given, got {model!r}")
            from .chat import ChatClient

            self.client = ChatClient(client_or_base_url, model, **client_kw)
        elif callable(getattr(client_or_base_url, "complete", None)):
            if client_kw:
                raise TypeError(f"client options {sorted(client_kw)} need a base URL, not a client object")
            self.client = client_or_base_url
        else:
            raise TypeError("client_or_base_url must be a base URL or a ChatClient (an object with complete()), got "
                            f"{type(client_or_base_url).__name__}")
        if stats is not None and not isinstance(stats, CaptionStats):
            raise TypeError(f"stats must be a CaptionStats or None, got {type(stats).__name__}")
        if examples is None:
            examples = stats.examples if stats is not None else []
        if isinstance(examples, str) or not all(isinstance(e, str) for e in examples):
            raise TypeError("examples must be a list of caption strings")
        for name, v in (("max_examples", max_examples), ("max_chars", max_chars)):
            if isinstance(v, bool) or not isinstance(v, int) or v < (0 if name == "max_examples" else 1):
                raise ValueError(f"{name} must be a positive int, got {v!r}")
        self.examples = [e.strip() for e in examples if e.strip()][:max_examples]
        self.structured, self.temperature, self.max_chars = bool(structured), float(temperature), max_chars

    def messages(self, prompt: str) -> list[dict]:
        """The chat messages sent for ``prompt``: the system prompt with the examples, then the prompt."""
        shown = "\n".join(f"- {e}" for e in self.examples) or "- (none available)"
        system = (SCHEMA_SYSTEM_PROMPT if self.structured else SYSTEM_PROMPT).format(examples=shown)
        return [{"role": "system", "content": system}, {"role": "user", "content": prompt}]

    @staticmethod
    def response_format() -> dict:
        """The ``response_format`` of a structured request: the chat captioner's (:meth:`CaptionSchema.json_schema`,
        strict)."""
        from .chat import ChatCaptioner

        return ChatCaptioner.response_format()

    def expand(self, prompt: str) -> Expansion:
        _check_prompt(prompt)
        try:
            reply = self.client.complete(self.messages(prompt), temperature=self.temperature,
                                         response_format=self.response_format() if self.structured else None)
        except Exception as e:   # noqa: BLE001 - a failed request keeps the prompt
            return Expansion(prompt, prompt, self.name, error=f"chat request failed: {type(e).__name__}: {e}")
        try:
            if self.structured:
                schema = CaptionSchema.from_json(reply)
                text = schema.render()
            else:
                text = _reply_text(reply)
                schema = CaptionSchema.from_caption(text) if _parses(text) else None
            if len(text) > self.max_chars:
                raise ValueError(f"the caption has {len(text)} characters, more than max_chars={self.max_chars}")
        except (ValueError, TypeError) as e:
            shown = reply if not isinstance(reply, str) or len(reply) <= 200 else reply[:200] + "..."
            return Expansion(prompt, prompt, self.name, error=f"invalid chat reply ({e}): {shown!r}")
        return Expansion(prompt, text, self.name, schema=schema,
                         note=None if schema is not None or self.structured else "the reply is not in the caption "
                                                                                 "grammar")


# ---- resolving a spec ------------------------------------------------------------------------

def make_expander(spec: Union[str, PromptExpander, None], *, stats: Optional[CaptionStats] = None,
                  base_url: Optional[str] = None, model: Optional[str] = None, **chat_kw) -> Optional[PromptExpander]:
    """The expander ``spec`` names: None (no expansion), a :class:`PromptExpander` (returned as is),
    ``"schema"`` (:class:`SchemaExpander` of ``stats``) or ``"chat"`` (:class:`ChatExpander` of ``base_url`` and
    ``model``, its examples from ``stats``; ``chat_kw`` go to it)."""
    if spec is None or isinstance(spec, PromptExpander):
        return spec
    if spec == "schema":
        return SchemaExpander(stats)
    if spec == "chat":
        missing = [n for n, v in (("base_url", base_url), ("model", model)) if not v]
        if missing:
            raise ValueError(f"expand='chat' needs {' and '.join(missing)} (an OpenAI-compatible server and its "
                             "model), or pass expand=ChatExpander(base_url, model) itself")
        return ChatExpander(base_url, model, stats=stats, **chat_kw)
    raise ValueError(f"expand must be None, one of {list(EXPANDERS)} or a PromptExpander, got {spec!r}")
