"""Tests for sora_fast.ops.spacetime_attention against independent references: per-sequence
``F.scaled_dot_product_attention`` loops, window masks built by a python loop over token pairs, LSE from
explicit scores, and a complex-number 3D RoPE written here from the Wan2.1 formula. Plus gradients,
backend selection, and the wording of every validation error."""
import random
import re
import sys

import pytest
import torch
import torch.nn.functional as F
from _utils import assert_close, assert_within_lowp_error
from torch.nn.attention import SDPBackend, sdpa_kernel

from sora_fast.ops import (
    BackendUnavailableError,
    SpacetimeAttention,
    registered_backends,
    spacetime_attention,
    spacetime_attention_ref,
)

OP = "spacetime_attention"
# Correctness tests run the public op on these backends (CPU tensors). Kernel backends join here once
# they can run on CPU in test time.
BACKEND = "torch"
LOWP = (torch.float16, torch.bfloat16)


# ----------------------------------------------------------------------------------------------
# independent references


def cu(lengths):
    """int32 cumulative offsets of a list of lengths, by plain python."""
    out = [0]
    for n in lengths:
        out.append(out[-1] + n)
    return torch.tensor(out, dtype=torch.int32)


def loop_coords(grid):
    """(t, h, w) of every token of one video, t-major raster, by three nested loops."""
    T, H, W = grid
    return [(t, h, w) for t in range(T) for h in range(H) for w in range(W)]


def loop_window_mask(grid, window):
    """(L, L) bool: query i may see key j, by a python loop over every token pair."""
    c = loop_coords(grid)
    wt, wh, ww = window
    rows = []
    for a in c:
        rows.append([abs(a[0] - b[0]) <= wt and abs(a[1] - b[1]) <= wh and abs(a[2] - b[2]) <= ww for b in c])
    return torch.tensor(rows, dtype=torch.bool).reshape(len(c), len(c))


def wan_rope(x, coords, theta=10000.0):
    """Wan2.1's rope_apply, rewritten: pairs (x[2i], x[2i+1]) as complex numbers times exp(i*angle), the
    head dim split t/h/w = D-4(D//6), 2(D//6), 2(D//6), freqs 1/theta^(2j/d_axis); fp64 throughout."""
    N, H, D = x.shape
    d = 2 * (D // 6)
    angles = []
    for axis, dim in enumerate((D - 2 * d, d, d)):
        freqs = 1.0 / torch.pow(theta, torch.arange(0, dim, 2, dtype=torch.float64) / dim)   # (dim/2,)
        angles.append(torch.outer(coords[:, axis].to(torch.float64), freqs))               # (N, dim/2)
    ang = torch.cat(angles, dim=1)                                                         # (N, D/2)
    rot = torch.polar(torch.ones_like(ang), ang)[:, None, :]                               # (N, 1, D/2)
    xc = torch.view_as_complex(x.to(torch.float64).reshape(N, H, D // 2, 2))               # (N, H, D/2)
    return torch.view_as_real(xc * rot).reshape(N, H, D)


def sdpa_loop(q, k, v, lens_q, lens_k=None, *, scale=None, masks=None, dtype=torch.float64):
    """Per-sequence F.scaled_dot_product_attention in ``dtype``; empty key sequence -> zeros. Always torch's
    math backend: the fused CPU kernels' fp64 accuracy depends on the machine (a 6e-11 error at 300 keys was
    seen on one CI host), and a reference must not."""
    lens_k = lens_q if lens_k is None else lens_k
    H, Dv = q.shape[1], v.shape[2]
    outs = [torch.zeros(0, H, Dv, dtype=dtype)]
    oq = ok = 0
    for i, (lq, lk) in enumerate(zip(lens_q, lens_k)):
        qi = q[oq:oq + lq].to(dtype).transpose(0, 1)   # (H, Lq, D)
        ki = k[ok:ok + lk].to(dtype).transpose(0, 1)   # (H, Lk, D)
        vi = v[ok:ok + lk].to(dtype).transpose(0, 1)   # (H, Lk, Dv)
        if lq and lk:
            mask = None if masks is None else masks[i]
            with sdpa_kernel(SDPBackend.MATH):
                out = F.scaled_dot_product_attention(qi, ki, vi, attn_mask=mask, scale=scale)
            outs.append(out.transpose(0, 1))
        elif lq:
            outs.append(torch.zeros(lq, H, Dv, dtype=dtype))
        oq, ok = oq + lq, ok + lk
    return torch.cat(outs)


def lse_loop(q, k, lens_q, lens_k=None, *, scale=None, masks=None):
    """(H, Nq) natural-log LSE of the explicit scaled scores, fp64; -inf for rows with no keys."""
    lens_k = lens_q if lens_k is None else lens_k
    H, D = q.shape[1], q.shape[2]
    scale = D ** -0.5 if scale is None else scale
    cols = [torch.zeros(H, 0, dtype=torch.float64)]
    oq = ok = 0
    for i, (lq, lk) in enumerate(zip(lens_q, lens_k)):
        qi = q[oq:oq + lq].double().transpose(0, 1)
        ki = k[ok:ok + lk].double().transpose(0, 1)
        if lq and lk:
            s = torch.einsum("hqd,hkd->hqk", qi, ki) * scale
            if masks is not None:
                s = s.masked_fill(~masks[i], float("-inf"))
            cols.append(torch.logsumexp(s, dim=-1))
        elif lq:
            cols.append(torch.full((H, lq), float("-inf"), dtype=torch.float64))
        oq, ok = oq + lq, ok + lk
    return torch.cat(cols, dim=1)


def rand_qkv(n_q, n_k, heads, dim, dim_v=None, dtype=torch.float32, requires_grad=False):
    q = torch.randn(n_q, heads, dim, dtype=dtype, requires_grad=requires_grad)
    k = torch.randn(n_k, heads, dim, dtype=dtype, requires_grad=requires_grad)
    v = torch.randn(n_k, heads, dim_v or dim, dtype=dtype, requires_grad=requires_grad)
    return q, k, v


def shuffled(lengths):
    lengths = list(lengths)
    random.shuffle(lengths)
    return lengths


ATTN_FNS = {
    "ref": lambda *a, backend=None, **kw: spacetime_attention_ref(*a, **kw),
    "op": lambda *a, backend=BACKEND, **kw: spacetime_attention(*a, backend=backend, **kw),
}
PACK = [1, 17, 0, 113, 300]


# ----------------------------------------------------------------------------------------------
# forward against SDPA


@pytest.mark.parametrize("fn", ["ref", "op"])
@pytest.mark.parametrize("heads,dim", [(1, 16), (3, 64), (2, 24)])
def test_self_attention_matches_sdpa_fp64(fn, heads, dim):
    lens = shuffled(PACK)
    q, k, v = rand_qkv(sum(lens), sum(lens), heads, dim, dtype=torch.float64)
    out, lse = ATTN_FNS[fn](q, k, v, cu(lens), return_lse=True)
    assert out.shape == (sum(lens), heads, dim) and out.dtype == torch.float64
    assert_close(out, sdpa_loop(q, k, v, lens), msg=f"lens={lens}")
    assert_close(lse, lse_loop(q, k, lens), msg=f"lens={lens}")


@pytest.mark.parametrize("heads,dim", [(2, 16), (4, 64), (3, 24)])
def test_self_attention_fp32_matches_sdpa(heads, dim):
    lens = shuffled(PACK)
    q, k, v = rand_qkv(sum(lens), sum(lens), heads, dim)
    out, lse = spacetime_attention(q, k, v, cu(lens), return_lse=True, backend=BACKEND)
    assert out.dtype == torch.float32 and lse.dtype == torch.float32 and lse.shape == (heads, sum(lens))
    assert_close(out, sdpa_loop(q, k, v, lens), torch.float32)
    assert_close(lse, lse_loop(q, k, lens), torch.float32)


@pytest.mark.parametrize("dtype", LOWP)
@pytest.mark.parametrize("heads,dim", [(2, 64), (3, 24)])
def test_low_precision_within_sdpa_error(dtype, heads, dim):
    lens = shuffled(PACK)
    q, k, v = rand_qkv(sum(lens), sum(lens), heads, dim, dtype=dtype)
    out, lse = spacetime_attention(q, k, v, cu(lens), return_lse=True, backend=BACKEND)
    assert out.dtype == dtype and lse.dtype == torch.float32
    ref = sdpa_loop(q, k, v, lens, dtype=torch.float32)            # fp32 math on the same low-precision inputs
    peer = sdpa_loop(q, k, v, lens, dtype=dtype)                   # PyTorch's own low-precision attention
    assert_within_lowp_error(out, ref, peer, msg=f"{dtype} lens={lens}")
    # The LSE is fp32 output computed from the (exact) low-precision inputs: fp32 accuracy expected.
    assert_close(lse, lse_loop(q, k, lens), torch.float32)


def test_single_token_and_all_empty_packs():
    q, k, v = rand_qkv(1, 1, 2, 16)
    out, lse = spacetime_attention(q, k, v, cu([1]), return_lse=True, backend=BACKEND)
    assert_close(out, v)                                          # softmax over one key is 1
    assert_close(lse, (q * k).sum(-1).T * 16 ** -0.5)
    q, k, v = rand_qkv(0, 0, 2, 16)
    out, lse = spacetime_attention(q, k, v, cu([0, 0, 0]), return_lse=True, backend=BACKEND)
    assert out.shape == (0, 2, 16) and lse.shape == (2, 0)


def test_sequences_do_not_attend_across():
    """Changing one sequence's keys/values leaves every other sequence's output bit-identical."""
    lens = [5, 0, 9, 4]
    q, k, v = rand_qkv(18, 18, 2, 8)
    out = spacetime_attention(q, k, v, cu(lens), backend=BACKEND)
    k2, v2 = k.clone(), v.clone()
    k2[5:14] += torch.randn(9, 2, 8)
    v2[5:14] += torch.randn(9, 2, 8)
    out2 = spacetime_attention(q, k2, v2, cu(lens), backend=BACKEND)
    torch.testing.assert_close(out2[:5], out[:5], atol=0, rtol=0)
    torch.testing.assert_close(out2[14:], out[14:], atol=0, rtol=0)
    assert (out2[5:14] - out[5:14]).abs().max() > 1e-3


@pytest.mark.parametrize("scale", [0.05, 0.3, 1.0, 2.5])
def test_custom_scale(scale):
    lens = shuffled([1, 17, 0, 40])
    q, k, v = rand_qkv(sum(lens), sum(lens), 2, 24, dtype=torch.float64)
    out, lse = spacetime_attention(q, k, v, cu(lens), scale=scale, return_lse=True, backend=BACKEND)
    assert_close(out, sdpa_loop(q, k, v, lens, scale=scale))
    assert_close(lse, lse_loop(q, k, lens, scale=scale))
    # an int scale is a scale too
    if scale == 1.0:
        assert_close(spacetime_attention(q, k, v, cu(lens), scale=1, backend=BACKEND), out)


def test_default_scale_is_inverse_sqrt_head_dim():
    lens = [7, 30]
    q, k, v = rand_qkv(37, 37, 2, 24, dtype=torch.float64)
    default = spacetime_attention(q, k, v, cu(lens), backend=BACKEND)
    assert_close(default, sdpa_loop(q, k, v, lens, scale=24 ** -0.5))
    assert_close(default, spacetime_attention(q, k, v, cu(lens), scale=24 ** -0.5, backend=BACKEND))


def test_max_seqlen_upper_bounds_are_accepted():
    lens = [3, 0, 11]
    q, k, v = rand_qkv(14, 14, 1, 8, dtype=torch.float64)
    out = spacetime_attention(q, k, v, cu(lens), None, 11, backend=BACKEND)
    assert_close(out, spacetime_attention(q, k, v, cu(lens), None, 500, backend=BACKEND))
    assert_close(out, sdpa_loop(q, k, v, lens))


# ----------------------------------------------------------------------------------------------
# cross-attention


@pytest.mark.parametrize("fn", ["ref", "op"])
@pytest.mark.parametrize("dim,dim_v", [(16, 16), (24, 40), (64, 8)])
def test_cross_attention_matches_sdpa(fn, dim, dim_v):
    # (video queries, text keys) per sequence: empty text, empty video, both empty, long both
    pairs = shuffled([(17, 5), (30, 0), (0, 7), (0, 0), (1, 1), (113, 77), (4, 1)])
    lens_q, lens_k = [a for a, _ in pairs], [b for _, b in pairs]
    q, k, v = rand_qkv(sum(lens_q), sum(lens_k), 2, dim, dim_v, dtype=torch.float64)
    out, lse = ATTN_FNS[fn](q, k, v, cu(lens_q), cu(lens_k), return_lse=True)
    assert out.shape == (sum(lens_q), 2, dim_v)
    assert_close(out, sdpa_loop(q, k, v, lens_q, lens_k), msg=f"pairs={pairs}")
    assert_close(lse, lse_loop(q, k, lens_q, lens_k), msg=f"pairs={pairs}")
    # rows whose key sequence is empty: exact zeros and -inf
    start = 0
    for lq, lk in pairs:
        if lk == 0 and lq:
            assert torch.equal(out[start:start + lq], torch.zeros_like(out[start:start + lq]))
            assert torch.isneginf(lse[:, start:start + lq]).all()
        start += lq
    assert not torch.isnan(out).any() and not torch.isnan(lse).any()


@pytest.mark.parametrize("dtype", [torch.float32, *LOWP])
def test_cross_attention_dtypes(dtype):
    lens_q, lens_k = shuffled([17, 0, 64, 9]), shuffled([0, 12, 33, 5])
    q, k, v = rand_qkv(sum(lens_q), sum(lens_k), 3, 32, 48, dtype=dtype)
    out, lse = spacetime_attention(q, k, v, cu(lens_q), cu(lens_k), max(lens_q), max(lens_k), return_lse=True,
                                   backend=BACKEND)
    ref = sdpa_loop(q, k, v, lens_q, lens_k, dtype=torch.float32)
    if dtype == torch.float32:
        assert_close(out, ref, torch.float32)
    else:
        assert_within_lowp_error(out, ref, sdpa_loop(q, k, v, lens_q, lens_k, dtype=dtype), msg=str(dtype))
    assert_close(lse, lse_loop(q, k, lens_q, lens_k), torch.float32)


def test_self_attention_value_dim_may_differ():
    lens = [9, 0, 20]
    q, k, v = rand_qkv(29, 29, 2, 16, 40, dtype=torch.float64)
    out = spacetime_attention(q, k, v, cu(lens), backend=BACKEND)
    assert out.shape == (29, 2, 40)
    assert_close(out, sdpa_loop(q, k, v, lens))


# ----------------------------------------------------------------------------------------------
# 3D local windows

GRIDS = [(3, 5, 7), (1, 1, 1), (1, 4, 3), (0, 2, 2), (2, 3, 1), (4, 1, 5)]
WINDOWS = [(0, 0, 0), (1, 1, 1), (0, 1, 2), (2, 0, 1), (1, 3, 0), (9, 9, 9)]


@pytest.mark.parametrize("fn", ["ref", "op"])
@pytest.mark.parametrize("window", WINDOWS)
def test_window_matches_masked_sdpa(fn, window):
    grids = shuffled(GRIDS)
    lens = [t * h * w for t, h, w in grids]
    q, k, v = rand_qkv(sum(lens), sum(lens), 2, 16, dtype=torch.float64)
    masks = [loop_window_mask(g, window) for g in grids]
    grid = torch.tensor(grids, dtype=torch.int32)
    out, lse = ATTN_FNS[fn](q, k, v, cu(lens), window=window, grid=grid, return_lse=True)
    assert_close(out, sdpa_loop(q, k, v, lens, masks=masks), msg=f"grids={grids} window={window}")
    assert_close(lse, lse_loop(q, k, lens, masks=masks), msg=f"grids={grids} window={window}")


def test_window_zero_is_identity_and_huge_window_is_full_attention():
    grids = shuffled([(3, 5, 7), (1, 4, 3), (1, 1, 1)])
    lens = [t * h * w for t, h, w in grids]
    grid = torch.tensor(grids, dtype=torch.int32)
    q, k, v = rand_qkv(sum(lens), sum(lens), 2, 16, dtype=torch.float64)
    out0 = spacetime_attention(q, k, v, cu(lens), window=(0, 0, 0), grid=grid, backend=BACKEND)
    assert_close(out0, v)                                   # each token sees only itself
    big = spacetime_attention(q, k, v, cu(lens), window=(3, 5, 7), grid=grid, backend=BACKEND)
    assert_close(big, spacetime_attention(q, k, v, cu(lens), backend=BACKEND))
    # an int window means the same size on every axis
    assert_close(spacetime_attention(q, k, v, cu(lens), window=1, grid=grid, backend=BACKEND),
                 spacetime_attention(q, k, v, cu(lens), window=(1, 1, 1), grid=grid, backend=BACKEND))


@pytest.mark.parametrize("dtype", [torch.float32, *LOWP])
def test_window_dtypes(dtype):
    grids = shuffled([(3, 5, 7), (1, 4, 3), (2, 6, 6)])
    window = (1, 2, 1)
    lens = [t * h * w for t, h, w in grids]
    masks = [loop_window_mask(g, window) for g in grids]
    q, k, v = rand_qkv(sum(lens), sum(lens), 2, 32, dtype=dtype)
    out, lse = spacetime_attention(q, k, v, cu(lens), window=window, grid=torch.tensor(grids, dtype=torch.int32),
                                   return_lse=True, backend=BACKEND)
    ref = sdpa_loop(q, k, v, lens, masks=masks, dtype=torch.float32)
    if dtype == torch.float32:
        assert_close(out, ref, torch.float32)
    else:
        assert_within_lowp_error(out, ref, sdpa_loop(q, k, v, lens, masks=masks, dtype=dtype), msg=str(dtype))
    assert_close(lse, lse_loop(q, k, lens, masks=masks), torch.float32)


def test_grid_without_window_changes_nothing():
    grids = [(1, 4, 3), (2, 2, 2)]
    q, k, v = rand_qkv(20, 20, 2, 8, dtype=torch.float64)
    out = spacetime_attention(q, k, v, cu([12, 8]), grid=torch.tensor(grids, dtype=torch.int32), backend=BACKEND)
    assert_close(out, sdpa_loop(q, k, v, [12, 8]))


# ----------------------------------------------------------------------------------------------
# fused 3D RoPE


def random_coords(grids):
    """Per-token (t, h, w) of each video, t-major, as the packer makes them; int32 (N, 3)."""
    rows = [c for g in grids for c in loop_coords(g)]
    return torch.tensor(rows, dtype=torch.int32).reshape(-1, 3)


@pytest.mark.parametrize("fn", ["ref", "op"])
@pytest.mark.parametrize("dim,theta", [(12, 10000.0), (64, 10000.0), (24, 500.0), (30, 1e6)])
def test_rope_matches_rotate_then_attend(fn, dim, theta):
    grids = shuffled([(3, 5, 7), (1, 4, 3), (0, 3, 3), (2, 1, 1)])
    lens = [t * h * w for t, h, w in grids]
    coords = random_coords(grids)
    q, k, v = rand_qkv(sum(lens), sum(lens), 2, dim, dtype=torch.float64)
    out, lse = ATTN_FNS[fn](q, k, v, cu(lens), rope_coords=coords, rope_theta=theta, return_lse=True)
    qr, kr = wan_rope(q, coords, theta), wan_rope(k, coords, theta)
    assert_close(out, sdpa_loop(qr, kr, v, lens))
    assert_close(lse, lse_loop(qr, kr, lens))
    # and it is not a no-op
    assert (out - sdpa_loop(q, k, v, lens)).abs().max() > 1e-3


def test_rope_with_large_arbitrary_coords_fp32():
    lens = shuffled([1, 17, 0, 64])
    n = sum(lens)
    coords = torch.randint(0, 1000, (n, 3), dtype=torch.int32)
    q, k, v = rand_qkv(n, n, 2, 64)
    out = spacetime_attention(q, k, v, cu(lens), rope_coords=coords, backend=BACKEND)
    assert_close(out, sdpa_loop(wan_rope(q, coords), wan_rope(k, coords), v, lens), torch.float32)


@pytest.mark.parametrize("dtype", LOWP)
def test_rope_window_low_precision(dtype):
    grids = shuffled([(3, 5, 7), (1, 4, 3), (1, 1, 1)])
    window = (1, 1, 2)
    lens = [t * h * w for t, h, w in grids]
    coords = random_coords(grids)
    masks = [loop_window_mask(g, window) for g in grids]
    q, k, v = rand_qkv(sum(lens), sum(lens), 2, 64, dtype=dtype)
    out = spacetime_attention(q, k, v, cu(lens), window=window, grid=torch.tensor(grids, dtype=torch.int32),
                              rope_coords=coords, backend=BACKEND)
    qr, kr = wan_rope(q, coords), wan_rope(k, coords)
    ref = sdpa_loop(qr, kr, v, lens, masks=masks, dtype=torch.float32)
    # peer: PyTorch rotating and attending in the low-precision dtype
    peer = sdpa_loop(qr.to(dtype), kr.to(dtype), v, lens, masks=masks, dtype=dtype)
    assert_within_lowp_error(out, ref, peer, msg=str(dtype))


# ----------------------------------------------------------------------------------------------
# gradients


def _gradcheck(fn, *inputs):
    assert torch.autograd.gradcheck(fn, inputs, eps=1e-6, atol=1e-6, rtol=1e-5, fast_mode=False)


def test_gradcheck_self_attention_with_lse():
    lens = [2, 0, 3, 1]
    cu_q = cu(lens)
    q, k, v = rand_qkv(6, 6, 2, 4, dtype=torch.float64, requires_grad=True)
    _gradcheck(lambda q, k, v: spacetime_attention(q, k, v, cu_q, return_lse=True, backend=BACKEND), q, k, v)
    # the LSE alone (the out cotangent is absent)
    _gradcheck(lambda q, k, v: spacetime_attention(q, k, v, cu_q, return_lse=True, backend=BACKEND)[1], q, k, v)


def test_gradcheck_window_and_rope():
    grids = [(2, 1, 2), (0, 1, 1), (1, 1, 3)]
    lens = [4, 0, 3]
    grid = torch.tensor(grids, dtype=torch.int32)
    coords = random_coords(grids) * 7
    q, k, v = rand_qkv(7, 7, 1, 6, dtype=torch.float64, requires_grad=True)
    _gradcheck(lambda q, k, v: spacetime_attention(q, k, v, cu(lens), window=(0, 1, 0), grid=grid,
                                                   rope_coords=coords, return_lse=True, scale=0.7,
                                                   backend=BACKEND), q, k, v)


def test_gradcheck_cross_attention():
    lens_q, lens_k = [3, 2, 0, 1], [2, 0, 3, 1]
    q, k, v = rand_qkv(6, 6, 2, 4, 3, dtype=torch.float64, requires_grad=True)
    _gradcheck(lambda q, k, v: spacetime_attention(q, k, v, cu(lens_q), cu(lens_k), backend=BACKEND), q, k, v)
    # LSE where every query has keys (the -inf rows have no finite differences)
    lens_q, lens_k = [3, 0, 2], [2, 3, 1]
    _gradcheck(lambda q, k, v: spacetime_attention(q[:5], k, v, cu(lens_q), cu(lens_k), return_lse=True,
                                                   backend=BACKEND)[1], q, k, v)


def _grads(outs, inputs, cots):
    return torch.autograd.grad(outs, inputs, [c.to(o.dtype) for o, c in zip(outs, cots)])


@pytest.mark.parametrize("case", ["self", "window", "rope", "cross"])
def test_fp32_grads_match_sdpa_loop(case):
    kw, masks, lens_k, rope = {}, None, None, None
    if case in ("window", "rope"):
        grids = shuffled([(3, 5, 7), (1, 4, 3), (0, 2, 2), (1, 1, 1)])
        lens = [t * h * w for t, h, w in grids]
        if case == "window":
            kw = dict(window=(1, 2, 0), grid=torch.tensor(grids, dtype=torch.int32))
            masks = [loop_window_mask(g, (1, 2, 0)) for g in grids]
        else:
            rope = random_coords(grids)
            kw = dict(rope_coords=rope)
    else:
        lens = shuffled([1, 17, 0, 113])
    if case == "cross":
        lens_k = shuffled([0, 5, 77, 3])
        kw = dict(cu_seqlens_k=cu(lens_k))
    nq, nk = sum(lens), sum(lens_k or lens)
    q, k, v = rand_qkv(nq, nk, 2, 24, 32 if case == "cross" else 24, requires_grad=True)
    out, lse = spacetime_attention(q, k, v, cu(lens), **kw, return_lse=True, backend=BACKEND)
    dout, dlse = torch.randn_like(out), torch.randn_like(lse)
    dlse[torch.isinf(lse)] = 0
    got = _grads([out, lse], [q, k, v], [dout, dlse])

    q64, k64, v64 = (t.detach().double().requires_grad_() for t in (q, k, v))
    qr, kr = (wan_rope(q64, rope), wan_rope(k64, rope)) if rope is not None else (q64, k64)
    ref_out = sdpa_loop(qr, kr, v64, lens, lens_k, masks=masks)
    ref_lse = lse_loop(qr, kr, lens, lens_k, masks=masks)
    fin = torch.isfinite(ref_lse)
    want = torch.autograd.grad([ref_out, ref_lse[fin]], [q64, k64, v64], [dout.double(), dlse.double()[fin]])
    for name, g, w in zip("qkv", got, want):
        assert g.dtype == torch.float32
        assert_close(g, w, torch.float32, msg=f"d{name} ({case})")
        assert torch.isfinite(g).all()


@pytest.mark.parametrize("kernel", ["fused", "math"])
@pytest.mark.parametrize("layout", ["runs", "padded"])
@pytest.mark.parametrize("case", ["self", "window", "rope", "cross", "window+rope"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_eager_path_matches_sdpa_loop(case, dtype, layout, kernel, monkeypatch):
    """Without ``return_lse`` the eager torch path runs torch's SDPA one call per run of equal-length
    sequences, or pads every sequence into one masked batch (each forced here through the rule's constant),
    or, with a window, frame block by frame block; each call on the fused kernel or on the explicit math
    (forced through its rule's constants, whatever the thread count); its values and gradients must equal
    the per-sequence loop, including empty queries, empty keys and 1-token videos."""
    from sora_fast.reference import attention as R
    monkeypatch.setattr(R, "_CALL_WORK", -1 if layout == "runs" else 2 ** 62)
    monkeypatch.setattr(R, "_MATH_MAX_SCORES", -1 if kernel == "fused" else 2 ** 62)
    monkeypatch.setattr(R, "_MATH_MIN_THREADS", 1)
    chosen, math_pays = [], R._math_pays
    monkeypatch.setattr(R, "_math_pays", lambda *a: chosen.append(math_pays(*a)) or chosen[-1])
    kw, masks, lens_k, rope = {}, None, None, None
    if "window" in case or "rope" in case:
        grids = shuffled([(3, 5, 7), (1, 4, 3), (0, 2, 2), (1, 1, 1), (2, 1, 6), (6, 2, 2)])
        lens = [t * h * w for t, h, w in grids]
        if "window" in case:
            kw.update(window=(1, 2, 0), grid=torch.tensor(grids, dtype=torch.int32))
            masks = [loop_window_mask(g, (1, 2, 0)) for g in grids]
        if "rope" in case:
            rope = random_coords(grids)
            kw.update(rope_coords=rope)
    else:
        lens = shuffled([1, 17, 0, 113, 4, 4])
    if case == "cross":
        lens_k = shuffled([0, 5, 77, 3, 1, 1])
        kw = dict(cu_seqlens_k=cu(lens_k))
    nq, nk = sum(lens), sum(lens_k or lens)
    assert R._padding_pays(cu(lens), kw.get("cu_seqlens_k"), 2) == (layout == "padded")
    q, k, v = rand_qkv(nq, nk, 2, 24, 16 if case == "cross" else 24, dtype=dtype, requires_grad=True)
    out = spacetime_attention(q, k, v, cu(lens), **kw, backend="torch")
    dout = torch.randn_like(out)
    got = torch.autograd.grad(out, [q, k, v], dout)

    q64, k64, v64 = (t.detach().double().requires_grad_() for t in (q, k, v))
    qr, kr = (wan_rope(q64, rope), wan_rope(k64, rope)) if rope is not None else (q64, k64)
    ref = sdpa_loop(qr, kr, v64, lens, lens_k, masks=masks)
    want = torch.autograd.grad(ref, [q64, k64, v64], dout.double())
    assert out.dtype == dtype
    assert chosen and set(chosen) == {kernel == "math"}
    assert_close(out, ref, dtype, msg=f"out ({case})")
    for name, g, w in zip("qkv", got, want):
        assert torch.isfinite(g).all(), f"d{name} ({case}) has non-finite values"
        assert_close(g, w, dtype, msg=f"d{name} ({case})")


def test_padded_path_only_where_padding_pays(monkeypatch):
    """The eager path makes one SDPA call per run of equal-length sequences (one call for equal lengths,
    however large) and pads only packs of many small sequences of different lengths, where the calls cost
    more than the padded work; a pack of one long and many short sequences, where padding would multiply
    the work and the memory, is never padded."""
    from sora_fast.ops import attention as A
    assert not A._padding_pays(cu([120] * 9), None, 4)                      # one run: one call, nothing padded
    assert not A._padding_pays(cu([2000, 1900, 2000, 1800]), None, 8)       # few large calls: no padding
    assert not A._padding_pays(cu([1, 17, 0, 113]), None, 2)                # 3 calls beat 3x the work
    assert A._padding_pays(cu([1, 2] * 200), None, 2)                       # 400 tiny calls: pad
    assert A._padding_pays(cu([16, 24] * 8), None, 4, 32)                   # 16 calls, 30% padding: pad
    assert not A._padding_pays(cu([120] + [16] * 64), None, 4)              # 30x the work padded
    assert not A._padding_pays(cu([4000] + [1] * 200), None, 2)             # skewed: the loop
    assert not A._padding_pays(cu([1000] + [16] * 40), cu([1000] + [16] * 40), 4)
    assert not A._padding_pays(cu([90, 91] * 3000), None, 8)                # past the memory cap
    # the choice is made per call, and the loop gives the reference's values
    from sora_fast.reference import attention as R
    calls = []
    monkeypatch.setattr(R, "_sdpa_padded", lambda *a, **k: calls.append(1))
    lens = [300, 1, 2, 1, 1]
    q, k, v = rand_qkv(sum(lens), sum(lens), 2, 16, dtype=torch.float64)
    out = spacetime_attention(q, k, v, cu(lens), backend="torch")
    assert not calls
    assert_close(out, sdpa_loop(q, k, v, lens), torch.float64)


@pytest.mark.parametrize("dtype", LOWP)
def test_low_precision_grads_within_sdpa_error(dtype):
    lens = shuffled([1, 17, 0, 64])
    n = sum(lens)
    q, k, v = rand_qkv(n, n, 2, 32, dtype=dtype, requires_grad=True)
    out = spacetime_attention(q, k, v, cu(lens), backend=BACKEND)
    dout = torch.randn_like(out)
    got = torch.autograd.grad(out, [q, k, v], dout)
    ref_in = [t.detach().float().requires_grad_() for t in (q, k, v)]
    ref = torch.autograd.grad(sdpa_loop(*ref_in, lens, dtype=torch.float32), ref_in, dout.float())
    peer_in = [t.detach().clone().requires_grad_() for t in (q, k, v)]
    peer = torch.autograd.grad(sdpa_loop(*peer_in, lens, dtype=dtype), peer_in, dout)
    for name, g, r, p in zip("qkv", got, ref, peer):
        assert g.dtype == dtype
        assert_within_lowp_error(g, r, p, atol=1e-4, msg=f"d{name} {dtype}")


def test_grads_of_empty_sequences_are_zero():
    lens_q, lens_k = [4, 0, 3], [0, 5, 2]     # sequence 0 has no keys, sequence 1 no queries
    q, k, v = rand_qkv(7, 7, 2, 8, requires_grad=True)
    out = spacetime_attention(q, k, v, cu(lens_q), cu(lens_k), backend=BACKEND)
    dq, dk, dv = torch.autograd.grad(out, [q, k, v], torch.randn_like(out))
    assert torch.equal(dq[:4], torch.zeros_like(dq[:4]))          # queries with nothing to see
    assert torch.equal(dk[:5], torch.zeros_like(dk[:5]))          # keys nobody queries
    assert torch.equal(dv[:5], torch.zeros_like(dv[:5]))
    assert dq[4:].abs().sum() > 0 and dv[5:].abs().sum() > 0


# ----------------------------------------------------------------------------------------------
# layouts and module


def test_non_contiguous_inputs_match():
    lens = shuffled([1, 17, 0, 50])
    n = sum(lens)
    qkv = torch.randn(n, 3, 2, 24, requires_grad=True)           # packed projection output
    q, k, v = qkv[:, 0], qkv[:, 1], qkv[:, 2]
    assert not q.is_contiguous()
    out = spacetime_attention(q, k, v, cu(lens), backend=BACKEND)
    assert_close(out, sdpa_loop(q.detach(), k.detach(), v.detach(), lens), torch.float32)
    dout = torch.randn_like(out)
    (g_strided,) = torch.autograd.grad(out, qkv, dout)
    qc, kc, vc = (t.detach().contiguous().requires_grad_() for t in (q, k, v))
    out_c = spacetime_attention(qc, kc, vc, cu(lens), backend=BACKEND)
    assert_close(out, out_c, torch.float32)
    g_contig = torch.stack(torch.autograd.grad(out_c, [qc, kc, vc], dout), dim=1)
    assert_close(g_strided, g_contig, torch.float32)
    # head-major storage transposed to (N, H, D)
    qt = q.detach().transpose(0, 1).contiguous().transpose(0, 1)
    assert_close(spacetime_attention(qt, k.detach(), v.detach(), cu(lens), backend=BACKEND), out, torch.float32)


def test_module_equals_function():
    grids = [(1, 4, 3), (2, 3, 3)]
    lens = [12, 18]
    grid = torch.tensor(grids, dtype=torch.int32)
    coords = random_coords(grids)
    q, k, v = rand_qkv(30, 30, 2, 12, dtype=torch.float64)
    mod = SpacetimeAttention(window=(1, 1, 1), rope_theta=321.0, scale=0.2, backend=BACKEND)
    want = spacetime_attention(q, k, v, cu(lens), window=(1, 1, 1), grid=grid, rope_coords=coords,
                               rope_theta=321.0, scale=0.2, backend=BACKEND)
    torch.testing.assert_close(mod(q, k, v, cu(lens), grid=grid, rope_coords=coords), want, atol=0, rtol=0)
    assert "window=(1, 1, 1)" in repr(mod) and "321.0" in repr(mod)


# ----------------------------------------------------------------------------------------------
# backend selection


# Backends with a registered kernel are tested by that kernel's own test file, not here.
@pytest.mark.parametrize("backend", [b for b in ("triton", "cuda") if b not in registered_backends(OP)])
def test_kernel_backends_without_kernel_raise(backend):
    q, k, v = rand_qkv(5, 5, 1, 8)
    with pytest.raises(BackendUnavailableError, match=rf"{backend}.*{OP}|{OP}.*{backend}"):
        spacetime_attention(q, k, v, cu([5]), backend=backend)


def test_env_var_selects_backend(monkeypatch):
    q, k, v = rand_qkv(5, 5, 1, 8, dtype=torch.float64)
    monkeypatch.setenv("SORA_FAST_BACKEND", "torch")
    assert_close(spacetime_attention(q, k, v, cu([2, 3])), sdpa_loop(q, k, v, [2, 3]))
    missing = [b for b in ("cuda", "triton") if b not in registered_backends(OP)]
    if missing:  # the environment's choice is obeyed: a backend with no kernel raises, nothing falls back
        monkeypatch.setenv("SORA_FAST_BACKEND", missing[0])
        with pytest.raises(BackendUnavailableError, match=missing[0]):
            spacetime_attention(q, k, v, cu([2, 3]))
        # an explicit backend argument beats the environment
        assert_close(spacetime_attention(q, k, v, cu([2, 3]), backend="torch"), sdpa_loop(q, k, v, [2, 3]))
    monkeypatch.setenv("SORA_FAST_BACKEND", "gpu")
    with pytest.raises(ValueError, match=r"SORA_FAST_BACKEND.*'gpu'"):
        spacetime_attention(q, k, v, cu([2, 3]))


def test_bad_backend_name():
    q, k, v = rand_qkv(5, 5, 1, 8)
    with pytest.raises(ValueError, match=r"backend must be one of .*'flash'"):
        spacetime_attention(q, k, v, cu([5]), backend="flash")


# ----------------------------------------------------------------------------------------------
# validation: every error names the argument and the offending value


def _call(**over):
    """A valid 2-sequence self-attention call (lengths 6 and 4, grids (1,2,3) and (1,2,2)), with overrides."""
    args = dict(q=torch.randn(10, 2, 8), k=torch.randn(10, 2, 8), v=torch.randn(10, 2, 8),
                cu_seqlens_q=cu([6, 4]), backend=BACKEND)
    args.update(over)
    q, k, v, cq = args.pop("q"), args.pop("k"), args.pop("v"), args.pop("cu_seqlens_q")
    return spacetime_attention(q, k, v, cq, **args)


GRID = torch.tensor([[1, 2, 3], [1, 2, 2]], dtype=torch.int32)
META = "meta"


def test_valid_call_passes():
    _call()
    _call(window=(1, 0, 1), grid=GRID, rope_coords=torch.zeros(10, 3, dtype=torch.int32), max_seqlen_q=6)


VALIDATION_CASES = [
    # tensors: type, rank, dtype, device
    (dict(q=[[1.0]]), TypeError, r"q must be a torch.Tensor, got list"),
    (dict(q=torch.randn(10, 16)), ValueError, r"q must be a 3-D tensor \(Nq, H, D\), got shape \(10, 16\)"),
    (dict(k=torch.randn(10, 2, 8, 1)), ValueError, r"k must be a 3-D tensor .*got shape \(10, 2, 8, 1\)"),
    (dict(v=torch.randn(10, 16)), ValueError, r"v must be a 3-D tensor .*got shape \(10, 16\)"),
    (dict(q=torch.randint(0, 3, (10, 2, 8))), ValueError, r"q must have dtype in \(.*float32.*\), got int64"),
    (dict(k=torch.randint(0, 3, (10, 2, 8), dtype=torch.int32)), ValueError,
     r"k must have dtype in \(.*float32.*\), got int32"),
    (dict(k=torch.randn(10, 2, 8, dtype=torch.float64)), ValueError,
     r"k must have the dtype of q .*float32.*got torch.float64"),
    (dict(v=torch.randn(10, 2, 8, dtype=torch.bfloat16)), ValueError,
     r"v must have the dtype of q .*float32.*got torch.bfloat16"),
    (dict(k=torch.randn(10, 2, 8, device=META)), ValueError, r"k must be on cpu .*got meta"),
    (dict(v=torch.randn(10, 2, 8, device=META)), ValueError, r"v must be on cpu .*got meta"),
    # shapes of k, v
    (dict(k=torch.randn(10, 3, 8)), ValueError, r"k must have q's heads and head dim \(_, 2, 8\), got \(10, 3, 8\)"),
    (dict(k=torch.randn(10, 2, 6)), ValueError, r"k must have q's heads and head dim \(_, 2, 8\), got \(10, 2, 6\)"),
    (dict(v=torch.randn(9, 2, 8)), ValueError, r"v must have k's rows and heads \(10, 2, _\), got \(9, 2, 8\)"),
    (dict(v=torch.randn(10, 1, 8)), ValueError, r"v must have k's rows and heads \(10, 2, _\), got \(10, 1, 8\)"),
    (dict(k=torch.randn(7, 2, 8), v=torch.randn(7, 2, 8)), ValueError,
     r"self-attention \(cu_seqlens_k=None\) needs as many k rows as q rows \(10\), got 7"),
    (dict(q=torch.randn(10, 2, 0), k=torch.randn(10, 2, 0), v=torch.randn(10, 2, 0)), ValueError,
     r"q must have a head dim >= 1, got q.shape=\(10, 2, 0\)"),
    # cu_seqlens_q
    (dict(cu_seqlens_q=[0, 6, 10]), TypeError, r"cu_seqlens_q must be a torch.Tensor, got list"),
    (dict(cu_seqlens_q=torch.tensor([0, 6, 10])), ValueError, r"cu_seqlens_q must have dtype in \(int32\), got int64"),
    (dict(cu_seqlens_q=cu([6, 4]).float()), ValueError, r"cu_seqlens_q must have dtype in \(int32\), got float32"),
    (dict(cu_seqlens_q=cu([6, 4])[None]), ValueError,
     r"cu_seqlens_q must be a 1-D tensor \(B\+1,\), got shape \(1, 3\)"),
    (dict(cu_seqlens_q=cu([6, 4]).to(META)), ValueError, r"cu_seqlens_q must be on cpu .*got meta"),
    (dict(cu_seqlens_q=torch.tensor([0], dtype=torch.int32)), ValueError,
     r"cu_seqlens_q must hold B\+1 >= 2 offsets, got 1"),
    (dict(cu_seqlens_q=torch.tensor([1, 6, 10], dtype=torch.int32)), ValueError, r"cu_seqlens_q\[0\] must be 0, got 1"),
    (dict(cu_seqlens_q=torch.tensor([0, 6, 4, 10], dtype=torch.int32)), ValueError,
     r"cu_seqlens_q must be non-decreasing, got cu_seqlens_q\[1\]=6 > cu_seqlens_q\[2\]=4"),
    (dict(cu_seqlens_q=torch.tensor([0, 6, 9], dtype=torch.int32)), ValueError,
     r"cu_seqlens_q\[-1\] must equal the number of tokens \(10\), got 9"),
    (dict(cu_seqlens_q=torch.tensor([0, 6, 11], dtype=torch.int32)), ValueError,
     r"cu_seqlens_q\[-1\] must equal the number of tokens \(10\), got 11"),
    # max_seqlen
    (dict(max_seqlen_q=5), ValueError, r"max_seqlen_q must be >= the longest sequence \(6\), got 5"),
    (dict(max_seqlen_q=-1), ValueError, r"max_seqlen_q must be None or an int >= 0, got -1"),
    (dict(max_seqlen_q=6.0), ValueError, r"max_seqlen_q must be None or an int >= 0, got 6.0"),
    (dict(max_seqlen_q=True), ValueError, r"max_seqlen_q must be None or an int >= 0, got True"),
    (dict(max_seqlen_k="7"), ValueError, r"max_seqlen_k must be None or an int >= 0, got '7'"),
    # scale
    (dict(scale=0.0), ValueError, r"scale must be a positive number, got 0.0"),
    (dict(scale=-0.125), ValueError, r"scale must be a positive number, got -0.125"),
    (dict(scale=float("nan")), ValueError, r"scale must be a positive number, got nan"),
    (dict(scale="0.1"), ValueError, r"scale must be a positive number, got '0.1'"),
    (dict(scale=True), ValueError, r"scale must be a positive number, got True"),
    (dict(scale=torch.tensor(0.1)), ValueError, r"scale must be a positive number, got tensor"),
    # window and grid
    (dict(window=(1, 1, 1)), ValueError, r"window needs grid.*\(B, 3\)"),
    (dict(window=(1, 1), grid=GRID), ValueError, r"window must be 3 ints, got \(1, 1\)"),
    (dict(window=(1, -1, 0), grid=GRID), ValueError, r"window must be 3 ints >= 0, got \(1, -1, 0\)"),
    (dict(window=(1, 1.5, 0), grid=GRID), ValueError, r"window must be 3 ints, got \(1, 1.5, 0\)"),
    (dict(window=1.5, grid=GRID), TypeError, r"window must be an int or a tuple of 3 ints, got float"),
    (dict(window=True, grid=GRID), TypeError, r"window must be an int or a tuple of 3 ints, got True"),
    (dict(window=(1, 1, 1), grid=GRID.tolist()), TypeError, r"grid must be a torch.Tensor, got list"),
    (dict(window=(1, 1, 1), grid=GRID.long()), ValueError, r"grid must have dtype in \(int32\), got int64"),
    (dict(window=(1, 1, 1), grid=GRID[:1]), ValueError, r"grid must have shape \(2, 3\), .*got \(1, 3\)"),
    (dict(window=(1, 1, 1), grid=GRID[:, :2].contiguous()), ValueError,
     r"grid must have shape \(2, 3\), .*got \(2, 2\)"),
    (dict(window=(1, 1, 1), grid=GRID.flatten()), ValueError, r"grid must be a 2-D tensor \(B, 3\), got shape \(6,?\)"),
    (dict(window=(1, 1, 1), grid=GRID.to(META)), ValueError, r"grid must be on cpu .*got meta"),
    (dict(window=(1, 1, 1), grid=torch.tensor([[1, 2, 3], [1, 2, 3]], dtype=torch.int32)), ValueError,
     r"grid\[1\]=\[1, 2, 3\] must be >= 0 and multiply to sequence 1's length 4"),
    (dict(grid=torch.tensor([[1, 3, 2], [2, 2, 2]], dtype=torch.int32)), ValueError,
     r"grid\[1\]=\[2, 2, 2\] must .* length 4"),
    (dict(window=0, grid=torch.tensor([[-1, -2, 3], [1, 2, 2]], dtype=torch.int32)), ValueError,
     r"grid\[0\]=\[-1, -2, 3\] must be >= 0"),
    # rope
    (dict(rope_coords=torch.zeros(10, 3, dtype=torch.int64)), ValueError,
     r"rope_coords must have dtype in \(int32\), got int64"),
    (dict(rope_coords=torch.zeros(10, 2, dtype=torch.int32)), ValueError,
     r"rope_coords must have shape \(10, 3\).*got \(10, 2\)"),
    (dict(rope_coords=torch.zeros(9, 3, dtype=torch.int32)), ValueError,
     r"rope_coords must have shape \(10, 3\).*got \(9, 3\)"),
    (dict(rope_coords=torch.zeros(10, 3, dtype=torch.int32).to(META)), ValueError,
     r"rope_coords must be on cpu .*got meta"),
    (dict(rope_coords=torch.zeros(10, 3).tolist()), TypeError, r"rope_coords must be a torch.Tensor, got list"),
    (dict(q=torch.randn(10, 2, 7), k=torch.randn(10, 2, 7), v=torch.randn(10, 2, 7),
          rope_coords=torch.zeros(10, 3, dtype=torch.int32)), ValueError, r"even head dim, got q.shape\[-1\]=7"),
    (dict(rope_coords=torch.zeros(10, 3, dtype=torch.int32), rope_theta=0.0), ValueError,
     r"rope_theta must be a positive number, got 0.0"),
    (dict(rope_coords=torch.zeros(10, 3, dtype=torch.int32), rope_theta=-1e4), ValueError,
     r"rope_theta must be a positive number, got -10000.0"),
    # return_lse
    (dict(return_lse=1), TypeError, r"return_lse must be a bool, got int"),
    (dict(return_lse="yes"), TypeError, r"return_lse must be a bool, got str"),
]


def _ids(cases):
    return [re.sub(r"[^\w.=<>()' -]", "", pattern)[:60] for _, _, pattern in cases]


# Every bad input raises the same clear error before any kernel runs, on the reference backend and on the
# Triton kernels (the custom op's path; the Triton interpreter on CPU-only machines).
VALIDATION_BACKENDS = ["torch", "triton"]


@pytest.mark.parametrize("backend", VALIDATION_BACKENDS)
@pytest.mark.parametrize("over,exc,pattern", VALIDATION_CASES, ids=_ids(VALIDATION_CASES))
def test_validation_errors(over, exc, pattern, backend):
    with pytest.raises(exc, match=pattern):
        _call(**{"backend": backend, **over})


CROSS_VALIDATION_CASES = [
    (dict(cu_seqlens_k=[0, 3, 5]), TypeError, r"cu_seqlens_k must be a torch.Tensor, got list"),
    (dict(cu_seqlens_k=torch.tensor([0, 3, 5])), ValueError, r"cu_seqlens_k must have dtype in \(int32\), got int64"),
    (dict(cu_seqlens_k=cu([3, 2])[None]), ValueError,
     r"cu_seqlens_k must be a 1-D tensor \(B\+1,\), got shape \(1, 3\)"),
    (dict(cu_seqlens_k=cu([3, 2]).to(META)), ValueError, r"cu_seqlens_k must be on cpu .*got meta"),
    (dict(cu_seqlens_k=cu([3, 1, 1])), ValueError, r"cu_seqlens_k must have cu_seqlens_q's length 3, got 4"),
    (dict(cu_seqlens_k=torch.tensor([2, 3, 5], dtype=torch.int32)), ValueError, r"cu_seqlens_k\[0\] must be 0, got 2"),
    (dict(cu_seqlens_k=torch.tensor([0, 4, 3], dtype=torch.int32)), ValueError,
     r"cu_seqlens_k must be non-decreasing, got cu_seqlens_k\[1\]=4 > cu_seqlens_k\[2\]=3"),
    (dict(cu_seqlens_k=torch.tensor([0, 3, 4], dtype=torch.int32)), ValueError,
     r"cu_seqlens_k\[-1\] must equal the number of tokens \(5\), got 4"),
    (dict(max_seqlen_k=2), ValueError, r"max_seqlen_k must be >= the longest sequence \(3\), got 2"),
    (dict(max_seqlen_k=-3), ValueError, r"max_seqlen_k must be None or an int >= 0, got -3"),
    (dict(window=(1, 1, 1), grid=GRID), ValueError, r"window needs self-attention \(cu_seqlens_k=None\)"),
    (dict(rope_coords=torch.zeros(10, 3, dtype=torch.int32)), ValueError,
     r"rope_coords needs self-attention \(cu_seqlens_k=None\)"),
]


@pytest.mark.parametrize("backend", VALIDATION_BACKENDS)
@pytest.mark.parametrize("over,exc,pattern", CROSS_VALIDATION_CASES, ids=_ids(CROSS_VALIDATION_CASES))
def test_cross_attention_validation_errors(over, exc, pattern, backend):
    """Cross-attention of the 10 query rows (6 + 4) to 5 text rows (3 + 2)."""
    dv = 4 if backend == "torch" else 8                               # the kernels need Dv == D
    args = dict(k=torch.randn(5, 2, 8), v=torch.randn(5, 2, dv), cu_seqlens_k=cu([3, 2]), backend=backend)
    _call(**args)                                                     # valid as it stands
    args.update(over)
    with pytest.raises(exc, match=pattern):
        _call(**args)


@pytest.mark.parametrize("window", [(2 ** 70, 0, 2 ** 64), (sys.maxsize, 10 ** 9, 2 ** 31 - 1)])
def test_window_larger_than_any_grid_is_unbounded(window):
    """Half-sizes past int32 (or int64) act as unbounded on that axis, like any window past the grid."""
    grids = [(3, 2, 5), (2, 1, 4)]
    lens = [30, 8]
    q, k, v = rand_qkv(38, 38, 2, 8)
    out = _call(q=q, k=k, v=v, cu_seqlens_q=cu(lens), window=window, grid=torch.tensor(grids, dtype=torch.int32))
    masks = [loop_window_mask(g, [min(w, 99) for w in window]) for g in grids]
    assert_close(out, sdpa_loop(q, k, v, lens, masks=masks), dtype=torch.float32)


@pytest.mark.parametrize("backend", VALIDATION_BACKENDS)
def test_unsupported_head_dim_on_triton_is_clear(backend):
    q = torch.randn(10, 2, 144)
    if backend == "torch":
        _call(q=q, k=q, v=q, backend=backend)
    else:
        with pytest.raises(ValueError, match=r"head dims 1 to 128, got q.shape\[-1\]=144"):
            _call(q=q, k=q, v=q, backend=backend)


def test_infinite_scale_is_rejected():
    with pytest.raises(ValueError, match=r"scale must be a positive number, got inf"):
        _call(scale=float("inf"))


def test_explicit_math_only_for_short_sequences_on_several_threads(monkeypatch):
    """The eager path leaves torch's fused SDPA for the explicit math only on the CPU, with at least two threads,
    for calls of at most 128 x 128 scores per head (the measured rule); the thread count is read per call."""
    from sora_fast.reference import attention as R
    q = torch.zeros(1)
    monkeypatch.setattr(R.torch, "get_num_threads", lambda: 2)
    assert R._math_pays(q, 128, 128) and R._math_pays(q, 1152, 7) and R._math_pays(q, 1, 1)
    assert not R._math_pays(q, 129, 128) and not R._math_pays(q, 432, 432)
    monkeypatch.setattr(R.torch, "get_num_threads", lambda: 1)
    assert not R._math_pays(q, 16, 16)
    assert not R._math_pays(torch.zeros(1, device="meta"), 16, 16)
