"""The Triton attention kernels (forward, backward, windows, fused RoPE) against the fp32 reference.

On CPU-only machines these run under the Triton interpreter (tests/conftest.py sets it), with the same
kernels a GPU runs; outputs are NaN-poisoned so an unwritten element shows.
"""
import inspect
import math
import sys
import warnings

import pytest
import torch

import sora_fast.ops as O
from sora_fast.triton import _blocks
from sora_fast.triton import attention as tri
from tests._utils import assert_within_lowp_error

pytestmark = pytest.mark.filterwarnings("ignore::UserWarning")


@pytest.fixture(autouse=True)
def poison_outputs(monkeypatch):
    def nan_empty(shape, dtype, device):
        return torch.full(shape, float("nan"), dtype=dtype, device=device)

    monkeypatch.setattr(tri, "_empty", nan_empty)


def _cu(lens):
    return torch.tensor([0] + list(torch.tensor(lens, dtype=torch.int64).cumsum(0)), dtype=torch.int32)


def _grid_for(length):
    """An awkward (T, H, W) factorization of a sequence length (odd sizes, not block multiples)."""
    best = (1, 1, length)
    for t in range(1, length + 1):
        if length % t:
            continue
        rest = length // t
        for h in range(1, rest + 1):
            if rest % h == 0 and max(t, h, rest // h) - min(t, h, rest // h) < max(best) - min(best):
                best = (t, h, rest // h)
    return best


def _lowp_peer(q, k, v, cu_q, cu_k, scale, window, grid):
    """PyTorch's own attention in the inputs' precision, one sequence at a time (flash-attn's yardstick)."""
    outs, lses = [], []
    bq, bk = cu_q.tolist(), cu_k.tolist()
    for i in range(len(bq) - 1):
        qi, ki, vi = (t[a:b].transpose(0, 1) for t, a, b in ((q, bq[i], bq[i + 1]), (k, bk[i], bk[i + 1]),
                                                              (v, bk[i], bk[i + 1])))
        if qi.shape[1] == 0:
            continue
        if ki.shape[1] == 0:
            outs.append(torch.zeros_like(qi).transpose(0, 1))
            lses.append(torch.full(qi.shape[:2], float("-inf")))
            continue
        s = (qi @ ki.transpose(1, 2)) * scale
        if window is not None:
            s = s.masked_fill(~O.window_mask(grid[i].tolist(), window), float("-inf"))
        outs.append((torch.softmax(s, dim=-1) @ vi).transpose(0, 1))
        lses.append(torch.logsumexp(s.float(), dim=-1))
    return torch.cat(outs), torch.cat(lses, dim=1)


def _strided_view(t, poison):
    """A non-contiguous view equal to ``t``: every other element of a buffer whose gaps hold ``poison``
    (a kernel that ignored the strides would read the poison)."""
    buf = torch.stack([t, torch.full_like(t, poison)], dim=t.dim())
    return buf.select(t.dim(), 0)


def _check(lens, *, heads=2, head_dim=32, dtype=torch.float32, window=None, rope=False, key_lens=None,
           strided=False, strided_tables=False, ref_window=None):
    cu_q = _cu(lens)
    cu_k = _cu(key_lens) if key_lens is not None else None
    if strided_tables:   # cu_seqlens, grid and rope_coords as strided views, poisoned between elements
        cu_q = _strided_view(cu_q, 10 ** 6)
        cu_k = _strided_view(cu_k, 10 ** 6) if cu_k is not None else None
    n_q, n_k = sum(lens), sum(key_lens) if key_lens is not None else sum(lens)
    if strided:  # q, k, v as views into one packed (N, 3, H, D) projection
        leaf = torch.randn(n_q, 3, heads, head_dim, dtype=dtype, requires_grad=True)
        q, k, v = leaf[:, 0], leaf[:, 1], leaf[:, 2]
        inputs = (leaf,)
    else:
        q = torch.randn(n_q, heads, head_dim, dtype=dtype, requires_grad=True)
        k = torch.randn(n_k, heads, head_dim, dtype=dtype, requires_grad=True)
        v = torch.randn(n_k, heads, head_dim, dtype=dtype, requires_grad=True)
        inputs = (q, k, v)
    grid = coords = None
    if window is not None or rope:
        grids = [_grid_for(n) if n else (0, 1, 1) for n in lens]
        grid = torch.tensor(grids, dtype=torch.int32)
        coords = torch.cat([O.grid_coords(g) for g in grids]).to(torch.int32) if rope else None
        if strided_tables:
            grid = _strided_view(grid, 10 ** 6)
            coords = _strided_view(coords, 10 ** 6) if rope else None
    kw = dict(window=window, grid=grid if window is not None else None, rope_coords=coords, return_lse=True)

    out, lse = O.spacetime_attention(q, k, v, cu_q, cu_k, backend="triton", **kw)
    if ref_window is not None:     # the reference's equivalent window (e.g. a huge one made finite)
        kw["window"] = window = ref_window
    dout = torch.randn_like(out)
    grads = torch.autograd.grad(out, inputs, dout)

    # fp32 reference on the same (rounded) inputs
    ref_inputs = tuple(t.detach().float().requires_grad_(True) for t in inputs)
    rq, rk, rv = (ref_inputs[0][:, i] for i in range(3)) if strided else ref_inputs
    ref_out, ref_lse = O.spacetime_attention_ref(rq, rk, rv, cu_q, cu_k, **kw)
    ref_grads = torch.autograd.grad(ref_out, ref_inputs, dout.float())

    assert not out.isnan().any() and not any(g.isnan().any() for g in grads), "an output element was not written"
    finite = torch.isfinite(ref_lse)
    assert torch.equal(torch.isfinite(lse), finite), "rows without keys must have LSE = -inf"
    if dtype == torch.float32:
        torch.testing.assert_close(lse[finite], ref_lse[finite], atol=2e-5, rtol=1e-5)
        torch.testing.assert_close(out, ref_out, atol=2e-5, rtol=2e-5)
        for g, r in zip(grads, ref_grads):
            torch.testing.assert_close(g, r, atol=5e-5, rtol=5e-5)
        return
    # low precision: error vs the fp32 reference at most twice PyTorch's own low-precision error
    pq, pk, pv = (t.detach().requires_grad_(True) for t in (q, k, v))
    if rope:
        pq_r, pk_r = O.apply_rope3d_ref(pq, coords), O.apply_rope3d_ref(pk, coords)
    else:
        pq_r, pk_r = pq, pk
    peer, peer_lse = _lowp_peer(pq_r, pk_r, pv, cu_q, cu_k if cu_k is not None else cu_q, head_dim ** -0.5,
                                window, grid)
    peer_grads = torch.autograd.grad(peer, (pq, pk, pv), dout)
    assert_within_lowp_error(out, ref_out, peer, msg="out")
    assert_within_lowp_error(lse[finite], ref_lse[finite], peer_lse[finite], msg="lse")
    for name, g, r, p in zip("qkv", grads, ref_grads, peer_grads):
        assert_within_lowp_error(g, r, p, msg=f"d{name}")


def test_dense_mixed_pack_fp32():
    _check([1, 17, 0, 40], head_dim=32)


def test_issue_pack_lengths_fp32():
    # the lengths {1, 17, 113, 300} and an empty sequence in one pack
    _check([1, 17, 113, 300, 0], heads=1, head_dim=64)


def test_fp16_odd_head_dim():
    _check([1, 17, 0, 40], head_dim=24, dtype=torch.float16)


def test_bf16_head_dim_64():
    _check([17, 1, 33], head_dim=64, dtype=torch.bfloat16)


@pytest.mark.parametrize("window", [(0, 0, 0), (1, 1, 1), (0, 2, 1), (9, 9, 9)])
def test_windows_on_awkward_grids(window):
    # grids like 3x5x7 (105), 1x1x1, 3x3x4 (36), 1x1x17: none divisible by the 32-row blocks
    _check([105, 1, 36, 17], heads=1, head_dim=16, window=window)


def test_window_with_rope_large_pack():
    _check([1, 17, 113, 300, 0], heads=1, head_dim=64, window=(1, 2, 2), rope=True)


def test_window_bf16_with_rope():
    _check([1, 17, 0, 40], head_dim=32, dtype=torch.bfloat16, window=(0, 1, 2), rope=True)


def test_fused_rope_equals_apply_rope3d_then_plain_attention():
    lens = [1, 17, 0, 40]
    cu = _cu(lens)
    q, k, v = (torch.randn(sum(lens), 2, 48) for _ in range(3))
    coords = torch.randint(-5, 50, (sum(lens), 3), dtype=torch.int32)
    fused = O.spacetime_attention(q, k, v, cu, rope_coords=coords, backend="triton")
    plain = O.spacetime_attention(O.apply_rope3d(q, coords), O.apply_rope3d(k, coords), v, cu, backend="triton")
    torch.testing.assert_close(fused, plain, atol=2e-5, rtol=2e-5)


def test_rope_fp16():
    _check([5, 17, 0, 23], head_dim=32, dtype=torch.float16, rope=True)


ROPE_BOUND = 2 ** 10   # the documented range of the fused RoPE's coordinates (docs/kernels.md)


def test_fused_rope_keeps_fp64_accuracy_up_to_its_coordinate_bound():
    """Coordinates up to ROPE_MAX_COORD in magnitude (the bound itself included): output and gradients
    against the fp64 reference within the fp32 tolerances of _check (the fp32 angles' error grows with
    |coord|: the derivation is in sora_fast.triton.attention's docstring)."""
    assert tri.ROPE_MAX_COORD == ROPE_BOUND
    bound = ROPE_BOUND
    lens = [40, 23]
    cu = _cu(lens)
    q, k, v = (torch.randn(sum(lens), 2, 32, requires_grad=True) for _ in range(3))
    coords = torch.randint(-bound, bound + 1, (sum(lens), 3), dtype=torch.int32)
    coords[0] = torch.tensor([bound, -bound, bound])
    out = O.spacetime_attention(q, k, v, cu, rope_coords=coords, backend="triton")
    dout = torch.randn_like(out)
    grads = torch.autograd.grad(out, (q, k, v), dout)
    q64, k64, v64 = (t.detach().double().requires_grad_(True) for t in (q, k, v))
    ref = O.spacetime_attention_ref(O.apply_rope3d_ref(q64, coords), O.apply_rope3d_ref(k64, coords), v64, cu)
    ref_grads = torch.autograd.grad(ref, (q64, k64, v64), dout.double())
    torch.testing.assert_close(out.double(), ref, atol=2e-5, rtol=2e-5)
    for g, r in zip(grads, ref_grads):
        torch.testing.assert_close(g.double(), r, atol=5e-5, rtol=5e-5)


@pytest.mark.parametrize("largest", [ROPE_BOUND + 1, -ROPE_BOUND - 1, -2 ** 31])
def test_fused_rope_refuses_coordinates_beyond_its_bound(largest):
    cu = _cu([5])
    q = torch.randn(5, 1, 16, requires_grad=True)
    coords = torch.randint(0, 9, (5, 3), dtype=torch.int32)
    coords[3, 1] = largest
    match = rf"rope_coords\| <= {ROPE_BOUND}; got max \|rope_coords\| = {abs(largest)}\b"
    with pytest.raises(ValueError, match=match):
        O.spacetime_attention(q, q, q, cu, rope_coords=coords, backend="triton")
    for host in (None, O.attention.read_pack(cu, cu, None)):   # a host read without the coordinates
        with pytest.raises(ValueError, match=match):
            tri.attention_forward(q, q, q, cu, cu, 5, 5, scale=0.25, window=None, grid=None, rope_coords=coords,
                                  rope_theta=1e4, host=host)
        with pytest.raises(ValueError, match=match):
            tri.attention_backward(q, None, q, q, q, q, torch.zeros(1, 5), cu, cu, 5, 5, scale=0.25, window=None,
                                   grid=None, rope_coords=coords, rope_theta=1e4, host=host)
    O.spacetime_attention(q, q, q, cu, rope_coords=coords.clamp(-ROPE_BOUND, ROPE_BOUND),
                          backend="triton")                       # at the bound: accepted


def test_cross_attention_with_empty_keys():
    _check([5, 17, 3, 0], key_lens=[7, 0, 9, 4], head_dim=32)


def test_cross_attention_fp16():
    _check([5, 33], key_lens=[40, 3], head_dim=64, dtype=torch.float16)


def test_strided_qkv_views():
    _check([3, 20], head_dim=16, strided=True)


def test_backward_is_deterministic():
    lens = [17, 40]
    cu = _cu(lens)
    q, k, v = (torch.randn(57, 2, 32, requires_grad=True) for _ in range(3))
    dout = torch.randn(57, 2, 32)
    runs = [torch.autograd.grad(O.spacetime_attention(q, k, v, cu, backend="triton"), (q, k, v), dout)
            for _ in range(2)]
    for a, b in zip(*runs):
        assert torch.equal(a, b)


def test_lse_gradient_flows():
    lens = [9, 20]
    cu = _cu(lens)
    q, k, v = (torch.randn(29, 1, 16, dtype=torch.float64).float().requires_grad_(True) for _ in range(3))
    out, lse = O.spacetime_attention(q, k, v, cu, return_lse=True, backend="triton")
    w = torch.randn_like(lse)
    g = torch.autograd.grad((out.sum() + (lse * w).sum()), (q, k, v))
    out_r, lse_r = O.spacetime_attention_ref(q, k, v, cu, return_lse=True)
    g_r = torch.autograd.grad((out_r.sum() + (lse_r * w).sum()), (q, k, v))
    for a, b in zip(g, g_r):
        torch.testing.assert_close(a, b, atol=5e-5, rtol=5e-5)


def test_unsupported_inputs_are_clear_errors():
    cu = _cu([4])
    q = torch.randn(4, 1, 144)
    with pytest.raises(ValueError, match="head dims 1 to 128, got q.shape\\[-1\\]=144"):
        O.spacetime_attention(q, q, q, cu, backend="triton")
    q, v = torch.randn(4, 1, 16), torch.randn(4, 1, 32)
    with pytest.raises(ValueError, match="v's head dim equal to q's \\(16\\), got v.shape\\[-1\\]=32"):
        O.spacetime_attention(q, q, v, cu, backend="triton")
    q = torch.randn(4, 1, 16, dtype=torch.float64)
    with pytest.raises(ValueError, match="float64"):
        O.spacetime_attention(q, q, q, cu, backend="triton")


# --- inputs the kernels must not misread (audit of the first version) --------------------------------
def test_strided_cu_seqlens_grid_and_coords():
    # strided views equal to contiguous tables, poison between their elements: a kernel indexing the raw
    # storage would see offsets of 10**6 (wrong rows, out-of-bounds reads)
    _check([1, 17, 0, 40], head_dim=32, window=(1, 1, 2), rope=True, strided_tables=True)


def test_strided_cu_seqlens_cross_attention():
    _check([5, 17, 3, 0], key_lens=[7, 0, 9, 4], head_dim=16, strided_tables=True)


@pytest.mark.parametrize("window", [(10 ** 9, 1, 1), (2 ** 31 - 1, 0, 2 ** 31 - 1), (sys.maxsize,) * 3,
                                    (1, sys.maxsize, 0)])
def test_huge_windows_act_unbounded(window):
    # grids 3x5x7, 3x3x4, 1x1x17: a window past every extent is the same as one of the extents
    _check([105, 36, 17], heads=1, head_dim=16, window=window)


def test_window_beyond_int64_is_unbounded():
    lens = [36, 17]
    _check(lens, heads=1, head_dim=16, window=(2 ** 70, 2, 2 ** 64), ref_window=(10 ** 6, 2, 10 ** 6))


def test_kernel_window_math_does_not_overflow(monkeypatch):
    """The kernels' own window arithmetic with int32-max windows (the launcher clamps them to the grid
    first; here the clamp is bypassed so the kernels see the raw values)."""
    monkeypatch.setattr(tri, "_window_args", lambda window, grid: tuple(window) if window else (0, 0, 0))
    _check([105, 36, 17], heads=1, head_dim=16, window=(2 ** 31 - 1, 1, 2 ** 31 - 1))


@pytest.mark.parametrize("dtype", [torch.float16, torch.float32], ids=["16-bit-tiles", "fp32-tiles"])
@pytest.mark.parametrize("window,rope", [(None, False), ((1, 2, 2), False), (None, True), ((0, 1, 1), True)],
                         ids=["dense", "window", "rope", "window+rope"])
def test_gpu_tile_configs(monkeypatch, dtype, window, rope):
    # the GPU launcher's choices under the interpreter (which otherwise always runs 32x32 tiles): every
    # (kernel, variant) tile (BLOCK_M != BLOCK_N), and for fp32 the reference where no tile ships; forward
    # and backward on a pack with lengths not multiple of any block and an empty sequence
    monkeypatch.setattr(tri, "_interpreting", lambda: False)
    monkeypatch.setattr(tri, "_FP32_REFERENCE_WARNED", set())
    falls_back = dtype == torch.float32 and (window is not None or rope)     # the fp32 backward has no tile
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        _check([1, 17, 113, 150, 0], heads=1, head_dim=32, dtype=dtype, window=window, rope=rope)
    said = [str(w.message) for w in caught if "no spill-free sm_90 tile" in str(w.message)]
    assert len(said) == falls_back and all("dkdv/dq" in m for m in said), said


@pytest.mark.parametrize("window,rope", [(None, False), ((1, 2, 1), False), (None, True), ((0, 1, 3), True)],
                         ids=["dense", "window", "rope", "window+rope"])
def test_gpu_tile_configs_fp32_head_dim_128(monkeypatch, window, rope):
    # fp32 d128 on a GPU: the forward on its own 128x16 tile (128x8 with a window), the backward through the
    # reference
    monkeypatch.setattr(tri, "_interpreting", lambda: False)
    monkeypatch.setattr(tri, "_FP32_REFERENCE_WARNED", set())
    cfg = tri._gpu_config("fwd", window is not None, rope, torch.float32, 128)
    assert (cfg.block_m, cfg.block_n) == (128, 8 if window else 16)
    assert not tri._fp32_reference(("fwd",), torch.empty(4, 1, 128), window, torch.empty(4, 3) if rope else None)
    with pytest.warns(RuntimeWarning, match="head dim 128.* have no spill-free sm_90 tile for the dkdv/dq kernel"):
        _check([17, 40, 0, 131], heads=1, head_dim=128, window=window, rope=rope)


def test_fp32_reference_where_no_tile_ships(monkeypatch):
    monkeypatch.setattr(tri, "_interpreting", lambda: False)
    monkeypatch.setattr(tri, "_FP32_REFERENCE_WARNED", set())
    q = torch.empty(4, 1, 128)
    with pytest.warns(RuntimeWarning, match=r"head dim 128 have no spill-free sm_90 tile for the dkdv/dq kernel"):
        assert tri._fp32_reference(("dkdv", "dq"), q, None, None)
    with warnings.catch_warnings():
        warnings.simplefilter("error")                  # once per variant, not on every call
        assert tri._fp32_reference(("dkdv", "dq"), q, None, None)
        assert not tri._fp32_reference(("fwd",), q, (1, 1, 1), q)     # every d128 forward has a tile
    assert not tri._fp32_reference(("fwd",), q[..., :64], (1, 1, 1), q)
    with pytest.warns(RuntimeWarning, match="head dim 64, a window have no .* for the dkdv/dq kernel"):
        assert tri._fp32_reference(("dkdv", "dq"), q[..., :64], (1, 1, 1), None)
    assert not tri._fp32_reference(("dkdv", "dq"), q[..., :64], None, None)
    assert not tri._fp32_reference(("dkdv", "dq"), q.half(), (1, 1, 1), q)
    shipped = {c.name for c in tri.shipped_configs()}
    for (kernel, window, rope, block_d), cfg in tri._GPU_CONFIGS_FP32.items():
        variant = "+".join(n for n, on in (("window", window), ("rope", rope)) if on) or "dense"
        assert f"attention_{kernel} d{block_d} fp32 tf32x3 {variant} m{cfg.block_m} n{cfg.block_n}" in shipped


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("case", ["dense", "window", "rope", "window+rope", "cross", "dlse"])
def test_streamed_backward_equals_the_reference(dtype, case):
    """The torch backward the fp32 GPU path falls back to (FlashAttention-2's recomputation, a block of
    query rows at a time) against the vector-Jacobian product through the reference, on a pack with a
    1-token and an empty sequence, blocks of 1 to 30 rows (block_elems small) so every boundary is hit.
    fp64 shows the math is the same (1e-10); fp32 is within fp32 rounding of sums over <= 113 keys."""
    from sora_fast.reference import attention as A

    lens, heads, d = [1, 17, 0, 113, 30], 2, 24
    key_lens = [5, 0, 3, 40, 9] if case == "cross" else lens
    window = (1, 2, 1) if "window" in case else None
    rope = "rope" in case
    cu_q, cu_k = _cu(lens), _cu(key_lens)
    q = torch.randn(sum(lens), heads, d, dtype=dtype)
    k, v = (torch.randn(sum(key_lens), heads, d, dtype=dtype) for _ in range(2))
    grids = [_grid_for(n) if n else (0, 1, 1) for n in lens]
    grid = torch.tensor(grids, dtype=torch.int32) if window else None
    coords = torch.cat([O.grid_coords(g) for g in grids]).to(torch.int32) if rope else None
    kw = dict(scale=0.3, window=window, grid=grid, rope_coords=coords, rope_theta=500.0)
    out, lse = O.spacetime_attention_ref(q, k, v, cu_q, cu_k, return_lse=True, **kw)
    dout = torch.randn_like(out)
    dlse = torch.randn_like(lse).masked_fill(lse.isinf(), 0.0) if case == "dlse" else None
    expected = A._backward_ref(dout, dlse, q, k, v, out, lse, cu_q, cu_k, None, None, **kw)
    for block_elems in (heads * 40, 2 ** 26):          # ~1 row per block against the longest keys; one block
        got = A.attention_backward_streamed(dout, dlse, q, k, v, out, lse, cu_q, cu_k, block_elems=block_elems, **kw)
        tol = 1e-10 if dtype == torch.float64 else 2e-5
        for name, a, e in zip(("dq", "dk", "dv"), got, expected):
            assert a.dtype == dtype
            torch.testing.assert_close(a, e, atol=tol, rtol=tol, msg=lambda m: f"{case} {name} {block_elems}: {m}")


def test_fp32_backward_fallback_is_the_streamed_one(monkeypatch):
    """On a GPU, an fp32 backward without a tile (head dim 128) runs the streamed backward, with the
    op's host read (no second device read), never the O(L^2) reference VJP."""
    from sora_fast.reference import attention as A

    calls = []
    real = A.attention_backward_streamed
    monkeypatch.setattr(tri, "_interpreting", lambda: False)
    monkeypatch.setattr(tri, "_FP32_REFERENCE_WARNED", set())
    monkeypatch.setattr(A, "attention_backward_streamed", lambda *a, **k: calls.append(k["host"]) or real(*a, **k))
    monkeypatch.setattr(A, "_backward_ref", lambda *a, **k: pytest.fail("the reference VJP ran"))
    with pytest.warns(RuntimeWarning, match="one block of query rows at a time"):
        _check([17, 40, 0], heads=1, head_dim=128, window=(1, 0, 2), rope=True)
    assert len(calls) == 1 and isinstance(calls[0], A.PackOnHost)


def test_head_dim_128():
    _check([17, 40], heads=1, head_dim=128, window=(1, 1, 2), rope=True)


def test_head_dim_128_dense():
    _check([1, 40, 0], heads=2, head_dim=128)


@pytest.mark.parametrize("kw", [dict(window=(1, 1, 2), rope=True), dict(key_lens=[7, 0, 9, 40])],
                         ids=["window+rope", "cross"])
def test_64bit_offsets_path(monkeypatch, kw):
    """The OFF64 variant (chosen for tensors of 2**31 elements or more), forced on a small case."""
    monkeypatch.setattr(tri, "_needs_off64", lambda tensors, n_q, heads: True)
    _check([1, 17, 0, 40], heads=2, head_dim=32, **kw)


def test_64bit_offsets_are_chosen_past_int32(monkeypatch):
    meta = dict(device="meta", dtype=torch.float16)
    # (33, 1, 64) rows 2**26 elements apart: row 32 starts at element 2**31
    big = torch.empty_strided((33, 1, 64), (2 ** 26, 64, 1), **meta)
    small = torch.empty_strided((33, 1, 64), (2 ** 25, 64, 1), **meta)
    assert tri._needs_off64((small, big), 33, 1)
    assert not tri._needs_off64((small, small), 33, 1)
    assert tri._needs_off64((small,), 2 ** 27, 16)                   # head * Nq into the LSE
    # row indices themselves stay int32: a clear error past them (meta tensors, nothing allocated)
    rows = torch.empty(2 ** 31 - 1000, 1, 16, device="meta")
    with pytest.raises(ValueError, match=r"fewer than 2147482624 rows, got q.shape\[0\]=2147482648"):
        tri._check_rows(rows, rows[:5], None)
    with pytest.raises(ValueError, match=r"fused RoPE takes fewer than 715827542 rows, got q.shape\[0\]=715827542"):
        tri._check_rows(rows[:715827542], rows[:5], rows)

    # and the launcher passes it to the kernel: q/k/v on the meta device, the launch recorded
    launched = {}

    class Recorder:
        def __getitem__(self, grid):
            return lambda *args, **kwargs: launched.update(kwargs)

    monkeypatch.setattr(tri, "_attn_fwd_kernel", Recorder())
    for strides, expect in (((2 ** 26, 64, 1), True), ((2 ** 25, 64, 1), False)):
        q = torch.empty_strided((33, 1, 64), strides, **meta)
        tri.attention_forward(q, q, q, _cu([33]), _cu([33]), 33, 33, scale=0.125, window=None, grid=None,
                              rope_coords=None, rope_theta=1e4)
        assert launched["OFF64"] is expect


def test_far_key_blocks_are_never_loaded():
    """A window's skipped key blocks are not loaded: NaN in the values of keys outside every window of a
    query block leaves its outputs finite (a loaded but masked block would give 0 * NaN = NaN)."""
    grid, n = (1, 12, 8), 96                             # 32-row blocks = 4 image rows each
    q, k, v = (torch.randn(n, 1, 16) for _ in range(3))
    v[64:] = float("nan")                                # key block 2: rows h = 8..11
    cu, g = _cu([n]), torch.tensor([grid], dtype=torch.int32)
    out = O.spacetime_attention(q, k, v, cu, window=(0, 1, 7), grid=g, backend="triton")
    assert out[:32].isfinite().all()                     # query block 0 (h <= 3) is 5+ rows from block 2
    assert out[64:].isnan().all()                        # the queries that do see the poisoned keys


def test_kernels_use_no_atomics():
    """Determinism by construction (the interpreter runs programs one by one, so a race cannot show in a
    run): every gradient row is stored by one program, with no atomic read-modify-write."""
    assert "tl.atomic" not in inspect.getsource(tri)


# --- the registered ops validate on their own (torch.compile graphs and direct callers reach them) -----
def _raw_args(**over):
    """A valid direct call of torch.ops.sora_fast.spacetime_attention (2 sequences of 6 and 4 rows)."""
    cu = _cu([6, 4])
    args = dict(q=torch.randn(10, 2, 16), k=torch.randn(10, 2, 16), v=torch.randn(10, 2, 16), cu_seqlens_q=cu,
                cu_seqlens_k=cu, max_seqlen_q=None, max_seqlen_k=None, scale=0.25, window=None, grid=None,
                rope_coords=None, rope_theta=1e4, backend="triton")
    args.update(over)
    return list(args.values())


RAW_OP_CASES = [
    (dict(k=torch.randn(10, 2, 4)), r"k must have q's heads and head dim \(_, 2, 16\), got \(10, 2, 4\)"),
    (dict(k=torch.randn(10, 1, 16)), r"k must have q's heads and head dim"),
    (dict(v=torch.randn(9, 2, 16)), r"v must have k's rows and heads \(10, 2, _\), got \(9, 2, 16\)"),
    (dict(v=torch.randn(10, 2, 16, dtype=torch.float16)), r"v must have the dtype of q"),
    (dict(k=torch.randn(10, 2, 16, device="meta")), r"k must be on cpu"),
    (dict(q=torch.randn(10, 2, 0), k=torch.randn(10, 2, 0), v=torch.randn(10, 2, 0)), r"head dim >= 1"),
    (dict(cu_seqlens_q=_cu([6, 4]).long()), r"cu_seqlens_q must have dtype in \(int32\), got int64"),
    (dict(cu_seqlens_k=_cu([6, 4])[None]), r"cu_seqlens_k must be a 1-D tensor"),
    (dict(cu_seqlens_k=_cu([6, 2, 2])), r"cu_seqlens_k must have cu_seqlens_q's length 3, got 4"),
    (dict(cu_seqlens_k=torch.tensor([0, 7, 6], dtype=torch.int32)), r"cu_seqlens_k must be non-decreasing"),
    (dict(cu_seqlens_q=torch.tensor([0, 6, 9], dtype=torch.int32)), r"cu_seqlens_q\[-1\] must equal .* \(10\), got 9"),
    (dict(scale=0.0), r"scale must be a positive number, got 0.0"),
    (dict(window=[1, 1, 1]), r"window needs grid"),
    (dict(window=[1, -1, 1], grid=torch.tensor([[1, 2, 3], [1, 2, 2]], dtype=torch.int32)),
     r"window must be 3 ints >= 0"),
    (dict(window=[1, 1, 1], grid=torch.tensor([[1, 2, 3]], dtype=torch.int32)), r"grid must have shape \(2, 3\)"),
    (dict(window=[1, 1, 1], grid=torch.tensor([[1, 2, 3], [1, 2, 3]], dtype=torch.int32)),
     r"grid\[1\]=\[1, 2, 3\] must be >= 0 and multiply to sequence 1's length 4"),
    (dict(window=[1, 1, 1], grid=torch.tensor([[1, 2, 3], [1, 2, 2]], dtype=torch.int32),
          cu_seqlens_k=_cu([5, 5])), r"window and rope_coords need self-attention: cu_seqlens_k must equal"),
    (dict(rope_coords=torch.zeros(9, 3, dtype=torch.int32)), r"rope_coords must have shape \(10, 3\)"),
    (dict(rope_coords=torch.zeros(6, 3, dtype=torch.int32), k=torch.randn(6, 2, 16), v=torch.randn(6, 2, 16),
          cu_seqlens_k=_cu([3, 3])), r"rope_coords must have shape|need self-attention"),
]


@pytest.mark.parametrize("over,pattern", RAW_OP_CASES, ids=[p[:40] for _, p in RAW_OP_CASES])
def test_registered_op_validates_before_launch(over, pattern):
    torch.ops.sora_fast.spacetime_attention(*_raw_args())                     # valid as it stands
    with pytest.raises(ValueError, match=pattern):
        torch.ops.sora_fast.spacetime_attention(*_raw_args(**over))


def test_each_op_call_reads_the_device_once(monkeypatch):
    """The checks and the launch tables share one read of cu_seqlens and grid (on a GPU each .tolist()
    waits for the device): the forward and the backward op each make one device-to-host read, and the
    results still match the reference (the window clamped from the host's grid)."""
    reads = []
    real_tolist = torch.Tensor.tolist
    monkeypatch.setattr(torch.Tensor, "tolist", lambda t: reads.append(t.shape) or real_tolist(t))
    cu = _cu([6, 4])
    grid = torch.tensor([[2, 1, 3], [1, 2, 2]], dtype=torch.int32)
    q, k, v = (torch.randn(10, 2, 16, requires_grad=True) for _ in range(3))
    out = torch.ops.sora_fast.spacetime_attention(q, k, v, cu, cu, None, None, 0.25, [5, 0, 1], grid, None, 1e4,
                                                  "triton")[0]
    assert len(reads) == 1, f"the forward read the device {len(reads)} times: {reads}"
    out.square().sum().backward()
    assert len(reads) == 2, f"the backward read the device {len(reads) - 1} times: {reads[1:]}"
    monkeypatch.setattr(torch.Tensor, "tolist", real_tolist)
    ref_in = [t.detach().clone().requires_grad_(True) for t in (q, k, v)]
    ref = O.spacetime_attention_ref(*ref_in, cu, scale=0.25, window=(5, 0, 1), grid=grid)
    ref.square().sum().backward()
    for a, b in zip((out, q.grad, k.grad, v.grad), (ref, *(t.grad for t in ref_in))):
        torch.testing.assert_close(a.detach(), b.detach(), atol=5e-5, rtol=5e-5)


def test_registered_backward_op_validates_before_launch():
    args = _raw_args()
    q, k, v = args[:3]
    out, lse = torch.ops.sora_fast.spacetime_attention(*args)
    dout = torch.randn_like(out)

    def call(**over):
        kw = dict(dout=dout, dlse=None, q=q, k=k, v=v, out=out, lse=lse)
        kw.update(over)
        return torch.ops.sora_fast.spacetime_attention_backward(*kw.values(), *args[3:])

    dq, dk, dv = call()
    ref = torch.autograd.grad(O.spacetime_attention_ref(*(t.requires_grad_() for t in (q, k, v)), _cu([6, 4]),
                                                        scale=0.25), (q, k, v), dout)
    for a, b in zip((dq, dk, dv), ref):
        torch.testing.assert_close(a, b, atol=5e-5, rtol=5e-5)
    for over, pattern in ((dict(dout=dout[:9]), r"dout must have shape \(10, 2, 16\)"),
                          (dict(out=out.half()), r"out must have dtype in \(float32\), got float16"),
                          (dict(lse=lse.t()), r"lse must have shape \(2, 10\)"),
                          (dict(dlse=torch.zeros(2, 9)), r"dlse must have shape \(2, 10\)"),
                          (dict(k=torch.randn(10, 2, 8)), r"k must have q's heads and head dim")):
        with pytest.raises(ValueError, match=pattern):
            call(**over)


# --- block bookkeeping ----------------------------------------------------------------------------
def test_block_table_has_one_program_per_real_block():
    lens = [1000, 1, 1, 0, 33, 64]
    table = _blocks.block_table(lens, 64, "cpu")
    assert table.shape[0] == sum(math.ceil(n / 64) for n in lens)      # 16 + 1 + 1 + 0 + 1 + 1, not 6 x 16
    for seq, start in table.tolist():
        assert 0 <= start < lens[seq] and start % 64 == 0


def _tile_order(grid, tile):
    """(t, h, w) of a grid's tokens in tile-major order, by a plain loop (tiles t-major, t-major inside)."""
    (t, h, w), (a, b, c) = grid, tile
    out = []
    for t0 in range(0, t, a):
        for h0 in range(0, h, b):
            for w0 in range(0, w, c):
                out += [(i, j, k) for i in range(t0, min(t0 + a, t)) for j in range(h0, min(h0 + b, h))
                        for k in range(w0, min(w0 + c, w))]
    return torch.tensor(out, dtype=torch.int32).reshape(-1, 3)


@pytest.mark.parametrize("grids,window,blocks", [
    ([(3, 5, 7), (1, 1, 1), (4, 9, 13)], (0, 1, 1), (16, 32)),
    ([(5, 1, 1), (0, 1, 1), (2, 6, 6)], (1, 0, 0), (8, 8)),
    ([(1, 30, 52)], (0, 3, 3), (64, 32)),
    ([(4, 9, 13), (3, 16, 16)], (1, 5, 5), (8, 8)),
    ([(3, 7, 9)], (9, 9, 9), (8, 16))])
@pytest.mark.parametrize("order", ["t-major", "tile", "random"])
def test_window_block_lists_are_exact(grids, window, blocks, order):
    """Every (row block, column block) pair against the token mask: a pair holding an allowed (query, key)
    pair is listed, a listed full block has every pair allowed and lies inside its sequence, and a pair
    listed full is exactly one whose every pair is allowed (the box test is exact for fullness)."""
    bm, bn = blocks
    seqlens = [t * h * w for t, h, w in grids]
    parts = []
    for g, n in zip(grids, seqlens):
        c = _blocks.pack_coords([g], "cpu")
        parts.append(_tile_order(g, (2, 4, 4)) if order == "tile" and n else
                     c[torch.randperm(n)] if order == "random" else c)
    coords = torch.cat(parts)
    lists = _blocks.window_block_lists(seqlens, coords, window, bm, bn)
    assert lists.indices.dtype == lists.num_full.dtype == lists.num_visit.dtype == torch.int32
    p, start, stats = 0, 0, dict(full=0, partial=0, skipped=0)
    for n in seqlens:
        c = coords[start:start + n].long()
        start += n
        allowed = ((c[:, None] - c[None]).abs() <= torch.tensor(window)).all(-1)
        for r0 in range(0, n, bm):
            row = lists.indices[p].tolist()
            full, visit = set(row[:lists.num_full[p]]), row[:lists.num_visit[p]]
            assert len(set(visit)) == len(visit)
            for j, c0 in enumerate(range(0, n, bn)):
                pairs = allowed[r0:r0 + bm, c0:c0 + bn]
                assert (j in full) == bool(pairs.all() and c0 + bn <= n), (p, j)
                if pairs.any():
                    assert j in visit, (p, j)
                stats["full" if j in full else "partial" if j in visit else "skipped"] += 1
            p += 1
    assert p == lists.num_full.shape[0] == _blocks.block_table(seqlens, bm, "cpu").shape[0]
    assert lists.total == sum(stats.values())
    assert (lists.visited, lists.full) == (stats["full"] + stats["partial"], stats["full"])
    if window == (9, 9, 9):
        assert stats["skipped"] == 0 and stats["full"] > 0
    if max(seqlens) >= 300 and order != "random":
        assert stats["skipped"] > 0





@pytest.mark.parametrize("window,rope", [((1, 2, 2), False), ((0, 3, 1), True), ((9, 9, 9), False)],
                         ids=["window", "window+rope", "all-full"])
@pytest.mark.parametrize("order", ["tile", "random"])
def test_window_kernels_follow_any_token_order(window, rope, order):
    """The kernels take the window from the tokens' coordinates: a pack in tile-major (or any) order gives
    the t-major pack's outputs and gradients, row for row (fp32 tolerances: only the summation order
    differs), on grids not divisible by the tile, a 1-token and an empty sequence."""
    grids = [(3, 5, 7), (1, 1, 1), (0, 1, 1), (2, 9, 6)]
    lens = [t * h * w for t, h, w in grids]
    cu, grid = _cu(lens), torch.tensor(grids, dtype=torch.int32)
    perm, coords, start = [], [], 0
    for g, n in zip(grids, lens):
        c = _blocks.pack_coords([g], "cpu").long()
        o = _tile_order(g, (2, 4, 4)).long() if order == "tile" and n else c[torch.randperm(n)]
        flat = (o[:, 0] * g[1] + o[:, 1]) * g[2] + o[:, 2] if n else o[:, 0]
        perm.append(flat + start)
        coords.append(o)
        start += n
    perm, coords = torch.cat(perm), torch.cat(coords).to(torch.int32)
    tmajor = torch.cat([_blocks.pack_coords([g], "cpu") for g, n in zip(grids, lens)])
    q, k, v, dout = (torch.randn(sum(lens), 2, 32) for _ in range(4))
    kw = dict(scale=32 ** -0.5, window=window, grid=grid, rope_theta=1e4)

    def run(q, k, v, dout, rope_coords, coords):
        out, lse = tri.attention_forward(q, k, v, cu, cu, max(lens), max(lens), rope_coords=rope_coords,
                                         coords=coords, **kw)
        return (out, lse, *tri.attention_backward(dout, None, q, k, v, out, lse, cu, cu, max(lens), max(lens),
                                                  rope_coords=rope_coords, coords=coords, **kw))

    want = run(q, k, v, dout, tmajor if rope else None, None)
    got = run(q[perm], k[perm], v[perm], dout[perm], coords if rope else None, coords)
    for name, g, w in zip(["out", "lse", "dq", "dk", "dv"], got, want):
        w = w[:, perm] if name == "lse" else w[perm]
        tol = 2e-5 if name in ("out", "lse") else 5e-5
        torch.testing.assert_close(g, w, atol=tol, rtol=tol, msg=name)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("window,rope", [((1, 2, 2), True), ((0, 1, 3), False)], ids=["window+rope", "window"])
def test_tile_order_pack_through_the_op(dtype, window, rope):
    """A tile-major pack (grids not divisible by the tile, a 1-frame video) through the public op on the
    triton backend: outputs and gradients equal the fp32 reference on the same tokens and coordinates
    (within fp32 tolerances, or twice PyTorch's own low-precision error for bf16)."""
    from sora_fast.packing import pack_videos

    grids = [(3, 10, 14), (1, 6, 6), (2, 4, 18)]
    x = pack_videos([torch.randn(1, *g) for g in grids], (1, 1, 1), order="tile", tile=(2, 4, 4))
    n, heads, d = x.num_tokens, 2, 32
    q, k, v = (torch.randn(n, heads, d, dtype=dtype, requires_grad=True) for _ in range(3))
    kw = dict(window=window, grid=x.grid, coords=x.coords, rope_coords=x.coords if rope else None)
    out = O.spacetime_attention(q, k, v, x.cu_seqlens, backend="triton", **kw)
    dout = torch.randn_like(out)
    grads = torch.autograd.grad(out, (q, k, v), dout)
    ref_in = [t.detach().float().requires_grad_() for t in (q, k, v)]
    ref = O.spacetime_attention_ref(*ref_in, x.cu_seqlens, **kw)
    ref_grads = torch.autograd.grad(ref, ref_in, dout.float())
    if dtype == torch.float32:
        torch.testing.assert_close(out, ref, atol=2e-5, rtol=2e-5)
        for g, r in zip(grads, ref_grads):
            torch.testing.assert_close(g, r, atol=5e-5, rtol=5e-5)
        return
    low = [t.detach().requires_grad_() for t in (q, k, v)]
    peer_q, peer_k = (O.apply_rope3d_ref(t, x.coords) if rope else t for t in low[:2])
    cu = x.cu_seqlens.tolist()
    masks = [O.window_mask(None, window, coords=x.coords[a:b]) for a, b in zip(cu, cu[1:])]
    outs = []
    for (a, b), m in zip(zip(cu, cu[1:]), masks):
        s = (peer_q[a:b].transpose(0, 1) @ peer_k[a:b].transpose(0, 1).transpose(1, 2)) * d ** -0.5
        outs.append((torch.softmax(s.masked_fill(~m, float("-inf")), -1) @ low[2][a:b].transpose(0, 1)).transpose(0, 1))
    peer = torch.cat(outs)
    peer_grads = torch.autograd.grad(peer, low, dout)
    assert_within_lowp_error(out, ref, peer, msg="out")
    for name, g, r, p in zip("qkv", grads, ref_grads, peer_grads):
        assert_within_lowp_error(g, r, p, msg=f"d{name}")


def test_tile_granular_window_through_coords():
    """Sliding Tile Attention's tile-granular mask: the kernels given the tile indices (coords // tile) as
    the window's coordinates, on a tile-major pack whose grid is not divisible by the tile, equal the
    reference with the same coordinates, forward and backward."""
    from sora_fast.packing import pack_videos

    tile = (2, 4, 4)
    x = pack_videos([torch.randn(1, 5, 10, 9)], (1, 1, 1), order="tile", tile=tile)
    cells = (x.coords // torch.tensor(tile, dtype=torch.int32)).to(torch.int32)
    q, k, v = (torch.randn(x.num_tokens, 2, 16, requires_grad=True) for _ in range(3))
    kw = dict(window=(1, 0, 1), grid=x.grid, coords=cells)
    out = O.spacetime_attention(q, k, v, x.cu_seqlens, backend="triton", **kw)
    ref = O.spacetime_attention_ref(q, k, v, x.cu_seqlens, **kw)
    dout = torch.randn_like(out)
    torch.testing.assert_close(out, ref, atol=2e-5, rtol=2e-5)
    for g, r in zip(torch.autograd.grad(out, (q, k, v), dout), torch.autograd.grad(ref, (q, k, v), dout)):
        torch.testing.assert_close(g, r, atol=5e-5, rtol=5e-5)
