"""Tests for sora_fast.ops.apply_rope3d against independent references: a pure-python per-element
rotation, a complex-number implementation from the Wan2.1 formula, and (when diffusers is installed)
the cos/sin tables of diffusers' ``WanRotaryPosEmbed`` applied the way diffusers' Wan attention does.
Plus rotation properties, gradients, backend selection and every validation error."""
import importlib
import math
import re

import pytest
import torch
from _utils import assert_close
from hypothesis import given, settings
from hypothesis import strategies as st

from sora_fast.ops import BackendUnavailableError, Rope3D, apply_rope3d, registered_backends

OP = "apply_rope3d"
BACKEND = "torch"
DTYPES = [torch.float64, torch.float32, torch.float16, torch.bfloat16]
# Wan2.1's split D - 4(D//6), 2(D//6), 2(D//6), worked out by hand.
WAN_SPLITS = {12: (4, 4, 4), 24: (8, 8, 8), 30: (10, 10, 10), 64: (24, 20, 20), 128: (44, 42, 42),
              2: (2, 0, 0), 6: (2, 2, 2)}


# ----------------------------------------------------------------------------------------------
# independent references


def loop_rope(x, coords, theta=10000.0, split=None):
    """Pure python, one element at a time: pair p = (x[2p], x[2p+1]) belongs to axis a (pairs handed
    out t, then h, then w) and is the j-th pair of that axis, angle = coord_a * theta^(-2j/d_a)."""
    N, H, D = x.shape
    split = split or WAN_SPLITS[D]
    pairs = [(axis, theta ** (-(2 * j) / dim)) for axis, dim in enumerate(split) for j in range(dim // 2)]
    xs, cs = x.double().tolist(), coords.tolist()
    out = [[[0.0] * D for _ in range(H)] for _ in range(N)]
    for n in range(N):
        for p, (axis, freq) in enumerate(pairs):
            c, s = math.cos(cs[n][axis] * freq), math.sin(cs[n][axis] * freq)
            for h in range(H):
                a, b = xs[n][h][2 * p], xs[n][h][2 * p + 1]
                out[n][h][2 * p], out[n][h][2 * p + 1] = a * c - b * s, a * s + b * c
    return torch.tensor(out, dtype=torch.float64).reshape(N, H, D)


def complex_rope(x, coords, theta=10000.0, split=None):
    """Wan2.1's rope_apply: interleaved pairs as complex numbers times exp(i * coord * freq), fp64."""
    N, H, D = x.shape
    split = split or WAN_SPLITS[D]
    angles = []
    for axis, dim in enumerate(split):
        freqs = 1.0 / torch.pow(theta, torch.arange(0, dim, 2, dtype=torch.float64) / dim)   # (dim/2,)
        angles.append(torch.outer(coords[:, axis].to(torch.float64), freqs))               # (N, dim/2)
    ang = torch.cat(angles, dim=1)                                                         # (N, D/2)
    rot = torch.polar(torch.ones_like(ang), ang)[:, None, :]                               # (N, 1, D/2)
    xc = torch.view_as_complex(x.to(torch.float64).reshape(N, H, D // 2, 2))               # (N, H, D/2)
    return torch.view_as_real(xc * rot).reshape(N, H, D)


def rand_coords(n, lo=0, hi=1000):
    return torch.randint(lo, hi + 1, (n, 3), dtype=torch.int32)


def grid_coords_loop(T, H, W):
    return torch.tensor([(t, h, w) for t in range(T) for h in range(H) for w in range(W)],
                        dtype=torch.int32).reshape(-1, 3)


# ----------------------------------------------------------------------------------------------
# against the references


@pytest.mark.parametrize("dim", [12, 30, 6])
def test_matches_python_loop(dim):
    x = torch.randn(7, 2, dim, dtype=torch.float64)
    coords = rand_coords(7, -20, 1000)
    assert_close(apply_rope3d(x, coords, backend=BACKEND), loop_rope(x, coords))
    split = {12: (2, 6, 4), 30: (0, 20, 10), 6: (6, 0, 0)}[dim]
    assert_close(apply_rope3d(x, coords, theta=777.0, split=split, backend=BACKEND),
                 loop_rope(x, coords, 777.0, split))


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("dim", [12, 64, 128, 30])
def test_matches_complex_reference(dim, dtype):
    n = 53
    x = torch.randn(n, 3, dim, dtype=dtype)
    coords = rand_coords(n)                                     # angles up to ~1000 rad
    coords[0] = torch.tensor([999, 1000, 0], dtype=torch.int32)
    out = apply_rope3d(x, coords, backend=BACKEND)
    assert out.dtype == dtype and out.shape == x.shape
    # the reference rotates the same (already rounded) inputs in fp64; the op may round once more
    assert_close(out, complex_rope(x, coords), dtype, msg=f"D={dim} {dtype}")


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_low_precision_is_rounded_once(dtype):
    """fp32 math, one rounding to x's dtype (the documented contract): the output is the exact rotation
    rounded to ``dtype``, up to the rare near-tie where the fp32 intermediate lands on the other side
    (then 1 ulp off). Rounding cos/sin or the products to ``dtype`` first breaks this in many elements."""
    n, dim = 97, 128
    x = torch.randn(n, 4, dim).to(dtype)
    coords = rand_coords(n)
    out = apply_rope3d(x, coords, backend=BACKEND)
    exact = complex_rope(x, coords)
    rounded = exact.to(dtype)
    off = out != rounded
    assert off.double().mean() < 2e-3, f"{off.double().mean():.2%} of elements are not the exact result rounded once"
    assert ((out.double() - exact).abs() <= torch.finfo(dtype).eps * exact.abs() + 1e-6)[off].all()


def test_default_split_is_wan():
    for dim, split in WAN_SPLITS.items():
        x = torch.randn(9, 2, dim, dtype=torch.float64)
        coords = rand_coords(9, 0, 50)
        torch.testing.assert_close(apply_rope3d(x, coords, backend=BACKEND),
                                   apply_rope3d(x, coords, split=split, backend=BACKEND), atol=0, rtol=0)


@pytest.mark.parametrize("split", [(16, 24, 24), (64, 0, 0), (0, 32, 32), (2, 60, 2), (0, 0, 64), (20, 20, 24)])
def test_custom_split(split):
    x = torch.randn(31, 2, 64, dtype=torch.float64)
    coords = rand_coords(31, -5, 300)
    out = apply_rope3d(x, coords, split=split, backend=BACKEND)
    assert_close(out, complex_rope(x, coords, split=split), msg=str(split))
    # an axis with no dims ignores its coordinate
    for axis, dims in enumerate(split):
        if dims == 0:
            moved = coords.clone()
            moved[:, axis] += 17
            assert_close(apply_rope3d(x, moved, split=split, backend=BACKEND), out)
    # a list is a split too
    assert_close(apply_rope3d(x, coords, split=list(split), backend=BACKEND), out)


@pytest.mark.parametrize("theta", [1.0, 2.5, 500.0, 10000, 1e6])
def test_theta(theta):
    x = torch.randn(19, 2, 24, dtype=torch.float64)
    coords = rand_coords(19, 0, 200)
    assert_close(apply_rope3d(x, coords, theta=theta, backend=BACKEND), complex_rope(x, coords, theta), msg=str(theta))


def test_large_coords_fp32_keeps_fp32_accuracy():
    """Angles of long videos (coords ~1000) must be formed in fp64: an fp32 angle is off by ~3e-5 rad."""
    x = torch.randn(256, 2, 128)
    coords = rand_coords(256, 900, 1000)
    assert_close(apply_rope3d(x, coords, backend=BACKEND), complex_rope(x, coords), torch.float32)


# ----------------------------------------------------------------------------------------------
# diffusers' Wan rotary embedding


@pytest.fixture(scope="module")
def wan_rope_module():
    # diffusers is a test dependency: if it does not import, this fails rather than skips
    return importlib.import_module("diffusers.models.transformers.transformer_wan").WanRotaryPosEmbed


def diffusers_apply_rotary_emb(hidden_states, freqs_cos, freqs_sin):
    """Verbatim from diffusers' WanAttnProcessor (a closure there, so copied)."""
    x1, x2 = hidden_states.unflatten(-1, (-1, 2)).unbind(-1)
    cos = freqs_cos[..., 0::2]
    sin = freqs_sin[..., 1::2]
    out = torch.empty_like(hidden_states)
    out[..., 0::2] = x1 * cos - x2 * sin
    out[..., 1::2] = x1 * sin + x2 * cos
    return out.type_as(hidden_states)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("dim,theta", [(12, 10000.0), (64, 10000.0), (128, 10000.0), (30, 10000.0), (64, 500.0)])
def test_matches_diffusers_tables_at_arbitrary_coords(wan_rope_module, dim, theta, dtype):
    rope = wan_rope_module(attention_head_dim=dim, patch_size=(1, 1, 1), max_seq_len=1024, theta=theta)
    n = 41
    coords = rand_coords(n, 0, 1000)
    cos_axes = rope.freqs_cos.split([rope.t_dim, rope.h_dim, rope.w_dim], dim=1)      # per axis (1024, d_a)
    sin_axes = rope.freqs_sin.split([rope.t_dim, rope.h_dim, rope.w_dim], dim=1)
    cos = torch.cat([c[coords[:, a].long()] for a, c in enumerate(cos_axes)], dim=1)[:, None, :]   # (N, 1, D)
    sin = torch.cat([s[coords[:, a].long()] for a, s in enumerate(sin_axes)], dim=1)[:, None, :]
    x = torch.randn(n, 4, dim, dtype=dtype)
    want = diffusers_apply_rotary_emb(x, cos, sin)
    assert_close(apply_rope3d(x, coords, theta=theta, backend=BACKEND), want, dtype)


@pytest.mark.parametrize("grid", [(3, 5, 7), (1, 4, 3), (1, 1, 1), (2, 1, 6)])
def test_matches_diffusers_on_a_video_grid(wan_rope_module, grid):
    """diffusers builds the tables of a whole (F, H, W) latent, tokens in t-major order."""
    dim = 64
    rope = wan_rope_module(attention_head_dim=dim, patch_size=(1, 2, 2), max_seq_len=1024)
    T, H, W = grid
    cos, sin = rope(torch.zeros(1, 16, T, 2 * H, 2 * W))                              # (1, S, 1, D)
    x = torch.randn(1, T * H * W, 3, dim)                                             # (B, S, heads, D)
    want = diffusers_apply_rotary_emb(x, cos, sin)[0]
    assert_close(apply_rope3d(x[0], grid_coords_loop(T, H, W), backend=BACKEND), want, torch.float32)


# ----------------------------------------------------------------------------------------------
# properties of a rotation (fp64)


def test_rotation_properties():
    x = torch.randn(40, 3, 30, dtype=torch.float64)
    coords = rand_coords(40, -1000, 1000)
    y = apply_rope3d(x, coords, backend=BACKEND)
    # each interleaved pair keeps its length
    assert_close(y.unflatten(-1, (-1, 2)).norm(dim=-1), x.unflatten(-1, (-1, 2)).norm(dim=-1))
    # rotating back by the negated coordinates undoes it
    assert_close(apply_rope3d(y, -coords, backend=BACKEND), x)
    # coordinate 0 is the identity
    assert_close(apply_rope3d(x, torch.zeros_like(coords), backend=BACKEND), x)
    # and it does rotate otherwise
    assert (y - x).abs().max() > 0.1


@settings(max_examples=25, deadline=None)
@given(shift=st.tuples(*[st.integers(-500, 500)] * 3), dim=st.sampled_from([6, 12, 30, 64]))
def test_scores_depend_only_on_relative_position(shift, dim):
    """<R(a) q, R(b) k> == <R(a+s) q, R(b+s) k>: the property RoPE exists for."""
    q, k = torch.randn(8, 2, dim, dtype=torch.float64), torch.randn(8, 2, dim, dtype=torch.float64)
    a, b = rand_coords(8, 0, 300), rand_coords(8, 0, 300)
    s = torch.tensor(shift, dtype=torch.int32)
    base = (apply_rope3d(q, a, backend=BACKEND) * apply_rope3d(k, b, backend=BACKEND)).sum(-1)
    moved = (apply_rope3d(q, a + s, backend=BACKEND) * apply_rope3d(k, b + s, backend=BACKEND)).sum(-1)
    assert_close(moved, base, msg=f"shift={shift} dim={dim}")


def test_rotations_compose():
    x = torch.randn(16, 2, 64, dtype=torch.float64)
    a, b = rand_coords(16, -100, 400), rand_coords(16, -100, 400)
    assert_close(apply_rope3d(apply_rope3d(x, a, backend=BACKEND), b, backend=BACKEND),
                 apply_rope3d(x, a + b, backend=BACKEND))


# ----------------------------------------------------------------------------------------------
# gradients


@pytest.mark.parametrize("dim,split", [(6, None), (12, None), (10, (2, 0, 8))])
def test_gradcheck(dim, split):
    x = torch.randn(5, 2, dim, dtype=torch.float64, requires_grad=True)
    coords = rand_coords(5, -30, 1000)
    assert torch.autograd.gradcheck(lambda x: apply_rope3d(x, coords, theta=300.0, split=split, backend=BACKEND),
                                    (x,), eps=1e-6, atol=1e-7, rtol=1e-6)


@pytest.mark.parametrize("dtype", DTYPES)
def test_grad_is_the_inverse_rotation(dtype):
    """The Jacobian is a rotation, so the gradient is the upstream gradient rotated back."""
    x = torch.randn(33, 2, 64, dtype=dtype, requires_grad=True)
    coords = rand_coords(33)
    g = torch.randn_like(x)
    (dx,) = torch.autograd.grad(apply_rope3d(x, coords, backend=BACKEND), x, g)
    assert dx.dtype == dtype
    assert_close(dx, complex_rope(g, -coords), dtype)


def test_module_equals_function():
    x = torch.randn(11, 2, 24, dtype=torch.float64)
    coords = rand_coords(11)
    for kw in ({}, dict(theta=50.0), dict(split=(8, 8, 8)), dict(theta=3e5, split=(4, 16, 4))):
        torch.testing.assert_close(Rope3D(**kw, backend=BACKEND)(x, coords),
                                   apply_rope3d(x, coords, **kw, backend=BACKEND), atol=0, rtol=0)
    assert "theta=50.0" in repr(Rope3D(theta=50.0)) and "(8, 8, 8)" in repr(Rope3D(split=(8, 8, 8)))


def test_layouts_and_edge_sizes():
    qk = torch.randn(21, 2, 3, 12)                                 # packed (N, 2, H, D) projection
    coords = rand_coords(21)
    k = qk[:, 1]
    assert not k.is_contiguous()
    assert_close(apply_rope3d(k, coords, backend=BACKEND), complex_rope(k, coords), torch.float32)
    xt = torch.randn(3, 21, 12).transpose(0, 1)                    # head-major storage
    assert_close(apply_rope3d(xt, coords, backend=BACKEND), complex_rope(xt, coords), torch.float32)
    empty = apply_rope3d(torch.randn(0, 2, 12), torch.zeros(0, 3, dtype=torch.int32), backend=BACKEND)
    assert empty.shape == (0, 2, 12)
    x2 = torch.randn(4, 1, 2, dtype=torch.float64)                 # D=2: the t axis takes the only pair
    c2 = rand_coords(4)
    assert_close(apply_rope3d(x2, c2, backend=BACKEND), complex_rope(x2, c2))


# ----------------------------------------------------------------------------------------------
# backend selection


# Backends with a registered kernel are tested by that kernel's own test file, not here.
@pytest.mark.parametrize("backend", [b for b in ("triton", "cuda") if b not in registered_backends(OP)])
def test_kernel_backends_without_kernel_raise(backend):
    with pytest.raises(BackendUnavailableError, match=rf"{backend}.*{OP}|{OP}.*{backend}"):
        apply_rope3d(torch.randn(3, 1, 6), rand_coords(3), backend=backend)


def test_env_var_selects_backend(monkeypatch):
    x, coords = torch.randn(3, 1, 6, dtype=torch.float64), rand_coords(3)
    monkeypatch.setenv("SORA_FAST_BACKEND", "torch")
    assert_close(apply_rope3d(x, coords), complex_rope(x, coords))
    missing = [b for b in ("cuda", "triton") if b not in registered_backends(OP)]
    if missing:  # the environment's choice is obeyed: a backend with no kernel raises, nothing falls back
        monkeypatch.setenv("SORA_FAST_BACKEND", missing[0])
        with pytest.raises(BackendUnavailableError, match=missing[0]):
            apply_rope3d(x, coords)
        assert_close(apply_rope3d(x, coords, backend="torch"), complex_rope(x, coords))
    monkeypatch.setenv("SORA_FAST_BACKEND", "Torch")
    with pytest.raises(ValueError, match=r"SORA_FAST_BACKEND.*'Torch'"):
        apply_rope3d(x, coords)
    monkeypatch.delenv("SORA_FAST_BACKEND")
    with pytest.raises(ValueError, match=r"backend must be one of .*'gpu'"):
        apply_rope3d(x, coords, backend="gpu")


# ----------------------------------------------------------------------------------------------
# validation: every error names the argument and the offending value

X = torch.randn(5, 2, 12)
C = torch.zeros(5, 3, dtype=torch.int32)
VALIDATION_CASES = [
    (dict(x=X.tolist()), TypeError, r"x must be a torch.Tensor, got list"),
    (dict(x=X[0]), ValueError, r"x must be a 3-D tensor \(N, H, D\), got shape \(2, 12\)"),
    (dict(x=X[None]), ValueError, r"x must be a 3-D tensor \(N, H, D\), got shape \(1, 5, 2, 12\)"),
    (dict(x=X.long()), ValueError, r"x must have dtype in \(.*float32.*\), got int64"),
    (dict(x=torch.randn(5, 2, 13)), ValueError, r"even head dim, got x.shape\[-1\]=13"),
    (dict(coords=C.tolist()), TypeError, r"coords must be a torch.Tensor, got list"),
    (dict(coords=C.long()), ValueError, r"coords must have dtype in \(int32\), got int64"),
    (dict(coords=C.float()), ValueError, r"coords must have dtype in \(int32\), got float32"),
    (dict(coords=C[:, 0]), ValueError, r"coords must be a 2-D tensor \(N, 3\), got shape \(5,?\)"),
    (dict(coords=C[:, :2]), ValueError, r"coords must have shape \(5, 3\) .*got \(5, 2\)"),
    (dict(coords=torch.zeros(6, 3, dtype=torch.int32)), ValueError, r"coords must have shape \(5, 3\) .*got \(6, 3\)"),
    (dict(coords=C.to("meta")), ValueError, r"coords must be on cpu .*got meta"),
    (dict(theta=0.0), ValueError, r"theta must be a positive number, got 0.0"),
    (dict(theta=-10000.0), ValueError, r"theta must be a positive number, got -10000.0"),
    (dict(theta=float("nan")), ValueError, r"theta must be a positive number, got nan"),
    (dict(theta="1e4"), ValueError, r"theta must be a positive number, got '1e4'"),
    (dict(theta=None), ValueError, r"theta must be a positive number, got None"),
    (dict(theta=True), ValueError, r"theta must be a positive number, got True"),
    (dict(split=(5, 4, 3)), ValueError, r"split must be 3 even dim counts summing to the head dim 12, got \(5, 4, 3\)"),
    (dict(split=(4, 4, 2)), ValueError, r"split must be 3 even dim counts summing to the head dim 12, got \(4, 4, 2\)"),
    (dict(split=(4, 4, 6)), ValueError, r"summing to the head dim 12, got \(4, 4, 6\)"),
    (dict(split=(6, 6)), ValueError, r"split must be 3 ints, got \(6, 6\)"),
    (dict(split=(4, 4, 2, 2)), ValueError, r"split must be 3 ints, got \(4, 4, 2, 2\)"),
    (dict(split=(16, -2, -2)), ValueError, r"split must be 3 ints >= 0, got \(16, -2, -2\)"),
    (dict(split=(4.0, 4, 4)), ValueError, r"split must be 3 ints, got \(4.0, 4, 4\)"),
    (dict(split=1.5), TypeError, r"split must be an int or a tuple of 3 ints, got float"),
    (dict(split=True), TypeError, r"split must be an int or a tuple of 3 ints, got True"),
]


def _ids(cases):
    return [re.sub(r"[^\w.=<>()' -]", "", pattern)[:60] for _, _, pattern in cases]


@pytest.mark.parametrize("over,exc,pattern", VALIDATION_CASES, ids=_ids(VALIDATION_CASES))
def test_validation_errors(over, exc, pattern):
    args = dict(x=X, coords=C, backend=BACKEND)
    apply_rope3d(**args)                                            # valid as it stands
    args.update(over)
    x, coords = args.pop("x"), args.pop("coords")
    with pytest.raises(exc, match=pattern):
        apply_rope3d(x, coords, **args)


def test_infinite_theta_is_rejected():
    with pytest.raises(ValueError, match=r"theta must be a positive number, got inf"):
        apply_rope3d(X, C, theta=float("inf"), backend=BACKEND)
