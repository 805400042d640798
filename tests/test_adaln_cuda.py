"""The CUDA C++ adaLN kernels (kernels/adaln.cuh) on CPU tensors through the host emulation, against
the fp32 references: every output and gradient, fp32/bf16/fp16, awkward hidden sizes, packs with a
1-token and an empty sequence, per-sequence and per-token tables, determinism, bad input."""
import pytest
import torch
from _utils import TOL, assert_close, assert_within_lowp_error

import sora_fast.ops as O
from sora_fast import _ext
from sora_fast.cuda import launchers as _cuda
from sora_fast.ops.adaln import _gated_backward_ref, _modulate_backward_ref

# No skip when the emulation is missing: it is always built (tests/test_build.py), so its absence is a
# broken build and these tests must fail on it.

DTYPES = [torch.float32, torch.bfloat16, torch.float16]


@pytest.fixture(autouse=True)
def poison(monkeypatch):
    """NaN-fill every kernel output before the launch: an unwritten element fails the comparison."""
    monkeypatch.setattr(_cuda, "POISON_OUTPUTS", True)


def _pack(lengths, shuffle=False):
    ids = torch.cat([torch.full((n,), i, dtype=torch.int32) for i, n in enumerate(lengths)])
    return ids[torch.randperm(ids.numel())] if shuffle else ids


def _inputs(n, d, dtype, *, per_seq, gated, affine, table_dtype=torch.float32, lengths=None, shuffle=False):
    ids = _pack(lengths, shuffle) if per_seq else None
    rows = len(lengths) if per_seq else n
    t = lambda: (torch.randn(rows, d) * 0.5).to(table_dtype)  # noqa: E731
    kw = {"weight": torch.randn(d) if affine else None, "bias": torch.randn(d) if affine == "wb" else None}
    args = {"x": torch.randn(n, d).to(dtype) * 2 + 0.5, "shift": t(), "scale": t(), "seq_ids": ids}
    if gated:
        args.update(branch=torch.randn(n, d).to(dtype), gate=t())
    return args, kw


def _fwd(gated, backend, a, kw, norm):
    if gated:
        return O.gated_residual_adaln(a["x"], a["branch"], a["gate"], a["shift"], a["scale"], a["seq_ids"],
                                      norm=norm, backend=backend, **kw)
    return O.adaln_modulate(a["x"], a["shift"], a["scale"], a["seq_ids"], norm=norm, backend=backend, **kw)


def _upcast(a):
    return {k: (v.float() if isinstance(v, torch.Tensor) and v.is_floating_point() else v) for k, v in a.items()}


FWD_CASES = [
    # (d, n rows / pack lengths): small hidden sizes with many dtypes, big ones with few rows
    (64, [3, 1, 0, 4]),
    (769, [2, 0, 1, 3]),
    (1536, [1, 2]),
    (5120, [1, 0, 1]),
]


def _forward_grid():
    """Every (gated, norm, dtype) for the small hidden sizes; for the big ones (emulation costs per
    thread) the gated op only in LayerNorm with bf16/fp32 — the other combinations run at small D."""
    for d, lengths in FWD_CASES:
        for dtype in DTYPES:
            for norm in ("layer", "rms"):
                for gated in (False, True):
                    if d >= 1536 and gated and (dtype == torch.float16 or norm == "rms"):
                        continue
                    yield pytest.param(gated, norm, dtype, d, lengths,
                                       id=f"d{d}-{dtype}-{norm}-{'gated' if gated else 'modulate'}")


@pytest.mark.parametrize("gated,norm,dtype,d,lengths", list(_forward_grid()))
def test_forward_matches_reference(gated, norm, dtype, d, lengths):
    big = d >= 1536
    n = sum(lengths)
    per_seq = (d + len(lengths) + (dtype == torch.bfloat16)) % 2 == 0 or big  # both kinds across the grid
    affine = "wb" if norm == "layer" else "w"
    table_dtype = dtype if d == 769 else torch.float32  # tables in x's dtype, or fp32 with lowp x
    a, kw = _inputs(n, d, dtype, per_seq=per_seq, gated=gated, affine=affine, table_dtype=table_dtype,
                    lengths=lengths)
    got = _fwd(gated, "cuda", a, kw, norm)
    ref = _fwd(gated, "torch", a, kw, norm)
    for g, r, name in zip(got if gated else (got,), ref if gated else (ref,), ("x_new", "y") if gated else ("y",)):
        assert g.dtype == dtype and g.shape == (n, d)
        if name == "x_new":
            assert torch.equal(g, r), "x_new = round(x + gate * branch) must match the reference bit for bit"
        else:
            assert_close(g, r, dtype, msg=name)


BWD_CASES = [
    (64, torch.float32, [3, 1, 0, 4], True),
    (64, torch.bfloat16, [3, 1, 0, 4], False),
    (769, torch.float16, [2, 0, 1, 2], True),
    (769, torch.float32, [2, 1, 2], False),
    (1536, torch.bfloat16, [2, 0, 1], True),
    (5120, torch.bfloat16, [1, 1], True),
]


def _backward(gated, backend_fn, a, kw, norm, dy, dxn):
    if gated:
        return backend_fn["gated"](dxn, dy, a["x"], a["branch"], a["gate"], a["shift"], a["scale"], a["seq_ids"],
                                   norm=norm, **kw)
    return backend_fn["mod"](dy, a["x"], a["shift"], a["scale"], a["seq_ids"], norm=norm, **kw)


CUDA_BWD = {"gated": _cuda.gated_residual_adaln_backward, "mod": _cuda.adaln_modulate_backward}
REF_BWD = {"gated": lambda *a, **k: _gated_backward_ref(*a, eps=1e-6, **k),
           "mod": lambda *a, **k: _modulate_backward_ref(*a, eps=1e-6, **k)}


@pytest.mark.parametrize("gated", [False, True], ids=["modulate", "gated"])
@pytest.mark.parametrize("d,dtype,lengths,per_seq", BWD_CASES,
                         ids=[f"d{c[0]}-{str(c[1])[6:]}-{'seq' if c[3] else 'tok'}" for c in BWD_CASES])
def test_backward_every_gradient(gated, d, dtype, lengths, per_seq):
    norm = "layer" if d != 769 else "rms"
    n = sum(lengths)
    a, kw = _inputs(n, d, dtype, per_seq=per_seq, gated=gated, affine="wb" if norm == "layer" else "w",
                    lengths=lengths, shuffle=per_seq and d == 64)
    dy, dxn = torch.randn(n, d).to(dtype), torch.randn(n, d).to(dtype)
    got = _backward(gated, CUDA_BWD, a, kw, norm, dy, dxn)
    ref32 = _backward(gated, REF_BWD, _upcast(a), kw, norm, dy.float(), dxn.float())
    peer = _backward(gated, REF_BWD, a, kw, norm, dy, dxn)
    names = ("dx", "dbranch", "dgate", "dshift", "dscale", "dweight", "dbias") if gated else \
        ("dx", "dshift", "dscale", "dweight", "dbias")
    for g, r, p, name in zip(got, ref32, peer, names):
        if r is None:
            assert g is None, name
            continue
        assert g.shape == p.shape and g.dtype == p.dtype, (name, g.shape, g.dtype, p.dtype)
        assert not torch.isnan(g).any(), f"{name}: unwritten (NaN-poisoned) elements"
        # fp32 reductions in another order: error up to ~1e-5 of the gradient's scale
        atol = TOL[torch.float32][0] * max(1.0, r.abs().max().item())
        if dtype == torch.float32:
            torch.testing.assert_close(g.double(), r.double(), atol=atol, rtol=TOL[torch.float32][1], msg=name)
        else:  # lowp x: x_new is rounded to x's dtype, so even fp32 table gradients carry that error
            assert_within_lowp_error(g, r, p, atol=atol, msg=name)


def test_backward_is_deterministic():
    a, kw = _inputs(9, 64, torch.float32, per_seq=True, gated=True, affine="wb", lengths=[4, 0, 5], shuffle=True)
    dy, dxn = torch.randn(9, 64), torch.randn(9, 64)
    one = _backward(True, CUDA_BWD, a, kw, "layer", dy, dxn)
    two = _backward(True, CUDA_BWD, a, kw, "layer", dy, dxn)
    for g1, g2 in zip(one, two):
        assert torch.equal(g1, g2)


def test_autograd_through_the_op():
    """The registered cuda backend (forward + backward) drives torch autograd like the reference."""
    a, kw = _inputs(5, 64, torch.float32, per_seq=True, gated=True, affine="wb", lengths=[2, 0, 3])
    leaves = {k: v.clone().requires_grad_(True) for k, v in a.items() if k != "seq_ids"}
    leaves_r = {k: v.clone().requires_grad_(True) for k, v in a.items() if k != "seq_ids"}
    for lv, backend in ((leaves, "cuda"), (leaves_r, "torch")):
        x_new, y = O.gated_residual_adaln(lv["x"], lv["branch"], lv["gate"], lv["shift"], lv["scale"], a["seq_ids"],
                                          backend=backend, **kw)
        (x_new.square().sum() + (y * torch.linspace(-1, 1, 64)).sum()).backward()
    for k in leaves:
        assert_close(leaves[k].grad, leaves_r[k].grad, torch.float32, msg=k)


def test_vector_width_main_path_and_scalar_fallback():
    """16-byte accesses when every row is 16-byte aligned, the scalar path otherwise."""
    C = _ext.require_extension("test")

    def width(d, dtype):
        x = torch.empty(2, d, dtype=dtype)
        t = torch.empty(2, d)
        return C.emu.adaln_vector_width({
            "n_rows": 2, "d": d, "rms": 0, "gated": 0, "dtype_x": _cuda._DTYPE_CODE[dtype], "dtype_p": 0,
            "x": x.data_ptr(), "x_stride": d, "shift": t.data_ptr(), "shift_stride": d, "scale": t.data_ptr(),
            "scale_stride": d, "y": x.data_ptr(), "y_stride": d})

    assert width(1536, torch.bfloat16) == 8
    assert width(5120, torch.float32) == 4
    assert width(769, torch.bfloat16) == 1


def test_bad_input_is_rejected_before_launch():
    x, t, ids = torch.randn(3, 8), torch.randn(2, 8), torch.tensor([0, 1, 1], dtype=torch.int32)
    with pytest.raises(ValueError, match="float32, float16 or bfloat16, got float64"):
        O.adaln_modulate(x.double(), t, t, ids, backend="cuda")
    with pytest.raises(ValueError, match="branch in x's dtype"):
        O.gated_residual_adaln(x, x.half(), t, t, t, ids, backend="cuda")
    with pytest.raises(ValueError, match="seq_ids values must lie in"):
        O.adaln_modulate(x, t, t, torch.tensor([0, 2, 1], dtype=torch.int32), backend="cuda")
    with pytest.raises(ValueError, match="hidden sizes 1..16384, got D=16385"):
        _cuda.adaln_modulate(torch.randn(1, 16385), torch.randn(1, 16385), torch.randn(1, 16385), None)
    C = _ext.require_extension("test")
    with pytest.raises(ValueError, match="launcher argument 'x' must be a non-null pointer"):
        C.emu.adaln_forward({"n_rows": 1, "d": 8, "rms": 0, "gated": 0, "dtype_x": 0, "dtype_p": 0}, 1e-6)


def test_strided_rows_are_read_in_place():
    """A column slice (row stride > D) and a non-contiguous last dim give the reference's result."""
    base = torch.randn(6, 72)
    x = base[:, :64]
    shift, scale = torch.randn(2, 64), torch.randn(2, 64).t().contiguous().t()
    ids = torch.tensor([0, 0, 1, 1, 1, 0], dtype=torch.int32)
    assert_close(O.adaln_modulate(x, shift, scale, ids, backend="cuda"), O.adaln_modulate_ref(x, shift, scale, ids))


# --- combinations the grids above leave out (small row counts: emulation costs per thread) -----------
EXTRA_FWD = [
    # (gated, norm, dtype, d, lengths or None for per-token tables, affine)
    (True, "rms", torch.float16, 1536, [1, 0, 1], "w"),
    (True, "layer", torch.float16, 5120, [1, 1], "wb"),
    (True, "rms", torch.bfloat16, 5120, None, "wb"),       # gated RMS, per-token tables, RMS with a bias
    (False, "rms", torch.float32, 1536, None, "wb"),
    (False, "layer", torch.bfloat16, 5120, None, None),
]


@pytest.mark.parametrize("gated,norm,dtype,d,lengths,affine", EXTRA_FWD,
                         ids=[f"{'gated' if c[0] else 'mod'}-{c[1]}-{str(c[2])[6:]}-d{c[3]}-{'seq' if c[4] else 'tok'}"
                              f"-{c[5] or 'noaff'}" for c in EXTRA_FWD])
def test_forward_extra_combinations(gated, norm, dtype, d, lengths, affine):
    n = sum(lengths) if lengths else 2
    a, kw = _inputs(n, d, dtype, per_seq=lengths is not None, gated=gated, affine=affine, lengths=lengths)
    got = _fwd(gated, "cuda", a, kw, norm)
    ref = _fwd(gated, "torch", a, kw, norm)
    if gated:
        assert torch.equal(got[0], ref[0])
        got, ref = got[1], ref[1]
    assert_close(got, ref, dtype, msg="y")


EXTRA_BWD = [
    # (gated, norm, dtype, d, lengths or None, affine): per-token at large D, fp16 beyond D = 769,
    # RMS with a bias, empty sequences first and last
    (True, "rms", torch.float16, 1536, None, "wb"),
    (False, "layer", torch.bfloat16, 5120, None, "w"),
    (True, "rms", torch.float32, 1536, [0, 2, 0, 1, 0], "wb"),
]


@pytest.mark.parametrize("gated,norm,dtype,d,lengths,affine", EXTRA_BWD,
                         ids=[f"{'gated' if c[0] else 'mod'}-{c[1]}-{str(c[2])[6:]}-d{c[3]}-{'seq' if c[4] else 'tok'}"
                              for c in EXTRA_BWD])
def test_backward_extra_combinations(gated, norm, dtype, d, lengths, affine):
    n = sum(lengths) if lengths else 3
    a, kw = _inputs(n, d, dtype, per_seq=lengths is not None, gated=gated, affine=affine, lengths=lengths)
    dy, dxn = torch.randn(n, d).to(dtype), torch.randn(n, d).to(dtype)
    got = _backward(gated, CUDA_BWD, a, kw, norm, dy, dxn)
    ref32 = _backward(gated, REF_BWD, _upcast(a), kw, norm, dy.float(), dxn.float())
    peer = _backward(gated, REF_BWD, a, kw, norm, dy, dxn)
    for g, r, p in zip(got, ref32, peer):
        if r is None:
            assert g is None
            continue
        assert g.shape == p.shape and g.dtype == p.dtype and not torch.isnan(g).any()
        atol = TOL[torch.float32][0] * max(1.0, r.abs().max().item())
        if dtype == torch.float32:
            torch.testing.assert_close(g.double(), r.double(), atol=atol, rtol=TOL[torch.float32][1])
        else:
            assert_within_lowp_error(g, r, p, atol=atol)


def test_reduction_has_no_order_dependent_atomics():
    """Determinism by construction: the emulation runs blocks one after another, so a repeat run (above)
    cannot expose an order-dependent reduction; the source can. Parameter gradients go through per-segment
    partials and adaln_param_reduce_kernel's fixed-order loop, never through atomics."""
    from pathlib import Path

    src = (Path(__file__).resolve().parents[1] / "kernels" / "adaln.cuh").read_text()
    assert "atomic" not in src.lower()
    assert "for (int seg = lo; seg < hi; ++seg)" in src  # the fixed-order second pass


# --- empty inputs -----------------------------------------------------------------------------------
@pytest.mark.parametrize("gated", [False, True], ids=["modulate", "gated"])
@pytest.mark.parametrize("n,d,per_seq", [(0, 64, True), (0, 64, False), (5, 0, True), (0, 0, True)],
                         ids=["N0-seq", "N0-tok", "D0", "N0-D0"])
def test_empty_inputs_match_the_torch_backend(gated, n, d, per_seq):
    """No launch (empty tensors have no data pointer): the same empty outputs and zero parameter
    gradients as the torch backend, forward and backward."""
    a, kw = _inputs(n, d, torch.float32, per_seq=per_seq, gated=gated, affine="wb", lengths=[n, 0] if per_seq else None)
    results = {}
    for backend in ("cuda", "torch"):
        leaves = {k: v.clone().requires_grad_(True) for k, v in a.items() if k != "seq_ids"}
        kwl = {k: v.clone().requires_grad_(True) for k, v in kw.items()}
        outs = _fwd(gated, backend, {**leaves, "seq_ids": a["seq_ids"]}, kwl, "layer")
        outs = outs if gated else (outs,)
        sum(o.sum() for o in outs).backward()
        results[backend] = (outs, {k: t.grad for k, t in {**leaves, **kwl}.items()})
    (outs, grads), (outs_r, grads_r) = results["cuda"], results["torch"]
    for o, r in zip(outs, outs_r):
        assert o.shape == r.shape == (n, d) and o.dtype == r.dtype
    assert grads.keys() == grads_r.keys()
    for k in grads:
        assert grads[k].shape == grads_r[k].shape, k
        assert torch.equal(grads[k], grads_r[k]), k  # zeros (or empty) on both


# --- the registered ops called directly ---------------------------------------------------------------
def _bad_op_calls():
    d = 8
    x, dy = torch.randn(4, d), torch.randn(4, d)
    t2, t1, t4 = torch.randn(2, d), torch.randn(1, d), torch.randn(4, d)
    ok = torch.tensor([0, 1, 1, 0], dtype=torch.int32)
    big = torch.tensor([0, 1, 3, 1], dtype=torch.int32)
    neg = torch.tensor([0, -1, 1, 0], dtype=torch.int32)
    ops = torch.ops.sora_fast
    tail = ("layer", None, None, 1e-6)
    return [
        ("mod-scale-rows", lambda b: ops.adaln_modulate(x, t4, t1, torch.arange(4, dtype=torch.int32), *tail, b),
         "scale must have shift's number of rows \\(4\\), got 1"),
        ("mod-ids-range", lambda b: ops.adaln_modulate(x, t2, t2, big, *tail, b),
         "seq_ids values must lie in \\[0, 2\\).*max 3"),
        ("mod-ids-negative", lambda b: ops.adaln_modulate(x, t2, t2, neg, *tail, b), "seq_ids values.*min -1"),
        ("mod-ids-int64", lambda b: ops.adaln_modulate(x, t2, t2, ok.long(), *tail, b), "seq_ids must have dtype"),
        ("mod-bwd-ids-range", lambda b: ops.adaln_modulate_backward(dy, x, t2, t2, big, *tail, b),
         "seq_ids values must lie in \\[0, 2\\)"),
        ("mod-bwd-scale-rows", lambda b: ops.adaln_modulate_backward(dy, x, t2, t1, ok, *tail, b),
         "scale must have shift's number of rows"),
        ("mod-bwd-dy-shape", lambda b: ops.adaln_modulate_backward(dy[:3], x, t2, t2, ok, *tail, b),
         "dy must have x's shape"),
        ("gated-gate-rows", lambda b: ops.gated_residual_adaln(x, x, t1, t2, t2, ok, *tail, b),
         "shift must have gate's number of rows \\(1\\), got 2"),
        ("gated-ids-range", lambda b: ops.gated_residual_adaln(x, x, t2, t2, t2, big, *tail, b),
         "seq_ids values must lie in"),
        ("gated-branch-shape", lambda b: ops.gated_residual_adaln(x, x[:2], t2, t2, t2, ok, *tail, b),
         "branch must have x's shape"),
        ("gated-bwd-ids-range", lambda b: ops.gated_residual_adaln_backward(dy, dy, x, x, t2, t2, t2, big, *tail, b),
         "seq_ids values must lie in"),
        ("gated-bwd-scale-rows", lambda b: ops.gated_residual_adaln_backward(None, dy, x, x, t2, t2, t1, ok, *tail, b),
         "scale must have gate's number of rows"),
        ("mod-weight-shape", lambda b: ops.adaln_modulate(x, t2, t2, ok, "layer", torch.ones(d + 1), None, 1e-6, b),
         "weight must have shape \\(8,\\)"),
    ]


@pytest.mark.parametrize("backend", ["cuda", "torch"])
@pytest.mark.parametrize("case", _bad_op_calls(), ids=[c[0] for c in _bad_op_calls()])
def test_registered_ops_check_tables_and_seq_ids(backend, case):
    """torch.ops.sora_fast.* skip the public functions' checks, so the ops check again before any launch:
    no kernel reads outside its tables."""
    _, call, match = case
    with pytest.raises(ValueError, match=match):
        call(backend)


# --- layouts ----------------------------------------------------------------------------------------
class _Recorder:
    """Wraps the emulated launchers and records the arguments of each call."""

    def __init__(self, launch):
        self.launch, self.calls = launch, []

    def __getattr__(self, name):
        fn = getattr(self.launch, name)

        def record(args, *rest):
            self.calls.append((name, dict(args)))
            return fn(args, *rest)

        return record


@pytest.fixture
def recorder(monkeypatch):
    rec = {}
    real = _cuda._launchers

    def launchers(device, what):
        rec["r"] = _Recorder(real(device, what))
        return rec["r"]

    monkeypatch.setattr(_cuda, "_launchers", launchers)
    return rec


def test_layouts_with_unit_last_stride_are_read_in_place_others_are_copied(recorder):
    """The documented layout rule of backend="cuda": any row stride is read in place, other layouts
    (transposed, stride-0 expanded) are copied first; every layout gives the reference's result."""
    base = torch.randn(6, 72)
    ids = torch.tensor([0, 0, 1, 1, 1, 0], dtype=torch.int32)
    shift, scale = torch.randn(2, 64), torch.randn(2, 64)
    x = base[:, 4:68]  # row stride 72: in place
    y = O.adaln_modulate(x, shift, scale, ids, backend="cuda")
    args = recorder["r"].calls[-1][1]
    assert args["x"] == x.data_ptr() and args["x_stride"] == 72
    assert_close(y, O.adaln_modulate_ref(x, shift, scale, ids), torch.float32)

    xt = torch.randn(64, 6).t()  # last-dim stride 6: copied
    y = O.adaln_modulate(xt, shift, scale.t().contiguous().t(), ids, backend="cuda")
    args = recorder["r"].calls[-1][1]
    assert args["x"] != xt.data_ptr() and args["x_stride"] == 64
    assert_close(y, O.adaln_modulate_ref(xt, shift, scale, ids), torch.float32)

    # autograd of y.sum() hands the backward a stride-0 (expanded) dy: copied, same gradients
    grads = {}
    for backend in ("cuda", "torch"):
        leaf = x.detach().clone().requires_grad_(True)
        sh = shift.clone().requires_grad_(True)
        O.adaln_modulate(leaf, sh, scale, ids, backend=backend).sum().backward()
        grads[backend] = (leaf.grad, sh.grad)
    for g, r in zip(grads["cuda"], grads["torch"]):
        assert_close(g, r, torch.float32)


def test_opcheck_with_the_cuda_backend():
    """torch.library.opcheck (schema, fake tensors, autograd registration, AOT dispatch) on the cuda
    backend: the gated op with per-sequence tables and an affine weight covers both ops' machinery."""
    ids = torch.tensor([0, 0, 1, 1, 1], dtype=torch.int32)
    r = lambda *s: torch.randn(*s, requires_grad=True)  # noqa: E731
    torch.library.opcheck(torch.ops.sora_fast.gated_residual_adaln.default,
                          (r(5, 16), r(5, 16), r(2, 16), r(2, 16), r(2, 16), ids, "rms", r(16), None, 1e-6, "cuda"))
