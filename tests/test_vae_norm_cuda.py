"""The CUDA C++ VAE norm + SiLU kernels (kernels/vae_norm.cuh) on CPU tensors through the host
emulation, against the fp32 references, in contiguous and channels_last_3d layouts. Their backward
is the reference VJP for now (see sora_fast/ops/_cuda.py); the autograd wiring is tested here."""
import pytest
import torch

import sora_fast.ops as O
from sora_fast import _ext
from sora_fast.ops import _cuda

from _utils import assert_close

pytestmark = pytest.mark.skipif(not _ext.build_info().get("emulation", False),
                                reason="sora_fast._C was built without the host emulation")


@pytest.fixture(autouse=True)
def poison(monkeypatch):
    monkeypatch.setattr(_cuda, "POISON_OUTPUTS", True)


def _x(shape, dtype, layout):
    x = (torch.randn(shape) * 3 + 1).to(dtype)
    return x.contiguous(memory_format=torch.channels_last_3d) if layout == "cl" else x


CASES = [((2, 8, 3, 5, 7), 4), ((1, 6, 1, 4, 3), 3), ((1, 8, 4, 16, 16), 2)]  # last: > 4096 per group, 2 chunks


@pytest.mark.parametrize("layout", ["contiguous", "cl"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16], ids=str)
@pytest.mark.parametrize("shape,groups", CASES, ids=["B2", "1frame", "2chunks"])
def test_group_norm_silu_forward(layout, dtype, shape, groups):
    x = _x(shape, dtype, layout)
    c = shape[1]
    w, b = torch.randn(c), torch.randn(c)
    silu = shape[0] != 1 or groups != 3
    got = O.group_norm_silu(x, groups, w, b, silu=silu, backend="cuda")
    ref = O.group_norm_silu_ref(x, groups, w, b, silu=silu)
    assert got.is_contiguous(memory_format=torch.channels_last_3d if layout == "cl" else torch.contiguous_format)
    assert_close(got, ref, dtype)


@pytest.mark.parametrize("layout", ["contiguous", "cl"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16], ids=str)
@pytest.mark.parametrize("shape", [(2, 8, 3, 5, 7), (1, 12, 1, 4, 3)], ids=["B2", "1frame"])
def test_channel_rms_norm_silu_forward(layout, dtype, shape):
    x = _x(shape, dtype, layout)
    c = shape[1]
    w = torch.randn(c).to(dtype if dtype != torch.float32 and shape[0] == 2 else torch.float32)
    b = torch.randn(c) if shape[0] == 2 else None
    got = O.channel_rms_norm_silu(x, w, b, backend="cuda")
    ref = O.channel_rms_norm_silu_ref(x, w, b)
    assert got.is_contiguous(memory_format=torch.channels_last_3d if layout == "cl" else torch.contiguous_format)
    assert_close(got, ref, dtype)


def test_gradients_flow_through_the_reference_backward():
    x = _x((1, 4, 2, 3, 3), torch.float32, "cl").requires_grad_(True)
    w, b = torch.randn(4, requires_grad=True), torch.randn(4, requires_grad=True)
    xr, wr, br = (t.detach().clone().requires_grad_(True) for t in (x, w, b))
    g = torch.randn(x.shape)
    O.group_norm_silu(x, 2, w, b, backend="cuda").backward(g)
    O.group_norm_silu_ref(xr, 2, wr, br).backward(g)
    for a, r in ((x, xr), (w, wr), (b, br)):
        assert_close(a.grad, r.grad, torch.float32)
    x2, w2 = x.detach().clone().requires_grad_(True), w.detach().clone().requires_grad_(True)
    x2r, w2r = x.detach().clone().requires_grad_(True), w.detach().clone().requires_grad_(True)
    O.channel_rms_norm_silu(x2, w2, backend="cuda").backward(g)
    O.channel_rms_norm_silu_ref(x2r, w2r).backward(g)
    assert_close(x2.grad, x2r.grad, torch.float32)
    assert_close(w2.grad, w2r.grad, torch.float32)


def test_strided_input_and_bad_dtype():
    x = torch.randn(1, 4, 2, 6, 3)[..., ::2, :]  # neither layout: copied to contiguous first
    w = torch.randn(4)
    assert_close(O.channel_rms_norm_silu(x, w, backend="cuda"), O.channel_rms_norm_silu_ref(x, w))
    with pytest.raises(ValueError, match="float32, float16 or bfloat16, got float64"):
        O.group_norm_silu(x.double(), 2, backend="cuda")
