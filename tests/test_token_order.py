"""The tile-major token order of packed videos (``pack_videos(order="tile")``): the order math against python
loops, packing and unpacking in both orders, windowed attention on tile-order packs (window coordinates
from ``coords``) against the t-major result permuted, and the DiT, sampler and trainer on tile-order packs
against the t-major ones. Grids are awkward: not divisible by the tile, 1-frame videos, 1x1 frames, tiles
larger than the grid, mixed sizes in one pack."""
import dataclasses
import json

import pytest
import torch
from _utils import assert_close
from test_attention import cu, rand_qkv, sdpa_loop, wan_rope
from test_dit import randomize

from sora_fast import ops
from sora_fast.models.dit import DiTConfig, VideoDiT
from sora_fast.models.text import TinyTextEncoder
from sora_fast.ops import attention as A
from sora_fast.packing import PackedVideos, frame_ids, pack_sequences, pack_videos
from sora_fast.reference import attention as R
from sora_fast.reference import grid_coords
from sora_fast.reference._order import pack_t_major_rows, t_major_order
from sora_fast.sampling import sample
from sora_fast.training.trainer import TrainConfig, Trainer

# (T', H', W') grids: not divisible by the tiles below, one frame, 1x1 frames, larger than some tiles
GRIDS = [(1, 1, 1), (1, 5, 7), (3, 1, 1), (5, 9, 10), (2, 3, 3), (4, 8, 8), (6, 2, 5)]
TILES = [(4, 8, 8), (1, 2, 2), (2, 3, 4), (10, 10, 10), (1, 1, 1), (3, 1, 2)]
# latents (C, T, H, W) with patch (1, 2, 2): grids (1, 3, 5) (3, 1, 1) (5, 4, 3) (2, 2, 2)
SHAPES = [(4, 1, 6, 10), (4, 3, 2, 2), (4, 5, 8, 6), (4, 2, 4, 4)]


# ----------------------------------------------------------------------------------------------
# independent references: python loops


def loop_tile_coords(grid, tile):
    """(t, h, w) of one video's tokens in tile order: tiles t-major over the tile grid (clipped at the far
    edges), tokens t-major inside a tile; by explicit loops."""
    T, H, W = grid
    tt, th, tw = tile
    out = []
    for t0 in range(0, T, tt):
        for h0 in range(0, H, th):
            for w0 in range(0, W, tw):
                for t in range(t0, min(t0 + tt, T)):
                    for h in range(h0, min(h0 + th, H)):
                        for w in range(w0, min(w0 + tw, W)):
                            out.append((t, h, w))
    return out


def loop_raster(grid):
    T, H, W = grid
    return [(t, h, w) for t in range(T) for h in range(H) for w in range(W)]


def loop_window_masks(coords_per_video, window):
    """(L, L) bool per video: |dt| <= wt, |dh| <= wh, |dw| <= ww of the tokens' own coordinates."""
    masks = []
    for c in coords_per_video:
        masks.append(torch.tensor([[all(abs(a[i] - b[i]) <= window[i] for i in range(3)) for b in c] for a in c],
                                  dtype=torch.bool).reshape(len(c), len(c)))
    return masks


def raster_rows(grids, tile):
    """For every token of a tile-order pack of ``grids``, its row in the t-major pack (python)."""
    rows, base = [], 0
    for g in grids:
        rows += [base + (t * g[1] + h) * g[2] + w for t, h, w in loop_tile_coords(g, tile)]
        base += g[0] * g[1] * g[2]
    return torch.tensor(rows)


def latents(shapes=SHAPES, dtype=torch.float32):
    return [torch.randn(*s, dtype=dtype) for s in shapes]


def grids_of(shapes, patch=(1, 2, 2)):
    return [(t // patch[0], h // patch[1], w // patch[2]) for _, t, h, w in shapes]


# ----------------------------------------------------------------------------------------------
# the order math


@pytest.mark.parametrize("tile", TILES)
@pytest.mark.parametrize("grid", GRIDS)
def test_tile_coords_equal_the_loop_and_permute_the_raster(grid, tile):
    got = grid_coords(grid, order="tile", tile=tile)
    assert got.dtype == torch.int64 and got.shape == (grid[0] * grid[1] * grid[2], 3)
    assert [tuple(c) for c in got.tolist()] == loop_tile_coords(grid, tile)
    assert sorted(map(tuple, got.tolist())) == loop_raster(grid)                 # a permutation, no padding
    assert [tuple(c) for c in grid_coords(grid).tolist()] == loop_raster(grid)   # the old call: t-major
    assert torch.equal(grid_coords(grid, order="t-major", tile=tile), grid_coords(grid))


def test_a_tile_covering_the_grid_is_the_raster():
    for grid in GRIDS:
        assert torch.equal(grid_coords(grid, order="tile", tile=(8, 16, 16)), grid_coords(grid))
        assert torch.equal(grid_coords(grid, order="tile", tile=(1, grid[1], grid[2])), grid_coords(grid))


# ----------------------------------------------------------------------------------------------
# packing


@pytest.mark.parametrize("patch,tile", [((1, 2, 2), (2, 3, 2)), ((1, 1, 1), (4, 8, 8)), ((2, 1, 2), (1, 1, 3))])
def test_tile_pack_layout_matches_the_loop(patch, tile):
    """Every token of a tile-order pack is the patch at its coords, coords follow the loop order, and the
    sequence metadata is the t-major pack's."""
    shapes = [(3, patch[0], 2 * patch[1], 5 * patch[2]), (3, 4 * patch[0], patch[1], patch[2]),
              (3, 3 * patch[0], 7 * patch[1], 4 * patch[2])]
    vids = latents(shapes)
    x, ref = pack_videos(vids, patch, order="tile", tile=tile), pack_videos(vids, patch)
    assert x.order == "tile" and x.tile == tile and ref.order == "t-major" and ref.tile is None
    for name in ("cu_seqlens", "grid", "seq_ids"):
        assert torch.equal(getattr(x, name), getattr(ref, name)), name
    assert x.max_seqlen == ref.max_seqlen and x.frames == ref.frames and x.coords.dtype == torch.int32
    pt, ph, pw = patch
    cu_ = x.cu_seqlens.tolist()
    for i, (v, g) in enumerate(zip(vids, grids_of(shapes, patch))):
        coords = [tuple(c) for c in x.coords[cu_[i]:cu_[i + 1]].tolist()]
        assert coords == loop_tile_coords(g, tile)
        for j, (t, h, w) in enumerate(coords):
            block = v[:, t * pt:(t + 1) * pt, h * ph:(h + 1) * ph, w * pw:(w + 1) * pw]
            assert torch.equal(x.tokens[cu_[i] + j], block.flatten())


@pytest.mark.parametrize("order", ["t-major", "tile"])
def test_round_trip_is_exact_and_differentiable(order):
    vids = [v.requires_grad_() for v in latents(SHAPES + [(4, 1, 2, 2)], torch.float64)]
    x = pack_videos(vids, order=order, tile=(2, 3, 2))
    back = x.unpack(x.tokens)
    assert all(torch.equal(a, b) for a, b in zip(back, vids))
    assert all(torch.equal(a, b) for a, b in zip(x.unpack(x.tokens * 2, channels=4), [v * 2 for v in vids]))
    weights = [torch.randn_like(v) for v in vids]
    grads = torch.autograd.grad(sum((w * b).sum() for w, b in zip(weights, back)), vids)
    assert all(torch.equal(g, w) for g, w in zip(grads, weights))


def test_t_major_default_is_unchanged():
    vids = latents()
    x = pack_videos(vids)
    for other in (pack_videos(vids, order="t-major"), pack_videos(vids, (1, 2, 2), order="t-major", tile=(1, 1, 1))):
        for f in dataclasses.fields(PackedVideos):
            a, b = getattr(x, f.name), getattr(other, f.name)
            assert torch.equal(a, b) if isinstance(a, torch.Tensor) else a == b, f.name
    cu_ = x.cu_seqlens.tolist()
    for i, g in enumerate(grids_of(SHAPES)):
        assert [tuple(c) for c in x.coords[cu_[i]:cu_[i + 1]].tolist()] == loop_raster(g)


def test_frame_ids_follow_the_coords():
    x = pack_videos(latents(), order="tile", tile=(2, 1, 2))
    offsets = [0, 1, 4, 9]                                     # frames of the videos before each
    expected = [offsets[s] + t for s, (t, _, _) in zip(x.seq_ids.tolist(), x.coords.tolist())]
    assert frame_ids(x).tolist() == expected


def test_select_videos_and_token_shards_keep_the_order():
    from sora_fast.distributed.packs import select_videos, token_shard

    x = pack_videos(latents(), order="tile", tile=(2, 2, 2))
    sub = select_videos(x, 1, 3)
    assert (sub.order, sub.tile) == ("tile", (2, 2, 2))
    assert all(torch.equal(a, b) for a, b in zip(sub.unpack(sub.tokens), x.unpack(x.tokens)[1:3]))
    shard = token_shard(x, 3, 20)
    assert (shard.order, shard.tile) == ("tile", (2, 2, 2)) and torch.equal(shard.coords, x.coords[3:20])


@pytest.mark.parametrize("kw,exc,match", [
    ({"order": "raster"}, ValueError, r"order must be one of 't-major', 'tile', got 'raster'"),
    ({"order": 1}, TypeError, r"order must be a str, .* got 1 \(int\)"),
    ({"order": "tile", "tile": (0, 2, 2)}, ValueError, r"tile must be 3 positive ints .* got \(0, 2, 2\)"),
    ({"order": "tile", "tile": (2, 2)}, ValueError, r"tile must be 3 positive ints .* got \(2, 2\)"),
    ({"order": "tile", "tile": (2, 2.0, 2)}, ValueError, r"tile must be 3 positive ints"),
    ({"order": "tile", "tile": 4}, TypeError, r"tile must be a tuple of 3 positive ints .* got 4 \(int\)"),
    ({"order": "t-major", "tile": (1, -1, 1)}, ValueError, r"tile must be 3 positive ints"),
])
def test_bad_order_or_tile(kw, exc, match):
    with pytest.raises(exc, match=match):
        pack_videos(latents(), **kw)


def test_a_tile_pack_needs_its_tile():
    x = pack_videos(latents())
    with pytest.raises(ValueError, match=r"tile must be the \(tt, th, tw\) of a pack with order='tile', got None"):
        dataclasses.replace(x, order="tile")


# ----------------------------------------------------------------------------------------------
# windowed attention on tile-order packs


def tile_pack_qkv(grids, tile, dtype, heads=2, dim=12):
    """q, k, v in t-major order, the tile pack's coords / rows (t-major row of each tile-order token)."""
    shapes = [(1, t, 2 * h, 2 * w) for t, h, w in grids]
    x = pack_videos([torch.zeros(s) for s in shapes], order="tile", tile=tile)
    rows = raster_rows(grids, tile)
    assert torch.equal(pack_t_major_rows(x.cu_seqlens, x.grid, x.coords), rows)
    n = x.num_tokens
    q, k, v = rand_qkv(n, n, heads, dim, dtype=dtype)
    return x, rows, q, k, v


ATTN_GRIDS = [(3, 5, 4), (1, 1, 1), (4, 2, 7), (1, 6, 3)]


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("window,tile,rope", [((1, 1, 1), (2, 2, 3), False), ((0, 2, 1), (1, 4, 4), True),
                                              ((2, 0, 0), (2, 8, 3), True), ((1, 1, 2), (5, 1, 1), False)])
def test_windowed_attention_in_tile_order_is_the_t_major_result_permuted(dtype, window, tile, rope):
    """Forward (eager SDPA path and the reference with LSE) and gradients of q, k, v: attention on the
    tile-order pack equals the t-major one with rows permuted, and an independent per-token window loop."""
    x, rows, q, k, v = tile_pack_qkv(ATTN_GRIDS, tile, dtype)
    t_cu, t_grid = cu([g[0] * g[1] * g[2] for g in ATTN_GRIDS]), torch.tensor(ATTN_GRIDS, dtype=torch.int32)
    t_coords = torch.cat([grid_coords(g) for g in ATTN_GRIDS]).to(torch.int32)
    leaves = [t.requires_grad_() for t in (q, k, v)]
    ref = ops.spacetime_attention(q, k, v, t_cu, window=window, grid=t_grid, backend="torch",
                                  rope_coords=t_coords if rope else None)
    tq, tk, tv = (t[rows] for t in leaves)
    rc = x.coords if rope else None
    out = ops.spacetime_attention(tq, tk, tv, x.cu_seqlens, window=window, grid=x.grid, coords=x.coords,
                                  rope_coords=rc, backend="torch", plan=x.plan)
    assert_close(out, ref[rows], dtype)
    out_lse, lse = ops.spacetime_attention(tq, tk, tv, x.cu_seqlens, window=window, grid=x.grid, coords=x.coords,
                                           rope_coords=rc, backend="torch", return_lse=True)
    _, ref_lse = ops.spacetime_attention(q, k, v, t_cu, window=window, grid=t_grid, backend="torch",
                                         rope_coords=t_coords if rope else None, return_lse=True)
    assert_close(out_lse, ref[rows], dtype)
    assert_close(lse, ref_lse[:, rows], dtype)
    # independent: SDPA per video with the window from the tile-order coordinates, fp64
    cu_ = x.cu_seqlens.tolist()
    masks = loop_window_masks([[tuple(c) for c in x.coords[a:b].tolist()] for a, b in zip(cu_, cu_[1:])], window)
    rq, rk = (wan_rope(t, x.coords) if rope else t for t in (tq, tk))
    assert_close(out, sdpa_loop(rq, rk, tv, x.seqlens, masks=masks), dtype)
    dout = torch.randn_like(out)
    got = torch.autograd.grad(out, leaves, dout)
    want = torch.autograd.grad(ref, leaves, dout[torch.argsort(rows)])
    for name, g, w in zip("qkv", got, want):
        assert_close(g, w, dtype, msg=f"d{name}")


def test_custom_op_autograd_and_streamed_backward_take_coords():
    """The registered op (what torch.compile and kernel backends run) with coords: forward and backward
    equal the t-major op permuted, the streamed backward equals the reference VJP, and opcheck passes."""
    tile, window = (2, 3, 2), (1, 1, 1)
    x, rows, q, k, v = tile_pack_qkv(ATTN_GRIDS, tile, torch.float64)
    t_cu, t_grid = cu([g[0] * g[1] * g[2] for g in ATTN_GRIDS]), torch.tensor(ATTN_GRIDS, dtype=torch.int32)
    leaves = [t.requires_grad_() for t in (q, k, v)]
    scale = q.shape[-1] ** -0.5
    ref, ref_lse = A._attention_op(q, k, v, t_cu, t_cu, None, None, scale, list(window), t_grid, None, 1e4, "torch")
    tq, tk, tv = (t[rows] for t in leaves)
    out, lse = A._attention_op(tq, tk, tv, x.cu_seqlens, x.cu_seqlens, None, None, scale, list(window), x.grid,
                               None, 1e4, "torch", x.coords)
    assert_close(out, ref[rows])
    assert_close(lse, ref_lse[:, rows])
    dout = torch.randn_like(out)
    got = torch.autograd.grad(out, leaves, dout)
    want = torch.autograd.grad(ref, leaves, dout[torch.argsort(rows)])
    for g, w in zip(got, want):
        assert_close(g, w)
    dq, dk, dv = R.attention_backward_streamed(dout, None, tq, tk, tv, out, lse, x.cu_seqlens, x.cu_seqlens,
                                               scale=scale, window=window, grid=x.grid, coords=x.coords,
                                               block_elems=64)
    gq, gk, gv = R._backward_ref(dout, None, tq, tk, tv, out, lse, x.cu_seqlens, x.cu_seqlens, None, None,
                                 scale=scale, window=window, grid=x.grid, coords=x.coords)
    for a, b in zip((dq, dk, dv), (gq, gk, gv)):
        assert_close(a, b)
    args = (tq.detach().requires_grad_(), tk.detach().requires_grad_(), tv.detach().requires_grad_(), x.cu_seqlens,
            x.cu_seqlens, None, None, scale, list(window), x.grid, None, 1e4, "torch", x.coords)
    torch.library.opcheck(A._attention_op, args)


def test_reference_coords_of_the_raster_equal_the_grid_reference():
    lens = [g[0] * g[1] * g[2] for g in ATTN_GRIDS]
    grid = torch.tensor(ATTN_GRIDS, dtype=torch.int32)
    coords = torch.cat([grid_coords(g) for g in ATTN_GRIDS]).to(torch.int32)
    q, k, v = rand_qkv(sum(lens), sum(lens), 2, 8, dtype=torch.float64)
    for window in ((0, 0, 0), (1, 2, 1), (3, 1, 0)):
        a, la = R.spacetime_attention_ref(q, k, v, cu(lens), window=window, grid=grid, return_lse=True)
        b, lb = R.spacetime_attention_ref(q, k, v, cu(lens), window=window, grid=grid, coords=coords,
                                          return_lse=True)
        assert torch.equal(a, b) and torch.equal(la, lb)
        for g in ATTN_GRIDS:
            assert torch.equal(R.window_mask(g, window), R.window_mask(g, window, coords=grid_coords(g)))


def test_coords_without_a_window_are_ignored_and_t_major_coords_skip_the_gather():
    x = pack_videos(latents(), order="tile", tile=(1, 2, 2))
    q, k, v = rand_qkv(x.num_tokens, x.num_tokens, 2, 8, dtype=torch.float64)
    plain = ops.spacetime_attention(q, k, v, x.cu_seqlens, backend="torch")
    assert torch.equal(ops.spacetime_attention(q, k, v, x.cu_seqlens, coords=x.coords, backend="torch"), plain)
    t = pack_videos(latents())
    assert t_major_order(t.plan, t.cu_seqlens, t.grid, t.coords) is None        # already t-major: no gather
    assert t_major_order(x.plan, x.cu_seqlens, x.grid, x.coords) is not None


def test_bad_coords():
    x = pack_videos(latents(), order="tile", tile=(2, 2, 2))
    n = x.num_tokens
    q, k, v = rand_qkv(n, n, 2, 8)
    kw = dict(window=(1, 1, 1), grid=x.grid, backend="torch")
    with pytest.raises(ValueError, match=r"coords must have dtype in \(int32\), got int64"):
        ops.spacetime_attention(q, k, v, x.cu_seqlens, coords=x.coords.long(), **kw)
    with pytest.raises(ValueError, match=rf"coords must have shape \({n}, 3\), one \(t, h, w\) per row of q, "
                                         rf"got \({n - 1}, 3\)"):
        ops.spacetime_attention(q, k, v, x.cu_seqlens, coords=x.coords[1:], **kw)
    outside = x.coords.clone()
    outside[5, 2] = 99
    with pytest.raises(ValueError, match=r"coords must hold each token's \(t, h, w\) inside its own video's grid"):
        ops.spacetime_attention(q, k, v, x.cu_seqlens, coords=outside, **kw)
    with pytest.raises(ValueError, match=r"got 1 tokens outside it"):           # the registered op's check
        A._attention_op(q, k, v, x.cu_seqlens, x.cu_seqlens, None, None, 0.5, [1, 1, 1], x.grid, None, 1e4,
                        "torch", outside)
    twice = x.coords.clone()
    twice[1] = twice[0]
    with pytest.raises(ValueError, match=r"a permutation of the grid\), got 0 tokens outside the grid and 2 grid "
                                         r"positions not covered exactly once"):
        ops.spacetime_attention(q, k, v, x.cu_seqlens, coords=twice, **kw)
    with pytest.raises(ValueError, match=r"plan was not made from this coords"):
        ops.spacetime_attention(q, k, v, x.cu_seqlens, coords=x.coords.clone(), plan=x.plan, **kw)


# ----------------------------------------------------------------------------------------------
# the model, the sampler and the trainer


def texts(n, dim=32, dtype=torch.float32):
    return pack_sequences([torch.randn(m, dim, dtype=dtype) for m in (3, 0, 5, 2)[:n]])


@pytest.mark.parametrize("window", [None, (1, 1, 1), (0, 2, 0)])
def test_dit_in_tile_order_equals_t_major(window):
    """The same latents packed in both orders: the unpacked predictions (fp64) and the parameter gradients of
    a weighted sum of them agree, with per-video and per-frame timesteps."""
    dit = randomize(VideoDiT.from_name("tiny", window=window)).double()
    vids, text = latents(dtype=torch.float64), texts(len(SHAPES), dtype=torch.float64)
    weights = latents(dtype=torch.float64)                      # d loss / d output, per video (C, T, H, W)
    frames = sum(s[1] for s in SHAPES)
    for t in (torch.tensor([10.0, 999.0, 400.0, 3.0], dtype=torch.float64),
              torch.rand(frames, dtype=torch.float64) * 1000):
        results = []
        for order, tile in (("t-major", (4, 8, 8)), ("tile", (2, 3, 2)), ("tile", (1, 1, 1))):
            x = pack_videos(vids, order=order, tile=tile)
            dit.zero_grad()
            out = dit(x, t, text)                                                        # (N, C·p)
            (out * pack_videos(weights, order=order, tile=tile).tokens).sum().backward()
            results.append((x.unpack(out), [p.grad.clone() for p in dit.parameters()]))
        for out, grads in results[1:]:
            for a, b in zip(out, results[0][0]):
                assert_close(a, b, torch.float64)
            for a, b in zip(grads, results[0][1]):     # the adaLN tables are fp32: their sums over tokens are
                assert_close(a, b, torch.float32)       # fp32 sums, in another order


def test_dit_config_token_order_is_validated_saved_and_loaded():
    cfg = DiTConfig.from_name("tiny", token_order="tile", token_tile=[2, 4, 4])
    assert cfg.token_tile == (2, 4, 4)
    back = DiTConfig(**json.loads(json.dumps(dataclasses.asdict(cfg))))
    assert back == cfg
    old = dataclasses.asdict(DiTConfig.from_name("tiny"))
    del old["token_order"], old["token_tile"]                          # a config saved before the fields
    assert DiTConfig(**old).token_order == "t-major" and DiTConfig(**old).token_tile == (4, 8, 8)
    with pytest.raises(ValueError, match=r"DiTConfig.token_order must be one of 't-major', 'tile', got 'rows'"):
        DiTConfig.from_name("tiny", token_order="rows")
    with pytest.raises(ValueError, match=r"DiTConfig.token_tile must be 3 positive ints .* got \(4, 0, 4\)"):
        DiTConfig.from_name("tiny", token_order="tile", token_tile=(4, 0, 4))
    dit = VideoDiT(cfg)
    x = dit.pack(latents())
    assert (x.order, x.tile) == ("tile", (2, 4, 4))


def test_sampler_follows_the_model_order():
    """sample() packs in the denoiser's config order (or the one given); the result equals t-major sampling,
    with CFG, given frames and a step cache (sub-packs of the videos still denoising)."""
    dit_t = randomize(VideoDiT.from_name("tiny", window=(1, 1, 1))).double().eval()
    dit_tile = VideoDiT(dataclasses.replace(dit_t.config, token_order="tile", token_tile=(2, 2, 1))).double().eval()
    dit_tile.load_state_dict(dit_t.state_dict())
    seen = []

    def spy(x, t, text):
        seen.append((x.order, x.tile))
        return dit_tile(x, t, text)

    spy.config = dit_tile.config
    noise = latents(SHAPES[:3], torch.float64)
    text, uncond = texts(3, dtype=torch.float64), texts(3, dtype=torch.float64)
    given = [None, latents([SHAPES[1]], torch.float64)[0], None]
    levels = [None, torch.tensor([0.0, float("nan"), 0.3], dtype=torch.float64), None]
    kw = dict(steps=3, uncond_text=uncond, guidance=4.0, given=given, given_levels=levels, strength=[1.0, 1.0, 0.6],
              init=[None, None, latents([SHAPES[2]], torch.float64)[0]])
    ref = sample(dit_t, noise, text, **kw)
    got = sample(spy, noise, text, **kw)
    assert seen and all(s == ("tile", (2, 2, 1)) for s in seen)
    for a, b in zip(got, ref):
        assert_close(a, b, torch.float64)
    for a, b in zip(sample(dit_t, noise, text, token_order="tile", token_tile=(1, 2, 3), cache="first-block:0.05",
                           **kw), sample(dit_t, noise, text, cache="first-block:0.05", **kw)):
        assert_close(a, b, torch.float64)
    with pytest.raises(ValueError, match=r"token_order must be one of 't-major', 'tile', got 'x'"):
        sample(dit_t, noise, text, token_order="x", steps=1)


def test_trainer_packs_in_the_model_order(tmp_path):
    """A tile-order trainer: its packs are in tile order and its step loss is the mean of each video's own
    loss computed alone by the same weights in t-major order, then it trains and checkpoints."""
    torch.manual_seed(0)
    dit = randomize(VideoDiT.from_name("tiny", window=(1, 1, 1), token_order="tile", token_tile=(1, 2, 1)))
    ref_dit = VideoDiT(dataclasses.replace(dit.config, token_order="t-major"))       # the same weights, t-major
    ref_dit.load_state_dict(dit.state_dict())
    text = TinyTextEncoder(dim=dit.config.text_dim)
    items = [{"latent": torch.randn(s), "caption": c} for s, c in zip(SHAPES, ["a red dot", "", "blue", "x"])]
    cfg = TrainConfig(steps=2, token_budget=200, lr=1e-3, warmup_steps=1, save_every=2, log_every=1, seed=1,
                      cond_mix={"t2v": 0.4, "i2v": 0.3, "interpolate": 0.3})
    tr = Trainer(dit, text, items, cfg, tmp_path / "run", model_config={"dit": "tiny"}, progress=False)
    d = tr.draw(0)
    assert (d["x0"].order, d["x0"].tile) == ("tile", (1, 2, 1))
    with torch.no_grad():
        text_all = tr.text_encoder.encode(d["captions"])
        noises, texts_ = d["x0"].unpack(d["noise"]), text_all.unpack(text_all.tokens)
        lat, frames, per_video = d["x0"].unpack(d["x0"].tokens), d["x0"].frames_per_video, []
        f0 = 0
        for j in range(len(d["indices"])):
            lv = d["levels"][f0:f0 + frames[j]]
            keep = ~d["given"][f0:f0 + frames[j]]
            x0, eps = lat[j], noises[j]
            xt = (1 - lv[None, :, None, None]) * x0 + lv[None, :, None, None] * eps
            v = ref_dit.forward_videos([xt], [lv * 1000], [texts_[j]])[0]
            per_video.append(((v - (eps - x0)) ** 2)[:, keep].mean())
            f0 += frames[j]
        ref = torch.stack(per_video).mean().item()
    assert tr.train_step(0)["loss"] == pytest.approx(ref, rel=1e-5)
    summary = tr.train()
    assert summary["steps"] == 2


def test_kernels_get_coords_only_off_the_raster(monkeypatch):
    """The registered op hands ``coords=`` to a backend kernel only when they are not the t-major raster of
    the grid (which is what a kernel does without them)."""
    from sora_fast.ops import _dispatch

    seen = []
    real = _dispatch.get_kernel

    def recording(op, backend, device):
        kernel = real(op, backend, device)
        return lambda *a, **kw: seen.append("coords" in kw) or kernel(*a, **kw)

    monkeypatch.setattr(_dispatch, "get_kernel", recording)
    for order, moved in (("t-major", False), ("tile", True)):
        x = pack_videos(latents(), order=order, tile=(2, 2, 2))
        q, k, v = rand_qkv(x.num_tokens, x.num_tokens, 2, 8, requires_grad=True)
        out, _ = A._attention_op(q, k, v, x.cu_seqlens, x.cu_seqlens, None, None, 0.5, [1, 1, 1], x.grid, None, 1e4,
                                 "torch", x.coords)
        out.sum().backward()
        assert seen == [moved, moved], order
        seen.clear()
