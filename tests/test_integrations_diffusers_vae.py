"""accelerate() on diffusers' Wan VAE (2.1 and 2.2 layouts) against the same model before acceleration, on the
torch backend and the kernel backends; undo() bit for bit."""
import _diffusers_utils
import pytest
import torch
from _diffusers_utils import FP32_REL, VAE21, VAE22, assert_same_state, state, tiny_vae, vae_round_trip
from test_dit import rel_err

from sora_fast.integrations.diffusers import accelerate

calls, kernels = _diffusers_utils.calls, _diffusers_utils.kernels  # the shared fixtures


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
