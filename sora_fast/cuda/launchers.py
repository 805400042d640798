"""The ``cuda`` backend of the adaLN family and the VAE norms: torch tensors to the launchers of ``sora_fast._C``.

CUDA tensors go to the GPU launchers (``_C.adaln_forward`` ...); CPU tensors to the host emulation of
the same ``kernels/*.cuh`` source (``_C.emu.adaln_forward`` ...: slow, exact, for tests). Each public
function here takes exactly the arguments of the op's ``torch`` backend (its ``*_ref``) and returns
the same things; ``sora_fast/ops/adaln.py`` and ``vae_norm.py`` register them with
``_dispatch.register_kernel(op, "cuda", "sora_fast.cuda.launchers:<fn>")``.

What the kernels rely on, and is checked here before any launch (ValueError otherwise):
x in float32/float16/bfloat16; branch, dy, dx_new in x's dtype; shift, scale, gate with the same
number of rows (N with ``seq_ids=None``) and D columns; weight, bias ``(D,)`` (``(C,)`` for the VAE
norms); D <= 16384 (8192 for the backward); seq_ids int32 with one entry per row and values in
``[0, rows of the tables)`` (the adaLN functions check the values themselves, so the ops skip their
own check for this backend: see ``checks_index_values``; the backward reads them in the same
device-to-host copy that sizes its segment buffers). Tables, weight and bias are used in x's dtype
when all of them have it, else all in float32 (an exact conversion, the references compute in float32
anyway). Empty inputs (N = 0 or D = 0; B, T, H or W = 0) return empty outputs and zero parameter
gradients without a launch, as the references do.

Layouts. Read in place: adaLN operands whose last dim has unit stride (any row stride >= D, e.g.
a column slice of a wider buffer); VAE inputs that are contiguous or channels_last_3d. Any other
layout (a transposed (N, D) tensor, a stride-0 expanded gradient, a time slice of a contiguous 5-D x) is
copied to a contiguous tensor first: one extra read and write of that operand, never an error, as
torch's own fused norms and flash-attn's and Liger's Triton norms do.

Backward of group_norm_silu and channel_rms_norm_silu: there is no CUDA kernel yet; their
``*_backward`` here run the plain-torch reference VJP (correct, not fast).
"""
from __future__ import annotations

import os
from typing import Optional

import torch

from .. import _ext
from ..reference.vae_norm import _gn_backward_ref, _rms_backward_ref

# NaN-fill every output before the launch, so an element a kernel forgets to write shows up in a
# comparison (tests set it; also SORA_FAST_POISON_OUTPUTS=1).
POISON_OUTPUTS = os.environ.get("SORA_FAST_POISON_OUTPUTS", "") == "1"

_DTYPE_CODE = {torch.float32: 0, torch.float16: 1, torch.bfloat16: 2}
MAX_D = 16384           # forward: one row per block of <= 1024 threads, 16 values each
MAX_D_BACKWARD = 8192   # backward: <= 512 threads


def _launchers(device: torch.device, what: str):
    ext = _ext.require_extension(f"the cuda backend of {what}")
    if device.type == "cuda":
        if not ext.build_info().get("cuda_compiled", False):
            raise RuntimeError(f"the cuda backend of {what} on CUDA tensors needs sora_fast._C built with nvcc")
        return ext
    if device.type != "cpu":
        raise ValueError(f"the cuda backend of {what} runs on cuda or cpu tensors, got {device}")
    return ext.emu


def _stream(device: torch.device) -> int:
    return torch.cuda.current_stream(device).cuda_stream if device.type == "cuda" else 0


class _Guard:
    """torch.cuda.device(x.device) for CUDA tensors, nothing for CPU."""

    def __init__(self, device):
        self.ctx = torch.cuda.device(device) if device.type == "cuda" else None

    def __enter__(self):
        if self.ctx is not None:
            self.ctx.__enter__()

    def __exit__(self, *exc):
        if self.ctx is not None:
            self.ctx.__exit__(*exc)


def _empty(shape, dtype, device, memory_format=torch.contiguous_format) -> torch.Tensor:
    t = torch.empty(shape, dtype=dtype, device=device, memory_format=memory_format)
    if POISON_OUTPUTS:
        t.fill_(float("nan"))
    return t


def _ptr(t: Optional[torch.Tensor]) -> int:
    return 0 if t is None else t.data_ptr()


def _check_x_dtype(x: torch.Tensor, what: str) -> None:
    if x.dtype not in _DTYPE_CODE:
        raise ValueError(f"the cuda backend of {what} supports x in float32, float16 or bfloat16, got "
                         f"{str(x.dtype).replace('torch.', '')} (use backend='torch')")


def _same_dtype(name: str, t: Optional[torch.Tensor], x: torch.Tensor, what: str) -> None:
    if t is not None and t.dtype != x.dtype:
        raise ValueError(f"the cuda backend of {what} needs {name} in x's dtype "
                         f"({str(x.dtype).replace('torch.', '')}), got {str(t.dtype).replace('torch.', '')}")


def _rows(t: Optional[torch.Tensor]) -> tuple[Optional[torch.Tensor], int]:
    """(tensor with rows of contiguous elements, row stride in elements): read in place when its last
    dim has unit stride and rows do not overlap, else copied to a contiguous tensor (module docstring)."""
    if t is None:
        return None, 0
    n, d = t.shape
    if t.stride(-1) != 1 or (n > 1 and t.stride(0) < d):
        t = t.contiguous()
    return t, (t.stride(0) if n > 1 else d)


def _param_dtype(x: torch.Tensor, params) -> torch.dtype:
    present = [p for p in params if p is not None]
    return x.dtype if all(p.dtype == x.dtype for p in present) else torch.float32


# --- adaLN ---------------------------------------------------------------------------------------
def _adaln_common(x, branch, gate, shift, scale, seq_ids, weight, bias, what, max_d):
    _check_x_dtype(x, what)
    if x.dim() != 2:
        raise ValueError(f"x must be (N, D), got shape {tuple(x.shape)}")
    n, d = x.shape
    if x.numel() and d > max_d:  # empty x (N = 0 or D = 0) needs no launch: any D
        raise ValueError(f"the cuda backend of {what} supports hidden sizes 1..{max_d}, got D={d}")
    _same_dtype("branch", branch, x, what)
    if branch is not None and branch.shape != x.shape:
        raise ValueError(f"branch must have x's shape ({n}, {d}), got {tuple(branch.shape)}")
    if seq_ids is not None and (seq_ids.dtype != torch.int32 or seq_ids.shape != (n,)):
        raise ValueError(f"seq_ids must be int32 of shape ({n},), got {seq_ids.dtype} {tuple(seq_ids.shape)}")
    rows = None  # every table is indexed by the same seq_ids (or row): one row count for all
    for name, t in (("shift", shift), ("scale", scale), ("gate", gate)):
        if t is None:
            continue
        if t.dim() != 2 or t.shape[1] != d or (seq_ids is None and t.shape[0] != n):
            raise ValueError(f"{name} must be ({'R' if seq_ids is not None else n}, {d}), got {tuple(t.shape)}")
        if rows is not None and t.shape[0] != rows[1]:
            raise ValueError(f"{name} must have {rows[0]}'s number of rows ({rows[1]}), got {t.shape[0]}")
        rows = rows or (name, t.shape[0])
    for name, t in (("weight", weight), ("bias", bias)):
        if t is not None and t.shape != (d,):
            raise ValueError(f"{name} must be ({d},), got {tuple(t.shape)}")
    pd = _param_dtype(x, (gate, shift, scale, weight, bias))
    conv = lambda t: None if t is None else t.to(pd)  # noqa: E731
    weight = None if weight is None else conv(weight).contiguous()
    bias = None if bias is None else conv(bias).contiguous()
    return n, d, pd, conv(gate), conv(shift), conv(scale), weight, bias


def _check_seq_ids_range(lo: int, hi: int, rows: int) -> None:
    if lo < 0 or hi >= rows:
        raise ValueError(f"seq_ids values must lie in [0, {rows}) (row ids into the tables' rows), "
                         f"got min {lo}, max {hi}")


def _base_args(n, d, x, x_st, norm, gated, pd, shift, scale, gate, seq_ids, weight, bias):
    (shift, sh_st), (scale, sc_st), (gate, g_st) = _rows(shift), _rows(scale), _rows(gate)
    args = {
        "n_rows": n, "d": d, "rms": int(norm == "rms"), "gated": int(gated),
        "dtype_x": _DTYPE_CODE[x.dtype], "dtype_p": _DTYPE_CODE[pd],
        "x": _ptr(x), "x_stride": x_st,
        "shift": _ptr(shift), "shift_stride": sh_st, "scale": _ptr(scale), "scale_stride": sc_st,
        "gate": _ptr(gate), "gate_stride": g_st,
        "seq_ids": _ptr(seq_ids), "weight": _ptr(weight), "bias": _ptr(bias),
    }
    return args, (shift, scale, gate)  # keep the converted tensors alive until the launch returns


def _adaln_forward(x, branch, gate, shift, scale, seq_ids, norm, weight, bias, eps, what):
    if norm not in ("layer", "rms"):
        raise ValueError(f"norm must be 'layer' or 'rms', got {norm!r}")
    n, d, pd, gate, shift, scale, weight, bias = _adaln_common(x, branch, gate, shift, scale, seq_ids, weight,
                                                               bias, what, MAX_D)
    launch = _launchers(x.device, what)
    gated = branch is not None
    if x.numel() == 0:  # the launchers require non-null pointers, and empty tensors have none
        y = torch.empty_like(x, memory_format=torch.contiguous_format)
        return (torch.empty_like(y), y) if gated else y
    if seq_ids is not None:  # one device-to-host copy: min and max together
        _check_seq_ids_range(*torch.stack(torch.aminmax(seq_ids)).tolist(), shift.shape[0])
    x, x_st = _rows(x)
    branch, br_st = _rows(branch)
    seq_ids = None if seq_ids is None else seq_ids.contiguous()
    args, keep = _base_args(n, d, x, x_st, norm, gated, pd, shift, scale, gate, seq_ids, weight, bias)
    y = _empty((n, d), x.dtype, x.device)
    x_new = _empty((n, d), x.dtype, x.device) if gated else None
    args.update({"y": _ptr(y), "y_stride": d, "branch": _ptr(branch), "branch_stride": br_st,
                 "x_new": _ptr(x_new), "x_new_stride": d})
    with _Guard(x.device):
        launch.adaln_forward(args, float(eps), _stream(x.device))
    del keep
    return (x_new, y) if gated else y


def _rows_per_block(n: int, device: torch.device) -> int:
    """Rows each backward block walks through (its parameter-gradient partials are per block)."""
    if device.type == "cuda":
        blocks = 4 * torch.cuda.get_device_properties(device).multi_processor_count
    else:
        blocks = 4  # the emulation: a few blocks, so the partial/segment logic is exercised
    return max(1, -(-n // blocks))


def _adaln_backward(dx_new, dy, x, branch, gate, shift, scale, seq_ids, norm, weight, bias, eps, what):
    if norm not in ("layer", "rms"):
        raise ValueError(f"norm must be 'layer' or 'rms', got {norm!r}")
    gated = branch is not None
    orig = {"shift": shift.dtype, "scale": scale.dtype, "gate": None if gate is None else gate.dtype,
            "weight": None if weight is None else weight.dtype, "bias": None if bias is None else bias.dtype}
    n, d, pd, gate, shift, scale, weight, bias = _adaln_common(x, branch, gate, shift, scale, seq_ids, weight,
                                                               bias, what, MAX_D_BACKWARD)
    _same_dtype("dy", dy, x, what)
    _same_dtype("dx_new", dx_new, x, what)
    launch = _launchers(x.device, what)
    dev = x.device
    per_seq = seq_ids is not None
    num_rows_tables = shift.shape[0]
    if x.numel() == 0:  # nothing to launch: empty input gradients, zero parameter gradients
        out = {k: (None if orig[k] is None else torch.zeros_like(t, dtype=orig[k]))
               for k, t in (("shift", shift), ("scale", scale), ("gate", gate), ("weight", weight), ("bias", bias))}
        dx = torch.empty_like(x, memory_format=torch.contiguous_format)
        return dx, (torch.empty_like(dx) if gated else None), out
    if dy is None:  # gated op whose y got no gradient
        dy = torch.zeros_like(x)
    x, x_st = _rows(x)
    branch, br_st = _rows(branch)
    dy, dy_st = _rows(dy)
    dx_new, dxn_st = _rows(dx_new)
    seq_ids = None if seq_ids is None else seq_ids.contiguous()
    args, keep = _base_args(n, d, x, x_st, norm, gated, pd, shift, scale, gate, seq_ids, weight, bias)
    dx = _empty((n, d), x.dtype, dev)
    dbranch = _empty((n, d), x.dtype, dev) if gated else None
    args.update({"branch": _ptr(branch), "branch_stride": br_st, "dy": _ptr(dy), "dy_stride": dy_st,
                 "dx_new": _ptr(dx_new), "dx_new_stride": dxn_st, "dx": _ptr(dx), "dx_stride": d,
                 "dbranch": _ptr(dbranch), "dbranch_stride": d})
    grads = {}
    if not per_seq:  # per-token tables: gradients written row by row
        for k in ("shift", "scale") + (("gate",) if gated else ()):
            grads[k] = _empty((n, d), pd, dev)
            args[f"d{k}"], args[f"d{k}_stride"] = _ptr(grads[k]), d
    slots = ((["shift", "scale"] + (["gate"] if gated else [])) if per_seq else []) \
        + (["weight"] if weight is not None else []) + (["bias"] if bias is not None else [])
    nslots = len(slots)
    rpb = _rows_per_block(n, dev)
    args.update({"nslots": nslots, "rows_per_block": rpb})
    seg = None
    if nslots:
        # Segments: runs of equal seq_id inside each block's rows, rows taken in seq_id order (a
        # stable sort), so every partial belongs to one sequence and the sums have a fixed order.
        num_blocks = -(-n // rpb)
        if per_seq:
            sorted_ids, perm = torch.sort(seq_ids, stable=True)
            perm = perm.to(torch.int32)
            chunk = torch.arange(n, device=dev) // rpb
            change = torch.ones(n, dtype=torch.bool, device=dev)
            change[1:] = (sorted_ids[1:] != sorted_ids[:-1]) | (chunk[1:] != chunk[:-1])
            # The one device-to-host copy of the backward: the range check of seq_ids and the segment
            # count that sizes `partial`, together (no torch.nonzero, which would be a second sync).
            lo, hi, num_segments = torch.stack((sorted_ids[0].long(), sorted_ids[-1].long(),
                                                change.sum())).tolist()
            _check_seq_ids_range(lo, hi, num_rows_tables)
            seg_of_pos = torch.cumsum(change, 0) - 1          # segment of each sorted position
            block_seg0 = seg_of_pos[::rpb].to(torch.int32)    # a block's first position starts a segment
            seg_seq = torch.zeros(num_segments, dtype=torch.long, device=dev)
            seg_seq.scatter_(0, seg_of_pos, sorted_ids.long())  # all writers of a segment write its seq_id
            seq_seg_ptr = torch.searchsorted(seg_seq, torch.arange(num_rows_tables + 1, device=dev)
                                             ).to(torch.int32)
        else:  # one segment per block (every row has "sequence" 0): nothing to read back
            perm, seq_seg_ptr, num_segments = None, None, num_blocks
            block_seg0 = torch.arange(num_blocks, dtype=torch.int32, device=dev)
        partial = torch.empty((num_segments, nslots, d), dtype=torch.float32, device=dev)
        seg = (perm, block_seg0, partial, seq_seg_ptr, num_segments)
        args.update({"perm": _ptr(perm), "block_seg0": _ptr(block_seg0), "partial": _ptr(partial)})
    with _Guard(dev):
        stream = _stream(dev)
        launch.adaln_backward(args, float(eps), stream)
        fp32 = {}
        for k in slots:
            rows = num_rows_tables if k in ("shift", "scale", "gate") else 1
            fp32[k] = _empty((rows, d), torch.float32, dev)  # the reduce writes every element
        if seg is not None:
            perm, block_seg0, partial, seq_seg_ptr, num_segments = seg
            rargs = {"d": d, "nslots": nslots, "num_table_rows": num_rows_tables if per_seq else 0,
                     "num_segments": num_segments, "seq_seg_ptr": _ptr(seq_seg_ptr), "partial": _ptr(partial)}
            for i, k in enumerate(slots):
                rargs[f"slot_d{k}"], rargs[f"d{k}"] = i, _ptr(fp32[k])
            launch.adaln_param_reduce(rargs, stream)
    del keep
    for k, g in fp32.items():
        grads[k] = g.reshape(-1) if k in ("weight", "bias") else g
    out = {k: (grads[k].to(orig[k]) if k in grads else None) for k in ("shift", "scale", "gate", "weight", "bias")}
    return dx, dbranch, out


def adaln_modulate(x, shift, scale, seq_ids, *, norm="layer", weight=None, bias=None, eps=1e-6):
    """Kernel of ``adaln_modulate`` (same arguments and result as ``adaln_modulate_ref``)."""
    return _adaln_forward(x, None, None, shift, scale, seq_ids, norm, weight, bias, eps, "adaln_modulate")


def gated_residual_adaln(x, branch, gate, shift, scale, seq_ids, *, norm="layer", weight=None, bias=None,
                         eps=1e-6):
    """Kernel of ``gated_residual_adaln``: returns ``(x_new, y)`` like ``gated_residual_adaln_ref``."""
    return _adaln_forward(x, branch, gate, shift, scale, seq_ids, norm, weight, bias, eps, "gated_residual_adaln")


def adaln_modulate_backward(dy, x, shift, scale, seq_ids, *, norm="layer", weight=None, bias=None, eps=1e-6):
    """``(dx, dshift, dscale, dweight, dbias)``; dweight/dbias None when weight/bias are."""
    dx, _, g = _adaln_backward(None, dy, x, None, None, shift, scale, seq_ids, norm, weight, bias, eps,
                               "adaln_modulate")
    return dx, g["shift"], g["scale"], g["weight"], g["bias"]


def gated_residual_adaln_backward(dx_new, dy, x, branch, gate, shift, scale, seq_ids, *, norm="layer",
                                  weight=None, bias=None, eps=1e-6):
    """``(dx, dbranch, dgate, dshift, dscale, dweight, dbias)`` from the gradients of ``(x_new, y)``
    (either may be None)."""
    if dx_new is None and dy is None:
        dy = torch.zeros_like(x)
    dx, dbranch, g = _adaln_backward(dx_new, dy, x, branch, gate, shift, scale, seq_ids, norm, weight, bias, eps,
                                     "gated_residual_adaln")
    return dx, dbranch, g["gate"], g["shift"], g["scale"], g["weight"], g["bias"]


# The adaLN ops skip their own range check of seq_ids for these functions: they make it
# here, before the launch, in a device-to-host copy the backward needs anyway.
for _fn in (adaln_modulate, gated_residual_adaln, adaln_modulate_backward, gated_residual_adaln_backward):
    _fn.checks_index_values = True
del _fn


# --- VAE norms ------------------------------------------------------------------------------------
def _vae_prepare(x, weight, bias, what):
    _check_x_dtype(x, what)
    if x.dim() != 5:
        raise ValueError(f"x must be (B, C, T, H, W), got shape {tuple(x.shape)}")
    cl = not x.is_contiguous() and x.is_contiguous(memory_format=torch.channels_last_3d)
    if not cl:
        x = x.contiguous()  # a no-op for contiguous x; other layouts: copied (module docstring)
    c = x.shape[1]
    for name, t in (("weight", weight), ("bias", bias)):
        if t is not None and t.shape != (c,):
            raise ValueError(f"{name} must be ({c},), got {tuple(t.shape)}")
    pd = _param_dtype(x, (weight, bias))
    weight = None if weight is None else weight.to(pd).contiguous()
    bias = None if bias is None else bias.to(pd).contiguous()
    b, _, t, h, w = x.shape
    fmt = torch.channels_last_3d if cl else torch.contiguous_format
    y = _empty(x.shape, x.dtype, x.device, memory_format=fmt)
    args = {"batch": b, "channels": c, "spatial": t * h * w, "channels_last": int(cl),
            "dtype_x": _DTYPE_CODE[x.dtype], "dtype_p": _DTYPE_CODE[pd],
            "x": _ptr(x), "y": _ptr(y), "weight": _ptr(weight), "bias": _ptr(bias)}
    return x, y, args, (weight, bias)


def group_norm_silu(x, num_groups, weight=None, bias=None, *, eps=1e-6, silu=True):
    """Kernel of ``group_norm_silu`` (forward): x ``(B, C, T, H, W)`` contiguous or channels_last_3d
    read in place, any other layout copied first."""
    x, y, args, keep = _vae_prepare(x, weight, bias, "group_norm_silu")
    c = x.shape[1]
    if isinstance(num_groups, bool) or not isinstance(num_groups, int) or num_groups < 1 or c % num_groups:
        raise ValueError(f"num_groups must be a positive int dividing the {c} channels, got {num_groups!r}")
    if x.numel() == 0:  # B, T, H or W = 0: nothing to launch (the launchers need non-null pointers)
        return y
    m = c // num_groups * args["spatial"]
    nchunks = min(64, max(1, -(-m // 4096)))
    chunk = -(-max(1, -(-m // nchunks)) // 8) * 8  # a multiple of every vector width: 16-byte stats loads
    nchunks = max(1, -(-m // chunk))
    bg = x.shape[0] * num_groups
    partial = torch.empty((bg, nchunks, 3), dtype=torch.float32, device=x.device)
    stats = torch.empty((bg, 2), dtype=torch.float32, device=x.device)
    args.update({"groups": num_groups, "silu": int(bool(silu)), "partial": _ptr(partial), "stats": _ptr(stats),
                 "chunk": chunk, "nchunks": nchunks})
    launch = _launchers(x.device, "group_norm_silu")
    with _Guard(x.device):
        launch.group_norm_silu(args, float(eps), _stream(x.device))
    del keep
    return y


def channel_rms_norm_silu(x, weight, bias=None, *, eps=1e-12, silu=True):
    """Kernel of ``channel_rms_norm_silu`` (forward): x ``(B, C, T, H, W)`` contiguous or
    channels_last_3d read in place, any other layout copied first."""
    if weight is None:
        raise TypeError("weight must be a (C,) tensor, got None")
    x, y, args, keep = _vae_prepare(x, weight, bias, "channel_rms_norm_silu")
    if x.numel() == 0:  # B, C, T, H or W = 0: nothing to launch
        return y
    args["silu"] = int(bool(silu))
    launch = _launchers(x.device, "channel_rms_norm_silu")
    with _Guard(x.device):
        launch.channel_rms_norm_silu(args, float(eps), _stream(x.device))
    del keep
    return y


def group_norm_silu_backward(grad, x, num_groups, weight, bias, *, eps=1e-6, silu=True):
    """Backward of group_norm_silu: the plain-torch reference VJP (no CUDA kernel yet)."""
    return _gn_backward_ref(grad, x, num_groups, weight, bias, eps=eps, silu=silu)


def channel_rms_norm_silu_backward(grad, x, weight, bias, *, eps=1e-12, silu=True):
    """Backward of channel_rms_norm_silu: the plain-torch reference VJP (no CUDA kernel yet)."""
    return _rms_backward_ref(grad, x, weight, bias, eps=eps, silu=silu)
