"""LoRA out and back in: adapters trained on a VideoDiT written in diffusers' layout (read by diffusers' own
WanPipeline.lora_state_dict, and giving diffusers' WanPipeline the same video) and in ComfyUI's (read by
diffusers' converter for original Wan LoRAs: the independent reference for the names and the alpha), one
mapping tested both ways, and LoRAs of another model or rank refused by name."""
import copy
import math

import pytest
import torch
from _diffusers_utils import saved_tiny_wan_pipeline
from diffusers import WanPipeline
from safetensors.torch import load_file, save_file
from test_dit import rel_err

from sora_fast.models.dit import DiTConfig, VideoDiT
from sora_fast.pipeline import VideoPipeline
from sora_fast.training.lora import LoRALinear, apply_lora, lora_state_dict
from sora_fast.training.lora_formats import (
    COMFYUI_FILE,
    DIFFUSERS_FILE,
    export_lora,
    import_lora,
    load_lora_file,
    module_name,
    save_lora_files,
)

PROMPT, SIZE, STEPS, GUIDANCE = "a red ball rolls left", (5, 32, 32), 2, 4.0


@pytest.fixture(scope="module")
def wan(tmp_path_factory):
    return saved_tiny_wan_pipeline(tmp_path_factory)


def adapted(dit, rank=2, alpha=3.0, targets=None):
    """LoRA on ``dit`` with random nonzero A and B (a fresh adapter's B is zero and would hide every bug)."""
    kw = {} if targets is None else {"targets": targets}
    apply_lora(dit, rank, alpha, **kw)
    with torch.no_grad():
        for m in dit.modules():
            if isinstance(m, LoRALinear):
                m.lora_A.weight.normal_(0, 1 / math.sqrt(m.in_features))
                m.lora_B.weight.normal_(0, 0.3)
    return dit


def deltas(adapters):
    """``{module: scaling · B·A}`` in fp64 from sora_fast adapter keys."""
    out = {}
    for k in adapters:
        if k.endswith(".lora_A.weight"):
            n = k[: -len(".lora_A.weight")]
            a, b = adapters[k].double(), adapters[f"{n}.lora_B.weight"].double()
            out[n] = b @ a * float(adapters[f"{n}.lora_alpha"]) / a.shape[0]
    return out


def test_one_mapping_both_ways(wan):
    """Every linear of the DiT (attention, FFN, embedders, output head) out to each format and back: the same
    adapters (ComfyUI: bit for bit; diffusers, whose alpha is folded into B: the same update). The patch
    embedding, a Conv3d in diffusers and Wan, is refused by name."""
    dit = adapted(VideoPipeline.from_diffusers(wan[1]).dit, targets=["*"])
    with pytest.raises(KeyError, match="'patch_embed' is a Conv3d in diffusers and Wan"):
        export_lora(lora_state_dict(dit), "comfyui", dit.config)
    dit = adapted(VideoPipeline.from_diffusers(wan[1]).dit, targets=["*embed.*", "time_proj", "proj_out", "to_*",
                                                                     "ffn.*"])
    ours = {k: v.detach().clone() for k, v in lora_state_dict(dit).items()}
    names = {k.rsplit(".lora_A", 1)[0] for k in ours if ".lora_A" in k}
    assert {"proj_out", "time_proj", "text_embed.0", "blocks.1.ffn.2"} <= names
    for n in names:
        for fmt in ("diffusers", "comfyui"):
            assert module_name(module_name(n, "sora_fast", fmt), fmt, "sora_fast") == n
    back, fmt = import_lora(export_lora(ours, "comfyui", dit.config), dit.config)
    assert fmt == "comfyui" and back.keys() == ours.keys()
    assert all(torch.equal(back[k], ours[k]) for k in ours)
    back, fmt = import_lora(export_lora(ours, "diffusers", dit.config), dit.config)
    d_in, d_out = deltas(ours), deltas(back)
    assert fmt == "diffusers" and all(rel_err(d_out[n], d_in[n]) <= 4 * 2**-24 for n in d_in)


def test_diffusers_reads_both_files(wan, tmp_path):
    """diffusers' WanPipeline.lora_state_dict finds pytorch_lora_weights.safetensors in the directory, and its
    converter of original-Wan LoRAs turns comfyui.safetensors (names, lora_down / lora_up, alpha) into the same
    updates as our diffusers file; the head's rows are diffusers' order in both."""
    dit = adapted(VideoPipeline.from_diffusers(wan[1]).dit, targets=["q", "to_*", "ffn.*"])
    save_lora_files(dit, tmp_path / "lora")
    ours = load_file(tmp_path / "lora" / DIFFUSERS_FILE)
    theirs = WanPipeline.lora_state_dict(tmp_path / "lora")
    theirs = theirs[0] if isinstance(theirs, tuple) else theirs
    assert set(theirs) == set(ours) and all(torch.equal(theirs[k], ours[k]) for k in ours)
    comfy = WanPipeline.lora_state_dict(tmp_path / "lora", weight_name=COMFYUI_FILE)
    comfy = comfy[0] if isinstance(comfy, tuple) else comfy
    assert set(comfy) == set(ours)

    def update(sd, n):
        return sd[f"{n}.lora_B.weight"].double() @ sd[f"{n}.lora_A.weight"].double()

    for k in (k for k in ours if k.endswith(".lora_A.weight")):
        n = k[: -len(".lora_A.weight")]
        assert rel_err(update(comfy, n), update(ours, n)) <= 4 * 2**-24, n


def merged_diffusers(pipe, lora_dir):
    """The diffusers pipeline with our LoRA file merged into its weights by diffusers' names (W += B·A,
    scaling 1 as diffusers applies it): a reference that needs no peft."""
    sd = WanPipeline.lora_state_dict(lora_dir)
    sd = sd[0] if isinstance(sd, tuple) else sd
    ref = copy.deepcopy(pipe)
    params = dict(ref.transformer.named_parameters())
    with torch.no_grad():
        for k in (k for k in sd if k.endswith(".lora_A.weight")):
            n = k[len("transformer."): -len(".lora_A.weight")]
            w = params[f"{n}.weight"]
            w.copy_((w.double() + sd[k.replace("lora_A", "lora_B")].double() @ sd[k].double()).to(w.dtype))
    return ref


def run_diffusers(pipe, noise):
    t, h, w = SIZE
    out = pipe(prompt=PROMPT, num_frames=t, height=h, width=w, num_inference_steps=STEPS, guidance_scale=GUIDANCE,
               latents=noise[None].to(pipe.transformer.dtype), output_type="pt")
    return out.frames[0].permute(1, 0, 2, 3).double() * 2 - 1


def test_adapter_gives_diffusers_the_same_video(wan, tmp_path):
    """sora_fast with the adapter == diffusers with the adapter file merged; STYLE's rule with the merged
    diffusers pipeline in fp64 as the reference (ours at most 2x diffusers' own fp32 error + a few ulps)."""
    pipe, d = wan
    ours = VideoPipeline.from_diffusers(d)
    adapted(ours.dit)
    save_lora_files(ours.dit, tmp_path / "lora")
    seed = int(torch.randint(0, 2**31, ()))
    video = ours.generate([PROMPT], SIZE, steps=STEPS, guidance=GUIDANCE, seed=seed)[0]
    noise = torch.randn(ours.latent_shape(SIZE), generator=torch.Generator().manual_seed(seed))
    ref = merged_diffusers(pipe, tmp_path / "lora")
    d32 = run_diffusers(ref, noise)
    d64 = run_diffusers(ref.to(torch.float64), noise.double())
    base = run_diffusers(pipe, noise)
    assert rel_err(base, d64) > 1e-3                        # the adapter changes the video
    assert rel_err(video, d64) <= 2 * rel_err(d32, d64) + 4 * 2**-24, (rel_err(video, d64), rel_err(d32, d64))


def test_diffusers_load_lora_weights(wan, tmp_path):
    """WanPipeline.load_lora_weights(out/lora) itself (peft, diffusers' LoRA backend, is in the test extra)."""
    pipe, d = wan
    ours = VideoPipeline.from_diffusers(d)
    adapted(ours.dit)
    save_lora_files(ours.dit, tmp_path / "lora")
    noise = torch.randn(ours.latent_shape(SIZE), generator=torch.Generator().manual_seed(11))
    ref = merged_diffusers(pipe, tmp_path / "lora")
    with_peft = copy.deepcopy(pipe)
    with_peft.load_lora_weights(tmp_path / "lora")
    got, want = run_diffusers(with_peft, noise), run_diffusers(ref, noise)
    video = ours.generate([PROMPT], SIZE, steps=STEPS, guidance=GUIDANCE, seed=11)[0]
    # peft adds B(Ax) beside the base weight, the merged file folds it in: both are fp32 roundings of the
    # merged pipeline in fp64, so each may be off by at most 2x diffusers' own fp32 error (STYLE's rule)
    d64 = run_diffusers(ref.to(torch.float64), noise.double())
    bound = 2 * rel_err(want, d64) + 4 * 2**-24
    assert rel_err(got, d64) <= bound and rel_err(video, d64) <= bound, (rel_err(got, d64), rel_err(video, d64), bound)


def test_load_either_file_back(wan, tmp_path):
    pipe, d = wan
    src = VideoPipeline.from_diffusers(d)
    adapted(src.dit)
    save_lora_files(src.dit, tmp_path / "lora")
    want = src.generate([PROMPT], SIZE, steps=STEPS, guidance=GUIDANCE, seed=2)[0]
    for path, fmt in ((tmp_path / "lora" / COMFYUI_FILE, "comfyui"), (tmp_path / "lora", "diffusers")):
        dst = VideoPipeline.from_diffusers(d)
        assert load_lora_file(dst.dit, path) == fmt
        got = dst.generate([PROMPT], SIZE, steps=STEPS, guidance=GUIDANCE, seed=2)[0]
        if fmt == "comfyui":  # the same adapters exactly
            assert all(torch.equal(a, b) for a, b in zip(lora_state_dict(dst.dit).values(),
                                                          lora_state_dict(src.dit).values()))
            assert torch.equal(got, want)
        else:                 # alpha / rank folded into B: rounding of one multiply
            assert rel_err(got, want) <= 1e-5


def test_other_model_or_rank_is_refused(wan, tmp_path):
    _, d = wan
    src = adapted(VideoPipeline.from_diffusers(d).dit, rank=2)
    save_lora_files(src, tmp_path / "lora")
    ranked = VideoPipeline.from_diffusers(d).dit
    apply_lora(ranked, 4)
    with pytest.raises(ValueError, match="has rank 2 adapters; this DiT's LoRA layers have rank 4"):
        load_lora_file(ranked, tmp_path / "lora")
    wide = adapted(VideoDiT(DiTConfig.from_name("tiny", in_channels=4, out_channels=4, text_dim=24)))
    save_file(export_lora(lora_state_dict(wide), "comfyui", wide.config), tmp_path / "wide.safetensors")
    wrong = r"LoRA for another model: blocks.0.attn1.to_k is 24 -> 24 here, the file's adapter is 64 -> 64"
    with pytest.raises(ValueError, match=wrong):
        load_lora_file(VideoPipeline.from_diffusers(d).dit, tmp_path / "wide.safetensors")
    deep = adapted(VideoDiT(DiTConfig(**{**VideoPipeline.from_diffusers(d).dit.config.__dict__, "num_layers": 3})))
    save_file(export_lora(lora_state_dict(deep), "diffusers", deep.config), tmp_path / "deep.safetensors")
    with pytest.raises(ValueError, match=r"it adapts 'blocks.2.attn1.to_k', which this DiT \(2 blocks\) does not"):
        load_lora_file(VideoPipeline.from_diffusers(d).dit, tmp_path / "deep.safetensors")
    img = {"diffusion_model.blocks.0.cross_attn.k_img.lora_down.weight": torch.zeros(2, 24),
           "diffusion_model.blocks.0.cross_attn.k_img.lora_up.weight": torch.zeros(24, 2)}
    save_file(img, tmp_path / "i2v.safetensors")
    with pytest.raises(ValueError, match=r"'blocks.0.cross_attn.k_img' is not a comfyui name of a Wan text-to-video"):
        load_lora_file(VideoPipeline.from_diffusers(d).dit, tmp_path / "i2v.safetensors")
    save_file({"unet.down.weight": torch.zeros(2)}, tmp_path / "sd.safetensors")
    with pytest.raises(ValueError, match="not a Wan LoRA this version reads"):
        load_lora_file(VideoPipeline.from_diffusers(d).dit, tmp_path / "sd.safetensors")
