"""The synthetic-clip checker passes ground truth and fails each kind of wrong clip for the right reason."""
import dataclasses

import numpy as np
import pytest
import torch

from sora_fast.data import (
    CheckerThresholds,
    ClipSpec,
    check_clip,
    check_clips,
    checker_summary,
    render_clip,
    sample_spec,
)
from sora_fast.data.synthetic import BACKGROUND, COLORS


def _specs(seed: int, n: int, **kw):
    rng = np.random.default_rng(seed)
    return [sample_spec(rng, **kw) for _ in range(n)]


def _float(frames: np.ndarray) -> torch.Tensor:
    return torch.from_numpy(frames.copy()).permute(3, 0, 1, 2).float() / 127.5 - 1.0


def test_ground_truth_passes(fresh_seed):
    """Every ground-truth clip passes: all shapes, colours, directions, speeds, sizes, lengths, occluders, bounces."""
    specs = _specs(fresh_seed, 150, occluder_prob=0.5, bounce_prob=0.2)
    results = [check_clip(render_clip(s), s.caption) for s in specs]
    failed = [f"{r}\n    {s}" for r, s in zip(results, specs) if not r.passed]
    assert not failed, "\n".join(failed)
    assert checker_summary(results) == f"checker pass rate: {len(specs)}/{len(specs)}"
    for r, s in zip(results, specs):
        assert r.color_ok and r.dominant_color == s.color and r.present_fraction >= 0.9
        assert (r.direction_ok is None) == (s.frames == 1)


def test_ground_truth_passes_after_mp4_round_trip(tmp_path, fresh_seed):
    from sora_fast.data import VideoFolder, make_synthetic_dataset

    make_synthetic_dataset(tmp_path, 8, seed=fresh_seed, lengths=(5, 9, 17), occluder_prob=0.5, progress=False)
    ds = VideoFolder(tmp_path, progress=False)
    results = [check_clip(ds[i]["video"], ds[i]["caption"]) for i in range(len(ds))]  # (3, T, H, W) float
    assert checker_summary(results, details=True) == "checker pass rate: 8/8"


def test_float_and_uint8_inputs_agree(fresh_seed):
    s = _specs(fresh_seed, 1, lengths=(9,))[0]
    frames = render_clip(s)
    a, b = check_clip(frames, s.caption), check_clip(_float(frames), s.caption)
    assert (a.passed, a.present_frames, a.displacement) == (b.passed, b.present_frames, b.displacement)
    assert check_clip(torch.from_numpy(frames), s.caption).passed


def test_wrong_direction_fails(fresh_seed):
    for s in _specs(fresh_seed, 20, lengths=(5, 9, 13, 17), occluder_prob=0.5):
        r = check_clip(render_clip(s)[::-1].copy(), s.caption)  # played backwards
        assert not r.passed and r.direction_ok is False and r.color_ok and r.present_fraction >= 0.9, str(r)
        assert any(x.startswith("wrong direction") for x in r.reasons)


def test_perpendicular_motion_fails():
    s = ClipSpec(shape="circle", color="blue", height=48, width=48, frames=13, size=12, start=(24.0, 38.0),
                 direction="up", speed="slow")
    r = check_clip(render_clip(s), "a blue circle moving left quickly")
    assert not r.passed and r.direction_ok is False and "wrong direction" in r.reasons[0]
    assert abs(r.displacement[1]) > 10 and abs(r.displacement[0]) < 0.5


def test_wrong_color_fails(fresh_seed):
    for i, s in enumerate(_specs(fresh_seed, 20, occluder_prob=0.5)):
        other = [c for c in COLORS if c != s.color][i % (len(COLORS) - 1)]
        r = check_clip(render_clip(dataclasses.replace(s, color=other)), s.caption)
        assert not r.passed and not r.color_ok and r.dominant_color == other, str(r)
        assert r.reasons[0].startswith(f"wrong colour: mostly {other}")


def test_static_object_fails(fresh_seed):
    for s in _specs(fresh_seed, 20, lengths=(5, 9, 13, 17)):
        frames = np.repeat(render_clip(s)[:1], s.frames, axis=0)
        r = check_clip(frames, s.caption)
        assert not r.passed and r.direction_ok is False and r.color_ok and r.present_fraction == 1.0, str(r)
        assert abs(r.displacement[0]) < 1e-9 and abs(r.displacement[1]) < 1e-9


@pytest.mark.parametrize("kind", ["gaussian", "uniform"])
def test_pure_noise_fails(fresh_seed, kind):
    for s in _specs(fresh_seed, 10, lengths=(1, 5, 9, 17)):
        shape = (3, s.frames, s.height, s.width)
        noise = torch.randn(shape) if kind == "gaussian" else torch.rand(shape) * 2 - 1
        r = check_clip(noise, s.caption)
        assert not r.passed and r.present_fraction < 0.9, str(r)
        assert any("present in" in x for x in r.reasons)


def test_empty_frames_fail(fresh_seed):
    for s in _specs(fresh_seed, 10):
        frames = np.empty((s.frames, s.height, s.width, 3), np.uint8)
        frames[...] = BACKGROUND
        r = check_clip(frames, s.caption)
        assert not r.passed and r.present_fraction == 0 and not r.color_ok and r.dominant_color is None, str(r)
        assert r.reasons[0].startswith("no pixel of any palette colour")


def test_object_hidden_in_too_many_frames_fails():
    s = ClipSpec(shape="square", color="green", height=32, width=64, frames=17, size=8, start=(8.0, 16.0),
                 direction="right", speed="slow")
    frames = render_clip(s)
    frames[4:8] = BACKGROUND  # gone for 4 of 17 frames (76% present)
    r = check_clip(frames, s.caption)
    assert not r.passed and r.direction_ok and r.present_frames == 13
    assert "present in 13/17 frames (< 90%" in r.reasons[0]
    frames[4] = render_clip(s)[4]
    frames[5:8] = render_clip(s)[5:8]
    frames[8] = BACKGROUND  # one frame hidden (94%) is allowed: occluders
    assert check_clip(frames, s.caption).passed


def test_single_frame_judges_presence_and_color_only(fresh_seed):
    s = _specs(fresh_seed, 1, lengths=(1,))[0]
    r = check_clip(render_clip(s), f"a {s.color} {s.shape} moving left slowly")
    assert r.passed and r.direction_ok is None and "1-frame clip" in r.notes[0]
    assert check_clip(render_clip(s), s.caption).passed
    other = next(c for c in COLORS if c != s.color)
    assert not check_clip(render_clip(dataclasses.replace(s, color=other)), s.caption).passed


def test_summary_and_validation(fresh_seed):
    specs = _specs(fresh_seed, 4, lengths=(9,))
    clips = [render_clip(s) for s in specs]
    clips[1] = clips[1][::-1].copy()
    results = check_clips(clips, [s.caption for s in specs])
    text = checker_summary(results, details=True)
    assert text.startswith("checker pass rate: 3/4\n  FAIL ") and "wrong direction" in text
    with pytest.raises(ValueError, match="same length"):
        check_clips(clips, ["a red circle"])
    with pytest.raises(ValueError, match="synthetic grammar"):
        check_clip(clips[0], "a cat")
    with pytest.raises(ValueError, match=r"\(T, H, W, 3\) uint8 or \(3, T, H, W\) float"):
        check_clip(np.zeros((4, 8, 8, 4), np.uint8), "a red circle")
    with pytest.raises(ValueError, match="4-D"):
        check_clip(np.zeros((8, 8, 3), np.uint8), "a red circle")
    strict = CheckerThresholds(min_present=1.01)
    assert not check_clip(clips[0], specs[0].caption, thresholds=strict).passed
