"""The Triton causal Conv3d (implicit GEMM, NDHWC) against the fp64 reference.

On CPU-only machines these run under the Triton interpreter (tests/conftest.py sets it), with the same
kernel a GPU runs; outputs are NaN-poisoned so an unwritten element shows. Tolerances come from the
numerical error of the computation: half an ulp of the output dtype (one rounding of the result) plus
fp32 accumulation error relative to the sum of |terms| (a conv of |x| with |w|).
"""
import random

import pytest
import torch
import triton

from sora_fast.ops import CausalConv3d, causal_conv3d
from sora_fast.ops import conv3d as ops_conv3d
from sora_fast.ops.conv3d import PackedConv3dWeight, causal_conv3d_pack_weight, causal_conv3d_ref
from sora_fast.triton import conv3d as tri

pytestmark = pytest.mark.filterwarnings("ignore::UserWarning")
CL = torch.channels_last_3d
EPS = {torch.float32: 2.0 ** -23, torch.float16: 2.0 ** -10, torch.bfloat16: 2.0 ** -7}


@pytest.fixture(autouse=True)
def poison_outputs(monkeypatch):
    def nan_empty(shape, dtype, device, memory_format):
        return torch.full(shape, float("nan"), dtype=dtype, device=device).contiguous(memory_format=memory_format)

    monkeypatch.setattr(tri, "_empty", nan_empty)


def _triple(v):
    return (v,) * 3 if isinstance(v, int) else tuple(v)


def _inputs(b, cin, cout, t, h, w, k, dtype, *, cache_frames=0, layout="contiguous"):
    x = torch.randn(b, cin, t, h, w).to(dtype)
    if layout == "channels_last":
        x = x.contiguous(memory_format=CL)
    elif layout == "strided":  # a view with a gap in H: neither contiguous nor channels-last
        x = torch.randn(b, cin, t, 2 * h, w).to(dtype)[:, :, :, ::2]
    weight = (torch.randn(cout, cin, *k) / (cin * k[0] * k[1] * k[2]) ** 0.5).to(dtype)
    bias = torch.randn(cout).to(dtype)
    cache = torch.randn(b, cin, cache_frames, h, w).to(dtype) if cache_frames else None
    return x, weight, bias, cache


def _check(out, x, weight, bias=None, *, stride=1, padding=None, pad_mode="zeros", cache=None, residual=None, msg=""):
    """out against the fp64 reference on the same (already rounded) inputs, within numerical error."""
    def d(t):
        return None if t is None else t.double()
    ref = causal_conv3d_ref(d(x), d(weight), d(bias), stride=stride, padding=padding, pad_mode=pad_mode,
                            cache=d(cache), residual=d(residual))
    mag = causal_conv3d_ref(d(x).abs(), d(weight).abs(), None if bias is None else d(bias).abs(), stride=stride,
                            padding=padding, pad_mode=pad_mode, cache=None if cache is None else d(cache).abs(),
                            residual=None if residual is None else d(residual).abs())
    assert out.shape == ref.shape and out.dtype == x.dtype, msg
    assert not torch.isnan(out).any(), f"{msg}: unwritten (NaN) output elements"
    expected_cl = not x.is_contiguous() and x.is_contiguous(memory_format=CL)
    assert out.is_contiguous(memory_format=CL if expected_cl else torch.contiguous_format), msg
    err = (out.double() - ref).abs()
    bound = 0.5 * EPS[x.dtype] * ref.abs() + 1e-5 * mag + 1e-30
    worst = (err / bound).max().item()
    assert worst <= 1.0, f"{msg}: error {err.max().item():.3e}, {worst:.2f}x the numerical-error bound"


# --- every kernel size, stride, pad mode; awkward channel counts and sizes -------------------------
CASES = [  # (kernel, stride, pad_mode, B, Cin, Cout, T, H, W, cache frames)
    ((3, 3, 3), 1, "zeros", 1, 3, 5, 3, 5, 7, 0),
    ((3, 3, 3), 1, "replicate", 2, 5, 7, 2, 3, 5, 0),
    ((3, 3, 3), 2, "zeros", 1, 7, 5, 5, 7, 9, 0),
    ((3, 3, 3), (2, 1, 1), "replicate", 1, 5, 3, 4, 5, 5, 2),
    ((3, 3, 3), (1, 2, 2), "zeros", 1, 17, 33, 2, 5, 7, 1),      # two K chunks, two N blocks
    ((3, 3, 3), 1, "replicate", 1, 3, 5, 1, 3, 3, 1),            # T=1, cache shorter than kt-1
    ((3, 1, 1), 1, "zeros", 1, 5, 7, 3, 9, 11, 0),               # M=297: three M blocks
    ((3, 1, 1), (2, 1, 1), "replicate", 2, 7, 3, 5, 3, 5, 0),
    ((3, 1, 1), 1, "zeros", 1, 3, 5, 1, 5, 3, 2),
    ((1, 3, 3), 1, "zeros", 1, 5, 7, 2, 7, 9, 0),
    ((1, 3, 3), (1, 2, 1), "replicate", 1, 3, 5, 3, 5, 7, 0),
    ((1, 3, 3), (1, 1, 2), "zeros", 1, 7, 3, 1, 5, 9, 0),
    ((1, 1, 1), 1, "zeros", 1, 5, 7, 3, 5, 7, 0),
    ((1, 1, 1), 2, "replicate", 1, 3, 5, 3, 5, 5, 0),
]


@pytest.mark.parametrize("k, stride, pad_mode, b, cin, cout, t, h, w, nc", CASES)
def test_matches_reference_fp32(k, stride, pad_mode, b, cin, cout, t, h, w, nc):
    x, weight, bias, cache = _inputs(b, cin, cout, t, h, w, k, torch.float32, cache_frames=nc)
    if k[0] == 1:
        cache = None
    use_res = (cin + cout) % 2 == 0
    shape = causal_conv3d_ref(x, weight, stride=stride).shape
    residual = torch.randn(shape) if use_res else None
    use_bias = bias if cin != 7 else None
    out = causal_conv3d(x, weight, use_bias, stride=stride, pad_mode=pad_mode, cache=cache, residual=residual,
                        backend="triton")
    _check(out, x, weight, use_bias, stride=stride, pad_mode=pad_mode, cache=cache, residual=residual,
           msg=f"k={k} stride={stride} {pad_mode}")


# --- dtypes and memory formats ---------------------------------------------------------------------
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32])
@pytest.mark.parametrize("layout", ["contiguous", "channels_last", "strided"])
def test_dtypes_and_layouts(dtype, layout):
    k, stride, pad_mode = (3, 3, 3), (1, 2, 1), "replicate"
    x, weight, bias, cache = _inputs(1, 5, 7, 3, 5, 7, k, dtype, cache_frames=1, layout=layout)
    shape = causal_conv3d_ref(x, weight, stride=stride).shape
    residual = torch.randn(shape).to(dtype)
    if layout == "channels_last":
        residual = residual.contiguous(memory_format=CL)
    out = causal_conv3d(x, weight, bias, stride=stride, pad_mode=pad_mode, cache=cache, residual=residual,
                        backend="triton")
    _check(out, x, weight, bias, stride=stride, pad_mode=pad_mode, cache=cache, residual=residual,
           msg=f"{dtype} {layout}")


def test_channels_last_cache_and_contiguous_x():
    x, weight, bias, cache = _inputs(1, 3, 5, 2, 3, 5, (3, 3, 3), torch.float32, cache_frames=2)
    cache = cache.contiguous(memory_format=CL)
    out = causal_conv3d(x, weight, bias, cache=cache, backend="triton")
    _check(out, x, weight, bias, cache=cache)


# --- streaming: chunk by chunk with the cache equals the whole video at once -----------------------
@pytest.mark.parametrize("k, stride, pad_mode, chunks", [
    ((3, 3, 3), 1, "zeros", [1, 2, 1]),
    ((3, 3, 3), (2, 1, 1), "replicate", [2, 2, 1]),
    ((3, 1, 1), 1, "replicate", [1, 1, 2]),
])
def test_streaming_equals_whole_video(k, stride, pad_mode, chunks):
    layer = CausalConv3d(5, 3, k, stride=stride, pad_mode=pad_mode, backend="triton")
    x = torch.randn(1, 5, sum(chunks), 3, 5).contiguous(memory_format=CL)
    with torch.no_grad():
        whole = layer(x)
        parts, t0 = [], 0
        layer.reset_cache()
        for n in chunks:
            parts.append(layer(x[:, :, t0:t0 + n], stream=True))
            t0 += n
    streamed = torch.cat(parts, dim=2)
    torch.testing.assert_close(streamed, whole, atol=1e-5, rtol=1e-5)
    _check(whole, x, layer.weight.detach(), layer.bias.detach(), stride=stride, pad_mode=pad_mode)


# --- gradients: the reference VJP behind the triton forward ---------------------------------------
def test_gradients_through_reference_backward():
    x, weight, bias, cache = _inputs(1, 3, 5, 2, 3, 5, (3, 3, 3), torch.float32, cache_frames=1)
    residual = torch.randn(causal_conv3d_ref(x, weight).shape)
    leaves = [t.clone().requires_grad_(True) for t in (x, weight, bias, cache, residual)]
    grads = {}
    for backend in ("triton", "torch"):
        for t in leaves:
            t.grad = None
        xx, ww, bb, cc, rr = leaves
        out = causal_conv3d(xx, ww, bb, pad_mode="replicate", cache=cc, residual=rr, backend=backend)
        g = torch.randn_like(out, generator=torch.Generator().manual_seed(1))
        out.backward(g)
        grads[backend] = [t.grad.clone() for t in leaves]
    for name, a, e in zip(("x", "weight", "bias", "cache", "residual"), grads["triton"], grads["torch"]):
        torch.testing.assert_close(a, e, atol=1e-5, rtol=1e-5, msg=lambda m: f"grad of {name}: {m}")


def test_opcheck_with_triton_backend():
    from sora_fast.ops import conv3d

    def req(*ts):
        return tuple(t.requires_grad_(True) for t in ts)
    x, weight, cache, residual = req(torch.randn(1, 3, 2, 3, 5).contiguous(memory_format=CL),
                                     torch.randn(5, 3, 3, 1, 1), torch.randn(1, 3, 1, 3, 5), torch.randn(1, 5, 1, 3, 5))
    torch.library.opcheck(conv3d._conv_op, (x, weight, None, [2, 1, 1], [0, 0], "replicate", cache, residual,
                                            "triton"))
    packed = causal_conv3d_pack_weight(weight)
    torch.library.opcheck(conv3d._conv_op, (x, weight, None, [2, 1, 1], [0, 0], "replicate", cache, residual,
                                            "triton", packed))


# --- unsupported inputs: clear errors that name the supported set --------------------------------
@pytest.mark.parametrize("k, stride, dtype, match", [
    ((5, 3, 3), 1, torch.float32, r"kernel sizes \(\(3, 3, 3\)"),
    ((3, 3, 3), (3, 1, 1), torch.float32, r"strides \(1, 2\)"),
    ((1, 1, 1), 1, torch.float64, "fp16, bf16 or fp32"),
])
def test_unsupported_raise(k, stride, dtype, match):
    x = torch.randn(1, 3, 2, 5, 5, dtype=dtype)
    weight = torch.randn(4, 3, *k, dtype=dtype)
    with pytest.raises(ValueError, match=match):
        causal_conv3d(x, weight, stride=stride, backend="triton")
    causal_conv3d(x, weight, stride=stride, backend="torch")  # the reference still serves them


# --- the offline sm_90 report: every shipped GPU config passes the gates ----------------------------
# By default the 3x3x3 specializations (the most registers) of every block config, bf16 and fp32 (fp16
# compiles to the bf16 code), with 32- and 64-bit offsets and every alignment case: about 25 s of offline
# compiles on 2 cores. The full matrix (every variant and dtype, about a minute) runs under ``-m slow``.
REPORT_SUBSET = r"(bf16|fp32) (cin=3 )?(cout=3 )?k333 "


@pytest.mark.parametrize("name_filter", [pytest.param(REPORT_SUBSET, id="k333-bf16-fp32"),
                                         pytest.param(None, id="all", marks=pytest.mark.slow)])
def test_every_shipped_config_passes_gates(name_filter):
    """0 spill bytes, shared memory <= 227 KiB, HGMMA present, for the configs the launcher can pick
    (in a child process without TRITON_INTERPRET)."""
    import re

    from sora_fast.tools.kernel_report import run_report_subprocess

    expected = [c.name for c in tri.shipped_configs() if name_filter is None or re.search(name_filter, c.name)]
    assert expected
    rc, data, output = run_report_subprocess(["--module", "sora_fast.triton.conv3d", "--no-cuda", "--jobs", "2"]
                                             + (["--filter", name_filter] if name_filter else []), timeout=1200)
    assert data.get("rows"), f"no rows compiled:\n{output}"
    failed = {r["name"]: [g for g, ok in r["gates"].items() if not ok] + ([r["error"]] if "error" in r else [])
              for r in data["rows"] if not all(r["gates"].values())}
    assert not failed, f"configs failing a gate: {failed}\n{output}"
    assert rc == 0, output
    assert sorted(r["name"] for r in data["rows"]) == sorted(expected)


# --- explicit padding and fresh random shapes -------------------------------------------------------
@pytest.mark.parametrize("k, padding, stride", [
    ((3, 3, 3), 0, 1),
    ((3, 3, 3), (2, 0), (1, 2, 1)),
    ((1, 3, 3), (0, 2), (1, 1, 2)),
    ((3, 1, 1), (1, 2), 1),
    ((1, 1, 1), 1, 2),
])
def test_explicit_padding(k, padding, stride):
    x, weight, bias, cache = _inputs(1, 3, 5, 2, 5, 6, k, torch.float32, cache_frames=k[0] - 1)
    out = causal_conv3d(x, weight, bias, stride=stride, padding=padding, pad_mode="replicate", cache=cache,
                        backend="triton")
    _check(out, x, weight, bias, stride=stride, padding=padding, pad_mode="replicate", cache=cache,
           msg=f"k={k} padding={padding}")


@pytest.mark.parametrize("draw", range(4))
def test_random_shapes(draw):
    """Shapes, strides, padding, pad mode, cache, layout, bias and residual drawn at random (``random`` is
    seeded per test by conftest; the seed is printed on failure)."""
    rng = random.Random(random.getrandbits(64) + draw)
    k = rng.choice(tri.SUPPORTED_KERNELS)
    stride = tuple(rng.choice(tri.SUPPORTED_STRIDES) for _ in range(3))
    b, cin, cout, t = rng.randint(1, 2), rng.randint(1, 20), rng.randint(1, 40), rng.randint(1, 4)
    padding = (rng.randint(0, k[1] // 2 + 1), rng.randint(0, k[2] // 2 + 1))
    h, w = (rng.randint(max(1, kk - 2 * p), 6) for kk, p in zip(k[1:], padding))
    dtype = rng.choice([torch.float32, torch.float16, torch.bfloat16])
    pad_mode = rng.choice(["zeros", "replicate"])
    layout = rng.choice(["contiguous", "channels_last", "strided"])
    x, weight, bias, cache = _inputs(b, cin, cout, t, h, w, k, dtype, cache_frames=rng.randint(0, k[0] - 1),
                                     layout=layout)
    bias = bias if rng.random() < 0.5 else None
    shape = causal_conv3d_ref(x, weight, stride=stride, padding=padding).shape
    residual = torch.randn(shape).to(dtype) if rng.random() < 0.5 else None
    msg = f"k={k} stride={stride} padding={padding} x={tuple(x.shape)} cout={cout} {dtype} {pad_mode} {layout}"
    out = causal_conv3d(x, weight, bias, stride=stride, padding=padding, pad_mode=pad_mode, cache=cache,
                        residual=residual, backend="triton")
    _check(out, x, weight, bias, stride=stride, padding=padding, pad_mode=pad_mode, cache=cache, residual=residual,
           msg=msg)


# --- every GPU block config and the 64-bit offset path, run by the interpreter -----------------------
_BUCKET_CHANNELS = {"small": 3, "large": 40, "tiny": 3}   # Cin buckets: small/large; Cout: tiny/small/large
_COUT_CHANNELS = {"tiny": 3, "small": 20, "large": 70}


@pytest.mark.parametrize("off64", [False, True], ids=["off32", "off64"])
@pytest.mark.parametrize("key", sorted(tri._GPU_CONFIGS), ids="-".join)
def test_gpu_block_configs(key, off64, monkeypatch):
    """The launcher's GPU configs (BLOCK_K above Cin, BLOCK_N above Cout, several K chunks and N blocks)
    and its 64-bit offsets (forced through the launcher's private switch) on a tiny case."""
    dclass, cin_b, cout_b = key
    dtype = torch.float32 if dclass == "fp32" else torch.float16
    cin, cout = _BUCKET_CHANNELS[cin_b], _COUT_CHANNELS[cout_b]
    assert tri._gpu_config_key(dtype, cin, cout) == key
    table = tri._GPU_CONFIGS_OFF64 if off64 else tri._GPU_CONFIGS
    monkeypatch.setattr(tri, "_config", lambda dt, ci, co, o64: table[tri._gpu_config_key(dt, ci, co)])
    k = (3, 3, 3)
    x, weight, bias, cache = _inputs(1, cin, cout, 2, 3, 4, k, dtype, cache_frames=1, layout="channels_last")
    shape = causal_conv3d_ref(x, weight, stride=(1, 1, 2)).shape
    residual = torch.randn(shape).to(dtype).contiguous(memory_format=CL)
    out = tri.causal_conv3d_forward(x, weight, bias, stride=(1, 1, 2), padding=(k[1] // 2, k[2] // 2),
                                    pad_mode="replicate", cache=cache, residual=residual, _force_off64=off64)
    _check(out, x, weight, bias, stride=(1, 1, 2), pad_mode="replicate", cache=cache, residual=residual,
           msg=f"{key} off64={off64}")


# --- the launch grid fits CUDA's limits at the largest video shapes ----------------------------------
def test_grid_fits_cuda_limits_at_wan_720p():
    # Wan 720p decoder, last stage, 81 frames in one pass: 74.6 M output positions; the old grid put
    # cdiv(M, 128) = 583,200 M blocks on axis 1, whose CUDA limit is 65,535.
    m = 81 * 720 * 1280
    assert triton.cdiv(m, 128) > tri.CUDA_MAX_GRID[1]
    for table in (tri._GPU_CONFIGS, tri._GPU_CONFIGS_OFF64):
        for cout in (3, 96, 384):
            cfg = table[tri._gpu_config_key(torch.bfloat16, 96, cout)]
            grid = tri._grid(m, cout, cfg)
            assert len(grid) == 1 and grid[0] <= tri.CUDA_MAX_GRID[0]
            assert grid[0] == triton.cdiv(m, cfg.block_m) * triton.cdiv(cout, cfg.block_n)
    cfg = tri._GPU_CONFIGS[("16bit", "large", "large")]
    with pytest.raises(ValueError, match=r"would launch \d+ programs .* more than CUDA's grid limit 2147483647"):
        tri._grid(2 ** 31 * cfg.block_m, 384, cfg)


# --- pre-packed weight ------------------------------------------------------------------------------
def _no_launcher_packing(monkeypatch):
    def fail(weight):
        raise AssertionError("the launcher packed the weight although a packed weight was passed")

    monkeypatch.setattr(tri, "causal_conv3d_pack_weight", fail)


def test_packed_weight_equals_reference(monkeypatch):
    x, weight, bias, cache = _inputs(1, 5, 7, 3, 4, 5, (3, 3, 3), torch.float32, cache_frames=2)
    packed = causal_conv3d_pack_weight(weight)
    assert packed.shape == (27 * 5, 7) and packed.is_contiguous()
    _no_launcher_packing(monkeypatch)
    out = causal_conv3d(x, weight, bias, cache=cache, packed_weight=packed, backend="triton")
    _check(out, x, weight, bias, cache=cache)


def test_module_repacks_only_when_the_weight_changes(monkeypatch):
    packs = []
    pack = ops_conv3d.causal_conv3d_pack_weight
    monkeypatch.setattr(ops_conv3d, "causal_conv3d_pack_weight", lambda w: packs.append(1) or pack(w))
    _no_launcher_packing(monkeypatch)
    layer = CausalConv3d(4, 6, 3, backend="triton")
    x = torch.randn(1, 4, 2, 3, 5)

    def follows_weight(n_packs, dtype=torch.float32):
        out = layer(x.to(dtype))
        _check(out, x.to(dtype), layer.weight.detach(), layer.bias.detach())
        assert len(packs) == n_packs

    follows_weight(1)
    follows_weight(1)                                  # unchanged weight: no repack
    with torch.no_grad():
        layer.weight.mul_(-2.0)                        # in-place edit
    follows_weight(2)
    layer.load_state_dict(CausalConv3d(4, 6, 3).state_dict())
    follows_weight(3)
    opt = torch.optim.SGD(layer.parameters(), lr=0.5)
    layer(x).square().sum().backward()
    opt.step()
    follows_weight(4)
    layer.weight = torch.nn.Parameter(torch.randn_like(layer.weight))   # a new parameter
    follows_weight(5)
    layer.half()                                       # .to(dtype)
    follows_weight(6, torch.float16)
    layer.packed_weight.clear()                        # after an edit through .data
    with torch.no_grad():
        layer.weight.data.mul_(0.5)
    follows_weight(7, torch.float16)


def test_packed_weight_follows_recomputed_weights():
    """A weight recomputed every call (weight_norm, parametrizations) is a new tensor each time, often at
    the address the previous one freed, with version 0 again: the pack must follow it, never be reused."""
    x = torch.randn(1, 4, 3, 5, 4)
    layer = torch.nn.utils.parametrizations.weight_norm(CausalConv3d(4, 6, 3, backend="triton"), "weight", dim=0)
    opt = torch.optim.SGD(layer.parameters(), lr=0.5)
    for step in range(3):
        out = layer(x)
        _check(out, x, layer.weight.detach(), layer.bias.detach(), msg=f"weight_norm, step {step}")
        opt.zero_grad()
        out.square().sum().backward()
        opt.step()

    packer = PackedConv3dWeight()
    base = torch.randn(6, 4, 3, 3, 3)
    for step in range(4):                   # scale * base: a fresh tensor each step, likely the freed address
        w = base * (step + 1.0)
        out = causal_conv3d(x, w, None, packed_weight=packer(w, "triton"), backend="triton")
        _check(out, x, w, None, msg=f"recomputed weight, step {step}")
        del w, out


def test_module_gradients_with_packed_weight():
    """Training through the packed weight: the forward output is within numerical error of the fp64
    reference on the current weight (a pack left stale by an optimizer step shows there), and the
    gradients (reference VJP) equal the torch backend's, step after step (the loss is linear in the
    output, so both see the same gradient)."""
    tri_layer = CausalConv3d(3, 5, 3, pad_mode="replicate", backend="triton")
    ref_layer = CausalConv3d(3, 5, 3, pad_mode="replicate", backend="torch")
    ref_layer.load_state_dict(tri_layer.state_dict())
    opts = [torch.optim.SGD(m.parameters(), lr=0.1) for m in (tri_layer, ref_layer)]
    x = torch.randn(1, 3, 2, 3, 4)
    g = torch.randn(1, 5, 2, 3, 4)
    for step in range(2):
        grads = []
        for layer, opt in zip((tri_layer, ref_layer), opts):
            opt.zero_grad()
            xx = x.clone().requires_grad_(True)
            out = layer(xx)
            _check(out, x, layer.weight.detach(), layer.bias.detach(), pad_mode="replicate", msg=f"step {step}")
            (out * g).sum().backward()
            grads.append((layer.weight.grad.clone(), layer.bias.grad.clone(), xx.grad))
            opt.step()
        for name, a, e in zip(("weight", "bias", "x"), *grads):
            torch.testing.assert_close(a, e, atol=1e-6, rtol=1e-6, msg=lambda m: f"step {step} grad of {name}: {m}")
    assert isinstance(tri_layer.packed_weight, PackedConv3dWeight) and tri_layer.packed_weight._packed is not None
    assert ref_layer.packed_weight._packed is None     # the torch backend reads no packed weight


def test_backward_does_not_keep_the_residual():
    x, weight, bias, _ = _inputs(1, 3, 4, 2, 3, 5, (3, 3, 3), torch.float32)
    residual = torch.randn(1, 4, 2, 3, 5, requires_grad=True)
    x.requires_grad_(True)
    saved = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t) or t, lambda t: t):
        out = causal_conv3d(x, weight, bias, residual=residual, backend="triton")
    ptrs = {t.data_ptr() for t in saved}
    assert x.data_ptr() in ptrs and residual.data_ptr() not in ptrs
    g = torch.randn_like(out)
    out.backward(g)
    torch.testing.assert_close(residual.grad, g, atol=0, rtol=0)
