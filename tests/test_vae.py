"""CausalVAE against diffusers' AutoencoderKLWan with the same (random) weights, on CPU in fp32.

Nothing is downloaded: both models are built from tiny configs and every parameter is random (conv
weights keep PyTorch's random init, norm gammas and all biases are drawn anew). Errors are reported as
max |ours - diffusers| / max |diffusers| ("relative error"); fp32 rounding through ~40 layers gives
~1e-7 to 1e-6, so 1e-5 catches any real difference (a wrong cache frame or a missing term is O(1)).
"""

import pytest
import torch
from diffusers import AutoencoderKLWan

from sora_fast.models._convert import StateDictMismatchError, load_converted
from sora_fast.models.vae import WAN22_LATENTS_MEAN, WAN22_LATENTS_STD, CausalVAE, VAEConfig, convert_wan_vae_state_dict
from sora_fast.ops import BackendUnavailableError
from sora_fast.tools.memory import PeakMemory

# Wan2.1's layout at width 8: 4x time, 8x space (downsample2d, then two downsample3d), 4 latent channels.
TINY = dict(base_dim=8, z_dim=4, dim_mult=[1, 2, 2, 2], num_res_blocks=1, attn_scales=[],
            temperal_downsample=[False, True, True])
# Another shape of the same family: 2x time and space, a wider decoder, 2 residual blocks per stage, 3
# latent channels (our encoder chunks hold 2 frames, diffusers' 4).
OTHER = dict(base_dim=6, decoder_base_dim=10, z_dim=3, dim_mult=[1, 2], num_res_blocks=2, attn_scales=[],
             temperal_downsample=[True])
# Wan 2.2 TI2V-5B's layout at width 8: 2x2 patchify, residual stages, 4x time, 16x space, a wider decoder.
RESIDUAL = dict(base_dim=8, decoder_base_dim=12, z_dim=6, dim_mult=[1, 2, 2, 2], num_res_blocks=1, attn_scales=[],
                temperal_downsample=[False, True, True], is_residual=True, patch_size=2, in_channels=12,
                out_channels=12)
# Another residual shape: 3x3 patches (27 channels), 2x time, 2 residual blocks per stage (6x space).
RESIDUAL_OTHER = dict(base_dim=6, decoder_base_dim=5, z_dim=3, dim_mult=[2, 2], num_res_blocks=2, attn_scales=[],
                      temperal_downsample=[True], is_residual=True, patch_size=3, in_channels=27, out_channels=27)
RTOL = 1e-5


def rel_err(a, b):
    return ((a.double() - b.double()).abs().max() / b.double().abs().max()).item()


def make_pair(arch, seed=0):
    """A diffusers AutoencoderKLWan with every parameter random, and CausalVAE.from_diffusers of it."""
    gen = torch.Generator().manual_seed(seed)
    torch.manual_seed(seed)
    z = arch["z_dim"]
    dv = AutoencoderKLWan(**arch, latents_mean=torch.randn(z, generator=gen).tolist(),
                          latents_std=(torch.rand(z, generator=gen) + 0.5).tolist(),
                          scale_factor_temporal=2 ** sum(arch["temperal_downsample"]),
                          scale_factor_spatial=(arch.get("patch_size") or 1) * 2 ** (len(arch["dim_mult"]) - 1)).eval()
    with torch.no_grad():
        for name, p in dv.named_parameters():
            if name.endswith("gamma"):
                p.copy_(torch.rand(p.shape, generator=gen) + 0.5)
            elif name.endswith("bias"):
                p.copy_(torch.randn(p.shape, generator=gen) * 0.2)
    return dv, CausalVAE.from_diffusers(dv).eval()


@pytest.fixture(scope="module")
def tiny():
    return make_pair(TINY)


@pytest.fixture(scope="module")
def residual():
    return make_pair(RESIDUAL, seed=2)


def video(*shape):
    return torch.rand(*shape) * 2 - 1


# --- config -----------------------------------------------------------------------------------
def test_presets_and_factors():
    expect = {"wan2.1": (4, 8, 16), "wan2.2": (4, 16, 48), "tiny": (4, 8, 4), "demo": (2, 4, 8)}
    for name, (tf, sf, z) in expect.items():
        c = VAEConfig.from_name(name)
        assert (c.temporal_factor, c.spatial_factor, c.latent_channels) == (tf, sf, z), name
    wan = VAEConfig.from_name("wan2.1")
    assert (wan.base_dim, wan.dim_mult, wan.num_res_blocks, wan.temporal_downsample) == (96, (1, 2, 4, 4), 2,
                                                                                       (False, True, True))
    with torch.device("meta"):  # the full-size model, with diffusers' parameter names and shapes
        dv = AutoencoderKLWan()
        ours = CausalVAE("wan2.1").state_dict()
        theirs = convert_wan_vae_state_dict(dv.state_dict(), wan)
    assert VAEConfig.from_diffusers_config(dv.config) == wan
    assert {k: v.shape for k, v in ours.items()} == {k: v.shape for k, v in theirs.items()}
    assert (wan.residual, wan.patch_size, wan.video_in_channels, wan.video_out_channels) == (False, 1, 3, 3)


def test_wan22_preset_is_ti2v_5b():
    """The "wan2.2" preset is the TI2V-5B VAE as its diffusers config gives it (clip_output included: diffusers
    reads no such field and clamps), with the same parameter names and shapes."""
    cfg = dict(base_dim=160, decoder_base_dim=256, z_dim=48, is_residual=True, in_channels=12, out_channels=12,
               patch_size=2, scale_factor_temporal=4, scale_factor_spatial=16, latents_mean=list(WAN22_LATENTS_MEAN),
               latents_std=list(WAN22_LATENTS_STD))
    wan22 = VAEConfig.from_name("wan2.2")
    with torch.device("meta"):
        dv = AutoencoderKLWan(**cfg)
        ours = CausalVAE("wan2.2").state_dict()
        theirs = convert_wan_vae_state_dict(dv.state_dict(), wan22)
    assert VAEConfig.from_diffusers_config({**dv.config, "clip_output": False}) == wan22
    assert {k: v.shape for k, v in ours.items()} == {k: v.shape for k, v in theirs.items()}
    assert (wan22.residual, wan22.patch_size, wan22.video_in_channels, wan22.video_out_channels) == (True, 2, 3, 3)


def test_config_errors():
    with pytest.raises(ValueError, match=r"unknown VAE preset 'wan2\.3'; valid names: demo, tiny, wan2\.1, wan2\.2"):
        VAEConfig.from_name("wan2.3")
    with pytest.raises(ValueError, match=r"temporal_downsample must hold one bool per downsampling stage "
                                         r"\(len\(dim_mult\) - 1 = 3\), got \(True,\)"):
        VAEConfig(temporal_downsample=(True,))
    with pytest.raises(ValueError, match=r"latents_mean must hold z_dim=16 values, got 2"):
        VAEConfig(latents_mean=(0.0, 1.0))
    with pytest.raises(ValueError, match=r"VAEConfig.attn_scales must be empty .*, got \(0.5,\)"):
        VAEConfig(attn_scales=[0.5])
    with pytest.raises(ValueError, match=r"VAEConfig.base_dim must be a positive int, got 0"):
        VAEConfig(base_dim=0)
    with pytest.raises(TypeError, match="config must be a VAEConfig, a preset name or None, got dict"):
        CausalVAE({"base_dim": 8})
    with pytest.raises(ValueError, match=r"VAEConfig.in_channels must be a multiple of patch_size\*\*2 = 4 "
                                         r"\(video channels x 2x2 folded pixels\), got 3"):
        VAEConfig(patch_size=2)
    with pytest.raises(ValueError, match=r"VAEConfig.out_channels must be a multiple of patch_size\*\*2 = 9 .*got 12"):
        VAEConfig(patch_size=3, in_channels=27, out_channels=12)
    with pytest.raises(ValueError, match=r"VAEConfig.patch_size must be a positive int, got 0"):
        VAEConfig(patch_size=0)
    with pytest.raises(ValueError, match=r"VAEConfig.residual must be a bool, got 1"):
        VAEConfig(residual=1)
    # a residual shortcut must spread its values evenly over the stage's output channels
    with pytest.raises(ValueError, match=r"residual encoder stage 1 averages 8 channels x 1 pixels into 16 channels, "
                                         r"expected 16 to divide 8 \(base_dim=8, dim_mult=\(1, 2\)\)"):
        VAEConfig(base_dim=8, dim_mult=(1, 2), temporal_downsample=(True,), residual=True)
    with pytest.raises(ValueError, match=r"residual decoder stage 1 repeats 30 channels over 4 pixels of 20 "
                                         r"channels, expected 30 to divide 80 \(decoder_base_dim=10"):
        VAEConfig(base_dim=8, decoder_base_dim=10, dim_mult=(1, 2, 3), temporal_downsample=(False, False),
                  residual=True)
    VAEConfig(base_dim=8, decoder_base_dim=10, dim_mult=(1, 2, 3), temporal_downsample=(False, False))  # Wan 2.1: fine


def test_from_diffusers_config_fields():
    base = dict(AutoencoderKLWan(**TINY, latents_mean=[0.0] * 4, latents_std=[1.0] * 4).config)
    assert VAEConfig.from_diffusers_config(base) == VAEConfig(base_dim=8, z_dim=4, dim_mult=(1, 2, 2, 2),
                                                              num_res_blocks=1, latents_mean=base["latents_mean"],
                                                              latents_std=base["latents_std"])
    wan22 = VAEConfig.from_diffusers_config({**base, "is_residual": True, "patch_size": 2, "in_channels": 12,
                                             "out_channels": 12, "scale_factor_spatial": 16, "clip_output": False})
    assert (wan22.residual, wan22.patch_size, wan22.spatial_factor, wan22.temporal_factor) == (True, 2, 16, 4)
    assert VAEConfig.from_diffusers_config({**base, "patch_size": 1}) == VAEConfig.from_diffusers_config(base)
    with pytest.raises(ValueError, match=r"config scale_factor_spatial=8 does not match its architecture: expected "
                                         r"16 \(patch_size x 2 \*\* \(len\(dim_mult\) - 1\)\)"):
        VAEConfig.from_diffusers_config({**base, "is_residual": True, "patch_size": 2, "in_channels": 12,
                                         "out_channels": 12})
    with pytest.raises(ValueError, match=r"config scale_factor_temporal=8 does not match its architecture: expected 4"):
        VAEConfig.from_diffusers_config({**base, "scale_factor_temporal": 8})
    with pytest.raises(ValueError, match=r"config is_residual must be a bool .*, got 'yes'"):
        VAEConfig.from_diffusers_config({**base, "is_residual": "yes"})
    with pytest.raises(ValueError, match=r"config patch_size must be None or a positive int .*, got \[2, 2\]"):
        VAEConfig.from_diffusers_config({**base, "patch_size": [2, 2]})
    with pytest.raises(ValueError, match=r"in_channels must be a multiple of patch_size\*\*2 = 4 .*got 3"):
        VAEConfig.from_diffusers_config({**base, "patch_size": 2, "scale_factor_spatial": 16})
    with pytest.raises(ValueError, match="config fields not supported by CausalVAE: upsample_mode"):
        VAEConfig.from_diffusers_config({**base, "upsample_mode": "bilinear"})
    with pytest.raises(TypeError, match="config must be a mapping"):
        VAEConfig.from_diffusers_config([1, 2])
    with pytest.raises(ValueError, match="latents_std must hold z_dim=4 values, got 16"):  # diffusers' defaults
        VAEConfig.from_diffusers_config({**base, "latents_std": [1.0] * 16})


# --- parity with diffusers --------------------------------------------------------------------
@pytest.mark.parametrize("frames", [1, 5, 9])
def test_encode_decode_match_diffusers(tiny, frames):
    dv, ours = tiny
    x = video(2, 3, frames, 16, 24)  # non-square, batch 2
    with torch.no_grad():
        ref = dv.encode(x).latent_dist.mean
        z = ours.encode(x)
        assert z.shape == (2, 4, 1 + (frames - 1) // 4, 2, 3)
        assert rel_err(z, ref) <= RTOL
        out, ref_out = ours.decode(ref), dv.decode(ref).sample
    assert out.shape == x.shape
    assert (ref_out.abs() < 1).float().mean() > 0.9  # most pixels unclamped: the comparison means something
    assert rel_err(out, ref_out) <= RTOL


@pytest.mark.parametrize("frames", [1, 5, 9])
def test_one_pass_matches_diffusers(tiny, frames):
    """``chunked=False`` (every frame in one pass, what VAE training uses) is the same function as
    diffusers' chunked model: the time resamplers do in one pass what the chunks do."""
    dv, ours = tiny
    x = video(2, 3, frames, 16, 24)
    with torch.no_grad():
        ref = dv.encode(x).latent_dist
        post = ours.encode_posterior(x, chunked=False)
        assert rel_err(post.mean, ref.mean) <= RTOL and rel_err(post.logvar, ref.logvar) <= RTOL
        assert rel_err(ours.encode(x, chunked=False), ref.mean) <= RTOL
        out, ref_out = ours.decode(ref.mean, chunked=False), dv.decode(ref.mean).sample
    assert out.shape == x.shape and (ref_out.abs() < 1).float().mean() > 0.9
    assert rel_err(out, ref_out) <= RTOL


def test_other_architecture_matches_diffusers():
    dv, ours = make_pair(OTHER, seed=1)
    assert (ours.temporal_factor, ours.spatial_factor, ours.latent_channels) == (2, 2, 3)
    x = video(1, 3, 9, 6, 10)
    with torch.no_grad():
        ref = dv.encode(x).latent_dist.mean
        assert rel_err(ours.encode(x), ref) <= RTOL
        assert rel_err(ours.decode(ref), dv.decode(ref).sample) <= RTOL
        assert rel_err(ours.encode(x, chunked=False), ref) <= RTOL            # 2x time: one resampler each
        assert rel_err(ours.decode(ref, chunked=False), dv.decode(ref).sample) <= RTOL


# --- Wan 2.2's residual, patchified VAE -------------------------------------------------------
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=["fp32", "fp64"])
@pytest.mark.parametrize("frames", [1, 5, 9])
def test_residual_matches_diffusers(residual, frames, dtype):
    """Encode (posterior mean and log-variance) and decode of the Wan 2.2 layout equal diffusers', chunked and in
    one pass (which equal each other); 16x48 pixels: latent grids of 1x3. In fp64 diffusers' upsampler still
    rounds its input through fp32, so the decode error stays at fp32 rounding (measured ~4e-8, against ~3e-16
    for the encoder and ~2e-15 between our chunked and one-pass decodes)."""
    dv, ours = residual
    dv.to(dtype)
    ours.to(dtype)
    try:
        x = video(2, 3, frames, 16, 48).to(dtype)
        with torch.no_grad():
            ref = dv.encode(x).latent_dist
            post = ours.encode_posterior(x)
            one = ours.encode_posterior(x, chunked=False)
            out, ref_out = ours.decode(ref.mean), dv.decode(ref.mean).sample
            whole = ours.decode(ref.mean, chunked=False)
    finally:
        dv.float()
        ours.float()
    assert post.mean.shape == (2, 6, 1 + (frames - 1) // 4, 1, 3) and post.mean.dtype == dtype
    exact = RTOL if dtype == torch.float32 else 1e-12                      # where no fp32 rounding is involved
    for got in (post, one):
        assert rel_err(got.mean, ref.mean) <= exact and rel_err(got.logvar, ref.logvar) <= exact
    assert out.shape == x.shape and (ref_out.abs() < 1).float().mean() > 0.9
    assert rel_err(out, ref_out) <= RTOL and rel_err(whole, ref_out) <= RTOL
    assert rel_err(whole, out) <= exact                                    # chunked decode = one-pass decode


def test_residual_other_architecture_matches_diffusers():
    dv, ours = make_pair(RESIDUAL_OTHER, seed=3)
    assert (ours.temporal_factor, ours.spatial_factor, ours.latent_channels) == (2, 6, 3)
    x = video(1, 3, 9, 12, 18)                                 # diffusers encodes 1 + 4k frames; 2x3 latents
    with torch.no_grad():
        ref = dv.encode(x).latent_dist.mean
        ref_out = dv.decode(ref).sample
        assert rel_err(ours.encode(x), ref) <= RTOL and rel_err(ours.encode(x, chunked=False), ref) <= RTOL
        assert rel_err(ours.decode(ref), ref_out) <= RTOL and rel_err(ours.decode(ref, chunked=False), ref_out) <= RTOL


def _check_tiled(dv, ours, x, z, tiles):
    """Tiled encode of ``x`` and decode of ``z`` with ``enable_tiling(*tiles)`` on both models: ours (chunked
    and not) equals diffusers', and differs from the untiled result (tiling did happen)."""
    with torch.no_grad():
        plain_z, plain_x = ours.encode(x), ours.decode(z)
        dv.enable_tiling(*tiles)
        ours.enable_tiling(*tiles)
        try:
            ref_z, ref_x = dv.encode(x).latent_dist.mean, dv.decode(z).sample
            got_z, got_x = ours.encode(x), ours.decode(z)
            one_z, one_x = ours.encode(x, chunked=False), ours.decode(z, chunked=False)
        finally:
            dv.disable_tiling()
            ours.disable_tiling()
    assert rel_err(got_z, ref_z) <= RTOL and rel_err(got_x, ref_x) <= RTOL
    assert rel_err(one_z, ref_z) <= RTOL and rel_err(one_x, ref_x) <= RTOL
    assert rel_err(got_z, plain_z) > 1e-3 and rel_err(got_x, plain_x) > 1e-3  # tiling did happen


def test_residual_tiled_matches_diffusers_tiled(residual):
    """diffusers tiles the patchified video for encoding (tiles p times larger in pixels) and blends decoded tiles
    before unfolding them: the same tiles and blending here."""
    dv, ours = residual
    x, z = video(1, 3, 5, 48, 64), torch.randn(1, 6, 2, 3, 4)
    _check_tiled(dv, ours, x, z, (32, 32, 16, 16))


def test_residual_gradients_match_diffusers(residual):
    dv, ours = residual
    x, w = video(1, 3, 5, 16, 16), torch.randn(1, 3, 5, 16, 16)
    x_ref, x_ours = x.clone().requires_grad_(), x.clone().requires_grad_()
    (dv.decode(dv.encode(x_ref).latent_dist.mean).sample * w).sum().backward()
    (ours.decode(ours.encode(x_ours)) * w).sum().backward()
    assert rel_err(x_ours.grad, x_ref.grad) <= 1e-5
    ref_grads = convert_wan_vae_state_dict({n: p.grad for n, p in dv.named_parameters()}, ours.config)
    assert max(rel_err(p.grad, ref_grads[n]) for n, p in ours.named_parameters()) <= 1e-4
    dv.zero_grad(set_to_none=True)
    ours.zero_grad(set_to_none=True)


def test_residual_memory_flat_in_frame_count(residual):
    """The residual shortcuts work chunk by chunk, so the Wan 2.2 layout keeps decode and encode working
    memory flat in the number of frames too."""
    _, ours = residual
    short, out_short = working_bytes(ours.decode, torch.randn(1, 6, 3, 2, 2), ours)
    long, out_long = working_bytes(ours.decode, torch.randn(1, 6, 9, 2, 2), ours)
    assert out_short.shape[2] == 9 and out_long.shape[2] == 33
    assert long <= 1.1 * short, f"decode working memory {short} B for 9 frames, {long} B for 33"
    enc_short, _ = working_bytes(ours.encode, video(1, 3, 9, 32, 32), ours)
    enc_long, _ = working_bytes(ours.encode, video(1, 3, 33, 32, 32), ours)
    assert enc_long <= 1.1 * enc_short, f"encode working memory {enc_short} B for 9 frames, {enc_long} B for 33"


def test_residual_bad_inputs(residual):
    _, ours = residual
    with pytest.raises(ValueError, match=r"video must have 3 channels in dim 1 \(B, 3, T, H, W\), got 12"):
        ours.encode(torch.zeros(1, 12, 1, 16, 16))
    with pytest.raises(ValueError, match=r"video width must be a positive multiple of 16 \(the spatial factor\), "
                                         r"got 24"):
        ours.encode(torch.zeros(1, 3, 1, 16, 24))
    with pytest.raises(ValueError, match="tile_sample_min_height must be a positive multiple of the spatial factor 16"):
        ours.enable_tiling(8, 16, 8, 8)


def test_tiled_matches_diffusers_tiled(tiny):
    dv, ours = tiny
    x, z = video(1, 3, 5, 16, 24), torch.randn(1, 4, 2, 2, 3)
    _check_tiled(dv, ours, x, z, (16, 16, 8, 8))


def test_posterior_and_sample_match_diffusers(tiny):
    dv, ours = tiny
    x = video(1, 3, 5, 8, 16)
    with torch.no_grad():
        ref = dv.encode(x).latent_dist
        post = ours.encode_posterior(x)
        assert rel_err(post.std, ref.std) <= RTOL and rel_err(post.logvar, ref.logvar) <= RTOL
        got = ours.encode(x, sample=True, generator=torch.Generator().manual_seed(7))
        want = ref.sample(generator=torch.Generator().manual_seed(7))
        recon = ours(x, sample_posterior=True, generator=torch.Generator().manual_seed(7))
        ref_recon = dv(x, sample_posterior=True, generator=torch.Generator().manual_seed(7)).sample
    assert rel_err(got, want) <= RTOL and rel_err(recon, ref_recon) <= RTOL
    assert rel_err(post.kl(), 0.5 * (ref.mean ** 2 + ref.var - 1 - ref.logvar).flatten(1).sum(1)) <= RTOL


def test_latent_normalization_matches_wan_pipeline(tiny):
    dv, ours = tiny
    z = torch.randn(2, 4, 3, 2, 3)
    mean = torch.tensor(dv.config.latents_mean).view(1, 4, 1, 1, 1)
    inv_std = 1.0 / torch.tensor(dv.config.latents_std).view(1, 4, 1, 1, 1)
    assert torch.equal(ours.denormalize_latents(z), z / inv_std + mean)  # WanPipeline before vae.decode
    assert torch.equal(ours.normalize_latents(z), (z - mean) * inv_std)
    assert torch.allclose(ours.denormalize_latents(ours.normalize_latents(z)), z, atol=1e-6)
    assert torch.equal(CausalVAE("tiny").normalize_latents(z), z)  # no statistics: identity


# --- gradients --------------------------------------------------------------------------------
@pytest.mark.parametrize("chunked", [True, False])
def test_gradients_match_diffusers(tiny, chunked):
    """decode(encode(x)) backpropagates through the chunk caches (or the one pass) exactly as diffusers'
    chunked model: the input gradient and every parameter gradient agree."""
    dv, ours = tiny
    x, w = video(1, 3, 9, 16, 16), torch.randn(1, 3, 9, 16, 16)
    x_ref, x_ours = x.clone().requires_grad_(), x.clone().requires_grad_()
    (dv.decode(dv.encode(x_ref).latent_dist.mean).sample * w).sum().backward()
    (ours.decode(ours.encode(x_ours, chunked=chunked), chunked=chunked) * w).sum().backward()
    assert rel_err(x_ours.grad, x_ref.grad) <= 1e-5
    ref_grads = convert_wan_vae_state_dict({n: p.grad for n, p in dv.named_parameters()}, ours.config)
    worst = max(rel_err(p.grad, ref_grads[n]) for n, p in ours.named_parameters())
    assert worst <= 1e-4
    dv.zero_grad(set_to_none=True)
    ours.zero_grad(set_to_none=True)


def test_posterior_sample_backprops():
    model = CausalVAE("tiny")
    x = video(1, 3, 5, 8, 8).requires_grad_()
    post = model.encode_posterior(x)
    out = model.decode(post.sample(torch.Generator().manual_seed(0)), clamp=False)
    (out.square().mean() + 1e-3 * post.kl().mean()).backward()
    assert torch.isfinite(x.grad).all() and x.grad.abs().sum() > 0
    for name, p in model.named_parameters():
        assert p.grad is not None and torch.isfinite(p.grad).all(), name
    assert model.encoder.conv_in.weight.grad.abs().sum() > 0 and model.quant_conv.weight.grad.abs().sum() > 0


# --- memory -----------------------------------------------------------------------------------
def working_bytes(fn, inp, model):
    """Peak storage bytes during ``fn(inp)`` minus the bytes of the output it returns."""
    with torch.no_grad(), PeakMemory(exclude=[inp, *model.parameters()]) as mem:
        out = fn(inp)
    return mem.peak - out.untyped_storage().nbytes(), out


def test_memory_flat_in_frame_count(tiny):
    """Decoding 33 frames needs the same working memory as decoding 9 (encoding likewise): the peak of
    live storage during the call minus the output the call returns (which must exist in full). Each
    chunk's activations are freed before the next, the output is written into one preallocated tensor,
    and the caches hold 2 frames per conv whatever the length. As a check that the measurement sees
    growth, diffusers' decoder run on all latent frames in one pass (no chunking) grows with them."""
    dv, ours = tiny
    z_short, z_long = torch.randn(1, 4, 3, 4, 4), torch.randn(1, 4, 9, 4, 4)
    short, out_short = working_bytes(ours.decode, z_short, ours)
    long, out_long = working_bytes(ours.decode, z_long, ours)
    assert out_short.shape[2] == 9 and out_long.shape[2] == 33
    assert long <= 1.1 * short, f"decode working memory {short} B for 9 frames, {long} B for 33"
    one_pass = lambda z: dv.decoder(dv.post_quant_conv(z))  # noqa: E731
    ref_short, _ = working_bytes(one_pass, z_short, dv)
    ref_long, _ = working_bytes(one_pass, z_long, dv)
    assert ref_long >= 2 * ref_short, (ref_short, ref_long)

    enc_short, _ = working_bytes(ours.encode, video(1, 3, 9, 32, 32), ours)
    enc_long, _ = working_bytes(ours.encode, video(1, 3, 33, 32, 32), ours)
    assert enc_long <= 1.1 * enc_short, f"encode working memory {enc_short} B for 9 frames, {enc_long} B for 33"


# --- kernel backends --------------------------------------------------------------------------
@pytest.mark.parametrize("config", [
    VAEConfig(base_dim=4, z_dim=2, dim_mult=(1, 2), num_res_blocks=1, temporal_downsample=(True,)),
    VAEConfig(base_dim=4, z_dim=2, dim_mult=(2, 2), num_res_blocks=1, temporal_downsample=(True,), residual=True,
              patch_size=2, in_channels=12, out_channels=12)], ids=["wan2.1", "wan2.2"])
def test_kernel_backends_match_torch(config):
    """Triton conv3d and attention (interpreter on CPU) and the CUDA C++ norm (host emulation) inside
    the VAE give the torch backend's result (Wan 2.2: the shortcuts added in the resamplers' conv epilogue).
    A missing backend raises: no silent skip or fallback."""
    model = CausalVAE(config).eval()
    sf = model.spatial_factor
    x = video(1, 3, 3, 2 * sf, 3 * sf)  # two chunks: the caches and both time resamplers run in the kernels
    with torch.no_grad():
        ref_z = model.encode(x)
        ref_x = model.decode(ref_z)
        model.backend = {"causal_conv3d": "triton", "channel_rms_norm_silu": "cuda",
                         "spacetime_attention": "triton"}
        z, out = model.encode(x), model.decode(ref_z)
    assert rel_err(z, ref_z) <= RTOL and rel_err(out, ref_x) <= RTOL


def test_triton_conv_gets_channels_last_operands(monkeypatch):
    """The conv kernel works in channels-last: the VAE hands it x, cache and residual in that layout, so the
    launcher copies nothing, and keeps the layout between convs, so only inputs coming from a layout-changing
    op (a chunk's input, the time resamplers' interleave and concatenation, attention) are converted. The
    kernel is replaced by the reference conv here (its numerics are tested above and in the conv3d tests)."""
    import sora_fast.models.vae as vae_mod
    import sora_fast.triton.conv3d as tri
    from sora_fast.ops import causal_conv3d

    cl = torch.channels_last_3d
    model = CausalVAE(VAEConfig(base_dim=4, z_dim=2, dim_mult=(1, 2), num_res_blocks=1, attn_scales=(),
                                temporal_downsample=(True,))).eval()
    entries = []

    def fake_kernel(x, weight, bias, *, stride, padding, pad_mode, cache, residual, packed_weight=None, **kw):
        entries.append(all(t is None or tri._is_channels_last(t) for t in (x, cache, residual)))
        y = causal_conv3d(x, weight, bias, stride=stride, padding=padding, pad_mode=pad_mode, cache=cache,
                          residual=residual, backend="torch")
        return y.contiguous(memory_format=cl)     # the real launcher's output layout for channels-last x

    arrivals = []
    plain_conv = vae_mod.CausalConv.conv

    def spy_conv(self, x, s, cache=None, residual=None):
        arrivals.append(x.is_contiguous(memory_format=cl) and not x.is_contiguous())
        return plain_conv(self, x, s, cache, residual)

    from sora_fast.ops import _dispatch
    tri_name = _dispatch._KERNELS[("causal_conv3d", "triton")]
    assert tri_name == "sora_fast.triton.conv3d:causal_conv3d_forward" or tri_name is tri.causal_conv3d_forward
    monkeypatch.setitem(_dispatch._LOADED, ("causal_conv3d", "triton"), fake_kernel)
    monkeypatch.setattr(vae_mod.CausalConv, "conv", spy_conv)
    z = torch.randn(1, 2, 3, 2, 3)
    with torch.no_grad():
        ref = model.decode(z)
        assert entries == [] and not any(arrivals)      # the torch backend takes the tensors as they are
        arrivals.clear()
        model.backend = {"causal_conv3d": "triton"}
        out = model.decode(z)
    assert entries and all(entries), "every kernel call must get channels-last operands"
    chunks = z.shape[2]
    breakers = 1 + sum(isinstance(m, vae_mod.Resample) for m in model.decoder.modules())
    converted = arrivals.count(False)
    assert converted <= chunks * breakers < len(arrivals), (converted, len(arrivals))
    assert rel_err(out, ref) <= RTOL


def test_backend_errors():
    x = video(1, 3, 1, 8, 8)
    with pytest.raises(BackendUnavailableError, match="cuda backend of causal_conv3d cannot run"):
        CausalVAE("tiny", backend="cuda").encode(x)
    with pytest.raises(ValueError, match=r"backend mapping has unknown ops \['conv3d'\]; valid keys: causal_conv3d"):
        CausalVAE("tiny", backend={"conv3d": "triton"})
    with pytest.raises(TypeError, match="backend must be None, a backend name or a mapping"):
        CausalVAE("tiny", backend=3)


# --- bad inputs -------------------------------------------------------------------------------
@pytest.mark.parametrize("call,arg,err,msg", [
    ("encode", [1.0], TypeError, r"video must be a torch.Tensor \(B, 3, T, H, W\), got list"),
    ("encode", torch.zeros(1, 3, 1, 8, 8, dtype=torch.int64), TypeError, "video must be a floating-point tensor"),
    ("encode", torch.zeros(3, 1, 8, 8), ValueError, r"video must be a 5-D tensor \(B, 3, T, H, W\), got shape "
                                                    r"\(3, 1, 8, 8\)"),
    ("encode", torch.zeros(1, 4, 1, 8, 8), ValueError, "video must have 3 channels in dim 1 .*, got 4"),
    ("encode", torch.zeros(1, 3, 6, 8, 8), ValueError, r"video must have 1 \+ 4k frames \(1, 5, 9, ...\) in dim 2"
                                                       r".*got shape \(1, 3, 6, 8, 8\)"),
    ("encode", torch.zeros(1, 3, 1, 12, 8), ValueError, "video height must be a positive multiple of 8 "
                                                        r"\(the spatial factor\), got 12"),
    ("encode", torch.zeros(1, 3, 1, 8, 20), ValueError, "video width must be a positive multiple of 8"),
    ("decode", torch.zeros(1, 16, 2, 2, 2), ValueError, "latent must have 4 channels in dim 1 .*, got 16"),
    ("decode", torch.zeros(1, 4, 2, 2), ValueError, r"latent must be a 5-D tensor \(B, 4, T', h, w\)"),
    ("decode", torch.zeros(1, 4, 0, 2, 2), ValueError, "latent must have at least 1 frame in dim 2"),
    ("normalize_latents", torch.zeros(1, 3, 1, 2, 2), ValueError, "latents must have 4 channels"),
])
def test_bad_inputs(call, arg, err, msg):
    with pytest.raises(err, match=msg):
        getattr(CausalVAE("tiny"), call)(arg)


@pytest.mark.parametrize("call, arg", [("encode", torch.zeros(1, 3, 1, 8, 8)),
                                       ("encode_posterior", torch.zeros(1, 3, 1, 8, 8)),
                                       ("decode", torch.zeros(1, 4, 1, 1, 1))])
def test_chunked_must_be_bool(call, arg):
    with pytest.raises(TypeError, match="chunked must be a bool, got str 'no'"):
        getattr(CausalVAE("tiny"), call)(arg, chunked="no")


def test_enable_tiling_errors():
    model = CausalVAE("tiny")
    with pytest.raises(ValueError, match="tile_sample_min_height must be a positive multiple of the spatial "
                                         "factor 8, got 20"):
        model.enable_tiling(20, 16, 8, 8)
    with pytest.raises(ValueError, match=r"tile_sample_stride_width must be <= tile_sample_min_width \(16\), got 24"):
        model.enable_tiling(16, 16, 8, 24)


def test_state_dict_mismatch_named_by_key(tiny):
    dv, ours = tiny
    sd = convert_wan_vae_state_dict(dv.state_dict(), ours.config)
    sd.pop("decoder.conv_out.bias")
    sd["encoder.extra.weight"] = torch.zeros(1)
    sd["quant_conv.weight"] = torch.zeros(8, 8, 3, 1, 1)
    with pytest.raises(StateDictMismatchError) as info:
        load_converted(CausalVAE("tiny"), sd, "a test state dict")
    msg = str(info.value)
    assert "missing (1): decoder.conv_out.bias" in msg and "unexpected (1): encoder.extra.weight" in msg
    assert "quant_conv.weight (expected (8, 8, 1, 1, 1), got (8, 8, 3, 1, 1))" in msg
    # a checkpoint of another config
    wrong = AutoencoderKLWan(**{**TINY, "z_dim": 3}, latents_mean=[0.0] * 3, latents_std=[1.0] * 3)
    sd = convert_wan_vae_state_dict(wrong.state_dict(), ours.config)
    with pytest.raises(StateDictMismatchError, match=r"shape mismatch .*decoder.conv_in.weight \(expected "
                                                     r"\(16, 4, 3, 3, 3\), got \(16, 3, 3, 3, 3\)\)"):
        load_converted(CausalVAE("tiny"), sd, "a z_dim=3 checkpoint")
    with pytest.raises(TypeError, match="vae must be a diffusers AutoencoderKLWan, got int"):
        CausalVAE.from_diffusers(3)
