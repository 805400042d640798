"""``bench/bench_demo_quality.py``: its scoring counts each part of the check correctly on clips whose truth is
known (rendered ground truth, a static object, a wrong colour), and a tiny run writes a row per checkpoint."""
import dataclasses
import json

import pytest
import torch

from bench import bench_demo_quality as bench
from sora_fast.data import ClipSpec, parse_caption, prompts, render_clip
from sora_fast.data.synthetic import COLORS, SPEEDS


def _spec_for(prompt: str, size) -> ClipSpec:
    """A clip that does what ``prompt`` says, its path centred in the frame."""
    p = parse_caption(prompt)
    t, h, w = size
    obj = 0.4 * min(h, w)
    side = w if p.axis == "x" else h
    travel = SPEEDS[p.speed] * side * (t - 1) * (-1 if p.direction in ("left", "up") else 1)
    start = [w / 2, h / 2]
    start[0 if p.axis == "x" else 1] -= travel / 2
    return ClipSpec(p.shape, p.color, h, w, t, obj, tuple(start), direction=p.direction, speed=p.speed)


class _Pipe:
    """Stands in for a VideoPipeline: renders each prompt's clip, optionally broken in one way."""

    def __init__(self, mode: str):
        self.mode = mode

    def generate(self, prompt_list, sizes, *, steps, guidance, seed):
        clips = []
        for prompt, size in zip(prompt_list, sizes):
            spec = _spec_for(prompt, size)
            if self.mode == "static":
                spec = dataclasses.replace(spec, direction=None, speed=None)
            elif self.mode == "recolor":
                others = [c for c in COLORS if c != spec.color]
                spec = dataclasses.replace(spec, color=others[len(prompt) % len(others)])
            frames = torch.from_numpy(render_clip(spec)).permute(3, 0, 1, 2).float() / 127.5 - 1.0
            clips.append(frames)                                     # (3, T, H, W) in [-1, 1]
        return clips


@pytest.mark.parametrize("mode,want", [
    ("truth", dict(passed=12, present=12, color=12, direction=12)),
    ("static", dict(passed=0, present=12, color=12, direction=0)),
    ("recolor", dict(passed=0, present=0, color=0)),     # presence is of the prompted colour
])
def test_score_counts_each_part_of_the_check(mode, want):
    plist = prompts(12, seed=3)
    sizes = [((9, 32, 32), (9, 32, 48), (9, 48, 32))[i % 3] for i in range(12)]
    got = bench.score(_Pipe(mode), plist, sizes, steps=1, guidance=1.0, seed=0)
    assert got["clips"] == 12
    assert {k: got[k] for k in want} == want


def test_tiny_run_writes_a_row_per_checkpoint(tmp_path, capsys):
    threads = torch.get_num_threads()
    out = tmp_path / "q"
    assert bench.main(["--out", str(out), "--dit-steps", "4", "--vae-steps", "2", "--val", "3", "--eval-at", "2,4",
                       "--threads", "1", "--guidance", "3,5"]) == 0
    assert torch.get_num_threads() == threads
    report = json.loads((out / "quality.json").read_text())
    assert [(r["step"], r["weights"], r["guidance"]) for r in report["rows"]] == [
        (s, w, g) for s in (2, 4) for w in ("raw", "ema") for g in (3.0, 5.0)]
    for r in report["rows"]:
        assert r["clips"] == 3
        assert 0 <= r["passed"] <= min(r["present"], r["color"], r["direction"]) <= 3
    assert report["config"]["dit_steps"] == 4 and len(report["val_prompts"]) == 3
    printed = capsys.readouterr().out
    assert report["demo_checker"] in printed and "the 3 held-out prompts" in printed

    # scoring the pipeline the demo saved reproduces the demo's own pass count at its guidance
    assert bench.main(["--pipeline", str(out / "pipeline"), "--val", "2", "--guidance", "5",
                       "--json", str(tmp_path / "saved.json")]) == 0
    saved = json.loads((tmp_path / "saved.json").read_text())
    assert [(r["prompts"], r["clips"]) for r in saved["rows"]] == [("held-out", 2), ("demo", 8)]
    demo_row = saved["rows"][1]
    assert report["demo_checker"] == f"checker pass rate: {demo_row['passed']}/{demo_row['clips']}"


@pytest.mark.parametrize("argv,pattern", [
    (["--eval-at", "5000"], "past the last DiT step"),
    (["--eval-at", "a,b"], "comma-separated"),
    (["--val", "0"], "--val must be >= 1"),
    (["--dit-steps", "0"], "--dit-steps must be >= 1"),
    (["--threads", "0"], "--threads must be >= 1"),
    (["--guidance", "x"], "--guidance must be comma-separated"),
    (["--pipeline", "p", "--dit-steps", "3"], "need a training run"),
])
def test_bad_arguments_exit_with_a_message(tmp_path, argv, pattern):
    with pytest.raises(SystemExit, match=pattern):
        bench.main(["--out", str(tmp_path / "q"), *argv])
