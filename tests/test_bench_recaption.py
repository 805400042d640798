"""bench/bench_recaption.py: its caption degradations and short prompts, and a smoke run end to end."""
import json

import pytest

from bench import bench_recaption as br
from sora_fast.data.synthetic import parse_caption, sample_spec


@pytest.mark.parametrize("caption, how, want", [
    ("a red circle moving left slowly", "a video", "a video"),
    ("a red circle moving left slowly", "no colour", "a circle moving left slowly"),
    ("a yellow triangle bouncing up and down quickly", "no colour", "a triangle bouncing up and down quickly"),
    ("a white square moving up quickly behind a gray bar", "no motion", "a white square"),
    ("a blue square", "no colour", "a square"),
])
def test_degrade(caption, how, want):
    assert br.degrade(caption, how) == want


def test_degraded_captions_half_each_kind_in_turn():
    caps = [sample_spec(i).caption for i in range(60)]
    out, kinds = br.degraded_captions(caps, seed=3)
    assert len(out) == len(caps) and sum(k is not None for k in kinds) == 30
    for c, o, k in zip(caps, out, kinds):
        if k is None:
            assert o == c
        else:
            assert o == br.degrade(c, k) and o != c
            if k != "a video":   # what is left still parses, without the dropped part
                p, q = parse_caption(c), o.split()
                assert (p.color not in q) if k == "no colour" else (len(q) == 3 and p.direction not in q)
    assert br.degraded_captions(caps, seed=3) == (out, kinds)          # seeded
    assert br.degraded_captions(caps, seed=4)[1] != kinds


def test_short_prompt():
    assert br.short_prompt("a red circle moving left slowly") == "red circle left"
    assert br.short_prompt("a blue square bouncing up and down quickly") == "blue square bouncing up and down"


def test_quick_run_writes_every_arm(tiny_pipeline, tmp_path):
    _, directory = tiny_pipeline
    out = tmp_path / "bench"
    assert br.main(["--quick", "--out", str(out), "--vae-from", str(directory), "--dit-steps", "3",
                    "--prompts", "2", "--threads", "1"]) == 0
    report = json.loads((out / "recaption.json").read_text())
    assert set(report["arms"]) == set(br.ARMS)
    assert all(a["clips"] == 2 and 0 <= a["passed"] <= 2 for a in report["arms"].values())
    kinds = report["degraded"]["kinds"]
    assert sum(kinds.values()) == round(0.5 * report["config"]["clips"])
    assert report["recaption"]["exit"] == 0
    assert {"short", "expanded", "full"} <= set(report["expansion"])
    ex = report["expansion"]["examples"][0]
    assert parse_caption(ex["expanded"]) and ex["short"] != ex["expanded"]
