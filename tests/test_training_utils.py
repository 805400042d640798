"""Training building blocks: flow matching, LoRA, EMA, checkpoints, metrics — on small stand-in modules."""
import copy
import dataclasses
import io
import json
import math
import os
import random
import shutil
import sys

import numpy as np
import pytest
import torch
from torch import nn

from sora_fast.models.dit import DiTConfig, VideoDiT
from sora_fast.packing import pack_sequences, pack_videos
from sora_fast.training import (
    EMA,
    LoRALinear,
    MetricsLogger,
    ProgressBar,
    StateDictMismatchError,
    add_noise,
    apply_lora,
    check_writable,
    flow_matching_loss,
    flow_target,
    latest_checkpoint,
    list_checkpoints,
    load_checkpoint,
    load_lora,
    lora_state_dict,
    merge_lora,
    plot_loss_curve,
    read_metrics,
    remove_lora,
    resolution_shift,
    sample_timesteps,
    save_checkpoint,
    sequence_mse,
    shift_sigmas,
    sigma_schedule,
)
from sora_fast.training import checkpoint as ckpt_mod
from sora_fast.training.flow import BASE_SHIFT, BASE_TOKENS, MAX_SHIFT, MAX_TOKENS

# ----------------------------------------------------------------------------------------------
# a small stand-in for a DiT: attention q/k/v/o, an FFN, a time embedding, dropout, a buffer


class _Attn(nn.Module):
    def __init__(self, d):
        super().__init__()
        self.q, self.k, self.v, self.o = (nn.Linear(d, d) for _ in range(4))

    def forward(self, x):  # (N, D), one sequence
        a = torch.softmax(self.q(x) @ self.k(x).T / math.sqrt(x.shape[1]), dim=-1)
        return self.o(a @ self.v(x))


class _Block(nn.Module):
    def __init__(self, d, p_drop):
        super().__init__()
        self.norm = nn.LayerNorm(d)
        self.attn = _Attn(d)
        self.ffn = nn.Sequential(nn.Linear(d, 2 * d), nn.GELU(approximate="tanh"), nn.Linear(2 * d, d))
        self.drop = nn.Dropout(p_drop)

    def forward(self, x):
        x = x + self.attn(self.norm(x))
        return x + self.drop(self.ffn(x))


class Toy(nn.Module):
    def __init__(self, c=6, d=16, depth=2, p_drop=0.0):
        super().__init__()
        self.embed = nn.Linear(c, d)
        self.time = nn.Linear(1, d)
        self.blocks = nn.ModuleList(_Block(d, p_drop) for _ in range(depth))
        self.head = nn.Linear(d, c)
        self.register_buffer("calls", torch.zeros((), dtype=torch.int64))

    def forward(self, x, t=None):  # x (N, C), t (N,) -> (N, C)
        h = self.embed(x)
        if t is not None:
            h = h + self.time(t[:, None].to(h.dtype))
        for blk in self.blocks:
            h = blk(h)
        if self.training:
            self.calls += 1
        return self.head(h)


def _packed(lens, c=6):
    seq_ids = torch.repeat_interleave(torch.arange(len(lens), dtype=torch.int32), torch.tensor(lens))
    return torch.randn(sum(lens), c), seq_ids


# ----------------------------------------------------------------------------------------------
# flow matching


def test_loss_matches_per_sequence_loop_and_its_gradient():
    lens = [1, 17, 113, 4, 799 % 50]
    x0, seq_ids = _packed(lens, c=13)
    noise = torch.randn_like(x0)
    pred = torch.randn_like(x0, requires_grad=True)
    loss = flow_matching_loss(pred, x0, noise, seq_ids, len(lens))
    loss.backward()

    pred64 = pred.detach().double().requires_grad_(True)
    target = noise.double() - x0.double()
    per_seq = [((p - t) ** 2).mean() for p, t in zip(pred64.split(lens), target.split(lens))]
    ref = torch.stack(per_seq).mean()
    ref.backward()
    torch.testing.assert_close(loss.double(), ref, atol=1e-6, rtol=1e-6)
    torch.testing.assert_close(pred.grad.double(), pred64.grad, atol=1e-9, rtol=1e-5)

    # per-token weighting is the plain mean; the two differ on uneven lengths
    tok = flow_matching_loss(pred, x0, noise, seq_ids, len(lens), weighting="token")
    torch.testing.assert_close(tok.double(), ((pred64 - target) ** 2).mean(), atol=1e-6, rtol=1e-6)
    assert abs(tok.item() - loss.item()) > 1e-4

    # an empty sequence (id 5 never used) is left out of the mean
    with_empty = flow_matching_loss(pred, x0, noise, seq_ids, len(lens) + 1)
    torch.testing.assert_close(with_empty, loss)
    mse, counts = sequence_mse(pred, flow_target(x0, noise), seq_ids, len(lens) + 1)
    assert counts.tolist() == [*lens, 0] and mse[-1].item() == 0.0

    with pytest.raises(ValueError, match="weighting"):
        flow_matching_loss(pred, x0, noise, seq_ids, len(lens), weighting="video")
    with pytest.raises(ValueError, match=r"seq_ids must be \(%d,\)" % sum(lens)):
        flow_matching_loss(pred, x0, noise, seq_ids[1:], len(lens))
    with pytest.raises(ValueError, match="num_seqs"):
        flow_matching_loss(pred, x0, noise, seq_ids, 0)


def test_add_noise_interpolates_and_target_is_its_velocity():
    lens = [3, 1, 8]
    x0, seq_ids = _packed(lens)
    noise = torch.randn_like(x0)
    t_seq = torch.rand(len(lens), dtype=torch.float64)
    t = t_seq[seq_ids.long()]
    xt = add_noise(x0.double(), noise.double(), t)
    torch.testing.assert_close(xt, (1 - t[:, None]) * x0.double() + t[:, None] * noise.double())
    assert torch.equal(add_noise(x0, noise, torch.zeros(len(x0))), x0)
    assert torch.equal(add_noise(x0, noise, torch.ones(len(x0), 1)), noise)
    h = 1e-3  # dx_t/dt = eps - x0 (exactly linear, so the finite difference is exact up to rounding)
    fd = (add_noise(x0.double(), noise.double(), t + h) - xt) / h
    torch.testing.assert_close(fd, flow_target(x0.double(), noise.double()), atol=1e-9, rtol=1e-9)
    assert add_noise(x0.bfloat16(), noise.bfloat16(), t).dtype == torch.bfloat16
    with pytest.raises(ValueError, match="t must be per-token"):
        add_noise(x0, noise, t_seq)


def _normal_cdf(x):
    return 0.5 * (1 + torch.erf(x / math.sqrt(2)))


def _ks_bound(n, p_fail=1e-6):
    # Kolmogorov: P(sqrt(n) D > x) <= 2 exp(-2 x^2) (Dvoretzky-Kiefer-Wolfowitz, Massart's constant)
    return math.sqrt(math.log(2 / p_fail) / 2) / math.sqrt(n)


def _ks_stat(samples, cdf):
    x, _ = torch.sort(samples.double())
    n = x.numel()
    f = cdf(x)
    i = torch.arange(1, n + 1, dtype=torch.float64)
    return torch.maximum(i / n - f, f - (i - 1) / n).max().item()


def test_timesteps_are_logit_normal_shifted_per_sequence():
    n = 20000
    mean, std = -0.3, 1.2
    gen = torch.Generator().manual_seed(random.randrange(2**31))
    t = sample_timesteps(n, generator=gen, mean=mean, std=std)
    assert t.shape == (n,) and t.dtype == torch.float32 and bool(((t >= 0) & (t <= 1)).all())
    logit = torch.logit(t.double())
    assert _ks_stat(logit, lambda x: _normal_cdf((x - mean) / std)) < _ks_bound(n)
    # a wrong distribution fails the same test (the check has power)
    assert _ks_stat(logit, lambda x: _normal_cdf((x - mean - 0.2) / std)) > _ks_bound(n)

    # shift s adds log(s) in logit space: logit(s·σ/(1+(s−1)σ)) = logit(σ) + log s. One shift per sequence.
    shifts = torch.tensor([1.0, 3.0, 7.5, 0.5]).repeat_interleave(n // 4)
    ts = sample_timesteps(n, generator=gen, mean=mean, std=std, shift=shifts)
    for s in shifts.unique().tolist():
        sel = torch.logit(ts[shifts == s].double())
        assert _ks_stat(sel, lambda x: _normal_cdf((x - mean - math.log(s)) / std)) < _ks_bound(sel.numel())

    # reproducible with a generator
    g1, g2 = torch.Generator().manual_seed(7), torch.Generator().manual_seed(7)
    assert torch.equal(sample_timesteps(5, generator=g1, shift=2.0), sample_timesteps(5, generator=g2, shift=2.0))
    with pytest.raises(ValueError, match=r"shift must be .* \(5,\) tensor, got shape \(4,\)"):
        sample_timesteps(5, shift=torch.ones(4))
    with pytest.raises(ValueError, match="std"):
        sample_timesteps(5, std=0.0)


def test_shift_fixed_points_and_monotonicity():
    sigma = torch.linspace(0, 1, 1001, dtype=torch.float64)
    prev = None
    for s in (0.25, 1.0, 1.5, 3.0, 12.0):
        out = shift_sigmas(sigma, s)
        assert out[0].item() == 0.0 and out[-1].item() == 1.0
        assert bool((out.diff() > 0).all())
        if s == 1.0:
            assert torch.equal(out, sigma)
        if prev is not None:  # larger shift -> more noise at every interior sigma
            assert bool((out[1:-1] > prev[1:-1]).all())
        prev = out
    assert isinstance(shift_sigmas(0.5, 3.0), float) and shift_sigmas(0.5, 3.0) == pytest.approx(0.75)
    for bad in (0.0, -1.0, float("nan"), float("inf")):
        with pytest.raises(ValueError, match="shift must be"):
            shift_sigmas(sigma, bad)
    with pytest.raises(ValueError, match="shift must be finite and > 0"):
        shift_sigmas(sigma, torch.tensor([1.0, 0.0]))


def test_resolution_shift_anchors_monotonic_and_clamped():
    assert resolution_shift(BASE_TOKENS) == pytest.approx(BASE_SHIFT)
    assert resolution_shift(MAX_TOKENS) == pytest.approx(MAX_SHIFT)
    assert resolution_shift(1) == pytest.approx(BASE_SHIFT) and resolution_shift(10**7) == pytest.approx(MAX_SHIFT)
    assert resolution_shift(4096) == pytest.approx(math.exp(1.15), rel=0.03)  # Flux at 1024x1024
    n = torch.tensor([1, 256, 1000, 4096, 16384, 32760, 80000])
    s = resolution_shift(n)
    assert s.dtype == torch.float32 and bool((s.diff() >= 0).all())
    torch.testing.assert_close(s, torch.tensor([resolution_shift(int(v)) for v in n]))
    custom = resolution_shift(400, base_tokens=100, base_shift=1.0, max_tokens=1600, max_shift=4.0)
    assert custom == pytest.approx(2.0)  # power law: sqrt(400/100) with exponent 1/2 through these anchors
    with pytest.raises(ValueError, match="max_tokens must be > base_tokens"):
        resolution_shift(10, base_tokens=100, max_tokens=100)
    with pytest.raises(ValueError, match="num_tokens must be >= 1"):
        resolution_shift(torch.tensor([4, 0]))


def test_sigma_schedule_endpoints_monotonic_per_sequence():
    for steps, shift in ((1, 1.0), (7, 1.0), (50, 5.0), (30, 0.7)):
        sig = sigma_schedule(steps, shift)
        assert sig.shape == (steps + 1,) and sig.dtype == torch.float32
        assert sig[0].item() == 1.0 and sig[-1].item() == 0.0
        assert bool((sig.diff() < 0).all())
    assert torch.equal(sigma_schedule(4), torch.tensor([1.0, 0.75, 0.5, 0.25, 0.0]))
    shifts = torch.tensor([1.0, 3.0, 5.0])
    per_seq = sigma_schedule(20, shifts)
    assert per_seq.shape == (3, 21)
    for row, s in zip(per_seq, shifts.tolist()):
        assert torch.equal(row, sigma_schedule(20, s))
    with pytest.raises(ValueError, match="steps must be an int >= 1, got 0"):
        sigma_schedule(0)


# ----------------------------------------------------------------------------------------------
# LoRA


def test_lora_initial_output_exact_only_adapters_train_and_merge():
    model = Toy(depth=2).eval()
    x = torch.randn(29, 6)
    t = torch.rand(29)
    base_out = model(x, t)
    base_sd = {k: v.clone() for k, v in model.state_dict().items()}

    names = apply_lora(model, rank=4, alpha=8)
    expected = [f"blocks.{i}.{m}" for i in range(2) for m in ("attn.q", "attn.k", "attn.v", "attn.o", "ffn.0", "ffn.2")]
    assert sorted(names) == sorted(expected)
    assert isinstance(model.blocks[0].attn.q, LoRALinear) and type(model.embed) is nn.Linear
    assert torch.equal(model(x, t), base_out)  # B = 0: exactly the base
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable == {f"{n}.lora_{ab}.weight" for n in expected for ab in "AB"}
    # base keys are unchanged, so base checkpoints still load
    assert set(base_sd) <= set(model.state_dict())

    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    model.train()
    for _ in range(3):
        loss = (model(x, t) - torch.randn(29, 6)).pow(2).mean()
        loss.backward()
        opt.step()
        opt.zero_grad()
    model.eval()
    tuned = model(x, t)
    assert (tuned - base_out).abs().max() > 1e-3
    for k, v in base_sd.items():  # the frozen base never moved
        if k != "calls":
            assert torch.equal(model.state_dict()[k], v), k

    merged = merge_lora(model)
    assert sorted(merged) == sorted(expected)
    assert not any(isinstance(m, LoRALinear) for m in model.modules())
    assert set(model.state_dict()) == set(base_sd)
    torch.testing.assert_close(model(x, t), tuned, atol=1e-5, rtol=1e-5)


def test_lora_state_dict_round_trip_and_errors(tmp_path):
    from safetensors.torch import load_file, save_file

    base = Toy(depth=1).eval()
    x = torch.randn(11, 6)
    model = copy.deepcopy(base)
    apply_lora(model, rank=3, alpha=12.0, targets=("attn.*",), dropout=0.1)
    with torch.no_grad():
        for n, p in model.named_parameters():
            if "lora_B" in n:
                p.normal_()
    sd = lora_state_dict(model)
    assert set(sd) == {f"blocks.0.attn.{m}.lora_{k}" for m in "qkvo" for k in ("A.weight", "B.weight", "alpha")}
    save_file({k: v.contiguous() for k, v in sd.items()}, str(tmp_path / "lora.safetensors"))

    other = copy.deepcopy(base)
    apply_lora(other, rank=3, targets=("attn.*",))  # alpha comes from the file
    load_lora(other, load_file(str(tmp_path / "lora.safetensors")))
    model.eval(), other.eval()
    assert torch.equal(other(x), model(x))

    removed = copy.deepcopy(other)
    remove_lora(removed)
    assert torch.equal(removed(x), base(x))

    wrong_rank = copy.deepcopy(base)
    apply_lora(wrong_rank, rank=2, targets=("attn.*",))
    with pytest.raises(StateDictMismatchError, match=r"blocks\.0\.attn\.q\.lora_A\.weight "
                                                     r"\(expected \(2, 16\), got \(3, 16\)\)"):
        load_lora(wrong_rank, sd)
    fewer = copy.deepcopy(base)
    apply_lora(fewer, rank=3, targets=("q",))
    with pytest.raises(StateDictMismatchError, match=r"unexpected \(9\): blocks\.0\.attn\.k\.lora_A\.weight"):
        load_lora(fewer, sd)

    with pytest.raises(ValueError, match="rank must be an int >= 1, got 0"):
        apply_lora(copy.deepcopy(base), rank=0)
    with pytest.raises(ValueError, match=r"no nn.Linear matches targets=\('to_q',\).*embed, time, blocks\.0\.attn\.q"):
        apply_lora(copy.deepcopy(base), rank=2, targets=("to_q",))
    with pytest.raises(ValueError, match="already has 4 LoRA layers"):
        apply_lora(model, rank=2)
    with pytest.raises(ValueError, match="dropout"):
        apply_lora(copy.deepcopy(base), rank=2, dropout=1.0)
    with pytest.raises(ValueError, match="no LoRA layers"):
        lora_state_dict(base)


# ----------------------------------------------------------------------------------------------
# EMA


@pytest.mark.parametrize("warmup", [0.0, 5.0])
def test_ema_matches_hand_loop(warmup):
    model = nn.Sequential(nn.Linear(5, 7), nn.BatchNorm1d(7), nn.Linear(7, 3))
    model[2].bias.requires_grad_(False)  # frozen: not averaged
    decay = 0.9
    ema = EMA(model, decay, warmup=warmup)
    assert "2.bias" not in ema.params and set(ema.buffers) == {"1.running_mean", "1.running_var",
                                                               "1.num_batches_tracked"}
    hand = {n: p.detach().double().clone() for n, p in model.named_parameters() if p.requires_grad}
    for i in range(12):
        with torch.no_grad():
            for p in model.parameters():
                p.add_(torch.randn_like(p))
        model(torch.randn(4, 5))  # moves the BatchNorm buffers
        d = decay if warmup == 0 else min(decay, i / (i + warmup))
        assert ema.current_decay() == pytest.approx(d)
        ema.update()
        for n, p in model.named_parameters():
            if p.requires_grad:
                hand[n] = d * hand[n] + (1 - d) * p.detach().double()
    for n, s in ema.params.items():
        assert s.dtype == torch.float32
        torch.testing.assert_close(s.double(), hand[n], atol=1e-5, rtol=1e-5)
    for n, b in model.named_buffers():
        assert torch.equal(ema.buffers[n], b)


def test_ema_swapped_copy_to_state_dict():
    model = Toy(depth=1).to(torch.bfloat16)
    ema = EMA(model, 0.5)
    assert all(s.dtype == torch.float32 for s in ema.params.values())
    with torch.no_grad():
        for p in model.parameters():
            p.add_(1.0)
    ema.update()
    trained = {k: v.clone() for k, v in model.state_dict().items()}
    with ema.swapped() as m:
        assert m is model
        for n, p in model.named_parameters():
            assert torch.equal(p, ema.params[n].to(p.dtype))
    assert all(torch.equal(model.state_dict()[k], v) for k, v in trained.items())
    with pytest.raises(RuntimeError, match="boom"):
        with ema.swapped():
            raise RuntimeError("boom")
    assert all(torch.equal(model.state_dict()[k], v) for k, v in trained.items())

    other = Toy(depth=1).to(torch.bfloat16)
    ema2 = EMA(other, 0.5)
    ema2.load_state_dict(ema.state_dict())
    assert ema2.num_updates == 1 and all(torch.equal(ema2.params[n], s) for n, s in ema.params.items())
    ema2.copy_to()
    for n, p in other.named_parameters():
        assert torch.equal(p, ema.params[n].to(p.dtype))
    with pytest.raises(StateDictMismatchError, match=r"params\.head\.weight \(expected \(6, 16\), got \(6, 8\)\)"):
        EMA(Toy(d=16, depth=1)).load_state_dict(EMA(Toy(d=8, depth=1)).state_dict())
    with pytest.raises(ValueError, match="decay must be a number in"):
        EMA(model, 1.5)


# ----------------------------------------------------------------------------------------------
# checkpoints


CONFIG = {"c": 6, "d": 16, "depth": 2, "p_drop": 0.1}


def _setup(seed, config=CONFIG):
    torch.manual_seed(seed)
    model = Toy(**config)
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3, betas=(0.9, 0.95), weight_decay=0.01)
    ema = EMA(model, 0.9, warmup=2)
    gen = torch.Generator().manual_seed(seed + 1)
    return model, opt, ema, gen


def _train(model, opt, ema, gen, steps):
    """Steps that draw from every RNG: python (lengths), numpy (a scale), torch (data, dropout), a generator."""
    losses = []
    model.train()
    for _ in range(steps):
        lens = [random.randint(1, 9) for _ in range(3)]
        x0, seq_ids = _packed(lens)
        x0 = x0 * float(np.random.uniform(0.5, 1.5))
        noise = torch.randn_like(x0)
        t = sample_timesteps(len(lens), generator=gen, shift=resolution_shift(torch.tensor(lens)))
        tt = t[seq_ids.long()]
        loss = flow_matching_loss(model(add_noise(x0, noise, tt), tt), x0, noise, seq_ids, len(lens))
        loss.backward()
        opt.step()
        opt.zero_grad()
        ema.update()
        losses.append(loss.item())
    return losses


def _snapshot(model, ema):
    return ({k: v.clone() for k, v in model.state_dict().items()}, {k: v.clone() for k, v in ema.params.items()})


def test_checkpoint_resume_is_bit_identical(tmp_path):
    run = tmp_path / "run"
    model, opt, ema, gen = _setup(0)
    _train(model, opt, ema, gen, 3)
    path = save_checkpoint(run, model=model, optimizer=opt, ema=ema, generators={"t": gen},
                           state={"step": 3, "config": CONFIG, "metrics": {"loss": 0.5, "nan": float("nan")},
                                  "odd": {0: (1, 2), "arr": np.arange(3), "dt": torch.float16, "w": torch.ones(2)}})
    assert path == run / "step_000003" and (run / "latest").read_text().strip() == "step_000003"
    assert sorted(p.name for p in path.iterdir()) == sorted(
        ["model.safetensors", "optimizer.safetensors", "ema.safetensors", "extra.safetensors", "state.json",
         "complete"])
    expected_losses = _train(model, opt, ema, gen, 3)
    expected = _snapshot(model, ema)

    # a different init and different RNG states, then resume
    model2, opt2, ema2, gen2 = _setup(123)
    random.seed(99), np.random.seed(99), torch.manual_seed(99)
    state = load_checkpoint(run, model2, opt2, ema2, config=CONFIG, generators={"t": gen2})
    assert state["step"] == 3 and state["config"] == CONFIG and math.isnan(state["metrics"]["nan"])
    assert state["odd"][0] == (1, 2) and state["odd"]["dt"] is torch.float16
    assert state["odd"]["arr"].tolist() == [0, 1, 2] and torch.equal(state["odd"]["w"], torch.ones(2))
    assert ema2.num_updates == 3 and opt2.param_groups[0]["betas"] == (0.9, 0.95)
    losses = _train(model2, opt2, ema2, gen2, 3)
    assert losses == expected_losses
    got = _snapshot(model2, ema2)
    for a, b in zip(got, expected):
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_checkpoint_crash_mid_save_keeps_previous(tmp_path, monkeypatch):
    run = tmp_path / "run"
    model, opt, ema, gen = _setup(1)
    _train(model, opt, ema, gen, 1)
    save_checkpoint(run, model=model, optimizer=opt, ema=ema, state={"step": 1})
    saved = {k: v.clone() for k, v in model.state_dict().items()}
    _train(model, opt, ema, gen, 1)

    real = ckpt_mod._write_tensors

    def failing(path, tensors):
        if path.name == "optimizer.safetensors":
            real(path, tensors)  # the file lands, then the "power goes out"
            raise OSError(28, "No space left on device")
        real(path, tensors)

    monkeypatch.setattr(ckpt_mod, "_write_tensors", failing)
    with pytest.raises(OSError, match="No space left"):
        save_checkpoint(run, model=model, optimizer=opt, ema=ema, state={"step": 2})
    monkeypatch.undo()
    assert [p.name for p in list_checkpoints(run)] == ["step_000001"]
    assert not (run / "step_000002").exists()
    assert not [p for p in run.iterdir() if p.name.startswith(".tmp-")]

    # a hard crash leaves a half-written step directory: never picked up
    partial = run / "step_000002"
    partial.mkdir()
    (partial / "model.safetensors").write_bytes(b"\0" * 10)
    assert latest_checkpoint(run) == run / "step_000001"
    with pytest.raises(FileNotFoundError, match="incomplete"):
        load_checkpoint(partial, model)
    # a crash after the rename but before `latest` moved: latest still names step 1
    shutil.rmtree(partial)
    real_text = ckpt_mod._write_text

    def pointer_fails(path, text):
        if path.name == "latest":
            raise OSError("crash before the pointer moved")
        real_text(path, text)

    monkeypatch.setattr(ckpt_mod, "_write_text", pointer_fails)
    with pytest.raises(OSError, match="crash"):
        save_checkpoint(run, model=model, optimizer=opt, ema=ema, state={"step": 3})
    monkeypatch.undo()
    assert (run / "step_000003" / "complete").is_file() and latest_checkpoint(run) == run / "step_000001"

    fresh, opt2, ema2, _ = _setup(5)
    state = load_checkpoint(run, fresh, opt2, ema2)
    assert state["step"] == 1
    assert all(torch.equal(fresh.state_dict()[k], v) for k, v in saved.items())

    # keep_last prunes the oldest, and re-saving a step replaces it
    for step in (4, 5, 6):
        save_checkpoint(run, model=model, state={"step": step}, keep_last=2)
    assert [p.name for p in list_checkpoints(run)] == ["step_000005", "step_000006"]
    save_checkpoint(run, model=fresh, state={"step": 6, "again": True}, keep_last=2)
    assert load_checkpoint(run, model)["again"] is True
    with pytest.raises(ValueError, match="optimizer state was requested"):
        load_checkpoint(run, model, opt2)


def test_checkpoint_config_mismatch_lists_tensors_and_leaves_model_untouched(tmp_path):
    model, opt, ema, gen = _setup(2)
    save_checkpoint(tmp_path, model=model, state={"step": 0, "config": CONFIG})
    big_cfg = {**CONFIG, "d": 24}
    big = Toy(**big_cfg)
    before = {k: v.clone() for k, v in big.state_dict().items()}
    with pytest.raises(StateDictMismatchError) as info:
        load_checkpoint(tmp_path, big, config=big_cfg)
    msg = str(info.value)
    assert "config.d: checkpoint has 16, expected 24" in msg
    assert "blocks.0.attn.q.weight (model (24, 24), checkpoint (16, 16))" in msg
    n_bad = sum(v.shape != model.state_dict()[k].shape for k, v in big.state_dict().items())
    assert f"shape mismatch ({n_bad}): blocks.0." in msg and f"({n_bad - 20} more)" in msg
    assert all(torch.equal(big.state_dict()[k], v) for k, v in before.items())
    deeper = Toy(**{**CONFIG, "depth": 3})
    with pytest.raises(StateDictMismatchError, match=r"missing \(\d+\): blocks\.2\.attn\.k\.bias"):
        load_checkpoint(tmp_path, deeper)
    with pytest.raises(FileNotFoundError, match="no complete checkpoint"):
        load_checkpoint(tmp_path / "nowhere", model)


def test_unwritable_output_dir_fails_early(tmp_path):
    blocker = tmp_path / "file.txt"
    blocker.write_text("x")
    with pytest.raises(OSError, match=r"output directory .*file\.txt/run.* is not writable"):
        check_writable(blocker / "run")
    with pytest.raises(OSError, match="is not writable"):
        save_checkpoint(blocker / "run", model=Toy(), state={"step": 0})
    if os.geteuid() != 0:  # root ignores permission bits
        ro = tmp_path / "ro"
        ro.mkdir()
        ro.chmod(0o500)
        try:
            with pytest.raises(PermissionError, match="is not writable"):
                check_writable(ro)
        finally:
            ro.chmod(0o700)
    assert check_writable(tmp_path / "a" / "b") == tmp_path / "a" / "b"
    with pytest.raises(ValueError, match=r"state\['step'\] must be an int >= 0, got -1"):
        save_checkpoint(tmp_path, model=Toy(), state={"step": -1})
    with pytest.raises(TypeError, match=r"cannot store state\.bad of type object"):
        save_checkpoint(tmp_path, model=Toy(), state={"step": 0, "bad": object()})
    assert not list_checkpoints(tmp_path)


# ----------------------------------------------------------------------------------------------
# metrics


def test_metrics_jsonl_progress_and_plot(tmp_path):
    path = tmp_path / "logs" / "metrics.jsonl"
    log = MetricsLogger(path)
    for step in range(1, 31):
        log.log(step, loss=torch.tensor(1.0 / step), lr=1e-4, tokens=100 * step)
        assert len(path.read_text().splitlines()) == step  # flushed at every write
    log.close()
    with MetricsLogger(path) as log2:  # a resumed run appends, repeating step 30
        log2.log(30, {"loss": 0.01})
    with open(path, "a") as f:
        f.write('{"step": 31, "lo')  # a line cut by a crash
    recs = read_metrics(path)
    assert [r["step"] for r in recs] == list(range(1, 31)) and recs[-1]["loss"] == 0.01
    assert json.loads(path.read_text().splitlines()[0])["loss"] == 1.0

    png = plot_loss_curve(path, tmp_path / "plots" / "loss.png")
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and png.stat().st_size > 5000
    with pytest.raises(ValueError, match="no numeric 'grad_norm' values"):
        plot_loss_curve(path, tmp_path / "x.png", key="grad_norm")

    out = io.StringIO()
    bar = ProgressBar(10, file=out, print_every=5, desc="train")
    for _ in range(10):
        bar.update(loss=0.5, tokens=1000)
    summary = bar.close()
    lines = out.getvalue().splitlines()
    assert len(lines) == 3 and lines[0].startswith("train 5/10 loss 0.5000 tok/s") and "eta" in lines[0]
    assert lines[-1] == summary and summary.startswith("train: 10 steps in") and "10,000 tokens" in summary

    class _Terminal(io.StringIO):
        def isatty(self):
            return True

    term = _Terminal()
    bar = ProgressBar(5, initial=1, file=term)  # tqdm on a terminal
    for _ in range(4):
        bar.update(loss=0.25, tokens=10, lr=1e-4)
    assert bar.close().startswith("train: 4 steps in")
    assert "5/5" in term.getvalue() and "loss=0.2500" in term.getvalue() and "lr=0.0001" in term.getvalue()
    quiet = io.StringIO()
    bar = ProgressBar(4, file=quiet, disable=True)
    bar.update(loss=1.0)
    bar.close()
    assert quiet.getvalue() == ""


def test_plot_without_matplotlib_says_what_to_install(tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "matplotlib.figure", None)
    (tmp_path / "m.jsonl").write_text('{"step": 1, "loss": 1.0}\n')
    with pytest.raises(ImportError, match="pip install matplotlib"):
        plot_loss_curve(tmp_path / "m.jsonl", tmp_path / "m.png")


# ----------------------------------------------------------------------------------------------
# the real model: LoRA targets, a flow-matching step, a checkpoint with its dataclass config


def test_video_dit_lora_flow_step_and_checkpoint(tmp_path):
    cfg = DiTConfig(dim=24, ffn_dim=40, num_heads=2, num_layers=2, in_channels=4, out_channels=4,
                        text_dim=8, freq_dim=16)
    model = VideoDiT(cfg)
    with torch.no_grad():  # away from adaLN-zero, so every layer matters
        for p in model.parameters():
            p.add_(0.1 * torch.randn_like(p))
    model.eval()
    x = pack_videos([torch.randn(4, 1, 6, 4), torch.randn(4, 3, 4, 6)], cfg.patch)
    text = pack_sequences([torch.randn(3, 8), torch.randn(0, 8)])
    t = torch.tensor([0.3, 0.8])
    base = model(x, t * 1000, text)

    names = apply_lora(model, rank=4)
    per_block = {f"{a}.{p}" for a in ("attn1", "attn2")
                 for p in ("to_q", "to_k", "to_v", "to_out")} | {"ffn.0", "ffn.2"}
    assert set(names) == {f"blocks.{i}.{n}" for i in range(2) for n in per_block}
    assert torch.equal(model(x, t * 1000, text), base)

    model.train()
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    ema = EMA(model, 0.9)
    noise = torch.randn_like(x.tokens)
    for _ in range(2):
        tt = t[x.seq_ids.long()]
        pred = model(x.with_tokens(add_noise(x.tokens, noise, tt)), t * 1000, text)
        loss = flow_matching_loss(pred, x.tokens, noise, x.seq_ids, x.num_sequences)
        loss.backward()
        opt.step()
        opt.zero_grad()
        ema.update()
    model.eval()
    tuned = model(x, t * 1000, text)
    assert (tuned - base).abs().max() > 1e-4

    save_checkpoint(tmp_path, model=model, optimizer=opt, ema=ema, state={"step": 2, "config": cfg})
    merge_lora(model)
    torch.testing.assert_close(model(x, t * 1000, text), tuned, atol=1e-4, rtol=1e-4)

    other = VideoDiT(cfg)
    apply_lora(other, rank=4)
    state = load_checkpoint(tmp_path, other, config=cfg)
    assert state["config"]["dim"] == 24
    other.eval()
    assert torch.equal(other(x, t * 1000, text), tuned)
    wider_cfg = dataclasses.replace(cfg, ffn_dim=48)
    wider = VideoDiT(wider_cfg)
    apply_lora(wider, rank=4)
    with pytest.raises(StateDictMismatchError) as info:
        load_checkpoint(tmp_path, wider, config=wider_cfg)
    assert "config.ffn_dim: checkpoint has 40, expected 48" in str(info.value)
    assert "blocks.0.ffn.0.bias (model (48,), checkpoint (40,))" in str(info.value)
