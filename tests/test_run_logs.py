"""Training logs beyond metrics.jsonl: validation samples every N steps (videos + contact sheet of the model
being trained) and TensorBoard scalars through the real tensorboard writer (an optional extra)."""
import json

import numpy as np
import pytest
import torch
from PIL import Image

from sora_fast import cli
from sora_fast.data import make_synthetic_dataset
from sora_fast.training.run_logs import check_validation


def pixels(path):
    return torch.tensor(np.array(Image.open(path)), dtype=torch.float32)


def _run(tmp_path, pipe_path, **extra):
    data = tmp_path / "data"
    if not data.exists():
        make_synthetic_dataset(data, 3, seed=1, sizes=((16, 16),), lengths=(1, 5), progress=False)
    cfg = {"data": str(data), "out": str(tmp_path / "run"), "pipeline": str(pipe_path),
           "train": {"steps": 4, "token_budget": 64, "save_every": 10, "log_every": 1, "lr": 1e-3}, **extra}
    f = tmp_path / "run.json"
    f.write_text(json.dumps(cfg))
    return f


def test_validation_samples_every_n_steps(tiny_pipeline, tmp_path, capsys, monkeypatch):
    from sora_fast.pipeline import VideoPipeline

    pipe, path = tiny_pipeline
    seen, weights, generate = [], [], VideoPipeline.generate

    def spy(self, *args, **kwargs):
        seen.append({k: kwargs.get(k) for k in ("solver", "order", "cache", "steps")})
        weights.append(torch.cat([p.detach().flatten().double() for p in self.dit.parameters()]))
        return generate(self, *args, **kwargs)
    monkeypatch.setattr(VideoPipeline, "generate", spy)
    val = {"prompts": ["a red circle", "blue"], "every": 2, "size": [5, 16, 16], "steps": 2, "seed": 3,
           "solver": "unipc"}
    f = _run(tmp_path, path, validation=val)
    cfg = json.loads(f.read_text())
    cfg["train"]["ema_decay"] = None          # the saved pipeline is then the model the last samples came from
    f.write_text(json.dumps(cfg))
    assert cli.main(["train", "--config", str(f)]) == 0, capsys.readouterr().err
    samples = tmp_path / "run" / "samples"
    assert sorted(p.name for p in samples.iterdir()) == ["step_000002", "step_000004"]
    for step in ("step_000002", "step_000004"):
        names = sorted(p.name for p in (samples / step).iterdir())
        assert names == ["00_a_red_circle.mp4", "01_blue.mp4", "contact_sheet.png"]
        assert Image.open(samples / step / "contact_sheet.png").size[0] > 0
    # the samples are the model being trained: the pipeline saved after the last step generates the same clips
    from sora_fast.data.io import write_contact_sheet

    trained = VideoPipeline.load(tmp_path / "run" / "pipeline")
    clips = trained.generate(val["prompts"], (5, 16, 16), steps=2, guidance=4.0, seed=3, solver="unipc")
    ref = write_contact_sheet(tmp_path / "ref.png", clips, val["prompts"])
    got = pixels(samples / "step_000004" / "contact_sheet.png")
    want = pixels(ref)
    assert got.shape == want.shape and (got - want).abs().max() <= 1
    assert seen[:2] == [{"solver": "unipc", "order": None, "cache": None, "steps": 2}] * 2   # the run's sampler
    # and they come from the weights of their step: the two calls saw different weights, the last the saved ones
    assert not torch.equal(weights[0], weights[1])
    assert torch.equal(weights[1], torch.cat([p.detach().flatten().double() for p in trained.dit.parameters()]))


def test_tensorboard_log(tiny_pipeline, tmp_path, capsys):
    """With tensorboard installed the run writes event files with the loss; without it the run stops before any
    work with an error that names the package and the extra."""
    _, path = tiny_pipeline
    rc = cli.main(["train", "--config", str(_run(tmp_path, path, log="tensorboard"))])
    try:
        import tensorboard  # noqa: F401
    except ImportError:
        assert rc == 2
        err = capsys.readouterr().err
        assert "needs the tensorboard package (pip install 'sora-fast[tensorboard]')" in err, err
        assert not (tmp_path / "run" / "latents").exists()
        return
    assert rc == 0
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(tmp_path / "run" / "tensorboard"))
    acc.Reload()
    assert [e.step for e in acc.Scalars("train/loss")] == [1, 2, 3, 4]


@pytest.mark.parametrize("value, match", [
    ({"every": 2}, r"validation.prompts must be a non-empty list of strings, got None"),
    ({"prompts": ["a"], "every": 0}, r"validation.every must be an int >= 1, got 0"),
    ({"prompts": ["a"], "every": 1, "size": [5, 16]}, r"validation.size must be \[frames, height, width\]"),
    ({"prompts": ["a"], "every": 1, "sizes": 1}, r"unknown keys \['sizes'\]"),
    ({"prompts": ["a"], "every": 1, "solver": "heun"}, r"validation: solver must be one of"),
    ({"prompts": ["a"], "every": 1, "solver": "dpm++", "order": 3}, r"validation: order must be in 1..2"),
    ({"prompts": ["a"], "every": 1, "cache": "fast"}, r"validation: cache must be 'first-block:THRESH'"),
])
def test_validation_errors(value, match):
    with pytest.raises(ValueError, match=match):
        check_validation(value, "run.json")


def test_bad_log_and_size(tiny_pipeline, tmp_path, capsys):
    _, path = tiny_pipeline
    assert cli.main(["train", "--config", str(_run(tmp_path, path, log="wandb"))]) == 2
    assert "'log' must be one of 'jsonl', 'tensorboard', got 'wandb'" in capsys.readouterr().err
    val = {"prompts": ["a"], "every": 1, "size": [4, 16, 16]}
    assert cli.main(["train", "--config", str(_run(tmp_path, path, validation=val))]) == 2
    assert "validation.size: frames=4 must be 1 + 4k" in capsys.readouterr().err
