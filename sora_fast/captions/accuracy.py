"""How exactly the pixel captioner (:class:`~sora_fast.captions.pixel.PixelCaptioner`) reads held-out clips: per
schema field, the fraction captioned as their generators' captions say (:func:`caption_accuracy`), from rendered
frames or from files written and read back."""
from __future__ import annotations

import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional, Sequence

import numpy as np

from .pixel import PixelCaptioner
from .schema import CaptionSchema, Span, Subject

__all__ = ["CaptionAccuracy", "caption_accuracy", "held_out_clips", "ACCURACY_FIELDS", "ACCURACY_FAMILIES"]


#: What :func:`caption_accuracy` scores: the subjects' fields, the span's and the clip's, and ``spans`` (the
#: number of spans) and ``exact`` (the whole schema).
ACCURACY_FIELDS = ("colour", "shape", "action", "direction", "speed", "interaction", "camera_motion",
                   "camera_speed", "environment", "background", "spans", "exact")
#: The held-out clip families: the demo's synthetic clips (its default preset's sizes, lengths, object size
#: and bounces), the library's default synthetic clips, and the synthetic world's scenes in turn (the demo's
#: world preset: its default sizes, 17 frames).
ACCURACY_FAMILIES = ("demo", "synthetic", "world")
_SUBJECT_FIELDS = ("colour", "shape", "action", "direction", "speed")


def _normal(schema: CaptionSchema) -> CaptionSchema:
    """Subjects in colour order: the grammar's order of two objects is arbitrary (the generator shuffles it)."""
    def key(s: Subject) -> tuple:
        return (s.colour or "", s.shape or "")

    return schema.with_spans(Span(p.start, p.end, tuple(sorted(p.subjects, key=key)), p.interaction,
                                  p.camera_motion, p.camera_speed) for p in schema.spans)


def _fields(schema: CaptionSchema) -> dict:
    s = _normal(schema)
    out = {f: tuple(tuple(getattr(x, f) for x in p.subjects) for p in s.spans) for f in _SUBJECT_FIELDS}
    out.update({f: tuple(getattr(p, f) for p in s.spans) for f in ("interaction", "camera_motion", "camera_speed")})
    out.update(environment=s.environment, background=s.background, spans=len(s.spans), exact=s)
    return out


@dataclass
class CaptionAccuracy:
    """:func:`caption_accuracy`'s result: per field (:data:`ACCURACY_FIELDS`) the fraction of clips captioned
    exactly against the generator's caption, per family too, and ``rates_seen`` against what the looked-at
    frames show: they differ on the ``unseen`` synthetic clips captioned "bouncing" whose object reaches no wall
    within them (``sample_spec`` does not promise a bounce inside the clip), whose truth is then "moving" the way
    it goes. ``misses``: ``(family, true caption, captioned, wrong fields, unseen)`` of every clip not captioned
    exactly; ``seconds``: the captioner's time (rendering and writing files not counted)."""

    n: int
    every_n: int
    files: bool
    rates: dict
    by_family: dict
    rates_seen: dict
    unseen: int = 0
    misses: list = field(default_factory=list)
    seconds: float = 0.0

    def __str__(self) -> str:
        head = f"{'field':<14}" + "".join(f"{f:>11}" for f in ["all", *self.by_family, "all seen"])
        rows = [head] + [f"{k:<14}{self.rates[k]:>11.1%}" + "".join(f"{r[k]:>11.1%}" for r in self.by_family.values())
                         + f"{self.rates_seen[k]:>11.1%}" for k in ACCURACY_FIELDS]
        rows.append(f"{self.n} clips ({self.unseen} with a bounce outside the clip), every_n={self.every_n}, "
                    f"{'mp4/png files' if self.files else 'frames'}; {self.seconds:.1f}s captioning "
                    f"({1e3 * self.seconds / max(1, self.n):.0f} ms/clip)")
        return "\n".join(rows)


def _seen_prompt(spec, every_n: int):
    """The prompt of what a synthetic clip's looked-at frames show: a "bouncing" clip whose path never turns
    back in them is "moving" the way it goes; None when that is its caption already."""
    from dataclasses import replace

    from ..data.synthetic import ClipSpec

    if not isinstance(spec, ClipSpec) or not spec.bounce or spec.frames < 2:
        return None
    k = 0 if spec.axis == "x" else 1
    steps = np.diff(spec.centers()[::every_n, k])
    if steps.size == 0 or (steps > 0).any() and (steps < 0).any():
        return None
    way = {(0, -1): "left", (0, 1): "right", (1, -1): "up", (1, 1): "down"}[k, int(np.sign(steps.sum()))]
    return replace(spec.prompt, bounce=False, direction=way)


def held_out_clips(n: int, *, seed: int = 0, families: Sequence[str] = ACCURACY_FAMILIES) -> list:
    """``n`` held-out ``(family, spec, frames)`` in turn from ``families``: synthetic clips from
    ``numpy.random.SeedSequence([seed, 24, family's index])`` and world scenes from
    :func:`~sora_fast.data.world.held_out_world`'s streams -- streams of their own, never the ones the demo's
    training data is drawn from."""
    from ..data import synthetic as S
    from ..data import world as W
    from ..demo import DEMO_PRESETS

    if isinstance(n, bool) or not isinstance(n, int) or n < 1:
        raise ValueError(f"n must be an int >= 1, got {n!r}")
    bad = [f for f in families if f not in ACCURACY_FAMILIES]
    if isinstance(families, str) or not families or bad:
        raise ValueError(f"families must be a non-empty list from {list(ACCURACY_FAMILIES)}, got {families!r}")
    counts = {f: sum(1 for i in range(n) if families[i % len(families)] == f) for f in families}
    demo, world = DEMO_PRESETS["default"], DEMO_PRESETS["world"]
    specs = {}
    for f, c in counts.items():
        if f == "world":
            per = [c // len(W.SCENES) + (j < c % len(W.SCENES)) for j in range(len(W.SCENES))]
            got = [W.held_out_world(m, s, seed=seed, sizes=world.sizes, lengths=world.lengths,
                                    object_size=world.object_size) if m else [] for s, m in zip(W.SCENES, per)]
            specs[f] = [got[j % len(W.SCENES)][j // len(W.SCENES)] for j in range(c)]
            continue
        rng = np.random.default_rng(np.random.SeedSequence([seed, 24, ACCURACY_FAMILIES.index(f)]))
        kw = dict(sizes=demo.sizes, lengths=demo.lengths, object_size=demo.object_size,
                  bounce_prob=demo.bounce_prob) if f == "demo" else {}
        specs[f] = [S.sample_spec(rng, **kw) for _ in range(c)]
    taken = {f: 0 for f in families}
    out = []
    for i in range(n):
        f = families[i % len(families)]
        out.append((f, specs[f][taken[f]]))
        taken[f] += 1
    return out


def caption_accuracy(n: int = 300, *, seed: int = 0, every_n: int = 1, files: bool = False,
                     families: Sequence[str] = ACCURACY_FAMILIES, captioner: Optional[PixelCaptioner] = None,
                     progress: bool = False) -> CaptionAccuracy:
    """Caption ``n`` held-out clips (:func:`held_out_clips`) and score each field against the truth
    (:meth:`CaptionSchema.from_prompt` of the clip's prompt; two subjects compared in colour order).

    files: write each clip to an mp4 (a png for an image) and caption the file read back, as real captioning
        reads lossy files; else caption the rendered frames. captioner: default ``PixelCaptioner(every_n)``.
    """
    from ..data.io import _progress, write_video
    from ..data.synthetic import render_clip
    from ..data.world import WorldSpec, render_world

    cap = captioner or PixelCaptioner(every_n)
    clips = held_out_clips(n, seed=seed, families=families)
    hits = {f: {k: 0 for k in ACCURACY_FIELDS} for f in families}
    seen = {k: 0 for k in ACCURACY_FIELDS}
    count = {f: 0 for f in families}
    misses, seconds, unseen = [], 0.0, 0
    with tempfile.TemporaryDirectory() as tmp:
        for i, (fam, spec) in enumerate(_progress(clips, total=n, desc="captioning", enable=progress)):
            video = render_world(spec) if isinstance(spec, WorldSpec) else render_clip(spec)
            t0 = time.perf_counter()
            if files:
                path = write_video(Path(tmp) / f"{i:05d}{'.png' if video.shape[0] == 1 else '.mp4'}", video)
                t0 = time.perf_counter()
                got = cap.caption_file(path).schema
            else:
                got = cap.caption_frames(video)
            seconds += time.perf_counter() - t0
            truth = CaptionSchema.from_prompt(spec.prompt, spec.frames)
            b = _fields(got)
            a = _fields(truth)
            wrong = [k for k in ACCURACY_FIELDS if a[k] != b[k]]
            shown = _seen_prompt(spec, cap.every_n)
            unseen += shown is not None
            a_seen = a if shown is None else _fields(CaptionSchema.from_prompt(shown, spec.frames))
            count[fam] += 1
            for k in ACCURACY_FIELDS:
                hits[fam][k] += k not in wrong
                seen[k] += a_seen[k] == b[k]
            if wrong:
                misses.append((fam, truth.render(), got.render(), wrong, shown is not None))
    by_family = {f: {k: hits[f][k] / count[f] for k in ACCURACY_FIELDS} for f in families if count[f]}
    rates = {k: sum(hits[f][k] for f in families) / n for k in ACCURACY_FIELDS}
    return CaptionAccuracy(n=n, every_n=cap.every_n, files=files, rates=rates, by_family=by_family,
                           rates_seen={k: v / n for k, v in seen.items()}, unseen=unseen, misses=misses,
                           seconds=seconds)
