"""The judges of the conditioned modes (sora_fast.eval.conditioning) on rendered ground truth and on clips
broken on purpose: the truth passes every judge, each defect fails the judge that looks for it."""
from __future__ import annotations

import dataclasses
import types

import numpy as np
import pytest
import torch

from sora_fast.data.synthetic import BACKGROUND, render_clip
from sora_fast.eval import (
    MODES,
    evaluate_conditioning,
    held_out_specs,
    judge_edit,
    judge_extension,
    judge_keyframes,
    judge_long,
)
from sora_fast.eval.conditioning import _media

SIZES = [(9, 32, 32), (9, 32, 48), (9, 48, 32)]


@pytest.fixture
def clips(fresh_seed):
    specs = held_out_specs(12, SIZES, seed=fresh_seed)          # replayable with SORA_FAST_TEST_SEED
    return [(sp, render_clip(sp)) for sp in specs]


def _blank(frames: np.ndarray) -> np.ndarray:
    out = frames.copy()
    out[:] = np.asarray(BACKGROUND, np.uint8)
    return out


def test_ground_truth_passes_every_judge(clips):
    for sp, r in clips:
        assert judge_extension(r, sp.caption, range(5)).passed, sp
        assert judge_extension(r, sp.caption, range(4, 9)).passed, sp
        assert judge_keyframes(r, sp.caption).passed, sp
        other = dataclasses.replace(sp, color="red" if sp.color != "red" else "green")
        assert judge_edit(render_clip(other), other.caption, sp.centers()).passed, sp


@pytest.mark.parametrize("defect", ["frozen", "reversed", "vanished", "recoloured"])
def test_extension_defects_fail(clips, defect):
    for sp, r in clips:
        bad = r.copy()
        if defect == "frozen":
            bad[5:] = r[4]
        elif defect == "reversed":
            bad[5:] = r[[3, 2, 1, 0]]          # back the way it came
        elif defect == "vanished":
            bad[6:] = _blank(r[6:])
        else:
            other = dataclasses.replace(sp, color="red" if sp.color != "red" else "blue")
            bad[5:] = render_clip(other)[5:]
        v = judge_extension(bad, sp.caption, range(5))
        assert not v.passed, (defect, sp.caption)


def test_extension_wrong_speed_fails(clips):
    checked = 0
    for sp, r in clips:
        if sp.speed != "slow":
            continue
        fast = dataclasses.replace(sp, speed="fast", start=tuple(sp.centers()[4]), frames=5)
        try:
            tail = render_clip(fast)
        except ValueError:     # the doubled speed would leave the frame: no such clip to make
            continue
        bad = np.concatenate([r[:5], tail[1:]])
        v = judge_extension(bad, sp.caption, range(5))
        assert not v.passed and any("speed" in m for m in v.reasons), (sp.caption, v.reasons)
        checked += 1
    assert checked >= 1


def test_keyframes_path_that_turns_back_fails(clips):
    """The path runs on to frame 7, turns back to frame 3, then on to 8. The step back is 4 frames of motion:
    >= 0.08 of the side (slow: 0.02 of it per frame), well over the 0.03 tolerance plus the tracked centroid's
    rasterization jitter (under a pixel). Turning back 2 frames (0.04 of the side) was within that jitter of
    the tolerance: a slow triangle's tracked step back came out under 0.03 of the side for some seeds."""
    for sp, r in clips:
        bad = r[[0, 1, 2, 6, 7, 3, 4, 5, 8]]
        v = judge_keyframes(bad, sp.caption)
        assert not v.passed and any("turns back" in m for m in v.reasons), (sp.caption, v.reasons)


def test_edit_defects_fail(clips):
    for sp, r in clips:
        other = dataclasses.replace(sp, color="red" if sp.color != "red" else "green")
        assert not judge_edit(r, other.caption, sp.centers()).passed            # colour not changed
        k = 0 if sp.axis == "x" else 1
        shifted = np.asarray(sp.start, float)
        side = (sp.width, sp.height)[1 - k]                 # across the motion: the far edge of the centre range
        lo, hi = 1 + sp.size / 2, side - 1 - sp.size / 2
        shifted[1 - k] = hi if shifted[1 - k] < side / 2 else lo
        moved = dataclasses.replace(other, start=tuple(shifted))
        v = judge_edit(render_clip(moved), other.caption, sp.centers())
        assert not v.passed and any("path" in m for m in v.reasons), v.reasons


def test_long_rollout_judge(fresh_seed):
    specs = held_out_specs(6, [(33, 32, 48), (33, 48, 32)], seed=fresh_seed,
                           bounce=True)
    for sp in specs:
        r = render_clip(sp)
        assert judge_long(r, sp.caption, 9).passed, sp.caption
        gone = r.copy()
        gone[20:22] = _blank(r[20:22])
        v = judge_long(gone, sp.caption, 9)
        assert not v.passed and v.reasons[0].startswith("frames 16..24"), v.reasons
        other = dataclasses.replace(sp, color="red" if sp.color != "red" else "blue")
        swapped = np.concatenate([r[:25], render_clip(other)[25:]])
        assert not judge_long(swapped, sp.caption, 9).passed
    with pytest.raises(ValueError, match="window"):
        judge_long(r, sp.caption, 40)


def test_judges_refuse_captions_without_a_direction(clips):
    sp, r = clips[0]
    with pytest.raises(ValueError, match="caption"):
        judge_extension(r, f"a {sp.color} {sp.shape}", range(5))
    with pytest.raises(ValueError, match="given"):
        judge_extension(r, sp.caption, range(9))


class _Oracle:
    """A perfect 'model': it renders the held-out ground truth the evaluation asks for (or blank clips)."""

    def __init__(self, seed: int, blank: bool = False):
        self.vae = types.SimpleNamespace(temporal_factor=2)
        self.seed, self.blank, self.calls = seed, blank, []

    def _out(self, frames):
        return _media(_blank(frames) if self.blank else frames)

    def generate(self, captions, sizes, *, seed, conditions=None, init_videos=None, strength=1.0, **kw):
        self.calls.append(("generate", conditions, init_videos, strength))
        specs = held_out_specs(len(captions), sizes, seed=self.seed)
        out = []
        for sp, cap in zip(specs, captions):
            if cap != sp.caption:   # an edit: the caption's colour
                sp = dataclasses.replace(sp, color=cap.split()[1])
            out.append(self._out(render_clip(sp)))
        return out

    def generate_long(self, caption, frames, *, window, overlap, size, seed, **kw):
        i = seed - self.seed
        self.calls.append(("long", frames, window, overlap))
        sizes = [(window, h, w) for h, w in [(32, 32), (32, 48), (48, 32)]]
        sp = held_out_specs(i + 1, sizes, seed=self.seed, bounce=True)[i]
        assert sp.caption == caption and (sp.height, sp.width) == tuple(size)
        return self._out(render_clip(dataclasses.replace(sp, frames=frames)))


def test_evaluate_conditioning_scores_a_perfect_and_a_blank_model(fresh_seed):
    seed = fresh_seed % 2**20
    modes = [m for m in MODES if m != "t2v"]
    oracle = _Oracle(seed)
    scores = evaluate_conditioning(oracle, clips=6, seed=seed, modes=modes)
    assert {m: s["passed"] for m, s in scores.items()} == {m: 6 for m in modes}
    assert all(s["met"] and s["rate"] == 1.0 for s in scores.values())
    long_calls = [c for c in oracle.calls if c[0] == "long"]
    assert long_calls and all(c[1:] == (33, 9, 2) for c in long_calls)   # 4x the 9-frame clip, half-window overlap
    edit = [c for c in oracle.calls if c[0] == "generate" and c[2] is not None]
    assert len(edit) == 1 and edit[0][3] == 0.5
    blank = evaluate_conditioning(_Oracle(seed, blank=True), clips=3, seed=seed, modes=modes)
    assert all(s["passed"] == 0 and not s["met"] and len(s["failures"]) == 3 for s in blank.values())


def test_evaluate_conditioning_rejects_bad_arguments():
    with pytest.raises(ValueError, match="modes"):
        evaluate_conditioning(_Oracle(0), modes=["t2i"])
    with pytest.raises(ValueError, match="clips"):
        evaluate_conditioning(_Oracle(0), clips=0)
    assert torch.is_tensor(_media(np.zeros((1, 4, 4, 3), np.uint8)))
