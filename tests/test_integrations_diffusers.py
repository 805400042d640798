"""accelerate() on pipelines and models: a WanPipeline built from components (every supported component
patched, the others listed); every bad input and missing diffusers hook, each leaving the model untouched;
rollback of a failed patch; undo() refusing to drop a later patch; the lazy public API. The per-family
tests are in test_integrations_diffusers_{wan,vae,backend}.py."""
import subprocess
import sys

import _diffusers_utils
import pytest
import torch
from _diffusers_utils import FP32_REL, VAE21, assert_same_state, state, tiny_ltx, tiny_vae, tiny_wan, tiny_wan_pipeline
from diffusers import AutoencoderKL
from diffusers.models import attention_dispatch
from test_dit import rel_err

import sora_fast
from sora_fast.integrations import diffusers as integ
from sora_fast.integrations.diffusers import DiffusersHooksError, accelerate, wan_packed_forward, wan_vae

calls, kernels = _diffusers_utils.calls, _diffusers_utils.kernels  # the shared fixtures


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
    original = wan_vae._NormForward

    def failing(*a):
        count[0] += 1
        if count[0] == 5:
            raise RuntimeError("boom")
        return original(*a)

    monkeypatch.setattr(wan_vae, "_NormForward", failing)
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
