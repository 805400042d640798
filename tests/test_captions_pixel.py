"""The pixel captioner: ground-truth clips of every scene captioned as their generators caption them (from frames,
every other frame, and mp4 files read back), content the grammar cannot say split into spans, bad inputs refused,
and held-out accuracy."""
import dataclasses

import numpy as np
import pytest
import torch

from sora_fast.captions import CaptionOutcome, CaptionSchema, Span, Subject
from sora_fast.captions.accuracy import ACCURACY_FIELDS, caption_accuracy, held_out_clips
from sora_fast.captions.pixel import PixelCaptioner, PixelThresholds
from sora_fast.data import synthetic as S
from sora_fast.data import world as W
from sora_fast.data.checker import blob_boxes, blob_diagonals, classify_shape, color_masks, track_object
from sora_fast.data.io import write_video


def _sorted(schema: CaptionSchema) -> CaptionSchema:
    """Subjects in colour order: the generators put two objects in either order."""
    return schema.with_spans(dataclasses.replace(p, subjects=tuple(sorted(p.subjects, key=lambda s: s.colour)))
                             for p in schema.spans)


def _truth(spec) -> CaptionSchema:
    return _sorted(CaptionSchema.from_prompt(spec.prompt, spec.frames))


def _render(spec) -> np.ndarray:
    return W.render_world(spec) if isinstance(spec, W.WorldSpec) else S.render_clip(spec)


def _world(rng: np.random.Generator, scene: str):
    """A world spec of ``scene``; a draw its sampler cannot fit in its tries (it raises then, about one two-object
    scene in a few hundred) is drawn again."""
    for _ in range(10):
        try:
            return W.sample_world(rng, scene)
        except ValueError:
            continue
    raise AssertionError(f"no {scene!r} spec in 10 draws")


def _clips(seed: int):
    """Two clips of every world scene (the demo's world sizes) and synthetic clips without bounces (a synthetic
    "bouncing" clip need not reach a wall in the clip): images, moves, gray bars at the library's default sizes and
    the demo's."""
    rng = np.random.default_rng(seed)
    out = [_world(rng, scene) for scene in W.SCENES for _ in range(2)]
    out += [S.sample_spec(rng, occluder_prob=0.3) for _ in range(6)]
    out += [S.sample_spec(rng, sizes=((32, 32), (32, 48), (48, 32)), lengths=(1, 5, 9), object_size=0.4,
                          occluder_prob=0.3) for _ in range(6)]
    return out


@pytest.mark.parametrize("every_n", [1, 2])
def test_ground_truth_of_every_scene_captioned_exactly(fresh_seed, every_n):
    cap = PixelCaptioner(every_n)
    wrong = []
    for spec in _clips(fresh_seed):
        got = cap.caption_frames(_render(spec))
        if _sorted(got) != _truth(spec):
            wrong.append(f"{spec.caption!r} captioned {got.render()!r}")
    assert not wrong, "\n".join(wrong)


def test_float_frames_and_uint8_frames_caption_alike(fresh_seed):
    cap = PixelCaptioner()
    for scene in ("collision", "camera"):
        spec = _world(np.random.default_rng(fresh_seed), scene)
        video = W.render_world(spec)
        as_float = torch.from_numpy(video).permute(3, 0, 1, 2).double() / 127.5 - 1.0  # (3, T, H, W) in [-1, 1]
        assert cap.caption_frames(as_float) == cap.caption_frames(video) == cap.caption_frames(torch.from_numpy(video))
        assert _sorted(cap.caption_frames(as_float.numpy())) == _truth(spec)


def test_an_image_is_a_still_subject(fresh_seed):
    spec = S.sample_spec(fresh_seed, lengths=(1,))
    got = PixelCaptioner().caption_frames(S.render_clip(spec))
    assert got == _truth(spec)
    assert got.spans[0].subjects[0].action == "still" and got.render() == spec.caption


def test_blob_diagonals_tell_squares_from_circles_in_every_frame(fresh_seed):
    """On renders the diagonal ratio alone classifies every frame of every shape, colour and size (the fill
    misses about one small circle or square in a hundred images)."""
    rng = np.random.default_rng(fresh_seed)
    th = PixelThresholds().tracker
    for _ in range(40):
        spec = S.sample_spec(rng, occluder_prob=0.0, lengths=(1, 5), object_size=float(rng.uniform(0.25, 0.4)))
        video = S.render_clip(spec)
        masks = color_masks(video, th)
        tr = track_object(video, spec.color, thresholds=th, masks=masks)
        _, fill, depth = blob_boxes(video, tr, thresholds=th, masks=masks)
        diagonal = blob_diagonals(video, tr, thresholds=th, masks=masks)
        assert tr.present.all()
        labels = {classify_shape(f, d, g) for f, d, g in zip(fill, depth, diagonal)}
        assert labels == {spec.shape}, (spec, diagonal)


# ---- what the grammar cannot say: one span per frame range ----------------------------------------------


def _moving(seed: int):
    """A world "moving" spec and its axis, sign and side, to draw other paths with."""
    spec = W.sample_world(seed, "moving")
    k = 0 if spec.prompt.axis == "x" else 1
    sign = 1.0 if spec.prompt.direction in ("right", "down") else -1.0
    return spec, k, sign, (spec.width, spec.height)[k]


def _with_path(spec, k: int, path: np.ndarray) -> np.ndarray:
    c = spec.trajectories()
    c[0, :, k] = path
    return W.render_world(spec, centers=c)


@pytest.mark.parametrize("every_n", [1, 2])
def test_an_object_leaving_the_frame_gets_two_spans(fresh_seed, every_n):
    spec, k, sign, side = _moving(fresh_seed)
    t = np.arange(spec.frames)
    v = sign * 0.08 * side  # fast enough to leave within the clip from the middle
    path = side / 2 + v * t
    got = PixelCaptioner(every_n).caption_frames(_with_path(spec, k, path))
    assert len(got.spans) == 2, got.render()
    first, then = (s.subjects[0] for s in got.spans)
    way = spec.prompt.direction
    assert (first.action, first.direction, first.speed) == ("moving", way, "fast")
    assert (then.action, then.direction, then.colour, then.shape) == ("leaving the frame", way, spec.prompt.color,
                                                                   spec.prompt.shape)
    # the second span starts when the border cuts the object: its leading edge past the border
    edge = path + sign * spec.bodies[0].size / 2
    crossing = int(np.argmax(edge > side if sign > 0 else edge < 0))
    assert abs(got.spans[1].start - crossing) <= every_n, (got.spans, crossing)
    assert (got.spans[0].start, got.spans[0].end + 1, got.spans[1].end) == (0, got.spans[1].start, spec.frames - 1)
    assert got.render() == (f"a {spec.prompt.color} {spec.prompt.shape} moving {way} quickly, then the "
                            f"{spec.prompt.color} {spec.prompt.shape} leaving the frame {way} quickly")


def test_an_object_entering_stopping_or_turning_in_mid_frame_gets_spans(fresh_seed):
    spec, k, sign, side = _moving(fresh_seed)
    t = np.arange(spec.frames)
    v = sign * 0.04 * side
    back = {"left": "right", "right": "left", "up": "down", "down": "up"}[spec.prompt.direction]
    way = spec.prompt.direction
    cases = {  # path -> (action, direction) per span, and where the second span starts
        "enter": (side / 2 - 2 * v * (spec.frames - 1 - t), [("entering the frame", way), ("moving", way)], None),
        "stop": (side / 2 - 4 * v + v * np.minimum(t, 8), [("moving", way), ("still", None)], 8),
        "start": (side / 2 - 4 * v + v * np.maximum(t - 8, 0), [("still", None), ("moving", way)], 9),
        "turn": (side / 2 + 3 * v - v * np.abs(t - 8), [("moving", way), ("moving", back)], 9),
    }
    for name, (path, want, start) in cases.items():
        got = PixelCaptioner().caption_frames(_with_path(spec, k, path))
        assert [(s.subjects[0].action, s.subjects[0].direction) for s in got.spans] == want, (name, got.render())
        if start is not None:
            assert got.spans[1].start == start, (name, got.spans)


def test_grammar_events_stay_one_span(fresh_seed):
    """A wall bounce, a floor bounce, a full occlusion and a collision are the grammar's own: one span."""
    rng = np.random.default_rng(fresh_seed)
    for scene in ("bounce", "gravity", "occlusion", "collision"):
        spec = _world(rng, scene)
        got = PixelCaptioner().caption_frames(W.render_world(spec))
        assert len(got.spans) == 1 and (got.spans[0].start, got.spans[0].end) == (0, spec.frames - 1), got.render()


# ---- files ----------------------------------------------------------------------------------------------


def _no_shape(schema: CaptionSchema) -> CaptionSchema:
    return schema.with_spans(dataclasses.replace(p, subjects=tuple(dataclasses.replace(x, shape=None)
                                                                   for x in p.subjects)) for p in schema.spans)


def test_mp4_and_png_files_read_back_caption_right(fresh_seed, tmp_path):
    rng = np.random.default_rng(fresh_seed)
    specs = [_world(rng, scene) for scene in ("gravity", "passing", "camera")]
    specs.append(S.sample_spec(rng, lengths=(1,)))
    paths = [write_video(tmp_path / f"{i}.{'png' if s.frames == 1 else 'mp4'}", _render(s))
             for i, s in enumerate(specs)]
    cap = PixelCaptioner(every_n=2)
    done = []
    outcomes = cap.caption_files(paths + [tmp_path / "missing.mp4"], on_done=done.append)
    assert len(done) == len(outcomes) == len(specs) + 1
    for out, spec, path in zip(outcomes, specs, paths):
        assert isinstance(out, CaptionOutcome) and out.ok and out.error is None and not out.cached
        assert out.path == path and out.seconds > 0
        assert out.frames == list(range(0, spec.frames, 2))
        got, want = _sorted(out.schema), _truth(spec)
        if spec.prompt.camera:  # yuv420 halves the chroma's resolution: on the texture about 1 small blue or red
            got = _no_shape(got)  # object in 100 loses its shape (test_held_out_accuracy's files run counts it)
            want = _no_shape(want)
        assert got == want, (spec.caption, out.schema.render())
    assert not outcomes[-1].ok and "missing.mp4" in outcomes[-1].error
    with pytest.raises(FileNotFoundError, match="path"):
        cap.caption_file(tmp_path / "missing.mp4")
    (tmp_path / "junk.mp4").write_bytes(b"not a video")
    with pytest.raises(ValueError, match="junk.mp4"):
        cap.caption_file(tmp_path / "junk.mp4")
    assert PixelCaptioner.name == "pixel"


# ---- bad inputs --------------------------------------------------------------------------------------------


def test_bad_frames_and_arguments_raise_naming_them():
    cap = PixelCaptioner()
    good = np.zeros((3, 16, 16, 3), np.uint8)
    cases = [
        ([[0]], TypeError, "frames must be a torch.Tensor or numpy.ndarray"),
        (np.zeros((3, 16, 16, 4), np.uint8), ValueError, r"frames must be .*got uint8 of shape \(3, 16, 16, 4\)"),
        (np.zeros((16, 16, 3), np.uint8), ValueError, "frames must be"),
        (np.zeros((5, 16, 16, 3), np.float32), ValueError, r"frames must be .*float32 of shape \(5, 16, 16, 3\)"),
        (np.zeros((3, 16, 16, 3), np.int32), TypeError, "frames must be uint8 or floating point"),
        (torch.full((3, 2, 8, 8), float("nan")), ValueError, "frames must be finite"),
        (np.zeros((0, 16, 16, 3), np.uint8), ValueError, "frames must have T, H, W >= 1"),
    ]
    for frames, err, msg in cases:
        with pytest.raises(err, match=msg):
            cap.caption_frames(frames)
    for bad in (0, -1, 1.5, True, "2"):
        with pytest.raises(ValueError, match="every_n must be an int >= 1"):
            PixelCaptioner(every_n=bad)
    with pytest.raises(TypeError, match="thresholds"):
        PixelCaptioner(thresholds={"still": 0.4})
    with pytest.raises(TypeError, match="tracker"):
        PixelThresholds(tracker=0.4)
    empty = cap.caption_frames(good)  # nothing to see: one unknown subject, never an exception
    assert empty.spans[0].subjects == (Subject(),) and empty.background == "plain"
    for n in (0, True):
        with pytest.raises(ValueError, match="n must be"):
            held_out_clips(n)
    with pytest.raises(ValueError, match="families"):
        held_out_clips(3, families=("demo", "movies"))


# ---- accuracy ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("files", [False, True])
def test_held_out_accuracy(fresh_seed, files):
    seed = fresh_seed % 1000
    r = caption_accuracy(60, seed=seed, files=files)
    low = {k: v for k, v in r.rates_seen.items() if v < 0.95}
    assert not low, (low, r.misses)
    assert set(r.rates) == set(ACCURACY_FIELDS) and set(r.by_family) == {"demo", "synthetic", "world"}
    for k in ACCURACY_FIELDS:  # the generator's captions differ from what is seen only on the unseen bounces
        assert r.rates[k] >= r.rates_seen[k] - r.unseen / r.n
    assert all(m[0] == "demo" and "bouncing" in m[1] for m in r.misses if m[4])
    assert "every_n=1" in str(r) and ("mp4" in str(r)) == files
    assert len(r.misses) == round((1 - r.rates["exact"]) * r.n)


def test_accuracy_counts_what_a_captioner_gets_wrong(fresh_seed):
    """A captioner that names every colour wrong, and one clip's action, scores 0 on colour and under 1 on action."""

    class Wrong(PixelCaptioner):
        calls = 0

        def caption_frames(self, frames):
            s = super().caption_frames(frames)
            Wrong.calls += 1
            subjects = tuple(dataclasses.replace(x, colour="purple", action="walking" if Wrong.calls == 1 else x.action)
                             for x in s.spans[0].subjects)
            return s.with_spans([Span(0, s.spans[-1].end, subjects, s.spans[0].interaction, s.spans[0].camera_motion,
                                      s.spans[0].camera_speed)])

    r = caption_accuracy(12, seed=fresh_seed % 1000, captioner=Wrong())
    assert r.rates["colour"] == r.rates["exact"] == 0.0 and len(r.misses) == 12
    assert 0.5 < r.rates["action"] <= 11 / 12 and r.rates["shape"] > 0.5


def test_held_out_clips_are_not_the_training_clips(fresh_seed):
    """The demo's training clips are drawn from children of SeedSequence(seed) (write_clip_folder): none of the
    held-out clips is one of them."""
    seed = fresh_seed % 1000
    held = held_out_clips(30, seed=seed)
    children = np.random.SeedSequence(seed).spawn(30)
    train = [S.sample_spec(np.random.default_rng(c), sizes=((32, 32), (32, 48), (48, 32)), lengths=(1, 5, 9),
                           object_size=0.4, bounce_prob=0.2) for c in children]
    for c in children:  # make_world_dataset's draw: a scene, then its spec, from one generator
        rng = np.random.default_rng(c)
        try:
            train.append(W.sample_world(rng, W.SCENES[int(rng.integers(len(W.SCENES)))]))
        except ValueError:  # the sampler found no fit: no training clip from this child either
            pass
    starts = {tuple(np.round(s.start, 6)) for s in train if isinstance(s, S.ClipSpec)}
    starts |= {tuple(np.round(s.bodies[0].start, 6)) for s in train if isinstance(s, W.WorldSpec)}
    for _, spec in held:
        start = spec.start if isinstance(spec, S.ClipSpec) else spec.bodies[0].start
        assert tuple(np.round(start, 6)) not in starts
    assert [f for f, _ in held[:3]] == ["demo", "synthetic", "world"]
    scenes = [s.scene for f, s in held if f == "world"]
    assert scenes == [W.SCENES[i % len(W.SCENES)] for i in range(len(scenes))]
