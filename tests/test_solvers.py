"""UniPC and DPM-Solver++ for flow prediction, step by step against diffusers' schedulers on the same model,
levels and noise; packs against each video alone; held frames bit-identical; convergence on an exact flow."""
import math

import diffusers
import pytest
import torch

from sora_fast.packing import pack_sequences, pack_videos
from sora_fast.sampling import sample, sample_euler, strength_sigmas
from sora_fast.sampling.solvers import TOP_LEVEL, solver_levels, step_orders

pytestmark = pytest.mark.filterwarnings("ignore:__array__ implementation:DeprecationWarning")  # diffusers + numpy 2
SHAPE = (4, 3, 4, 6)          # (C, T, H, W): 18 tokens of 16 features with patch (1, 2, 2)
# fp64 end to end on both sides: the two write the same linear combinations in another order, a few ulps
# per step on values O(1); 1e-10 leaves 10^5 ulps of room over <= 12 steps and catches any wrong coefficient.
FP64_TOL = 1e-10
# diffusers' DPM++ step casts the state to float32 (``sample.to(torch.float32)``): two roundings of unit 2^-24
# per step on |x| (the state and its scaled copy), summed over the steps; x4 for their passage through the
# model's next outputs (Lipschitz constant ~1 here). A wrong coefficient is O(h) ~ 1e-1.
def _dpm_tol(steps, x):
    return 4 * steps * 2.0 ** -23 * float(x.abs().max())


def _text(values):
    return pack_sequences([torch.full((1, 1), float(v)) for v in values])


def _model(seed=0, d=16):
    """A smooth nonlinear velocity field of the tokens and the timestep, per token (packing-independent)."""
    g = torch.Generator().manual_seed(seed)
    w1 = torch.randn(d, d, generator=g, dtype=torch.float64) / d ** 0.5
    w2 = torch.randn(d, d, generator=g, dtype=torch.float64) / d ** 0.5

    def f(tokens, t):                                             # (N, D), (N, 1) in [0, 1]
        return torch.tanh(tokens @ w1) * (0.5 + t) + torch.sin(3 * t) * (tokens @ w2) * 0.3 + 0.2 * tokens

    def denoise(x, t, text):
        feat = text.tokens[text.cu_seqlens[:-1].long(), 0][x.seq_ids.long(), None]
        tt = (t.double() / 1000)[x.seq_ids.long(), None] if t.shape[0] == x.num_sequences else None
        if tt is None:  # per-frame timesteps
            from sora_fast.packing import frame_ids
            tt = (t.double() / 1000)[frame_ids(x).long(), None]
        return (f(x.tokens.double(), tt) + 0.1 * feat).to(x.tokens.dtype)

    return f, denoise


def _diffusers_scheduler(solver, order, variant, levels, shift):
    """diffusers' scheduler for flow prediction, its own levels checked against ours, then ours in fp64."""
    n = len(levels) - 1
    common = dict(prediction_type="flow_prediction", use_flow_sigmas=True, flow_shift=shift, solver_order=order,
                  final_sigmas_type="zero", lower_order_final=True)
    if solver == "unipc":
        sch = diffusers.UniPCMultistepScheduler(solver_type=variant, **common)
        unshifted = torch.linspace(1.0, 0.0, n + 1, dtype=torch.float64)[:-1]
        sch.set_timesteps(sigmas=unshifted.numpy())
        # diffusers' own flow levels: ours, with 1 taken as 1 - 1e-6, in float32
        torch.testing.assert_close(sch.sigmas, solver_levels(levels).float(), atol=1e-6, rtol=0)
    else:
        sch = diffusers.DPMSolverMultistepScheduler(algorithm_type="dpmsolver++", solver_type="midpoint", **common)
        sch.set_timesteps(n)   # its flow levels start at shift(0.999), ours at 1: replaced below
    sch.sigmas = solver_levels(levels).clone()
    sch.set_begin_index(0)
    return sch


@pytest.mark.parametrize("solver, order, variant", [
    ("unipc", 1, "bh2"), ("unipc", 2, "bh2"), ("unipc", 3, "bh2"), ("unipc", 2, "bh1"), ("unipc", 3, "bh1"),
    ("dpm++", 1, "bh2"), ("dpm++", 2, "bh2")])
@pytest.mark.parametrize("steps, shift", [(7, 3.0), (4, 1.0)])
def test_steps_match_diffusers(solver, order, variant, steps, shift):
    """Every state the model sees and the result equal diffusers' scheduler run on the same model."""
    f, denoise = _model(seed=steps)
    noise = torch.randn(SHAPE, dtype=torch.float64)
    seen = []

    def spy(x, t, text):
        seen.append((x.tokens.clone(), t.clone()))
        return denoise(x, t, text)

    (out,) = sample(spy, [noise], _text([0]), solver=solver, order=order, variant=variant, steps=steps,
                    guidance=1.0, shift=shift)
    levels = strength_sigmas(steps, shift)
    sch = _diffusers_scheduler(solver, order, variant, levels, shift)
    x = pack_videos([noise]).tokens.clone()
    lv = solver_levels(levels)
    tol = FP64_TOL if solver == "unipc" else _dpm_tol(steps, x)
    for i in range(steps):
        mine, t = seen[i]
        assert float(t) == pytest.approx(1000 * float(lv[i]), rel=1e-15)
        torch.testing.assert_close(mine, x, atol=tol, rtol=FP64_TOL, msg=f"step {i}")
        v = f(x, torch.full((x.shape[0], 1), float(lv[i]), dtype=torch.float64))
        x = sch.step(v, sch.timesteps[i], x).prev_sample
    ref = pack_videos([noise]).unpack(x)[0]
    if solver == "unipc" and variant == "bh1":
        # diffusers' bh1 computes B(h)·0 with B(h) = -inf on the step to σ = 0 (NaN); ours returns the data
        # prediction there, as bh2 does, so the result is the last model call's x − σ·v
        assert torch.isnan(ref).all()
        xl, tl = seen[-1]
        d = xl - float(lv[-2]) * f(xl, torch.full((xl.shape[0], 1), float(lv[-2]), dtype=torch.float64))
        ref = pack_videos([noise]).unpack(d)[0]
    torch.testing.assert_close(out, ref, atol=tol, rtol=FP64_TOL)


@pytest.mark.parametrize("solver, order", [("unipc", 3), ("dpm++", 2)])
def test_an_edit_matches_diffusers_from_its_noised_input(solver, order):
    """strength 0.6 of 8 steps: 5 steps from (1 − σ0)·x0 + σ0·ε, warming up from order 1 as diffusers does
    when it is started part-way (img2img) on the same levels."""
    f, denoise = _model(seed=11)
    noise, x0 = torch.randn(SHAPE, dtype=torch.float64), torch.randn(SHAPE, dtype=torch.float64)
    seen = []

    def spy(x, t, text):
        seen.append(x.tokens.clone())
        return denoise(x, t, text)

    (out,) = sample(spy, [noise], _text([0]), solver=solver, order=order, steps=8, guidance=1.0, shift=2.0,
                    init=[x0], strength=0.6)
    levels = strength_sigmas(8, 2.0, 0.6)
    assert len(seen) == len(levels) - 1 == 5
    sch = _diffusers_scheduler("dpm++", order, "bh2", levels, 2.0) if solver == "dpm++" else None
    if sch is None:   # levels not from 1: diffusers' custom-sigma path would shift them again; set them directly
        sch = diffusers.UniPCMultistepScheduler(prediction_type="flow_prediction", use_flow_sigmas=True,
                                                solver_order=order, final_sigmas_type="zero")
        sch.set_timesteps(5)
        sch.sigmas = levels.clone()
        sch.set_begin_index(0)
    s0 = float(levels[0])
    x = pack_videos([(1 - s0) * x0 + s0 * noise]).tokens
    tol = FP64_TOL if solver == "unipc" else _dpm_tol(5, x)
    for i in range(5):
        torch.testing.assert_close(seen[i], x, atol=tol, rtol=FP64_TOL, msg=f"step {i}")
        x = sch.step(f(x, torch.full((x.shape[0], 1), float(levels[i]), dtype=torch.float64)), sch.timesteps[i],
                     x).prev_sample
    torch.testing.assert_close(out, pack_videos([noise]).unpack(x)[0], atol=tol, rtol=FP64_TOL)


def test_orders_warm_up_and_end_first_order():
    assert step_orders("unipc", 3, 6) == [1, 2, 3, 3, 2, 1]
    assert step_orders("unipc", 2, 1) == [1]
    assert step_orders("dpm++", 2, 5) == [1, 2, 2, 2, 1]
    assert TOP_LEVEL == 1 - 1e-6


def _gaussian_flow(mu, s):
    """Data x0 ~ N(mu, s²) per element: the exact velocity of x_σ = (1−σ)x0 + σε, and the exact ODE path
    from a noise ε, ``x_σ = (1−σ)μ + sqrt((1−σ)²s² + σ²)·ε`` (quantiles are transported)."""
    def denoise(x, t, text):
        sig = (t.double() / 1000)[x.seq_ids.long(), None]
        a = 1 - sig
        d = mu + a * s * s / (a * a * s * s + sig * sig) * (x.tokens - a * mu)   # E[x0 | x_σ]
        return (x.tokens - d) / sig

    def path(sig, eps):
        return (1 - sig) * mu + math.sqrt((1 - sig) ** 2 * s * s + sig * sig) * eps
    return denoise, path


def test_higher_order_converges_faster_on_an_exact_flow():
    """On a Gaussian data distribution (closed-form velocity and ODE path) the state the model sees half way
    (unshifted t = 1/2, a level of both schedules) is closer to the exact path with UniPC and DPM++ than with
    Euler, and order 3 beats order 2; each error shrinks at its order's rate when the steps double."""
    mu, s = 0.7, 0.5
    noise = torch.randn(SHAPE, dtype=torch.float64)
    f, path = _gaussian_flow(mu, s)

    def err(solver, order, steps):
        seen = []

        def spy(x, t, text):
            seen.append((x.tokens.clone(), float(t[0]) / 1000))
            return f(x, t, text)
        sample(spy, [noise], _text([0]), solver=solver, order=order, steps=steps, guidance=1.0, shift=3.0)
        x, sig = seen[steps // 2]
        return float((x - path(sig, pack_videos([noise]).tokens)).abs().max())

    cases = (("euler", 1), ("dpm++", 2), ("unipc", 2), ("unipc", 3))
    e10 = {c: err(*c, 10) for c in cases}
    e20 = {c: err(*c, 20) for c in cases}
    assert e10[("unipc", 2)] < e10[("euler", 1)] / 4 and e10[("dpm++", 2)] < e10[("euler", 1)] / 1.5, e10
    assert e10[("unipc", 3)] < e10[("unipc", 2)], e10
    for c, p in zip(cases, (1, 2, 2, 3)):   # error ~ h^p: doubling the steps divides it by ~2^p (>= 2^(p-0.5))
        assert e20[c] < e10[c] / 2 ** (p - 0.5), (c, e10[c], e20[c])


@pytest.mark.parametrize("solver, order", [("unipc", 3), ("dpm++", 2), ("unipc", 1)])
def test_delta_flow_reaches_the_data_point(solver, order):
    """One data point: every data prediction is exact, so any consistent multistep solver lands on it."""
    x0 = torch.randn(SHAPE, dtype=torch.float64)

    def f(x, t, text):
        sig = (t.double() / 1000)[x.seq_ids.long(), None]
        return (x.tokens - pack_videos([x0] * x.num_sequences).tokens) / sig

    (out,) = sample(f, [torch.randn(SHAPE, dtype=torch.float64)], _text([0]), solver=solver, order=order,
                    steps=6, guidance=1.0, shift=2.0)
    torch.testing.assert_close(out, x0, atol=1e-9, rtol=1e-9)


@pytest.mark.parametrize("solver, order, variant", [("unipc", 3, "bh1"), ("dpm++", 2, "bh2"), ("unipc", 2, "bh2")])
def test_pack_equals_each_video_alone(solver, order, variant):
    """Mixed sizes (an image, 1-frame and 3-frame videos), per-video shifts, an edit joining late, per-frame
    held levels and packed CFG: each video equals its run alone; held frames come back bit-identical."""
    _, denoise = _model(seed=5)
    shapes = [(4, 1, 2, 2), (4, 3, 4, 6), (4, 2, 6, 4)]
    noise = [torch.randn(s, dtype=torch.float64) for s in shapes]
    init = [None, torch.randn(shapes[1], dtype=torch.float64), None]
    given = [None, None, torch.randn(shapes[2], dtype=torch.float64)]
    levels = [None, None, torch.tensor([0.0, float("nan")], dtype=torch.float64)]
    kw = dict(solver=solver, order=order, variant=variant, steps=6, guidance=3.5)
    shifts, strengths = [1.0, 4.0, 2.0], [1.0, 0.5, 1.0]
    calls = []

    def spy(x, t, text):
        calls.append(x.num_sequences)
        return denoise(x, t, text)

    out = sample(spy, noise, _text([0.5, -1.0, 2.0]), uncond_text=_text([0, 0, 0]), shift=shifts, init=init,
                 strength=strengths, given=given, given_levels=levels, **kw)
    assert calls == [4, 4, 4, 6, 6, 6]                    # the edit joins for its last 3 steps; CFG in one pack
    assert torch.equal(out[2][:, 0], given[2][:, 0])     # the held frame, bit for bit
    for i in range(3):
        alone = sample(denoise, [noise[i]], _text([[0.5, -1.0, 2.0][i]]), uncond_text=_text([0]), shift=shifts[i],
                       init=[init[i]] if init[i] is not None else None, strength=strengths[i],
                       given=[given[i]] if given[i] is not None else None,
                       given_levels=[levels[i]] if levels[i] is not None else None, **kw)[0]
        torch.testing.assert_close(out[i], alone, atol=1e-12, rtol=1e-12)


def test_euler_is_sample_euler_bit_for_bit():
    _, denoise = _model(seed=1)
    noise = [torch.randn(s) for s in [(4, 1, 2, 2), (4, 3, 4, 6)]]
    init = [None, torch.randn(4, 3, 4, 6)]
    kw = dict(steps=5, guidance=2.0, uncond_text=_text([0, 0]), shift=[2.0, 3.0], init=init, strength=[1.0, 0.4])
    a = sample(denoise, noise, _text([1, 2]), **kw)
    b = sample_euler(denoise, noise, _text([1, 2]), **kw)
    assert all(torch.equal(x, y) for x, y in zip(a, b))


def test_stats_count_evaluations_per_video():
    _, denoise = _model()
    noise = [torch.randn(s) for s in [(4, 1, 2, 2), (4, 3, 4, 6)]]
    stats = {}
    sample(denoise, noise, _text([1, 2]), uncond_text=_text([0, 0]), steps=4, guidance=2.0, solver="unipc",
           init=[None, torch.randn(4, 3, 4, 6)], strength=[1.0, 0.5], stats=stats)
    assert stats == {"evaluations": [8, 4], "forwards": 4}


@pytest.mark.parametrize("kw, err, match", [
    (dict(solver="heun"), ValueError, r"solver must be one of 'euler', 'unipc', 'dpm\+\+', got 'heun'"),
    (dict(solver="unipc", order=4), ValueError, r"order must be in 1..3 for solver 'unipc', got 4"),
    (dict(solver="dpm++", order=3), ValueError, r"order must be in 1..2 for solver 'dpm\+\+', got 3"),
    (dict(solver="euler", order=2), ValueError, r"order must be in 1..1 for solver 'euler', got 2"),
    (dict(solver="unipc", order=2.0), TypeError, r"order must be an int .* got float 2.0"),
    (dict(solver="unipc", variant="bh3"), ValueError, r"variant must be one of 'bh1', 'bh2'.*got 'bh3'"),
    (dict(stats=[]), TypeError, r"stats must be a dict"),
])
def test_bad_solver_arguments(kw, err, match):
    calls = []
    f = lambda x, t, text: calls.append(1) or x.tokens  # noqa: E731
    with pytest.raises(err, match=match):
        sample(f, [torch.randn(SHAPE)], _text([0]), **kw)
    assert not calls


def test_top_level_only_replaces_one():
    lv = solver_levels(torch.tensor([1.0, 0.5, 0.0], dtype=torch.float64))
    assert lv.tolist() == [1 - 1e-6, 0.5, 0.0] and math.isfinite(math.log(1 - float(lv[0])))
