"""VideoPipeline.from_diffusers: a diffusers WanPipeline saved with save_pretrained (tiny, random, nothing
downloaded) generates the same video as diffusers' own WanPipeline.__call__, loads lazily, saves in sora_fast's
format, runs from the CLI, and bad directories are refused naming what was found and what was expected."""
import json
import shutil

import pytest
import torch
from _diffusers_utils import broken_copy, saved_tiny_wan_pipeline, set_json
from test_dit import rel_err

from sora_fast import cli
from sora_fast.pipeline import VideoPipeline

PROMPT, NEG, SIZE, STEPS, GUIDANCE = "a red ball rolls left", "blue cube", (9, 32, 48), 3, 4.5


@pytest.fixture(scope="module")
def wan_dir(tmp_path_factory):
    """A tiny random WanPipeline (Euler scheduler, shift 3) and the directory save_pretrained wrote."""
    return saved_tiny_wan_pipeline(tmp_path_factory)


def diffusers_video(pipe, noise, **kw):
    """WanPipeline.__call__ on ``noise`` (our seed's noise, so both start from the same latents) -> (3, T, H, W)
    in [-1, 1], as VideoPipeline.generate returns it."""
    t, h, w = SIZE
    out = pipe(prompt=PROMPT, negative_prompt=NEG, num_frames=t, height=h, width=w, num_inference_steps=STEPS,
               guidance_scale=GUIDANCE, latents=noise[None].to(pipe.transformer.dtype), output_type="pt", **kw)
    return out.frames[0].permute(1, 0, 2, 3).double() * 2 - 1


def test_generation_equals_diffusers_wan_pipeline(wan_dir):
    """STYLE's fp32 rule with diffusers as the reference: the error of our fp32 video against diffusers run in
    fp64 may be at most twice diffusers' own fp32 error against it, plus an atol of a few fp32 ulps of the
    output scale (both fp32 runs can be exact where the fp64 one rounds to the same frame)."""
    pipe, d = wan_dir
    ours = VideoPipeline.from_diffusers(d)
    assert ours.sampling == {"solver": "euler", "shift": 3.0,
                             "schedule": {"kind": "diffusers_flow_euler", "num_train_timesteps": 1000}}
    seed = int(torch.randint(0, 2**31, ()))
    video = ours.generate([PROMPT], SIZE, steps=STEPS, guidance=GUIDANCE, negative_prompt=NEG, seed=seed)[0]
    noise = torch.randn(ours.latent_shape(SIZE), generator=torch.Generator().manual_seed(seed))
    d32 = diffusers_video(pipe, noise)
    try:
        pipe.to(torch.float64)
        d64 = diffusers_video(pipe, noise.double())
    finally:
        pipe.to(torch.float32)
    assert video.shape == d64.shape == (3, *SIZE)
    ours_err, ref_err = rel_err(video, d64), rel_err(d32, d64)
    assert ours_err <= 2 * ref_err + 4 * 2**-24, (ours_err, ref_err)
    assert rel_err(video, d32) <= 2 * ref_err + 4 * 2**-24 + ref_err


def test_pipeline_object_shares_weights_and_saves(wan_dir, tmp_path):
    pipe, d = wan_dir
    from_dir = VideoPipeline.from_diffusers(d)
    from_obj = VideoPipeline.from_diffusers(pipe)
    # the same storage as diffusers' (no copy)
    ptr = pipe.transformer.blocks[0].attn1.to_q.weight.data_ptr()
    assert from_obj.dit.blocks[0].attn1.to_q.weight.data_ptr() == ptr
    assert from_obj.text_encoder.model is pipe.text_encoder
    kw = dict(steps=2, guidance=GUIDANCE, seed=5)
    ref = from_dir.generate([PROMPT, ""], [SIZE, (1, 16, 32)], **kw)
    assert all(torch.equal(a, b) for a, b in zip(from_obj.generate([PROMPT, ""], [SIZE, (1, 16, 32)], **kw), ref))
    # sora_fast's format: the diffusers directory's text encoder by path, the in-memory one saved inside
    for src, name in ((from_dir, "a"), (from_obj, "b")):
        src.save(tmp_path / name)
        back = VideoPipeline.load(tmp_path / name)
        assert back.sampling == src.sampling
        assert all(torch.equal(a, b) for a, b in zip(back.generate([PROMPT, ""], [SIZE, (1, 16, 32)], **kw), ref))
    assert (tmp_path / "b" / "text_encoder" / "config.json").is_file()
    assert json.loads((tmp_path / "a" / "pipeline.json").read_text())["text"]["path"] == str(d / "text_encoder")


def test_lazy_load_holds_one_copy(wan_dir, monkeypatch):
    """Every tensor read from the transformer's and the VAE's files becomes a model's own storage (assigned, not
    copied), except the output projection, whose rows the converter permutes: no second copy of the weights."""
    from sora_fast.integrations.diffusers import wan_pipeline

    read, items = {}, wan_pipeline._LazyTensors.items

    def recording(self):
        for k, t in items(self):
            read[k] = t.untyped_storage().data_ptr()
            yield k, t

    monkeypatch.setattr(wan_pipeline._LazyTensors, "items", recording)
    pipe = VideoPipeline.from_diffusers(wan_dir[1])
    own = {t.untyped_storage().data_ptr() for m in (pipe.dit, pipe.vae) for t in m.state_dict().values()}
    assert len(read) == len(pipe.dit.state_dict()) + len(pipe.vae.state_dict())
    copied = sorted(k for k, ptr in read.items() if ptr not in own)
    assert copied == ["proj_out.bias", "proj_out.weight"], copied


def test_dtype_casts_all_but_diffusers_fp32_modules(wan_dir):
    _, d = wan_dir
    pipe = VideoPipeline.from_diffusers(d, dtype=torch.bfloat16)
    sd = pipe.dit.state_dict()
    assert sd["blocks.0.attn1.to_q.weight"].dtype == torch.bfloat16
    assert sd["scale_shift_table"].dtype == torch.float32 and sd["time_embed.0.weight"].dtype == torch.float32
    assert next(pipe.vae.parameters()).dtype == torch.float32
    assert next(pipe.text_encoder.model.parameters()).dtype == torch.bfloat16


def test_cli_generate_and_train_take_a_diffusers_directory(wan_dir, tmp_path, capsys):
    from sora_fast.data import make_synthetic_dataset, write_video

    _, d = wan_dir
    out = tmp_path / "gen"
    assert cli.main(["generate", "--pipeline", str(d), "--prompt", PROMPT, "--size", "5x16x32", "--steps", "2",
                     "--seed", "7", "--format", "gif", "--out", str(out)]) == 0, capsys.readouterr().err
    ref = VideoPipeline.from_diffusers(d).generate([PROMPT], (5, 16, 32), steps=2, guidance=4.0, seed=7)[0]
    (gif,) = out.glob("*.gif")
    assert gif.read_bytes() == write_video(tmp_path / "ref.gif", ref).read_bytes()  # the scheduler's shift, 3
    data = tmp_path / "data"
    make_synthetic_dataset(data, 3, seed=1, sizes=((16, 16),), lengths=(1, 5), progress=False)
    run = {"data": str(data), "out": str(tmp_path / "run"), "pipeline": str(d),
           "train": {"steps": 1, "token_budget": 64, "lora_rank": 2}}
    (tmp_path / "run.json").write_text(json.dumps(run))
    assert cli.main(["train", "--config", str(tmp_path / "run.json")]) == 0, capsys.readouterr().err
    assert VideoPipeline.load(tmp_path / "run" / "pipeline").sampling["shift"] == 3.0
    index = json.loads((tmp_path / "run" / "text" / "index.json").read_text())   # the umT5 ran once per caption
    assert len(index["captions"]) == 1 + len({p.read_text().strip() for p in data.glob("*.txt")})
    lora = tmp_path / "run" / "lora"   # the adapters alone, for diffusers and ComfyUI, and back through --lora
    assert {p.name for p in lora.iterdir()} == {"pytorch_lora_weights.safetensors", "comfyui.safetensors", "lora.json"}
    for f in (lora, lora / "comfyui.safetensors"):
        assert cli.main(["generate", "--pipeline", str(d), "--lora", str(f), "--prompt", PROMPT, "--size", "1x16x16",
                         "--steps", "1", "--format", "gif", "--out", str(tmp_path / "g")]) == 0




@pytest.mark.parametrize("edit, error, match", [
    (lambda d: (d / "model_index.json").unlink(), ValueError, r"not a diffusers pipeline directory: expected "
     r"model_index.json, found scheduler, text_encoder"),
    (lambda d: set_json(d / "model_index.json", _class_name="WanImageToVideoPipeline"), ValueError,
     r"holds a diffusers 'WanImageToVideoPipeline', expected a Wan text-to-video pipeline \(WanPipeline"),
    (lambda d: shutil.rmtree(d / "vae"), FileNotFoundError, r"the 'vae' component \(AutoencoderKLWan\) is missing"),
    (lambda d: set_json(d / "model_index.json", tokenizer=None), ValueError, r"no 'tokenizer' component"),
    (lambda d: set_json(d / "model_index.json", transformer_2=["diffusers", "WanTransformer3DModel"]),
     FileNotFoundError, r"the 'transformer_2' component \(WanTransformer3DModel\) is missing"),
    (lambda d: set_json(d / "model_index.json", boundary_ratio=0.875), ValueError,
     r"boundary_ratio=0.875 but no transformer_2"),
    (lambda d: set_json(d / "model_index.json", text_encoder=["transformers", "CLIPTextModel"]), ValueError,
     r"component 'text_encoder' is a CLIPTextModel, expected UMT5EncoderModel or T5EncoderModel"),
    (lambda d: set_json(d / "text_encoder" / "config.json", d_model=32), ValueError,
     r"mismatched text encoder: its width \(d_model\) is 32, the transformer's text_dim is 24"),
    (lambda d: set_json(d / "scheduler" / "scheduler_config.json", use_karras_sigmas=True), ValueError,
     r"options use_karras_sigmas are set"),
    (lambda d: set_json(d / "vae" / "config.json", scale_factor_spatial=16), ValueError,
     r"AutoencoderKLWan config scale_factor_spatial=16 does not match its architecture: expected 8"),
    (lambda d: (d / "transformer" / "diffusion_pytorch_model.safetensors").write_bytes(b"junk"), ValueError,
     r"not a readable safetensors file"),
])
def test_bad_directories_are_named(wan_dir, tmp_path, edit, error, match):
    d = broken_copy(wan_dir[1], tmp_path, edit)
    with pytest.raises(error, match=match):
        VideoPipeline.from_diffusers(d)


def test_bad_arguments(wan_dir, tmp_path):
    with pytest.raises(FileNotFoundError, match="is not a directory"):
        VideoPipeline.from_diffusers(tmp_path / "nothing")
    with pytest.raises(TypeError, match="must be a Wan pipeline directory or a WanPipeline, got a dict"):
        VideoPipeline.from_diffusers({})
    with pytest.raises(TypeError, match="dtype must be None or a floating torch.dtype"):
        VideoPipeline.from_diffusers(wan_dir[1], dtype=torch.int8)
    with pytest.raises(FileNotFoundError, match=r"pipeline.json is missing \(and so is the model_index.json"):
        VideoPipeline.load(tmp_path)
