"""Training with a conditioning mix: per-frame levels, given frames left out of the loss, resume, config."""
import copy
import json
import math

import pytest
import torch
from _utils import assert_resume_bit_identical

from sora_fast.models.dit import VideoDiT
from sora_fast.models.text import TinyTextEncoder
from sora_fast.packing import frame_ids, pack_videos
from sora_fast.training.flow import flow_matching_loss, token_levels
from sora_fast.training.trainer import COND_MODES, TrainConfig, Trainer, config_from_dict, draw_conditioning

SHAPES = [(4, 1, 4, 6), (4, 3, 2, 4), (4, 2, 6, 2), (4, 1, 2, 2), (4, 4, 4, 4)]   # images and videos
CAPTIONS = ["a red circle", "blue square up", "green", "", "a yellow dot moving left fast"]
MIX = {m: 1.0 for m in COND_MODES}


def _setup(tmp_path, name="run", **cfg):
    torch.manual_seed(0)
    dit = VideoDiT.from_name("tiny")
    for p in dit.parameters():          # the tiny preset's zero-init head would make every loss equal
        torch.nn.init.normal_(p, std=0.05)
    text = TinyTextEncoder(dim=dit.config.text_dim)
    items = [{"latent": torch.randn(s, generator=torch.Generator().manual_seed(i)), "caption": c}
             for i, (s, c) in enumerate(zip(SHAPES, CAPTIONS))]
    base = dict(steps=6, token_budget=40, lr=1e-3, warmup_steps=2, save_every=3, log_every=1, seed=3,
                cond_mix=MIX, cond_frames=2, cond_noise=0.05)
    base.update(cfg)
    return Trainer(dit, text, items, TrainConfig(**base), tmp_path / name, model_config={"dit": "tiny"},
                   progress=False)


def _given_of(given, frames):
    return [g.tolist() for g in torch.split(given, frames)]


# --- the draw -------------------------------------------------------------------------------------
@pytest.mark.parametrize("mode", list(COND_MODES))
def test_each_mode_gives_its_frames(mode):
    frames = [1, 2, 3, 5]
    t = torch.tensor([0.3, 0.5, 0.7, 0.9])
    modes, levels, given = draw_conditioning(frames, t, 1.0, {mode: 1.0}, cond_frames=2, cond_noise=0.1,
                                             generator=torch.Generator().manual_seed(1))
    per = _given_of(given, frames)
    lv = torch.split(levels, frames)
    for j, n in enumerate(frames):
        # too short for the mode (an image always is): text-to-video
        eff = mode if n >= COND_MODES[mode] else "t2v"
        assert modes[j] == eff
        g = per[j]
        assert not all(g), "every video keeps a frame to denoise"
        expect = {"t2v": [False] * n, "diffusion_forcing": [False] * n,
                  "i2v": [True] + [False] * (n - 1),
                  "interpolate": [True] + [False] * (n - 2) + [True] if n >= 3 else None}.get(eff)
        if expect is not None:
            assert g == expect, (mode, n, g)
        if eff == "extend_forward":
            k = sum(g)
            assert 1 <= k <= min(2, n - 1) and g == [True] * k + [False] * (n - k)
        if eff == "extend_backward":
            k = sum(g)
            assert 1 <= k <= min(2, n - 1) and g == [False] * (n - k) + [True] * k
        if eff == "keyframes":
            assert 1 <= sum(g) <= n - 1
        for f in range(n):
            if g[f]:
                assert lv[j][f].item() == pytest.approx(0.1)
            elif eff != "diffusion_forcing":
                assert lv[j][f].item() == t[j].item()
        if eff == "diffusion_forcing":
            assert len(set(lv[j].tolist())) == n          # independent levels
            assert all(0 < v < 1 for v in lv[j].tolist())


def test_draw_is_a_function_of_the_generator_and_default_draws_nothing():
    frames, t = [1, 4, 3, 2], torch.tensor([0.2, 0.4, 0.6, 0.8])
    a = draw_conditioning(frames, t, torch.full((4,), 2.0), MIX, 3, 0.0, torch.Generator().manual_seed(5))
    b = draw_conditioning(frames, t, torch.full((4,), 2.0), MIX, 3, 0.0, torch.Generator().manual_seed(5))
    assert a[0] == b[0] and torch.equal(a[1], b[1]) and torch.equal(a[2], b[2])
    g = torch.Generator().manual_seed(5)
    state = g.get_state()
    modes, levels, given = draw_conditioning(frames, t, 1.0, {"t2v": 1.0, "i2v": 0.0}, generator=g)
    assert torch.equal(g.get_state(), state)                              # pure t2v: no draw
    assert modes == ["t2v"] * 4 and not given.any()
    assert torch.equal(levels, t[torch.tensor([0, 1, 1, 1, 1, 2, 2, 2, 3, 3])])


def test_many_draws_follow_the_mix():
    frames = [4] * 400
    modes, _, given = draw_conditioning(frames, torch.rand(400), 1.0, {"i2v": 3.0, "keyframes": 1.0},
                                        generator=torch.Generator().manual_seed(0))
    share = modes.count("i2v") / 400
    assert abs(share - 0.75) < 4 * math.sqrt(0.75 * 0.25 / 400)
    assert set(modes) == {"i2v", "keyframes"}


# --- the loss ---------------------------------------------------------------------------------------
def test_masked_loss_ignores_given_tokens_exactly():
    g = torch.Generator().manual_seed(0)
    x = pack_videos([torch.randn(4, 3, 2, 4, generator=g), torch.randn(4, 1, 2, 2, generator=g)], (1, 2, 2))
    n, d = x.tokens.shape
    mask = torch.ones(n, dtype=torch.bool)
    mask[:2] = False                                                    # video 0's first frame
    pred = torch.randn(n, d, generator=g, requires_grad=True)
    noise = torch.randn(n, d, generator=g)
    for weighting in ("sequence", "token"):
        loss = flow_matching_loss(pred, x.tokens, noise, x.seq_ids, 2, weighting=weighting, mask=mask)
        (grad,) = torch.autograd.grad(loss, pred)
        assert torch.equal(grad[~mask], torch.zeros_like(grad[~mask]))
        wild = noise.clone()
        wild[~mask] = 1e6                                               # the target at given tokens
        assert flow_matching_loss(pred, x.tokens, wild, x.seq_ids, 2, weighting=weighting, mask=mask) == loss
        # reference: fp64, video by video, over the denoised tokens only
        err = (pred.detach().double() - (noise.double() - x.tokens.double())).pow(2).mean(1)
        if weighting == "sequence":
            ref = (err[2:6].mean() + err[6:].mean()) / 2
        else:
            ref = err[mask].mean()
        assert loss.item() == pytest.approx(ref.item(), rel=1e-6)
    full = flow_matching_loss(pred, x.tokens, noise, x.seq_ids, 2)
    assert flow_matching_loss(pred, x.tokens, noise, x.seq_ids, 2, mask=torch.ones(n, dtype=torch.bool)) \
        .item() == pytest.approx(full.item(), rel=1e-7)
    with pytest.raises(ValueError, match="mask must be None or a"):
        flow_matching_loss(pred, x.tokens, noise, x.seq_ids, 2, mask=mask.float())


def test_token_levels_per_video_and_per_frame():
    x = pack_videos([torch.zeros(4, 2, 2, 2), torch.zeros(4, 1, 2, 4)], (1, 2, 2))
    assert token_levels(x, torch.tensor([0.1, 0.2])).tolist() == pytest.approx([0.1] * 2 + [0.2] * 2)
    assert token_levels(x, torch.tensor([0.1, 0.3, 0.2])).tolist() == pytest.approx([0.1, 0.3, 0.2, 0.2])
    with pytest.raises(ValueError, match=r"levels must be \(2,\) per video or \(3,\) per frame"):
        token_levels(x, torch.zeros(4))


def test_step_loss_equals_per_video_fp64_reference_and_the_dit_sees_frame_levels(tmp_path):
    """For fixed steps: the packed loss = the mean over videos of each video's fp64 MSE over its denoised
    frames, with the same drawn noise / levels / given frames; the DiT gets (F,) timesteps, the
    cond_noise level at given frames; given tokens get exactly zero gradient."""
    tr = _setup(tmp_path)
    seen_modes, any_given = set(), False
    for step in range(4):
        d = tr.draw(step)
        frames = d["x0"].grid[:, 0].tolist()
        seen_modes.update(d["modes"])
        any_given |= bool(d["given"].any())
        dit64 = copy.deepcopy(tr.dit).double()
        with torch.no_grad():
            text_all = tr.text_encoder.encode(d["captions"])
            texts = [t.double() for t in text_all.unpack(text_all.tokens)]
            noises = d["x0"].unpack(d["noise"])
            per_video = []
            for j, (i, lv, gv) in enumerate(zip(d["indices"], torch.split(d["levels"], frames),
                                                torch.split(d["given"], frames))):
                x0, eps, s = tr.items[i].latent.double(), noises[j].double(), lv.double()
                sf = s[None, :, None, None]
                xt = (1 - sf) * x0 + sf * eps
                v = dit64.forward_videos([xt], [s * 1000], [texts[j]])[0]
                err = (v - (eps - x0)) ** 2                                # (C, T, H, W)
                per_video.append(err[:, ~gv].mean())
            ref = torch.stack(per_video).mean().item()

        calls, grads = [], []
        forward = tr.dit.forward

        def spy(x, timesteps, text):
            out = forward(x, timesteps, text)
            calls.append(timesteps.detach().clone())
            out.register_hook(lambda g: grads.append(g.detach().clone()))
            return out
        tr.dit.forward = spy
        try:
            m = tr.train_step(step)
        finally:
            del tr.dit.forward
        assert m["loss"] == pytest.approx(ref, rel=1e-5)
        (ts,) = calls
        assert ts.shape == (sum(frames),)
        assert torch.equal(ts, d["levels"] * 1000)
        assert torch.allclose(ts[d["given"]], torch.full_like(ts[d["given"]], 50.0))
        fid = frame_ids(d["x0"]).long()
        given_tok = d["given"][fid]
        (gr,) = grads
        assert torch.equal(gr[given_tok], torch.zeros_like(gr[given_tok]))
        assert gr[~given_tok].abs().sum() > 0
    assert seen_modes - {"t2v"} and any_given, "some conditioned mode was drawn"


def test_images_stay_in_the_batches_as_text_to_video(tmp_path):
    tr = _setup(tmp_path)
    for step in range(2 * len(tr.plan)):
        d = tr.draw(step)
        for j, n in enumerate(d["x0"].grid[:, 0].tolist()):
            if n == 1:
                assert d["modes"][j] == "t2v"


# --- resume -----------------------------------------------------------------------------------------
def test_resume_with_the_mix_continues_bit_identically(tmp_path):
    full = assert_resume_bit_identical(_setup, tmp_path)
    # the mix changes the run: other losses than pure text-to-video
    plain = _setup(tmp_path, "plain", cond_mix={"t2v": 1.0}, steps=3).train()
    assert plain["losses"] != full["losses"][:3]


# --- config -----------------------------------------------------------------------------------------
@pytest.mark.parametrize("field, value, match", [
    ("cond_mix", {"t2v": 1.0, "img2vid": 1.0}, r"cond_mix has an unknown mode 'img2vid'; the modes are t2v, i2v"),
    ("cond_mix", {"t2v": -0.5}, r"cond_mix\['t2v'\] must be a finite number >= 0, got -0.5"),
    ("cond_mix", {"i2v": float("nan")}, r"cond_mix\['i2v'\] must be a finite number >= 0, got nan"),
    ("cond_mix", {"i2v": float("inf")}, r"cond_mix\['i2v'\] must be a finite number >= 0, got inf"),
    ("cond_mix", {"i2v": True}, r"cond_mix\['i2v'\] must be a finite number >= 0, got True"),
    ("cond_mix", {"t2v": 0.0, "i2v": 0}, r"cond_mix must give some mode a probability > 0"),
    ("cond_mix", {}, r"cond_mix must give some mode a probability > 0"),
    ("cond_mix", ["t2v"], r"cond_mix must be a mapping of mode -> probability, got list"),
    ("cond_frames", 0, r"TrainConfig.cond_frames must be an int >= 1, got 0"),
    ("cond_frames", 1.5, r"TrainConfig.cond_frames must be an int >= 1, got 1.5"),
    ("cond_noise", 1.0, r"TrainConfig.cond_noise must be a number in \[0, 1\), got 1.0"),
    ("cond_noise", -0.1, r"TrainConfig.cond_noise must be a number in \[0, 1\), got -0.1"),
    ("cond_noise", float("nan"), r"TrainConfig.cond_noise must be a number in \[0, 1\), got nan"),
])
def test_bad_conditioning_settings_name_their_key(field, value, match):
    with pytest.raises(ValueError, match=match):
        TrainConfig(**{field: value})


def test_the_mix_from_a_run_file_train_table():
    raw = json.loads('{"steps": 4, "cond_mix": {"t2v": 0.5, "i2v": 0.25, "diffusion_forcing": 0.25}, '
                     '"cond_frames": 2, "cond_noise": 0.02}')
    cfg = config_from_dict(TrainConfig, raw, where="run.json [train]")
    assert cfg.cond_mix == {"t2v": 0.5, "i2v": 0.25, "diffusion_forcing": 0.25}
    assert (cfg.cond_frames, cfg.cond_noise) == (2, 0.02)
    assert TrainConfig().cond_mix == {"t2v": 1.0}
    with pytest.raises(TypeError, match=r"run.json \[train\]: 'cond_mix' must be a table / mapping, got str"):
        config_from_dict(TrainConfig, {"cond_mix": "i2v"}, where="run.json [train]")
    with pytest.raises(ValueError, match=r"unknown mode 'i2i'"):
        config_from_dict(TrainConfig, {"cond_mix": {"i2i": 1}}, where="run.json [train]")


def test_default_mix_is_text_to_video_with_the_video_timestep_on_every_frame(tmp_path):
    tr = _setup(tmp_path, cond_mix={"t2v": 1.0}, cond_noise=0.0, cond_frames=1)
    for step in range(3):
        d = tr.draw(step)
        frames = d["x0"].grid[:, 0]
        assert d["modes"] == ["t2v"] * len(d["indices"]) and not d["given"].any()
        assert torch.equal(d["levels"], torch.repeat_interleave(d["t"], frames))
        assert tr._loss_mask(d["x0"], d["given"]) is None
        assert torch.equal(token_levels(d["x0"], d["levels"]), d["t"][d["x0"].seq_ids.long()])


# --- given frames after the first, encoded on their own (sora_fast.training.conditioning) ------------------
def _causal_encode(x):
    """A causal toy encoder with time factor 2: latent 0 = frame 0, latent k = mean of frames 2k-1, 2k plus a
    running sum of everything before (so a suffix encoded alone differs from the same frames in context)."""
    first = x[:, :, :1]
    groups = (x[:, :, 1::2] + x[:, :, 2::2]) / 2
    z = torch.cat([first, groups], dim=2)
    return z + 0.1 * torch.cumsum(z, dim=2)


def test_standalone_latents_are_each_suffix_encoded_alone():
    from sora_fast.training.conditioning import standalone_latents, suffix_offset

    video = torch.randn(4, 9, 2, 3)                                     # m = 4: 5 latent frames
    alone = standalone_latents(_causal_encode, video, 2)
    assert alone.shape == (4, 10, 2, 3)
    for j in range(1, 5):
        ref = _causal_encode(video[None, :, 2 * j:])[0]
        o = suffix_offset(5, j)
        assert torch.equal(alone[:, o:o + 5 - j], ref)
        assert not torch.allclose(ref, _causal_encode(video[None])[0][:, j:])   # in context it differs
    assert standalone_latents(_causal_encode, video[:, :1], 2) is None
    with pytest.raises(ValueError, match="1 \\+ 2k"):
        standalone_latents(_causal_encode, video[:, :4], 2)


def test_swap_given_replaces_runs_that_start_after_the_first_frame():
    from sora_fast.training.conditioning import standalone_latents, suffix_offset, swap_given

    videos = [torch.randn(4, 9, 2, 2), torch.randn(4, 5, 2, 2), torch.randn(4, 9, 2, 2)]
    lat = [_causal_encode(v[None])[0] for v in videos]                 # 5, 3, 5 latent frames
    alone = [standalone_latents(_causal_encode, v, 2) for v in videos]
    given = torch.tensor([1, 0, 1, 1, 0] + [1, 1, 0] + [0, 0, 0, 1, 1], dtype=torch.bool)
    out = swap_given(lat, alone, given)
    a0 = alone[0][:, suffix_offset(5, 2):]
    assert torch.equal(out[0][:, 0], lat[0][:, 0]) and torch.equal(out[0][:, 1], lat[0][:, 1])   # run from 0 kept
    assert torch.equal(out[0][:, 2:4], a0[:, :2]) and torch.equal(out[0][:, 4], lat[0][:, 4])
    assert out[1] is lat[1]                                            # its only run starts at frame 0
    assert torch.equal(out[2][:, 3:], alone[2][:, suffix_offset(5, 3):suffix_offset(5, 3) + 2])
    assert torch.equal(out[2][:, :3], lat[2][:, :3])
    assert swap_given(lat, [None, None, None], given)[0] is lat[0]     # no standalone latents: in context


def test_trainer_feeds_standalone_latents_at_later_given_frames(tmp_path):
    """With ``alone`` on the items, the packed x0 at given frames of runs after frame 0 holds them (so the
    DiT sees them at level cond_noise), everything else is the item's own latent; a wrong shape is refused."""
    from sora_fast.training.conditioning import suffix_offset

    tr = _setup(tmp_path)
    for it in tr.items:
        n = it.latent.shape[1]
        it.alone = torch.randn(it.latent.shape[0], n * (n - 1) // 2, *it.latent.shape[2:]) if n > 1 else None
    swapped = 0
    for step in range(8):
        d = tr.draw(step)
        frames = d["x0"].grid[:, 0].tolist()
        x0s = d["x0"].unpack(d["x0"].tokens)
        for j, (i, g) in enumerate(zip(d["indices"], torch.split(d["given"], frames))):
            ref, g = tr.items[i].latent.clone(), g.tolist()
            for j0 in [k for k in range(1, len(g)) if g[k] and not g[k - 1]]:
                j1 = next((k for k in range(j0, len(g)) if not g[k]), len(g))
                o = suffix_offset(len(g), j0)
                ref[:, j0:j1] = tr.items[i].alone[:, o:o + j1 - j0]
                swapped += 1
            assert torch.equal(x0s[j], ref)
    assert swapped > 0
    items = [{"latent": torch.randn(4, 3, 2, 2), "caption": "", "alone": torch.randn(4, 2, 2, 2)}]
    with pytest.raises(ValueError, match=r"items\[0\]\.alone must be \(4, 3, 2, 2\)"):
        Trainer(tr.dit, tr.text_encoder, items, tr.config, tmp_path / "bad", progress=False)
