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
    assert ("reconstructions" in printed
            and summary["vae_check"]["clips"] == sum(n for _, n in summary["vae_check"]["per_color"].values()))
    n = len(summary["prompts"])
    assert printed.strip().splitlines()[-1] == f"checker pass rate: {sum(summary['passed'])}/{n}"
    assert sum(name.endswith(".mp4") for name in summary["samples"]) == n
    assert sum(name.endswith(".gif") for name in summary["samples"]) == n
    for f in ("contact_sheet.png", "pipeline/pipeline.json", "dit_run/metrics.jsonl", "dit_run/loss.png"):
        assert (out / f).stat().st_size > 0, f
    # the pipeline carries the statistics of the captions it was trained on (prompt expansion fills from them)
    from sora_fast.captions.expand import CaptionStats
    saved = CaptionStats.from_dict(json.loads((out / "pipeline" / "pipeline.json").read_text())["captions"])
    captions = [p.read_text().strip() for p in sorted((out / "data").glob("*.txt"))]
    assert saved.frequencies() == CaptionStats.from_captions(captions).frequencies()
    assert saved.captions + saved.skipped == len(captions)
    # every conditioned mode scored, printed as a row of the summary table, with a contact sheet
    from sora_fast.eval import MODES, TARGETS
    scores = summary["conditioning"]
    assert list(scores) == list(MODES) and "score modes" in printed
    for mode, s in scores.items():
        assert s["clips"] == (2 if mode == "t2v" else 1) and 0 <= s["passed"] <= s["clips"]
        assert s["rate"] == s["passed"] / s["clips"] and s["met"] == (s["rate"] >= TARGETS[mode])
        assert len(s["failures"]) == s["clips"] - s["passed"]
        assert any(line.startswith(s["label"]) and f"{s['passed']}/" in line for line in printed.splitlines())
        assert (out / "conditioning" / f"{mode}.png").stat().st_size > 0


class _FakeVAE:
    """encode = identity; decode = identity, or one that lost blue: blue pixels come back as background."""

    def __init__(self, drop_blue: bool):
        self.drop_blue = drop_blue

    def encode(self, x):
        return x

    def decode(self, z):
        z = z.clone()
        if self.drop_blue:                                     # blue-dominated pixels, edges included
            r, g, b = z[:, 0:1], z[:, 1:2], z[:, 2:3]
            near = ((b > r + 0.2) & (b > g + 0.2)).expand_as(z)                         # (1, 3, T, H, W)
            background = z.flatten(2).median(dim=2).values[..., None, None, None].expand_as(z)
            z[near] = background[near]
        return z


def test_vae_check_finds_a_lost_colour(tmp_path):
    """The demo's VAE check passes perfect reconstructions and names the colour a VAE lost."""
    from sora_fast.data import VideoFolder, make_synthetic_dataset
    from sora_fast.demo import _vae_check
    make_synthetic_dataset(tmp_path / "d", 60, seed=3, sizes=((32, 32), (32, 48)), lengths=(5, 9), progress=False)
    folder = VideoFolder(tmp_path / "d", progress=False)
    read = [folder[i] for i in range(len(folder))]
    videos, captions = [r["video"] for r in read], [r["caption"] for r in read]
    good = _vae_check(_FakeVAE(False), captions, videos, per_color=3)
    assert good["clips"] > 0 and good["passed"] == good["clips"]
    assert all(n <= 3 for _, n in good["per_color"].values())
    bad = _vae_check(_FakeVAE(True), captions, videos, per_color=3)
    for color, (ok, n) in bad["per_color"].items():
        assert (ok == 0) if color == "blue" else (ok == n), (color, ok, n)
    assert "blue" in bad["per_color"]
