"""The sora-fast CLI: help on every flag, generate and train (with resume) on tiny models, bad input."""
import json
import re

import numpy as np
import pytest
import torch
from PIL import Image

from sora_fast import cli
from sora_fast.data import make_synthetic_dataset
from sora_fast.models.dit import VideoDiT
from sora_fast.pipeline import VideoPipeline
from sora_fast.training.checkpoint import latest_checkpoint


def test_every_flag_has_help():
    parser = cli.build_parser()
    sub = next(a for a in parser._actions if a.dest == "command")
    assert set(sub.choices) >= {"demo", "train", "generate"}
    for name, p in sub.choices.items():
        for action in p._actions:
            if action.dest != "help":
                assert action.help, f"sora-fast {name} {action.option_strings} has no help"
    with pytest.raises(SystemExit) as e:
        cli.main(["generate", "--help"])
    assert e.value.code == 0


def test_generate_writes_videos_and_contact_sheet(tiny_pipeline, tmp_path, capsys):
    pipe, path = tiny_pipeline
    out = tmp_path / "gen"
    rc = cli.main(["generate", "--pipeline", str(path), "--prompt", "a red circle", "--prompt", "blue",
                   "--size", "5x16x32", "--size", "1x16x16", "--steps", "2", "--out", str(out), "--seed", "3"])
    assert rc == 0
    names = sorted(p.name for p in out.iterdir())
    assert names == ["00_a_red_circle.gif", "00_a_red_circle.mp4", "01_blue.gif", "01_blue.png", "contact_sheet.png",
                     "generate.json"]
    assert "ms/step" in capsys.readouterr().out
    # the CLI's clips are the pipeline's clips
    ref = pipe.generate(["a red circle", "blue"], [(5, 16, 32), (1, 16, 16)], steps=2, guidance=4.0, seed=3)
    png = torch.tensor(np.array(Image.open(out / "01_blue.png")), dtype=torch.float32)
    expect = ((ref[1][:, 0].permute(1, 2, 0) + 1) * 127.5).round().clamp(0, 255)
    assert (png - expect).abs().max() <= 1


@pytest.mark.parametrize("args, match", [
    (["--size", "4x16x16"], r"--size #1: frames=4 must be 1 \+ 4k"),
    (["--size", "5x16x16", "--size", "5x16x16", "--size", "5x16x16"], "--size given 3 times"),
    (["--shift", "fast"], "--shift must be a number or 'auto'"),
])
def test_generate_bad_input(tiny_pipeline, tmp_path, capsys, args, match):
    _, path = tiny_pipeline
    rc = cli.main(["generate", "--pipeline", str(path), "--prompt", "a", "--prompt", "b", "--out",
                   str(tmp_path / "o"), *args])
    assert rc == 2
    assert re.search(match, capsys.readouterr().err)


def test_unwritable_output_fails_before_work(tiny_pipeline, tmp_path, capsys):
    _, path = tiny_pipeline
    blocker = tmp_path / "file"
    blocker.write_text("x")
    rc = cli.main(["generate", "--pipeline", str(path), "--prompt", "a", "--out", str(blocker / "sub")])
    assert rc == 2 and "file" in capsys.readouterr().err


def _run_file(tmp_path, pipe_path, **extra):
    data = tmp_path / "data"
    if not data.exists():
        make_synthetic_dataset(data, 6, seed=1, sizes=((16, 16), (16, 32)), lengths=(1, 5), progress=False)
    cfg = {"data": str(data), "out": str(tmp_path / "run"), "pipeline": str(pipe_path),
           "train": {"steps": 2, "token_budget": 64, "save_every": 1, "log_every": 1, "lr": 1e-3}}
    cfg.update(extra)
    f = tmp_path / "run.json"
    f.write_text(json.dumps(cfg))
    return f


def test_train_then_resume_then_generate(tiny_pipeline, tmp_path, capsys):
    _, path = tiny_pipeline
    f = _run_file(tmp_path, path)
    assert cli.main(["train", "--config", str(f)]) == 0
    assert latest_checkpoint(tmp_path / "run").name == "step_000002"
    assert cli.main(["train", "--config", str(f), "--resume", "--steps", "3"]) == 0
    assert "resuming from step 2" in capsys.readouterr().err
    assert latest_checkpoint(tmp_path / "run").name == "step_000003"
    lines = (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()
    assert [json.loads(x)["step"] for x in lines] == [1, 2, 3]
    assert cli.main(["generate", "--pipeline", str(tmp_path / "run" / "pipeline"), "--prompt", "x",
                     "--size", "1x16x16", "--steps", "1", "--out", str(tmp_path / "g")]) == 0


def test_train_config_errors(tiny_pipeline, tmp_path, capsys):
    _, path = tiny_pipeline
    f = _run_file(tmp_path, path, learning_rate=3)
    assert cli.main(["train", "--config", str(f)]) == 2
    assert "unknown keys ['learning_rate']" in capsys.readouterr().err
    f = _run_file(tmp_path, path, train={"stesp": 3})
    assert cli.main(["train", "--config", str(f)]) == 2
    assert "[train] has unknown keys ['stesp']" in capsys.readouterr().err
    assert cli.main(["train", "--config", str(tmp_path / "missing.json")]) == 2
    assert "does not exist" in capsys.readouterr().err
    # a checkpoint of another model configuration is refused, naming what differs
    f = _run_file(tmp_path, path)
    assert cli.main(["train", "--config", str(f)]) == 0
    f = _run_file(tmp_path, path, dit="demo")
    assert cli.main(["train", "--config", str(f), "--resume", "--steps", "3"]) == 2
    err = capsys.readouterr().err
    assert "config.dit.dim" in err and "missing" in err, err


def test_train_fine_tunes_a_diffusers_wan_transformer(tiny_pipeline, tmp_path, capsys):
    """`diffusers_transformer`: a saved WanTransformer3DModel is converted, fine-tuned with LoRA, merged and
    saved; the merged pipeline's DiT then differs from the converted start only through the adapters."""
    from diffusers import WanTransformer3DModel

    pipe, path = tiny_pipeline
    wan = WanTransformer3DModel(patch_size=(1, 2, 2), num_attention_heads=2, attention_head_dim=16, in_channels=4,
                                out_channels=4, text_dim=pipe.text_encoder.dim, freq_dim=32, ffn_dim=48, num_layers=1)
    for p in wan.parameters():
        torch.nn.init.normal_(p, std=0.05)
    wan.save_pretrained(tmp_path / "wan")
    f = _run_file(tmp_path, path, diffusers_transformer=str(tmp_path / "wan"))
    cfg = json.loads(f.read_text())
    cfg["train"].update(lora_rank=2, steps=2)
    f.write_text(json.dumps(cfg))
    assert cli.main(["train", "--config", str(f)]) == 0, capsys.readouterr().err
    tuned = VideoPipeline.load(tmp_path / "run" / "pipeline")
    start = VideoDiT.from_diffusers(wan)
    assert tuned.dit.config == start.config
    changed = [n for n, p in start.state_dict().items() if not torch.equal(p, tuned.dit.state_dict()[n])]
    assert changed and all(any(t in n for t in ("to_q", "to_k", "to_v", "to_out", "ffn")) for n in changed), changed


def test_report_is_the_kernel_report(capsys):
    with pytest.raises(SystemExit) as e:
        cli.main(["report", "--help"])
    assert e.value.code == 0
    out = capsys.readouterr().out
    assert out.startswith("usage: sora-fast report") and "--per-kernel" in out
