"""World-model probes: rendered ground truth passes every probe it calls for; deliberately broken clips fail
the right probe."""
import dataclasses

import numpy as np
import pytest

from sora_fast.data import synthetic as S
from sora_fast.data import world as W
from sora_fast.data.checker import blob_boxes, classify_shape, track_object
from sora_fast.eval.probes import PROBES, phase_correlate, probe_clip

CALLS = {"moving": {"direction", "speed"}, "bounce": {"direction", "speed", "bounce"},
         "gravity": {"direction", "bounce", "gravity"}, "occlusion": {"permanence", "direction", "speed"},
         "passing": {"collision", "direction", "speed"}, "collision": {"collision", "direction", "speed"},
         "camera": {"camera"}}


@pytest.mark.parametrize("scene", W.SCENES)
def test_ground_truth_passes(scene):
    for seed in range(4):
        spec = W.sample_world(seed, scene)
        r = probe_clip(W.render_world(spec), spec.caption)
        assert r.passed, (spec.caption, r.reasons)
        judged = {k for k, v in r.probes.items() if v is not None}
        assert CALLS[scene] | {"present", "colour", "shape", "identity"} <= judged, judged
        assert set(r.probes) == set(PROBES)


def test_synthetic_ground_truth_passes():
    for seed in range(6):
        spec = S.sample_spec(seed, bounce_prob=0.3, occluder_prob=0.0, lengths=(9, 17))
        r = probe_clip(S.render_clip(spec), spec.caption)
        assert r.passed, (spec.caption, r.reasons)


def test_shape_classifier_on_renders():
    for seed in range(12):
        spec = S.sample_spec(seed, occluder_prob=0.0, lengths=(5,), object_size=(0.25, 0.4)[seed % 2])
        video = S.render_clip(spec)
        tr = track_object(video, spec.color)
        _, fill, depth = blob_boxes(video, tr)
        labels = [classify_shape(f, d) for f, d in zip(fill, depth)]
        assert max(set(labels), key=labels.count) == spec.shape


def _fails(video, caption, probe):
    r = probe_clip(video, caption)
    assert r.probes[probe] is False, (probe, caption, r.probes)
    assert probe in r.reasons


def test_vanishing_object_fails_permanence_and_present():
    spec = W.sample_world(1, "occlusion")
    c = spec.trajectories()
    k = 0 if spec.prompt.axis == "x" else 1
    sign = 1 if spec.prompt.direction in ("right", "down") else -1
    behind = sign * (c[0, :, k] - spec.occluder_center) > 0
    c[0, behind] = -1e4  # never comes out
    video = W.render_world(spec, centers=c)
    _fails(video, spec.caption, "permanence")
    _fails(video, spec.caption, "present")


def test_late_reappearance_fails_permanence():
    spec = W.sample_world(2, "occlusion")
    c = spec.trajectories()
    t = spec.frames
    c[0, t // 2:] = c[0, t // 2 - 3:t - 3]  # stalls behind the bar: comes out 3 frames late
    _fails(W.render_world(spec, centers=c), spec.caption, "permanence")


def test_wrong_bounces_fail_bounce():
    spec = W.sample_world(0, "bounce")
    k = 0 if spec.prompt.axis == "x" else 1
    c = spec.trajectories()
    c[0, :, k] = spec.bodies[0].start[k] + spec.bodies[0].velocity[k] * np.minimum(np.arange(spec.frames), 3)
    c[0, 4:, k] -= spec.bodies[0].velocity[k] * np.arange(1, spec.frames - 3)  # turns back in mid-frame
    _fails(W.render_world(spec, centers=c), spec.caption, "bounce")
    g = W.sample_world(0, "gravity")
    _fails(W.render_world(dataclasses.replace(g, restitution=1.0)), g.caption, "bounce")  # too lively
    _fails(W.render_world(dataclasses.replace(g, restitution=0.0)), g.caption, "bounce")  # sticks to the floor


def test_no_gravity_fails_gravity():
    g = W.sample_world(1, "gravity")
    c = g.trajectories()
    c[0, :, 1] = np.linspace(g.bodies[0].start[1], g.height - g.bodies[0].size, g.frames)  # constant speed
    _fails(W.render_world(g, centers=c), g.caption, "gravity")
    _fails(W.render_world(dataclasses.replace(g, gravity=g.gravity / 3)), g.caption, "gravity")


def test_collision_and_passing_swapped_fail_collision():
    c = W.sample_world(0, "collision")
    through = dataclasses.replace(c, prompt=dataclasses.replace(c.prompt, interaction="passing"))
    _fails(W.render_world(through), c.caption, "collision")  # they pass through each other
    p = W.sample_world(0, "passing")
    bodies = tuple(dataclasses.replace(b, start=(b.start[0], b.start[1])) for b in p.bodies)
    axis_k = 0 if p.prompt.axis == "x" else 1
    lane = bodies[0].start[1 - axis_k]
    same = tuple(dataclasses.replace(b, start=tuple(lane if i == 1 - axis_k else b.start[i] for i in range(2)))
                 for b in bodies)
    bumped = dataclasses.replace(p, bodies=same, prompt=dataclasses.replace(p.prompt, interaction="colliding"))
    _fails(W.render_world(bumped), p.caption, "collision")  # they bounce off each other


def test_swapped_colours_fail():
    c = W.sample_world(2, "collision")
    a, b = c.bodies
    bodies = (dataclasses.replace(a, color=b.color), dataclasses.replace(b, color=a.color))
    swapped = dataclasses.replace(c, bodies=bodies)
    r = probe_clip(W.render_world(swapped), c.caption)
    assert r.probes["direction"] is False or r.probes["shape"] is False, r.probes
    m = W.sample_world(3, "moving")
    other = next(x for x in S.COLORS if x != m.prompt.color)
    video = W.render_world(m)
    video[m.frames // 2:] = W.render_world(dataclasses.replace(
        m, bodies=(dataclasses.replace(m.bodies[0], color=other),)))[m.frames // 2:]
    _fails(video, m.caption, "identity")  # changes colour half way
    _fails(W.render_world(m), m.caption.replace(m.prompt.color, other), "colour")


def test_backwards_wrong_speed_and_wrong_shape_fail():
    m = W.sample_world(5, "moving")
    video = W.render_world(m)
    _fails(video[::-1].copy(), m.caption, "direction")
    wrong = "slowly" if m.prompt.speed == "fast" else "quickly"
    _fails(video, m.caption.replace("slowly" if m.prompt.speed == "slow" else "quickly", wrong), "speed")
    other = next(s for s in S.SHAPES if s != m.prompt.shape)
    _fails(video, m.caption.replace(m.prompt.shape, other), "shape")


def test_frozen_or_inconsistent_camera_fails_camera():
    for seed in range(3):
        spec = W.sample_world(seed, "camera")
        frozen = dataclasses.replace(spec, camera_shift=(0.0, 0.0), zoom=0.0)
        _fails(W.render_world(frozen), spec.caption, "camera")
    pan = next(s for s in (W.sample_world(i, "camera") for i in range(20)) if s.prompt.camera in S.DIRECTIONS)
    video = W.render_world(pan)
    for i in range(1, pan.frames, 2):  # a different background texture every other frame
        video[i] = W.render_world(dataclasses.replace(pan, texture_seed=pan.texture_seed + i))[i]
    _fails(video, pan.caption, "camera")


def test_phase_correlation_recovers_a_shift():
    rng = np.random.default_rng(0)
    img = rng.random((40, 48))
    img = (img + np.roll(img, 1, 0) + np.roll(img, 1, 1)) / 3
    dx, dy = phase_correlate(img, np.roll(img, (2, -3), axis=(0, 1)))
    assert abs(dx + 3) < 0.3 and abs(dy - 2) < 0.3


def test_probe_input_errors():
    with pytest.raises(TypeError, match="caption must be a str"):
        probe_clip(np.zeros((2, 16, 16, 3), np.uint8), None)
    with pytest.raises(ValueError, match="does not follow"):
        probe_clip(np.zeros((2, 16, 16, 3), np.uint8), "a purple cube")
