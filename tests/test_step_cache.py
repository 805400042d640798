"""Step caches on a tiny random VideoDiT: exact when nothing is reused, per-video and per-CFG-half decisions
(a pack equals each video alone, counts included), fewer evaluations at a threshold, calibration, errors."""
import pytest
import torch
from test_dit import randomize

from sora_fast.models.dit import VideoDiT
from sora_fast.packing import pack_sequences
from sora_fast.sampling import Experts, FirstBlockCache, TeaCache, calibrate_teacache, parse_cache, sample

SHAPES = [(4, 1, 4, 4), (4, 3, 4, 6), (4, 2, 6, 4)]     # an image and two videos, mixed sizes


@pytest.fixture(scope="module")
def dit():
    torch.manual_seed(0)
    with torch.no_grad():
        m = randomize(VideoDiT.from_name("tiny", num_layers=3)).double().eval()
    return m


def _text(n, seed):
    g = torch.Generator().manual_seed(seed)
    return pack_sequences([torch.randn(2 + i, 32, generator=g, dtype=torch.float64) for i in range(n)])


def _run(dit, noise, cache, *, cond=0, uncond=100, stats=None, **kw):
    kw = {**dict(steps=8, guidance=3.0, shift=2.0, solver="unipc"), **kw}
    return sample(dit, noise, _text(len(noise), cond), uncond_text=_text(len(noise), uncond), cache=cache,
                  stats=stats, **kw)


@pytest.mark.parametrize("cache", ["first-block:0", "teacache:0"])
def test_threshold_zero_is_the_plain_sampler_bit_for_bit(dit, cache):
    noise = [torch.randn(s, dtype=torch.float64) for s in SHAPES]
    plain, st = _run(dit, noise, None, stats=(s0 := {})), {}
    cached = _run(dit, noise, cache, stats=st)
    assert all(torch.equal(a, b) for a, b in zip(plain, cached))
    assert st["evaluations"] == s0["evaluations"] == [16, 16, 16]


@pytest.mark.parametrize("cache", ["first-block:0.3", "teacache:0.6"])
def test_decisions_per_video_and_cfg_half(dit, cache):
    """Videos of a pack decide alone: each equals its run alone (values and evaluation counts), with
    fewer evaluations than steps, and held frames stay bit-identical."""
    noise = [torch.randn(s, dtype=torch.float64) for s in SHAPES]
    given = [None, torch.randn(SHAPES[1], dtype=torch.float64), None]
    levels = [None, torch.tensor([0.0, float("nan"), float("nan")], dtype=torch.float64), None]
    st = {}
    out = _run(dit, noise, cache, stats=st, given=given, given_levels=levels)
    assert torch.equal(out[1][:, 0], given[1][:, 0])
    assert sum(st["evaluations"]) < 3 * 16, st
    text, unc = _text(3, 0), _text(3, 100)
    for i in range(3):
        sti = {}
        alone = sample(dit, [noise[i]], pack_sequences([text.unpack(text.tokens)[i]]),
                       uncond_text=pack_sequences([unc.unpack(unc.tokens)[i]]), cache=cache, stats=sti,
                       steps=8, guidance=3.0, shift=2.0, solver="unipc",
                       given=[given[i]] if given[i] is not None else None,
                       given_levels=[levels[i]] if levels[i] is not None else None)[0]
        assert sti["evaluations"][0] == st["evaluations"][i]
        # the same per-token math in a smaller pack: fp64 rounding only
        torch.testing.assert_close(out[i], alone, atol=1e-10, rtol=1e-10)


def test_cache_trades_evaluations_for_a_small_change(dit):
    noise = [torch.randn(s, dtype=torch.float64) for s in SHAPES]
    for make in (FirstBlockCache, TeaCache):
        st = {}
        _run(dit, noise, make(1e9), stats=st, steps=16)   # reuse whenever allowed: only the first and last steps run
        assert st["evaluations"] == [4, 4, 4], (make, st)                  # per video: 2 steps x 2 CFG halves
    # How many steps a threshold saves and how far the video moves are properties of the model and its inputs,
    # not bounds the caches guarantee: over fresh noise this random model's relative change had a median of 0.06
    # but a tail up to 0.19 (of the 0.2 below), and first-block ran up to 87 of 96 evaluations. Fixed noise
    # (the model is fixed by the fixture), so the figures are measured ones with a wide margin.
    g = torch.Generator().manual_seed(0)
    noise = [torch.randn(s, generator=g, dtype=torch.float64) for s in SHAPES]
    ref = _run(dit, noise, None, steps=16)
    for make, threshold in ((FirstBlockCache, 0.3), (TeaCache, 0.4)):
        st = {}
        out = _run(dit, noise, make(threshold), stats=st, steps=16)
        assert sum(st["evaluations"]) < 3 * 32, (make, st)      # some steps reused (measured 81 and 50 of 96)
        for a, b in zip(out, ref):
            assert float((a - b).norm() / b.norm()) < 0.2, make     # measured 0.015-0.084


def test_calibration_fits_a_polynomial(dit):
    noise = [torch.randn(s, dtype=torch.float64) for s in SHAPES[:2]]
    coef = calibrate_teacache(dit, noise, _text(2, 0), uncond_text=_text(2, 100), steps=8, guidance=3.0, degree=2)
    assert len(coef) == 3 and all(torch.isfinite(torch.tensor(coef)))
    assert parse_cache("teacache:0.1:" + ",".join(map(str, coef))) == TeaCache(0.1, coef)


@pytest.mark.parametrize("spec, err, match", [
    ("fast", ValueError, r"cache must be 'first-block:THRESH' or 'teacache:THRESH\[:C_n,...,C_0\]'.*got 'fast'"),
    ("first-block", ValueError, r"got 'first-block'"),
    ("first-block:x", ValueError, r"threshold and coefficients must be numbers"),
    ("first-block:-1", ValueError, r"threshold must be a finite number >= 0, got -1.0"),
    ("teacache:nan", ValueError, r"threshold must be a finite number >= 0, got nan"),
    ("first-block:0.1:1,0", ValueError, r"got 'first-block:0.1:1,0'"),
    (0.05, TypeError, r"cache must be None, a spec string .* got float"),
])
def test_bad_cache_specs(spec, err, match):
    with pytest.raises(err, match=match):
        parse_cache(spec)


def test_cache_needs_a_videodit():
    f = lambda x, t, text: x.tokens  # noqa: E731
    with pytest.raises(TypeError, match="needs denoise to be a sora_fast VideoDiT, got function"):
        sample(f, [torch.randn(SHAPES[0])], _text(1, 0).to("cpu"), cache="first-block:0.05", guidance=1.0)


@pytest.fixture(scope="module")
def experts(dit):
    torch.manual_seed(1)
    with torch.no_grad():
        low = randomize(VideoDiT.from_name("tiny", num_layers=3)).double().eval()
    return Experts([dit, low], [500.0])


def _spy(experts):
    """Record ``(step, expert, sequences)`` each time an expert's last block runs (a full evaluation)."""
    seen, step = [], [0]
    hooks = [e.blocks[-1].register_forward_pre_hook(
        lambda m, args, k=k: seen.append((step[0], k, args[5].num_sequences))) for k, e in enumerate(experts.experts)]
    return seen, step, hooks


@pytest.mark.parametrize("cache", ["first-block:0", "teacache:0"])
def test_experts_threshold_zero_is_the_plain_two_expert_run(experts, cache):
    """Per-video shifts put the videos of one step on different experts: one sub-pack per expert, bit-exact."""
    noise = [torch.randn(s, dtype=torch.float64) for s in SHAPES]
    seen, _, hooks = _spy(experts)
    try:
        s0, st = {}, {}
        plain = _run(experts, noise, None, stats=s0, shift=[1.0, 8.0, 2.0])
        split = any(n < 6 for _, _, n in seen)                      # some step ran fewer than all 2x3 sequences
        cached = _run(experts, noise, cache, stats=st, shift=[1.0, 8.0, 2.0])
    finally:
        for h in hooks:
            h.remove()
    assert split
    assert all(torch.equal(a, b) for a, b in zip(plain, cached))
    assert st["evaluations"] == s0["evaluations"] == [16, 16, 16]


@pytest.mark.parametrize("cache", ["first-block:1e9", "teacache:1e9"])
def test_experts_unbounded_threshold_computes_each_experts_first_and_last_step(experts, cache):
    noise = [torch.randn(s, dtype=torch.float64) for s in SHAPES]
    seen, step, hooks = _spy(experts)
    prog = lambda i, n: step.__setitem__(0, i)  # noqa: E731
    try:
        _run(experts, noise, None, progress=prog)
        ranges = [sorted({i for i, k, _ in seen if k == e}) for e in (0, 1)]
        seen.clear()
        step[0] = 0
        st = {}
        _run(experts, noise, cache, stats=st, progress=prog)
    finally:
        for h in hooks:
            h.remove()
    assert all(len(r) >= 2 for r in ranges) and ranges[0][-1] + 1 == ranges[1][0], ranges
    for e, r in enumerate(ranges):      # all 3 videos x 2 CFG halves, in one pack, on the range's ends only
        assert [(i, n) for i, k, n in seen if k == e] == [(r[0], 6), (r[-1], 6)], (e, seen)
    assert st["evaluations"] == [8, 8, 8]


@pytest.mark.parametrize("cache", ["first-block:1e9", "teacache:1e9"])
def test_experts_cached_output_comes_from_its_expert(dit, cache):
    """Experts whose outputs are two constants: a step reused on either expert still gives that expert's."""
    torch.manual_seed(2)
    consts = []
    for c in (1.0, -2.0):
        with torch.no_grad():
            m = randomize(VideoDiT.from_name("tiny", num_layers=3)).double().eval()
            m.proj_out.weight.zero_()
            m.proj_out.bias.fill_(c)
        consts.append(m)
    ex = Experts(consts, [500.0])
    noise = [torch.randn(s, dtype=torch.float64) for s in SHAPES]
    plain = _run(ex, noise, None, solver="euler")
    cached = _run(ex, noise, cache, solver="euler")
    assert all(torch.equal(a, b) for a, b in zip(plain, cached))


def test_cache_refuses_parallel_experts(dit):
    f = lambda x, t, text: x.tokens  # noqa: E731
    with pytest.raises(TypeError, match="needs every expert to be a sora_fast VideoDiT, got function for expert 1"):
        sample(Experts([dit, f], [500.0]), [torch.randn(SHAPES[0], dtype=torch.float64)], _text(1, 0),
               cache="first-block:0.05", guidance=1.0)
