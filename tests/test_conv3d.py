"""Tests for sora_fast.ops.conv3d: causal_conv3d against independent fp64 references (explicit F.pad +
F.conv3d, and a loop over kernel offsets), memory formats, chunk-by-chunk streaming with the frame cache,
low precision, gradients, the CausalConv3d module, backends and every validation error."""
import math
import random

import pytest
import torch
import torch.nn.functional as F
from _utils import assert_close

from sora_fast.ops import (
    BackendUnavailableError,
    CausalConv3d,
    causal_conv3d,
    causal_conv3d_next_cache,
    causal_conv3d_output_shape,
    registered_backends,
)
from sora_fast.ops.conv3d import causal_conv3d_pack_weight

KERNELS = [(3, 3, 3), (3, 1, 1), (1, 3, 3), (1, 1, 1)]
STRIDES = [1, 2, (2, 1, 1), (1, 2, 2), (1, 2, 1), (1, 1, 2)]
CL = torch.channels_last_3d


def triple(v):
    return (v,) * 3 if isinstance(v, int) else tuple(v)


# ----------------------------------------------------------------------------------------------
# independent references, fp64


def ref_padded_stream(x, kt, ph, pw, pad_mode, cache=None):
    """[kt-1-f front frames, cache (f frames), x], spatially zero padded, built with F.pad / torch.cat."""
    src = x.double() if cache is None else torch.cat([cache.double(), x.double()], dim=2)
    missing = kt - 1 - (0 if cache is None else cache.shape[2])
    assert missing >= 0
    if pad_mode == "zeros":
        return F.pad(src, (pw, pw, ph, ph, missing, 0))  # constant zeros; time only in front
    first = src[:, :, :1]
    return F.pad(torch.cat([first] * missing + [src], dim=2), (pw, pw, ph, ph, 0, 0))


def ref_conv(x, weight, bias=None, stride=1, padding=None, pad_mode="zeros", cache=None, residual=None):
    kt, kh, kw = weight.shape[2:]
    if padding is None:
        padding = (kh // 2, kw // 2)
    ph, pw = (padding, padding) if isinstance(padding, int) else padding
    xp = ref_padded_stream(x, kt, ph, pw, pad_mode, cache)
    out = F.conv3d(xp, weight.double(), None if bias is None else bias.double(), stride=triple(stride))
    return out if residual is None else out + residual.double()


def loop_conv(x, weight, bias=None, stride=1, padding=None, pad_mode="zeros", cache=None):
    """Sum over kernel offsets of a channel contraction of strided slices: no conv routine at all."""
    kt, kh, kw = weight.shape[2:]
    st, sh, sw = triple(stride)
    ph, pw = (kh // 2, kw // 2) if padding is None else tuple(padding)
    xp = ref_padded_stream(x, kt, ph, pw, pad_mode, cache)
    tp, hp, wp = xp.shape[2:]
    to, ho, wo = (tp - kt) // st + 1, (hp - kh) // sh + 1, (wp - kw) // sw + 1
    w = weight.double()
    out = torch.zeros(x.shape[0], w.shape[0], to, ho, wo, dtype=torch.float64)
    for a in range(kt):
        for b in range(kh):
            for c in range(kw):
                patch = xp[:, :, a:a + st * (to - 1) + 1:st, b:b + sh * (ho - 1) + 1:sh, c:c + sw * (wo - 1) + 1:sw]
                out += torch.einsum("oi,nithw->nothw", w[:, :, a, b, c], patch)
    if bias is not None:
        out += bias.double().view(1, -1, 1, 1, 1)
    return out


# ----------------------------------------------------------------------------------------------
# inputs


def rand_weight(cout, cin, k, dtype=torch.float32):
    return (torch.randn(cout, cin, *k) / math.sqrt(cin * k[0] * k[1] * k[2])).to(dtype)


def random_case(kernel, stride, dtype=torch.float32):
    """Fresh random awkward shapes: T often 1, odd H/W, channels 3/5/7, random padding, bias, residual."""
    kt, kh, kw = kernel
    b, cin, cout = random.randint(1, 2), random.choice([3, 5, 7]), random.choice([3, 5, 7, 16])
    t = random.choice([1, 1, 2, 3, 5, 6])
    h, w = random.choice([1, 3, 5, 7, 9]), random.choice([1, 3, 5, 7, 11])
    padding = None
    if random.random() < 0.5:
        while True:
            padding = (random.randint(0, 2), random.randint(0, 2))
            if h + 2 * padding[0] >= kh and w + 2 * padding[1] >= kw:
                break
    x = torch.randn(b, cin, t, h, w).to(dtype)
    weight = rand_weight(cout, cin, kernel, dtype)
    bias = (0.5 * torch.randn(cout)).to(dtype) if random.random() < 0.7 else None
    pad = (kh // 2, kw // 2) if padding is None else padding
    out_shape = causal_conv3d_output_shape(x.shape, weight.shape, triple(stride), pad)
    residual = torch.randn(out_shape).to(dtype) if random.random() < 0.5 else None
    return x, weight, bias, padding, residual


# ----------------------------------------------------------------------------------------------
# forward against the references


@pytest.mark.parametrize("pad_mode", ["zeros", "replicate"])
@pytest.mark.parametrize("stride", STRIDES, ids=str)
@pytest.mark.parametrize("kernel", KERNELS, ids=str)
def test_forward_fp32(kernel, stride, pad_mode):
    x, weight, bias, padding, residual = random_case(kernel, stride)
    out = causal_conv3d(x, weight, bias, stride=stride, padding=padding, pad_mode=pad_mode, residual=residual)
    ref = ref_conv(x, weight, bias, stride, padding, pad_mode, residual=residual)
    assert out.dtype == x.dtype and out.is_contiguous()
    assert out.shape == ref.shape
    assert_close(out, ref, torch.float32)


@pytest.mark.parametrize("case", [
    dict(kernel=(3, 3, 3), stride=(2, 2, 1), pad_mode="replicate", padding=None, t=5),
    dict(kernel=(3, 1, 1), stride=1, pad_mode="zeros", padding=(1, 0), t=4),
    dict(kernel=(2, 3, 2), stride=(1, 1, 2), pad_mode="replicate", padding=(0, 1), t=3),
], ids=["333_s221_rep", "311_zeros_pad10", "232_s112_rep"])
def test_forward_vs_offset_loop(case):
    """A second, conv-free reference (also validates the F.conv3d one)."""
    cin, cout = 5, 7
    x = torch.randn(2, cin, case["t"], 5, 7)
    weight, bias = rand_weight(cout, cin, case["kernel"]), torch.randn(cout)
    kw = dict(stride=case["stride"], padding=case["padding"], pad_mode=case["pad_mode"])
    loop = loop_conv(x, weight, bias, **kw)
    assert_close(ref_conv(x, weight, bias, **kw), loop, torch.float64)
    assert_close(causal_conv3d(x, weight, bias, **kw), loop, torch.float32)


def test_replicate_pads_with_the_first_frame():
    """Direct statement of the two pad modes on a T=1 clip with a time-only kernel."""
    x = torch.randn(1, 3, 1, 4, 5)
    weight = rand_weight(2, 3, (3, 1, 1))
    zeros = causal_conv3d(x, weight, pad_mode="zeros")
    rep = causal_conv3d(x, weight, pad_mode="replicate")
    last_tap = torch.einsum("oi,nithw->nothw", weight[:, :, 2, 0, 0].double(), x.double())
    all_taps = torch.einsum("oi,nithw->nothw", weight.sum(dim=2)[:, :, 0, 0].double(), x.double())
    assert_close(zeros, last_tap, torch.float32)
    assert_close(rep, all_taps, torch.float32)


def test_output_shape_helper():
    for _ in range(20):
        kernel, stride = random.choice(KERNELS), triple(random.choice(STRIDES))
        x, weight, bias, padding, _ = random_case(kernel, stride)
        pad = (kernel[1] // 2, kernel[2] // 2) if padding is None else padding
        ref = ref_conv(x, weight, bias, stride, pad)
        assert causal_conv3d_output_shape(x.shape, weight.shape, stride, pad) == tuple(ref.shape)


@pytest.mark.parametrize("pad_mode", ["zeros", "replicate"])
@pytest.mark.parametrize("kernel,stride", [((3, 3, 3), 1), ((3, 3, 3), (2, 2, 2)), ((1, 3, 3), (1, 2, 2)),
                                           ((3, 1, 1), (2, 1, 1))], ids=str)
def test_channels_last_3d(kernel, stride, pad_mode):
    x = torch.randn(2, 5, 3, 7, 9)
    weight, bias = rand_weight(6, 5, kernel), torch.randn(6)
    out_shape = causal_conv3d_output_shape(x.shape, weight.shape, triple(stride), (kernel[1] // 2, kernel[2] // 2))
    residual = torch.randn(out_shape)
    x_cl, res_cl = x.to(memory_format=CL), residual.to(memory_format=CL)
    assert not x_cl.is_contiguous()
    out_cl = causal_conv3d(x_cl, weight, bias, stride=stride, pad_mode=pad_mode, residual=res_cl)
    out = causal_conv3d(x, weight, bias, stride=stride, pad_mode=pad_mode, residual=residual)
    assert out_cl.is_contiguous(memory_format=CL) and not out_cl.is_contiguous()
    assert out.is_contiguous()
    assert_close(out_cl, out, torch.float32)
    assert_close(out_cl, ref_conv(x, weight, bias, stride, None, pad_mode, residual=residual), torch.float32)
    # channels_last input with a contiguous residual: still channels_last out
    out_mixed = causal_conv3d(x_cl, weight, bias, stride=stride, pad_mode=pad_mode, residual=residual)
    assert out_mixed.is_contiguous(memory_format=CL)
    assert_close(out_mixed, out, torch.float32)


def test_non_contiguous_input():
    base = torch.randn(1, 3, 4, 9, 7)
    x = base.transpose(3, 4)                     # (1, 3, 4, 7, 9), neither contiguous nor channels_last
    weight = rand_weight(4, 3, (3, 3, 3))
    out = causal_conv3d(x, weight, stride=(1, 2, 1), pad_mode="replicate")
    assert_close(out, ref_conv(x, weight, None, (1, 2, 1), None, "replicate"), torch.float32)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("pad_mode", ["zeros", "replicate"])
@pytest.mark.parametrize("stride", [1, (2, 2, 2), (1, 2, 2)], ids=str)
def test_low_precision(dtype, pad_mode, stride):
    x = torch.randn(2, 7, 3, 5, 9).to(dtype)
    weight, bias = rand_weight(5, 7, (3, 3, 3), dtype), torch.randn(5).to(dtype)
    residual = torch.randn(causal_conv3d_output_shape(x.shape, weight.shape, triple(stride), (1, 1))).to(dtype)
    cache = torch.randn(2, 7, 1, 5, 9).to(dtype)
    out = causal_conv3d(x, weight, bias, stride=stride, pad_mode=pad_mode, residual=residual, cache=cache)
    assert out.dtype == dtype
    ref = ref_conv(x, weight, bias, stride, None, pad_mode, cache, residual)  # fp64 of the same lowp inputs
    assert_close(out, ref, dtype)
    out_cl = causal_conv3d(x.to(memory_format=CL), weight, bias, stride=stride, pad_mode=pad_mode,
                           residual=residual, cache=cache)
    assert out_cl.is_contiguous(memory_format=CL)
    assert_close(out_cl, ref, dtype)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_residual_added_before_the_one_rounding(dtype):
    """A fused epilogue adds bias and residual in fp32 and rounds once. With the conv output near 200 (an
    ulp of 1 in bf16, 1/8 in fp16) and the residual cancelling most of it, rounding the conv output first
    would leave errors of up to half an ulp of 200 on results of size ~1."""
    x = torch.randn(1, 4, 3, 5, 5).to(dtype)
    weight = (torch.full((3, 4, 3, 3, 3), 2.0) + 0.1 * torch.randn(3, 4, 3, 3, 3)).to(dtype)
    bias = torch.full((3,), 150.0).to(dtype)
    conv = ref_conv(x, weight, bias, 1, None, "zeros")
    residual = (-conv + torch.randn_like(conv)).to(dtype)
    assert conv.abs().max() > 100
    out = causal_conv3d(x, weight, bias, residual=residual)
    ref = ref_conv(x, weight, bias, 1, None, "zeros", residual=residual)
    assert ref.abs().max() < 10
    assert_close(out, ref, dtype)


# ----------------------------------------------------------------------------------------------
# streaming: chunk by chunk with the cache equals the whole video at once


def _stream_functional(video, weight, bias, chunks, **kw):
    kt, outs, cache, start = weight.shape[2], [], None, 0
    for n in chunks:
        x = video[:, :, start:start + n]
        outs.append(causal_conv3d(x, weight, bias, cache=cache, **kw))
        cache = causal_conv3d_next_cache(x, cache, kt)
        if kt > 1:
            want = video[:, :, max(0, start + n - (kt - 1)):start + n]  # the stream's last kt-1 frames, in order
            assert torch.equal(cache, want)
        else:
            assert cache is None
        start += n
    assert start == video.shape[2]
    return torch.cat(outs, dim=2)


STREAM_CASES = [
    ((3, 3, 3), 1, [1, 4, 4]),
    ((3, 3, 3), 1, [3, 2, 5]),
    ((3, 1, 1), 1, [1, 1, 1, 2, 3]),
    ((4, 3, 3), 1, [1, 1, 5, 2]),       # kt-1 = 3: caches of 1, 2, then 3 frames
    ((3, 3, 3), (1, 2, 2), [1, 4, 4]),
    ((3, 3, 3), (2, 1, 1), [2, 4, 4]),
    ((3, 1, 1), (2, 1, 1), [4, 2, 2, 2]),
    ((1, 3, 3), 1, [2, 3, 1]),          # kt = 1: no cache at all
]


@pytest.mark.parametrize("pad_mode", ["zeros", "replicate"])
@pytest.mark.parametrize("kernel,stride,chunks", STREAM_CASES, ids=str)
def test_stream_functional_cache(kernel, stride, chunks, pad_mode):
    video = torch.randn(2, 5, sum(chunks), 5, 7)
    weight, bias = rand_weight(3, 5, kernel), torch.randn(3)
    chunked = _stream_functional(video, weight, bias, chunks, stride=stride, pad_mode=pad_mode)
    whole = causal_conv3d(video, weight, bias, stride=stride, pad_mode=pad_mode)
    assert chunked.shape == whole.shape
    assert_close(chunked, whole, torch.float32)
    assert_close(chunked, ref_conv(video, weight, bias, stride, None, pad_mode), torch.float32)


@pytest.mark.parametrize("pad_mode", ["zeros", "replicate"])
@pytest.mark.parametrize("kernel,stride,chunks", [STREAM_CASES[i] for i in (0, 3, 5)], ids=str)
def test_stream_module(kernel, stride, chunks, pad_mode):
    conv = CausalConv3d(5, 4, kernel, stride=stride, pad_mode=pad_mode)
    first, second = torch.randn(1, 5, sum(chunks), 3, 5), torch.randn(1, 5, sum(chunks), 3, 5)
    for video in (first, second):  # the second video after reset_cache must not see the first
        conv.reset_cache()
        outs, start = [], 0
        for n in chunks:
            outs.append(conv(video[:, :, start:start + n], stream=True))
            start += n
        whole = conv(video)  # stream=False neither reads nor writes the cache
        assert_close(torch.cat(outs, dim=2), whole, torch.float32)
        assert_close(whole, ref_conv(video, conv.weight, conv.bias, stride, None, pad_mode), torch.float32)


def test_stream_module_without_reset_continues_the_stream():
    conv = CausalConv3d(3, 3, 3, pad_mode="replicate")
    video = torch.randn(1, 3, 6, 4, 4)
    a = conv(video[:, :, :2], stream=True)
    conv(torch.randn(1, 3, 3, 4, 4))  # stream=False: neither reads nor writes the cache
    b = conv(video[:, :, 2:], stream=True)
    assert_close(torch.cat([a, b], 2), ref_conv(video, conv.weight, conv.bias, 1, None, "replicate"), torch.float32)


@pytest.mark.parametrize("pad_mode", ["zeros", "replicate"])
def test_short_cache_equals_whole_video(pad_mode):
    """After a 1-frame first chunk the cache holds 1 < kt-1 = 2 frames; the rest of the video with that
    cache must equal frames 1.. of the whole video (replicate pads with the stream's first frame)."""
    video = torch.randn(1, 7, 5, 5, 3)
    weight, bias = rand_weight(5, 7, (3, 3, 3)), torch.randn(5)
    cache = causal_conv3d_next_cache(video[:, :, :1], None, 3)
    assert cache.shape[2] == 1 and torch.equal(cache, video[:, :, :1])
    rest = causal_conv3d(video[:, :, 1:], weight, bias, cache=cache, pad_mode=pad_mode)
    whole = ref_conv(video, weight, bias, 1, None, pad_mode)
    assert_close(rest, whole[:, :, 1:], torch.float32)
    # a 2-frame cache is simply the previous frames
    rest2 = causal_conv3d(video[:, :, 3:], weight, bias, cache=video[:, :, 1:3], pad_mode=pad_mode)
    assert_close(rest2, whole[:, :, 3:], torch.float32)


def test_next_cache_order_and_independence():
    x = torch.randn(1, 2, 4, 3, 3)
    prev = torch.randn(1, 2, 1, 3, 3)
    c = causal_conv3d_next_cache(x[:, :, :1], prev, 4)   # stream = [prev, x0]: 2 frames, both kept
    assert torch.equal(c, torch.cat([prev, x[:, :, :1]], 2))
    c = causal_conv3d_next_cache(x, prev, 3)             # last 2 of [prev, x0..x3]
    assert torch.equal(c, x[:, :, 2:])
    c.add_(1)                                            # a copy, not a view of the input
    assert torch.equal(x[:, :, 2:] + 1, c)
    assert causal_conv3d_next_cache(x, None, 1) is None


@pytest.mark.parametrize("kt", [2, 3, 4])
def test_next_cache_equals_the_stream_tail_and_copies_only_it(kt, monkeypatch):
    """Against the definition (the last kt-1 frames of ``torch.cat([cache, x])``), for every cache length
    and chunk length; gradients reach x and cache; nothing beyond the kept frames is concatenated."""
    cat_frames = []
    real_cat = torch.cat

    def spy_cat(tensors, dim=0):
        cat_frames.append(sum(t.shape[dim] for t in tensors))
        return real_cat(tensors, dim=dim)

    for frames in range(1, 6):
        for cached in [None, *range(0, kt)]:
            x = torch.randn(1, 2, frames, 3, 2, requires_grad=True)
            cache = None if cached is None else torch.randn(1, 2, cached, 3, 2, requires_grad=True)
            stream = x if cache is None else real_cat([cache, x], dim=2)
            expected = stream[:, :, -(kt - 1):]
            monkeypatch.setattr(torch, "cat", spy_cat)
            got = causal_conv3d_next_cache(x, cache, kt)
            monkeypatch.setattr(torch, "cat", real_cat)
            assert torch.equal(got, expected), (frames, cached)
            assert all(n <= kt - 1 for n in cat_frames), cat_frames
            assert got.untyped_storage().data_ptr() not in {t.untyped_storage().data_ptr()
                                                            for t in (x, cache) if t is not None}
            g = torch.randn_like(got)
            want = torch.autograd.grad(expected, [t for t in (x, cache) if t is not None], g, allow_unused=True)
            have = torch.autograd.grad(got, [t for t in (x, cache) if t is not None], g, allow_unused=True)
            for a, e in zip(have, want):
                assert (a is None and (e is None or not e.any())) or torch.equal(a, e)


# ----------------------------------------------------------------------------------------------
# gradients


@pytest.mark.parametrize("pad_mode,stride", [("zeros", 1), ("replicate", (2, 1, 2))], ids=str)
def test_gradcheck(pad_mode, stride):
    x = torch.randn(1, 2, 3, 3, 4, dtype=torch.float64, requires_grad=True)
    weight = torch.randn(2, 2, 3, 3, 3, dtype=torch.float64, requires_grad=True)
    bias = torch.randn(2, dtype=torch.float64, requires_grad=True)
    cache = torch.randn(1, 2, 1, 3, 4, dtype=torch.float64, requires_grad=True)  # short: replicate copies it
    residual = torch.randn(causal_conv3d_output_shape(x.shape, weight.shape, triple(stride), (1, 1)),
                           dtype=torch.float64, requires_grad=True)

    def fn(x, w, b, c, r):
        return causal_conv3d(x, w, b, stride=stride, pad_mode=pad_mode, cache=c, residual=r)

    # fast mode (random projections of the Jacobian, all inputs at once): the full Jacobian costs ~10 s here
    assert torch.autograd.gradcheck(fn, (x, weight, bias, cache, residual), fast_mode=True)


@pytest.mark.parametrize("pad_mode", ["zeros", "replicate"])
def test_gradcheck_full_jacobian_tiny(pad_mode):
    x = torch.randn(1, 1, 2, 2, 3, dtype=torch.float64, requires_grad=True)
    weight = torch.randn(2, 1, 3, 1, 3, dtype=torch.float64, requires_grad=True)
    bias = torch.randn(2, dtype=torch.float64, requires_grad=True)
    cache = torch.randn(1, 1, 1, 2, 3, dtype=torch.float64, requires_grad=True)
    residual = torch.randn(1, 2, 1, 2, 2, dtype=torch.float64, requires_grad=True)

    def fn(x, w, b, c, r):
        return causal_conv3d(x, w, b, stride=(2, 1, 2), pad_mode=pad_mode, cache=c, residual=r)

    assert torch.autograd.gradcheck(fn, (x, weight, bias, cache, residual))


@pytest.mark.parametrize("pad_mode", ["zeros", "replicate"])
@pytest.mark.parametrize("with_cache", [False, True])
def test_fp32_grads(pad_mode, with_cache):
    x = torch.randn(2, 5, 4, 5, 7, requires_grad=True)
    weight = rand_weight(3, 5, (3, 3, 3)).requires_grad_()
    bias = torch.randn(3, requires_grad=True)
    cache = torch.randn(2, 5, 1, 5, 7, requires_grad=True) if with_cache else None
    residual = torch.randn(2, 3, 2, 3, 4, requires_grad=True)
    leaves = [t for t in (x, weight, bias, cache, residual) if t is not None]
    kw = dict(stride=(2, 2, 2), pad_mode=pad_mode)
    dy = torch.randn(2, 3, 2, 3, 4)
    got = torch.autograd.grad(causal_conv3d(x.to(memory_format=CL), weight, bias, cache=cache, residual=residual,
                                            **kw), leaves, dy)
    ref_leaves = [t.detach().double().requires_grad_() for t in leaves]
    rx, rw, rb, *rest = ref_leaves
    rc, rr = (rest if with_cache else (None, rest[0]))
    want = torch.autograd.grad(ref_conv(rx, rw, rb, cache=rc, residual=rr, **kw), ref_leaves, dy.double())
    for g, w in zip(got, want):
        assert g.dtype == torch.float32
        assert_close(g, w, torch.float32)


def test_opcheck():
    x = torch.randn(1, 3, 2, 4, 5, requires_grad=True)
    w = rand_weight(2, 3, (3, 3, 3)).requires_grad_()
    cache = torch.randn(1, 3, 1, 4, 5)
    torch.library.opcheck(torch.ops.sora_fast.causal_conv3d.default,
                          (x, w, None, [1, 2, 1], [1, 1], "replicate", cache, None, "torch"),
                          test_utils=("test_schema", "test_autograd_registration", "test_faketensor"))
    packed = causal_conv3d_pack_weight(w)                # ignored by the torch backend, no gradient
    torch.library.opcheck(torch.ops.sora_fast.causal_conv3d.default,
                          (x, w, None, [1, 2, 1], [1, 1], "replicate", cache, None, "torch", packed),
                          test_utils=("test_schema", "test_autograd_registration", "test_faketensor"))
    torch.library.opcheck(torch.ops.sora_fast.causal_conv3d.default,
                          (x.detach().to(memory_format=CL), w, torch.randn(2), [1, 1, 1], [1, 1], "zeros", None, None,
                           "torch"),
                          test_utils=("test_schema", "test_faketensor"))


# ----------------------------------------------------------------------------------------------
# module


@pytest.mark.parametrize("bias", [True, False])
def test_module(bias):
    conv = CausalConv3d(3, 5, kernel_size=(3, 1, 1), stride=(2, 1, 1), padding=0, bias=bias, pad_mode="replicate")
    assert (conv.bias is not None) == bias and conv.weight.shape == (5, 3, 3, 1, 1)
    assert "pad_mode='replicate'" in repr(conv) and "kernel_size=(3, 1, 1)" in repr(conv)
    # PyTorch's Conv3d default init: U(-1/sqrt(fan_in), 1/sqrt(fan_in))
    assert conv.weight.abs().max() <= 1 / math.sqrt(3 * 3)
    x = torch.randn(2, 3, 5, 4, 6)
    residual = torch.randn(2, 5, 3, 4, 6)
    out = conv(x, residual=residual)
    assert_close(out, ref_conv(x, conv.weight, conv.bias, (2, 1, 1), (0, 0), "replicate", residual=residual),
                 torch.float32)
    out.sum().backward()
    assert conv.weight.grad is not None
    assert conv.bias is None or conv.bias.grad is not None


def test_module_validation():
    with pytest.raises(ValueError, match=r"kernel_size must be 3 ints, got \(3, 3\)"):
        CausalConv3d(3, 3, kernel_size=(3, 3))
    with pytest.raises(ValueError, match=r"kernel_size must be 3 ints >= 1, got \(0, 3, 3\)"):
        CausalConv3d(3, 3, kernel_size=(0, 3, 3))
    with pytest.raises(ValueError, match=r"pad_mode must be one of \('zeros', 'replicate'\), got 'circular'"):
        CausalConv3d(3, 3, pad_mode="circular")
    with pytest.raises(ValueError, match=r"stride must be 3 ints >= 1, got \(1, 0, 1\)"):
        CausalConv3d(3, 3, stride=(1, 0, 1))


# ----------------------------------------------------------------------------------------------
# backends


@pytest.mark.parametrize("backend", ["cuda", "triton"])
def test_kernel_backends(backend):
    """No kernel registered: BackendUnavailableError naming op and backend. A registered one must agree
    with the reference or say why it cannot run (never a silent fallback)."""
    x, w = torch.randn(1, 3, 2, 4, 5), rand_weight(2, 3, (3, 3, 3))
    if backend not in registered_backends("causal_conv3d"):
        with pytest.raises(BackendUnavailableError, match=rf"the {backend} backend of causal_conv3d cannot run: "
                                                          rf"no {backend} kernel is registered for causal_conv3d"):
            causal_conv3d(x, w, backend=backend)
        return
    try:
        out = causal_conv3d(x, w, pad_mode="replicate", backend=backend)
    except BackendUnavailableError as e:
        assert f"the {backend} backend of causal_conv3d cannot run" in str(e)
        return
    assert_close(out, ref_conv(x, w, None, 1, None, "replicate"), torch.float32)


# ----------------------------------------------------------------------------------------------
# validation


def _good():
    return dict(x=torch.randn(1, 3, 4, 5, 6), weight=rand_weight(4, 3, (3, 3, 3)))


BAD = [
    ("x_4d", dict(x=torch.randn(3, 4, 5, 6)), ValueError,
     r"x must be a 5-D tensor \(B, Cin, T, H, W\), got shape \(3, 4, 5, 6\)"),
    ("x_not_tensor", dict(x=[[1.0]]), TypeError, r"x must be a torch.Tensor, got list"),
    ("x_int", dict(x=torch.zeros(1, 3, 4, 5, 6, dtype=torch.int32)), ValueError,
     r"x must have dtype in \(float16, bfloat16, float32, float64\), got int32"),
    ("weight_4d", dict(weight=torch.randn(4, 3, 3, 3)), ValueError,
     r"weight must be a 5-D tensor \(Cout, Cin, kt, kh, kw\), got shape \(4, 3, 3, 3\)"),
    ("weight_not_tensor", dict(weight=None), TypeError, r"weight must be a torch.Tensor, got NoneType"),
    ("weight_cin", dict(weight=torch.randn(4, 2, 3, 3, 3)), ValueError,
     r"weight must have x's 3 input channels in dim 1, got shape \(4, 2, 3, 3, 3\)"),
    ("weight_dtype", dict(weight=torch.randn(4, 3, 3, 3, 3, dtype=torch.float64)), ValueError,
     r"weight must have the dtype of x \(torch.float32\), got torch.float64"),
    ("empty_t", dict(x=torch.randn(1, 3, 0, 5, 6)), ValueError, r"must have no empty dims"),
    ("bias_shape", dict(bias=torch.randn(5)), ValueError, r"bias must have shape \(4,?\), got \(5,?\)"),
    ("bias_2d", dict(bias=torch.randn(4, 1)), ValueError, r"bias must be a 1-D tensor \(Cout,\), got shape \(4, 1\)"),
    ("bias_not_tensor", dict(bias=1.0), TypeError, r"bias must be a torch.Tensor, got float"),
    ("stride_0", dict(stride=0), ValueError, r"stride must be 3 ints >= 1, got \(0, 0, 0\)"),
    ("stride_neg", dict(stride=(1, -1, 1)), ValueError, r"stride must be 3 ints >= 1, got \(1, -1, 1\)"),
    ("stride_4", dict(stride=(1, 1, 1, 1)), ValueError, r"stride must be 3 ints, got \(1, 1, 1, 1\)"),
    ("stride_bool", dict(stride=True), TypeError, r"stride must be an int or a tuple of 3 ints, got True"),
    ("stride_bool_in_tuple", dict(stride=(1, True, 1)), ValueError, r"stride must be 3 ints, got \(1, True, 1\)"),
    ("stride_float", dict(stride=2.0), TypeError, r"stride must be an int or a tuple of 3 ints, got float"),
    ("padding_neg", dict(padding=-1), ValueError, r"padding must be 2 ints >= 0, got \(-1, -1\)"),
    ("padding_3", dict(padding=(1, 1, 1)), ValueError, r"padding must be 2 ints, got \(1, 1, 1\)"),
    ("padding_str", dict(padding="same"), ValueError, r"padding must be 2 ints, got 'same'"),
    ("too_small", dict(x=torch.randn(1, 3, 4, 1, 6), padding=0), ValueError,
     r"the padded input \(1, 6\) is smaller than the kernel \(3, 3\); x shape \(1, 3, 4, 1, 6\), padding \(0, 0\)"),
    ("pad_mode", dict(pad_mode="reflect"), ValueError,
     r"pad_mode must be one of \('zeros', 'replicate'\), got 'reflect'"),
    ("cache_too_many_frames", dict(cache=torch.randn(1, 3, 3, 5, 6)), ValueError,
     r"cache must have shape \(1, 3, f, 5, 6\) with f <= kt-1 = 2 .*got \(1, 3, 3, 5, 6\)"),
    ("cache_wrong_h", dict(cache=torch.randn(1, 3, 2, 4, 6)), ValueError,
     r"cache must have shape \(1, 3, f, 5, 6\) .*got \(1, 3, 2, 4, 6\)"),
    ("cache_wrong_c", dict(cache=torch.randn(1, 4, 2, 5, 6)), ValueError, r"cache must have shape \(1, 3, f, 5, 6\)"),
    ("cache_dtype", dict(cache=torch.randn(1, 3, 2, 5, 6, dtype=torch.float16)), ValueError,
     r"cache must have the dtype of x \(torch.float32\), got torch.float16"),
    ("cache_4d", dict(cache=torch.randn(3, 2, 5, 6)), ValueError, r"cache must be a 5-D tensor"),
    ("cache_kt1", dict(weight=rand_weight(4, 3, (1, 3, 3)), cache=torch.randn(1, 3, 1, 5, 6)), ValueError,
     r"with f <= kt-1 = 0"),
    ("residual_shape", dict(residual=torch.randn(1, 4, 4, 5, 5)), ValueError,
     r"residual must have shape \(1, 4, 4, 5, 6\) \(the output's\), got \(1, 4, 4, 5, 5\)"),
    ("residual_strided_shape", dict(stride=2, residual=torch.randn(1, 4, 4, 5, 6)), ValueError,
     r"residual must have shape \(1, 4, 2, 3, 3\) \(the output's\), got \(1, 4, 4, 5, 6\)"),
    ("residual_not_tensor", dict(residual=0.0), TypeError, r"residual must be a torch.Tensor, got float"),
    ("packed_weight_not_tensor", dict(packed_weight=[1.0]), TypeError,
     r"packed_weight must be a tensor \(causal_conv3d_pack_weight\(weight\)\) or None, got list"),
    ("packed_weight_shape", dict(packed_weight=torch.randn(4, 81)), ValueError,
     r"packed_weight must be causal_conv3d_pack_weight\(weight\): a contiguous \(81, 4\) tensor of torch.float32 on "
     r"cpu, got \(4, 81\) torch.float32 on cpu"),
    ("packed_weight_dtype", dict(packed_weight=torch.randn(81, 4, dtype=torch.float16)), ValueError,
     r"packed_weight must be .* \(81, 4\) tensor of torch.float32 on cpu, got \(81, 4\) torch.float16"),
    ("packed_weight_strided", dict(packed_weight=torch.randn(4, 81).t()), ValueError,
     r"packed_weight must be .*got \(81, 4\) torch.float32 on cpu \(not contiguous\)"),
]


@pytest.mark.parametrize("bad,exc,match", [c[1:] for c in BAD], ids=[c[0] for c in BAD])
def test_validation(bad, exc, match):
    kw = {**_good(), **bad}
    x, weight = kw.pop("x"), kw.pop("weight")
    bias = kw.pop("bias", None)
    with pytest.raises(exc, match=match):
        causal_conv3d(x, weight, bias, **kw)


def test_stream_with_time_stride_rejects_misaligned_chunks():
    conv = CausalConv3d(3, 4, (3, 1, 1), stride=(2, 1, 1), padding=(0, 0))
    x = torch.randn(1, 3, 9, 2, 2)
    conv(x[:, :, :1], stream=True)
    with pytest.raises(ValueError, match=r"time stride 2: the previous chunks held 1 frames"):
        conv(x[:, :, 1:5], stream=True)
    conv.reset_cache()
    whole = conv(x)
    parts = [conv(x[:, :, a:b], stream=True) for a, b in ((0, 4), (4, 9))]
    torch.testing.assert_close(torch.cat(parts, dim=2), whole)
