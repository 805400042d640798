"""bench/bench_conditioning.py on a saved pipeline: its scores are the evaluation's, its flags are checked."""
import json

import pytest

from bench import bench_conditioning


def test_scores_a_saved_pipeline_and_writes_json(tiny_pipeline, tmp_path, capsys):
    from sora_fast.eval import evaluate_conditioning

    pipe, directory = tiny_pipeline
    out = tmp_path / "scores.json"
    assert bench_conditioning.main(["--pipeline", str(directory), "--clips", "2", "--modes", "i2v,keyframes",
                                    "--seed", "5", "--json", str(out), "--threads", "1"]) == 0
    report = json.loads(out.read_text())
    assert list(report["scores"]) == ["i2v", "keyframes"] and report["clips"] == 2
    ref = evaluate_conditioning(pipe, clips=2, seed=5, modes=["i2v", "keyframes"])   # the same clips and seeds
    for mode, s in report["scores"].items():
        assert s["clips"] == 2 and s["passed"] == ref[mode]["passed"]
        assert [f["caption"] for f in s["failures"]] == [f["caption"] for f in ref[mode]["failures"]]
    printed = capsys.readouterr().out
    assert "image-to-video" in printed and "keyframes" in printed


@pytest.mark.parametrize("argv, match", [
    (["--modes", "i2v,t2i"], "--modes"),
    (["--clips", "0"], "--clips"),
    (["--modes", "i2v"], "--modes and --seed apply with --pipeline"),
])
def test_bad_flags_are_refused(argv, match, capsys):
    with pytest.raises(SystemExit) as e:
        bench_conditioning.main(argv)
    assert match in f"{e.value.code} {capsys.readouterr().err}"
