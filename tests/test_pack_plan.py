"""Per-pack work done once (``PackedVideos.plan``) and the CPU paths that use it: the RoPE table is built once
per pack and equals a fresh computation, plans follow their pack's metadata (reused while it is unchanged,
rebuilt when it changes), windowed attention skips the frames outside every window and still equals the
reference, the SDPA layout rule, the adaLN tables broadcast or gathered, and accelerate's per-op report."""
import dataclasses

import pytest
import torch
from _utils import assert_close
from test_attention import cu, loop_window_mask, rand_qkv, random_coords, sdpa_loop, wan_rope
from test_dit import randomize

from sora_fast import ops
from sora_fast.models.dit import VideoDiT
from sora_fast.packing import frame_ids, pack_sequences, pack_videos
from sora_fast.reference import attention as R
from sora_fast.reference.adaln import token_blocks
from sora_fast.reference.rope import apply_rope3d_ref, rope3d_rotate, rope3d_tables

SHAPES = [(4, 1, 4, 6), (4, 3, 4, 4), (4, 5, 2, 6)]           # latents (C, T, H, W): grids (1,2,3) (3,2,2) (5,1,3)


def videos(shapes=SHAPES, dtype=torch.float32):
    return [torch.randn(*s, dtype=dtype) for s in shapes]


def texts(n, dim=32, lengths=(3, 0, 5)):
    return [torch.randn(lengths[i % len(lengths)], dim) for i in range(n)]


def count_calls(monkeypatch, module, name):
    calls = []
    real = getattr(module, name)

    def spy(*a, **kw):
        calls.append(a)
        return real(*a, **kw)

    monkeypatch.setattr(module, name, spy)
    return calls


# ----------------------------------------------------------------------------------------------
# the RoPE table: once per pack, equal to a fresh computation


def test_rope_table_built_once_per_pack_and_reused_by_every_layer_and_step(monkeypatch):
    calls = count_calls(monkeypatch, R, "rope3d_tables")
    dit = randomize(VideoDiT.from_name("tiny", num_layers=3)).eval()
    x, text = pack_videos(videos()), pack_sequences(texts(3))
    t = torch.tensor([10.0, 500.0, 990.0])
    with torch.no_grad():
        first = dit(x, t, text)
        for step in range(3):                      # a sampler's steps: new tokens, the same metadata
            dit(x.with_tokens(x.tokens + step), t, text)
    assert len(calls) == 1, f"the RoPE table was built {len(calls)} times for one pack (3 layers, 4 forwards)"
    # the cached table is the one a fresh computation gives, and rotating with it is the reference RoPE
    hd = dit.config.head_dim
    cached = x.plan.memo(("rope", hd, dit.config.rope_theta, torch.float32), lambda: None)
    assert torch.equal(cached, rope3d_tables(x.coords, hd, dit.config.rope_theta))
    q = torch.randn(x.num_tokens, 2, hd)
    assert_close(rope3d_rotate(q, cached), apply_rope3d_ref(q, x.coords, theta=dit.config.rope_theta))
    # and the forward with plans equals one that rebuilds everything (a fresh pack of the same videos)
    fresh = dataclasses.replace(x)
    assert fresh.plan is not x.plan
    with torch.no_grad():
        assert torch.equal(dit(fresh, t, text), first)


@pytest.mark.parametrize("dim,theta", [(12, 10000.0), (64, 10000.0), (30, 500.0)])
def test_rope_rotate_matches_wan_rope(dim, theta):
    grids = [(3, 5, 7), (1, 4, 3), (2, 1, 1)]
    coords = random_coords(grids)
    x = torch.randn(coords.shape[0], 2, dim, dtype=torch.float64)
    rot = rope3d_tables(coords, dim, theta, torch.float64)
    assert rot.shape == (coords.shape[0], 1, dim // 2) and rot.dtype == torch.complex128
    assert_close(rope3d_rotate(x, rot), wan_rope(x, coords, theta))
    xs = x[:, :, :].transpose(0, 1).contiguous().transpose(0, 1)          # strided input
    assert_close(rope3d_rotate(xs, rot), wan_rope(x, coords, theta))


# ----------------------------------------------------------------------------------------------
# plans follow their pack's metadata


def test_plan_is_reused_while_the_metadata_is_unchanged():
    x = pack_videos(videos())
    plan = x.plan
    assert x.plan is plan
    assert x.with_tokens(x.tokens * 2).plan is plan                       # shared metadata: shared plan
    assert frame_ids(x) is frame_ids(x.with_tokens(x.tokens + 1))          # computed once
    f = x.grid[:, 0].long()
    want = ((torch.cumsum(f, 0) - f)[x.seq_ids.long()] + x.coords[:, 0].long()).to(torch.int32)
    assert torch.equal(frame_ids(x), want)


def test_plan_is_rebuilt_when_the_metadata_changes():
    x = pack_videos(videos())
    plan = x.plan
    old_ids = frame_ids(x).clone()
    x.coords[:, 0] += 1                                                    # in place: the version changes
    assert x.plan is not plan
    assert torch.equal(frame_ids(x), old_ids + 1)
    plan = x.plan
    x.grid = x.grid.clone()                                                # replaced: another tensor
    assert x.plan is not plan
    assert dataclasses.replace(x, tokens=x.tokens).plan is not x.plan      # a new pack: its own plan
    y = x.to("cpu")
    assert y.plan.cu_seqlens is y.cu_seqlens


def test_attention_rejects_a_plan_of_another_pack():
    x, other = pack_videos(videos()), pack_videos(videos())
    q, k, v = rand_qkv(x.num_tokens, x.num_tokens, 2, 12)
    with pytest.raises(ValueError, match="plan was not made from this cu_seqlens_q"):
        ops.spacetime_attention(q, k, v, x.cu_seqlens, grid=x.grid, rope_coords=x.coords, plan=other.plan)
    with pytest.raises(ValueError, match="plan was not made from this rope_coords"):
        ops.spacetime_attention(q, k, v, x.cu_seqlens, rope_coords=x.coords.clone(), plan=x.plan)
    with pytest.raises(TypeError, match="plan must be None or a PackPlan"):
        ops.spacetime_attention(q, k, v, x.cu_seqlens, plan="plan")
    plan = x.plan
    x.cu_seqlens.add_(0)                                                   # modified after the plan was made
    with pytest.raises(ValueError, match="changed since"):
        ops.spacetime_attention(q, k, v, x.cu_seqlens, plan=plan)


def test_plan_values_are_read_once_and_equal_the_planless_call():
    x = pack_videos(videos())
    text = pack_sequences(texts(3))
    q = torch.randn(x.num_tokens, 2, 12, dtype=torch.float64)
    k, v = torch.randn(text.num_tokens, 2, 12, dtype=torch.float64), torch.randn(text.num_tokens, 2, 8,
                                                                               dtype=torch.float64)
    want = ops.spacetime_attention(q, k, v, x.cu_seqlens, text.cu_seqlens, backend="torch")
    for _ in range(3):
        got = ops.spacetime_attention(q, k, v, x.cu_seqlens, text.cu_seqlens, backend="torch", plan=x.plan)
        assert torch.equal(got, want)
    assert_close(want, sdpa_loop(q, k, v, x.seqlens, text.seqlens))
    assert x.plan.keys_host(text.cu_seqlens) == text.cu_seqlens.tolist()
    assert x.plan.host_cu == x.cu_seqlens.tolist() and len(x.plan._keys) == 1     # read once, kept


def test_plan_made_in_inference_mode_serves_training():
    with torch.inference_mode():
        x = pack_videos(videos())
        _ = frame_ids(x)
    dit = randomize(VideoDiT.from_name("tiny"))
    out = dit(x.with_tokens(x.tokens.clone()), torch.tensor([1.0, 2.0, 3.0]), pack_sequences(texts(3)))
    out.sum().backward()                                                   # no inference tensor was saved
    assert dit.patch_embed.weight.grad is not None


# ----------------------------------------------------------------------------------------------
# windows on the CPU: frames outside every window are never computed


def window_pairs(grids, wt):
    """Query-key pairs of frame-blocked windowed attention: each frame's P queries against the whole frames
    within wt of it (all of the video when wt >= T'-1), never a frame outside."""
    total = 0
    for t, h, w in grids:
        p = h * w
        total += sum(p * (min(t - 1, f + wt) - max(0, f - wt) + 1) * p for f in range(t))
    return total


@pytest.mark.parametrize("window", [(0, 0, 0), (1, 1, 1), (1, 9, 9), (2, 0, 1), (3, 1, 1), (9, 1, 0)])
def test_windowed_attention_skips_frames_and_equals_the_reference(window, monkeypatch):
    grids = [(7, 2, 3), (1, 1, 1), (4, 1, 2), (0, 2, 2), (2, 3, 1)]
    lens = [t * h * w for t, h, w in grids]
    grid = torch.tensor(grids, dtype=torch.int32)
    coords = random_coords(grids)
    pairs = []
    real = R._attend

    def spy(q, k, v, *args):     # every attention call, on the fused kernel or the explicit math
        pairs.append(q.shape[0] * q.shape[2] * k.shape[2])                 # batch x query rows x keys each sees
        return real(q, k, v, *args)

    monkeypatch.setattr(R, "_attend", spy)
    q, k, v = rand_qkv(sum(lens), sum(lens), 2, 12, dtype=torch.float64, requires_grad=True)
    out = ops.spacetime_attention(q, k, v, cu(lens), window=window, grid=grid, rope_coords=coords, backend="torch")
    assert sum(pairs) == window_pairs(grids, window[0])
    if window[0] < 6:
        assert sum(pairs) < sum(n * n for n in lens)                       # the 7-frame video skips frames
    masks = [loop_window_mask(g, window) for g in grids]
    q64, k64, v64 = (t.detach().requires_grad_() for t in (q, k, v))
    ref = sdpa_loop(wan_rope(q64, coords), wan_rope(k64, coords), v64, lens, masks=masks)
    assert_close(out, ref)
    dout = torch.randn_like(out)
    for g, r in zip(torch.autograd.grad(out, [q, k, v], dout), torch.autograd.grad(ref, [q64, k64, v64], dout)):
        assert_close(g, r)


def test_windowed_dit_forward_equals_the_reference_attention(monkeypatch):
    import sora_fast.ops.attention as A

    dit = randomize(VideoDiT.from_name("tiny", window=(1, 1, 1))).eval()
    lat = videos([(4, 6, 4, 4), (4, 1, 2, 2)])
    x, text = pack_videos(lat), pack_sequences(texts(2))
    t = torch.tensor([100.0, 700.0])
    with torch.no_grad():
        fast = dit(x, t, text)
        # the reference attention (per-sequence math, the whole window mask) in place of the eager path
        monkeypatch.setattr(A, "attention_eager", lambda q, k, v, cu_q, cu_k=None, plan=None, **kw:
                            R.spacetime_attention_ref(q, k, v, cu_q, cu_k, **kw))
        slow = dit(pack_videos(lat), t, text)
    assert_close(fast, slow, torch.float32)


# ----------------------------------------------------------------------------------------------
# the SDPA layout: one call per run of equal lengths


def test_one_sdpa_call_per_run_of_equal_lengths(monkeypatch):
    """One attention call (fused kernel or explicit math) per run of equal-length sequences."""
    calls = count_calls(monkeypatch, R, "_attend")
    lens = [64, 64, 64, 200, 200, 64]
    assert R._runs(lens, lens) == [(3, 64, 64), (2, 200, 200), (1, 64, 64)]
    assert not R._padding_pays(cu(lens), None, 4, 64)
    q, k, v = rand_qkv(sum(lens), sum(lens), 4, 64, dtype=torch.float64)
    out = ops.spacetime_attention(q, k, v, cu(lens), backend="torch")
    assert len(calls) == 3 and all(c[0].shape[0] in (3, 2, 1) for c in calls)
    assert_close(out, sdpa_loop(q, k, v, lens))
    calls.clear()
    ops.spacetime_attention(q, k, v, cu([sum(lens) // 2] * 2), backend="torch")
    assert len(calls) == 1                                                 # same-size: one batched call


# ----------------------------------------------------------------------------------------------
# adaLN: tables broadcast over blocks of tokens, or gathered


def test_token_blocks():
    ids = torch.arange(3, dtype=torch.int32).repeat_interleave(4)
    assert token_blocks(ids, 3) == 4
    assert token_blocks(ids, 4) is None and token_blocks(ids.flip(0), 3) is None and token_blocks(None, 3) is None
    ids2 = ids.clone()
    assert token_blocks(ids2, 3) == 4
    ids2[0] = 1                                                            # in place: not remembered
    assert token_blocks(ids2, 3) is None


@pytest.mark.parametrize("layout", ["blocks", "shuffled"])
@pytest.mark.parametrize("backend", ["torch", "cuda"])
def test_gated_adaln_absent_tables_equal_zero_and_one_tables(layout, backend):
    n, d, r = 12, 16, 3
    ids = torch.arange(r, dtype=torch.int32).repeat_interleave(n // r)
    if layout == "shuffled":
        ids = ids[torch.randperm(n)]
    x, br = torch.randn(n, d, requires_grad=True), torch.randn(n, d, requires_grad=True)
    g, sh, sc = (torch.randn(r, d, requires_grad=True) for _ in range(3))
    w, b = torch.randn(d), torch.randn(d)
    zero, one = torch.zeros(r, d), torch.ones(r, d)
    for tables, explicit in (((None, None, None), (one, zero, zero)), ((g, None, None), (g, zero, zero)),
                             ((None, sh, sc), (one, sh, sc))):
        got = ops.gated_residual_adaln(x, br, *tables, ids, weight=w, bias=b, backend=backend)
        want = ops.gated_residual_adaln_ref(x, br, *explicit, ids, weight=w, bias=b)
        for a, e in zip(got, want):
            assert_close(a, e, torch.float32)
        grads = torch.autograd.grad(sum(o.sum() for o in got), [x, br])
        wants = torch.autograd.grad(sum(o.sum() for o in want), [x, br])
        for a, e in zip(grads, wants):
            assert_close(a, e, torch.float32)


# ----------------------------------------------------------------------------------------------
# accelerate says which path each op takes


def test_accelerate_reports_the_path_of_every_op():
    from _diffusers_utils import tiny_wan, wan_inputs

    from sora_fast.integrations.diffusers import accelerate

    m = tiny_wan()
    with accelerate(m) as handle:
        assert set(handle.choices) == {"WanTransformer3DModel.attention", "WanTransformer3DModel.adaln"}
        assert all(v.startswith("torch on cpu: ") for v in handle.choices.values())
        assert "SDPA" in handle.choices["WanTransformer3DModel.attention"]
    with accelerate(m, norms=False, backend={"attention": "triton"}) as handle:
        assert handle.choices == {"WanTransformer3DModel.attention": "triton on cpu: the triton kernel"}
    kw = wan_inputs()
    with torch.no_grad():
        ref = m(**kw, return_dict=False)[0]
        with accelerate(m):
            first = m(**kw, return_dict=False)[0]
            again = m(**kw, return_dict=False)[0]                          # the kept plan: the same output
    assert torch.equal(first, again)
    assert ((first - ref).abs().max() / ref.abs().max()).item() < 1e-5
