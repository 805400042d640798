"""Tests for sora_fast.ops.vae_norm: group_norm_silu against F.group_norm + F.silu, channel_rms_norm_silu
against Wan-VAE's RMS_norm (F.normalize over channels * sqrt(C) * gamma + bias) + SiLU, in both memory
formats and all dtypes, gradients, the modules, backends and every validation error."""
import random

import pytest
import torch
import torch.nn.functional as F
from _utils import assert_close, assert_within_lowp_error

from sora_fast.ops import (
    BackendUnavailableError,
    ChannelRMSNormSiLU,
    GroupNormSiLU,
    channel_rms_norm_silu,
    group_norm_silu,
    registered_backends,
)

CL = torch.channels_last_3d
GROUPS = [(3, 1), (3, 3), (32, 8), (96, 32)]  # (C, num_groups)
AFFINES = ["both", "none", "weight", "bias"]


# ----------------------------------------------------------------------------------------------
# independent references, fp64


def ref_group_norm_silu(x, num_groups, weight=None, bias=None, eps=1e-6, silu=True):
    d = lambda t: None if t is None else t.double()  # noqa: E731
    y = F.group_norm(x.double(), num_groups, d(weight), d(bias), eps)
    return F.silu(y) if silu else y


class WanRMSNorm(torch.nn.Module):
    """Wan-VAE's RMS_norm (channel_first, images=False), as in the Wan2.1 repository, then SiLU."""

    def __init__(self, dim, bias=False):
        super().__init__()
        self.scale = dim ** 0.5
        self.gamma = torch.nn.Parameter(torch.ones(dim, 1, 1, 1))
        self.bias = torch.nn.Parameter(torch.zeros(dim, 1, 1, 1)) if bias else 0.0

    def forward(self, x):
        return F.normalize(x, dim=1) * self.scale * self.gamma + self.bias


def ref_channel_rms_norm_silu(x, weight, bias=None, eps=1e-12, silu=True):
    c = x.shape[1]
    y = F.normalize(x.double(), dim=1, eps=eps) * c ** 0.5 * weight.double().view(c, 1, 1, 1)
    if bias is not None:
        y = y + bias.double().view(c, 1, 1, 1)
    return F.silu(y) if silu else y


# ----------------------------------------------------------------------------------------------
# inputs


def rand_x(c, shape=None, dtype=torch.float32, fmt="contiguous"):
    b, t, h, w = shape or (random.randint(1, 2), random.choice([1, 1, 2, 3]), random.choice([1, 3, 5]),
                           random.choice([3, 7]))
    x = (torch.randn(b, c, 1, 1, 1) + (0.5 + torch.rand(b, c, 1, 1, 1)) * torch.randn(b, c, t, h, w)).to(dtype)
    return x.to(memory_format=CL) if fmt == "channels_last" else x


def affine(kind, c, dtype=torch.float32):
    weight = (1 + 0.3 * torch.randn(c)).to(dtype) if kind in ("both", "weight") else None
    bias = (0.3 * torch.randn(c)).to(dtype) if kind in ("both", "bias") else None
    return weight, bias


def check_format(out, x):
    assert out.shape == x.shape and out.dtype == x.dtype
    if x.is_contiguous():
        assert out.is_contiguous()
    else:
        assert out.is_contiguous(memory_format=CL) and not out.is_contiguous()


# ----------------------------------------------------------------------------------------------
# group_norm_silu


@pytest.mark.parametrize("silu", [True, False])
@pytest.mark.parametrize("aff", AFFINES)
@pytest.mark.parametrize("c,g", GROUPS, ids=str)
def test_group_norm_silu_fp32(c, g, aff, silu):
    for fmt in ("contiguous", "channels_last"):
        x = rand_x(c, fmt=fmt)
        weight, bias = affine(aff, c)
        eps = random.choice([1e-6, 1e-5, 0.5])  # 0.5: the eps must reach the variance
        out = group_norm_silu(x, g, weight, bias, eps=eps, silu=silu)
        check_format(out, x)
        assert_close(out, ref_group_norm_silu(x, g, weight, bias, eps, silu), torch.float32, msg=f"{fmt}, eps={eps}")


def test_group_norm_formats_agree_and_t1():
    x = rand_x(32, (2, 1, 5, 7))  # a single frame
    weight, bias = affine("both", 32)
    a = group_norm_silu(x, 8, weight, bias)
    b = group_norm_silu(x.to(memory_format=CL), 8, weight, bias)
    assert b.is_contiguous(memory_format=CL)
    assert_close(b, a, torch.float32)


def test_group_norm_tiny_groups():
    """Groups of 2 and of 1 element: biased variance (a group of one normalizes to 0, not NaN)."""
    x = torch.randn(2, 4, 1, 1, 2)
    assert_close(group_norm_silu(x, 4, silu=False), ref_group_norm_silu(x, 4, silu=False), torch.float32)
    x1 = torch.randn(1, 3, 1, 1, 1)
    weight, bias = affine("both", 3)
    out = group_norm_silu(x1, 3, weight, bias)
    assert torch.isfinite(out).all()
    assert_close(out, F.silu(bias).view(1, 3, 1, 1, 1), torch.float32)


def test_group_norm_non_contiguous():
    x = torch.randn(2, 8, 3, 6, 5).transpose(3, 4)  # neither contiguous nor channels_last
    weight, bias = affine("both", 8)
    out = group_norm_silu(x, 4, weight, bias)
    assert_close(out, ref_group_norm_silu(x, 4, weight, bias), torch.float32)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("fmt", ["contiguous", "channels_last"])
@pytest.mark.parametrize("c,g", [(32, 8), (96, 32)], ids=str)
def test_group_norm_silu_low_precision(dtype, fmt, c, g):
    x = rand_x(c, (2, 3, 5, 7), dtype, fmt)
    weight, bias = affine("both", c)  # fp32 parameters with low-precision activations
    out = group_norm_silu(x, g, weight, bias)
    check_format(out, x)
    ref = ref_group_norm_silu(x, g, weight, bias)
    assert_close(out, ref, dtype)
    peer = F.silu(F.group_norm(x, g, weight.to(dtype), bias.to(dtype), 1e-6))
    assert_within_lowp_error(out, ref, peer)
    # parameters in the activation dtype too
    out2 = group_norm_silu(x, g, weight.to(dtype), bias.to(dtype))
    assert_close(out2, ref_group_norm_silu(x, g, weight.to(dtype), bias.to(dtype)), dtype)


# ----------------------------------------------------------------------------------------------
# channel_rms_norm_silu


@pytest.mark.parametrize("fmt", ["contiguous", "channels_last"])
@pytest.mark.parametrize("silu", [True, False])
@pytest.mark.parametrize("with_bias", [True, False])
@pytest.mark.parametrize("c", [3, 32, 96])
def test_channel_rms_norm_silu_fp32(c, with_bias, silu, fmt):
    x = rand_x(c, fmt=fmt)
    weight, bias = affine("both" if with_bias else "weight", c)
    out = channel_rms_norm_silu(x, weight, bias, silu=silu)
    check_format(out, x)
    assert_close(out, ref_channel_rms_norm_silu(x, weight, bias, silu=silu), torch.float32)


@pytest.mark.parametrize("with_bias", [True, False])
def test_channel_rms_matches_wan_module(with_bias):
    c = 32
    wan = WanRMSNorm(c, bias=with_bias).double()
    with torch.no_grad():
        for p in wan.parameters():
            p.copy_(torch.randn_like(p))
    x = rand_x(c, (1, 2, 3, 5))
    want = F.silu(wan(x.double()))
    weight = wan.gamma.detach().flatten().float()
    bias = wan.bias.detach().flatten().float() if with_bias else None
    assert_close(channel_rms_norm_silu(x, weight, bias), want, torch.float32)
    mod = ChannelRMSNormSiLU(c, bias=with_bias)
    with torch.no_grad():
        mod.weight.copy_(weight)
        if with_bias:
            mod.bias.copy_(bias)
    assert_close(mod(x.to(memory_format=CL)), want, torch.float32)


def test_channel_rms_zero_vectors_and_eps():
    """F.normalize divides by max(||x||, eps): an all-zero channel vector gives bias (no NaN), and a custom
    eps larger than the norm is honoured."""
    c = 8
    x = torch.randn(1, c, 2, 3, 3)
    x[:, :, 0, 1, 2] = 0
    x[:, :, 1, 0, 0] = 1e-4
    weight, bias = affine("both", c)
    out = channel_rms_norm_silu(x, weight, bias, silu=False)
    assert torch.isfinite(out).all()
    assert_close(out[0, :, 0, 1, 2], bias, torch.float32)
    assert_close(out, ref_channel_rms_norm_silu(x, weight, bias, silu=False), torch.float32)
    out_eps = channel_rms_norm_silu(x, weight, bias, eps=1e-2, silu=False)
    assert_close(out_eps, ref_channel_rms_norm_silu(x, weight, bias, eps=1e-2, silu=False), torch.float32)
    assert not torch.allclose(out_eps[0, :, 1, 0, 0], out[0, :, 1, 0, 0])


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("fmt", ["contiguous", "channels_last"])
@pytest.mark.parametrize("c", [3, 96])
def test_channel_rms_norm_silu_low_precision(dtype, fmt, c):
    x = rand_x(c, (2, 3, 5, 7), dtype, fmt)
    weight, bias = affine("both", c)
    out = channel_rms_norm_silu(x, weight, bias)
    check_format(out, x)
    assert_close(out, ref_channel_rms_norm_silu(x, weight, bias), dtype)
    out2 = channel_rms_norm_silu(x, weight.to(dtype), bias.to(dtype))
    assert_close(out2, ref_channel_rms_norm_silu(x, weight.to(dtype), bias.to(dtype)), dtype)


def test_fp64_stays_fp64():
    x = rand_x(6, (1, 2, 3, 3), torch.float64)
    w, b = affine("both", 6, torch.float64)
    assert_close(group_norm_silu(x, 3, w, b), ref_group_norm_silu(x, 3, w, b), torch.float64)
    assert_close(channel_rms_norm_silu(x, w, b), ref_channel_rms_norm_silu(x, w, b), torch.float64)


# ----------------------------------------------------------------------------------------------
# gradients


@pytest.mark.parametrize("fmt", ["contiguous", "channels_last"])
@pytest.mark.parametrize("silu", [True, False])
def test_gradcheck(silu, fmt):
    x = rand_x(4, (1, 2, 2, 3), torch.float64, fmt).requires_grad_()
    w, b = (t.requires_grad_() for t in affine("both", 4, torch.float64))
    assert torch.autograd.gradcheck(lambda x, w, b: group_norm_silu(x, 2, w, b, silu=silu), (x, w, b))
    assert torch.autograd.gradcheck(lambda x, w, b: channel_rms_norm_silu(x, w, b, silu=silu), (x, w, b))


@pytest.mark.parametrize("aff", ["both", "none", "weight"])
@pytest.mark.parametrize("fmt", ["contiguous", "channels_last"])
def test_fp32_grads(aff, fmt):
    c, g = 32, 8
    x = rand_x(c, (2, 2, 3, 5), fmt=fmt).requires_grad_()
    w, b = affine(aff, c)
    leaves = [x] + [t.requires_grad_() for t in (w, b) if t is not None]
    dy = torch.randn(x.shape)
    got = torch.autograd.grad(group_norm_silu(x, g, w, b), leaves, dy)
    ref_leaves = [t.detach().double().requires_grad_() for t in leaves]
    rw = ref_leaves[1] if w is not None else None
    rb = ref_leaves[-1] if b is not None else None
    want = torch.autograd.grad(ref_group_norm_silu(ref_leaves[0], g, rw, rb), ref_leaves, dy.double())
    for gt, wt in zip(got, want):
        assert_close(gt, wt, torch.float32)
    if w is not None:
        got = torch.autograd.grad(channel_rms_norm_silu(x, w, b), leaves, dy)
        want = torch.autograd.grad(ref_channel_rms_norm_silu(ref_leaves[0], rw, rb), ref_leaves, dy.double())
        for gt, wt in zip(got, want):
            assert_close(gt, wt, torch.float32)


def test_opcheck():
    x = rand_x(6, (1, 2, 3, 3)).requires_grad_()
    w, b = (t.requires_grad_() for t in affine("both", 6))
    tests = ("test_schema", "test_autograd_registration", "test_faketensor")
    torch.library.opcheck(torch.ops.sora_fast.group_norm_silu.default, (x, 3, w, b, 1e-6, True, "torch"),
                          test_utils=tests)
    torch.library.opcheck(torch.ops.sora_fast.channel_rms_norm_silu.default,
                          (x.detach().to(memory_format=CL), w, None, 1e-12, False, "torch"), test_utils=tests)


# ----------------------------------------------------------------------------------------------
# modules


@pytest.mark.parametrize("affine_", [True, False])
def test_group_norm_module(affine_):
    mod = GroupNormSiLU(8, 32, eps=1e-5, affine=affine_)
    assert (mod.weight is not None) == affine_ and (mod.bias is not None) == affine_
    if affine_:
        with torch.no_grad():
            mod.weight.normal_()
            mod.bias.normal_()
    x = rand_x(32)
    ref = F.silu(F.group_norm(x.double(), 8, None if mod.weight is None else mod.weight.double(),
                              None if mod.bias is None else mod.bias.double(), 1e-5))
    out = mod(x)
    assert_close(out, ref, torch.float32)
    # against torch's own modules, default initialisation
    torch_mod = torch.nn.Sequential(torch.nn.GroupNorm(8, 32, eps=1e-5, affine=affine_), torch.nn.SiLU())
    if affine_:
        torch_mod[0].load_state_dict({"weight": mod.weight, "bias": mod.bias})
    assert_close(out, torch_mod(x), torch.float32)
    no_silu = GroupNormSiLU(8, 32, silu=False, affine=affine_)
    assert_close(no_silu(x), ref_group_norm_silu(x, 8, no_silu.weight, no_silu.bias, 1e-6, silu=False),
                 torch.float32)
    if affine_:
        out.sum().backward()
        assert mod.weight.grad is not None and mod.bias.grad is not None


def test_channel_rms_module():
    mod = ChannelRMSNormSiLU(16, bias=True, silu=False)
    with torch.no_grad():
        mod.weight.normal_()
        mod.bias.normal_()
    x = rand_x(16, fmt="channels_last")
    out = mod(x)
    check_format(out, x)
    assert_close(out, ref_channel_rms_norm_silu(x, mod.weight, mod.bias, silu=False), torch.float32)
    out.square().sum().backward()
    assert mod.weight.grad is not None and mod.bias.grad is not None
    assert ChannelRMSNormSiLU(16).bias is None


def test_group_norm_module_validation():
    with pytest.raises(ValueError, match=r"num_groups must be a positive int dividing num_channels \(32\), got 5"):
        GroupNormSiLU(5, 32)
    with pytest.raises(ValueError, match=r"num_groups must be a positive int dividing num_channels \(32\), got 0"):
        GroupNormSiLU(0, 32)


# ----------------------------------------------------------------------------------------------
# backends


@pytest.mark.parametrize("backend", ["cuda", "triton"])
def test_kernel_backends(backend):
    """No kernel registered: BackendUnavailableError naming op and backend. A registered one (the cuda
    kernels run on CPU through the host emulation) must agree with the independent reference, in both
    memory formats, or say why it cannot run (never a silent fallback)."""
    w, b = affine("both", 8)
    for fmt in ("contiguous", "channels_last"):
        x = rand_x(8, (1, 2, 3, 5), fmt=fmt)
        calls = {"group_norm_silu": (lambda: group_norm_silu(x, 4, w, b, backend=backend),
                                     lambda: ref_group_norm_silu(x, 4, w, b)),
                 "channel_rms_norm_silu": (lambda: channel_rms_norm_silu(x, w, b, backend=backend),
                                           lambda: ref_channel_rms_norm_silu(x, w, b))}
        for op, (run, ref) in calls.items():
            if backend not in registered_backends(op):
                with pytest.raises(BackendUnavailableError, match=rf"the {backend} backend of {op} cannot run: "
                                                                  rf"no {backend} kernel is registered for {op}"):
                    run()
                continue
            try:
                out = run()
            except BackendUnavailableError as e:
                assert f"the {backend} backend of {op} cannot run" in str(e)
                continue
            check_format(out, x)
            assert_close(out, ref(), torch.float32, msg=f"{op} backend={backend} {fmt}")


# ----------------------------------------------------------------------------------------------
# validation


BAD_GN = [
    ("groups_not_dividing", dict(num_groups=5), ValueError,
     r"num_groups must be a positive int dividing the 6 channels, got 5"),
    ("groups_zero", dict(num_groups=0), ValueError,
     r"num_groups must be a positive int dividing the 6 channels, got 0"),
    ("groups_bool", dict(num_groups=True), ValueError, r"num_groups must be .* got True"),
    ("groups_float", dict(num_groups=2.0), ValueError, r"num_groups must be .* got 2.0"),
    ("weight_shape", dict(weight=torch.ones(5)), ValueError, r"weight must have shape \(6,?\), got \(5,?\)"),
    ("weight_2d", dict(weight=torch.ones(6, 1)), ValueError, r"weight must be a 1-D tensor \(C,\), got shape \(6, 1\)"),
    ("bias_shape", dict(bias=torch.zeros(7)), ValueError, r"bias must have shape \(6,?\), got \(7,?\)"),
    ("bias_int", dict(bias=torch.zeros(6, dtype=torch.int64)), ValueError, r"bias must have dtype in .*got int64"),
    ("eps_zero", dict(eps=0.0), ValueError, r"eps must be a positive number, got 0.0"),
    ("eps_negative", dict(eps=-1), ValueError, r"eps must be a positive number, got -1"),
    ("eps_none", dict(eps=None), ValueError, r"eps must be a positive number, got None"),
    ("silu_int", dict(silu=1), TypeError, r"silu must be a bool, got int"),
    ("silu_str", dict(silu="yes"), TypeError, r"silu must be a bool, got str"),
    ("x_4d", dict(x=torch.randn(1, 6, 4, 4)), ValueError,
     r"x must be a 5-D tensor \(B, C, T, H, W\), got shape \(1, 6, 4, 4\)"),
    ("x_not_tensor", dict(x=1.0), TypeError, r"x must be a torch.Tensor, got float"),
]


@pytest.mark.parametrize("bad,exc,match", [c[1:] for c in BAD_GN], ids=[c[0] for c in BAD_GN])
def test_group_norm_silu_validation(bad, exc, match):
    kw = {"x": torch.randn(1, 6, 2, 3, 3), "num_groups": 3, "weight": torch.ones(6), "bias": torch.zeros(6), **bad}
    x, g, w, b = (kw.pop(k) for k in ("x", "num_groups", "weight", "bias"))
    with pytest.raises(exc, match=match):
        group_norm_silu(x, g, w, b, **kw)


BAD_RMS = [
    ("weight_none", dict(weight=None), TypeError, r"weight must be a \(C,\) tensor, got None"),
    ("weight_shape", dict(weight=torch.ones(4)), ValueError, r"weight must have shape \(6,?\), got \(4,?\)"),
    ("weight_not_tensor", dict(weight=1.0), TypeError, r"weight must be a torch.Tensor, got float"),
    ("bias_shape", dict(bias=torch.zeros(1)), ValueError, r"bias must have shape \(6,?\), got \(1,?\)"),
    ("eps_negative", dict(eps=-1e-12), ValueError, r"eps must be a positive number, got -1e-12"),
    ("eps_bool", dict(eps=True), ValueError, r"eps must be a positive number, got True"),
    ("silu_none", dict(silu=None), TypeError, r"silu must be a bool, got NoneType"),
    ("x_int", dict(x=torch.zeros(1, 6, 2, 3, 3, dtype=torch.int32)), ValueError, r"x must have dtype in .*got int32"),
    ("x_2d", dict(x=torch.randn(6, 3)), ValueError, r"x must be a 5-D tensor"),
]


@pytest.mark.parametrize("bad,exc,match", [c[1:] for c in BAD_RMS], ids=[c[0] for c in BAD_RMS])
def test_channel_rms_norm_silu_validation(bad, exc, match):
    kw = {"x": torch.randn(1, 6, 2, 3, 3), "weight": torch.ones(6), "bias": None, **bad}
    x, w, b = (kw.pop(k) for k in ("x", "weight", "bias"))
    with pytest.raises(exc, match=match):
        channel_rms_norm_silu(x, w, b, **kw)
