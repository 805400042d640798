"""`sora-fast eval`: a folder of world clips (one broken file, one clip without a reference) gives the JSON
shape others build on, a summary table, contact sheets, and skipped files counted."""
import json

from sora_fast.cli import main
from sora_fast.data import world as W
from sora_fast.eval.probes import PROBES


def test_eval_folder(tmp_path, capsys):
    W.make_world_dataset(tmp_path / "clips", 4, seed=3, scenes=["gravity", "occlusion"], progress=False)
    W.make_world_dataset(tmp_path / "ref", 3, seed=3, scenes=["gravity", "occlusion"], progress=False)
    (tmp_path / "clips" / "broken.mp4").write_bytes(b"not a video")
    out = tmp_path / "eval.json"
    rc = main(["eval", str(tmp_path / "clips"), "--captions", "--reference", str(tmp_path / "ref"), "--json", str(out),
               "--sheets", str(tmp_path / "sheets"), "--no-progress"])
    assert rc == 0
    doc = json.loads(out.read_text())
    assert set(doc) == {"clips", "summary"} and len(doc["clips"]) == 4
    for c in doc["clips"]:
        assert set(c) == {"file", "caption", "metrics", "probes"} and set(c["probes"]) == set(PROBES)
        assert all(v is None or isinstance(v, bool) for v in c["probes"].values())
        assert all(isinstance(v, (int, float)) or v is None for v in c["metrics"].values())
        assert c["probes"]["gravity"] is not None or c["probes"]["permanence"] is not None
    s = doc["summary"]
    assert s["skipped"]["unreadable"] == 1
    assert s["skipped"]["mismatched"] == (1 if "psnr" in s["metrics"] else 0)
    assert s["probes"]["present"]["passed"] == 4
    text = capsys.readouterr().out
    assert "probe" in text and "eval: 4/5 clips scored" in text


def test_eval_errors(tmp_path, capsys):
    assert main(["eval", str(tmp_path / "nowhere")]) == 2
    assert "VIDEO_DIR must be a folder" in capsys.readouterr().err
    assert main(["eval", str(tmp_path)]) == 2
    assert "holds no video" in capsys.readouterr().err


def test_world_demo_preset_and_flag(capsys):
    from sora_fast.cli import build_parser
    from sora_fast.data.world import sample_world
    from sora_fast.demo import DEMO_PRESETS

    args = build_parser().parse_args(["demo", "--world", "--quick"])
    assert args.world and args.quick
    for name in ("world", "world-quick"):
        cfg = DEMO_PRESETS[name]
        assert cfg.world and not DEMO_PRESETS["default"].world
        for scene in ("occlusion", "gravity", "collision"):  # every scene fits the preset's sizes and lengths
            sample_world(0, scene, sizes=cfg.sizes, lengths=cfg.lengths, object_size=cfg.object_size)
