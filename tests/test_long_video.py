"""Long videos with conditions, editing, a staggered schedule and temporal patches > 1:
``generate_long(conditions=, init_video=, strength=, schedule=, ar_step=)`` against hand-driven loops of the
sampler, the per-frame levels of ``sample(ar_step=)`` and ``sora-fast generate --frames ... --image/--edit``."""
import dataclasses
import re
from pathlib import Path

import pytest
import torch

from sora_fast import Condition
from sora_fast.packing import frame_ids, pack_sequences
from sora_fast.sampling import frame_schedule, sample, staggered_steps, strength_sigmas
from sora_fast.training.flow import sigma_schedule
from tests._utils import run_generate_cli

KW = dict(size=(16, 16), steps=2, guidance=2.0, seed=3)
NAN = float("nan")


def _video(frames, h=16, w=16):
    """Fresh random media (3, frames, h, w) in [-1, 1]."""
    return torch.rand(3, frames, h, w) * 2 - 1


def _enc(pipe, v):
    with torch.no_grad():
        return pipe.vae.normalize_latents(pipe.vae.encode(v[None]))[0]


def _spy_dit(pipe):
    """Record (tokens, timesteps) of every DiT forward."""
    calls, fwd = [], pipe.dit.forward

    def spy(x, t, text):
        calls.append((int(x.tokens.shape[0]), t.detach().clone()))
        return fwd(x, t, text)

    pipe.dit.forward = spy
    return calls


def _hand_rollout(pipe, prompt, frames, starts, held, held_lv, *, steps, guidance, seed, size=(16, 16), init=None,
                  strength=1.0, ar_step=0, window_frames=None):
    """The reference: one ``sample`` call per window at the given starts, each given the conditions' latents in
    its frames (``held`` / ``held_lv``, whole-video latent frames) and the previous window's latents at 0."""
    h, w = size
    lat = pipe.latent_shape((frames, h, w))
    wl = pipe.latent_shape((window_frames, h, w))[1]
    text = pipe.text_encoder.encode([prompt])
    uncond = pipe.text_encoder.encode([""])
    x0 = None if init is None or strength == 1.0 else _enc(pipe, init)
    out = torch.zeros(lat)
    done = 0                                                          # latent frames generated so far
    wins = []
    for k, s in enumerate(starts):
        noise = torch.randn(lat[0], wl, *lat[2:], generator=torch.Generator().manual_seed(pipe.window_seed(seed, k)))
        g, lv = held[:, s:s + wl].clone(), held_lv[s:s + wl].clone()
        g[:, :done - s], lv[:done - s] = out[:, s:done], 0.0
        kw = {} if torch.isnan(lv).all() else dict(given=[g], given_levels=[lv])
        if x0 is not None:
            kw.update(init=[x0[:, s:s + wl]], strength=strength)
        with torch.no_grad():
            (z,) = sample(pipe.dit, [noise], text, uncond_text=uncond, steps=steps, guidance=guidance, shift="auto",
                          patch=pipe.dit.config.patch, ar_step=ar_step, **kw)
        out[:, s:s + wl] = z
        done = s + wl
        wins.append(z)
    with torch.no_grad():
        video = pipe.vae.decode(pipe.vae.denormalize_latents(out[None]))[0]
    return video, wins


def _no_held(pipe, frames, size=(16, 16)):
    shape = pipe.latent_shape((frames, *size))
    return torch.zeros(shape), torch.full((shape[1],), NAN, dtype=torch.float64)


# --- the module split ------------------------------------------------------------------------------
def test_the_rollout_lives_in_its_own_module():
    from sora_fast.long_video import LongVideoMixin
    from sora_fast.pipeline import VideoPipeline

    for name in ("generate_long", "plan_long", "window_seed"):
        assert getattr(VideoPipeline, name) is getattr(LongVideoMixin, name)
    assert len(Path(__import__("sora_fast.pipeline").pipeline.__file__).read_text().splitlines()) <= 600


# --- conditions and editing ------------------------------------------------------------------------
def test_one_window_with_conditions_or_an_edit_equals_generate(tiny_pipeline):
    pipe, _ = tiny_pipeline
    conds = [Condition(_video(1), 0), Condition(_video(1), -1, strength=0.8)]
    ref = pipe.generate(["a red circle"], (9, 16, 16), conditions=[conds], steps=2, guidance=2.0, seed=3)[0]
    assert torch.equal(pipe.generate_long("a red circle", 9, window=9, overlap=1, conditions=conds, **KW), ref)
    v = _video(9)
    ref = pipe.generate(["a red circle"], init_videos=[v], strength=0.6, steps=2, guidance=2.0, seed=3)[0]
    assert torch.equal(pipe.generate_long("a red circle", 9, window=9, overlap=1, init_video=v, strength=0.6, **KW),
                       ref)


def _levels(*v):
    return torch.tensor(v, dtype=torch.float64)


def _same(a, b):
    """Equal, NaN where NaN."""
    return a.shape == b.shape and torch.equal(a.nan_to_num(-7.0), b.nan_to_num(-7.0))


def test_conditions_go_to_the_windows_that_hold_them(tiny_pipeline, monkeypatch):
    """33 frames (9 latent frames), windows of 13 (4 latent frames) overlapping by 1: starts 0, 3, 5. An image
    at frame 0 (latent 0, window 0), a 9-frame clip at frame 8 (latents 2..4: window 0 gets 2 and 3, window 1
    gets 4), a last keyframe at strength 0.7 (latent 8, the last window, held at 0.3)."""
    pipe, _ = tiny_pipeline
    img, clip, last = _video(1), _video(9), _video(1)
    conds = [Condition(img, 0), Condition(clip, 8), Condition(last, -1, strength=0.7)]
    import sora_fast.pipeline as pl
    real, seen = pl.sample, []
    monkeypatch.setattr(pl, "sample", lambda *a, **k: seen.append(k) or real(*a, **k))
    video, lats = pipe.generate_long("a red circle", 33, window=13, overlap=1, conditions=conds, return_latents=True,
                                     **KW)
    assert pipe.plan_long(33, 13, 1, (16, 16)) == [0, 3, 5]
    e_img, e_clip, e_last = _enc(pipe, img), _enc(pipe, clip), _enc(pipe, last)
    lv = [k["given_levels"][0] for k in seen]                       # in window coordinates
    assert _same(lv[0], _levels(0, NAN, 0, 0))
    assert _same(lv[1], _levels(0, 0, NAN, NAN))                     # latent 3 from window 0, 4 the clip's last
    assert _same(lv[2], _levels(0, 0, NAN, 1 - 0.7))                    # 5, 6 from window 1; the keyframe at 0.3
    g = [k["given"][0] for k in seen]
    assert torch.equal(g[0][:, 0], e_img[:, 0]) and torch.equal(g[0][:, 2:], e_clip[:, :2])
    assert torch.equal(g[1][:, 1], e_clip[:, 2]) and torch.equal(g[2][:, 3], e_last[:, 0])
    # given frames come back exactly (up to the VAE round trip in pixels)
    assert torch.equal(lats[0][:, 0], e_img[:, 0]) and torch.equal(lats[0][:, 2:], e_clip[:, :2])
    assert torch.equal(lats[1][:, 1], e_clip[:, 2]) and torch.equal(lats[2][:, 3], e_last[:, 0])
    with torch.no_grad():
        rt = pipe.vae.decode(pipe.vae.encode(img[None]))[0]
    torch.testing.assert_close(video[:, :1], rt, rtol=1e-4, atol=1e-4)   # causal decoder: frame 0 from latent 0
    # the reference: a hand-driven loop of sample calls, conditions placed by hand in whole-video latent frames
    held, held_lv = _no_held(pipe, 33)
    held[:, 0], held[:, 2:5], held[:, 8] = e_img[:, 0], e_clip, e_last[:, 0]
    held_lv[[0, 2, 3, 4]], held_lv[8] = 0.0, 1 - 0.7
    monkeypatch.setattr(pl, "sample", real)
    ref, wins = _hand_rollout(pipe, "a red circle", 33, [0, 3, 5], held, held_lv, steps=2, guidance=2.0, seed=3,
                              window_frames=13)
    assert all(torch.equal(a, b) for a, b in zip(lats, wins))
    assert torch.equal(video, ref)


def test_long_edit_equals_a_hand_driven_loop(tiny_pipeline):
    """SDEdit of a 21-frame video in windows of 9 (starts 0, 2, 3): every window starts from the input's own
    latent frames noised to the strength's level, with a keyframe on top."""
    pipe, _ = tiny_pipeline
    v, key = _video(21), _video(1)
    got, lats = pipe.generate_long("a blue square", 21, window=9, overlap=1, init_video=v, strength=0.6,
                                   conditions=[Condition(key, 16)], return_latents=True, **KW)
    held, held_lv = _no_held(pipe, 21)
    held[:, 4], held_lv[4] = _enc(pipe, key)[:, 0], 0.0
    ref, wins = _hand_rollout(pipe, "a blue square", 21, [0, 2, 3], held, held_lv, steps=2, guidance=2.0, seed=3,
                              init=v, strength=0.6, window_frames=9)
    assert all(torch.equal(a, b) for a, b in zip(lats, wins))
    assert torch.equal(got, ref)
    assert pipe.last_timings["evaluations"] == 3 * 2 * 2             # ceil(0.6 * 2) = 2 steps, CFG, 3 windows


def test_long_edit_strength_one_is_the_plain_rollout_and_zero_the_vae_round_trip(tiny_pipeline):
    pipe, _ = tiny_pipeline
    v = _video(17)
    plain = pipe.generate_long("x", 17, window=9, overlap=1, **KW)
    assert torch.equal(pipe.generate_long("x", 17, window=9, overlap=1, init_video=v, strength=1.0, **KW), plain)
    calls = _spy_dit(pipe)
    zero = pipe.generate_long("x", 17, window=9, overlap=1, init_video=v, strength=0.0, **KW)
    assert calls == []                                                # no denoising step in any window
    with torch.no_grad():
        assert torch.equal(zero, pipe.vae.decode(pipe.vae.encode(v[None]))[0])


def test_size_defaults_to_the_init_video_or_the_first_condition(tiny_pipeline, tmp_path):
    pipe, _ = tiny_pipeline
    kw = {k: v for k, v in KW.items() if k != "size"}
    assert pipe.generate_long("x", 9, window=5, overlap=1, init_video=_video(9, 16, 32), strength=0.5,
                              **kw).shape == (3, 9, 16, 32)
    from sora_fast.data import write_video
    img = write_video(tmp_path / "img.png", _video(1, 32, 16), fps=8)       # read from a file
    assert pipe.generate_long("x", 9, window=5, overlap=1, conditions=[Condition(str(img), 4)],
                              **kw).shape == (3, 9, 32, 16)


IMG = _video(1)


@pytest.mark.parametrize("kw, exc, match", [
    (dict(conditions=[Condition(IMG, 21)]), ValueError, r"conditions\[0\]\.frame=21 is outside the long video.*"
                                                        r"\[-21, 20\]"),
    (dict(conditions=[Condition(IMG, -22)]), ValueError, "outside the long video"),
    (dict(conditions=[Condition(_video(1, 16, 32))]), ValueError, r"16x32.*the long video is 16x16.*never resized"),
    (dict(conditions=[Condition(IMG, 2)]), ValueError, r"multiple of 4"),
    (dict(conditions=[Condition(IMG, 8), Condition(_video(5), 4)]), ValueError,
     r"conditions\[1\] overlaps conditions\[0\]"),
    (dict(conditions=[Condition(_video(25))]), ValueError, "more than the 21 of the long video"),
    (dict(conditions=Condition(IMG)), TypeError, "a list of Condition"),
    (dict(conditions=[[Condition(IMG)]]), TypeError, r"conditions\[0\] must be a sora_fast.Condition"),
    (dict(init_video=_video(17)), ValueError, r"init_video is 17x16x16 .* long video is 21x16x16.*never cut"),
    (dict(init_video=_video(21, 16, 32), size=(16, 16)), ValueError, "init_video is 21x16x32"),
    (dict(init_video=_video(21) * 2, strength=0.5), ValueError, r"init_video must have values in \[-1, 1\]"),
    (dict(strength=0.5), ValueError, "strength 0.5 needs an init_video"),
    (dict(init_video=_video(21), strength=1.5), ValueError, r"strength must be a number in \[0, 1\]"),
    (dict(schedule="diagonal"), ValueError, r"schedule must be one of 'synchronous', 'staggered'"),
    (dict(ar_step=2), ValueError, r"ar_step=2 needs schedule='staggered'"),
    (dict(schedule="staggered", ar_step=-1), ValueError, "ar_step must be an int >= 0"),
    (dict(schedule="staggered", ar_step=1.5), ValueError, "ar_step must be an int >= 0"),
])
def test_bad_conditions_edits_and_schedules_before_any_work(tiny_pipeline, kw, exc, match):
    pipe, _ = tiny_pipeline
    calls = _spy_dit(pipe)
    enc, encoded = pipe.text_encoder.encode, []
    pipe.text_encoder.encode = lambda *a, **k: encoded.append(1) or enc(*a, **k)
    with pytest.raises(exc, match=match):
        pipe.generate_long("x", 21, window=9, overlap=1, **{**KW, **kw})
    assert not calls and not encoded


# --- the staggered schedule ------------------------------------------------------------------------
def test_frame_schedule_is_the_videos_levels_shifted_by_ar_step_per_denoised_frame():
    sched = sigma_schedule(4, 3.0, dtype=torch.float64)                     # 5 levels, 4 steps
    lv = _levels(0.0, NAN, NAN, 0.25, NAN)                                 # 3 denoised frames (ranks 0, 1, 2)
    assert staggered_steps(4, 3, 2) == 4 + 2 * 2 and staggered_steps(4, 1, 2) == 4 and staggered_steps(0, 3, 2) == 0
    total = 10                                                             # the video joins at 10 - 8 = 2
    table, starts = frame_schedule(sched, lv, total, ar_step=2)
    assert table.shape == (5, 11) and starts == [10, 2, 4, 10, 6]
    for f, start in ((1, 2), (2, 4), (4, 6)):
        for i in range(total + 1):
            assert table[f, i] == sched[min(max(i - start, 0), 4)]
    assert torch.all(table[0] == 0.0) and torch.all(table[3] == 0.25)     # given frames hold their level
    den = table[[1, 2, 4]]
    assert torch.all(den[:, -1] == 0) and torch.all(den[:, 0] == 1)       # from noise, all end at 0
    assert torch.all(den[1:] >= den[:-1])                                  # monotone in the frame at every step
    assert torch.all(den[:, 1:] <= den[:, :-1])                            # and in the step for every frame
    sync, starts0 = frame_schedule(sched, lv, 6, ar_step=0)                # synchronous: one level per step
    assert starts0 == [6, 2, 2, 6, 2] and torch.equal(sync[1], sync[2]) and torch.equal(sync[2], sync[4])


def _toy(x, t, text):
    """A velocity that acts on every frame alone: its tokens and its own timestep."""
    per_frame = torch.repeat_interleave(t, x.grid[:, 0].long()) if t.shape[0] == x.num_sequences else t
    return x.tokens * 0.3 + 1e-3 * per_frame[frame_ids(x).long(), None]


@pytest.mark.parametrize("solver", ["euler", "unipc", "dpm++"])
@pytest.mark.parametrize("ar_step, strength", [(1, 1.0), (2, 1.0), (3, 0.7)])
def test_staggered_frames_each_follow_the_videos_own_run(solver, ar_step, strength):
    """With a model that treats every frame alone, frame r of a staggered run is exactly that frame run alone
    (synchronously, from the same noise) -- for every solver: each frame takes its own steps and orders."""
    noise = torch.randn(4, 5, 2, 2, dtype=torch.float64)
    x0 = torch.randn(4, 5, 2, 2, dtype=torch.float64)
    lv = _levels(0.0, NAN, NAN, NAN, 0.4)
    text = pack_sequences([torch.randn(3, 8)])
    kw = dict(patch=(1, 2, 2), steps=4, guidance=1.0, shift=2.0, solver=solver, strength=strength,
              init=[x0] if strength < 1 else None)
    stats = {}
    out = sample(_toy, [noise], text, given=[x0], given_levels=[lv], ar_step=ar_step, stats=stats, **kw)[0]
    n = len(strength_sigmas(4, 2.0, strength)) - 1
    assert stats["forwards"] == n + ar_step * 2
    assert torch.equal(out[:, [0, 4]], x0[:, [0, 4]])                      # given frames exactly
    for f in (1, 2, 3):
        alone = sample(_toy, [noise[:, f:f + 1]], text, **{**kw, "init": [x0[:, f:f + 1]] if strength < 1 else None})
        torch.testing.assert_close(out[:, f:f + 1], alone[0], rtol=1e-12, atol=1e-12)


def test_ar_step_zero_is_the_synchronous_schedule_bit_for_bit(tiny_pipeline):
    pipe, _ = tiny_pipeline
    sync = pipe.generate_long("x", 17, window=9, overlap=1, conditions=[Condition(IMG, 8)], **KW)
    assert torch.equal(pipe.generate_long("x", 17, window=9, overlap=1, conditions=[Condition(IMG, 8)],
                                          schedule="staggered", ar_step=0, **KW), sync)


def test_staggered_levels_per_window_monotone_given_held_and_memory_flat(tiny_pipeline):
    """21 frames (6 latent frames) in windows of 13 (4 latent frames) overlapping by 2: starts 0, 2; a keyframe
    at pixel 12 (latent 3, in window 0)."""
    pipe, _ = tiny_pipeline
    calls = _spy_dit(pipe)
    steps, lag = 3, 2
    kw = {**KW, "steps": steps}
    video = pipe.generate_long("x", 21, window=13, overlap=2, conditions=[Condition(IMG, 12)], schedule="staggered",
                               ar_step=lag, **kw)
    # window 0: latent 3 given (the keyframe), 0, 1, 2 denoised; window 1 (latents 2..5): 2, 3 given, 4, 5 denoised
    n0, n1 = steps + lag * 2, steps + lag * 1
    assert len(calls) == n0 + n1 and pipe.last_timings["evaluations"] == 2 * (n0 + n1)
    per_window = [(calls[:n0], [0, 1, 2], [3]), (calls[n0:], [2, 3], [0, 1])]
    for seen, den, given in per_window:
        levels = torch.stack([t[:4] for _, t in seen])                     # cond half: (forwards, 4 frames)
        assert torch.equal(levels, torch.stack([t[4:] for _, t in seen]))  # the uncond half sees the same
        assert torch.all(levels[:, given] == 0)                            # given frames stay given
        d = levels[:, den]
        assert torch.all(d[:, 1:] >= d[:, :-1])                            # later frames as noisy or noisier
        assert torch.all(d[1:] <= d[:-1])                                  # every frame only goes down
        assert d[0, 0] == 1000 and torch.all(d[0, 1:] == 1000)             # every frame starts from noise ...
        assert not torch.equal(d[1, 0], d[1, -1])                          # ... and they are staggered
    assert max(n for n, _ in calls) == 2 * 4                               # one window's 4 tokens (x CFG) per forward
    # all end at 0: the last window's frames came back as generated and the whole run is reproducible
    assert torch.equal(video, pipe.generate_long("x", 21, window=13, overlap=2, conditions=[Condition(IMG, 12)],
                                                 schedule="staggered", ar_step=lag, **kw))
    other = pipe.generate_long("x", 21, window=13, overlap=2, conditions=[Condition(IMG, 12)], schedule="staggered",
                               ar_step=lag, **{**kw, "seed": 4})
    assert not torch.equal(video, other)


def test_staggered_one_window_is_diffusion_forcing_over_the_whole_video(tiny_pipeline):
    """frames == window: one window from generate's noise, frame f (of T) runs the schedule's levels ar_step·f
    steps after frame 0 -- checked against a hand-written Euler loop with per-frame timesteps (CFG apart)."""
    pipe, _ = tiny_pipeline
    steps, lag, g = 3, 2, 2.0
    video, (lat,) = pipe.generate_long("a red circle", 9, window=9, overlap=1, schedule="staggered", ar_step=lag,
                                       shift=2.0, return_latents=True, **{**KW, "steps": steps, "guidance": g})
    shape = pipe.latent_shape((9, 16, 16))
    x = torch.randn(shape, generator=torch.Generator().manual_seed(3))     # generate's noise for seed 3
    sched = sigma_schedule(steps, 2.0, dtype=torch.float64)
    text, un = pipe.text_encoder.encode(["a red circle"]), pipe.text_encoder.encode([""])
    t_frames = shape[1]

    def level(f, i):
        return sched[min(max(i - lag * f, 0), steps)]

    with torch.no_grad():
        for i in range(steps + lag * (t_frames - 1)):
            now = torch.stack([level(f, i) for f in range(t_frames)])
            nxt = torch.stack([level(f, i + 1) for f in range(t_frames)])
            packed = pipe.dit.pack([x])
            t = (now * 1000).float()
            v_c = packed.unpack(pipe.dit(packed, t, text))[0]
            v_u = packed.unpack(pipe.dit(packed, t, un))[0]
            v = v_u + g * (v_c - v_u)
            x = x + (nxt - now).float()[None, :, None, None] * v
    torch.testing.assert_close(lat, x, rtol=1e-5, atol=1e-5)
    plain = pipe.generate(["a red circle"], (9, 16, 16), steps=steps, guidance=g, shift=2.0, seed=3)[0]
    assert not torch.equal(video, plain)


# --- temporal patch > 1 ----------------------------------------------------------------------------
@pytest.fixture
def pt2_pipeline():
    from sora_fast.models.dit import VideoDiT
    from sora_fast.models.text import TinyTextEncoder
    from sora_fast.models.vae import CausalVAE
    from sora_fast.pipeline import VideoPipeline

    dit = VideoDiT(dataclasses.replace(VideoDiT.from_name("tiny").config, patch=(2, 2, 2)))
    for p in dit.parameters():
        torch.nn.init.normal_(p, std=0.05)
    return VideoPipeline(dit, CausalVAE("tiny"), TinyTextEncoder(dim=dit.config.text_dim))


def test_temporal_patch_two_rolls_out_on_patch_boundaries(pt2_pipeline):
    pipe = pt2_pipeline
    assert pipe.generate(["x"], (5, 16, 16), steps=1)[0].shape == (3, 5, 16, 16)   # 2 latent frames: one patch
    # 29 frames = 8 latent frames, windows of 13 = 4 latent frames, overlap 2: starts 0, 2, 4 (all even)
    assert pipe.plan_long(29, 13, 2, (16, 16)) == [0, 2, 4]
    assert pipe.plan_long(21, 13, 2, (16, 16)) == [0, 2]
    calls = _spy_dit(pipe)
    clip = _video(5)                                                       # latents 2, 3: one whole patch frame
    video, lats = pipe.generate_long("x", 29, window=13, overlap=2, conditions=[Condition(clip, 8)],
                                     return_latents=True, **KW)
    for _, t in calls[2:]:                                                 # windows 1, 2: 2 patch frames, CFG
        assert t.shape == (4,) and t[0] == 0 and t[2] == 0 and t[1] > 0
    held, held_lv = _no_held(pipe, 29)
    held[:, 2:4], held_lv[2:4] = _enc(pipe, clip), 0.0
    ref, wins = _hand_rollout(pipe, "x", 29, [0, 2, 4], held, held_lv, steps=2, guidance=2.0, seed=3,
                              window_frames=13)
    assert all(torch.equal(a, b) for a, b in zip(lats, wins)) and torch.equal(video, ref)
    assert torch.equal(lats[1][:, :2], lats[0][:, 2:]) and torch.equal(lats[0][:, 2:], _enc(pipe, clip))
    stag = pipe.generate_long("x", 21, window=13, overlap=2, schedule="staggered", **KW)   # per patch frame
    assert stag.shape == (3, 21, 16, 16)


@pytest.mark.parametrize("args, kw, match", [
    ((29, 13, 1), {}, r"overlap must be a multiple of the DiT's temporal patch 2 .*got 1; valid: 2"),
    ((29, 9, 2), {}, r"window: frames=9 must be 1 \+ 4k with 1 \+ k a multiple of 2.*nearest valid: 5 or 13"),
    ((25, 13, 2), {}, r"frames: frames=25 must be 1 \+ 4k with 1 \+ k a multiple of 2"),
    ((29, 13, 2), dict(conditions=[Condition(IMG, 0)]),
     r"conditions\[0\] gives latent frames 0..0, but the DiT's temporal patch is 2: .*whole patch frames"),
    ((29, 13, 2), dict(conditions=[Condition(_video(5), 4)]), r"gives latent frames 1..2"),
])
def test_temporal_patch_two_refuses_what_is_off_a_patch(pt2_pipeline, args, kw, match):
    pipe = pt2_pipeline
    calls = _spy_dit(pipe)
    frames, window, overlap = args
    with pytest.raises(ValueError, match=match):
        pipe.generate_long("x", frames, window=window, overlap=overlap, **{**KW, **kw})
    assert not calls


def test_generate_refuses_a_condition_off_a_patch_before_work(pt2_pipeline):
    pipe = pt2_pipeline
    calls = _spy_dit(pipe)
    with pytest.raises(ValueError, match=r"conditions\[0\]\[0\] gives latent frames 0..0.*temporal patch is 2"):
        pipe.generate(["x"], (5, 16, 16), conditions=[[Condition(IMG)]], steps=1)
    assert not calls


# --- CLI -------------------------------------------------------------------------------------------
def _write(tmp_path, name, clip):
    from sora_fast.data import write_video
    return str(write_video(tmp_path / name, clip, fps=8))




@pytest.mark.parametrize("flags, api", [
    (["--image", "{img}"], lambda m: dict(conditions=[Condition(m["img"], 0)])),
    (["--video", "{clip}", "--extend", "forward"], lambda m: dict(conditions=[Condition(m["clip"], 0)])),
    (["--video", "{clip}", "--extend", "backward"], lambda m: dict(conditions=[Condition(m["clip"], -5)])),
    (["--keyframe", "{img}@0", "--keyframe", "{img2}@-1", "--schedule", "staggered", "--ar-step", "2"],
     lambda m: dict(conditions=[Condition(m["img"], 0), Condition(m["img2"], -1)], schedule="staggered", ar_step=2)),
    (["--edit", "{long}", "--strength", "0.5"], lambda m: dict(init_video=m["long"], strength=0.5)),
    (["--schedule", "staggered", "--size", "17x16x32"], lambda m: dict(schedule="staggered", size=(16, 32))),
])
def test_cli_long_with_conditions_edits_and_schedules_equals_the_api(tiny_pipeline, tmp_path, capsys, monkeypatch,
                                                                    flags, api):
    pipe, path = tiny_pipeline
    media = {"img": _write(tmp_path, "img.png", _video(1, 16, 32)), "img2": _write(tmp_path, "img2.png",
                                                                                     _video(1, 16, 32)),
             "clip": _write(tmp_path, "clip.gif", _video(5, 16, 32)), "long": _write(tmp_path, "long.gif",
                                                                                     _video(17, 16, 32))}
    rc, written = run_generate_cli(monkeypatch, path, tmp_path, "--frames", "17", "--window", "9", "--overlap", "1",
                       *[f.format(**media) for f in flags])
    cap = capsys.readouterr()
    assert rc == 0, cap.err
    assert "windows 2/2" in cap.err
    import json
    meta = json.loads((tmp_path / "gen" / "generate.json").read_text())
    assert meta["long"]["window"] == 9 and meta["long"]["schedule"] == api(media).get("schedule", "synchronous")
    for name, prompt, seed in (("00_a.gif", "a", 0), ("01_b.gif", "b", 1)):
        ref = pipe.generate_long(prompt, 17, window=9, overlap=1, steps=2, guidance=4.0, seed=seed, **api(media))
        assert written[name].shape == (3, 17, 16, 32)                       # the media's height and width
        torch.testing.assert_close(written[name], ref, atol=2e-5, rtol=0)


@pytest.mark.parametrize("args, match", [
    (["--schedule", "staggered"], r"--schedule applies to long videos only"),
    (["--frames", "17", "--window", "9", "--overlap", "1", "--ar-step", "2"], "--ar-step needs --schedule staggered"),
    (["--frames", "17", "--window", "9", "--overlap", "1", "--schedule", "staggered", "--ar-step", "-1"],
     "--ar-step must be >= 0"),
    (["--frames", "17", "--window", "9", "--overlap", "1", "--edit", "{long13}", "--strength", "0.5"],
     r"--edit video has 13 frames but --frames is 17"),
    (["--frames", "17", "--window", "9", "--overlap", "1", "--image", "{img}", "--size", "17x16x16"],
     r"--image is 16x32 .* --size #1 17x16x16 .* never resized"),
    (["--frames", "17", "--window", "9", "--overlap", "1", "--keyframe", "{img}@17"],
     r"frame 17 is outside the video \(the default size 17x16x32"),
    (["--frames", "17", "--window", "9", "--overlap", "1", "--image", "{img}", "--edit", "{long17}", "--strength",
      "0.5"], "--edit cannot be combined"),
])
def test_cli_long_condition_arguments_are_checked_before_anything_loads(tmp_path, capsys, args, match):
    from sora_fast import cli
    media = {"img": _write(tmp_path, "img.png", _video(1, 16, 32)),
             "long13": _write(tmp_path, "l13.gif", _video(13, 16, 32)),
             "long17": _write(tmp_path, "l17.gif", _video(17, 16, 32))}
    rc = cli.main(["generate", "--pipeline", str(tmp_path / "missing"), "--prompt", "a", "--out", str(tmp_path / "o"),
                   *[a.format(**media) for a in args]])
    err = capsys.readouterr().err
    assert rc == 2 and re.search(match, err), err
    assert not (tmp_path / "o").exists()


def test_cli_long_keyframe_off_a_latent_boundary_fails_before_generating(tiny_pipeline, tmp_path, capsys):
    from sora_fast import cli
    _, path = tiny_pipeline
    img = _write(tmp_path, "img.png", _video(1))
    rc = cli.main(["generate", "--pipeline", str(path), "--prompt", "a", "--frames", "17", "--window", "9",
                   "--overlap", "1", "--keyframe", f"{img}@-2", "--out", str(tmp_path / "o")])
    assert rc == 2
    assert re.search(r"conditions\[0\]\.frame=-2 \(pixel frame 15\) must be a multiple of 4", capsys.readouterr().err)


def test_staggered_refuses_two_experts_before_any_work(tiny_pipeline):
    """Experts are picked per video by its step timestep, which staggered frames do not share: the sampler and
    the rollout refuse the combination (the rollout before any DiT forward or text encoding)."""
    import copy

    from sora_fast.pipeline import VideoPipeline
    from sora_fast.sampling import Experts

    pipe, _ = tiny_pipeline
    two = VideoPipeline(pipe.dit, pipe.vae, pipe.text_encoder, dit_2=copy.deepcopy(pipe.dit), boundary=500.0)
    calls = _spy_dit(two)
    with pytest.raises(ValueError, match="staggered.*two experts"):
        two.generate_long("x", 21, window=9, overlap=1, **{**KW, "schedule": "staggered"})
    assert not calls
    c = pipe.dit.config
    noise = [torch.randn(c.in_channels, 3, 4, 4)]
    text = pack_sequences([torch.randn(3, c.text_dim)])
    with pytest.raises(ValueError, match="ar_step=1.*Experts"):
        sample(Experts([pipe.dit, pipe.dit], [500.0]), noise, text, patch=c.patch, steps=2, guidance=1.0, ar_step=1)
