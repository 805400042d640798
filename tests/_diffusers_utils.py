"""Shared by the diffusers integration tests: tiny random-weight diffusers models (nothing downloaded;
every weight randomized so zero-init gates or tables cannot hide a bug), their inputs, the state
comparison that proves undo() restores everything, and the fixtures recording which ops and kernels ran."""
import json
import math
import shutil

import pytest
import torch
from diffusers import (
    AutoencoderKLWan,
    CogVideoXTransformer3DModel,
    FlowMatchEulerDiscreteScheduler,
    HunyuanVideoTransformer3DModel,
    LTXVideoTransformer3DModel,
    WanPipeline,
    WanTransformer3DModel,
)
from diffusers.models.embeddings import get_3d_rotary_pos_embed
from test_dit import randomize, rel_err
from tokenizers import Tokenizer, models, pre_tokenizers
from transformers import PreTrainedTokenizerFast, UMT5Config, UMT5EncoderModel

from sora_fast import ops
from sora_fast.cuda import launchers as _cuda
from sora_fast.integrations.diffusers import accelerate
from sora_fast.ops import _dispatch

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


def input_and_param_grads(model, x, kw):
    """Gradients of a fixed weighting of ``model(hidden_states=x, **kw)`` w.r.t. ``x`` and every parameter."""
    model.zero_grad()
    x.grad = None
    out = model(hidden_states=x, **kw, return_dict=False)[0]
    (out * torch.linspace(-1, 1, out.numel()).view_as(out)).sum().backward()
    return [x.grad.clone()] + [p.grad.clone() for p in model.parameters()]


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


SMALL_VAE = dict(VAE21, dim_mult=[1, 2], temperal_downsample=[True])


def _vae_case():
    """The small Wan VAE and its encode + decode."""
    vae = tiny_vae(SMALL_VAE)
    x = torch.rand(1, 3, 3, 8, 8) * 2 - 1
    return vae, (lambda m: vae_round_trip(m, x))


def _case(build, inputs):
    def make():
        m, kw = build(), inputs()
        return m, (lambda model: run(model, **kw))
    return make


# every accelerated family -> (a maker of (model, its forward on fixed inputs), parameters that change the
# output when edited: in the patched modules where the family has some)
FAMILIES = {
    "wan": (_case(tiny_wan, lambda: wan_inputs(thw=(2, 4, 6))),
            ["blocks.0.scale_shift_table", "blocks.1.attn1.to_q.weight", "blocks.1.ffn.net.0.proj.weight"]),
    "wan_vae": (_vae_case, ["encoder.conv_in.weight", "decoder.up_blocks.0.resnets.0.norm1.gamma",
                            "decoder.conv_out.bias"]),
    "hunyuan": (_case(tiny_hunyuan, hunyuan_inputs), ["transformer_blocks.0.attn.to_k.weight"]),
    "ltx": (_case(tiny_ltx, ltx_inputs), ["transformer_blocks.1.attn1.to_v.weight"]),
    "cogvideox": (_case(tiny_cogvideox, cogvideox_inputs), ["transformer_blocks.0.attn1.to_v.weight"]),
}


def saved_tiny_wan_pipeline(tmp_path_factory):
    """A tiny random single-expert ``WanPipeline`` and the directory ``save_pretrained`` wrote it to."""
    pipe = tiny_wan_pipeline(two_experts=False)
    d = tmp_path_factory.mktemp("wan") / "pipe"
    pipe.save_pretrained(d)
    return pipe, d


def wan_unipc(**options):
    """Wan's default scheduler: UniPC on flow sigmas (flow prediction), ``flow_shift`` 3 unless given."""
    from diffusers import UniPCMultistepScheduler

    return UniPCMultistepScheduler(**{"prediction_type": "flow_prediction", "use_flow_sigmas": True, "flow_shift": 3.0,
                                      **options})


def wan_call(pipe, noise, size, *, fp64=False, **call):
    """``WanPipeline.__call__`` from ``noise`` (our seed's, so both start from the same latents) -> ``(3, T, H, W)``
    float64 in [-1, 1], as ``VideoPipeline.generate`` returns it. ``fp64``: the whole run in float64 -- the models,
    the latents (diffusers holds them in float32 whatever the models' dtype) and the scheduler's levels (float32 in
    diffusers, and UniPC computes its coefficients from them): a reference without float32 rounding."""
    t, h, w = size
    sch = pipe.scheduler
    if fp64:
        set_timesteps = sch.set_timesteps

        def set_timesteps_fp64(*a, **kw):
            set_timesteps(*a, **kw)
            sch.sigmas = sch.sigmas.double()

        sch.set_timesteps = set_timesteps_fp64
        pipe.prepare_latents = lambda *a, **kw: noise[None].double()
        pipe.to(torch.float64)
    try:
        out = pipe(num_frames=t, height=h, width=w, latents=noise[None].to(pipe.transformer.dtype), output_type="pt",
                   **call)
    finally:
        if fp64:
            del sch.set_timesteps, pipe.prepare_latents
            pipe.to(torch.float32)
    return out.frames[0].permute(1, 0, 2, 3).double() * 2 - 1


def assert_wan_parity(video, pipe, noise, size, **call) -> tuple[float, float]:
    """STYLE's fp32 rule with diffusers as the reference: the error of our fp32 ``video`` against diffusers run in
    fp64 may be at most twice diffusers' own fp32 error against it, plus an atol of a few fp32 ulps of the output
    scale (both fp32 runs can be exact where the fp64 one rounds to the same frame). Returns both errors."""
    d32 = wan_call(pipe, noise, size, **call)
    d64 = wan_call(pipe, noise, size, fp64=True, **call)
    assert video.shape == d64.shape == (3, *size)
    ours_err, ref_err = rel_err(video, d64), rel_err(d32, d64)
    assert ours_err <= 2 * ref_err + 4 * 2**-24, (ours_err, ref_err)
    assert rel_err(video, d32) <= 2 * ref_err + 4 * 2**-24 + ref_err
    return ours_err, ref_err


def broken_copy(src, tmp_path, edit):
    """A copy of the pipeline directory ``src`` under ``tmp_path``, changed by ``edit(copy)``."""
    d = tmp_path / "broken"
    shutil.copytree(src, d)
    edit(d)
    return d


def set_json(path, **changes):
    """Update the JSON object in ``path`` with ``changes``."""
    path.write_text(json.dumps({**json.loads(path.read_text()), **changes}))
