"""Tests for sora_fast.ops.adaln: adaln_modulate and gated_residual_adaln against independent references
(F.layer_norm / F.rms_norm + a python loop over sequences), diffusers' Wan block arithmetic, gradients
(gradcheck in fp64, fp32 grads vs autograd of the reference), the modules, backends and every
validation error."""
import random

import pytest
import torch
import torch.nn.functional as F
from _utils import TOL, assert_close, assert_within_lowp_error

from sora_fast.ops import (
    AdaLNModulate,
    BackendUnavailableError,
    GatedResidualAdaLN,
    adaln_modulate,
    gated_residual_adaln,
    registered_backends,
)

SHAPES = [(1, 64), (17, 769), (113, 8)]
AFFINES = ["none", "weight", "bias", "both"]


# ----------------------------------------------------------------------------------------------
# independent references: torch's own norms, then modulation by an explicit loop over sequences


def ref_norm(x, norm, weight, bias, eps):
    """F.layer_norm / F.rms_norm (+ bias for rms) in x's dtype (callers pass fp64)."""
    d = x.shape[-1]
    if norm == "layer":
        return F.layer_norm(x, (d,), weight, bias, eps)
    y = F.rms_norm(x, (d,), weight, eps)
    return y if bias is None else y + bias


def ref_rows_loop(values, seq_ids, fn):
    """out[i] = fn(values[i], b) for every token i of sequence b, looping over sequences; rows not
    written stay NaN so an unassigned token shows."""
    out = torch.full_like(values, float("nan"))
    for b in sorted(set(seq_ids.tolist())):
        mask = (seq_ids == b).unsqueeze(1)
        out = torch.where(mask, fn(values, b), out)
    return out


def ref_modulate(x, shift, scale, seq_ids, norm="layer", weight=None, bias=None, eps=1e-6, md=torch.float64):
    """Independent adaln_modulate in ``md``; returns ``md`` (callers round)."""
    c = lambda t: None if t is None else t.to(md)  # noqa: E731
    xn = ref_norm(x.to(md), norm, c(weight), c(bias), eps)
    shift, scale = shift.to(md), scale.to(md)
    if seq_ids is None:  # per-token tables: a loop over tokens
        return torch.stack([xn[i] * (1 + scale[i]) + shift[i] for i in range(x.shape[0])])
    return ref_rows_loop(xn, seq_ids, lambda v, b: v * (1 + scale[b]) + shift[b])


def ref_gated_x_new(x, branch, gate, seq_ids, md=torch.float64):
    """x + gate[seq] * branch in ``md``, rounded to x's dtype."""
    xf, bf, g = x.to(md), branch.to(md), gate.to(md)
    if seq_ids is None:
        s = torch.stack([xf[i] + g[i] * bf[i] for i in range(x.shape[0])])
    else:
        s = ref_rows_loop(xf, seq_ids, lambda v, b: v + g[b] * bf)
    return s.to(x.dtype)


def ref_gated(x, branch, gate, shift, scale, seq_ids, norm="layer", weight=None, bias=None, eps=1e-6,
              md=torch.float64):
    x_new = ref_gated_x_new(x, branch, gate, seq_ids, md)
    return x_new, ref_modulate(x_new, shift, scale, seq_ids, norm, weight, bias, eps, md)


# ----------------------------------------------------------------------------------------------
# inputs


def random_seq_ids(n, b):
    """(n,) int32 ids in [0, b), unsorted where possible, and one row of the table never used."""
    empty = random.randrange(b)
    used = [i for i in range(b) if i != empty]
    ids = [random.choice(used) for _ in range(n)]
    if n >= 2 and len(used) >= 2:  # force unsorted
        ids[0], ids[1] = max(used), min(used)
    return torch.tensor(ids, dtype=torch.int32), empty


def make_tables(n, d, seq, names=("shift", "scale"), dtype=torch.float32, b=None):
    """Per-sequence (B, D) tables with unsorted seq_ids and an empty sequence, or per-token (N, D)."""
    if seq:
        b = b or random.randint(2, 5)
        seq_ids, _ = random_seq_ids(n, b)
        rows = b
    else:
        seq_ids, rows = None, n
    tables = {k: (0.5 * torch.randn(rows, d)).to(dtype) for k in names}
    return tables, seq_ids


def make_affine(affine, d, dtype=torch.float32):
    weight = (1 + 0.3 * torch.randn(d)).to(dtype) if affine in ("weight", "both") else None
    bias = (0.3 * torch.randn(d)).to(dtype) if affine in ("bias", "both") else None
    return weight, bias


def rand_x(n, d, dtype=torch.float32):
    # an offset and a spread per row, so the norm has something to do
    return (torch.randn(n, 1) + (0.5 + torch.rand(n, 1)) * torch.randn(n, d)).to(dtype)


# ----------------------------------------------------------------------------------------------
# forward, fp32, against the independent reference


@pytest.mark.parametrize("affine", AFFINES)
@pytest.mark.parametrize("seq", [True, False], ids=["per_seq", "per_token"])
@pytest.mark.parametrize("norm", ["layer", "rms"])
def test_adaln_modulate_fp32(affine, seq, norm):
    for n, d in SHAPES:
        x = rand_x(n, d)
        t, seq_ids = make_tables(n, d, seq)
        weight, bias = make_affine(affine, d)
        eps = random.choice([1e-6, 1e-5, 0.1])  # 0.1: eps must reach the norm, not a hard-coded constant
        y = adaln_modulate(x, t["shift"], t["scale"], seq_ids, norm=norm, weight=weight, bias=bias, eps=eps)
        assert y.dtype == x.dtype and y.shape == x.shape
        assert_close(y, ref_modulate(x, t["shift"], t["scale"], seq_ids, norm, weight, bias, eps), torch.float32,
                     msg=f"N={n}, D={d}, eps={eps}")


@pytest.mark.parametrize("affine", ["none", "both"])
@pytest.mark.parametrize("seq", [True, False], ids=["per_seq", "per_token"])
@pytest.mark.parametrize("norm", ["layer", "rms"])
def test_gated_residual_adaln_fp32(affine, seq, norm):
    for n, d in SHAPES:
        x, branch = rand_x(n, d), torch.randn(n, d)
        t, seq_ids = make_tables(n, d, seq, ("gate", "shift", "scale"))
        weight, bias = make_affine(affine, d)
        x_new, y = gated_residual_adaln(x, branch, t["gate"], t["shift"], t["scale"], seq_ids, norm=norm,
                                        weight=weight, bias=bias)
        rx, ry = ref_gated(x, branch, t["gate"], t["shift"], t["scale"], seq_ids, norm, weight, bias)
        assert x_new.dtype == y.dtype == x.dtype
        assert_close(x_new, rx, torch.float32, msg=f"x_new, N={n}, D={d}")
        assert_close(y, ry, torch.float32, msg=f"y, N={n}, D={d}")


def test_sorted_packed_sequences_with_empty_and_single_token():
    """The layout packing produces: sequences back to back, one of length 1 and one of length 0."""
    lengths = [5, 0, 1, 11]
    seq_ids = torch.repeat_interleave(torch.arange(len(lengths), dtype=torch.int32), torch.tensor(lengths))
    n, d = sum(lengths), 40
    x, shift, scale = rand_x(n, d), torch.randn(4, d), torch.randn(4, d)
    y = adaln_modulate(x, shift, scale, seq_ids)
    assert_close(y, ref_modulate(x, shift, scale, seq_ids), torch.float32)


def test_non_contiguous_inputs():
    n, d = 17, 33
    x = rand_x(n, 2 * d)[:, ::2]                 # strided rows
    shift = torch.randn(d, 3).t()                # transposed (B, D) table
    scale = torch.randn(3, 2 * d)[:, d:]
    branch = torch.randn(2 * n, d)[::2]
    gate = torch.randn(d, 3).t()
    seq_ids = torch.randint(0, 3, (2 * n,), dtype=torch.int32)[::2]
    assert not x.is_contiguous() and not shift.is_contiguous() and not seq_ids.is_contiguous()
    assert_close(adaln_modulate(x, shift, scale, seq_ids, norm="rms"),
                 ref_modulate(x, shift, scale, seq_ids, "rms"), torch.float32)
    x_new, y = gated_residual_adaln(x, branch, gate, shift, scale, seq_ids)
    rx, ry = ref_gated(x, branch, gate, shift, scale, seq_ids)
    assert_close(x_new, rx, torch.float32)
    assert_close(y, ry, torch.float32)


def test_fp64_stays_fp64():
    x = rand_x(9, 12).double()
    t, seq_ids = make_tables(9, 12, True, dtype=torch.float64)
    y = adaln_modulate(x, t["shift"], t["scale"], seq_ids, norm="rms")
    assert y.dtype == torch.float64
    assert_close(y, ref_modulate(x, t["shift"], t["scale"], seq_ids, "rms"), torch.float64)


# ----------------------------------------------------------------------------------------------
# low precision: x (and branch) in fp16/bf16, conditioning tables in fp32 as in Wan


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("n,d", [(17, 769), (113, 64)])
@pytest.mark.parametrize("norm", ["layer", "rms"])
@pytest.mark.parametrize("affine_dtype", ["fp32", "x"])
def test_adaln_modulate_low_precision(dtype, n, d, norm, affine_dtype):
    x = rand_x(n, d, dtype)
    t, seq_ids = make_tables(n, d, True)
    weight, bias = make_affine("both", d, torch.float32 if affine_dtype == "fp32" else dtype)
    y = adaln_modulate(x, t["shift"], t["scale"], seq_ids, norm=norm, weight=weight, bias=bias)
    assert y.dtype == dtype
    ref = ref_modulate(x, t["shift"], t["scale"], seq_ids, norm, weight, bias)  # fp64 from the same inputs
    assert_close(y, ref, dtype)
    # PyTorch doing the whole thing in the low-precision dtype is the error budget (flash-attn's rule)
    idx = seq_ids.long()
    peer = ref_norm(x, norm, weight.to(dtype), bias.to(dtype), 1e-6) * (1 + t["scale"][idx].to(dtype)) \
        + t["shift"][idx].to(dtype)
    assert_within_lowp_error(y, ref, peer)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("norm", ["layer", "rms"])
@pytest.mark.parametrize("seq", [True, False], ids=["per_seq", "per_token"])
def test_gated_residual_adaln_low_precision(dtype, norm, seq):
    n, d = 57, 769
    x, branch = rand_x(n, d, dtype), torch.randn(n, d).to(dtype)
    t, seq_ids = make_tables(n, d, seq, ("gate", "shift", "scale"))
    weight, bias = make_affine("both", d)
    x_new, y = gated_residual_adaln(x, branch, t["gate"], t["shift"], t["scale"], seq_ids, norm=norm,
                                    weight=weight, bias=bias)
    assert x_new.dtype == y.dtype == dtype
    # the contract: fp32 math, one rounding to x's dtype
    rx = ref_gated_x_new(x, branch, t["gate"], seq_ids, md=torch.float32)
    assert_close(x_new, rx, dtype)
    assert_close(y, ref_modulate(rx, t["shift"], t["scale"], seq_ids, norm, weight, bias), dtype)


@pytest.mark.parametrize("case", ["layer_offset", "layer_cancel", "rms_cancel"])
def test_gated_y_is_computed_from_the_rounded_x_new(case):
    """y must follow the rounded x_new (what the next block sees), not the fp32 sum. The inputs make the
    two semantics differ by far more than bf16 output rounding:
    offset: x_new lives near 256, where a bf16 ulp is 2, so rounding changes LayerNorm(x_new) by O(1);
    cancel: per-token shift = -N(fp32 sum) * (1 + scale) with 1 + scale = 256, so the unrounded y is ~0
            and the rounded one is 256 * (the norm's change from rounding)."""
    n, d = 23, 96
    norm = case.split("_")[0]
    branch = torch.randn(n, d).to(torch.bfloat16)
    if case == "layer_offset":
        b = 3
        x = (256 + torch.randn(n, d)).to(torch.bfloat16)
        gate = 0.3 + 0.1 * torch.rand(b, d)  # fp32
        shift, scale = 0.1 * torch.randn(b, d), 0.1 * torch.randn(b, d)
        seq_ids, _ = random_seq_ids(n, b)
    else:
        x = (4 * torch.randn(n, d)).to(torch.bfloat16)
        gate = 0.3 + 0.1 * torch.rand(n, d)
        seq_ids = None
    x_new_fp32 = (x.float() + gate[seq_ids.long()] * branch.float()) if seq_ids is not None \
        else torch.stack([x[i].float() + gate[i] * branch[i].float() for i in range(n)])
    if case != "layer_offset":
        scale = torch.full((n, d), 255.0)
        shift = -ref_norm(x_new_fp32.double(), norm, None, None, 1e-6).float() * 256

    x_new, y = gated_residual_adaln(x, branch, gate, shift, scale, seq_ids, norm=norm)
    # one rounding of the fp32 sum (a kernel contracting to an fma may differ by an ulp in rare ties)
    assert_close(x_new, x_new_fp32.to(torch.bfloat16), torch.bfloat16)
    y_rounded = ref_modulate(x_new, shift, scale, seq_ids, norm)  # the reference semantics: N(rounded x_new)
    y_unrounded = ref_modulate(x_new_fp32, shift, scale, seq_ids, norm)
    gap = (y_rounded - y_unrounded).abs().max().item()
    assert gap > 20 * TOL[torch.bfloat16][0], f"test inputs do not separate the two semantics (gap {gap})"
    assert_close(y, y_rounded, torch.bfloat16, msg="y must come from the rounded x_new")
    err_unrounded = (y.double() - y_unrounded).abs().max().item()
    err_rounded = (y.double() - y_rounded).abs().max().item()
    assert err_rounded * 10 < err_unrounded, (err_rounded, err_unrounded)
    # and y is adaln_modulate of the returned x_new
    assert_close(y, adaln_modulate(x_new, shift, scale, seq_ids, norm=norm), torch.bfloat16)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
@pytest.mark.parametrize("per_token", [False, True])
def test_matches_diffusers_wan_block(dtype, per_token):
    """diffusers' WanTransformerBlock, written on the padded (B, L, D) layout with fp32 conditioning:
        x = (x.float() + ff_out * gate).type_as(x)
        y = (F.layer_norm(x.float(), (D,), eps=1e-6) * (1 + scale) + shift).type_as(x)
    The packed op (seq_ids from equal-length sequences) must give the same x and y."""
    b, length, d = 3, 10, 48
    x = torch.randn(b, length, d).to(dtype)
    ff_out = torch.randn(b, length, d).to(dtype)
    cond_shape = (b, length, d) if per_token else (b, 1, d)  # Wan 2.2 has per-token timesteps
    gate, shift, scale = (0.5 * torch.randn(cond_shape) for _ in range(3))

    wan_x = (x.float() + ff_out * gate).type_as(x)
    wan_y = (F.layer_norm(wan_x.float(), (d,), eps=1e-6) * (1 + scale) + shift).type_as(wan_x)

    flat = lambda t: t.reshape(-1, d)  # noqa: E731
    if per_token:
        seq_ids, tabs = None, [flat(gate), flat(shift), flat(scale)]
    else:
        seq_ids = torch.arange(b, dtype=torch.int32).repeat_interleave(length)
        tabs = [gate[:, 0], shift[:, 0], scale[:, 0]]
    x_new, y = gated_residual_adaln(flat(x), flat(ff_out), *tabs, seq_ids, norm="layer", eps=1e-6)
    assert_close(x_new, flat(wan_x), dtype)
    assert_close(y, flat(wan_y), dtype)
    y_mod = adaln_modulate(flat(x), tabs[1], tabs[2], seq_ids)
    wan_mod = (F.layer_norm(x.float(), (d,), eps=1e-6) * (1 + scale) + shift).type_as(x)
    assert_close(y_mod, flat(wan_mod), dtype)


# ----------------------------------------------------------------------------------------------
# gradients


def _fp64_leaves(*ts):
    return [None if t is None else t.detach().double().requires_grad_() for t in ts]


@pytest.mark.parametrize("norm", ["layer", "rms"])
@pytest.mark.parametrize("seq", [True, False], ids=["per_seq", "per_token"])
def test_gradcheck_adaln_modulate(norm, seq):
    n, d = 5, 6
    t, seq_ids = make_tables(n, d, seq, b=3)
    weight, bias = make_affine("both", d)
    x, shift, scale, weight, bias = _fp64_leaves(rand_x(n, d), t["shift"], t["scale"], weight, bias)
    fn = lambda x, sh, sc, w, bi: adaln_modulate(x, sh, sc, seq_ids, norm=norm, weight=w, bias=bi)  # noqa: E731
    assert torch.autograd.gradcheck(fn, (x, shift, scale, weight, bias))


@pytest.mark.parametrize("norm", ["layer", "rms"])
@pytest.mark.parametrize("seq", [True, False], ids=["per_seq", "per_token"])
def test_gradcheck_gated_residual_adaln(norm, seq):
    n, d = 5, 6
    t, seq_ids = make_tables(n, d, seq, ("gate", "shift", "scale"), b=3)
    weight, bias = make_affine("both", d)
    leaves = _fp64_leaves(rand_x(n, d), torch.randn(n, d), t["gate"], t["shift"], t["scale"], weight, bias)

    def fn(x, br, g, sh, sc, w, bi):
        return gated_residual_adaln(x, br, g, sh, sc, seq_ids, norm=norm, weight=w, bias=bi)

    assert torch.autograd.gradcheck(fn, tuple(leaves))


def _grads(out, leaves, cot):
    return torch.autograd.grad(out, [v for v in leaves if v is not None], cot, allow_unused=False)


@pytest.mark.parametrize("norm", ["layer", "rms"])
@pytest.mark.parametrize("affine", ["none", "both"])
@pytest.mark.parametrize("seq", [True, False], ids=["per_seq", "per_token"])
def test_fp32_grads_adaln_modulate(norm, affine, seq):
    n, d = 37, 100
    t, seq_ids = make_tables(n, d, seq)
    weight, bias = make_affine(affine, d)
    leaves = [v if v is None else v.requires_grad_() for v in (rand_x(n, d), t["shift"], t["scale"], weight, bias)]
    dy = torch.randn(n, d)
    got = _grads(adaln_modulate(leaves[0], leaves[1], leaves[2], seq_ids, norm=norm, weight=leaves[3],
                                bias=leaves[4]), leaves, dy)
    ref_leaves = _fp64_leaves(*leaves)
    want = _grads(ref_modulate(*ref_leaves[:3], seq_ids, norm, *ref_leaves[3:]), ref_leaves, dy.double())
    for g, w in zip(got, want):
        assert g.dtype == torch.float32
        assert_close(g, w, torch.float32)


@pytest.mark.parametrize("norm", ["layer", "rms"])
@pytest.mark.parametrize("used", ["both", "x_new", "y"])
def test_fp32_grads_gated_residual_adaln(norm, used):
    """Gradients through both outputs, or only one of them (the other's gradient arrives as None)."""
    n, d = 29, 64
    t, seq_ids = make_tables(n, d, True, ("gate", "shift", "scale"))
    weight, bias = make_affine("both", d)
    leaves = [v.requires_grad_() for v in (rand_x(n, d), torch.randn(n, d), t["gate"], t["shift"], t["scale"],
                                            weight, bias)]
    dx_new, dy = torch.randn(n, d), torch.randn(n, d)

    def loss(outs, dtype):
        x_new, y = outs
        terms = {"x_new": (x_new * dx_new.to(dtype)).sum(), "y": (y * dy.to(dtype)).sum()}
        return terms["x_new"] + terms["y"] if used == "both" else terms[used]

    out = gated_residual_adaln(*leaves[:5], seq_ids, norm=norm, weight=leaves[5], bias=leaves[6])
    got = torch.autograd.grad(loss(out, torch.float32), leaves, allow_unused=True)
    ref_leaves = _fp64_leaves(*leaves)
    ref = ref_gated(*ref_leaves[:5], seq_ids, norm, *ref_leaves[5:])
    want = torch.autograd.grad(loss(ref, torch.float64), ref_leaves, allow_unused=True)
    for name, g, w in zip(["x", "branch", "gate", "shift", "scale", "weight", "bias"], got, want):
        if w is None:  # e.g. shift/scale/weight/bias when only x_new is used
            assert g is None or torch.count_nonzero(g) == 0, name
        else:
            assert_close(g, w, torch.float32, msg=f"grad of {name}")


def test_grad_of_unused_table_row_is_zero():
    n, d, b = 12, 16, 4
    seq_ids, empty = random_seq_ids(n, b)
    x = rand_x(n, d).requires_grad_()
    shift, scale = torch.randn(b, d, requires_grad=True), torch.randn(b, d, requires_grad=True)
    adaln_modulate(x, shift, scale, seq_ids).square().sum().backward()
    assert torch.count_nonzero(shift.grad[empty]) == 0 and torch.count_nonzero(scale.grad[empty]) == 0
    used = [i for i in range(b) if i != empty]
    assert torch.count_nonzero(shift.grad[used]) > 0


def test_opcheck():
    n, d = 7, 10
    t, seq_ids = make_tables(n, d, True, ("gate", "shift", "scale"), b=3)
    w, bi = make_affine("both", d)
    x, br = rand_x(n, d).requires_grad_(), torch.randn(n, d, requires_grad=True)
    tests = ("test_schema", "test_autograd_registration", "test_faketensor")
    torch.library.opcheck(torch.ops.sora_fast.adaln_modulate.default,
                          (x, t["shift"], t["scale"], seq_ids, "rms", w, bi, 1e-6, "torch"), test_utils=tests)
    torch.library.opcheck(torch.ops.sora_fast.gated_residual_adaln.default,
                          (x, br, t["gate"], t["shift"], t["scale"], seq_ids, "layer", w, bi, 1e-6, "torch"),
                          test_utils=tests)


# ----------------------------------------------------------------------------------------------
# modules


@pytest.mark.parametrize("norm", ["layer", "rms"])
@pytest.mark.parametrize("affine", [False, True])
def test_modules(norm, affine):
    n, d = 19, 24
    mod = AdaLNModulate(d, norm=norm, elementwise_affine=affine, eps=1e-5)
    gmod = GatedResidualAdaLN(d, norm=norm, elementwise_affine=affine, eps=1e-5)
    assert (mod.weight is not None) == affine
    assert (mod.bias is not None) == (affine and norm == "layer")  # RMSNorm has no bias
    with torch.no_grad():
        for m in (mod, gmod):
            for p in m.parameters():
                p.copy_(torch.randn_like(p))
    assert f"norm={norm!r}" in repr(mod) and str(d) in repr(mod)
    x, branch = rand_x(n, d), torch.randn(n, d)
    t, seq_ids = make_tables(n, d, True, ("gate", "shift", "scale"))
    y = mod(x, t["shift"], t["scale"], seq_ids)
    assert_close(y, ref_modulate(x, t["shift"], t["scale"], seq_ids, norm, mod.weight, mod.bias, 1e-5),
                 torch.float32)
    x_new, y2 = gmod(x, branch, t["gate"], t["shift"], t["scale"], seq_ids)
    rx, ry = ref_gated(x, branch, t["gate"], t["shift"], t["scale"], seq_ids, norm, gmod.weight, gmod.bias, 1e-5)
    assert_close(x_new, rx, torch.float32)
    assert_close(y2, ry, torch.float32)
    if affine:
        (y.sum() + y2.sum()).backward()
        assert mod.weight.grad is not None and gmod.weight.grad is not None
        assert torch.count_nonzero(mod.weight.grad) > 0


def test_module_rejects_bad_norm():
    with pytest.raises(ValueError, match=r"norm must be one of \('layer', 'rms'\), got 'group'"):
        AdaLNModulate(8, norm="group")


# ----------------------------------------------------------------------------------------------
# backends


@pytest.mark.parametrize("backend", ["cuda", "triton"])
def test_kernel_backends(backend):
    """A backend with no kernel registered for the op raises BackendUnavailableError naming op and backend.
    Once a kernel is registered (the cuda one runs on CPU through the host emulation) it must agree with
    the independent reference here too, or say clearly why it cannot run; it never falls back silently."""
    n, d = 6, 24
    x, br = rand_x(n, d), torch.randn(n, d)
    t, seq_ids = make_tables(n, d, True, ("gate", "shift", "scale"))
    w, b = make_affine("both", d)
    calls = {
        "adaln_modulate": (lambda: adaln_modulate(x, t["shift"], t["scale"], seq_ids, norm="rms", weight=w, bias=b,
                                                  backend=backend),
                           lambda: ref_modulate(x, t["shift"], t["scale"], seq_ids, "rms", w, b)),
        "gated_residual_adaln": (lambda: gated_residual_adaln(x, br, t["gate"], t["shift"], t["scale"], seq_ids,
                                                              weight=w, bias=b, backend=backend),
                                 lambda: ref_gated(x, br, t["gate"], t["shift"], t["scale"], seq_ids, "layer", w, b)),
    }
    for op, (run, ref) in calls.items():
        if backend not in registered_backends(op):
            msg = rf"the {backend} backend of {op} cannot run: no {backend} kernel is registered for {op}"
            with pytest.raises(BackendUnavailableError, match=msg):
                run()
            continue
        try:
            out = run()
        except BackendUnavailableError as e:
            assert f"the {backend} backend of {op} cannot run" in str(e)
            continue
        for o, r in zip(out if isinstance(out, tuple) else (out,), ref() if op == "gated_residual_adaln" else (ref(),)):
            assert_close(o, r, torch.float32, msg=f"{op} backend={backend}")


def test_unknown_backend_name():
    x = rand_x(3, 4)
    with pytest.raises(ValueError, match=r"backend must be one of .* got 'gpu'"):
        adaln_modulate(x, x, x, None, backend="gpu")


# ----------------------------------------------------------------------------------------------
# validation: every error names the argument and the values


def _good(n=5, d=8, b=3):
    return dict(x=rand_x(n, d), shift=torch.randn(b, d), scale=torch.randn(b, d),
                seq_ids=torch.tensor([0, 2, 1, 0, 2], dtype=torch.int32)[:n])


BAD_MODULATE = [
    ("seq_ids_negative", dict(seq_ids=torch.tensor([0, -1, 1, 0, 2], dtype=torch.int32)),
     ValueError, r"seq_ids values must lie in \[0, 3\) .*got min -1, max 2"),
    ("seq_ids_too_big", dict(seq_ids=torch.tensor([0, 3, 1, 0, 2], dtype=torch.int32)),
     ValueError, r"seq_ids values must lie in \[0, 3\) .*got min 0, max 3"),
    ("seq_ids_int64", dict(seq_ids=torch.tensor([0, 2, 1, 0, 2])),
     ValueError, r"seq_ids must have dtype in \(int32\), got int64"),
    ("seq_ids_float", dict(seq_ids=torch.zeros(5)),
     ValueError, r"seq_ids must have dtype in \(int32\), got float32"),
    ("seq_ids_length", dict(seq_ids=torch.tensor([0, 2, 1, 0], dtype=torch.int32)),
     ValueError, r"seq_ids must have one entry per row of x \(5\), got 4"),
    ("seq_ids_2d", dict(seq_ids=torch.zeros(5, 1, dtype=torch.int32)),
     ValueError, r"seq_ids must be a 1-D tensor \(N,\), got shape \(5, 1\)"),
    ("seq_ids_list", dict(seq_ids=[0, 2, 1, 0, 2]), TypeError, r"seq_ids must be a torch.Tensor, got list"),
    ("shift_wrong_d", dict(shift=torch.randn(3, 7)),
     ValueError, r"shift must have x's hidden size 8 in dim 1, got shape \(3, 7\)"),
    ("scale_wrong_d", dict(scale=torch.randn(3, 9)),
     ValueError, r"scale must have x's hidden size 8 in dim 1, got shape \(3, 9\)"),
    ("per_token_wrong_rows", dict(seq_ids=None),
     ValueError, r"shift must be per token, shape \(5, 8\), when seq_ids is None; got \(3, 8\)"),
    ("mismatched_rows", dict(scale=torch.randn(4, 8)),
     ValueError, r"scale must have shift's number of rows \(3\), got 4"),
    ("shift_1d", dict(shift=torch.randn(8)), ValueError, r"shift must be a 2-D tensor .*got shape \(8,\)"),
    ("shift_int", dict(shift=torch.zeros(3, 8, dtype=torch.int32)),
     ValueError, r"shift must have dtype in \(float16, bfloat16, float32, float64\), got int32"),
    ("bad_norm", dict(norm="batch"), ValueError, r"norm must be one of \('layer', 'rms'\), got 'batch'"),
    ("weight_shape", dict(weight=torch.ones(7)), ValueError, r"weight must have shape \(8,\), got \(7,\)"),
    ("weight_2d", dict(weight=torch.ones(1, 8)), ValueError, r"weight must be a 1-D tensor \(D,\), got shape \(1, 8\)"),
    ("bias_shape", dict(bias=torch.zeros(9)), ValueError, r"bias must have shape \(8,\), got \(9,\)"),
    ("bias_not_tensor", dict(bias=0.0), TypeError, r"bias must be a torch.Tensor, got float"),
    ("eps_zero", dict(eps=0), ValueError, r"eps must be a positive number, got 0"),
    ("eps_negative", dict(eps=-1e-6), ValueError, r"eps must be a positive number, got -1e-06"),
    ("eps_bool", dict(eps=True), ValueError, r"eps must be a positive number, got True"),
    ("eps_str", dict(eps="1e-6"), ValueError, r"eps must be a positive number, got '1e-6'"),
    ("x_not_tensor", dict(x=[[1.0] * 8] * 5), TypeError, r"x must be a torch.Tensor, got list"),
    ("x_3d", dict(x=torch.randn(1, 5, 8)), ValueError, r"x must be a 2-D tensor \(N, D\), got shape \(1, 5, 8\)"),
    ("x_int", dict(x=torch.zeros(5, 8, dtype=torch.int64)),
     ValueError, r"x must have dtype in \(float16, bfloat16, float32, float64\), got int64"),
    ("scale_not_tensor", dict(scale=None), TypeError, r"scale must be a torch.Tensor, got NoneType"),
]


@pytest.mark.parametrize("bad,exc,match", [c[1:] for c in BAD_MODULATE], ids=[c[0] for c in BAD_MODULATE])
def test_adaln_modulate_validation(bad, exc, match):
    kw = {**_good(), **bad}
    args = [kw.pop(k) for k in ("x", "shift", "scale", "seq_ids")]
    with pytest.raises(exc, match=match):
        adaln_modulate(*args, **kw)


BAD_GATED = [
    ("branch_shape", dict(branch=torch.randn(5, 7)), ValueError, r"branch must have x's shape \(5, 8\), got \(5, 7\)"),
    ("branch_1d", dict(branch=torch.randn(40)), ValueError, r"branch must be a 2-D tensor .*got shape \(40,\)"),
    ("branch_not_tensor", dict(branch=1.0), TypeError, r"branch must be a torch.Tensor, got float"),
    ("gate_rows", dict(gate=torch.randn(2, 8)), ValueError,
     r"(shift|scale) must have gate's number of rows \(2\), got 3"),
    ("gate_wrong_d", dict(gate=torch.randn(3, 4)),
     ValueError, r"gate must have x's hidden size 8 in dim 1, got shape \(3, 4\)"),
    ("gate_per_token_rows", dict(seq_ids=None), ValueError, r"gate must be per token, shape \(5, 8\)"),
    ("seq_ids_out_of_range", dict(seq_ids=torch.tensor([0, 1, 7, 0, 2], dtype=torch.int32)),
     ValueError, r"seq_ids values must lie in \[0, 3\) .*got min 0, max 7"),
    ("seq_ids_int64", dict(seq_ids=torch.zeros(5, dtype=torch.int64)), ValueError,
     r"seq_ids must have dtype in \(int32\), got int64"),
    ("bad_norm", dict(norm="LayerNorm"), ValueError, r"norm must be one of \('layer', 'rms'\), got 'LayerNorm'"),
    ("weight_shape", dict(weight=torch.ones(16)), ValueError, r"weight must have shape \(8,\), got \(16,\)"),
    ("eps_negative", dict(eps=-0.5), ValueError, r"eps must be a positive number, got -0.5"),
]


@pytest.mark.parametrize("bad,exc,match", [c[1:] for c in BAD_GATED], ids=[c[0] for c in BAD_GATED])
def test_gated_residual_adaln_validation(bad, exc, match):
    g = _good()
    kw = {**g, "branch": torch.randn(5, 8), "gate": torch.randn(3, 8), **bad}
    args = [kw.pop(k) for k in ("x", "branch", "gate", "shift", "scale", "seq_ids")]
    with pytest.raises(exc, match=match):
        gated_residual_adaln(*args, **kw)
