"""Flow-matching Euler sampling with packed CFG, against closed-form flows and per-video runs."""
import pytest
import torch

from sora_fast.packing import pack_sequences, pack_videos
from sora_fast.sampling import check_strength, concat_text, sample_euler, strength_sigmas
from sora_fast.training.flow import shift_sigmas, sigma_schedule

SHAPES = [(4, 1, 6, 4), (4, 3, 4, 10), (4, 2, 2, 2)]   # (C, T, H, W): an image and two videos


def _text(values):
    """One single-token 'caption' per video whose feature is the given number (a stand-in embedding)."""
    return pack_sequences([torch.full((1, 1), float(v)) for v in values])


def _delta_flow(targets_cond, targets_uncond=None):
    """The exact velocity field when each video's data distribution is one point x0:
    v(x_σ, σ) = (x_σ − x0) / σ. Which point (cond or uncond) is read from the text feature."""
    calls = []

    def denoise(x, t, text):
        calls.append((x.num_sequences, t.clone()))
        sig = (t.double() / 1000)[x.seq_ids.long(), None]
        which = text.tokens[text.cu_seqlens[:-1].long(), 0].long()             # (B,) 0 = cond, 1 = uncond
        points = [(targets_cond if which[i] == 0 else targets_uncond)[i % len(targets_cond)]
                  for i in range(x.num_sequences)]
        x0 = pack_videos(points, patch=x.patch).tokens.double()
        return ((x.tokens.double() - x0) / sig).to(x.tokens.dtype)

    return denoise, calls


@pytest.mark.parametrize("shift", [1.0, 3.0, [1.0, 7.0, 2.0], "auto"])
@pytest.mark.parametrize("steps", [1, 4])
def test_euler_reaches_the_data_point_exactly(shift, steps):
    """On a delta data distribution the Euler path is a straight line: any schedule lands on x0."""
    x0 = [torch.randn(s, dtype=torch.float64) for s in SHAPES]
    noise = [torch.randn(s, dtype=torch.float64) for s in SHAPES]
    denoise, calls = _delta_flow(x0)
    out = sample_euler(denoise, noise, _text([0] * 3), steps=steps, guidance=1.0, shift=shift)
    assert len(calls) == steps
    for o, ref in zip(out, x0):
        torch.testing.assert_close(o, ref, atol=1e-9, rtol=1e-9)


@pytest.mark.parametrize("guidance", [0.0, 2.5, 6.0])
def test_packed_cfg_one_forward_per_step_and_exact_guided_target(guidance):
    """With v_c, v_u exact for points x0c, x0u, guidance g moves every video to x0u + g·(x0c − x0u);
    both branches go through one forward of 2B videos per step."""
    x0c = [torch.randn(s, dtype=torch.float64) for s in SHAPES]
    x0u = [torch.randn(s, dtype=torch.float64) for s in SHAPES]
    noise = [torch.randn(s, dtype=torch.float64) for s in SHAPES]
    denoise, calls = _delta_flow(x0c, x0u)
    out = sample_euler(denoise, noise, _text([0] * 3), uncond_text=_text([1] * 3), steps=3, guidance=guidance)
    assert [c[0] for c in calls] == [6, 6, 6]
    for o, c, u in zip(out, x0c, x0u):
        torch.testing.assert_close(o, u + guidance * (c - u), atol=1e-9, rtol=1e-9)


def test_pack_equals_each_video_alone_with_its_own_shift():
    """A nonlinear denoiser: videos of different sizes sampled together equal each sampled alone,
    with per-video shifts and timesteps (what a padded batch cannot do)."""
    w = torch.randn(16, 16, dtype=torch.float64) / 4

    def denoise(x, t, text):
        feat = text.tokens[text.cu_seqlens[:-1].long(), 0][x.seq_ids.long(), None]  # (N, 1)
        tt = (t.double() / 1000)[x.seq_ids.long(), None]
        return torch.tanh(x.tokens @ w) * tt + feat

    noise = [torch.randn(s, dtype=torch.float64) for s in SHAPES]
    feats = [0.5, -1.0, 2.0]
    together = sample_euler(denoise, noise, _text(feats), uncond_text=_text([0, 0, 0]), steps=5,
                            guidance=3.0, shift=[1.0, 4.0, 2.0])
    for i in range(3):
        alone = sample_euler(denoise, [noise[i]], _text([feats[i]]), uncond_text=_text([0]), steps=5,
                             guidance=3.0, shift=[1.0, 4.0, 2.0][i])
        torch.testing.assert_close(together[i], alone[0], atol=1e-12, rtol=1e-12)


def test_schedule_shift_endpoints():
    for s in (1.0, 3.0, 8.0):
        sig = sigma_schedule(10, s)
        assert sig[0] == 1 and sig[-1] == 0 and bool((sig.diff() < 0).all())


def test_concat_text_order():
    a, b = _text([1, 2]), _text([3])
    c = concat_text(a, b)
    assert c.tokens[:, 0].tolist() == [1, 2, 3] and c.seqlens == [1, 1, 1]


def test_bad_arguments():
    noise = [torch.randn(SHAPES[0])]
    f = lambda x, t, text: x.tokens  # noqa: E731
    with pytest.raises(ValueError, match="steps must be a positive int"):
        sample_euler(f, noise, _text([0]), steps=0)
    with pytest.raises(ValueError, match="text has 2 sequences, expected one per video \\(1\\)"):
        sample_euler(f, noise, _text([0, 1]))
    with pytest.raises(ValueError, match="uncond_text has 2 sequences"):
        sample_euler(f, noise, _text([0]), uncond_text=_text([0, 1]))
    with pytest.raises(ValueError, match="shift has 2 values, expected one per video"):
        sample_euler(f, noise, _text([0]), shift=[1.0, 2.0])
    with pytest.raises(ValueError, match=r"shift\[0\] must be a positive number"):
        sample_euler(f, noise, _text([0]), shift=-1.0)
    with pytest.raises(ValueError, match="'auto'"):
        sample_euler(f, noise, _text([0]), shift="fast")
    with pytest.raises(TypeError, match="guidance must be a number"):
        sample_euler(f, noise, _text([0]), guidance="5")


@pytest.mark.parametrize("kw, match", [
    (dict(guidance=float("nan")), r"guidance must be a finite number, got nan"),
    (dict(guidance=float("inf")), r"guidance must be a finite number, got inf"),
    (dict(guidance=-float("inf")), r"guidance must be a finite number, got -inf"),
    (dict(shift=float("inf")), r"shift\[0\] must be a positive number, finite, got inf"),
    (dict(shift=float("nan")), r"shift\[0\] must be a positive number, finite, got nan"),
    (dict(shift=[float("inf")]), r"shift\[0\] must be a positive number, finite, got inf"),
])
def test_non_finite_arguments_are_refused_before_any_step(kw, match):
    calls = []
    f = lambda x, t, text: calls.append(1) or x.tokens  # noqa: E731
    with pytest.raises(ValueError, match=match):
        sample_euler(f, [torch.randn(SHAPES[0])], _text([0]), uncond_text=_text([1]), **kw)
    assert not calls


def test_non_finite_latents_are_an_error_with_their_count():
    """A diverged model (NaN / Inf velocities) is an error naming the count, never returned as latents."""
    def f(x, t, text):
        v = torch.zeros_like(x.tokens)
        v[: 3] = float("nan")                          # 3 tokens of the first video
        v[-1, 0] = float("inf")                         # one value of the last video
        return v
    noise = [torch.randn(s) for s in SHAPES]
    with pytest.raises(ValueError, match=r"video 0: 48 of 96 values \(48 NaN, 0 Inf\).*video 2: 1 of 32 values "
                                         r"\(0 NaN, 1 Inf\)"):
        sample_euler(f, noise, _text([0, 1, 2]), steps=1, patch=(1, 2, 2))


def test_frames_with_nan_or_inf_are_never_written_as_grey(tmp_path):
    from sora_fast.data import to_uint8, write_video

    x = torch.zeros(3, 2, 4, 4)
    x[0, 0, :2] = float("nan")
    x[1, 1, 0, 0] = float("inf")
    with pytest.raises(ValueError, match=r"video has 9 non-finite values of 96 \(8 NaN, 1 Inf\)"):
        to_uint8(x)
    with pytest.raises(ValueError, match="non-finite"):
        write_video(tmp_path / "a.gif", x)
    assert not (tmp_path / "a.gif").exists()
    assert to_uint8(torch.zeros(3, 1, 2, 2)).max() == 128            # finite frames convert as before


# --- editing: strength and init latents -------------------------------------------------------------


@pytest.mark.parametrize("shift", [1.0, 3.0, 7.5])
def test_strength_schedule_is_the_tail_of_the_full_one(shift):
    full = sigma_schedule(10, shift, dtype=torch.float64)
    assert torch.equal(strength_sigmas(10, shift, 1.0), full)
    for k in range(0, 11):
        tail = strength_sigmas(10, shift, k / 10)
        assert len(tail) == k + 1 and tail[-1] == 0.0
        torch.testing.assert_close(tail, full[10 - k:], atol=1e-15, rtol=0)
    assert torch.equal(strength_sigmas(10, shift, 0.0), torch.zeros(1, dtype=torch.float64))
    # between grid points: ceil(strength * steps) steps, starting at the shifted strength
    s = strength_sigmas(10, shift, 0.55)
    assert len(s) == 7 and float(s[0]) == pytest.approx(shift_sigmas(0.55, shift), abs=1e-15)
    assert bool((s.diff() < 0).all())


def _t_recording_flow(x0):
    """The delta flow of ``x0`` that also records, per call, the timestep each video (by its x0 index, read
    from the text feature) was given."""
    seen = []

    def denoise(x, t, text):
        which = text.tokens[text.cu_seqlens[:-1].long(), 0].long()
        seen.append({int(w): float(tt) for w, tt in zip(which, t)})
        sig = (t.double() / 1000)[x.seq_ids.long(), None]
        pts = pack_videos([x0[int(w)] for w in which], patch=x.patch).tokens.double()
        return ((x.tokens.double() - pts) / sig + 0.1 * sig).to(x.tokens.dtype)  # not a straight line

    return denoise, seen


def test_strength_zero_returns_the_init_and_strength_one_ignores_it():
    x0 = [torch.randn(s, dtype=torch.float64) for s in SHAPES]
    init = [torch.randn(s, dtype=torch.float64) for s in SHAPES]
    noise = [torch.randn(s, dtype=torch.float64) for s in SHAPES]
    denoise, seen = _t_recording_flow(x0)
    out = sample_euler(denoise, noise, _text(range(3)), steps=4, guidance=1.0, shift=3.0, init=init, strength=0.0)
    assert seen == []
    for o, z in zip(out, init):
        assert torch.equal(o, z)
    plain = sample_euler(denoise, noise, _text(range(3)), steps=4, guidance=1.0, shift=3.0)
    edit1 = sample_euler(denoise, noise, _text(range(3)), steps=4, guidance=1.0, shift=3.0, init=init, strength=1.0)
    for a, b in zip(plain, edit1):
        assert torch.equal(a, b)


@pytest.mark.parametrize("cfg", [False, True])
def test_mixed_strengths_in_one_pack_equal_each_video_alone(cfg):
    """Videos join the pack when their remaining steps begin: each sees its own levels, and the result
    equals sampling it alone; a video is in a forward only over its own steps."""
    x0 = [torch.randn(s, dtype=torch.float64) for s in SHAPES]
    init = [torch.randn(s, dtype=torch.float64) for s in SHAPES]
    noise = [torch.randn(s, dtype=torch.float64) for s in SHAPES]
    strengths = [0.5, 1.0, 0.25]
    inits = [init[0], None, init[2]]
    kw = dict(steps=8, shift=[2.0, 3.0, 5.0], guidance=3.0 if cfg else 1.0)
    text = _text(range(3))
    unc = _text(range(3)) if cfg else None
    denoise, seen = _t_recording_flow(x0)
    out = sample_euler(denoise, noise, text, uncond_text=unc, init=inits, strength=strengths, **kw)
    assert len(seen) == 8
    assert [sorted(s) for s in seen] == [[1]] * 4 + [[0, 1]] * 2 + [[0, 1, 2]] * 2
    for i in range(3):
        d1, seen1 = _t_recording_flow([x0[i]])
        alone = sample_euler(d1, [noise[i]], _text([0]), uncond_text=_text([0]) if cfg else None,
                             init=[inits[i]], strength=strengths[i], steps=8, shift=kw["shift"][i],
                             guidance=kw["guidance"])[0]
        torch.testing.assert_close(out[i], alone, atol=1e-12, rtol=0)
        assert [s[0] for s in seen1] == [s[i] for s in seen if i in s]
        assert len(seen1) == {0: 4, 1: 8, 2: 2}[i]


def test_editing_starts_from_the_noised_input():
    """The first forward sees the shifted strength as its level, at x = (1 − σ0)·init + σ0·ε (with v = 0
    the start comes back unchanged), and only the remaining ceil(strength·steps) steps run."""
    init = [torch.randn(s, dtype=torch.float64) for s in SHAPES]
    noise = [torch.randn(s, dtype=torch.float64) for s in SHAPES]
    calls = []

    def denoise(x, t, text):
        calls.append(t.clone())
        return torch.zeros_like(x.tokens)

    out = sample_euler(denoise, noise, _text([0] * 3), steps=10, guidance=1.0, shift=2.0, init=init, strength=0.3)
    s0 = shift_sigmas(0.3, 2.0)
    assert len(calls) == 3
    torch.testing.assert_close(calls[0], torch.full((3,), 1000 * s0, dtype=torch.float64))
    for o, z, e in zip(out, init, noise):
        torch.testing.assert_close(o, (1 - s0) * z + s0 * e, atol=1e-12, rtol=0)


@pytest.mark.parametrize("strength, exc, match", [
    (1.5, ValueError, r"strength must be a number in \[0, 1\], got 1.5"),
    (-0.1, ValueError, r"strength must be a number in \[0, 1\], got -0.1"),
    (float("nan"), ValueError, r"strength must be a number in \[0, 1\], got nan"),
    ([0.5, 0.5], ValueError, r"strength must be a number or a list of 3 numbers .* got a list of 2"),
    ([0.5, "x", 0.5], TypeError, r"strength\[1\] must be a number in \[0, 1\], got str"),
    ("0.5", TypeError, r"strength must be a number in \[0, 1\] or a list of 3 of them, got str"),
    (True, TypeError, r"got bool"),
])
def test_bad_strength(strength, exc, match):
    with pytest.raises(exc, match=match):
        check_strength(strength, 3)
    noise = [torch.randn(s) for s in SHAPES]
    with pytest.raises(exc, match=match):
        sample_euler(lambda *a: None, noise, _text([0] * 3), init=noise, strength=strength, guidance=1.0)


def test_strength_below_one_needs_an_init():
    noise = [torch.randn(s) for s in SHAPES]
    with pytest.raises(ValueError, match=r"strength\[1\]=0.5 needs an init latent"):
        sample_euler(lambda *a: None, noise, _text([0] * 3), init=[noise[0], None, noise[2]], strength=0.5)
    with pytest.raises(ValueError, match=r"init\[0\] has shape \(4, 1, 6, 5\), expected its noise's"):
        sample_euler(lambda *a: None, noise, _text([0] * 3), init=[torch.zeros(4, 1, 6, 5), None, None])
