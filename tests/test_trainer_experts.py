"""Training Wan 2.2 A14B's two experts: each video trains the expert of its level, the step's loss equals a per-video
reference on the right expert, an expert without videos keeps its weights, resume is bit for bit (full and LoRA)."""
import pytest
import torch
from _utils import assert_resume_bit_identical

from sora_fast.models.dit import VideoDiT
from sora_fast.models.text import TinyTextEncoder
from sora_fast.training.checkpoint import list_checkpoints
from sora_fast.training.trainer import TrainConfig, Trainer

SHAPES = [(4, 1, 4, 6), (4, 3, 2, 4), (4, 2, 6, 2), (4, 1, 2, 2), (4, 4, 4, 4), (4, 2, 2, 2)]
CAPTIONS = ["a red circle", "blue square up", "green", "", "a yellow dot moving left fast", "two"]
BOUNDARY = 500.0


def _dit(seed):
    torch.manual_seed(seed)
    dit = VideoDiT.from_name("tiny")
    for p in dit.parameters():          # the tiny preset's zero-init head would make every loss equal
        torch.nn.init.normal_(p, std=0.05)
    return dit


def _setup(tmp_path, name="run", boundary=BOUNDARY, **cfg):
    dit, dit_2 = _dit(0), _dit(1)
    text = TinyTextEncoder(dim=dit.config.text_dim)
    items = [{"latent": torch.randn(s, generator=torch.Generator().manual_seed(i)), "caption": c}
             for i, (s, c) in enumerate(zip(SHAPES, CAPTIONS))]
    base = dict(steps=6, token_budget=60, lr=1e-3, warmup_steps=2, save_every=3, log_every=1, seed=3)
    base.update(cfg)
    return Trainer(dit, text, items, TrainConfig(**base), tmp_path / name, model_config={"dit": "tiny", "experts": 2},
                   progress=False, dit_2=dit_2, boundary=boundary)


def _spy(monkeypatch, dit, seen):
    real = dit.forward

    def forward(x, t, text, *a, **k):
        seen.append((x.num_sequences, t.detach().clone()))
        return real(x, t, text, *a, **k)
    monkeypatch.setattr(dit, "forward", forward)


def _reference_loss(tr, d):
    """Mean over the step's videos of each video's MSE, alone, on the expert of its timestep."""
    with torch.no_grad():
        text_all = tr.text_encoder.encode(d["captions"])
        noises, texts = d["x0"].unpack(d["noise"]), text_all.unpack(text_all.tokens)
        per_video = []
        for j, i in enumerate(d["indices"]):
            x0, eps, t = tr.items[i].latent, noises[j], d["t"][j]
            dit = tr.dit if float(t * 1000) >= BOUNDARY else tr.dit_2
            v = dit.forward_videos([(1 - t) * x0 + t * eps], t[None] * 1000, [texts[j]])[0]
            per_video.append(((v - (eps - x0)) ** 2).mean())
        return torch.stack(per_video).mean().item()


def test_videos_train_the_expert_of_their_level(tmp_path, monkeypatch):
    """Each expert's forward sees only its own levels (>= boundary: dit, below: dit_2); the loss is the per-video
    reference on the right expert; both experts ran over the steps (one step with both in one of them)."""
    tr = _setup(tmp_path)
    seen_high, seen_low, both = [], [], 0
    _spy(monkeypatch, tr.dit, seen_high)
    _spy(monkeypatch, tr.dit_2, seen_low)
    for step in range(8):
        d = tr.draw(step)
        ref = _reference_loss(tr, d)
        seen_high.clear()
        seen_low.clear()
        m = tr.train_step(step)
        assert m["loss"] == pytest.approx(ref, rel=1e-5)
        high = [t for _, ts in seen_high for t in ts.tolist()]
        low = [t for _, ts in seen_low for t in ts.tolist()]
        assert all(t >= BOUNDARY for t in high) and all(t < BOUNDARY for t in low)
        assert len(seen_high) <= 1 and len(seen_low) <= 1      # one pack per expert
        assert sum(n for n, _ in seen_high + seen_low) == len(d["indices"])
        assert sorted(high + low) == sorted((d["levels"] * 1000).tolist())
        both += bool(high) and bool(low)
    assert both, "no step had videos on both sides of the boundary"


def test_per_frame_levels_pick_by_the_noisiest_denoised_frame(tmp_path):
    """With the conditioning mix, given frames (level cond_noise) never decide; under diffusion forcing the
    video's noisiest frame does."""
    tr = _setup(tmp_path, cond_mix={"i2v": 1.0, "diffusion_forcing": 1.0, "keyframes": 1.0}, cond_noise=0.9)
    modes = set()
    for step in range(6):
        d = tr.draw(step)
        frames, start, expect = d["x0"].frames_per_video, 0, []
        for n in frames:
            lv = [1000 * float(x) for x, g in zip(d["levels"][start:start + n], d["given"][start:start + n]) if not g]
            expect.append(0 if max(lv) >= BOUNDARY else 1)
            start += n
        assert tr.expert_of(d) == expect
        modes |= set(d["modes"])
    assert {"i2v", "diffusion_forcing"} <= modes


@pytest.mark.parametrize("boundary, moved", [(0.0, "dit"), (1001.0, "dit_2")])
def test_an_expert_without_videos_keeps_its_weights(tmp_path, boundary, moved):
    if boundary > 1000:
        with pytest.raises(ValueError, match=r"boundary must be a timestep in \[0, 1000\]"):
            _setup(tmp_path, boundary=boundary)
        boundary = 1000.0   # every level < 1: all videos to dit_2
    tr = _setup(tmp_path, boundary=boundary, ema_decay=None)
    before = {k: {n: p.detach().clone() for n, p in getattr(tr, k).named_parameters()} for k in ("dit", "dit_2")}
    for step in range(2):
        tr.train_step(step)
    for k in ("dit", "dit_2"):
        changed = any(not torch.equal(p, before[k][n]) for n, p in getattr(tr, k).named_parameters())
        assert changed == (k == moved), k


def test_resume_both_experts_bit_identically(tmp_path):
    full = assert_resume_bit_identical(_setup, tmp_path)
    assert len(full["losses"]) == 6


def test_lora_of_both_experts_resumes_bit_identically(tmp_path):
    from safetensors.torch import load_file

    assert_resume_bit_identical(lambda p, n="run", **c: _setup(p, n, lora_rank=2, **c), tmp_path)
    saved = load_file(str(list_checkpoints(tmp_path / "full")[-1] / "model.safetensors"))
    assert {k.split(".")[0] for k in saved} == {"dit", "dit_2"} and all("lora_" in k for k in saved)


def test_bad_expert_arguments(tmp_path):
    dit = _dit(0)
    text = TinyTextEncoder(dim=dit.config.text_dim)
    items = [{"latent": torch.randn(4, 1, 2, 2), "caption": ""}]
    with pytest.raises(ValueError, match=r"boundary must be a timestep in \[0, 1000\] .* got None"):
        Trainer(dit, text, items, TrainConfig(), tmp_path / "a", dit_2=_dit(1))
    with pytest.raises(ValueError, match=r"boundary=500.0 is where dit_2 takes over from dit; without dit_2"):
        Trainer(dit, text, items, TrainConfig(), tmp_path / "b", boundary=500.0)
    wide = VideoDiT(type(dit.config)(**{**vars(dit.config), "num_layers": dit.config.num_layers + 1}))
    with pytest.raises(ValueError, match=r"dit_2 must have dit's configuration"):
        Trainer(dit, text, items, TrainConfig(), tmp_path / "c", dit_2=wide, boundary=500.0)
