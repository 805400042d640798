"""The CUDA C++ VAE norm + SiLU kernels (kernels/vae_norm.cuh) on CPU tensors through the host
emulation, against the fp32 references, in contiguous and channels_last_3d layouts. Their backward
is the reference VJP for now (see sora_fast/cuda/launchers.py); the autograd wiring is tested here."""
import pytest
import torch
from _utils import assert_close

import sora_fast.ops as O
from sora_fast import _ext
from sora_fast.cuda import launchers as _cuda

# No skip when the emulation is missing: it is always built (tests/test_build.py), so its absence is a
# broken build and these tests must fail on it.


@pytest.fixture(autouse=True)
def poison(monkeypatch):
    monkeypatch.setattr(_cuda, "POISON_OUTPUTS", True)


def _x(shape, dtype, layout):
    x = (torch.randn(shape) * 3 + 1).to(dtype)
    return x.contiguous(memory_format=torch.channels_last_3d) if layout == "cl" else x


# B2: S = 105, C/G = 2: contiguous takes the scalar paths; channels_last C = 8: 16-byte apply, scalar stats.
# 1frame: C = 6, S = 12: scalar except the fp32 contiguous (S % 4 == 0) path.
# 2chunks: 5120 elements per group (2 stats chunks), S = 1280, C/G = 4: 16-byte stats + apply
# (channels_last: fp32 stats vectorized, 16-bit stats scalar since C/G % 8 != 0).
# vec8: C/G = 8, S = 64: every path 16-byte in both layouts.
CASES = [((2, 8, 3, 5, 7), 4), ((1, 6, 1, 4, 3), 3), ((1, 8, 4, 16, 20), 2), ((2, 16, 2, 4, 8), 2)]


@pytest.mark.parametrize("layout", ["contiguous", "cl"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16], ids=str)
@pytest.mark.parametrize("shape,groups", CASES, ids=["B2", "1frame", "2chunks", "vec8"])
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
@pytest.mark.parametrize("shape", [(2, 8, 3, 5, 7), (1, 12, 1, 4, 3), (2, 16, 2, 4, 8)], ids=["B2", "1frame", "vec8"])
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


# --- which path runs: the launchers' own choice (C.emu.vae_vector_widths), then the numerics ------
def _vae_args(x, weight=None, bias=None, groups=None):
    """The launcher arguments the wrapper builds (sora_fast/cuda/launchers.py), for the width query only."""
    cl = not x.is_contiguous()
    b, c, t, h, w = x.shape
    y = torch.empty_like(x)
    args = {"batch": b, "channels": c, "spatial": t * h * w, "channels_last": int(cl), "silu": 1,
            "dtype_x": _cuda._DTYPE_CODE[x.dtype], "x": x.data_ptr(), "y": y.data_ptr(),
            "weight": 0 if weight is None else weight.data_ptr(), "bias": 0 if bias is None else bias.data_ptr()}
    if weight is not None:
        args["dtype_p"] = _cuda._DTYPE_CODE[weight.dtype]
    if groups is not None:
        m = c // groups * t * h * w
        args.update({"groups": groups, "partial": 8, "stats": 8, "chunk": -(-m // 8) * 8, "nchunks": 1})
    return args


def _misaligned(shape, dtype, layout):
    """x whose data pointer is 1 element past a 16-byte boundary (a slice of a bigger buffer)."""
    n = torch.Size(shape).numel()
    x = (torch.randn(n + 1) * 3 + 1).to(dtype)[1:]
    if layout == "cl":
        b, c, t, h, w = shape
        return x.view(b, t, h, w, c).permute(0, 4, 1, 2, 3)
    return x.view(shape)


def test_vector_widths_main_path_and_fallbacks():
    C = _ext.require_extension("test")
    W = lambda *a, **k: C.emu.vae_vector_widths(_vae_args(*a, **k))  # noqa: E731
    bf, f32 = torch.bfloat16, torch.float32
    # group norm: [stats V, apply V]
    assert W(_x((2, 16, 2, 4, 8), bf, "contiguous"), groups=2) == [8, 8]
    assert W(_x((2, 16, 2, 4, 8), bf, "cl"), groups=2) == [8, 8]
    assert W(_x((2, 16, 2, 4, 8), bf, "cl"), groups=4) == [1, 8]      # C/G = 4 < 8: scalar stats
    assert W(_x((2, 16, 2, 4, 8), f32, "cl"), groups=4) == [4, 4]
    assert W(_x((2, 8, 3, 5, 7), bf, "contiguous"), groups=4) == [1, 1]  # S = 105
    assert W(_x((1, 12, 1, 4, 3), f32, "contiguous"), groups=3) == [4, 4]
    assert W(_x((1, 12, 1, 4, 3), bf, "cl"), groups=3) == [1, 1]       # C = 12
    assert W(_misaligned((2, 16, 2, 4, 8), bf, "contiguous"), groups=2) == [1, 1]
    assert W(_misaligned((2, 16, 2, 4, 8), bf, "cl"), groups=2) == [1, 1]
    # channel RMS: [V], 0 = the scalar per-position fallback kernel
    w8 = torch.randn(8)
    assert W(_x((2, 8, 2, 4, 8), bf, "contiguous"), w8) == [8]
    assert W(_x((2, 8, 2, 4, 8), bf, "cl"), w8) == [8]
    assert W(_x((2, 8, 3, 5, 7), bf, "contiguous"), w8) == [0]          # S = 105
    assert W(_x((2, 8, 3, 5, 7), f32, "cl"), w8) == [4]
    assert W(_x((1, 12, 1, 4, 3), bf, "cl"), torch.randn(12)) == [1]    # C % 8 != 0: warp kernel, scalar
    assert W(_x((1, 1040, 1, 1, 2), bf, "cl"), torch.randn(1040)) == [0]  # C > 1024: fallback
    assert W(_x((2, 8, 2, 4, 8), bf, "cl"), torch.randn(9)[1:]) == [1]  # misaligned weight
    assert W(_misaligned((2, 8, 2, 4, 8), bf, "contiguous"), w8) == [0]


@pytest.mark.parametrize("layout", ["contiguous", "cl"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16], ids=str)
def test_misaligned_storage_offset_takes_the_scalar_path(layout, dtype):
    shape = (2, 16, 2, 4, 8)
    x = _misaligned(shape, dtype, layout)
    assert x.data_ptr() % 16 != 0
    w, b = torch.randn(16), torch.randn(16)
    assert_close(O.group_norm_silu(x, 2, w, b, backend="cuda"), O.group_norm_silu_ref(x, 2, w, b), dtype)
    wm = torch.randn(17)[1:]  # misaligned weight too
    assert_close(O.channel_rms_norm_silu(x, wm, b, backend="cuda"), O.channel_rms_norm_silu_ref(x, wm, b), dtype)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("shape,layout", [((1, 1024, 1, 1, 3), "cl"), ((1, 1040, 1, 1, 2), "cl"),
                                          ((1, 1000, 1, 1, 2), "cl"), ((1, 20, 1, 2, 8), "contiguous")],
                         ids=["C1024-warp", "C1040-fallback", "C1000-warp", "C20-vec"])
def test_channel_rms_wide_and_odd_channels(dtype, shape, layout):
    x = _x(shape, dtype, layout)
    w, b = torch.randn(shape[1]), torch.randn(shape[1])
    got = O.channel_rms_norm_silu(x, w, b, silu=False, backend="cuda")
    assert_close(got, O.channel_rms_norm_silu_ref(x, w, b, silu=False), dtype)


# --- layouts, empty inputs, no affine, the registered ops called directly --------------------------------
def test_layouts_in_place_or_copied(monkeypatch):
    """contiguous and channels_last_3d x are read in place; any other layout (a time slice) is copied to
    contiguous first, with the reference's result."""
    seen = []
    real = _cuda._launchers

    class Rec:
        def __init__(self, launch):
            self.launch = launch

        def __getattr__(self, name):
            fn = getattr(self.launch, name)
            return lambda args, *rest: (seen.append(dict(args)), fn(args, *rest))[1]

    monkeypatch.setattr(_cuda, "_launchers", lambda device, what: Rec(real(device, what)))
    w = torch.randn(8)
    for layout in ("contiguous", "cl"):
        x = _x((1, 8, 2, 4, 4), torch.float32, layout)
        O.channel_rms_norm_silu(x, w, backend="cuda")
        assert seen[-1]["x"] == x.data_ptr() and seen[-1]["channels_last"] == int(layout == "cl")
    x = _x((1, 8, 5, 4, 4), torch.float32, "cl")[:, :, 1:4]  # one video's frames 1..3: still channels_last_3d
    O.channel_rms_norm_silu(x, w, backend="cuda")
    assert seen[-1]["x"] == x.data_ptr() and seen[-1]["channels_last"] == 1
    x = _x((2, 8, 5, 4, 4), torch.float32, "cl")[:, :, 1:4]  # two videos: neither layout
    got = O.group_norm_silu(x, 2, w, None, backend="cuda")
    assert seen[-1]["x"] != x.data_ptr() and seen[-1]["channels_last"] == 0
    assert_close(got, O.group_norm_silu_ref(x, 2, w, None), torch.float32)


@pytest.mark.parametrize("layout", ["contiguous", "cl"])
def test_group_norm_without_affine(layout):
    x = _x((2, 8, 2, 3, 4), torch.bfloat16, layout)
    for silu in (True, False):
        assert_close(O.group_norm_silu(x, 4, silu=silu, backend="cuda"), O.group_norm_silu_ref(x, 4, silu=silu),
                     torch.bfloat16)


@pytest.mark.parametrize("shape", [(1, 8, 0, 4, 4), (0, 8, 2, 4, 4), (1, 8, 2, 0, 3)], ids=["T0", "B0", "H0"])
@pytest.mark.parametrize("op", ["group_norm_silu", "channel_rms_norm_silu"])
def test_empty_inputs_match_the_torch_backend(op, shape):
    """No launch: the same empty output and zero weight/bias gradients as the torch backend."""
    results = {}
    for backend in ("cuda", "torch"):
        x = torch.randn(shape, requires_grad=True)
        w, b = torch.randn(8, requires_grad=True), torch.randn(8, requires_grad=True)
        y = (O.group_norm_silu(x, 4, w, b, backend=backend) if op == "group_norm_silu"
             else O.channel_rms_norm_silu(x, w, b, backend=backend))
        y.sum().backward()
        results[backend] = (y, x.grad, w.grad, b.grad)
    for got, ref in zip(results["cuda"], results["torch"]):
        assert got.shape == ref.shape and got.dtype == ref.dtype
        assert torch.equal(got, ref)


@pytest.mark.parametrize("backend", ["cuda", "torch"])
def test_registered_ops_check_their_arguments(backend):
    """torch.ops.sora_fast.* skip the public functions' checks: the ops check shapes again."""
    ops = torch.ops.sora_fast
    x, w = torch.randn(1, 8, 2, 2, 2), torch.randn(8)
    with pytest.raises(ValueError, match="weight must have shape \\(8,\\), got \\(4,\\)"):
        ops.group_norm_silu(x, 2, w[:4], None, 1e-6, True, backend)
    with pytest.raises(ValueError, match="num_groups must be a positive int dividing the 8 channels, got 3"):
        ops.group_norm_silu(x, 3, w, None, 1e-6, True, backend)
    with pytest.raises(ValueError, match="bias must have shape \\(8,\\), got \\(9,\\)"):
        ops.channel_rms_norm_silu(x, w, torch.randn(9), 1e-12, True, backend)
    with pytest.raises(ValueError, match="grad must have shape \\(1, 8, 2, 2, 2\\)"):
        ops.channel_rms_norm_silu_backward(x[:, :, :1], x, w, None, 1e-12, True, backend)
    with pytest.raises(ValueError, match="grad must have shape"):
        ops.group_norm_silu_backward(x[:, :4], x, 2, w, None, 1e-6, True, backend)


def test_opcheck_with_the_cuda_backend():
    x = torch.randn(1, 4, 2, 3, 3).contiguous(memory_format=torch.channels_last_3d).requires_grad_(True)
    torch.library.opcheck(torch.ops.sora_fast.group_norm_silu.default,
                          (x, 2, torch.randn(4, requires_grad=True), None, 1e-6, True, "cuda"))
