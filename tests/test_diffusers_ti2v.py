"""VideoPipeline.from_diffusers on a Wan 2.2 TI2V-5B-style pipeline: diffusers' ``WanPipeline`` with
``expand_timesteps=True`` (a timestep per patch token), a 48-channel-style transformer and the residual,
patchified VAE (``is_residual=True``, ``patch_size=2``, 16x space) -- tiny, random, saved with save_pretrained.
Text-to-video equals ``WanPipeline.__call__``; image-to-video (``conditions=[[Condition(image, frame=0)]]``)
equals ``WanImageToVideoPipeline`` with ``expand_timesteps=True``, which is how diffusers runs TI2V's I2V."""
import json
import shutil

import pytest
import torch
from _diffusers_utils import tiny_vae, tiny_wan, tiny_wan_pipeline
from diffusers import FlowMatchEulerDiscreteScheduler, WanImageToVideoPipeline, WanPipeline
from test_dit import rel_err

from sora_fast.conditioning import Condition
from sora_fast.pipeline import VideoPipeline

PROMPT, NEG, SIZE, STEPS, GUIDANCE = "a red ball rolls left", "blue cube", (9, 32, 64), 3, 4.5
# TI2V-5B's VAE at width 8: 2x2 patchify, residual stages, 4x time, 16x space; 8 latent channels
TI2V_VAE = dict(base_dim=8, decoder_base_dim=12, z_dim=8, dim_mult=[1, 2, 2, 2], num_res_blocks=1, attn_scales=[],
                temperal_downsample=[False, True, True], is_residual=True, patch_size=2, in_channels=12,
                out_channels=12, scale_factor_temporal=4, scale_factor_spatial=16)


@pytest.fixture(scope="module")
def ti2v(tmp_path_factory):
    """A tiny random TI2V WanPipeline (Euler scheduler, shift 3) and the directory save_pretrained wrote."""
    base = tiny_wan_pipeline(two_experts=False)          # its word-level tokenizer and 1-layer umT5
    pipe = WanPipeline(tokenizer=base.tokenizer, text_encoder=base.text_encoder, vae=tiny_vae(TI2V_VAE),
                       scheduler=FlowMatchEulerDiscreteScheduler(shift=3.0),
                       transformer=tiny_wan(in_channels=8, out_channels=8), expand_timesteps=True)
    d = tmp_path_factory.mktemp("ti2v") / "pipe"
    pipe.save_pretrained(d)
    cfg = d / "vae" / "config.json"   # TI2V-5B's config.json has clip_output=false, which no AutoencoderKLWan reads
    cfg.write_text(json.dumps({**json.loads(cfg.read_text()), "clip_output": False}))
    return pipe, d


def as_video(out):
    """diffusers' output_type="pt" frames (1, T, 3, H, W) in [0, 1] -> (3, T, H, W) in [-1, 1]."""
    return out.frames[0].permute(1, 0, 2, 3).double() * 2 - 1


def in_fp64(pipe, fn):
    try:
        pipe.to(torch.float64)
        return fn()
    finally:
        pipe.to(torch.float32)


def check_parity(video, d32, d64):
    """The existing Wan parity rule (tests/test_diffusers_pipeline.py): our fp32 error against diffusers in
    fp64 at most twice diffusers' own fp32 error, plus a few fp32 ulps."""
    assert video.shape == d64.shape == (3, *SIZE)
    ours_err, ref_err = rel_err(video, d64), rel_err(d32, d64)
    assert ours_err <= 2 * ref_err + 4 * 2**-24, (ours_err, ref_err)
    return ours_err, ref_err


def test_ti2v_loads_the_residual_vae(ti2v):
    pipe, d = ti2v
    ours = VideoPipeline.from_diffusers(d)
    c = ours.vae.config
    assert (c.residual, c.patch_size, c.z_dim, ours.vae.spatial_factor, ours.vae.temporal_factor) == (True, 2, 8, 16, 4)
    assert ours.latent_shape(SIZE) == (8, 3, 2, 4)
    assert ours.dit.config.in_channels == ours.dit.config.out_channels == 8
    x = torch.rand(1, 3, 5, 32, 48) * 2 - 1
    with torch.no_grad():
        ref = pipe.vae.encode(x).latent_dist.mean
        assert rel_err(ours.vae.encode(x), ref) <= 1e-5
        assert rel_err(ours.vae.decode(ref), pipe.vae.decode(ref).sample) <= 1e-5


def test_ti2v_text_to_video_equals_diffusers(ti2v):
    """T2V on TI2V: every token gets the step's timestep (diffusers' per-token form), which VideoDiT takes per
    latent frame; the latents are 16x smaller than the video in space, as the pipeline sizes them."""
    pipe, d = ti2v
    ours = VideoPipeline.from_diffusers(d)
    seed = int(torch.randint(0, 2**31, ()))
    video = ours.generate([PROMPT], SIZE, steps=STEPS, guidance=GUIDANCE, negative_prompt=NEG, seed=seed)[0]
    noise = torch.randn(ours.latent_shape(SIZE), generator=torch.Generator().manual_seed(seed))

    def run(n):
        t, h, w = SIZE
        return as_video(pipe(prompt=PROMPT, negative_prompt=NEG, num_frames=t, height=h, width=w,
                             num_inference_steps=STEPS, guidance_scale=GUIDANCE, latents=n[None], output_type="pt"))

    check_parity(video, run(noise), in_fp64(pipe, lambda: run(noise.double())))


def test_ti2v_image_to_video_equals_diffusers(ti2v):
    """I2V on TI2V: the image, encoded alone and normalized, is latent frame 0 at timestep 0 (never updated); the
    rest is denoised -- what sora_fast's image condition at frame 0 does."""
    from PIL import Image

    pipe, d = ti2v
    i2v = WanImageToVideoPipeline(tokenizer=pipe.tokenizer, text_encoder=pipe.text_encoder, vae=pipe.vae,
                                  scheduler=pipe.scheduler, transformer=pipe.transformer, expand_timesteps=True)
    t, h, w = SIZE
    image = Image.fromarray((torch.rand(h, w, 3) * 255).to(torch.uint8).numpy())
    media = i2v.video_processor.preprocess(image, height=h, width=w)[0][:, None]   # (3, 1, H, W) in [-1, 1]
    ours = VideoPipeline.from_diffusers(d)
    seed = int(torch.randint(0, 2**31, ()))
    video = ours.generate([PROMPT], SIZE, steps=STEPS, guidance=GUIDANCE, negative_prompt=NEG, seed=seed,
                          conditions=[[Condition(media, frame=0)]])[0]
    noise = torch.randn(ours.latent_shape(SIZE), generator=torch.Generator().manual_seed(seed))

    def run(n):  # prompt embeddings from WanPipeline: the I2V pipeline's own prompt cleaning needs ftfy
        embeds, neg = pipe.encode_prompt(PROMPT, NEG, max_sequence_length=512)
        return as_video(i2v(image=image, prompt_embeds=embeds, negative_prompt_embeds=neg, num_frames=t, height=h,
                            width=w, num_inference_steps=STEPS, guidance_scale=GUIDANCE, latents=n[None],
                            output_type="pt"))

    d32 = run(noise)
    check_parity(video, d32, in_fp64(pipe, lambda: run(noise.double())))
    plain = ours.generate([PROMPT], SIZE, steps=STEPS, guidance=GUIDANCE, negative_prompt=NEG, seed=seed)[0]
    assert rel_err(plain, d32) > 1e-2                                    # the image did condition the video


def test_ti2v_pipeline_object_and_save_load(ti2v, tmp_path):
    pipe, d = ti2v
    kw = dict(steps=1, guidance=GUIDANCE, seed=5)
    ref = VideoPipeline.from_diffusers(d).generate([PROMPT], (5, 32, 32), **kw)[0]
    from_obj = VideoPipeline.from_diffusers(pipe)
    assert from_obj.vae.config == VideoPipeline.from_diffusers(d).vae.config
    assert torch.equal(from_obj.generate([PROMPT], (5, 32, 32), **kw)[0], ref)
    from_obj.save(tmp_path / "p")
    back = VideoPipeline.load(tmp_path / "p")
    assert back.vae.config.residual and back.vae.config.patch_size == 2
    assert torch.equal(back.generate([PROMPT], (5, 32, 32), **kw)[0], ref)


def test_ti2v_vae_options_not_reproduced_are_named(ti2v, tmp_path):
    d = tmp_path / "broken"
    shutil.copytree(ti2v[1], d)
    cfg = json.loads((d / "vae" / "config.json").read_text())
    for change, match in ((dict(scale_factor_spatial=8), r"scale_factor_spatial=8 does not match its architecture: "
                                                         r"expected 16"),
                          (dict(patch_size=4), r"in_channels must be a multiple of patch_size\*\*2 = 16 .*got 12"),
                          (dict(is_residual="true"), r"is_residual must be a bool .*got 'true'"),
                          (dict(upsample_mode="bilinear"), r"fields not supported by CausalVAE: upsample_mode")):
        (d / "vae" / "config.json").write_text(json.dumps({**cfg, **change}))
        with pytest.raises(ValueError, match=match):
            VideoPipeline.from_diffusers(d)
