"""Per-frame timesteps in VideoDiT: ``timesteps`` of shape ``(F,)``, one per latent frame of every video.

Equal per-frame values give bit for bit the per-video result (torch and the CUDA host emulation, fp32 and
bf16, outputs and gradients); different values match diffusers' WanTransformer3DModel given the same
values per token (its Wan 2.2 TI2V path: an independent implementation of the per-token modulation), and
diffusers' per-token timesteps convert to per-frame ones (or are refused where a frame's tokens differ);
changing one frame's timestep changes only what it must; the adaLN ops take tables of R rows with any
R (frames) and int32 row ids on every backend, forward and backward."""
import pytest
import torch
from _utils import assert_close
from test_dit import FP32_REL, randomize, rel_err, wan

from sora_fast.cuda import launchers as _cuda
from sora_fast.models.convert import wan_frame_timesteps
from sora_fast.models.dit import VideoDiT
from sora_fast.ops import adaln_modulate, gated_residual_adaln
from sora_fast.packing import frame_ids, pack_sequences, pack_videos

# an awkward pack: a 1-frame image, a 3-frame and a 5-frame video, each of another H, W (patch (1, 2, 2))
SHAPES = [(1, 6, 4), (3, 4, 6), (5, 2, 4)]
FRAMES = [1, 3, 5]
F_ALL = sum(FRAMES)


def awkward_pack(dtype=torch.float32, channels=4, text_dim=32):
    lat = [torch.randn(channels, *s, dtype=dtype) for s in SHAPES]
    txt = [torch.randn(n, text_dim, dtype=dtype) for n in (3, 0, 5)]   # an empty caption too
    return lat, txt


def tiny(**overrides) -> VideoDiT:
    return randomize(VideoDiT.from_name("tiny", **overrides))


def per_frame(t_video: torch.Tensor) -> torch.Tensor:
    return t_video.repeat_interleave(torch.tensor(FRAMES))


# ----------------------------------------------------------------------------------------------
# the row index


def test_frame_ids_are_frame_offset_plus_t():
    x = pack_videos([torch.randn(4, *s) for s in SHAPES])
    ids = frame_ids(x)
    assert ids.dtype == torch.int32 and ids.shape == (x.num_tokens,)
    expected, offset = [], 0
    for (t, h, w) in SHAPES:
        hw = (h // 2) * (w // 2)
        expected += [offset + i // hw for i in range(t * hw)]
        offset += t
    assert ids.tolist() == expected
    assert int(ids.max()) == F_ALL - 1 == int(x.grid[:, 0].sum()) - 1
    # a token shard (sequence parallel) keeps global grid and coords: its rows are the same
    from sora_fast.distributed.packs import token_shard

    assert torch.equal(frame_ids(token_shard(x, 5, 20)), ids[5:20])
    # patch pt = 2: latent frames are T / 2
    x2 = pack_videos([torch.randn(4, 4, 2, 2), torch.randn(4, 2, 2, 2)], patch=(2, 1, 1))
    assert frame_ids(x2).tolist() == [0] * 4 + [1] * 4 + [2] * 4


# ----------------------------------------------------------------------------------------------
# equal per-frame values == per-video, bit for bit


@pytest.mark.parametrize("adaln", ["torch", "cuda"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_equal_per_frame_values_give_the_per_video_result_bitwise(adaln, dtype, monkeypatch):
    """(B,) and the same values repeated per frame (F,): the same output and gradients, torch.equal; on
    the torch backend and with the adaLN family on the CUDA kernels (host emulation on CPU), in fp32 and
    with bf16 weights and inputs."""
    monkeypatch.setattr(_cuda, "POISON_OUTPUTS", True)
    dit = tiny(pooled_text=True).to(dtype)
    dit.backend = {"attention": None, "adaln": adaln}
    lat, txt = awkward_pack(dtype)
    x, text = pack_videos(lat), pack_sequences(txt)
    t = torch.tensor([3.0, 517.25, 999.0])
    w = torch.randn(x.num_tokens, 16, dtype=dtype)

    def run(timesteps):
        dit.zero_grad()
        xt = x.with_tokens(x.tokens.clone().requires_grad_())
        out = dit(xt, timesteps, text)
        (out.float() * w.float()).sum().backward()
        return out.detach(), xt.tokens.grad, {n: p.grad.clone() for n, p in dit.named_parameters()}

    out_v, gx_v, gp_v = run(t)
    out_f, gx_f, gp_f = run(per_frame(t))
    assert out_v.dtype == dtype
    assert torch.equal(out_v, out_f)
    assert torch.equal(gx_v, gx_f)
    assert gp_v.keys() == gp_f.keys()
    for name in gp_v:
        assert torch.equal(gp_v[name], gp_f[name]), name
        assert gp_v[name].abs().max() > 0, f"no gradient reaches {name}"
    # forward_videos: one tensor of per-frame values per video, the flat (F,) tensor, and (B,)
    with torch.no_grad():
        listed = dit.forward_videos(lat, list(per_frame(t).split(FRAMES)), txt)
        flat = dit.forward_videos(lat, per_frame(t), txt)
        video = dit.forward_videos(lat, t, txt)
    for a, b, c, ref in zip(listed, flat, video, x.unpack(out_v)):
        assert torch.equal(a, ref) and torch.equal(b, ref) and torch.equal(c, ref)


def test_every_video_one_frame_both_forms_are_the_same():
    """B == F (a pack of images): the (B,) and (F,) readings coincide."""
    dit = tiny()
    lat = [torch.randn(4, 1, 2, 4), torch.randn(4, 1, 4, 2)]
    x, text = pack_videos(lat), pack_sequences([torch.randn(2, 32), torch.randn(3, 32)])
    t = torch.tensor([10.0, 900.0])
    with torch.no_grad():
        out = dit(x, t, text)
        alone = [dit.forward_videos([lat[i]], t[i:i + 1], [text.unpack(text.tokens)[i]])[0] for i in range(2)]
    for got, ref in zip(x.unpack(out), alone):
        assert_close(got, ref, torch.float32)


def test_forward_reads_the_frame_count_on_the_host(monkeypatch):
    """The pack's host frame count tells (B,) from (F,) timesteps: the forward gives the same output,
    bit for bit, as with the count unknown (read from grid), and no device read of the forward comes
    from the model or the packing (only from the ops' own value checks); with the count unknown one does."""
    import dataclasses
    import traceback

    from torch.utils._python_dispatch import TorchDispatchMode

    class DeviceReads(TorchDispatchMode):
        def __init__(self):
            super().__init__()
            self.where = []

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            if func is torch.ops.aten._local_scalar_dense.default:         # .item(), int(), .tolist()
                ours = [f for f in traceback.extract_stack() if "/sora_fast/" in f.filename]
                self.where.append(ours[-1].filename.rsplit("/sora_fast/", 1)[1])
            return func(*args, **(kwargs or {}))

    dit = tiny(pooled_text=True)
    lat, txt = awkward_pack()
    x, text = pack_videos(lat), pack_sequences(txt)
    unknown = dataclasses.replace(x, frames=None)
    for t in (torch.rand(3) * 1000, torch.rand(F_ALL) * 1000):
        outs = []
        for pack in (x, unknown):
            with torch.no_grad(), DeviceReads() as reads:
                outs.append(dit(pack, t, text))
            own = [w for w in reads.where if w.startswith(("models/", "packing.py"))]
            assert own == ([] if pack.frames is not None else ["packing.py"]), reads.where
        assert torch.equal(outs[0], outs[1])


# ----------------------------------------------------------------------------------------------
# different per-frame values against an independent implementation


def _wan_per_token(m, lat, t_frames, txt, pt=1):
    """diffusers, one video at a time, each latent frame's value repeated for its tokens: (1, S) timesteps."""
    _, t, h, w = lat.shape
    ph, pw = m.config.patch_size[1:]
    per_token = t_frames.repeat_interleave((h // ph) * (w // pw))[None]          # (1, S)
    with torch.no_grad():
        return m(lat[None], per_token, txt[None], return_dict=False)[0][0]


@pytest.mark.parametrize("patch", [(1, 2, 2), (2, 2, 1)])
def test_different_per_frame_values_match_diffusers_per_token_timesteps(patch):
    m = wan(patch=patch)
    dit = VideoDiT.from_diffusers(m)
    pt = patch[0]
    shapes = [(pt * 1, 6, 4), (pt * 3, 4, 6), (pt * 5, 2, 4)]
    lat = [torch.randn(4, *s) for s in shapes]
    txt = [torch.randn(n, 24) for n in (3, 1, 5)]
    t_frames = [torch.rand(s[0] // pt) * 1000 for s in shapes]
    t_frames[1][0] = 0.0                                                         # a given (clean) first frame
    with torch.no_grad():
        got = dit.forward_videos(lat, t_frames, txt)
    for i in range(3):
        ref = _wan_per_token(m, lat[i], t_frames[i], txt[i])
        assert got[i].shape == ref.shape
        assert rel_err(got[i], ref) <= FP32_REL, f"video {i}"
    # and the per-frame values matter: the per-video mean gives another output
    with torch.no_grad():
        mean = dit.forward_videos(lat, torch.stack([t.mean() for t in t_frames]), txt)
    assert rel_err(mean[2], got[2]) > 1e-3


@pytest.mark.parametrize("patch", [(1, 2, 2), (2, 2, 1)])
def test_diffusers_per_token_timesteps_convert_to_per_frame(patch):
    """Wan 2.2 TI2V gives diffusers one timestep per patch token, (B, S), equal within each latent frame:
    wan_frame_timesteps turns them into VideoDiT's (F,) form, and the converted model's output on the pack
    equals diffusers' on the batch; (B,) timesteps convert too. The TI2V pipeline's own construction (a
    mask at the patch grid times t, one row expanded over the batch) included."""
    m = wan(patch=patch)
    dit = VideoDiT.from_diffusers(m)
    grid = (3, 3, 2)                                                               # T', H', W' in patches
    hw = grid[1] * grid[2]
    lat = torch.randn(2, 4, *(g * p for g, p in zip(grid, patch)))
    txt = torch.randn(2, 5, 24)
    per_frame = torch.rand(2, grid[0]) * 1000
    per_frame[0, 1:] = per_frame[0, 0]
    per_frame[0, 0] = 0.0                                                          # image-to-video: frame 0 given
    mask = torch.ones(grid[0], hw)
    mask[0] = 0
    t = torch.rand(()) * 1000
    cases = {"per-frame values": per_frame.repeat_interleave(hw, dim=1),          # (2, S)
             "pipeline": (mask * t).flatten()[None].expand(2, -1),                # stride-0 rows, as TI2V
             "per-video": torch.rand(2) * 1000}                                   # (B,)
    x, text = pack_videos(list(lat), patch), pack_sequences(list(txt))
    for name, ts in cases.items():
        with torch.no_grad():
            ref = m(lat, ts, txt, return_dict=False)[0]                            # diffusers on the batch
            frames = wan_frame_timesteps(ts, grid)
            got = x.unpack(dit(x, frames, text))
        assert frames.shape == (2 * grid[0],)
        want = ts.repeat_interleave(grid[0]) if ts.dim() == 1 else ts.reshape(2, grid[0], hw)[:, :, 0].flatten()
        assert torch.equal(frames, want), name
        for i in range(2):
            assert rel_err(got[i], ref[i]) <= FP32_REL, f"{name}, latent {i}"
    # the per-frame values matter: the per-video mean is another output
    with torch.no_grad():
        mean = x.unpack(dit(x, per_frame.mean(1), text))
        got = x.unpack(dit(x, per_frame.flatten(), text))
    assert rel_err(mean[0], got[0]) > 1e-3


def test_diffusers_per_token_timesteps_varying_within_a_frame_are_refused():
    """Values that differ inside a latent frame have no per-frame table: a ValueError naming the latent,
    the frame, its tokens and two of the values, never a silent answer. Bad shapes and types too."""
    grid = (3, 2, 3)
    ts = (torch.rand(2, 3) * 1000).repeat_interleave(6, dim=1)                    # (2, 18)
    ts[1, 2 * 6 + 4] += 0.5                                                        # latent 1, frame 2, its 5th token
    with pytest.raises(ValueError, match=r"^timestep\[1\] varies within latent frame 2 \(tokens 12\.\.17: "
                                         r"[0-9.e+]+ and [0-9.e+]+\); VideoDiT takes one timestep per latent frame"):
        wan_frame_timesteps(ts, grid)
    with pytest.raises(ValueError, match=r"timestep must have shape \(B,\) or \(B, 18\) \(one per token of a "
                                         r"3x2x3 patch grid\), got \(2, 17\)"):
        wan_frame_timesteps(ts[:, 1:], grid)
    with pytest.raises(ValueError, match=r"got \(2, 3, 6\)"):
        wan_frame_timesteps(ts.reshape(2, 3, 6), grid)
    with pytest.raises(ValueError, match=r"grid must be 3 positive ints \(T', H', W'\).*got \(3, 0, 3\)"):
        wan_frame_timesteps(ts, (3, 0, 3))
    with pytest.raises(TypeError, match=r"timestep must hold real numbers .* got torch\.bool"):
        wan_frame_timesteps(ts > 500, grid)
    with pytest.raises(TypeError, match=r"timestep must be a torch\.Tensor of shape \(B,\) or \(B, S\), got list"):
        wan_frame_timesteps([1.0, 2.0], grid)


def test_one_frame_timestep_changes_only_what_it_must():
    """With attention local in time (window wt = 0) a frame's timestep reaches only that frame's tokens;
    with global attention every token of its video, never another video (bit for bit unchanged)."""
    lat, txt = awkward_pack()
    x, text = pack_videos(lat), pack_sequences(txt)
    t = torch.rand(F_ALL) * 1000
    b, j = 2, 3                                               # video 2 (5 frames), its frame 3
    row = sum(FRAMES[:b]) + j
    t2 = t.clone()
    t2[row] = 50.0 if t[row] > 500 else 950.0
    ids = frame_ids(x)
    in_video = x.seq_ids == b
    in_frame = ids == row
    for window in [(0, 100, 100), None]:
        dit = tiny(window=window, pooled_text=True)
        with torch.no_grad():
            a, c = dit(x, t, text), dit(x, t2, text)
        changed = (a != c).any(dim=1)
        assert torch.equal(a[~in_video], c[~in_video]), f"window={window}: another video changed"
        assert changed[in_frame].all(), f"window={window}: the frame's own tokens must change"
        if window is not None:
            assert not changed[in_video & ~in_frame].any(), "frames outside the time window changed"
        else:
            assert changed[in_video].all(), "global attention carries the change to every frame"


def test_gradients_flow_to_each_frames_timestep_and_only_within_its_video():
    dit = tiny(pooled_text=True)
    lat, txt = awkward_pack()
    x, text = pack_videos(lat), pack_sequences(txt)
    t = (torch.rand(F_ALL) * 1000).requires_grad_()
    out = dit(x, t, text)
    w = torch.randn_like(out)
    (out[x.seq_ids == 2] * w[x.seq_ids == 2]).sum().backward()     # a loss on video 2 (frames 4..8) only
    rows = torch.zeros(F_ALL, dtype=torch.bool)
    rows[4:9] = True
    assert (t.grad[rows] != 0).all()
    assert (t.grad[~rows] == 0).all()
    grads = {n: p.grad for n, p in dit.named_parameters()}
    for name in ("time_embed.0.weight", "time_proj.weight", "text_pool.weight", "scale_shift_table",
                 "blocks.0.scale_shift_table"):
        assert grads[name].abs().max() > 0, f"no gradient reaches {name}"


def test_checkpointing_with_per_frame_timesteps():
    dit = tiny()
    lat, txt = awkward_pack()
    x, text = pack_videos(lat), pack_sequences(txt)
    t = torch.rand(F_ALL) * 1000
    grads = []
    for ckpt in (False, True):
        dit.checkpointing = ckpt
        dit.zero_grad()
        dit(x, t, text).square().sum().backward()
        grads.append({n: p.grad.clone() for n, p in dit.named_parameters()})
    for name in grads[0]:
        assert_close(grads[1][name], grads[0][name], torch.float32, msg=name)


def test_bf16_autocast_per_frame_equals_per_video_bitwise():
    dit = tiny()
    lat, txt = awkward_pack()
    x, text = pack_videos(lat), pack_sequences(txt)
    t = torch.tensor([100.0, 400.0, 800.0])
    with torch.no_grad(), torch.autocast("cpu", torch.bfloat16):
        a, b = dit(x, t, text), dit(x, per_frame(t), text)
    assert a.dtype == torch.bfloat16 and torch.equal(a, b)


def test_tables_have_one_row_per_frame_never_per_token(monkeypatch):
    """Every adaLN call of the model gets (F, D) tables (or None for a term it does not have: the ungated
    add, the plain norm before cross-attention) and the int32 frame ids: table memory is O(frames x D)
    whatever the token count."""
    import sora_fast.models.dit as dit_module

    seen = []
    real_mod, real_gated = dit_module.ops.adaln_modulate, dit_module.ops.gated_residual_adaln

    def modulate(x, shift, scale, ids, **kw):
        seen.append((shift.shape, scale.shape, ids))
        return real_mod(x, shift, scale, ids, **kw)

    def gated(x, branch, gate, shift, scale, ids, **kw):
        seen.append((*(t.shape for t in (gate, shift, scale) if t is not None), ids))
        return real_gated(x, branch, gate, shift, scale, ids, **kw)

    monkeypatch.setattr(dit_module.ops, "adaln_modulate", modulate)
    monkeypatch.setattr(dit_module.ops, "gated_residual_adaln", gated)
    dit = tiny()
    lat, txt = awkward_pack()
    x, text = pack_videos(lat), pack_sequences(txt)
    for t in (torch.tensor([1.0, 2.0, 3.0]), torch.rand(F_ALL) * 1000):
        seen.clear()
        with torch.no_grad():
            dit(x, t, text)
        assert len(seen) == 1 + 3 * dit.config.num_layers
        for *shapes, ids in seen:
            assert all(tuple(s) == (F_ALL, dit.config.dim) for s in shapes), shapes
            assert torch.equal(ids, frame_ids(x))


# ----------------------------------------------------------------------------------------------
# the adaLN ops with one row per frame (R = F rows, not B)


@pytest.mark.parametrize("backend", ["torch", "cuda"])
def test_adaln_ops_take_per_frame_rows(backend, monkeypatch):
    """Tables of R = F rows read through frame ids: the same as the per-token gather (seq_ids=None),
    forward and every gradient, and a row no token reads gets zero gradient."""
    monkeypatch.setattr(_cuda, "POISON_OUTPUTS", True)
    x = pack_videos([torch.randn(4, *s) for s in SHAPES])
    ids = frame_ids(x)
    n, d, r = x.num_tokens, 24, F_ALL + 1                     # one extra row that no token reads
    h, branch = torch.randn(n, d, dtype=torch.float64), torch.randn(n, d, dtype=torch.float64)
    tables = [torch.randn(r, d, dtype=torch.float64) for _ in range(3)]
    weight, bias = 1 + 0.3 * torch.randn(d), 0.3 * torch.randn(d)
    dt = torch.float32
    inputs = [t.to(dt).requires_grad_() for t in (h, branch, *tables)]
    xs, bs, gate, shift, scale = inputs
    xn, y = gated_residual_adaln(xs, bs, gate, shift, scale, ids, weight=weight, bias=bias, backend=backend)
    y2 = adaln_modulate(xn, shift, scale, ids, norm="rms", backend=backend)
    (xn.sum() + (y * y2).sum()).backward()
    got = [t.grad for t in inputs]

    ref_in = [t.to(dt).detach().requires_grad_() for t in (h, branch, *tables)]
    rx, rb, rg, rs, rc = ref_in
    idx = ids.long()
    rxn, ry = gated_residual_adaln(rx, rb, rg[idx], rs[idx], rc[idx], None, weight=weight, bias=bias,
                                   backend="torch")
    ry2 = adaln_modulate(rxn, rs[idx], rc[idx], None, norm="rms", backend="torch")
    (rxn.sum() + (ry * ry2).sum()).backward()
    assert_close(xn, rxn, dt, msg="x_new")
    assert_close(y, ry, dt, msg="y")
    assert_close(y2, ry2, dt, msg="y2")
    for name, g, rg_ in zip(("x", "branch", "gate", "shift", "scale"), got, (t.grad for t in ref_in)):
        assert_close(g, rg_, dt, msg=f"d{name}")
    for g in got[2:]:
        assert (g[-1] == 0).all() and g[:-1].abs().max() > 0


# ----------------------------------------------------------------------------------------------
# bad input


def test_bad_per_frame_timesteps():
    dit = VideoDiT.from_name("tiny")
    lat, txt = awkward_pack()
    x, text = pack_videos(lat), pack_sequences(txt)
    shapes = r"\(3,\), one per video of x, or \(9,\), one per latent frame of x,"
    with pytest.raises(ValueError, match=rf"timesteps must have shape {shapes} got \(8,\)$"):
        dit(x, torch.ones(8), text)
    with pytest.raises(ValueError, match=rf"timesteps must have shape {shapes} got \(1, 9\)$"):
        dit(x, torch.ones(1, 9), text)
    with pytest.raises(ValueError, match=r"timesteps as a list must hold one tensor per video \(3\), got 2"):
        dit.forward_videos(lat, [torch.ones(1), torch.ones(3)], txt)
    with pytest.raises(ValueError, match=r"timesteps\[2\] must have shape \(5,\), one per latent frame of video 2, "
                                         r"got \(4,\)"):
        dit.forward_videos(lat, [torch.ones(1), torch.ones(3), torch.ones(4)], txt)
    with pytest.raises(TypeError, match=r"timesteps\[0\] must be a torch\.Tensor of shape \(1,\), got float"):
        dit.forward_videos(lat, [1.0, torch.ones(3), torch.ones(5)], txt)
    with pytest.raises(ValueError, match=r"timesteps\[1\] must be on x's device cpu, got meta"):
        dit.forward_videos(lat, [torch.ones(1), torch.ones(3, device="meta"), torch.ones(5)], txt)

