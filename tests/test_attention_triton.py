"""The Triton attention kernels (forward, backward, windows, fused RoPE) against the fp32 reference.

On CPU-only machines these run under the Triton interpreter (tests/conftest.py sets it), with the same
kernels a GPU runs; outputs are NaN-poisoned so an unwritten element shows.
"""
import math

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


def _check(lens, *, heads=2, head_dim=32, dtype=torch.float32, window=None, rope=False, key_lens=None,
           strided=False):
    cu_q = _cu(lens)
    cu_k = _cu(key_lens) if key_lens is not None else None
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
    kw = dict(window=window, grid=grid if window is not None else None, rope_coords=coords, return_lse=True)

    out, lse = O.spacetime_attention(q, k, v, cu_q, cu_k, backend="triton", **kw)
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
    # grids like 3x5x7 (105), 1x1x1, 2x3x6 (36), 1x1x17: none divisible by the 32-row blocks
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
    with pytest.raises(ValueError, match="head dims up to 128, got q.shape\\[-1\\]=144"):
        O.spacetime_attention(q, q, q, cu, backend="triton")
    q, v = torch.randn(4, 1, 16), torch.randn(4, 1, 32)
    with pytest.raises(ValueError, match="v's head dim equal to q's \\(16\\), got v.shape\\[-1\\]=32"):
        O.spacetime_attention(q, q, v, cu, backend="triton")
    q = torch.randn(4, 1, 16, dtype=torch.float64)
    with pytest.raises(ValueError, match="float64"):
        O.spacetime_attention(q, q, q, cu, backend="triton")


# --- block bookkeeping ----------------------------------------------------------------------------
def test_block_table_has_one_program_per_real_block():
    lens = [1000, 1, 1, 0, 33, 64]
    table = _blocks.block_table(lens, 64, "cpu")
    assert table.shape[0] == sum(math.ceil(n / 64) for n in lens)      # 16 + 1 + 1 + 0 + 1 + 1, not 6 x 16
    for seq, start in table.tolist():
        assert 0 <= start < lens[seq] and start % 64 == 0


@pytest.mark.parametrize("grid,window", [((3, 5, 7), (0, 1, 1)), ((4, 9, 13), (1, 2, 2)), ((1, 30, 52), (0, 3, 3)),
                                         ((5, 1, 1), (1, 0, 0))])
def test_window_block_skipping_is_sound_and_skips(grid, window):
    """A skipped block pair never holds a (query, key) pair inside the window; big grids skip blocks."""
    n = grid[0] * grid[1] * grid[2]
    allowed = O.window_mask(grid, window)
    bm, bn = 16, 32
    for qs in range(0, n, bm):
        for ks in range(0, n, bn):
            qe, ke = min(qs + bm, n), min(ks + bn, n)
            if not _blocks.blocks_interact(qs, qe - 1, ks, ke - 1, grid, window):
                assert not allowed[qs:qe, ks:ke].any(), (qs, ks)
    visited, total = _blocks.window_block_density([grid], window, bm, bn)
    if n >= 300:
        assert visited < total
