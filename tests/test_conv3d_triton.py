"""The Triton causal Conv3d (implicit GEMM, NDHWC) against the fp64 reference.

On CPU-only machines these run under the Triton interpreter (tests/conftest.py sets it), with the same
kernel a GPU runs; outputs are NaN-poisoned so an unwritten element shows. Tolerances come from the
numerical error of the computation: half an ulp of the output dtype (one rounding of the result) plus
fp32 accumulation error relative to the sum of |terms| (a conv of |x| with |w|).
"""
import pytest
import torch

from sora_fast.ops import CausalConv3d, causal_conv3d
from sora_fast.ops.conv3d import causal_conv3d_ref
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


def _check(out, x, weight, bias=None, *, stride=1, pad_mode="zeros", cache=None, residual=None, msg=""):
    """out against the fp64 reference on the same (already rounded) inputs, within numerical error."""
    d = lambda t: None if t is None else t.double()
    ref = causal_conv3d_ref(d(x), d(weight), d(bias), stride=stride, pad_mode=pad_mode, cache=d(cache),
                            residual=d(residual))
    mag = causal_conv3d_ref(d(x).abs(), d(weight).abs(), None if bias is None else d(bias).abs(), stride=stride,
                            pad_mode=pad_mode, cache=None if cache is None else d(cache).abs(),
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

    req = lambda *ts: tuple(t.requires_grad_(True) for t in ts)
    x, weight, cache, residual = req(torch.randn(1, 3, 2, 3, 5).contiguous(memory_format=CL),
                                     torch.randn(5, 3, 3, 1, 1), torch.randn(1, 3, 1, 3, 5), torch.randn(1, 5, 1, 3, 5))
    torch.library.opcheck(conv3d._conv_op, (x, weight, None, [2, 1, 1], [0, 0], "replicate", cache, residual,
                                            "triton"))


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
def test_every_shipped_config_passes_gates():
    """0 spill bytes, shared memory <= 227 KiB, HGMMA present, for every config the launcher can pick
    (about a minute of offline compiles on 2 cores, in a child process without TRITON_INTERPRET)."""
    from sora_fast.tools.kernel_report import run_report_subprocess

    rc, data, output = run_report_subprocess(["--module", "sora_fast.triton.conv3d", "--no-cuda", "--jobs", "2"],
                                             timeout=1200)
    assert data.get("rows"), f"no rows compiled:\n{output}"
    failed = {r["name"]: [g for g, ok in r["gates"].items() if not ok] + ([r["error"]] if "error" in r else [])
              for r in data["rows"] if not all(r["gates"].values())}
    assert not failed, f"configs failing a gate: {failed}\n{output}"
    assert rc == 0, output
    assert len(data["rows"]) == len(tri.shipped_configs())
