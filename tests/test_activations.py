"""``GELUTanh`` / ``gelu_tanh`` (sora_fast.models.activations): torch's tanh GELU through the sigmoid form on a CPU.

The reference is ``F.gelu(approximate="tanh")`` in fp64. Following STYLE.md, the fp32 error of our form may be
at most twice torch's own fp32 error against that reference, plus a small atol."""

import pytest
import torch
import torch.nn.functional as F
from _utils import assert_within_lowp_error
from diffusers.models.attention import FeedForward

from sora_fast.integrations.diffusers.wan import _ffn_rows
from sora_fast.models.activations import GELUTanh, gelu_tanh
from sora_fast.models.dit import VideoDiT


def seeded_generator():
    """A generator drawn from the test's fresh seed (conftest), so a failure replays."""
    return torch.Generator().manual_seed(int(torch.randint(2**31, (1,))))


SHAPES = [(1,), (17, 769), (113, 3, 5), (0, 64), (513, 1031)]   # the last: blocks of 1 MiB and a remainder


def _input(shape, gen, dtype=torch.float32, scale=3.0):
    return (torch.randn(shape, generator=gen, dtype=torch.float64) * scale).to(dtype)


def _ref(x):
    xd = x.detach().double().requires_grad_(True)
    return xd, F.gelu(xd, approximate="tanh")


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("strided", [False, True])
def test_fp32_values_and_gradient_against_fp64(shape, strided):
    gen = seeded_generator()
    x = _input(shape if not strided else (*shape[:-1], 2 * shape[-1]), gen)
    x = (x[..., ::2] if strided else x).requires_grad_(True)        # strided: every other column, not contiguous
    g = torch.randn(x.shape, generator=gen)
    xd, yd = _ref(x)
    yd.backward(g.double())
    y = gelu_tanh(x)
    y.backward(g)
    xt = x.detach().clone().requires_grad_(True)
    yt = F.gelu(xt, approximate="tanh")                              # torch's own fp32 answer
    yt.backward(g)
    assert y.dtype == torch.float32 and y.shape == x.shape
    if x.numel() == 0:
        return
    assert_within_lowp_error(y.detach(), yd.detach(), yt.detach(), atol=1e-6, msg="values")
    assert_within_lowp_error(x.grad, xd.grad, xt.grad, atol=1e-6, msg="gradient")


def test_fp64_against_the_tanh_form():
    gen = seeded_generator()
    x = _input((300, 1001), gen, torch.float64).requires_grad_(True)         # 3 blocks of 1 MiB
    xd, yd = _ref(x)
    torch.testing.assert_close(gelu_tanh(x), yd, atol=1e-13, rtol=1e-12)
    (gx,) = torch.autograd.grad(gelu_tanh(x).sum(), x)
    (gd,) = torch.autograd.grad(yd.sum(), xd)
    torch.testing.assert_close(gx, gd, atol=1e-13, rtol=1e-12)


def test_special_values_as_torch():
    x = torch.tensor([float("-inf"), float("inf"), float("nan"), -1e20, 1e20, -30.0, 0.0, -0.0, 30.0])
    torch.testing.assert_close(gelu_tanh(x), F.gelu(x, approximate="tanh"), equal_nan=True, atol=0, rtol=0)


def test_no_grad_and_grad_give_the_same_values():
    x = _input((33, 65), seeded_generator())
    with torch.no_grad():
        a = gelu_tanh(x)
    b = gelu_tanh(x.clone().requires_grad_(True))
    assert torch.equal(a, b.detach())


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_other_dtypes_take_torch_gelu(dtype):
    x = _input((9, 31), seeded_generator(), dtype)
    assert torch.equal(gelu_tanh(x), F.gelu(x, approximate="tanh"))


def test_module_is_a_tanh_gelu_without_state():
    m = GELUTanh()
    assert isinstance(m, torch.nn.GELU) and m.approximate == "tanh" and not m.state_dict()
    dit = VideoDiT.from_name("tiny")
    assert isinstance(dit.blocks[0].ffn[1], GELUTanh) and isinstance(dit.text_embed[1], GELUTanh)
    assert not any("ffn.1" in k or "text_embed.1" in k for k in dit.state_dict())


def test_diffusers_feed_forward_rows_match_diffusers():
    gen = seeded_generator()
    ffn = FeedForward(48, dim_out=48, mult=3, activation_fn="gelu-approximate").eval()
    x = torch.randn(77, 48, generator=gen, dtype=torch.float64)
    rows = _ffn_rows(ffn)
    assert rows is not ffn
    with torch.no_grad():
        ref = ffn.double()(x)                                     # diffusers' own FFN in fp64
        out = _ffn_rows(ffn.float())(x.float())
        plain = ffn(x.float())                                    # diffusers' fp32 answer
    assert_within_lowp_error(out, ref, plain, atol=1e-6)
    exact = FeedForward(48, dim_out=48, mult=3, activation_fn="gelu")
    assert _ffn_rows(exact) is exact                              # erf GELU: left as diffusers wrote it
