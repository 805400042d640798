"""`sora-fast demo --quick`: every stage runs and writes what it says (the quality target is the full demo's)."""
import json

from sora_fast import cli


def test_quick_demo_runs_every_stage(tmp_path, capsys):
    out = tmp_path / "demo"
    assert cli.main(["demo", "--quick", "--out", str(out), "--no-progress"]) == 0
    printed = capsys.readouterr().out
    for stage in ("data: synthetic clips", "train vae", "encode latents", "train dit", "generate", "write videos",
                  "total"):
        assert stage in printed
    summary = json.loads((out / "summary.json").read_text())
    n = len(summary["prompts"])
    assert printed.strip().splitlines()[-1] == f"checker pass rate: {sum(summary['passed'])}/{n}"
    assert sum(name.endswith(".mp4") for name in summary["samples"]) == n
    assert sum(name.endswith(".gif") for name in summary["samples"]) == n
    for f in ("contact_sheet.png", "pipeline/pipeline.json", "dit_run/metrics.jsonl", "dit_run/loss.png"):
        assert (out / f).stat().st_size > 0, f
