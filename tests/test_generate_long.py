"""VideoPipeline.generate_long: autoregressive windows in latent space, each given the previous window's last
latent frames at level 0 (per-frame held levels of sample_euler), memory flat in the total length."""
import re

import pytest
import torch

KW = dict(size=(16, 16), steps=2, guidance=2.0, seed=3)


def _spy_dit(pipe):
    """Record (tokens, timesteps) of every DiT forward."""
    calls = []
    fwd = pipe.dit.forward

    def spy(x, t, text):
        calls.append((int(x.tokens.shape[0]), t.detach().clone()))
        return fwd(x, t, text)

    pipe.dit.forward = spy
    return calls


def test_shape_and_window_plan(tiny_pipeline):
    pipe, _ = tiny_pipeline
    ticks = []
    out = pipe.generate_long("a red circle", 21, window=9, overlap=1, progress=lambda i, n: ticks.append((i, n)),
                             **KW)
    assert out.shape == (3, 21, 16, 16) and out.dtype == torch.float32
    assert out.min() >= -1 and out.max() <= 1
    # 6 latent frames, windows of 3 latent frames overlapping by 1: starts 0, 2, then 3 (the last moved back)
    assert pipe.plan_long(21, 9, 1, (16, 16)) == [0, 2, 3]
    assert ticks == [(1, 3), (2, 3), (3, 3)]
    assert len(pipe.last_timings["windows"]) == 3
    assert pipe.plan_long(17, 9, 1, (16, 16)) == [0, 2]            # 5 latent frames: fits exactly
    assert pipe.plan_long(9, 9, 2, (16, 16)) == [0]


def test_first_window_equals_generate(tiny_pipeline):
    pipe, _ = tiny_pipeline
    ref = pipe.generate(["a red circle"], (9, 16, 16), steps=2, guidance=2.0, seed=3)[0]
    one = pipe.generate_long("a red circle", 9, window=9, overlap=1, **KW)
    assert torch.equal(one, ref)
    long, lats = pipe.generate_long("a red circle", 17, window=9, overlap=1, return_latents=True, **KW)
    assert torch.equal(long[:, :9], ref)                             # causal decoder: later frames change nothing
    assert len(lats) == 2 and lats[0].shape == (pipe.vae.latent_channels, 3, 2, 2)


def test_overlap_latents_are_the_previous_windows_last(tiny_pipeline, monkeypatch):
    pipe, _ = tiny_pipeline
    import sora_fast.pipeline as pl
    real = pl.sample
    seen = []

    def spy(*a, **kw):
        out = real(*a, **kw)
        seen.append((kw.get("given"), kw.get("given_levels"), [z.clone() for z in out]))
        return out

    monkeypatch.setattr(pl, "sample", spy)
    video, lats = pipe.generate_long("a blue square", 29, window=13, overlap=2, return_latents=True, **KW)
    # 8 latent frames, windows of 4 overlapping by 2: starts 0, 2, 4
    assert [g is None for g, _, _ in seen] == [True, False, False]
    for k in (1, 2):
        assert torch.equal(lats[k][:, :2], lats[k - 1][:, -2:])     # exactly the previous window's last latents
        g, lv, _ = seen[k]
        assert torch.equal(g[0][:, :2], lats[k - 1][:, -2:].to(g[0].device))
        assert torch.equal(lv[0][:2], torch.zeros(2, dtype=torch.float64)) and torch.isnan(lv[0][2:]).all()
    # the decoded video is the decode of the stitched latents
    stitched = torch.cat([lats[0], lats[1][:, 2:], lats[2][:, 2:]], dim=1)
    with torch.no_grad():
        ref = pipe.vae.decode(pipe.vae.denormalize_latents(stitched[None]))[0]
    assert torch.equal(video, ref)


def test_last_window_moved_back_is_given_all_it_overlaps(tiny_pipeline, monkeypatch):
    pipe, _ = tiny_pipeline
    video, lats = pipe.generate_long("x", 21, window=9, overlap=1, return_latents=True, **KW)
    # starts 0, 2, 3: the last window (latent frames 3..5) is given frames 3, 4 from the window before
    assert torch.equal(lats[2][:, :2], lats[1][:, 1:])
    assert video.shape[1] == 21


def test_dit_gets_per_frame_timesteps_zero_at_the_overlap(tiny_pipeline):
    pipe, _ = tiny_pipeline
    calls = _spy_dit(pipe)
    pipe.generate_long("x", 17, window=9, overlap=1, **KW)              # windows at latent 0..2 and 2..4
    assert len(calls) == 2 * KW["steps"]
    for _, t in calls[:2]:                                              # window 0: one timestep per video (CFG: 2)
        assert t.shape == (2,) and torch.all(t > 0)
    for _, t in calls[2:]:                                              # window 1: 3 frames, cond + uncond
        assert t.shape == (6,)
        for half in (t[:3], t[3:]):
            assert half[0] == 0 and torch.all(half[1:] > 0)
            assert half[1] == half[2]                                   # synchronous: one level per step


def test_reproducible_and_seed_dependent(tiny_pipeline):
    pipe, _ = tiny_pipeline
    a = pipe.generate_long("x", 17, window=9, overlap=1, **KW)
    b = pipe.generate_long("x", 17, window=9, overlap=1, **KW)
    c = pipe.generate_long("x", 17, window=9, overlap=1, **{**KW, "seed": 4})
    assert torch.equal(a, b) and not torch.equal(a, c)
    assert pipe.window_seed(3, 0) == 3 and len({pipe.window_seed(3, w) for w in range(5)}) == 5


def test_peak_tokens_per_forward_is_one_window(tiny_pipeline):
    pipe, _ = tiny_pipeline
    calls = _spy_dit(pipe)
    pipe.generate_long("x", 9, window=9, overlap=1, **KW)
    one = max(n for n, _ in calls)
    calls.clear()
    pipe.generate_long("x", 41, window=9, overlap=1, **KW)              # 11 latent frames, 5 windows
    assert len(calls) == 5 * KW["steps"]
    assert max(n for n, _ in calls) == one


@pytest.mark.parametrize("kw, match", [
    (dict(frames=10, window=9, overlap=1), "frames"),
    (dict(frames=17, window=10, overlap=1), "window"),
    (dict(frames=17, window=1, overlap=1), "window must be at least 5"),
    (dict(frames=5, window=9, overlap=1), "frames must be >= window"),
    (dict(frames=17, window=9, overlap=0), r"overlap must be in \[1, 2\]"),
    (dict(frames=17, window=9, overlap=3), r"overlap must be in \[1, 2\].*got 3"),
    (dict(frames=17, window=9, overlap=1, size=(15, 16)), r"size: height=15 must be a multiple of"),
])
def test_bad_args_before_any_work(tiny_pipeline, kw, match):
    pipe, _ = tiny_pipeline
    calls = _spy_dit(pipe)
    with pytest.raises(ValueError, match=match):
        pipe.generate_long("x", kw.pop("frames"), **{**KW, **kw})
    assert not calls


@pytest.mark.parametrize("kw, err", [
    (dict(frames=17.0), TypeError), (dict(overlap=True), TypeError), (dict(size=(16,)), ValueError),
    (dict(size=(15, 16)), ValueError), (dict(steps=0), ValueError), (dict(seed=[1]), ValueError),
    (dict(prompt=["x"]), TypeError),
])
def test_bad_types(tiny_pipeline, kw, err):
    pipe, _ = tiny_pipeline
    args = {"prompt": "x", "frames": 17, "window": 9, "overlap": 1, **KW, **kw}
    with pytest.raises(err):
        pipe.generate_long(args.pop("prompt"), args.pop("frames"), **args)


# --- CLI: sora-fast generate --frames N --window W --overlap K ---------------------------------------------
def test_cli_long_writes_each_prompts_rollout(tiny_pipeline, tmp_path, capsys, monkeypatch):
    import sora_fast.data as data
    from sora_fast import cli

    pipe, path = tiny_pipeline
    real, got = data.write_video, {}

    def spy(f, clip, **kw):
        got[f.name] = clip.clone()
        return real(f, clip, **kw)

    monkeypatch.setattr(data, "write_video", spy)
    out = tmp_path / "gen"
    rc = cli.main(["generate", "--pipeline", str(path), "--prompt", "a red circle", "--prompt", "blue",
                   "--frames", "17", "--window", "9", "--overlap", "1", "--size", "17x16x16", "--steps", "2",
                   "--out", str(out), "--seed", "3"])
    cap = capsys.readouterr()
    assert rc == 0, cap.err
    assert sorted(p.name for p in out.iterdir()) == ["00_a_red_circle.gif", "00_a_red_circle.mp4", "01_blue.gif",
                                                     "01_blue.mp4", "contact_sheet.png", "generate.json"]
    assert "windows of 9 frames" in cap.out and "windows 2/2" in cap.err
    for name, prompt, seed in (("00_a_red_circle.mp4", "a red circle", 3), ("01_blue.mp4", "blue", 4)):
        ref = pipe.generate_long(prompt, 17, window=9, overlap=1, size=(16, 16), steps=2, guidance=4.0, seed=seed)
        assert torch.equal(got[name], ref)


@pytest.mark.parametrize("args, match", [
    (["--frames", "17", "--window", "9"], "missing --overlap"),
    (["--window", "9", "--overlap", "1"], "missing --frames"),
    # conditions and edits are taken with a long video (tests/test_long_video.py): their files are read first
    (["--frames", "17", "--window", "9", "--overlap", "1", "--edit", "x.mp4", "--strength", "0.5"],
     "--edit: cannot read"),
    (["--frames", "17", "--window", "9", "--overlap", "1", "--keyframe", "a.png@0"], r"--keyframe a.png@0: cannot "
                                                                                    "read"),
    # taken with a long video; alone (no torchrun) the launch check says how to run it
    (["--frames", "17", "--window", "9", "--overlap", "1", "--cfg-parallel"], "--cfg-parallel needs 2 processes"),
    (["--frames", "5", "--window", "9", "--overlap", "1"], r"--frames must be >= --window \(9\), got 5"),
    (["--frames", "17", "--window", "9", "--overlap", "0"], "--overlap must be >= 1"),
    (["--frames", "17", "--window", "9", "--overlap", "1", "--size", "9x16x16"], "--size #1 9x16x16 has 9 frames"),
])
def test_cli_long_bad_args_before_loading(tmp_path, capsys, args, match):
    from sora_fast import cli

    rc = cli.main(["generate", "--pipeline", str(tmp_path / "missing"), "--prompt", "a", "--out",
                   str(tmp_path / "o"), *args])   # the pipeline does not exist: the error comes before loading it
    assert rc == 2
    assert re.search(match, capsys.readouterr().err)


@pytest.mark.parametrize("args, match", [
    (["--frames", "18", "--window", "9", "--overlap", "1"], r"frames: frames=18 must be 1 \+ 4k"),
    (["--frames", "17", "--window", "8", "--overlap", "1"], r"window: frames=8 must be 1 \+ 4k"),
    (["--frames", "17", "--window", "9", "--overlap", "3"], r"overlap must be in \[1, 2\]"),
])
def test_cli_long_bad_args_after_loading_before_work(tiny_pipeline, tmp_path, capsys, args, match):
    from sora_fast import cli

    _, path = tiny_pipeline
    rc = cli.main(["generate", "--pipeline", str(path), "--prompt", "a", "--out", str(tmp_path / "o"), *args])
    assert rc == 2
    assert re.search(match, capsys.readouterr().err)
    assert not (tmp_path / "o").exists() or not any((tmp_path / "o").iterdir())


def test_temporal_patch_above_one_aligns_windows_to_whole_patches(tiny_pipeline, monkeypatch):
    """A DiT of temporal patch 2 takes latent frames 2 at a time: videos, windows and overlaps are whole patch
    frames, so every window starts on a patch boundary (tests/test_long_video.py rolls such a DiT out)."""
    pipe, _ = tiny_pipeline
    monkeypatch.setattr(pipe.dit.config, "patch", (2, 2, 2))
    assert pipe.plan_long(13, 13, 2, (16, 16)) == [0]                 # 4 latent frames: one window
    assert pipe.plan_long(29, 13, 2, (16, 16)) == [0, 2, 4]
    with pytest.raises(ValueError, match=r"overlap must be a multiple of the DiT's temporal patch 2"):
        pipe.plan_long(29, 13, 1, (16, 16))
    with pytest.raises(ValueError, match=r"window: frames=9 must be 1 \+ 4k with 1 \+ k a multiple of 2"):
        pipe.plan_long(17, 9, 2, (16, 16))
