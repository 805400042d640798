"""Every op is a torch.library custom op: opcheck passes, and the ops compile with fullgraph=True."""
import pytest
import torch
from _utils import assert_close

import sora_fast.ops as O
from sora_fast.ops import adaln, attention, conv3d, rope, vae_norm


def _req(*ts):
    return tuple(t.requires_grad_(True) if t is not None and t.is_floating_point() else t for t in ts)


def _attention_args():
    cu = torch.tensor([0, 3, 3, 10], dtype=torch.int32)
    q, k, v = _req(*(torch.randn(10, 2, 8) for _ in range(3)))
    grid = torch.tensor([[1, 1, 3], [0, 2, 2], [1, 7, 1]], dtype=torch.int32)
    coords = torch.randint(0, 4, (10, 3), dtype=torch.int32)
    return [
        (q, k, v, cu, cu, None, None, 0.3, None, None, None, 10000.0, "torch"),
        (q, k, v, cu, cu, 7, 7, 0.3, [1, 0, 2], grid, coords, 500.0, "torch"),
        (q, k[:6], v[:6], cu, torch.tensor([0, 2, 6, 6], dtype=torch.int32), None, None, 0.5, None, None, None,
         1e4, "torch"),
    ]


def _adaln_args():
    ids = torch.tensor([0, 0, 2, 2, 2, 1, 2], dtype=torch.int32)
    x, sh, sc, g, br, w, b = _req(torch.randn(7, 24), torch.randn(3, 24), torch.randn(3, 24), torch.randn(3, 24),
                                  torch.randn(7, 24), torch.randn(24), torch.randn(24))
    return ids, x, sh, sc, g, br, w, b


def _group_norm_args():
    x, w, b = _req(torch.randn(2, 6, 2, 3, 3), torch.randn(6), torch.randn(6))
    return x, 3, w, b, 1e-6, True, "torch"


CASES = {
    "spacetime_attention": lambda: [(attention._attention_op, a) for a in _attention_args()],
    "apply_rope3d": lambda: [(rope._rope_op, (*_req(torch.randn(5, 2, 12)),
                                              torch.randint(-3, 9, (5, 3), dtype=torch.int32),
                                              10000.0, [4, 4, 4], "torch"))],
    "adaln_modulate": lambda: [
        (adaln._modulate_op, (x, sh, sc, ids, norm, w, b, 1e-6, "torch"))
        for ids, x, sh, sc, g, br, w, b in [_adaln_args()] for norm in ("layer", "rms")
    ] + [(adaln._modulate_op, (*_req(torch.randn(4, 8), torch.randn(4, 8), torch.randn(4, 8)), None, "rms", None,
                               None, 1e-5, "torch"))],
    "gated_residual_adaln": lambda: [
        (adaln._gated_op, (x, br, g, sh, sc, ids, norm, w, None, 1e-6, "torch"))
        for ids, x, sh, sc, g, br, w, b in [_adaln_args()] for norm in ("layer", "rms")
    ],
    "causal_conv3d": lambda: [
        (conv3d._conv_op, (*_req(torch.randn(1, 4, 3, 5, 6), torch.randn(3, 4, 3, 3, 3), torch.randn(3)),
                           [1, 2, 2], [1, 1], "zeros", None, None, "torch")),
        (conv3d._conv_op, (*_req(torch.randn(2, 3, 2, 4, 4).contiguous(memory_format=torch.channels_last_3d),
                                 torch.randn(5, 3, 3, 1, 1)), None, [2, 1, 1], [0, 0], "replicate",
                           *_req(torch.randn(2, 3, 1, 4, 4), torch.randn(2, 5, 1, 4, 4)), "torch")),
    ],
    "group_norm_silu": lambda: [(vae_norm._gn_op, _group_norm_args())],
    "channel_rms_norm_silu": lambda: [
        (vae_norm._rms_op, (*_req(torch.randn(2, 6, 2, 3, 3).contiguous(memory_format=torch.channels_last_3d),
                                  torch.randn(6)), None, 1e-12, True, "torch")),
    ],
}


@pytest.mark.parametrize("name", sorted(CASES))
def test_opcheck(name):
    for op, args in CASES[name]():
        torch.library.opcheck(op, args)


def test_every_public_op_is_a_registered_custom_op():
    expected = {"spacetime_attention", "apply_rope3d", "adaln_modulate", "gated_residual_adaln", "causal_conv3d",
                "group_norm_silu", "channel_rms_norm_silu"}
    assert expected == set(CASES)
    for name in expected:
        assert hasattr(torch.ops.sora_fast, name)
        assert hasattr(torch.ops.sora_fast, name + "_backward")
        assert "torch" in O.registered_backends(name)


def _dit_like_block(x, q, k, v, shift, scale, gate, seq_ids, cu, coords, grid):
    attn = O.spacetime_attention(q, k, v, cu, rope_coords=coords, window=(1, 1, 1), grid=grid)   # (N, H, D)
    x_new, y = O.gated_residual_adaln(x, attn.flatten(1), gate, shift, scale, seq_ids, norm="layer")
    return O.adaln_modulate(y, shift, scale, seq_ids, norm="rms") + x_new


def _vae_like_block(x, w, b, gamma):
    h = O.causal_conv3d(x, w, b, pad_mode="replicate")
    h = O.channel_rms_norm_silu(h, gamma)
    return O.group_norm_silu(h, 2, gamma, None, silu=False) + x


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_compile_fullgraph_matches_eager(dtype):
    """Attention + adaLN (a DiT block's ops) and the VAE ops under torch.compile(fullgraph=True) on CPU:
    same outputs and gradients as eager. What this proves is that nothing in the public functions breaks
    the graph. The compiled graph keeps the custom ops (opaque nodes running the reference), while eager
    calls torch's fused kernels (padded SDPA, F.layer_norm): the same math summed in another order, so
    the two agree to the dtype's rounding error (fp64 makes any real difference stand out)."""
    torch._dynamo.reset()
    grid = torch.tensor([[1, 2, 3], [2, 1, 2]], dtype=torch.int32)
    cu = torch.tensor([0, 6, 10], dtype=torch.int32)
    seq_ids = torch.tensor([0] * 6 + [1] * 4, dtype=torch.int32)
    coords = torch.cat([O.grid_coords(g) for g in grid.tolist()]).to(torch.int32)
    x, q, k, v = _req(torch.randn(10, 16, dtype=dtype), *(torch.randn(10, 2, 8, dtype=dtype) for _ in range(3)))
    shift, scale, gate = (torch.randn(2, 16, dtype=dtype) for _ in range(3))
    args = (x, q, k, v, shift, scale, gate, seq_ids, cu, coords, grid)

    def run(fn):
        for t in (x, q, k, v):
            t.grad = None
        out = fn(*args)
        out.square().sum().backward()
        return [out.detach()] + [t.grad.clone() for t in (x, q, k, v)]

    eager = run(_dit_like_block)
    compiled = run(torch.compile(_dit_like_block, fullgraph=True))
    for e, c, name in zip(eager, compiled, ("out", "dx", "dq", "dk", "dv")):
        assert_close(c, e, msg=name)

    xv, wv, bv, gamma = _req(*(t.to(dtype) for t in (torch.randn(1, 4, 3, 5, 5), torch.randn(4, 4, 3, 3, 3) * 0.1,
                                                      torch.randn(4), torch.rand(4) + 0.5)))
    eager = _vae_like_block(xv, wv, bv, gamma)
    compiled = torch.compile(_vae_like_block, fullgraph=True)(xv, wv, bv, gamma)
    assert_close(compiled, eager, msg="vae block")


def test_compile_with_a_window_that_changes_between_calls():
    """torch.compile turns a Python int that changes between calls into a symbol (automatic dynamic):
    the ops' fake implementations must take a symbolic window (they check shapes, dtypes and devices;
    the real op checks the values), and every call must still use its own window."""
    torch._dynamo.reset()
    grid = torch.tensor([[3, 2, 3], [2, 3, 2]], dtype=torch.int32)
    cu = torch.tensor([0, 18, 30], dtype=torch.int32)
    q, k, v = (torch.randn(30, 2, 8, dtype=torch.float64, requires_grad=True) for _ in range(3))

    def fn(q, k, v, wt, wh, ww):
        return O.spacetime_attention(q, k, v, cu, window=(wt, wh, ww), grid=grid)

    compiled = torch.compile(fn, fullgraph=True)
    for window in ((0, 0, 0), (1, 0, 1), (2, 1, 0), (0, 2, 2)):
        for t in (q, k, v):
            t.grad = None
        out = compiled(q, k, v, *window)
        out.square().sum().backward()
        got = [out.detach()] + [t.grad.clone() for t in (q, k, v)]
        ref_in = [t.detach().clone().requires_grad_(True) for t in (q, k, v)]
        ref = attention.spacetime_attention_ref(*ref_in, cu, window=window, grid=grid)
        ref.square().sum().backward()
        for g, e, name in zip(got, [ref.detach()] + [t.grad for t in ref_in], ("out", "dq", "dk", "dv")):
            assert_close(g, e, msg=f"window {window}: {name}")
