"""accelerate() on diffusers' Wan transformer (2.1 T2V, I2V, 2.2 TI2V per-token timesteps) against the same
model before acceleration, on the torch backend and the kernel backends; undo() bit for bit; the packed
multi-latent forward."""
import _diffusers_utils
import pytest
import torch
from _diffusers_utils import FP32_REL, WAN_ALL, B, check_accelerated, input_and_param_grads, run, tiny_wan, wan_inputs
from test_dit import rel_err

from sora_fast.integrations.diffusers import accelerate, wan_packed_forward
from sora_fast.integrations.diffusers.wan import _GridRope
from sora_fast.integrations.diffusers.wan_packed import _shared_video_dit
from sora_fast.models.convert import wan_frame_timesteps
from sora_fast.models.dit import VideoDiT
from sora_fast.packing import pack_sequences, pack_videos

calls, kernels = _diffusers_utils.calls, _diffusers_utils.kernels  # the shared fixtures


@pytest.mark.parametrize("variant", ["t2v", "no-cross-attn-norm", "i2v", "ti2v-per-token-timesteps"])
def test_wan_transformer_matches_and_undo_restores(variant, calls):
    model_kw, input_kw = {}, {}
    if variant == "no-cross-attn-norm":
        model_kw = dict(cross_attn_norm=False)
    elif variant == "i2v":   # image tokens before diffusers' fixed 512 text tokens, a second key/value set
        model_kw, input_kw = dict(image_dim=20, added_kv_proj_dim=24), dict(text_len=512, image_tokens=5)
    elif variant == "ti2v-per-token-timesteps":
        input_kw = dict(timestep_per_token=True)
    m = tiny_wan(layers=3, **model_kw)
    check_accelerated(m, wan_inputs(**input_kw), calls, WAN_ALL)
    # inference hands each block's last gated add, fused with the next block's norm, down the chain:
    # one standalone adaLN for 3 blocks, 2 gated adds in each block plus the fused one in the first two
    assert (calls.count("adaln_modulate"), calls.count("gated_residual_adaln")) == (1, 8)


@pytest.mark.parametrize("flags,expect,absent", [
    (dict(norms=False), {"spacetime_attention+rope"}, {"adaln_modulate", "gated_residual_adaln"}),
    (dict(attention=False), {"adaln_modulate", "gated_residual_adaln"}, {"spacetime_attention"}),
], ids=["attention-only", "norms-only"])
def test_wan_flags_choose_what_is_patched(flags, expect, absent, calls):
    check_accelerated(tiny_wan(), wan_inputs(thw=(2, 4, 6)), calls, expect, **flags)
    assert not absent & {c.split("+")[0] for c in calls}


def test_wan_training_gradients_match():
    """With grad enabled the blocks do not hand fused norms across blocks; gradients of the input and of
    every parameter match diffusers' own."""
    m = tiny_wan()
    kw = wan_inputs(thw=(2, 4, 6))
    x = kw.pop("hidden_states").requires_grad_(True)

    ref = input_and_param_grads(m, x, kw)
    with accelerate(m):
        got = input_and_param_grads(m, x, kw)
    for r, g in zip(ref, got):
        assert rel_err(g, r) <= FP32_REL


def test_wan_bf16_within_bf16_error():
    """A bf16 model (weights, activations and diffusers' RoPE tables in bf16): against the fp32 run of the
    same bf16-rounded weights, the accelerated model's error is at most 2x diffusers' own bf16 error plus
    u = 2^-8 (flash-attention's rule; each bf16 rounding is a relative error <= u)."""
    m = tiny_wan()
    with torch.no_grad():
        for p in m.parameters():
            p.copy_(p.to(torch.bfloat16).float())
    kw = wan_inputs(thw=(2, 6, 8))
    kw = {k: v.to(torch.bfloat16).float() if v.is_floating_point() else v for k, v in kw.items()}
    ref = run(m, **kw)
    m16, kw16 = m.to(torch.bfloat16), {k: v.to(torch.bfloat16) for k, v in kw.items()}
    peer = run(m16, **kw16)
    with accelerate(m16):
        out = run(m16, **kw16)
    assert out.dtype == torch.bfloat16
    assert rel_err(out, ref) <= 2 * rel_err(peer, ref) + 2.0**-8, (rel_err(out, ref), rel_err(peer, ref))


def test_wan_kernel_backends(kernels):
    """Attention on the Triton kernel (interpreter), the adaLN chain on the CUDA kernels (host emulation)."""
    m = tiny_wan()
    kw = wan_inputs(thw=(2, 4, 6), text_len=5)
    ref = run(m, **kw)
    with accelerate(m, backend={"attention": "triton", "adaln": "cuda"}):
        out = run(m, **kw)
    assert {("spacetime_attention", "triton"), ("adaln_modulate", "cuda"), ("gated_residual_adaln", "cuda")} <= kernels
    assert rel_err(out, ref) <= FP32_REL


@pytest.mark.parametrize("backend", [None, {"attention": "triton", "adaln": "cuda"}], ids=["auto", "kernels"])
def test_wan_ti2v_per_token_timesteps(backend, kernels):
    """Wan 2.2 TI2V's 2-D per-token timesteps through the accelerated model equal diffusers' output: the TI2V
    pipeline's (given first frame at 0, the rest at t, one row expanded over the batch) and values that vary
    within a frame (the accelerated blocks take per-token tables, as diffusers does, so any values). Where
    they are equal per frame, the converted VideoDiT with per-frame timesteps agrees as well."""
    m = tiny_wan(layers=2)
    grid = (3, 2, 3)                                                              # (T', H', W') of 3x4x6 latents
    lat, txt = torch.randn(B, 4, 3, 4, 6), torch.randn(B, 5, 24)
    mask = torch.ones(3, 6)
    mask[0] = 0
    cases = {"pipeline": (mask * (torch.rand(()) * 1000)).flatten()[None].expand(B, -1),
             "any values": torch.rand(B, 18) * 1000}
    refs = {k: run(m, hidden_states=lat, timestep=ts, encoder_hidden_states=txt) for k, ts in cases.items()}
    with accelerate(m, backend=backend):
        for k, ts in cases.items():
            out = run(m, hidden_states=lat, timestep=ts, encoder_hidden_states=txt)
            assert rel_err(out, refs[k]) <= FP32_REL, k
    if backend is not None:
        assert {("adaln_modulate", "cuda"), ("gated_residual_adaln", "cuda"), ("spacetime_attention", "triton")} \
            <= kernels
    dit = VideoDiT.from_diffusers(m)
    x = pack_videos(list(lat))
    with torch.no_grad():
        got = x.unpack(dit(x, wan_frame_timesteps(cases["pipeline"], grid), pack_sequences(list(txt))))
    for i in range(B):
        assert rel_err(got[i], refs["pipeline"][i]) <= FP32_REL
    with pytest.raises(ValueError, match=r"timestep\[0\] varies within latent frame 0"):
        wan_frame_timesteps(cases["any values"], grid)


def test_wan_unfused_rope_when_the_grid_is_unknown():
    """Called with plain cos/sin tables (no grid: a hand-made call, a split sequence), the processor
    rotates q and k first, as diffusers does, and still matches."""
    m = tiny_wan(layers=1)
    attn = m.blocks[0].attn1
    x = torch.randn(B, 24, 24)
    rope = m.rope(torch.randn(1, 4, 2, 6, 8))
    with torch.no_grad():
        ref = attn(x, None, None, rope)
        with accelerate(m, norms=False):
            assert not isinstance(rope, _GridRope)
            out = attn(x, None, None, rope)
    assert rel_err(out, ref) <= FP32_REL


# ----------------------------------------------------------------------------------------------
# packed forward of latents of different sizes


def test_wan_packed_forward_equals_each_latent_alone():
    m = tiny_wan(layers=2)
    latents = [torch.randn(4, 1, 6, 10), torch.randn(4, 3, 4, 2), torch.randn(4, 2, 8, 6)]
    text = [torch.randn(5, 24), torch.randn(1, 24), torch.randn(9, 24)]
    t = torch.tensor([1.0, 480.0, 999.0])
    with torch.no_grad():
        outs = wan_packed_forward(m, latents, t, text)
    for i, (lat, txt) in enumerate(zip(latents, text)):
        ref = run(m, hidden_states=lat[None], timestep=t[i:i + 1], encoder_hidden_states=txt[None])[0]
        assert outs[i].shape == ref.shape == (3, *lat.shape[1:])
        assert rel_err(outs[i], ref) <= FP32_REL, f"latent {i}"


def test_wan_packed_forward_takes_per_token_timesteps():
    """Per latent, diffusers' per-token timesteps (Wan 2.2 TI2V, equal within each latent frame) or per-frame
    ones: each output equals diffusers on that latent alone with (1, S_i) per-token timesteps; a value that
    varies within a frame is a ValueError naming the latent."""
    m = tiny_wan(layers=2)
    latents = [torch.randn(4, 3, 4, 2), torch.randn(4, 1, 6, 10), torch.randn(4, 2, 8, 6)]
    text = [torch.randn(5, 24), torch.randn(1, 24), torch.randn(9, 24)]
    frames = [torch.rand(lat.shape[1]) * 1000 for lat in latents]
    frames[0][0] = 0.0                                                            # a given first frame
    tokens = [f.repeat_interleave(lat.shape[2] * lat.shape[3] // 4) for f, lat in zip(frames, latents)]
    with torch.no_grad():
        outs = wan_packed_forward(m, latents, [tokens[0], frames[1], tokens[2]], text)
    for i, (lat, txt) in enumerate(zip(latents, text)):
        ref = run(m, hidden_states=lat[None], timestep=tokens[i][None], encoder_hidden_states=txt[None])[0]
        assert rel_err(outs[i], ref) <= FP32_REL, f"latent {i}"
    bad = tokens[2].clone()
    bad[-1] += 1.0
    with pytest.raises(ValueError, match=r"timesteps\[2\] varies within latent frame 1 \(tokens 12\.\.23: "):
        wan_packed_forward(m, latents, [tokens[0], tokens[1], bad], text)
    with pytest.raises(ValueError, match=r"timesteps as a list must hold one tensor per latent \(3\), got 2"):
        wan_packed_forward(m, latents, tokens[:2], text)
    with pytest.raises(ValueError, match=r"timesteps\[1\] must have shape \(1,\), one per latent frame"):
        wan_packed_forward(m, latents, [tokens[0], torch.ones(7), tokens[2]], text)


def test_wan_packed_forward_shares_weights_and_takes_a_text_tensor():
    m = tiny_wan(layers=1)
    lat, text = [torch.randn(4, 2, 4, 4)], torch.randn(1, 3, 24)
    with torch.no_grad():
        before = wan_packed_forward(m, lat, 500.0, text)[0]
        m.blocks[0].ffn.net[2].weight.mul_(2)          # in place: the packed model sees it
        after = wan_packed_forward(m, lat, 500.0, text)[0]
        ref = run(m, hidden_states=lat[0][None], timestep=torch.tensor([500.0]), encoder_hidden_states=text)[0]
    assert rel_err(after, ref) <= FP32_REL and rel_err(before, ref) > 1e-3
    dit = _shared_video_dit(m, None)
    assert dit.blocks[0].attn1.to_q.weight.data_ptr() == m.blocks[0].attn1.to_q.weight.data_ptr()


def test_wan_packed_forward_bad_inputs():
    m = tiny_wan(layers=1)
    lat = [torch.randn(4, 1, 4, 4)]
    with pytest.raises(TypeError, match="transformer must be a diffusers WanTransformer3DModel, got Linear"):
        wan_packed_forward(torch.nn.Linear(2, 2), lat, 1.0, [torch.randn(2, 24)])
    with pytest.raises(TypeError, match=r"latents must be a non-empty list .* got list \(empty\)"):
        wan_packed_forward(m, [], 1.0, [])
    with pytest.raises(ValueError, match=r"one prompt embedding per latent \(1\), got 2"):
        wan_packed_forward(m, lat, 1.0, [torch.randn(2, 24)] * 2)
    with pytest.raises(ValueError, match=r"or a \(B, L, text_dim\) tensor, got shape \(2, 24\)"):
        wan_packed_forward(m, lat, 1.0, torch.randn(2, 24))
    with pytest.raises(ValueError, match="image conditioning"):
        wan_packed_forward(tiny_wan(layers=1, image_dim=20, added_kv_proj_dim=24), lat, 1.0, [torch.randn(2, 24)])


@pytest.mark.parametrize("flags", [{}, dict(norms=False), dict(attention=False)], ids=["all", "attention", "norms"])
def test_small_cpu_calls_run_diffusers_own_code(flags, calls, monkeypatch):
    """On a CPU, blocks and unwindowed attention calls whose hidden states hold fewer than
    ``wan.CPU_MIN_ELEMENTS`` elements run diffusers' own code (faster there): no sora_fast op runs and the
    output is diffusers' bit for bit. At the threshold the patched path runs again; ``choices`` say so."""
    from sora_fast.integrations.diffusers import wan

    m = tiny_wan(layers=3)
    kw = wan_inputs(thw=(2, 4, 6))
    elements = B * (2 * 2 * 3) * m.config.num_attention_heads * m.config.attention_head_dim   # B·S·D
    ref = run(m, **kw)
    handle = accelerate(m, **flags)
    monkeypatch.setattr(wan, "CPU_MIN_ELEMENTS", elements + 1)
    calls.clear()
    assert torch.equal(run(m, **kw), ref) and calls == []
    assert all("diffusers' own code" in c for c in handle.choices.values()), handle.choices
    monkeypatch.setattr(wan, "CPU_MIN_ELEMENTS", elements)
    out = run(m, **kw)
    assert calls and rel_err(out, ref) <= FP32_REL
    handle.undo()


def test_windowed_self_attention_never_falls_back(calls, monkeypatch):
    """A windowed self-attention has no diffusers counterpart: it runs on sora_fast at any size, while the
    cross-attention (unwindowed) and the blocks of a small call take diffusers' code."""
    from sora_fast.integrations.diffusers import wan

    m = tiny_wan()
    kw = wan_inputs(thw=(2, 4, 6))
    monkeypatch.setattr(wan, "CPU_MIN_ELEMENTS", 1 << 30)
    with accelerate(m, window=(0, 1, 1)):
        calls.clear()
        run(m, **kw)
    assert calls == ["spacetime_attention+rope"] * m.config.num_layers
