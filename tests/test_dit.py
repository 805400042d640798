"""VideoDiT (Wan2.1 on packed patches) against diffusers' WanTransformer3DModel with the same weights, built
from tiny random configs on CPU (nothing downloaded, every weight randomized: zero-initialized gates,
tables, norms or biases would hide bugs). Packs of mixed sizes against each video alone, gradients with
and without activation checkpointing, bf16 autocast, kernel backends, and every input error."""
import dataclasses
import math

import pytest
import torch
from _utils import assert_close
from diffusers import WanTransformer3DModel

from sora_fast.cuda import launchers as _cuda
from sora_fast.models._convert import StateDictMismatchError, load_converted
from sora_fast.models.dit import PRESETS, DiTConfig, VideoDiT, convert_wan_transformer_state_dict
from sora_fast.ops import BackendUnavailableError, _dispatch, registered_backends
from sora_fast.ops._dispatch import get_kernel
from sora_fast.packing import pack_sequences, pack_videos

FP32_REL = 1e-5  # max|ours - diffusers| / max|diffusers| in fp32
BF16_U = 2.0**-8  # bf16 unit roundoff (8 significant bits)


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a.double() - b.double()).abs().max() / b.double().abs().max()).item()


@torch.no_grad()
def randomize(model: torch.nn.Module) -> torch.nn.Module:
    """Every parameter random and O(1)-scaled: norm weights around 1, biases and tables nonzero."""
    for name, p in model.named_parameters():
        if "scale_shift_table" in name:
            p.copy_(torch.randn_like(p) * 0.5)
        elif "norm" in name and name.endswith("weight"):
            p.copy_(1 + 0.3 * torch.randn_like(p))
        elif p.dim() >= 2:
            p.copy_(torch.randn_like(p) / math.sqrt(p[0].numel()))
        else:
            p.copy_(torch.randn_like(p) * 0.3)
    return model


def wan(patch=(1, 2, 2), heads=3, head_dim=20, in_ch=4, out_ch=3, text_dim=24, layers=2, cross_attn_norm=True):
    """A tiny random diffusers Wan transformer: head dim 20 (RoPE split 8/6/6), out != in channels so a
    wrong proj_out permutation shows."""
    m = WanTransformer3DModel(patch_size=patch, num_attention_heads=heads, attention_head_dim=head_dim,
                              in_channels=in_ch, out_channels=out_ch, text_dim=text_dim, freq_dim=32,
                              ffn_dim=56, num_layers=layers, cross_attn_norm=cross_attn_norm, eps=1e-6)
    return randomize(m).eval()


def run_wan(m, latents, timesteps, text):
    with torch.no_grad():
        return m(torch.stack(latents), timesteps, torch.stack(text), return_dict=False)[0]


def tiny_dit(**overrides) -> VideoDiT:
    return randomize(VideoDiT.from_name("tiny", **overrides))


# ----------------------------------------------------------------------------------------------
# parity with diffusers


@pytest.mark.parametrize("patch,thw", [((1, 2, 2), (1, 6, 10)),     # image, grid (1, 3, 5)
                                       ((1, 2, 2), (3, 10, 6)),     # grid (3, 5, 3)
                                       ((2, 1, 2), (4, 3, 2))])     # pt = 2: proj_out permutation over time
@pytest.mark.parametrize("cross_attn_norm", [True, False])
def test_parity_one_video(patch, thw, cross_attn_norm):
    m = wan(patch=patch, cross_attn_norm=cross_attn_norm)
    dit = VideoDiT.from_diffusers(m)
    assert dit.config.patch == patch and dit.config.cross_attn_norm == cross_attn_norm
    lat, txt, t = [torch.randn(4, *thw)], [torch.randn(7, 24)], torch.rand(1) * 1000
    ref = run_wan(m, lat, t, txt)
    with torch.no_grad():
        out = dit.forward_videos(lat, t, txt)
    assert out[0].shape == ref[0].shape == (3, *thw)
    assert rel_err(out[0], ref[0]) <= FP32_REL


def test_parity_batch_per_video_timesteps_and_text():
    m = wan()
    dit = VideoDiT.from_diffusers(m)
    lat = [torch.randn(4, 2, 6, 14) for _ in range(3)]
    txt = [torch.randn(5, 24) for _ in range(3)]
    t = torch.tensor([0.0, 417.3, 999.0])
    ref = run_wan(m, lat, t, txt)
    with torch.no_grad():
        out = dit.forward_videos(lat, t, txt)
        swapped = dit.forward_videos(lat, t.flip(0), txt)
    for i in range(3):
        assert rel_err(out[i], ref[i]) <= FP32_REL, f"video {i}"
    # the timesteps really are per video: changing video 0's t changes video 0's output
    assert rel_err(swapped[0], ref[0]) > 1e-3


def test_pack_of_mixed_sizes_equals_each_video_alone_and_diffusers():
    m = wan()
    dit = VideoDiT.from_diffusers(m)
    shapes = [(1, 2, 2), (3, 6, 10), (1, 10, 6), (2, 4, 4)]  # a 1-token image, odd grids, T > 1
    lens = [1, 9, 4, 6]
    lat = [torch.randn(4, *s) for s in shapes]
    txt = [torch.randn(n, 24) for n in lens]
    t = torch.rand(4) * 1000
    with torch.no_grad():
        packed = dit.forward_videos(lat, t, txt)
        for i in range(4):
            alone = dit.forward_videos([lat[i]], t[i:i + 1], [txt[i]])[0]
            assert_close(packed[i], alone, torch.float32, msg=f"video {i} packed vs alone")
            ref = run_wan(m, [lat[i]], t[i:i + 1], [txt[i]])[0]
            assert rel_err(packed[i], ref) <= FP32_REL, f"video {i} vs diffusers"


def test_forward_returns_tokens_that_unpack_to_videos():
    dit = tiny_dit()
    lat = [torch.randn(4, 1, 4, 6), torch.randn(4, 2, 2, 2)]
    x, text = pack_videos(lat), pack_sequences([torch.randn(3, 32), torch.randn(0, 32)])  # empty caption too
    out = dit(x, torch.tensor([5.0, 50.0]), text)
    assert out.shape == (x.num_tokens, 4 * 4)
    vids = x.unpack(out)
    assert [v.shape for v in vids] == [v.shape for v in lat]
    assert all(torch.isfinite(v).all() for v in vids)


def test_window():
    """A window covering every grid is global attention; a small one changes the output, still per video."""
    dit = tiny_dit()
    lat = [torch.randn(4, 3, 6, 8), torch.randn(4, 1, 2, 2)]
    txt, t = [torch.randn(4, 32), torch.randn(2, 32)], torch.tensor([100.0, 900.0])
    with torch.no_grad():
        glob = dit.forward_videos(lat, t, txt)
        dit.config.window = (3, 3, 4)
        full = dit.forward_videos(lat, t, txt)
        dit.config.window = (0, 1, 1)
        local = dit.forward_videos(lat, t, txt)
        alone = dit.forward_videos(lat[:1], t[:1], txt[:1])[0]
    assert_close(full[0], glob[0], torch.float32)
    assert rel_err(local[0], glob[0]) > 1e-3
    assert_close(local[0], alone, torch.float32)


# ----------------------------------------------------------------------------------------------
# training paths


def test_checkpointing_gives_the_same_gradients():
    dit = tiny_dit()
    lat = [torch.randn(4, 2, 4, 6), torch.randn(4, 1, 2, 2)]
    x = pack_videos(lat)
    x = x.with_tokens(x.tokens.clone().requires_grad_())
    text = pack_sequences([torch.randn(5, 32), torch.randn(2, 32)])
    t = torch.tensor([3.0, 700.0])
    w = torch.randn(x.num_tokens, 16)

    def grads(checkpointing):
        dit.checkpointing = checkpointing
        dit.zero_grad()
        x.tokens.grad = None
        (dit(x, t, text) * w).sum().backward()
        return {"x": x.tokens.grad.clone(), **{n: p.grad.clone() for n, p in dit.named_parameters()}}

    plain, ckpt = grads(False), grads(True)
    assert plain.keys() == ckpt.keys()
    for name in plain:
        assert plain[name].abs().max() > 0, f"no gradient reaches {name}"
        assert_close(ckpt[name], plain[name], torch.float32, msg=name)


def test_fresh_model_is_adaln_zero():
    """From scratch every block starts as the identity (zero gates) and the head outputs zeros, yet the
    head gets gradients."""
    dit = VideoDiT.from_name("tiny")
    x = pack_videos([torch.randn(4, 1, 4, 4)])
    out = dit(x, torch.tensor([10.0]), pack_sequences([torch.randn(3, 32)]))
    assert out.abs().max() == 0
    (out - 1).square().sum().backward()
    assert dit.proj_out.weight.grad.abs().max() > 0


@pytest.mark.filterwarnings("ignore:Mismatch dtype between input and weight")  # diffusers' RMSNorm under autocast
def test_bf16_autocast_within_bf16_error():
    """Under autocast every linear rounds its inputs and output to bf16 and the residual stream is
    stored in bf16: each rounding is a relative error <= u = 2^-8. Along the ~10 roundings on a path of
    this 2-layer model the errors partly cancel, so the output's error is a few u; we allow 8u of
    max|fp32| (an O(1) bug -- a gate or modulation in the wrong dtype -- is far above it), and, as
    flash-attention does, at most 2x diffusers' own bf16-autocast error of the same weights plus u."""
    m = wan()
    dit = VideoDiT.from_diffusers(m)
    lat = [torch.randn(4, 2, 6, 10) for _ in range(2)]
    txt = [torch.randn(6, 24) for _ in range(2)]
    t = torch.tensor([250.0, 800.0])
    with torch.no_grad():
        ref = dit.forward_videos(lat, t, txt)
        ref_wan = run_wan(m, lat, t, txt)
        with torch.autocast("cpu", torch.bfloat16):
            low = dit.forward_videos(lat, t, txt)
            low_wan = run_wan(m, lat, t, txt)
    assert low[0].dtype == torch.bfloat16
    for i in range(2):
        err = rel_err(low[i], ref[i])
        assert err <= 8 * BF16_U, f"video {i}: bf16 relative error {err:.2e} > 8u"
        assert err <= 2 * rel_err(low_wan[i], ref_wan[i]) + BF16_U, f"video {i}: {err:.2e} vs diffusers' bf16"


def test_bf16_weights_keep_diffusers_dtypes():
    """A bf16 diffusers model whose tables and norms stay fp32 (as from_pretrained keeps them) converts
    tensor by tensor in the same dtypes, and runs in bf16 close to diffusers' own bf16 output."""
    m = wan()
    for name, p in m.named_parameters():  # what from_pretrained(torch_dtype=torch.bfloat16) does
        if not set(name.split(".")) & set(m._keep_in_fp32_modules):
            p.data = p.data.bfloat16()
    dit = VideoDiT.from_diffusers(m)
    own = dict(dit.named_parameters())
    conv = convert_wan_transformer_state_dict(m.state_dict(), dit.config)
    assert {k: v.dtype for k, v in conv.items()} == {k: v.dtype for k, v in own.items()}
    assert own["blocks.1.norm2.weight"].dtype == torch.float32 and own["proj_out.weight"].dtype == torch.bfloat16
    lat, txt = [torch.randn(4, 2, 4, 6).bfloat16()], [torch.randn(5, 24).bfloat16()]
    t = torch.tensor([321.0])
    with torch.no_grad():
        out = dit.forward_videos(lat, t, txt)[0]
    assert out.dtype == torch.bfloat16
    assert rel_err(out, run_wan(m, lat, t, txt)[0]) <= 8 * BF16_U


# ----------------------------------------------------------------------------------------------
# kernel backends (Triton interpreter and the CUDA host emulation on CPU)

MODEL_OPS = {"attention": ["spacetime_attention"], "adaln": ["adaln_modulate", "gated_residual_adaln"]}


def _backend_inputs():
    dit = tiny_dit(num_layers=1)
    lat = [torch.randn(4, 1, 2, 6), torch.randn(4, 2, 4, 2)]
    return dit, pack_videos(lat), torch.tensor([3.0, 500.0]), pack_sequences([torch.randn(3, 32),
                                                                              torch.randn(5, 32)])


@pytest.mark.parametrize("backend", ["triton", "cuda", {"attention": "triton", "adaln": "cuda"}],
                         ids=["triton", "cuda", "triton-attention+cuda-adaln"])
def test_kernel_backends_match_torch(backend, monkeypatch):
    """A backend name goes to every op; an op without that kernel raises BackendUnavailableError naming
    it (it never falls back). Where the kernels exist they really run (recorded at dispatch, outputs
    NaN-poisoned before the CUDA launches) and the model agrees with the torch backend."""
    ran = set()

    def recording_get_kernel(op, b, device):
        ran.add((op, b))
        return get_kernel(op, b, device)

    monkeypatch.setattr(_dispatch, "get_kernel", recording_get_kernel)
    monkeypatch.setattr(_cuda, "POISON_OUTPUTS", True)
    dit, x, t, text = _backend_inputs()
    with torch.no_grad():
        dit.backend = "torch"
        ref = dit(x, t, text)
        dit.backend = backend
        chosen = dict.fromkeys(MODEL_OPS, backend) if isinstance(backend, str) else backend
        missing = [op for fam, b in chosen.items() for op in MODEL_OPS[fam] if b not in registered_backends(op)]
        if missing:
            with pytest.raises(BackendUnavailableError, match=rf"the {backend} backend of ({'|'.join(missing)}) "
                                                              r"cannot run: no .* kernel is registered"):
                dit(x, t, text)
            return
        ran.clear()
        out = dit(x, t, text)
    assert ran == {(op, chosen[fam]) for fam, ops in MODEL_OPS.items() for op in ops}
    assert_close(out, ref, torch.float32, msg=f"backend={backend}")


def test_mixed_backends_cover_every_op_today():
    """Today attention has a triton kernel and the adaLN family cuda ones: the mapping form uses both."""
    assert "triton" in registered_backends("spacetime_attention")
    assert all("cuda" in registered_backends(op) for op in MODEL_OPS["adaln"])


def test_bad_backend_argument():
    dit, x, t, text = _backend_inputs()
    dit.backend = {"attn": "triton"}
    with pytest.raises(ValueError, match=r"backend must be .* keys in \('attention', 'adaln'\), got \{'attn'"):
        dit(x, t, text)
    dit.backend = "gpu"
    with pytest.raises(ValueError, match=r"backend must be one of .* got 'gpu'"):
        dit(x, t, text)


# ----------------------------------------------------------------------------------------------
# configs, presets, conversion


def test_presets_match_diffusers_wan_at_full_size():
    """Built on the meta device (no memory): the converted state dict of diffusers' Wan2.1 1.3B and 14B
    configs has exactly our keys and shapes."""
    sizes = {"wan2.1-1.3b": (12, 128, 8960, 30), "wan2.1-14b": (40, 128, 13824, 40)}
    for name, (heads, head_dim, ffn, layers) in sizes.items():
        with torch.device("meta"):
            m = WanTransformer3DModel(num_attention_heads=heads, attention_head_dim=head_dim, ffn_dim=ffn,
                                      num_layers=layers, text_dim=4096, in_channels=16, out_channels=16)
            ours = VideoDiT.from_name(name)
        cfg = DiTConfig.from_diffusers_config(m.config)
        assert cfg == PRESETS[name], name
        conv = convert_wan_transformer_state_dict(m.state_dict(), cfg)
        own = ours.state_dict()
        assert conv.keys() == own.keys(), name
        assert all(conv[k].shape == own[k].shape for k in own), name
        assert sum(p.numel() for p in ours.parameters()) == sum(p.numel() for p in m.parameters())


def test_from_name_and_constructors():
    assert VideoDiT.from_name("demo", in_channels=4).config.in_channels == 4
    assert VideoDiT.from_config(DiTConfig.from_name("tiny")).config == PRESETS["tiny"]
    with pytest.raises(ValueError, match=r"unknown DiT preset 'wan-2\.1'; valid names: demo, tiny, wan2\.1-1\.3b"):
        DiTConfig.from_name("wan-2.1")
    with pytest.raises(TypeError, match="config must be a DiTConfig, got dict"):
        VideoDiT({"dim": 64})


@pytest.mark.parametrize("overrides,msg", [
    ({"num_heads": 3}, r"dim must be divisible by num_heads, got dim=64, num_heads=3"),
    ({"dim": 60, "num_heads": 12}, r"head dim .* must be even and >= 6 .* got 60 / 12 = 5"),
    ({"num_layers": 0}, r"num_layers must be a positive int, got 0"),
    ({"freq_dim": 33}, r"freq_dim must be even .* got 33"),
    ({"patch": (1, 2)}, r"patch must be 3 positive ints .* got \(1, 2\)"),
    ({"eps": 0.0}, r"eps must be a number in \(0, 1\), got 0\.0"),
    ({"qk_norm": "rms_norm"}, r"qk_norm must be 'rms_norm_across_heads' .* got 'rms_norm'"),
    ({"window": (1, -1, 1)}, r"window must be None or 3 ints >= 0 .* got \(1, -1, 1\)"),
])
def test_config_validation(overrides, msg):
    with pytest.raises(ValueError, match=msg):
        DiTConfig.from_name("tiny", **overrides)


@pytest.mark.parametrize("field,value", [("image_dim", 1280), ("added_kv_proj_dim", 5120),
                                         ("pos_embed_seq_len", 514)])
def test_image_conditioned_diffusers_configs_are_rejected(field, value):
    cfg = dict(wan().config)
    cfg[field] = value
    with pytest.raises(ValueError, match=rf"unsupported diffusers config: {field}={value}"):
        DiTConfig.from_diffusers_config(cfg)


def test_converted_state_dict_with_missing_and_unexpected_keys():
    m = wan()
    cfg = DiTConfig.from_diffusers_config(m.config)
    sd = m.state_dict()
    del sd["blocks.1.attn2.norm_k.weight"]
    sd["blocks.0.attn2.add_k_proj.weight"] = torch.randn(60, 60)
    sd["proj_out.bias"] = torch.randn(5)
    with pytest.raises(StateDictMismatchError,
                       match=r"missing \(1\): blocks\.1\.attn2\.norm_k\.weight; "
                             r"unexpected \(1\): blocks\.0\.attn2\.add_k_proj\.weight; "
                             r"shape mismatch \(1\): proj_out\.bias \(expected \(12,\), got \(5,\)\)"):
        load_converted(VideoDiT(cfg), convert_wan_transformer_state_dict(sd, cfg), "test state dict")


# ----------------------------------------------------------------------------------------------
# bad input


@pytest.fixture
def model_inputs():
    dit = VideoDiT.from_name("tiny")
    x = pack_videos([torch.randn(4, 1, 2, 4), torch.randn(4, 2, 2, 2)])
    text = pack_sequences([torch.randn(3, 32), torch.randn(2, 32)])
    return dit, x, torch.tensor([1.0, 2.0]), text


def test_bad_inputs(model_inputs):
    dit, x, t, text = model_inputs
    c = dit.config
    cases = [
        (TypeError, r"x must be a PackedVideos .* got Tensor", (x.tokens, t, text)),
        (TypeError, r"text must be a PackedSequences .* got list", (x, t, [text.tokens])),
        (ValueError, r"x has 3 latent channels \(12 features per token, patch \(1, 2, 2\)\), the model expects "
                     r"in_channels=4", (pack_videos([torch.randn(3, 1, 2, 2)] * 2), t, text)),
        (ValueError, r"x\.patch must be the model's patch \(1, 2, 2\), got \(1, 1, 1\)",
         (pack_videos([torch.randn(4, 1, 2, 4)] * 2, patch=(1, 1, 1)), t, text)),
        (ValueError, r"text has 3 sequences, x has 2 videos",
         (x, t, pack_sequences([torch.randn(1, 32)] * 3))),
        (ValueError, r"text tokens must have text_dim=32 features, got 24",
         (x, t, pack_sequences([torch.randn(1, 24)] * 2))),
        (ValueError, r"timesteps must have shape \(2,\), one per video of x, or \(3,\), one per latent frame of "
                     r"x, got \(1,\)$", (x, t[:1], text)),
        (ValueError, r"timesteps must have shape \(2,\), one per video of x, or \(3,\), one per latent frame of "
                     r"x, got \(2, 1\)$", (x, t[:, None], text)),
        (ValueError, r"timesteps must have shape \(2,\), one per video of x, or \(3,\), one per latent frame of "
                     r"x, got \(4,\)$", (x, torch.ones(4), text)),
        (TypeError, r"timesteps must be a torch\.Tensor of shape \(2,\), one per video of x, or \(3,\), one per "
                    r"latent frame of x, got float", (x, 1.0, text)),
        (TypeError, r"timesteps must be real numbers \(float or int\), got torch\.bool",
         (x, torch.ones(3, dtype=torch.bool), text)),
        (ValueError, r"timesteps and text must be on x's device cpu, got meta",
         (x, t.to("meta"), text)),
    ]
    assert c.in_channels == 4 and c.text_dim == 32
    for err, msg, args in cases:
        with pytest.raises(err, match=msg):
            dit(*args)


def test_bad_inputs_forward_videos(model_inputs):
    dit = model_inputs[0]
    with pytest.raises(ValueError, match=r"latents\[1\]: H=3 is not divisible by patch ph=2"):
        dit.forward_videos([torch.randn(4, 1, 2, 2), torch.randn(4, 1, 3, 2)], 1.0, [torch.randn(2, 32)] * 2)
    with pytest.raises(ValueError, match=r"x has 5 latent channels .* in_channels=4"):
        dit.forward_videos([torch.randn(5, 1, 2, 2)], 1.0, [torch.randn(2, 32)])
    with pytest.raises(ValueError, match=r"text has 1 sequences, x has 2 videos"):
        dit.forward_videos([torch.randn(4, 1, 2, 2)] * 2, 1.0, [torch.randn(2, 32)])
    with pytest.raises(ValueError, match=r"timesteps must have shape \(1,\), one per video of x, got \(3,\)"):
        dit.forward_videos([torch.randn(4, 1, 2, 2)], [1.0, 2.0, 3.0], [torch.randn(2, 32)])


def test_config_is_a_plain_dataclass():
    cfg = DiTConfig.from_name("tiny", window=[1, 2, 3])
    assert cfg.window == (1, 2, 3) and dataclasses.asdict(cfg)["dim"] == 64


# ----------------------------------------------------------------------------------------------
# pooled text conditioning (an option beyond Wan2.1)


def test_pooled_text_adds_the_mean_text_embedding_to_the_timestep_embedding():
    """pooled_text=True equals the same weights without it when the timestep embedding is given the pooled
    vector by hand (an independent per-prompt mean); packing and an empty prompt change nothing; a fresh
    model starts as the plain one (zero-initialized projection)."""
    torch.manual_seed(0)
    dit = tiny_dit(pooled_text=True)
    plain = VideoDiT(dataclasses.replace(dit.config, pooled_text=False))
    plain.load_state_dict({k: v for k, v in dit.state_dict().items() if not k.startswith("text_pool.")})
    lat = [torch.randn(4, 1, 4, 6), torch.randn(4, 3, 2, 4), torch.randn(4, 2, 4, 2)]
    txt = [torch.randn(3, 32), torch.randn(0, 32), torch.randn(5, 32)]          # an empty prompt too
    t = torch.tensor([5.0, 500.0, 900.0])
    with torch.no_grad():
        got = dit.forward_videos(lat, t, txt)
        for i in range(3):
            pooled = dit.text_embed(txt[i]).mean(0) if len(txt[i]) else torch.zeros(dit.config.dim)
            extra = dit.text_pool(pooled)                                          # (D,)
            real = plain.time_embed.forward

            def shifted(f, real=real, extra=extra):
                return real(f) + extra
            plain.time_embed.forward = shifted
            ref = plain.forward_videos([lat[i]], t[i:i + 1], [txt[i]])[0]
            plain.time_embed.forward = real
            assert_close(got[i], ref, torch.float32, msg=f"video {i}")
            alone = dit.forward_videos([lat[i]], t[i:i + 1], [txt[i]])[0]
            assert_close(got[i], alone, torch.float32, msg=f"video {i} packed vs alone")
        without = plain.forward_videos(lat, t, txt)
        assert all((a - b).abs().max() > 1e-3 for a, b in zip(got, without))     # the option does something
    fresh = VideoDiT.from_name("tiny", pooled_text=True)
    assert not fresh.text_pool.weight.any() and not fresh.text_pool.bias.any()
    assert "text_pool.weight" not in VideoDiT.from_name("tiny").state_dict()      # Wan layout unchanged
    with pytest.raises(TypeError, match=r"DiTConfig.pooled_text must be a bool, got 1"):
        DiTConfig.from_name("tiny", pooled_text=1)
