"""The training captions' statistics: how often each caption field's values occur (:class:`CaptionStats`), saved
with a pipeline so that prompt expansion (:mod:`~sora_fast.captions.expand`) fills what a prompt leaves out the
way the training data would."""
from __future__ import annotations

import json
from collections import Counter
from typing import Optional, Sequence

from .schema import CaptionSchema

__all__ = ["CaptionStats", "STATS_VERSION"]

STATS_VERSION = 1
MAX_SUBJECTS = 2   # the synthetic world's grammar says one or two subjects
_SCENE_FIELDS = ("interaction", "environment", "background", "camera_motion", "camera_speed")
_SUBJECT_FIELDS = ("action", "direction", "speed")


def _key(i: int, name: str) -> str:
    return f"subjects[{i}].{name}"


def _field_of(key: str) -> str:
    return key.rsplit(".", 1)[-1]


def _scene_of(schema: CaptionSchema) -> dict:
    """The record of one caption the statistics count: its subject count, clip fields and each subject's motion
    (colours and shapes are counted apart: nothing in the grammar ties them to the motion)."""
    span = schema.spans[0]
    rec = {"subjects": len(span.subjects), "interaction": span.interaction, "environment": schema.environment,
           "background": schema.background, "camera_motion": span.camera_motion, "camera_speed": span.camera_speed}
    for i, s in enumerate(span.subjects):
        rec.update({_key(i, k): getattr(s, k) for k in _SUBJECT_FIELDS})
    return rec


def _count_dict(counter: Counter) -> dict:
    """``{value: count}`` most frequent first, ``None`` written ``"none"`` (JSON keys are strings)."""
    order = sorted(counter.items(), key=lambda kv: (-kv[1], str(kv[0])))
    return {("none" if v is None else str(v)): n for v, n in order}


# ----------------------------------------------------------------------------------------------
# statistics of the training captions


class CaptionStats:
    """How often each value of each caption field occurs in a set of training captions.

    Built from captions of the synthetic grammar (:func:`sora_fast.data.parse_caption`); a caption it cannot
    parse is counted in :attr:`skipped` and left out. Holds the subjects' colours and shapes (each subject
    counted once), one record per caption of everything else (subject count, interaction, occluder,
    background, camera, each subject's action / direction / speed) with its count, so a field's most frequent
    value can be taken among the captions that agree with other fields (:meth:`counts`), and a few
    :attr:`examples` (distinct kinds of caption first). JSON in and out: :meth:`to_dict` / :meth:`from_dict`.
    Empty statistics (no caption read) are uniform: every value counts 0.
    """

    def __init__(self):
        self.captions = 0
        self.skipped = 0
        self.colours: Counter = Counter()
        self.shapes: Counter = Counter()
        self._scenes: Counter = Counter()      # tuple(sorted(record.items())) -> count
        self.examples: list[str] = []

    # ---- building -------------------------------------------------------------------------------
    @classmethod
    def from_captions(cls, captions: Sequence[str], *, examples: int = 8) -> "CaptionStats":
        """Statistics of ``captions`` (strings); ``examples``: how many example captions to keep."""
        if isinstance(captions, str) or not isinstance(captions, Sequence):
            raise TypeError(f"captions must be a list of strings, got {type(captions).__name__}")
        if isinstance(examples, bool) or not isinstance(examples, int) or examples < 0:
            raise ValueError(f"examples must be an int >= 0, got {examples!r}")
        self, kinds, others = cls(), {}, []
        for i, text in enumerate(captions):
            if not isinstance(text, str):
                raise TypeError(f"captions[{i}] must be a str, got {type(text).__name__}")
            try:
                schema = CaptionSchema.from_caption(text)
            except ValueError:
                self.skipped += 1
                if text.strip() and len(others) < examples:
                    others.append(text.strip())
                continue
            self.captions += 1
            for s in schema.spans[0].subjects:
                self.colours[s.colour] += 1
                self.shapes[s.shape] += 1
            rec = _scene_of(schema)
            self._scenes[tuple(sorted(rec.items()))] += 1
            kind = (rec["subjects"], rec["interaction"], rec["environment"], rec["camera_motion"] is not None,
                    rec[_key(0, "action")])
            kinds.setdefault(kind, Counter())[text.strip()] += 1
        # one caption of each kind first (most frequent kinds first), then more of each in turn
        groups = [list(g) for g in sorted(kinds.values(), key=lambda g: -sum(g.values()))]
        picked: list[str] = []
        for depth in range(max(map(len, groups), default=0)):
            picked += [g[depth] for g in groups if depth < len(g)]
            if len(picked) >= examples:
                break
        self.examples = picked[:examples] or list(dict.fromkeys(others))[:examples]
        return self

    @classmethod
    def from_folder(cls, data_dir, *, manifest=None, examples: int = 8, progress: bool = False) -> "CaptionStats":
        """Statistics of the captions of a video folder, read as :class:`~sora_fast.data.VideoFolder` reads them
        (sidecar ``.txt`` files or ``manifest``; files it skips are not counted)."""
        from ..data import VideoFolder

        return cls.from_captions(VideoFolder(data_dir, manifest=manifest, progress=progress).captions,
                                 examples=examples)

    # ---- reading --------------------------------------------------------------------------------
    @property
    def uniform(self) -> bool:
        """No caption was read: every value counts 0 (fills follow the grammar's order)."""
        return self.captions == 0

    @property
    def scenes(self) -> list[dict]:
        """The caption records with their counts, most frequent first: ``[{"count": n, "subjects": 1, ...}]``."""
        rows = sorted(self._scenes.items(), key=lambda kv: (-kv[1], json.dumps(kv[0])))
        return [{"count": n, **dict(rec)} for rec, n in rows]

    def counts(self, key: str, where: Optional[dict] = None) -> Counter:
        """How often field ``key`` takes each value among the captions whose fields equal ``where``.

        key: ``"colour"`` or ``"shape"`` (over all subjects; ``where`` must be empty), a clip field
        (``"subjects"``, ``"interaction"``, ``"environment"``, ``"background"``, ``"camera_motion"``,
        ``"camera_speed"``) or a subject's field ``"subjects[i].action|direction|speed"``.
        """
        if key in ("colour", "shape"):
            if where:
                raise ValueError(f"counts of {key!r} are not conditioned, got where={where!r}")
            return Counter(self.colours if key == "colour" else self.shapes)
        where = where or {}
        out: Counter = Counter()
        for items, n in self._scenes.items():
            rec = dict(items)
            if key in rec and all(rec.get(k) == v for k, v in where.items()):
                out[rec[key]] += n
        return out

    def frequencies(self) -> dict:
        """Each field's values with their counts (JSON-ready, most frequent first): ``colour``, ``shape``,
        ``action``, ``direction``, ``speed`` over all subjects; the clip fields over captions."""
        subj = {k: Counter() for k in _SUBJECT_FIELDS}
        clip = {k: Counter() for k in ("subjects",) + _SCENE_FIELDS}
        for items, n in self._scenes.items():
            rec = dict(items)
            for k, c in clip.items():
                c[rec[k]] += n
            for i in range(rec["subjects"]):
                for k, c in subj.items():
                    c[rec[_key(i, k)]] += n
        return {"colour": _count_dict(self.colours), "shape": _count_dict(self.shapes),
                **{k: _count_dict(c) for k, c in subj.items()}, **{k: _count_dict(c) for k, c in clip.items()}}

    def summary(self) -> str:
        """One line: captions counted, skipped, the most frequent value of each subject field."""
        if self.uniform:
            return f"caption statistics: no caption of the grammar ({self.skipped} skipped)"
        f = self.frequencies()
        top = ", ".join(f"{k} {next(iter(f[k]))}" for k in ("colour", "shape", "action", "direction", "speed"))
        return f"caption statistics: {self.captions} captions ({self.skipped} skipped); most frequent {top}"

    # ---- JSON -----------------------------------------------------------------------------------
    def to_dict(self) -> dict:
        """``{"version", "captions", "skipped", "fields" (each field's counts), "scenes", "examples"}``."""
        return {"version": STATS_VERSION, "captions": self.captions, "skipped": self.skipped,
                "fields": self.frequencies(), "scenes": self.scenes, "examples": list(self.examples)}

    @classmethod
    def from_dict(cls, data, where: str = "captions") -> "CaptionStats":
        """Read :meth:`to_dict`'s dict; ValueError naming the entry (``where``) when it is malformed or when
        ``fields`` and ``scenes`` disagree."""
        if not isinstance(data, dict):
            raise ValueError(f"{where} must be a JSON object of caption statistics, got {type(data).__name__}")
        want = {"version", "captions", "skipped", "fields", "scenes", "examples"}
        if set(data) != want:
            raise ValueError(f"{where} must have exactly the keys {sorted(want)}, got {sorted(data)}")
        if data["version"] != STATS_VERSION:
            raise ValueError(f"{where}.version must be {STATS_VERSION}, got {data['version']!r}")
        self = cls()
        for k in ("captions", "skipped"):
            v = data[k]
            if isinstance(v, bool) or not isinstance(v, int) or v < 0:
                raise ValueError(f"{where}.{k} must be an int >= 0, got {v!r}")
            setattr(self, k, v)
        if not isinstance(data["scenes"], list):
            raise ValueError(f"{where}.scenes must be a list, got {type(data['scenes']).__name__}")
        for i, row in enumerate(data["scenes"]):
            at = f"{where}.scenes[{i}]"
            if not isinstance(row, dict):
                raise ValueError(f"{at} must be an object, got {type(row).__name__}")
            rec = dict(row)
            n = rec.pop("count", None)
            if isinstance(n, bool) or not isinstance(n, int) or n < 1:
                raise ValueError(f"{at}.count must be an int >= 1, got {n!r}")
            subjects = rec.get("subjects")
            if subjects not in range(1, MAX_SUBJECTS + 1):
                raise ValueError(f"{at}.subjects must be 1 .. {MAX_SUBJECTS}, got {subjects!r}")
            need = {"subjects", *_SCENE_FIELDS} | {_key(j, k) for j in range(subjects) for k in _SUBJECT_FIELDS}
            if set(rec) != need:
                raise ValueError(f"{at} must have the keys {sorted(need | {'count'})}, got {sorted(row)}")
            bad = [k for k, v in rec.items() if k != "subjects" and v is not None and not isinstance(v, str)]
            if bad:
                raise ValueError(f"{at}.{bad[0]} must be a string or null, got {rec[bad[0]]!r}")
            self._scenes[tuple(sorted(rec.items()))] += n
        if sum(self._scenes.values()) != self.captions:
            raise ValueError(f"{where}.scenes count {sum(self._scenes.values())} captions, {where}.captions says "
                             f"{self.captions}")
        fields_ = data["fields"]
        if not isinstance(fields_, dict) or not all(isinstance(fields_.get(k), dict) for k in ("colour", "shape")):
            raise ValueError(f"{where}.fields must be an object with 'colour' and 'shape' counts, got {fields_!r}")
        for name in ("colour", "shape"):
            c = fields_[name]
            if not all(isinstance(v, int) and not isinstance(v, bool) and v >= 1 for v in c.values()):
                raise ValueError(f"{where}.fields.{name} must map values to counts >= 1, got {c!r}")
            setattr(self, name + "s", Counter(c))
        subjects = sum(dict(rec)["subjects"] * n for rec, n in self._scenes.items())
        for name in ("colour", "shape"):
            if sum(fields_[name].values()) != subjects:
                raise ValueError(f"{where}.fields.{name} counts {sum(fields_[name].values())} subjects, "
                                 f"{where}.scenes {subjects}")
        derived = self.frequencies()
        for name, counts in fields_.items():
            if derived.get(name) != counts:
                raise ValueError(f"{where}.fields.{name} {counts!r} disagrees with what {where}.scenes count "
                                 f"({derived.get(name)!r})")
        ex = data["examples"]
        if not isinstance(ex, list) or not all(isinstance(t, str) for t in ex):
            raise ValueError(f"{where}.examples must be a list of strings, got {ex!r}")
        self.examples = list(ex)
        return self

    def __eq__(self, other) -> bool:
        return isinstance(other, CaptionStats) and self.to_dict() == other.to_dict()

    def __repr__(self) -> str:
        return f"CaptionStats(captions={self.captions}, skipped={self.skipped}, kinds={len(self._scenes)})"
