"""accelerate(): diffusers models and pipelines on sora_fast ops, against the same diffusers objects before
acceleration. Tiny random-weight configs on CPU (nothing downloaded; every weight randomized so zero-init
gates or tables cannot hide a bug): Wan transformer (2.1 T2V, I2V, 2.2 TI2V per-token timesteps), Wan VAE
(2.1 and 2.2 layouts), HunyuanVideo, LTX-Video, CogVideoX, a WanPipeline built from components; the torch
backend and the kernel backends (Triton interpreter, CUDA host emulation); undo() bit for bit; the packed
multi-latent forward; every bad input, each leaving the model untouched."""
import math
import subprocess
import sys

import pytest
import torch
from diffusers import (AutoencoderKL, AutoencoderKLWan, CogVideoXTransformer3DModel,
                       FlowMatchEulerDiscreteScheduler, HunyuanVideoTransformer3DModel, LTXVideoTransformer3DModel,
                       WanPipeline, WanTransformer3DModel)
from diffusers.models import attention_dispatch
from diffusers.models.embeddings import get_3d_rotary_pos_embed
from tokenizers import Tokenizer, models, pre_tokenizers
from transformers import PreTrainedTokenizerFast, UMT5Config, UMT5EncoderModel

import sora_fast
from sora_fast import ops
from sora_fast.integrations import diffusers as integ
from sora_fast.integrations.diffusers import DiffusersHooksError, accelerate, wan_packed_forward
from sora_fast.cuda import launchers as _cuda
from sora_fast.ops import _dispatch

from test_dit import randomize, rel_err

# fp32: max|accelerated - original| / max|original|. The same weights and math in another order (fp32
# sums, RoPE from integer coordinates instead of float64 tables): a few units of 2^-24 per op, well
# under 1e-5 after a few layers (measured 2e-7 .. 1e-6); a wrong table, mask or norm gives O(1).
FP32_REL = 1e-5
B = 2


def randomized(model):
    return randomize(model).eval()


def run(model, **kw):
    with torch.no_grad():
        return model(**kw, return_dict=False)[0]


def state(model):
    """Everything that identifies a model's behaviour without running it: its weights by identity and
    value, every submodule and processor object, and which forwards are instance attributes."""
    def processor_backend(m):
        p = getattr(m, "processor", None)
        return None if p is None else vars(p).get("_attention_backend")

    return ({k: (v.data_ptr(), v.clone()) for k, v in model.state_dict().items()},
            [(n, m, "forward" in vars(m), getattr(m, "processor", None), processor_backend(m))
             for n, m in model.named_modules()])


def assert_same_state(a, b):
    assert a[0].keys() == b[0].keys()
    for k in a[0]:
        assert a[0][k][0] == b[0][k][0] and torch.equal(a[0][k][1], b[0][k][1]), k
    assert a[1] == b[1]


def check_accelerated(model, kw, calls, expect_calls, *, backend=None, **flags):
    """Original output, accelerated output within FP32_REL with the expected sora_fast ops having run,
    then undo(): the original's output bit for bit and the same module/processor objects."""
    before = state(model)
    ref = run(model, **kw)
    handle = accelerate(model, backend=backend, **flags)
    calls.clear()
    out = run(model, **kw)
    assert expect_calls <= set(calls), f"expected ops {expect_calls}, ran {set(calls)}"
    assert out.shape == ref.shape and rel_err(out, ref) <= FP32_REL, rel_err(out, ref)
    handle.undo()
    assert not handle.active
    assert_same_state(state(model), before)
    assert torch.equal(run(model, **kw), ref)


@pytest.fixture
def calls(monkeypatch):
    """Names of the sora_fast ops called (with `+rope` when attention got fused RoPE coordinates)."""
    seen = []
    for name in ("spacetime_attention", "adaln_modulate", "gated_residual_adaln", "causal_conv3d",
                 "channel_rms_norm_silu"):
        fn = getattr(ops, name)

        def wrapper(*a, _fn=fn, _name=name, **kw):
            seen.append(_name + ("+rope" if kw.get("rope_coords") is not None else ""))
            return _fn(*a, **kw)

        monkeypatch.setattr(ops, name, wrapper)
    return seen


@pytest.fixture
def kernels(monkeypatch):
    """(op, backend) pairs fetched from the kernel registry, CUDA-emulation outputs NaN-poisoned first."""
    ran = set()
    get = _dispatch.get_kernel

    def recording(op, b, device):
        ran.add((op, b))
        return get(op, b, device)

    monkeypatch.setattr(_dispatch, "get_kernel", recording)
    monkeypatch.setattr(_cuda, "POISON_OUTPUTS", True)
    return ran


# ----------------------------------------------------------------------------------------------
# Wan transformer


def tiny_wan(layers=2, heads=2, head_dim=12, **kw):
    """Head dim 12 (RoPE split 4/4/4), 4 latent channels in, 3 out, text width 24."""
    cfg = dict(patch_size=(1, 2, 2), num_attention_heads=heads, attention_head_dim=head_dim, in_channels=4,
               out_channels=3, text_dim=24, freq_dim=32, ffn_dim=40, num_layers=layers, eps=1e-6)
    return randomized(WanTransformer3DModel(**{**cfg, **kw}))


def wan_inputs(thw=(3, 6, 10), text_len=7, timestep_per_token=False, image_tokens=0):
    t, h, w = thw
    kw = dict(hidden_states=torch.randn(B, 4, t, h, w), timestep=torch.rand(B) * 1000,
              encoder_hidden_states=torch.randn(B, text_len, 24))
    if timestep_per_token:   # Wan 2.2 TI2V: a timestep per patch token
        kw["timestep"] = torch.rand(B, t * (h // 2) * (w // 2)) * 1000
    if image_tokens:
        kw["encoder_hidden_states_image"] = torch.randn(B, image_tokens, 20)
    return kw


WAN_ALL = {"spacetime_attention", "spacetime_attention+rope", "adaln_modulate", "gated_residual_adaln"}


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

    def grads():
        m.zero_grad()
        x.grad = None
        out = m(hidden_states=x, **kw, return_dict=False)[0]
        (out * torch.linspace(-1, 1, out.numel()).view_as(out)).sum().backward()
        return [x.grad.clone()] + [p.grad.clone() for p in m.parameters()]

    ref = grads()
    with accelerate(m):
        got = grads()
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
            assert not isinstance(rope, integ._GridRope)
            out = attn(x, None, None, rope)
    assert rel_err(out, ref) <= FP32_REL


# ----------------------------------------------------------------------------------------------
# Wan VAE

VAE21 = dict(base_dim=8, z_dim=4, dim_mult=[1, 2, 2, 2], num_res_blocks=1, attn_scales=[],
             temperal_downsample=[False, True, True])
VAE22 = dict(base_dim=8, decoder_base_dim=10, z_dim=4, dim_mult=[1, 2, 2], num_res_blocks=1, attn_scales=[],
             temperal_downsample=[False, True], is_residual=True, patch_size=2, in_channels=12, out_channels=12)


def tiny_vae(arch):
    z = arch["z_dim"]
    vae = AutoencoderKLWan(**arch, latents_mean=(torch.randn(z) * 0.3).tolist(),
                           latents_std=(torch.rand(z) + 0.5).tolist()).eval()
    with torch.no_grad():
        for name, p in vae.named_parameters():
            if name.endswith("gamma"):
                p.copy_(torch.rand_like(p) + 0.5)
            elif name.endswith("bias"):
                p.copy_(torch.randn_like(p) * 0.2)
            else:
                p.copy_(torch.randn_like(p) / math.sqrt(p[0].numel()))
    return vae


def vae_round_trip(vae, x):
    with torch.no_grad():
        z = vae.encode(x).latent_dist.mean
        return torch.cat([z.flatten(), vae.decode(z).sample.flatten()])


@pytest.mark.parametrize("arch", [VAE21, VAE22], ids=["wan2.1", "wan2.2"])
def test_wan_vae_matches_and_undo_restores(arch, calls):
    """Encode (chunked, with the causal caches) and decode; the mid block's attention norm takes the
    4-D (frames as images) path."""
    vae = tiny_vae(arch)
    x = torch.rand(1, 3, 5, 16, 16) * 2 - 1
    before = state(vae)
    ref = vae_round_trip(vae, x)
    handle = accelerate(vae)
    calls.clear()
    out = vae_round_trip(vae, x)
    assert {"causal_conv3d", "channel_rms_norm_silu"} <= set(calls)
    assert rel_err(out, ref) <= FP32_REL
    handle.undo()
    assert_same_state(state(vae), before)
    assert torch.equal(vae_round_trip(vae, x), ref)


def test_wan_vae_kernel_backends(kernels):
    vae = tiny_vae(dict(VAE21, dim_mult=[1, 2], temperal_downsample=[True]))
    x = torch.rand(1, 3, 3, 8, 8) * 2 - 1
    ref = vae_round_trip(vae, x)
    with accelerate(vae, backend={"causal_conv3d": "triton", "channel_rms_norm_silu": "cuda"}):
        out = vae_round_trip(vae, x)
    assert {("causal_conv3d", "triton"), ("channel_rms_norm_silu", "cuda")} <= kernels
    assert rel_err(out, ref) <= FP32_REL


# ----------------------------------------------------------------------------------------------
# HunyuanVideo, LTX-Video (dispatcher backend), CogVideoX (processors)


def tiny_hunyuan():
    return randomized(HunyuanVideoTransformer3DModel(
        in_channels=4, out_channels=4, num_attention_heads=2, attention_head_dim=12, num_layers=1,
        num_single_layers=1, num_refiner_layers=1, patch_size=2, patch_size_t=1, text_embed_dim=16,
        pooled_projection_dim=8, rope_axes_dim=(4, 4, 4)))


def hunyuan_inputs(mask=True):
    text_mask = torch.ones(B, 7, dtype=torch.long)
    if mask:
        text_mask[1, 3:] = 0                 # a short prompt: its padding keys are dropped from the pack
    return dict(hidden_states=torch.randn(B, 4, 3, 6, 8), timestep=torch.rand(B) * 1000,
                encoder_hidden_states=torch.randn(B, 7, 16), encoder_attention_mask=text_mask,
                pooled_projections=torch.randn(B, 8), guidance=torch.full((B,), 3000.0))


def tiny_ltx():
    return randomized(LTXVideoTransformer3DModel(
        in_channels=8, out_channels=8, patch_size=1, patch_size_t=1, num_attention_heads=2, attention_head_dim=8,
        cross_attention_dim=16, num_layers=2, caption_channels=12))


def ltx_inputs():
    text_mask = torch.ones(B, 5, dtype=torch.long)
    text_mask[0, 2:] = 0                     # additive -10000 bias on the padding: dropped keys
    return dict(hidden_states=torch.randn(B, 3 * 4 * 6, 8), encoder_hidden_states=torch.randn(B, 5, 12),
                timestep=torch.randint(0, 1000, (B,)), encoder_attention_mask=text_mask, num_frames=3, height=4,
                width=6)


def tiny_cogvideox():
    return randomized(CogVideoXTransformer3DModel(
        num_attention_heads=2, attention_head_dim=16, in_channels=4, out_channels=4, time_embed_dim=8,
        text_embed_dim=12, num_layers=2, sample_width=8, sample_height=8, sample_frames=5, patch_size=2,
        max_text_seq_length=6, use_rotary_positional_embeddings=True))


def cogvideox_inputs():
    cos, sin = get_3d_rotary_pos_embed(16, ((0, 0), (3, 4)), (3, 4), 2, device="cpu")   # head dim 16: t/h/w 4/6/6
    return dict(hidden_states=torch.randn(B, 2, 4, 6, 8), encoder_hidden_states=torch.randn(B, 6, 12),
                timestep=torch.randint(0, 1000, (B,)), image_rotary_emb=(cos, sin))


OTHERS = {"hunyuan": (tiny_hunyuan, hunyuan_inputs), "ltx": (tiny_ltx, ltx_inputs),
          "cogvideox": (tiny_cogvideox, cogvideox_inputs)}


@pytest.mark.parametrize("name", list(OTHERS))
@pytest.mark.parametrize("backend", [None, "triton"])
def test_other_transformers_match_and_undo_restores(name, backend, calls, kernels):
    build, inputs = OTHERS[name]
    m, kw = build(), inputs()
    check_accelerated(m, kw, calls, {"spacetime_attention"}, backend=backend)
    if backend == "triton":
        assert ("spacetime_attention", "triton") in kernels


def test_padding_masks_matter():
    """The masked inputs above are a real test: ignoring the padding changes the output."""
    for m, kw in ((tiny_hunyuan(), hunyuan_inputs()), (tiny_ltx(), ltx_inputs())):
        unmasked = {**kw, "encoder_attention_mask": torch.ones_like(kw["encoder_attention_mask"])}
        assert rel_err(run(m, **unmasked), run(m, **kw)) > 1e-3


def test_dispatcher_backend_by_name():
    """The registered backend is an ordinary dispatcher backend: diffusers' own context manager uses it."""
    m, kw = tiny_ltx(), ltx_inputs()
    ref = run(m, **kw)
    assert integ.register_attention_backends() == ["sora_fast", "sora_fast_torch", "sora_fast_triton",
                                                   "sora_fast_cuda"]
    with attention_dispatch.attention_backend(integ.dispatch_backend_name("torch")):
        out = run(m, **kw)
    assert rel_err(out, ref) <= FP32_REL
    assert attention_dispatch.AttentionBackendName("sora_fast").value == "sora_fast"


def test_dispatcher_backend_rejects_what_it_cannot_do():
    fn = integ._dispatch_fn(None)
    q = torch.randn(1, 3, 2, 4)
    with pytest.raises(ValueError, match="no dropout, got dropout_p=0.1"):
        fn(q, q, q, dropout_p=0.1)
    with pytest.raises(ValueError, match="not causal"):
        fn(q, q, q, is_causal=True)
    with pytest.raises(ValueError, match="context parallelism"):
        fn(q, q, q, _parallel_config=object())
    with pytest.raises(ValueError, match=r"differs between heads or queries"):
        fn(q, q, q, attn_mask=torch.tril(torch.ones(3, 3, dtype=torch.bool)))
    with pytest.raises(ValueError, match=r"key-padding mask .* got other additive values, e.g. 0.5"):
        fn(q, q, q, attn_mask=torch.full((1, 1, 1, 3), 0.5))
    with pytest.raises(ValueError, match=r"must broadcast to \(B, H, Sq, Sk\) = \(1, 2, 3, 3\), got \(4,\)"):
        fn(q, q, q, attn_mask=torch.ones(4, dtype=torch.bool))


def test_key_padding_mask_forms():
    """Bool (B, 1, 1, Sk), additive (B, H, 1, Sk) with -inf, an all-masked additive row (= no mask):
    each equals SDPA on the same mask."""
    q, k, v = torch.randn(2, 5, 2, 4), torch.randn(2, 6, 2, 4), torch.randn(2, 6, 2, 4)
    keep = torch.tensor([[1, 1, 0, 1, 0, 0], [1, 1, 1, 1, 1, 1]], dtype=torch.bool)
    additive = torch.zeros(2, 2, 1, 6).masked_fill(~keep[:, None, None], float("-inf"))
    all_masked = torch.full((2, 1, 1, 6), -10000.0)
    all_masked[0, ..., :2] = 0
    all_masked[1] = -10000.0
    same_softmax = all_masked.clone()
    same_softmax[1] = 0      # a constant bias does not change a softmax, but in fp32 it rounds the scores
    for mask, ref_mask in ((keep[:, None, None], None), (additive, None), (all_masked, same_softmax)):
        ref = F_sdpa(q, k, v, mask if ref_mask is None else ref_mask)
        assert rel_err(integ.packed_attention(q, k, v, mask), ref) <= FP32_REL


def F_sdpa(q, k, v, mask):
    out = torch.nn.functional.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2),
                                                           attn_mask=mask)
    return out.transpose(1, 2)


# ----------------------------------------------------------------------------------------------
# pipeline


def tiny_wan_pipeline(two_experts=True):
    """A WanPipeline from components, nothing downloaded: a word-level tokenizer built with `tokenizers`,
    a 1-layer random UMT5 encoder, the tiny VAE, and two tiny transformers (Wan 2.2 A14B's high/low
    noise experts, switched at boundary_ratio)."""
    words = ["<pad>", "</s>", "<unk>"] + "a red ball rolls left blue cube falls down".split()
    tok = Tokenizer(models.WordLevel({w: i for i, w in enumerate(words)}, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<pad>", eos_token="</s>", unk_token="<unk>")
    text_encoder = randomized(UMT5EncoderModel(UMT5Config(vocab_size=len(words), d_model=24, d_kv=8, d_ff=32,
                                                          num_layers=1, num_heads=2,
                                                          relative_attention_num_buckets=8)))
    return WanPipeline(tokenizer=tokenizer, text_encoder=text_encoder, vae=tiny_vae(VAE21),
                       scheduler=FlowMatchEulerDiscreteScheduler(shift=3.0), transformer=tiny_wan(out_channels=4),
                       transformer_2=tiny_wan(out_channels=4) if two_experts else None,
                       boundary_ratio=0.5 if two_experts else None)


def test_wan_pipeline(calls):
    pipe = tiny_wan_pipeline()

    def generate():
        return pipe(prompt=["a red ball rolls left", "blue cube falls"], negative_prompt="down", height=16,
                    width=32, num_frames=5, num_inference_steps=3, guidance_scale=4.0, max_sequence_length=8,
                    generator=torch.Generator().manual_seed(0), output_type="pt").frames

    ref = generate()
    with accelerate(pipe) as handle:
        assert [p.split(":")[0] for p in handle.patched] == ["vae", "vae", "transformer", "transformer",
                                                             "transformer_2", "transformer_2"]
        assert handle.skipped == ["text_encoder (UMT5EncoderModel)"]
        calls.clear()
        out = generate()
    assert {"causal_conv3d", "channel_rms_norm_silu", "spacetime_attention+rope", "gated_residual_adaln"} <= set(calls)
    assert out.shape == ref.shape == (2, 5, 3, 16, 32)
    assert rel_err(out, ref) <= FP32_REL
    assert torch.equal(generate(), ref)


def test_pipeline_vae_flag():
    pipe = tiny_wan_pipeline(two_experts=False)
    with accelerate(pipe, vae=False) as handle:
        assert [p.split(":")[0] for p in handle.patched] == ["transformer", "transformer"]
        assert "forward" not in vars(pipe.vae.encoder.conv_in)


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


def test_wan_packed_forward_shares_weights_and_takes_a_text_tensor():
    m = tiny_wan(layers=1)
    lat, text = [torch.randn(4, 2, 4, 4)], torch.randn(1, 3, 24)
    with torch.no_grad():
        before = wan_packed_forward(m, lat, 500.0, text)[0]
        m.blocks[0].ffn.net[2].weight.mul_(2)          # in place: the packed model sees it
        after = wan_packed_forward(m, lat, 500.0, text)[0]
        ref = run(m, hidden_states=lat[0][None], timestep=torch.tensor([500.0]), encoder_hidden_states=text)[0]
    assert rel_err(after, ref) <= FP32_REL and rel_err(before, ref) > 1e-3
    dit = integ._shared_video_dit(m, None)
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


# ----------------------------------------------------------------------------------------------
# bad input: clear errors, nothing changed


def test_unsupported_objects_list_what_is_supported():
    supported = r"WanTransformer3DModel .*AutoencoderKLWan .*HunyuanVideoTransformer3DModel .*" \
                r"LTXVideoTransformer3DModel .*CogVideoXTransformer3DModel"
    with pytest.raises(TypeError, match=rf"supported diffusers models \({supported}.*got AutoencoderKL$"):
        accelerate(AutoencoderKL(block_out_channels=(8,), norm_num_groups=4, latent_channels=2))
    with pytest.raises(TypeError, match="got int"):
        accelerate(3)

    class FakePipe:
        components = {"text_encoder": torch.nn.Linear(2, 2), "scheduler": object()}

    with pytest.raises(TypeError, match=rf"FakePipe\) holds no supported model; supported: {supported}.*; "
                                        r"it holds text_encoder \(Linear\)"):
        accelerate(FakePipe())


def test_bad_arguments():
    m = tiny_wan(layers=1)
    before = state(m)
    with pytest.raises(TypeError, match="attention must be a bool, got int"):
        accelerate(m, attention=1)
    with pytest.raises(ValueError, match=r"backend must be None, one of .* got 'gpu'"):
        accelerate(m, backend="gpu")
    with pytest.raises(ValueError, match=r"backend mapping must have keys in .* got \{'attn': 'triton'\}"):
        accelerate(m, backend={"attn": "triton"})
    with pytest.raises(ValueError, match="nothing to accelerate with attention=False, norms=False"):
        accelerate(m, attention=False, norms=False)
    with pytest.raises(ValueError, match="nothing to accelerate .* vae=False in AutoencoderKLWan"):
        accelerate(tiny_vae(VAE21), vae=False)
    assert_same_state(state(m), before)


def test_already_accelerated():
    pipe = tiny_wan_pipeline(two_experts=False)
    handle = accelerate(pipe)
    after = state(pipe.transformer)
    with pytest.raises(ValueError, match=r"^WanTransformer3DModel is already accelerated by sora_fast "
                                         r"\(AccelerationHandle\(active; .*call that handle's undo\(\) first"):
        accelerate(pipe.transformer)
    with pytest.raises(ValueError, match=r"^vae \(AutoencoderKLWan\) is already accelerated"):
        accelerate(pipe)
    assert_same_state(state(pipe.transformer), after)
    handle.undo()
    handle.undo()                                  # a second undo does nothing
    accelerate(pipe.transformer).undo()           # after undo it can be accelerated again


def test_diffusers_without_the_dispatcher_hooks(monkeypatch):
    m = tiny_ltx()
    before = state(m)
    monkeypatch.delattr(attention_dispatch, "_AttentionBackendRegistry")
    with pytest.raises(DiffusersHooksError, match=r"the installed diffusers .* has no diffusers\.models\."
                                                  r"attention_dispatch\._AttentionBackendRegistry, which the "
                                                  r"sora_fast attention backend"):
        accelerate(m)
    assert_same_state(state(m), before)


def test_diffusers_without_wan_hooks(monkeypatch):
    from diffusers.models.transformers import transformer_wan

    m = tiny_wan(layers=1)
    before = state(m)
    monkeypatch.delattr(transformer_wan, "_get_qkv_projections")
    with pytest.raises(DiffusersHooksError, match=r"has no diffusers\.models\.transformers\.transformer_wan\."
                                                  r"_get_qkv_projections, which the Wan transformer acceleration"):
        accelerate(m)
    assert_same_state(state(m), before)


def test_diffusers_without_vae_hooks():
    """A WanRMS_norm without an attribute the patch reads (as a diffusers that renamed it would build)."""
    vae = tiny_vae(VAE21)
    before = state(vae)
    del vae.decoder.norm_out.channel_first
    with pytest.raises(DiffusersHooksError, match=r"decoder\.norm_out \(WanRMS_norm\) has no channel_first in the "
                                                  r"installed diffusers .*, which the Wan VAE acceleration needs"):
        accelerate(vae)
    vae.decoder.norm_out.channel_first = True
    assert_same_state(state(vae), before)


def test_unknown_processor_and_hooked_forward_are_refused():
    from diffusers.models.attention_processor import AttnProcessor2_0

    m = tiny_wan(layers=2)
    m.blocks[1].attn2.processor = AttnProcessor2_0()
    before = state(m)
    with pytest.raises(ValueError, match=r"WanTransformer3DModel\.blocks\.1\.attn2 has processor AttnProcessor2_0; "
                                         r"sora_fast replaces diffusers' WanAttnProcessor only"):
        accelerate(m)
    assert_same_state(state(m), before)
    m = tiny_wan(layers=2)
    m.blocks[1].forward = m.blocks[1].forward      # what a diffusers hook does
    before = state(m)
    with pytest.raises(ValueError, match=r"blocks\.1 \(WanTransformerBlock\) already has its forward replaced"):
        accelerate(m)
    assert_same_state(state(m), before)


def test_failure_while_patching_rolls_back(monkeypatch):
    """A patch that fails half-way (here the 5th VAE norm) leaves the pipeline exactly as it was."""
    pipe = tiny_wan_pipeline(two_experts=False)
    before = {k: state(v) for k, v in pipe.components.items() if isinstance(v, torch.nn.Module)}
    count = [0]
    original = integ._norm_forward

    def failing(*a):
        count[0] += 1
        if count[0] == 5:
            raise RuntimeError("boom")
        return original(*a)

    monkeypatch.setattr(integ, "_norm_forward", failing)
    with pytest.raises(RuntimeError, match="boom"):
        accelerate(pipe)
    for k, s in before.items():
        assert_same_state(state(pipe.components[k]), s)
    assert not hasattr(pipe.transformer, integ.HANDLE_ATTR)


def test_undo_refuses_when_a_patch_was_replaced_since():
    m = tiny_wan(layers=1)
    handle = accelerate(m)
    blk = m.blocks[0]
    ours = blk.forward
    blk.forward = lambda *a: ours(*a)              # e.g. a hook added after accelerate
    with pytest.raises(RuntimeError, match=r"cannot undo .* WanTransformerBlock\.forward was replaced after "
                                           r"accelerate"):
        handle.undo()
    assert handle.active and m.blocks[0].attn1.processor.__class__ is integ.WanAttnProcessor
    blk.forward = ours
    handle.undo()
    assert "forward" not in vars(blk)


def test_lazy_public_api():
    assert sora_fast.accelerate is accelerate
    assert sora_fast.integrations.wan_packed_forward is wan_packed_forward
    code = ("import sys, sora_fast, sora_fast.integrations, sora_fast.integrations.diffusers; "
            "print('diffusers' in sys.modules)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "False"            # importing never imports diffusers; using it does
