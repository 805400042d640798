"""The DiT trainer: its loss against per-video loops, bit-identical resume, Ctrl-C, LoRA, bad input."""
import json

import pytest
import torch
from _utils import assert_resume_bit_identical

from sora_fast.models.dit import VideoDiT
from sora_fast.models.text import TinyTextEncoder
from sora_fast.training.checkpoint import latest_checkpoint, list_checkpoints
from sora_fast.training.trainer import TrainConfig, Trainer, config_from_dict

SHAPES = [(4, 1, 4, 6), (4, 3, 2, 4), (4, 2, 6, 2), (4, 1, 2, 2), (4, 4, 4, 4)]   # images and videos
CAPTIONS = ["a red circle", "blue square up", "green", "", "a yellow dot moving left fast"]


def _setup(tmp_path, name="run", **cfg):
    torch.manual_seed(0)
    dit = VideoDiT.from_name("tiny")
    for p in dit.parameters():          # the tiny preset's zero-init head would make every loss equal
        torch.nn.init.normal_(p, std=0.05)
    text = TinyTextEncoder(dim=dit.config.text_dim)
    items = [{"latent": torch.randn(s, generator=torch.Generator().manual_seed(i)), "caption": c}
             for i, (s, c) in enumerate(zip(SHAPES, CAPTIONS))]
    base = dict(steps=6, token_budget=40, lr=1e-3, warmup_steps=2, save_every=3, log_every=1, seed=3)
    base.update(cfg)
    return Trainer(dit, text, items, TrainConfig(**base), tmp_path / name, model_config={"dit": "tiny"},
                   progress=False)


def test_step_loss_equals_per_video_reference(tmp_path):
    """The packed step's loss = mean over videos of each video's own MSE, computed alone."""
    tr = _setup(tmp_path)
    for step in range(3):
        d = tr.draw(step)
        with torch.no_grad():
            text_all = tr.text_encoder.encode(d["captions"])
            per_video = []
            noises = d["x0"].unpack(d["noise"])
            for j, i in enumerate(d["indices"]):
                x0, eps, t = tr.items[i].latent, noises[j], d["t"][j]
                xt = (1 - t) * x0 + t * eps
                text_j = text_all.unpack(text_all.tokens)[j]
                v = tr.dit.forward_videos([xt], t[None] * 1000, [text_j])[0]
                per_video.append(((v - (eps - x0)) ** 2).mean())
            ref = torch.stack(per_video).mean().item()
        m = tr.train_step(step)
        assert m["loss"] == pytest.approx(ref, rel=1e-5)
        assert m["videos"] == len(d["indices"])


def test_every_item_once_per_epoch_and_budget_respected(tmp_path):
    tr = _setup(tmp_path)
    n = len(tr.plan)
    for epoch in range(2):
        seen = sorted(i for s in range(epoch * n, (epoch + 1) * n) for i in tr.batch_for_step(s))
        assert seen == list(range(len(SHAPES)))
    assert max(tr.plan.tokens_per_batch) <= 40


def test_resume_continues_bit_identically(tmp_path):
    assert_resume_bit_identical(_setup, tmp_path)
    lines = [json.loads(x) for x in (tmp_path / "full" / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in lines] == list(range(1, 7))
    assert (tmp_path / "full" / "loss.png").stat().st_size > 0


def test_ctrl_c_writes_a_checkpoint_first(tmp_path):
    tr = _setup(tmp_path)

    def interrupt(step, metrics):
        if step == 2:
            raise KeyboardInterrupt

    summary = tr.train(on_step=interrupt)
    assert summary["interrupted"] and summary["steps"] == 2
    assert latest_checkpoint(tmp_path / "run").name == "step_000002"
    again = _setup(tmp_path)
    assert again.resume() == 2


def test_lora_trains_and_saves_adapters_only(tmp_path):
    tr = _setup(tmp_path, lora_rank=2, steps=2, save_every=100)
    before = {n: p.detach().clone() for n, p in tr.dit.named_parameters() if not p.requires_grad}
    tr.train()
    for n, p in tr.dit.named_parameters():
        if n in before:
            assert torch.equal(p, before[n]), f"frozen {n} changed"
    from safetensors.torch import load_file
    saved = load_file(str(list_checkpoints(tmp_path / "run")[-1] / "model.safetensors"))
    assert saved and all("lora_" in k for k in saved)
    again = _setup(tmp_path, lora_rank=2, steps=2, save_every=100)
    assert again.resume() == 2


def test_checkpoint_of_another_model_is_refused(tmp_path):
    _setup(tmp_path, steps=1).train()
    other = _setup(tmp_path)
    other.model_config = {"dit": "other"}
    with pytest.raises(ValueError, match="dit"):
        other.resume()


def test_bad_config_and_items(tmp_path):
    with pytest.raises(ValueError, match=r"unknown keys \['stpes'\]"):
        config_from_dict(TrainConfig, {"stpes": 3})
    with pytest.raises(ValueError, match="TrainConfig.caption_dropout must be in"):
        TrainConfig(caption_dropout=1.0)
    with pytest.raises(ValueError, match="TrainConfig.timestep_shift must be 'auto' or a positive"):
        TrainConfig(timestep_shift=-1)
    dit = VideoDiT.from_name("tiny")
    text = TinyTextEncoder(dim=dit.config.text_dim)
    with pytest.raises(ValueError, match=r"items\[0\].latent must be \(C=4, T, H, W\)"):
        Trainer(dit, text, [{"latent": torch.randn(3, 1, 2, 2), "caption": ""}], TrainConfig(), tmp_path / "x")
    with pytest.raises(ValueError, match="more than token_budget=2"):
        Trainer(dit, text, [{"latent": torch.randn(4, 1, 4, 4), "caption": ""}], TrainConfig(token_budget=2),
                tmp_path / "y")
    with pytest.raises(ValueError, match="items is empty"):
        Trainer(dit, text, [], TrainConfig(), tmp_path / "z")


@pytest.mark.parametrize("schedule,floor", [("constant", 0.0), ("cosine", 0.0), ("cosine", 0.1), ("linear", 0.25)])
def test_learning_rate_schedule(tmp_path, schedule, floor):
    """The optimizer's lr at every step: a linear warm-up, then constant or a decay to ``floor · lr`` at the
    last step (closed forms written out here, not taken from the trainer)."""
    import math
    steps, warm, lr = 7, 3, 1e-3
    tr = _setup(tmp_path, steps=steps, warmup_steps=warm, lr=lr, lr_schedule=schedule, min_lr_ratio=floor,
                save_every=100)
    seen = []
    real_step = tr.optimizer.step

    def spy(*a, **k):
        seen.append(tr.optimizer.param_groups[0]["lr"])
        return real_step(*a, **k)
    tr.optimizer.step = spy
    tr.train()
    decay = {"constant": lambda f: 1.0, "cosine": lambda f: 0.5 * (1 + math.cos(math.pi * f)),
             "linear": lambda f: 1 - f}[schedule]
    expect = [lr * (k + 1) / warm for k in range(warm - 1)]                 # steps 0, 1: warming up
    expect += [lr * (1.0 if schedule == "constant" else floor + (1 - floor) * decay(j / (steps - warm)))
               for j in range(steps - warm + 1)]                            # steps 2..6: lr, then the decay
    assert seen == pytest.approx(expect, rel=1e-12, abs=1e-15)
    if schedule != "constant":
        assert seen[-1] == pytest.approx(floor * lr, abs=1e-15) and seen[warm - 1] == pytest.approx(lr)


@pytest.mark.parametrize("field,value,match", [
    ("lr_schedule", "step", r"lr_schedule must be 'constant', 'cosine' or 'linear', got 'step'"),
    ("min_lr_ratio", 1.5, r"min_lr_ratio must be a number in \[0, 1\], got 1.5"),
    ("min_lr_ratio", True, r"min_lr_ratio must be a number in \[0, 1\], got True"),
])
def test_bad_schedule_settings(field, value, match):
    with pytest.raises(ValueError, match=match):
        TrainConfig(**{field: value})


def test_sigterm_writes_a_checkpoint_and_stops(tmp_path):
    """SIGTERM (docker stop, Slurm, Kubernetes) is handled like Ctrl-C: the step finishes, a checkpoint is
    written, the run stops; the previous handler is back afterwards."""
    import os
    import signal

    seen = []

    def previous(signum, frame):
        seen.append(signum)

    old = signal.signal(signal.SIGTERM, previous)
    try:
        tr = _setup(tmp_path)

        def terminate(step, metrics):
            if step == 2:
                os.kill(os.getpid(), signal.SIGTERM)

        summary = tr.train(on_step=terminate)
        assert summary["interrupted"] and summary["steps"] == 2 and summary["signal"] == "SIGTERM"
        assert latest_checkpoint(tmp_path / "run").name == "step_000002"
        assert signal.getsignal(signal.SIGTERM) is previous and not seen
        assert _setup(tmp_path).resume() == 2
    finally:
        signal.signal(signal.SIGTERM, old)


def test_train_in_a_thread_leaves_signals_alone(tmp_path):
    """Signal handlers can only be installed in the main thread: a run in another thread still trains."""
    import signal
    import threading

    before = signal.getsignal(signal.SIGTERM)
    result = {}
    t = threading.Thread(target=lambda: result.update(_setup(tmp_path, steps=1).train()))
    t.start()
    t.join()
    assert result["steps"] == 1 and not result["interrupted"]
    assert signal.getsignal(signal.SIGTERM) is before


@pytest.mark.parametrize("data, error, match", [
    ({"grad_clip": -1.0}, ValueError, r"TrainConfig.grad_clip must be >= 0 \(0 turns clipping off\), got -1.0"),
    ({"grad_clip": float("nan")}, ValueError, r"TrainConfig.grad_clip must be a finite number, got nan"),
    ({"lr": "3e-4"}, TypeError, r"run.json \[train\]: 'lr' must be a number, got str '3e-4'"),
    ({"steps": 2.5}, TypeError, r"run.json \[train\]: 'steps' must be an int, got float 2.5"),
    ({"steps": True}, TypeError, r"run.json \[train\]: 'steps' must be an int, got bool True"),
    ({"ema_decay": "off"}, TypeError, r"'ema_decay' must be a number or null / absent, got str 'off'"),
    ({"checkpointing": 1}, TypeError, r"'checkpointing' must be true or false, got int 1"),
    ({"betas": 0.9}, TypeError, r"'betas' must be a list, got float 0.9"),
    ({"weight_decay": -0.1}, ValueError, r"TrainConfig.weight_decay must be >= 0, got -0.1"),
])
def test_run_file_values_of_the_wrong_type_name_their_key(data, error, match):
    with pytest.raises(error, match=match):
        config_from_dict(TrainConfig, data, where="run.json [train]")
