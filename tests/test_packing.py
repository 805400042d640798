"""Tests for sora_fast.packing: layout against independent loop/conv3d references, round trips,
token-budget batching (property-based), and the wording of every validation error."""
import dataclasses
import math
import random

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st

from sora_fast.packing import (
    BatchPlan,
    PackedSequences,
    PackedVideos,
    pack_sequences,
    pack_videos,
    plan_batches,
)

PATCHES = [(1, 1, 1), (1, 2, 2), (2, 2, 2), (1, 4, 4)]


# ----------------------------------------------------------------------------------------------
# independent references: python loops over patches, written without reshape/permute tricks


def loop_patchify(x, patch):
    """Tokens and (t, h, w) coords of one (C, T, H, W) video by explicit slicing, t-major."""
    pt, ph, pw = patch
    _, T, H, W = x.shape
    tokens, coords = [], []
    for t in range(T // pt):
        for h in range(H // ph):
            for w in range(W // pw):
                block = x[:, t * pt:(t + 1) * pt, h * ph:(h + 1) * ph, w * pw:(w + 1) * pw]  # (C, pt, ph, pw)
                tokens.append(block.flatten())
                coords.append((t, h, w))
    return torch.stack(tokens), coords


def loop_metadata(shapes, patch):
    """cu_seqlens, seq_ids, grid, max_seqlen computed by plain python."""
    cu, seq_ids, grid = [0], [], []
    for i, (T, H, W) in enumerate(shapes):
        g = (T // patch[0], H // patch[1], W // patch[2])
        n = g[0] * g[1] * g[2]
        grid.append(g)
        cu.append(cu[-1] + n)
        seq_ids += [i] * n
    return cu, seq_ids, grid, max(b - a for a, b in zip(cu, cu[1:]))


def random_videos(n, patch, channels, max_patches=(3, 5, 5), dtype=torch.float32):
    """n fresh random videos with 1..max patches per axis; the first is always a 1-patch-frame clip."""
    vids = []
    for i in range(n):
        gt = 1 if i == 0 else random.randint(1, max_patches[0])
        gh, gw = random.randint(1, max_patches[1]), random.randint(1, max_patches[2])
        vids.append(torch.randn(channels, gt * patch[0], gh * patch[1], gw * patch[2]).to(dtype))
    return vids


# ----------------------------------------------------------------------------------------------
# layout


@pytest.mark.parametrize("patch", PATCHES)
def test_layout_matches_loop_reference(patch):
    vids = random_videos(4, patch, channels=3)
    packed = pack_videos(vids, patch=patch)

    cu, seq_ids, grid, max_seqlen = loop_metadata([v.shape[1:] for v in vids], patch)
    assert packed.cu_seqlens.dtype == packed.seq_ids.dtype == packed.grid.dtype == packed.coords.dtype == torch.int32
    assert packed.cu_seqlens.tolist() == cu
    assert packed.seq_ids.tolist() == seq_ids
    assert packed.grid.tolist() == [list(g) for g in grid]
    assert packed.max_seqlen == max_seqlen and isinstance(packed.max_seqlen, int)
    assert packed.patch == patch
    assert packed.tokens.shape == (cu[-1], 3 * math.prod(patch))

    for i, v in enumerate(vids):
        ref_tokens, ref_coords = loop_patchify(v, patch)
        rows = slice(cu[i], cu[i + 1])
        assert torch.equal(packed.tokens[rows], ref_tokens)
        assert packed.coords[rows].tolist() == [list(c) for c in ref_coords]


@pytest.mark.parametrize("patch", PATCHES)
def test_feature_order_is_conv3d_weight_order(patch):
    """Documented claim: tokens @ conv3d_weight.reshape(D, -1).T is Conv3d(kernel=stride=patch)."""
    C, D = 5, 7
    vids = random_videos(3, patch, channels=C, dtype=torch.float64)
    weight = torch.randn(D, C, *patch, dtype=torch.float64)
    packed = pack_videos(vids, patch=patch)
    emb = packed.tokens @ weight.reshape(D, -1).T
    for i, v in enumerate(vids):
        ref = F.conv3d(v[None], weight, stride=patch)[0]  # (D, T', H', W')
        assert ref.shape[1:] == tuple(packed.grid[i].tolist())
        a, b = packed.cu_seqlens[i].item(), packed.cu_seqlens[i + 1].item()
        torch.testing.assert_close(emb[a:b], ref.reshape(D, -1).T, rtol=1e-10, atol=1e-10)


def test_odd_patch_counts_and_images():
    patch = (1, 2, 2)
    vids = [torch.randn(4, 1, 2, 2), torch.randn(4, 1, 6, 14), torch.randn(4, 7, 10, 2), torch.randn(4, 3, 34, 26)]
    packed = pack_videos(vids, patch=patch)
    assert packed.seqlens == [1, 21, 35, 663]
    assert packed.shapes == [(1, 2, 2), (1, 6, 14), (7, 10, 2), (3, 34, 26)]
    assert packed.grid.tolist() == [[1, 1, 1], [1, 3, 7], [7, 5, 1], [3, 17, 13]]
    for a, b in zip(vids, packed.unpack(packed.tokens)):
        assert torch.equal(a, b)


# ----------------------------------------------------------------------------------------------
# round trips


@settings(max_examples=40, deadline=None)
@given(
    patch=st.sampled_from(PATCHES),
    grids=st.lists(st.tuples(st.integers(1, 4), st.integers(1, 6), st.integers(1, 6)), min_size=1, max_size=5),
    channels=st.integers(1, 5),
)
def test_round_trip(patch, grids, channels):
    vids = [torch.randn(channels, t * patch[0], h * patch[1], w * patch[2]) for t, h, w in grids]
    packed = pack_videos(tuple(vids), patch=patch)
    assert len(packed) == packed.num_sequences == len(vids)
    assert packed.num_tokens == sum(t * h * w for t, h, w in grids) == packed.cu_seqlens[-1].item()
    assert packed.shapes == [tuple(v.shape[1:]) for v in vids]
    out = packed.unpack(packed.tokens)
    assert len(out) == len(vids)
    for a, b in zip(vids, out):
        assert torch.equal(a, b)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16, torch.int64])
def test_dtype_kept(dtype):
    vids = [torch.randint(-100, 100, (2, 2, 4, 6)).to(dtype), torch.randint(-100, 100, (2, 1, 2, 2)).to(dtype)]
    packed = pack_videos(vids, patch=(1, 2, 2))
    assert packed.tokens.dtype == dtype
    for a, b in zip(vids, packed.unpack(packed.tokens)):
        assert b.dtype == dtype and torch.equal(a, b)


def test_non_contiguous_inputs():
    base = torch.randn(6, 4, 8, 3)  # (T, H, W, C) channels-last storage
    x = base.permute(3, 0, 1, 2)  # (C, T, H, W), non-contiguous
    y = torch.randn(3, 12, 8, 10)[:, ::2, :, 2:8]  # strided view
    packed = pack_videos([x, y], patch=(2, 2, 2))
    ref = torch.cat([loop_patchify(x, (2, 2, 2))[0], loop_patchify(y, (2, 2, 2))[0]])
    assert torch.equal(packed.tokens, ref)
    for a, b in zip([x, y], packed.unpack(packed.tokens)):
        assert torch.equal(a, b)


def test_unpack_other_channel_count():
    vids = random_videos(3, (1, 2, 2), channels=4)
    packed = pack_videos(vids)
    out_tokens = torch.randn(packed.num_tokens, 6 * 4)
    outs = packed.unpack(out_tokens)
    assert [o.shape for o in outs] == [(6, *v.shape[1:]) for v in vids]
    assert all(torch.equal(a, b) for a, b in zip(outs, packed.unpack(out_tokens, channels=6)))
    # unpack inverts the layout: re-packing gives the same tokens back.
    assert torch.equal(pack_videos(outs).tokens, out_tokens)


def test_gradients_flow_through_pack_and_unpack():
    vids = [v.requires_grad_() for v in random_videos(3, (1, 2, 2), channels=2, dtype=torch.float64)]
    packed = pack_videos(vids)
    upstream = torch.randn_like(packed.tokens)
    (packed.tokens * upstream).sum().backward()
    for v, g in zip(vids, packed.unpack(upstream)):
        assert torch.equal(v.grad, g)


def test_metadata_follows_device():
    # The meta device stands in for a GPU: nothing here may silently land on the CPU.
    vids = [torch.empty(4, 2, 4, 6, device="meta"), torch.empty(4, 1, 2, 2, device="meta")]
    packed = pack_videos(vids)
    for t in (packed.tokens, packed.cu_seqlens, packed.grid, packed.coords, packed.seq_ids):
        assert t.device.type == "meta"
    assert packed.coords.shape == (13, 3) and packed.max_seqlen == 12
    text = pack_sequences([torch.empty(3, 8, device="meta"), torch.empty(0, 8, device="meta")])
    for t in (text.tokens, text.cu_seqlens, text.seq_ids):
        assert t.device.type == "meta"


def test_to_and_with_tokens():
    packed = pack_videos(random_videos(2, (1, 2, 2), channels=3))
    moved = packed.to("cpu")
    assert isinstance(moved, PackedVideos) and moved is not packed
    assert torch.equal(moved.tokens, packed.tokens) and torch.equal(moved.coords, packed.coords)
    assert moved.max_seqlen == packed.max_seqlen and moved.patch == packed.patch

    new = torch.randn(packed.num_tokens, 32)
    swapped = packed.with_tokens(new)
    assert swapped.tokens is new and packed.tokens.shape[1] == 12  # original untouched
    for name in ("cu_seqlens", "grid", "coords", "seq_ids"):
        assert getattr(swapped, name) is getattr(packed, name)
    with pytest.raises(ValueError, match=r"tokens has 3 rows, the packing has \d+ tokens"):
        packed.with_tokens(torch.randn(3, 32))
    with pytest.raises(ValueError, match=r"tokens must be 2-D \(N, D\), got shape \(\d+,\)"):
        packed.with_tokens(torch.randn(packed.num_tokens))


@pytest.mark.parametrize("patch", [(1, 2, 2), (2, 1, 1)])
def test_host_frame_counts_equal_the_grid_on_every_pack(patch):
    """``frames``, set by pack_videos from the latents' shapes, is ``grid[:, 0]`` on the host for awkward packs
    (images, a 1-token video, temporal patch 2), and every pack made from a pack carries it: to, with_tokens,
    select_videos, token_shard, shard_videos. Without it (None) the counts are read from grid, the same."""
    from sora_fast.distributed.packs import select_videos, token_shard
    from sora_fast.distributed.ulysses import shard_videos

    pt, ph, pw = patch
    shapes = [(pt, ph, pw), (3 * pt, 2 * ph, 5 * pw), (pt, 3 * ph, 2 * pw), (random.randint(1, 6) * pt, ph, 4 * pw),
              (2 * pt, ph, pw)]
    x = pack_videos([torch.randn(3, *s) for s in shapes], patch)

    def same_as_grid(p):
        assert p.frames is not None
        grid = p.grid[:, 0]
        assert p.frames == tuple(grid.tolist()) and p.frames_per_video == grid.tolist()
        assert p.num_frames == int(grid.sum()) and isinstance(p.num_frames, int)

    same_as_grid(x)
    assert x.frames == tuple(s[0] // pt for s in shapes)
    n = x.num_tokens
    for p in (x.to("cpu"), x.with_tokens(torch.randn(n, 5)), select_videos(x, 1, 4), select_videos(x, 4, 5),
              token_shard(x, 2, n - 3), shard_videos(x, None)):
        same_as_grid(p)
    assert select_videos(x, 1, 4).frames == x.frames[1:4]
    unknown = dataclasses.replace(x, frames=None)
    assert unknown.num_frames == x.num_frames and unknown.frames_per_video == list(x.frames)
    assert select_videos(unknown, 1, 3).frames is None
    assert select_videos(unknown, 1, 3).frames_per_video == list(x.frames[1:3])
    # on the meta device the grid cannot be read, the host counts still can
    meta = pack_videos([torch.randn(3, *s, device="meta") for s in shapes], patch)
    assert meta.num_frames == x.num_frames
    with pytest.raises(ValueError, match=r"frames must hold one count per video \(5, the rows of grid\), got 4"):
        dataclasses.replace(x, frames=x.frames[:4])
    with pytest.raises(TypeError, match=r"frames must be None or a tuple of positive ints .* got \(1, 0, 1, 1, 1\)"):
        dataclasses.replace(x, frames=(1, 0, 1, 1, 1))


def test_unpack_errors():
    packed = pack_videos([torch.randn(3, 1, 4, 4), torch.randn(3, 2, 2, 2)], patch=(1, 2, 2))  # N = 6, 12 feats
    with pytest.raises(ValueError, match=r"tokens_out has 5 rows, the packing has 6 tokens"):
        packed.unpack(torch.randn(5, 12))
    with pytest.raises(ValueError, match=r"tokens_out must be 2-D .*got shape \(6, 3, 4\)"):
        packed.unpack(torch.randn(6, 3, 4))
    with pytest.raises(ValueError, match=r"tokens_out has 10 features, not a positive multiple of pt\*ph\*pw=4"):
        packed.unpack(torch.randn(6, 10))
    with pytest.raises(ValueError, match=r"tokens_out has 0 features"):
        packed.unpack(torch.randn(6, 0))
    with pytest.raises(ValueError, match=r"tokens_out has 12 features, expected channels\*pt\*ph\*pw = 2\*4 = 8"):
        packed.unpack(torch.randn(6, 12), channels=2)
    with pytest.raises(ValueError, match=r"channels must be >= 1, got 0"):
        packed.unpack(torch.randn(6, 12), channels=0)
    with pytest.raises(TypeError, match=r"channels must be an int, got float"):
        packed.unpack(torch.randn(6, 12), channels=3.0)
    with pytest.raises(TypeError, match=r"tokens_out must be a torch.Tensor, got list"):
        packed.unpack([[0.0] * 12] * 6)


# ----------------------------------------------------------------------------------------------
# pack_videos validation


def _v(*shape, **kw):
    return torch.zeros(*shape, **kw)


@pytest.mark.parametrize(
    "latents, patch, exc, match",
    [
        ([_v(4, 2, 32, 32), _v(4, 2, 32, 32), _v(4, 2, 33, 32)], (1, 2, 2), ValueError,
         r"latents\[2\]: H=33 is not divisible by patch ph=2"),
        ([_v(4, 2, 32, 30)], (1, 4, 4), ValueError, r"latents\[0\]: W=30 is not divisible by patch pw=4"),
        ([_v(4, 2, 8, 8), _v(4, 1, 8, 8)], (2, 2, 2), ValueError, r"latents\[1\]: T=1 is not divisible by patch pt=2"),
        ([_v(4, 1, 8, 8), _v(4, 0, 8, 8)], (1, 2, 2), ValueError, r"latents\[1\]: T=0, every axis must be >= 1"),
        ([_v(0, 1, 8, 8)], (1, 2, 2), ValueError, r"latents\[0\]: C=0"),
        ([_v(16, 1, 8, 8), _v(8, 1, 8, 8)], (1, 2, 2), ValueError, r"latents\[1\] has 8 channels, latents\[0\] has 16"),
        ([_v(4, 1, 8, 8), _v(4, 1, 8, 8, dtype=torch.float16)], (1, 2, 2), ValueError,
         r"latents\[1\] is torch.float16, latents\[0\] is torch.float32"),
        ([_v(4, 1, 8, 8), _v(4, 1, 8, 8, device="meta")], (1, 2, 2), ValueError,
         r"latents\[1\] is on meta, latents\[0\] is on cpu"),
        ([], (1, 2, 2), ValueError, r"latents is empty"),
        ((), (1, 2, 2), ValueError, r"latents is empty"),
        ([_v(4, 1, 8, 8), _v(4, 8, 8)], (1, 2, 2), ValueError,
         r"latents\[1\] must be 4-D \(C, T, H, W\), got shape \(4, 8, 8\)"),
        ([_v(1, 4, 1, 8, 8)], (1, 2, 2), ValueError, r"latents\[0\] must be 4-D .*got shape \(1, 4, 1, 8, 8\)"),
        ([_v(4, 1, 8, 8), [[0.0]]], (1, 2, 2), TypeError, r"latents\[1\] must be a torch.Tensor, got list"),
        (_v(2, 4, 1, 8, 8), (1, 2, 2), TypeError,
         r"latents must be a list or tuple .*got one Tensor of shape \(2, 4, 1, 8, 8\)"),
        ({"a": _v(4, 1, 8, 8)}, (1, 2, 2), TypeError, r"latents must be a list or tuple .*got dict"),
        ([_v(4, 1, 8, 8)], (2, 2), ValueError, r"patch must be 3 positive ints .*got \(2, 2\) of length 2"),
        ([_v(4, 1, 8, 8)], (1, 0, 2), ValueError, r"patch ph must be >= 1, got 0 in patch=\(1, 0, 2\)"),
        ([_v(4, 1, 8, 8)], (1, 2, -2), ValueError, r"patch pw must be >= 1, got -2"),
        ([_v(4, 1, 8, 8)], (1, 2.0, 2), TypeError, r"patch ph must be an int, got 2.0 \(float\)"),
        ([_v(4, 1, 8, 8)], (True, 2, 2), TypeError, r"patch pt must be an int, got True \(bool\)"),
        ([_v(4, 1, 8, 8)], 2, TypeError, r"patch must be a tuple of 3 positive ints \(pt, ph, pw\), got int"),
    ],
)
def test_pack_videos_errors(latents, patch, exc, match):
    with pytest.raises(exc, match=match):
        pack_videos(latents, patch=patch)


# ----------------------------------------------------------------------------------------------
# pack_sequences


def test_pack_sequences_with_empty_sequences():
    lens = [0, 5, 0, 1, 17, 0]
    seqs = [torch.randn(n, 9) for n in lens]
    packed = pack_sequences(seqs)
    assert isinstance(packed, PackedSequences)
    assert packed.tokens.shape == (23, 9)
    assert packed.cu_seqlens.dtype == packed.seq_ids.dtype == torch.int32
    assert packed.cu_seqlens.tolist() == [0, 0, 5, 5, 6, 23, 23]
    assert packed.seq_ids.tolist() == [1] * 5 + [3] + [4] * 17
    assert packed.max_seqlen == 17 and len(packed) == 6 and packed.num_tokens == 23 and packed.seqlens == lens
    for a, b in zip(seqs, packed.unpack(packed.tokens)):
        assert torch.equal(a, b)
    out = packed.unpack(torch.randn(23, 4))
    assert [tuple(o.shape) for o in out] == [(n, 4) for n in lens]
    assert packed.with_tokens(torch.randn(23, 4)).cu_seqlens is packed.cu_seqlens
    assert torch.equal(packed.to("cpu").tokens, packed.tokens)


def test_pack_sequences_all_empty():
    packed = pack_sequences((torch.randn(0, 3), torch.randn(0, 3)))
    assert packed.tokens.shape == (0, 3) and packed.max_seqlen == 0
    assert packed.cu_seqlens.tolist() == [0, 0, 0] and packed.seq_ids.tolist() == []
    assert [o.shape for o in packed.unpack(packed.tokens)] == [(0, 3), (0, 3)]


@settings(max_examples=30, deadline=None)
@given(lens=st.lists(st.integers(0, 12), min_size=1, max_size=8), dim=st.integers(1, 6))
def test_pack_sequences_round_trip(lens, dim):
    seqs = [torch.randn(n, dim) for n in lens]
    packed = pack_sequences(seqs)
    cu, ids = [0], []
    for i, n in enumerate(lens):
        cu.append(cu[-1] + n)
        ids += [i] * n
    assert packed.cu_seqlens.tolist() == cu and packed.seq_ids.tolist() == ids and packed.max_seqlen == max(lens)
    assert all(torch.equal(a, b) for a, b in zip(seqs, packed.unpack(packed.tokens)))


@pytest.mark.parametrize(
    "seqs, exc, match",
    [
        ([torch.zeros(3, 8), torch.zeros(2, 8), torch.zeros(4, 6)], ValueError,
         r"seqs\[2\] has D=6, seqs\[0\] has D=8"),
        ([torch.zeros(3, 8), torch.zeros(8)], ValueError, r"seqs\[1\] must be 2-D \(L, D\), got shape \(8,\)"),
        ([torch.zeros(3, 8), torch.zeros(3, 8, dtype=torch.bfloat16)], ValueError,
         r"seqs\[1\] is torch.bfloat16, seqs\[0\] is torch.float32"),
        ([torch.zeros(3, 8), torch.zeros(3, 8, device="meta")], ValueError,
         r"seqs\[1\] is on meta, seqs\[0\] is on cpu"),
        ([], ValueError, r"seqs is empty"),
        ([torch.zeros(3, 8), "text"], TypeError, r"seqs\[1\] must be a torch.Tensor, got str"),
        (torch.zeros(2, 3, 8), TypeError, r"seqs must be a list or tuple .*got one Tensor of shape \(2, 3, 8\)"),
    ],
)
def test_pack_sequences_errors(seqs, exc, match):
    with pytest.raises(exc, match=match):
        pack_sequences(seqs)


def test_pack_sequences_unpack_errors():
    packed = pack_sequences([torch.zeros(2, 4), torch.zeros(0, 4)])
    with pytest.raises(ValueError, match=r"tokens_out has 3 rows, the packing has 2 tokens"):
        packed.unpack(torch.zeros(3, 4))
    with pytest.raises(ValueError, match=r"tokens_out must be 2-D \(N, D\), got shape \(2,\)"):
        packed.unpack(torch.zeros(2))


# ----------------------------------------------------------------------------------------------
# plan_batches


def ffd_reference(counts, budget):
    """First-fit decreasing by linear scan, O(n * batches): the definition, not the fast version."""
    batches, loads = [], []
    for i in sorted(range(len(counts)), key=lambda j: (-counts[j], j)):
        for b, load in enumerate(loads):
            if load + counts[i] <= budget:
                batches[b].append(i)
                loads[b] += counts[i]
                break
        else:
            batches.append([i])
            loads.append(counts[i])
    return [sorted(b) for b in batches]


def next_fit_count(counts, budget):
    n, load = 0, budget + 1
    for c in counts:
        if load + c > budget:
            n, load = n + 1, 0
        load += c
    return n


@settings(max_examples=200, deadline=None)
@given(data=st.data(), budget=st.integers(1, 200))
def test_plan_batches_properties(data, budget):
    counts = data.draw(st.lists(st.integers(1, budget), max_size=60))
    plan = plan_batches(counts, budget)
    assert isinstance(plan, BatchPlan) and plan.token_budget == budget
    flat = [i for b in plan for i in b]
    assert sorted(flat) == list(range(len(counts)))  # every sample exactly once
    assert all(b == sorted(b) and b for b in plan.batches)
    assert plan.tokens_per_batch == [sum(counts[i] for i in b) for b in plan.batches]
    assert all(t <= budget for t in plan.tokens_per_batch)
    assert len(plan) == len(plan.batches)
    total = sum(counts)
    if counts:
        assert plan.fill_ratio == pytest.approx(total / (len(plan) * budget))
        assert len(plan) >= math.ceil(total / budget)
    # No two batches fit together (so none could be merged); then any two batches hold more than one budget,
    # so k batches hold more than (k - 1) budgets / 2: k < 2 * total / budget + 1. (Next fit in index order
    # can beat first-fit decreasing: [12, 18, 31, 13, 29, 29] in 71 is 2 batches for next fit, 3 for FFD.)
    t = plan.tokens_per_batch
    assert all(t[i] + t[j] > budget for i in range(len(t)) for j in range(i + 1, len(t)))
    assert len(plan) < 2 * total / budget + 1
    # Exactly first-fit decreasing, deterministic.
    assert plan.batches == ffd_reference(counts, budget)
    assert plan_batches(list(counts), budget).batches == plan.batches


def test_plan_batches_specific():
    plan = plan_batches([5, 5, 5, 5], 10)
    assert plan.batches == [[0, 1], [2, 3]] and plan.tokens_per_batch == [10, 10] and plan.fill_ratio == 1.0
    # Decreasing order fills every batch; next fit in index order needs 5.
    counts = [2, 5, 4, 7, 1, 3, 8]
    plan = plan_batches(counts, 10)
    assert plan.batches == [[0, 6], [3, 5], [1, 2, 4]] and plan.tokens_per_batch == [10, 10, 10]
    assert next_fit_count(counts, 10) == 5
    # Ties are broken by index.
    assert plan_batches([3, 3, 3], 5).batches == [[0], [1], [2]]
    assert list(plan_batches([1], 1)) == [[0]]


def test_plan_batches_shapes_and_summary():
    shapes = [
        (16, 1, 64, 64),  # image: 1*32*32 = 1024 tokens
        (21, 64, 64),  # (T, H, W): 21*32*32 = 21504
        torch.Size([16, 13, 32, 48]),  # 13*16*24 = 4992
        100,
        [16, 5, 8, 8],  # 5*4*4 = 80
    ]
    plan = plan_batches(shapes, 32768)
    assert sorted(i for b in plan for i in b) == [0, 1, 2, 3, 4]
    assert plan.tokens_per_batch == [21504 + 1024 + 4992 + 100 + 80]
    plan = plan_batches(shapes, 21504, patch=(1, 2, 2))
    assert plan.batches == [[1], [0, 2, 3, 4]]
    assert plan_batches([(2, 8, 8), (4, 8, 8)], 100, patch=(2, 4, 4)).tokens_per_batch == [4 + 8]
    summary = plan.summary()
    assert "\n" not in summary
    for piece in ("5 samples", "27,700 tokens", "2 batches", "21,504", f"{plan.fill_ratio:.1%}"):
        assert piece in summary


def test_plan_batches_empty():
    plan = plan_batches([], 100)
    assert plan.batches == [] and plan.tokens_per_batch == [] and len(plan) == 0 and plan.fill_ratio == 0.0
    assert "0 batches" in plan.summary()


@pytest.mark.parametrize(
    "shapes, budget, patch, exc, match",
    [
        ([10, 300, 20], 256, (1, 2, 2), ValueError, r"shapes\[1\] has 300 tokens, more than token_budget=256"),
        ([10, 10, 11], 10, (1, 2, 2), ValueError, r"shapes\[2\] has 11 tokens, more than token_budget=10"),
        ([(16, 1, 64, 64)], 1000, (1, 2, 2), ValueError, r"shapes\[0\] has 1024 tokens, more than token_budget=1000"),
        ([5, 0], 10, (1, 2, 2), ValueError, r"shapes\[1\] has 0 tokens; every sample needs at least 1"),
        ([-3], 10, (1, 2, 2), ValueError, r"shapes\[0\] has -3 tokens"),
        ([4, (16, 2, 33, 32)], 10**6, (1, 2, 2), ValueError, r"shapes\[1\]: H=33 is not divisible by patch ph=2"),
        ([(3, 8, 8)], 10**6, (2, 2, 2), ValueError, r"shapes\[0\]: T=3 is not divisible by patch pt=2"),
        ([(1, 0, 8, 8)], 10**6, (1, 2, 2), ValueError, r"shapes\[0\]: T=0, every axis must be >= 1"),
        ([(0, 1, 8, 8)], 10**6, (1, 2, 2), ValueError, r"shapes\[0\]: C=0"),
        ([1, (8, 8)], 100, (1, 2, 2), ValueError,
         r"shapes\[1\] must be a \(C, T, H, W\) or \(T, H, W\) shape, got \(8, 8\)"),
        ([1, (1, 8.0, 8)], 100, (1, 2, 2), TypeError, r"shapes\[1\] must hold ints, got 8.0 \(float\)"),
        ([1, 2.5], 100, (1, 2, 2), TypeError, r"shapes\[1\] must be an int token count .*got float"),
        ([True], 100, (1, 2, 2), TypeError, r"shapes\[0\] must be an int token count .*got bool"),
        ([1], 0, (1, 2, 2), ValueError, r"token_budget must be a positive int, got 0"),
        ([1], -5, (1, 2, 2), ValueError, r"token_budget must be a positive int, got -5"),
        ([1], 100.0, (1, 2, 2), TypeError, r"token_budget must be a positive int, got 100.0 \(float\)"),
        ([1], 100, (1, 2), ValueError, r"patch must be 3 positive ints"),
        (torch.tensor([1, 2]), 100, (1, 2, 2), TypeError, r"shapes must be a list or tuple, got Tensor"),
    ],
)
def test_plan_batches_errors(shapes, budget, patch, exc, match):
    with pytest.raises(exc, match=match):
        plan_batches(shapes, budget, patch=patch)
