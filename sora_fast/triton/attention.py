"""Packed varlen spacetime attention in Triton: the launchers (the ``triton`` backend of
``sora_fast.ops.spacetime_attention``), their tile configs and what the offline kernel report compiles.
The kernels are in :mod:`sora_fast.triton._attention_kernels`.

Blocking: each (kernel, window, RoPE) variant has its own tile shape; every shipped config must compile
for sm_90 with 0 spill bytes and issue wgmma (the offline report's gate). The measurements behind the
tiles are in docs/triton_kernels.md.

fp32 inputs: dots in ``FP32_PRECISION`` ("tf32x3": three tf32 wgmmas per dot, near-fp32 accuracy) with
their own tiles; the variants for which no tile compiles without spills run torch fp32 math on a GPU
(``_fp32_reference``: the reference forward, or the streamed backward one block of query rows at a
time). The interpreter ignores the dot precision (exact fp32 on CPU).

Fused RoPE range: the kernels compute every rotation angle ``coord * theta ** (-2j / d_axis)`` in fp32
from the int32 coordinate (exact below 2**24) and an fp32 frequency, so an angle is off by up to
``|coord| * 2**-23`` rad (one rounding of the frequency, one of the product; the reference's fp64
angles are exact): an error that grows linearly with ``|coord|``, and the sin/cos range reduction (fp32
Cody-Waite constants) also loses accuracy past ``|angle|`` ~ 2**13. Measured under the interpreter
(unit-variance q, k, v, coordinates uniform in ``[-c, c]`` on all three axes; max over head dims 32, 64,
128 and up to 125 random draws), the largest error of the outputs / gradients against the fp64
reference, as a fraction of the fp32 tolerance the tests use (atol = rtol = 2e-5 for outputs, 5e-5 for
gradients): 0.63 / 0.4 at c = 2**10, 0.88 / 0.86 at 2**11, 1.7 / 1.6 at 2**12 (over), 3.3 / 4 at 2**13,
the RoPE part doubling with ``c``. So the fused RoPE takes ``|coord| <= ROPE_MAX_COORD = 2**10`` (the
last power of two with a margin over the tail of random inputs; latent grids are far smaller:
coordinates are patch indices) and raises ValueError beyond it; the range is read in the op's one host
transfer (no extra device sync).

Offsets: ``OFF64`` is picked on the host when some tensor spans 2**31 elements or more. Every small
table the kernels index (cu_seqlens, grid, RoPE coordinates) is made contiguous before the launch, and
window half-sizes are clamped to the grid's extents (same attention, int32 arithmetic).
"""
from __future__ import annotations

import warnings
from dataclasses import dataclass
from typing import Optional

import torch
import triton

from ..reference import attention as _reference
from ..reference.rope import rope3d_split
from ._attention_kernels import _attn_bwd_dkdv_kernel, _attn_bwd_dq_kernel, _attn_fwd_kernel
from ._blocks import BlockLists, block_table, pack_coords, window_block_lists
from ._common import dot_precision, extent
from ._common import interpreting as _interpreting
from ._spec import KernelConfig

LOG2E = 1.4426950408889634
MAX_HEAD_DIM = 128
ROPE_MAX_COORD = 2 ** 10   # largest |rope coordinate| whose fp32 angles keep fp32 accuracy (module docstring)


# --- launch configuration ------------------------------------------------------------------------
@dataclass(frozen=True)
class _Config:
    block_m: int
    block_n: int
    num_warps: int
    num_stages: int


# GPU configs per (kernel, window, fused RoPE), gated by the offline sm_90 report
# (`python -m sora_fast.tools.kernel_report`): 0 spill bytes, shared memory within limits, wgmma (HGMMA).
# RoPE keeps cos/sin tiles live, so its configs are smaller.
_GPU_CONFIGS = {
    ("fwd", False, False): _Config(128, 64, num_warps=8, num_stages=2),
    ("fwd", True, False): _Config(128, 64, num_warps=8, num_stages=2),
    ("fwd", False, True): _Config(64, 32, num_warps=8, num_stages=2),
    ("fwd", True, True): _Config(64, 32, num_warps=8, num_stages=2),
    ("dkdv", False, False): _Config(64, 64, num_warps=8, num_stages=2),
    ("dkdv", True, False): _Config(32, 64, num_warps=8, num_stages=2),
    ("dkdv", False, True): _Config(32, 64, num_warps=8, num_stages=2),
    ("dkdv", True, True): _Config(32, 64, num_warps=8, num_stages=2),
    ("dq", False, False): _Config(128, 64, num_warps=8, num_stages=2),
    ("dq", True, False): _Config(128, 64, num_warps=8, num_stages=2),
    ("dq", False, True): _Config(64, 32, num_warps=8, num_stages=2),
    ("dq", True, True): _Config(64, 32, num_warps=8, num_stages=2),
}
# fp32 inputs: FP32_PRECISION splits every dot into three tf32 wgmmas, whose split halves of the
# loop-invariant operands stay in registers: only these (kernel, window, RoPE, BLOCK_D) variants have a
# spill-free sm_90 tile (32- and 64-bit offsets); the others run torch fp32 math (_fp32_reference).
# Tiles tried and spill counts: docs/triton_kernels.md.
_GPU_CONFIGS_FP32 = {
    **{("fwd", window, rope, block_d): _Config(64, 32, num_warps=4, num_stages=2)
       for window in (False, True) for rope in (False, True) for block_d in (32, 64)},
    # d128: the windowed loops' list bookkeeping costs the 128x16 tile 40 B of spills at 64-bit offsets
    **{("fwd", window, rope, 128): _Config(128, 8 if window else 16, num_warps=8, num_stages=2)
       for window in (False, True) for rope in (False, True)},
    ("dkdv", False, False, 32): _Config(32, 64, num_warps=4, num_stages=2),
    ("dkdv", False, False, 64): _Config(32, 64, num_warps=4, num_stages=2),
    ("dq", False, False, 32): _Config(64, 32, num_warps=4, num_stages=2),
    ("dq", False, False, 64): _Config(64, 32, num_warps=4, num_stages=2),
}
FWD_BLOCK_M, FWD_BLOCK_N = _GPU_CONFIGS[("fwd", True, False)].block_m, _GPU_CONFIGS[("fwd", True, False)].block_n
# the windowed dK/dV kernel's tiles: the block density its loop visits (the backward's FLOPs credit)
BWD_BLOCK_M, BWD_BLOCK_N = _GPU_CONFIGS[("dkdv", True, False)].block_m, _GPU_CONFIGS[("dkdv", True, False)].block_n
# Small tiles under the interpreter: it costs per tile operation, not per element.
_INTERPRETER_CONFIG = _Config(32, 32, num_warps=4, num_stages=1)


def _gpu_config(kernel: str, window: bool, rope: bool, dtype: torch.dtype, head_dim: int) -> _Config | None:
    """The GPU tile of a launch; None for an fp32 variant without a spill-free tile."""
    if dtype == torch.float32:
        return _GPU_CONFIGS_FP32.get((kernel, window, rope, _dims(head_dim)[0]))
    return _GPU_CONFIGS[(kernel, window, rope)]


def _config(kernel: str, window, rope_coords, dtype: torch.dtype, head_dim: int) -> _Config:
    if _interpreting():
        return _INTERPRETER_CONFIG
    return _gpu_config(kernel, window is not None, rope_coords is not None, dtype, head_dim)


def _fp32_reference(kernels, q, window, rope_coords) -> bool:
    """fp32 inputs on a GPU for which one of ``kernels`` has no shipped (spill-free) tile: the launcher
    runs torch fp32 math instead (same results within fp32 tolerances; not the kernels' speed): the
    reference for the forward (every forward up to MAX_HEAD_DIM has a tile today), the streamed backward
    (:func:`~sora_fast.reference.attention.attention_backward_streamed`, bounded memory) for the backward."""
    if _interpreting() or q.dtype != torch.float32:
        return False
    missing = [kn for kn in kernels
               if _gpu_config(kn, window is not None, rope_coords is not None, q.dtype, q.shape[-1]) is None]
    key = (tuple(missing), window is not None, rope_coords is not None, _dims(q.shape[-1])[0])
    if missing and key not in _FP32_REFERENCE_WARNED:
        _FP32_REFERENCE_WARNED.add(key)
        warnings.warn(f"spacetime_attention(backend='triton'): float32 inputs with head dim {q.shape[-1]}"
                      f"{', a window' if window is not None else ''}{', RoPE' if rope_coords is not None else ''} "
                      f"have no spill-free sm_90 tile for the {'/'.join(missing)} kernel(s); running float32 "
                      "torch math instead, one block of query rows at a time (same results, not kernel speed). "
                      "bfloat16/float16 inputs run the kernels.", RuntimeWarning, stacklevel=3)
    return bool(missing)


_FP32_REFERENCE_WARNED: set = set()


def _dims(head_dim: int) -> tuple[int, int]:
    """(BLOCK_D, BLOCK_DH): padded head dim and its rotary half; tl.dot needs K >= 16 on the halves."""
    block_d = max(32, triton.next_power_of_2(head_dim))
    return block_d, block_d // 2


def _rope_tables(head_dim: int, theta: float, device) -> tuple[torch.Tensor, torch.Tensor]:
    """Per rotary pair: the axis (0=t, 1=h, 2=w) whose coordinate rotates it, and its frequency."""
    axes, freqs = [], []
    for axis, dims in enumerate(rope3d_split(head_dim)):
        for j in range(dims // 2):
            axes.append(axis)
            freqs.append(theta ** (-2.0 * j / dims))
    return (torch.tensor(axes, dtype=torch.int32, device=device),
            torch.tensor(freqs, dtype=torch.float32, device=device))


def _check_supported(q: torch.Tensor, v: torch.Tensor) -> None:
    head_dim = q.shape[-1]
    if not 1 <= head_dim <= MAX_HEAD_DIM:
        raise ValueError(f"the triton attention kernel supports head dims 1 to {MAX_HEAD_DIM}, "
                         f"got q.shape[-1]={head_dim}")
    if v.shape[-1] != head_dim:
        raise ValueError(f"the triton attention kernel needs v's head dim equal to q's ({head_dim}), "
                         f"got v.shape[-1]={v.shape[-1]}")
    if q.dtype not in (torch.float16, torch.bfloat16, torch.float32):
        raise ValueError(f"the triton attention kernel takes float16, bfloat16 or float32 inputs, "
                         f"got {str(q.dtype).replace('torch.', '')}")


def _empty(shape, dtype, device) -> torch.Tensor:
    """Output allocation; every element is written by exactly one program (tests poison it with NaN)."""
    return torch.empty(shape, dtype=dtype, device=device)


def _contig_last(t: torch.Tensor) -> torch.Tensor:
    return t if t.stride(-1) == 1 else t.contiguous()


# Row indices stay int32 in the kernels (cu_seqlens are int32); the margin covers a block's rows past
# the end of its sequence before they are masked.
_OFF32_LIMIT = 2 ** 31 - 1024


def _needs_off64(tensors, n_q: int, heads: int) -> bool:
    """Whether some offset the kernels compute inside a sequence (row * row stride + head * head stride +
    column, head * Nq + row into the LSE) can reach int32's range: then OFF64 (64-bit strides and head)."""
    largest = max([extent(t) for t in tensors] + [heads * n_q])
    return largest >= _OFF32_LIMIT


def _check_rows(q, k, rope_coords) -> None:
    """Token counts whose row indices (and 3 * row into the RoPE coordinates) fit the kernels' int32."""
    for name, n in (("q", q.shape[0]), ("k", k.shape[0])):
        if n >= _OFF32_LIMIT:
            raise ValueError(f"the triton attention kernel takes fewer than {_OFF32_LIMIT} rows, "
                             f"got {name}.shape[0]={n}")
    if rope_coords is not None and 3 * q.shape[0] >= _OFF32_LIMIT:
        raise ValueError(f"the triton attention kernel's fused RoPE takes fewer than {_OFF32_LIMIT // 3 + 1} rows, "
                         f"got q.shape[0]={q.shape[0]}")


def _check_rope_range(rope_coords, host) -> None:
    """|rope_coords| <= ROPE_MAX_COORD (see the module docstring), from the range the host read holds."""
    if rope_coords is None:
        return
    largest = host.rope_max
    if largest is None:      # a caller's host read without the coordinates: read them now
        largest = int(rope_coords.to(torch.int64).abs().amax()) if rope_coords.numel() else 0
    if largest > ROPE_MAX_COORD:
        raise ValueError(f"the triton attention kernel's fused RoPE computes its angles in fp32, accurate for "
                         f"|rope_coords| <= {ROPE_MAX_COORD}; got max |rope_coords| = {largest}. Apply "
                         f"sora_fast.ops.apply_rope3d first (fp64 angles), or use another backend")


def _common_args(q, cu_seqlens_q, rope_coords, rope_theta):
    """Tensors the kernels read beside q/k/v for RoPE (unused ones are any valid pointer), contiguous: the
    kernels index them as dense arrays."""
    if rope_coords is not None:
        axis, freq = _rope_tables(q.shape[-1], rope_theta, q.device)
        return rope_coords.contiguous(), axis, freq
    return cu_seqlens_q, cu_seqlens_q, cu_seqlens_q


# Block lists are cached per pack: keyed weakly on the coordinate tensor they were built from (the window's
# coords, or the grid for the t-major default), with its in-place version, so a pack reuses them across
# layers, heads, steps and the backward, and they go when the pack goes.
_LISTS: "torch.utils.weak.WeakIdKeyDictionary" = torch.utils.weak.WeakIdKeyDictionary()
_LISTS_KEPT = 16      # (window, tiles, offsets) entries per pack


def _version(t: torch.Tensor):
    return None if t.is_inference() else t._version


def _window_coords(coords, grid, host, device) -> torch.Tensor:
    """The window's (t, h, w) per token, int32 contiguous: ``coords``, or the t-major raster of the grid."""
    if coords is not None:
        return coords.contiguous()
    entry = _LISTS.setdefault(grid, {})
    key = ("t-major", tuple(host.cu_q), _version(grid))
    if key not in entry:
        entry[key] = pack_coords(host.grid, device)
    return entry[key]


def block_lists(window, coords, grid, host, row_block: int, col_block: int, device) -> BlockLists:
    """The pack's window block lists for one kernel's tiles (``_blocks.window_block_lists``), cached with the
    pack (see ``_LISTS``). ``coords``: the window's coordinates, None for the t-major raster of ``grid``."""
    owner = coords if coords is not None else grid
    entry = _LISTS.setdefault(owner, {})
    key = (tuple(window), row_block, col_block, tuple(host.cu_q), _version(owner))
    if key not in entry:
        if len(entry) >= _LISTS_KEPT:
            entry.clear()
        wc = _window_coords(coords, grid, host, device)
        with torch.no_grad():
            entry[key] = window_block_lists(_seqlens(host.cu_q), wc, window, row_block, col_block)
    return entry[key]


def _window_launch_args(window, coords, grid, host, row_block, col_block, device, dummy) -> tuple:
    """(WCOORDS, LISTS, NFULL, NVISIT, list_stride) of a launch; dummies without a window."""
    if window is None:
        return dummy, dummy, dummy, dummy, 0
    lists = block_lists(window, coords, grid, host, row_block, col_block, device)
    return (_window_coords(coords, grid, host, device), lists.indices, lists.num_full, lists.num_visit,
            lists.indices.stride(0))


def _constexprs(q, window, rope_coords, cfg: _Config, off64: bool) -> dict:
    block_d, block_dh = _dims(q.shape[-1])
    return dict(HEAD_DIM=q.shape[-1], BLOCK_D=block_d, BLOCK_DH=block_dh, BLOCK_M=cfg.block_m, BLOCK_N=cfg.block_n,
                WINDOW=window is not None, ROPE=rope_coords is not None,
                UPCAST=_interpreting() and q.dtype == torch.bfloat16, PRECISION=dot_precision(q.dtype), OFF64=off64,
                num_warps=cfg.num_warps, num_stages=cfg.num_stages)



def _window_args(window, grid: Optional[list]) -> tuple[int, int, int]:
    """(wt, wh, ww) clamped to the largest grid extent - 1 on each axis: no two tokens of a video are
    farther apart, so the result is the same, and the kernels' window arithmetic stays in int32.
    ``grid``: the grid's values on the host (:class:`~sora_fast.reference.attention.PackOnHost`)."""
    if window is None:
        return (0, 0, 0)
    extents = [max(axis) for axis in zip(*grid)] if grid else [0, 0, 0]
    return tuple(min(int(w), max(int(e) - 1, 0)) for w, e in zip(window, extents))


def _host(host, cu_seqlens_q, cu_seqlens_k, grid, rope_coords):
    """The pack's values on the host: the op passes what its checks read (one transfer for the call)."""
    return host if host is not None else _reference.read_pack(cu_seqlens_q, cu_seqlens_k, grid, rope_coords)


def _seqlens(cu: list) -> list:
    return [b - a for a, b in zip(cu, cu[1:])]


# --- launchers (the triton backend of sora_fast.ops.spacetime_attention) -----------------------
def attention_forward(q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, *, scale, window, grid,
                      rope_coords, rope_theta, host=None, coords=None):
    """Returns ``(out (Nq, H, D) in q's dtype, lse (H, Nq) fp32)``. ``host``: the values of cu_seqlens
    and grid (and the range of rope_coords) already on the host (read here when None). ``coords``: the
    window's (t, h, w) per token (None: the t-major raster of ``grid``). Raises ValueError for
    ``|rope_coords| > ROPE_MAX_COORD`` (2**10), past which the fused RoPE's fp32 angles lose the
    reference's accuracy (module docstring)."""
    _check_supported(q, v)
    _check_rows(q, k, rope_coords)
    host = _host(host, cu_seqlens_q, cu_seqlens_k, grid, rope_coords)
    _check_rope_range(rope_coords, host)
    if _fp32_reference(("fwd",), q, window, rope_coords):
        return _reference._forward_ref(q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, scale=scale,
                                       window=window, grid=grid, rope_coords=rope_coords, rope_theta=rope_theta,
                                       **({} if coords is None else {"coords": coords}))
    q, k, v = (_contig_last(t) for t in (q, k, v))
    cu_seqlens_q, cu_seqlens_k = cu_seqlens_q.contiguous(), cu_seqlens_k.contiguous()
    n_q, heads, head_dim = q.shape
    out = _empty(q.shape, q.dtype, q.device)
    lse = _empty((heads, n_q), torch.float32, q.device)
    cfg = _config("fwd", window, rope_coords, q.dtype, head_dim)
    table = block_table(_seqlens(host.cu_q), cfg.block_m, q.device)
    if table.shape[0] == 0 or heads == 0:
        return out, lse
    rope = _common_args(q, cu_seqlens_q, rope_coords, rope_theta)
    win = _window_launch_args(window, coords, grid, host, cfg.block_m, cfg.block_n, q.device, cu_seqlens_q)
    off64 = _needs_off64((q, k, v, out), n_q, heads)
    _attn_fwd_kernel[(table.shape[0], heads)](
        q, k, v, out, lse, cu_seqlens_q, cu_seqlens_k, table, *rope, *win,
        q.stride(0), q.stride(1), k.stride(0), k.stride(1), v.stride(0), v.stride(1), out.stride(0), out.stride(1),
        n_q, scale * LOG2E, *_window_args(window, host.grid), **_constexprs(q, window, rope_coords, cfg, off64))
    return out, lse


def attention_backward(dout, dlse, q, k, v, out, lse, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, *,
                       scale, window, grid, rope_coords, rope_theta, host=None, coords=None):
    """Returns ``(dq, dk, dv)`` like q, k, v. ``dlse`` (gradient of the LSE output) may be None.
    ``host``, ``coords`` and the RoPE range as for :func:`attention_forward`."""
    _check_supported(q, v)
    _check_rows(q, k, rope_coords)
    host = _host(host, cu_seqlens_q, cu_seqlens_k, grid, rope_coords)
    _check_rope_range(rope_coords, host)
    if _fp32_reference(("dkdv", "dq"), q, window, rope_coords):
        return _reference.attention_backward_streamed(dout, dlse, q, k, v, out, lse, cu_seqlens_q, cu_seqlens_k,
                                                      scale=scale, window=window, grid=grid,
                                                      rope_coords=rope_coords, rope_theta=rope_theta, host=host,
                                                      **({} if coords is None else {"coords": coords}))
    q, k, v, dout = (_contig_last(t) for t in (q, k, v, dout))
    cu_seqlens_q, cu_seqlens_k = cu_seqlens_q.contiguous(), cu_seqlens_k.contiguous()
    n_q, heads, head_dim = q.shape
    delta = _reference.softmax_delta(dout, out, dlse, torch.float32).contiguous()   # (H, Nq)
    lse = lse.contiguous()
    dq, dk, dv = (_empty(t.shape, t.dtype, t.device) for t in (q, k, v))
    if heads == 0:
        return dq, dk, dv
    rope = _common_args(q, cu_seqlens_q, rope_coords, rope_theta)
    off64 = _needs_off64((q, k, v, dout, dq, dk, dv), n_q, heads)
    common = (lse, delta, cu_seqlens_q, cu_seqlens_k)
    strides = (q.stride(0), q.stride(1), k.stride(0), k.stride(1), v.stride(0), v.stride(1),
               dout.stride(0), dout.stride(1))
    scalars = (n_q, scale, scale * LOG2E, *_window_args(window, host.grid))

    cfg = _config("dkdv", window, rope_coords, q.dtype, head_dim)
    table = block_table(_seqlens(host.cu_k), cfg.block_n, q.device)
    if table.shape[0]:
        # key blocks are the rows here: each lists the query blocks it must visit
        win = _window_launch_args(window, coords, grid, host, cfg.block_n, cfg.block_m, q.device, cu_seqlens_q)
        _attn_bwd_dkdv_kernel[(table.shape[0], heads)](
            q, k, v, dout, dk, dv, *common, table, *rope, *win, *strides,
            dk.stride(0), dk.stride(1), dv.stride(0), dv.stride(1), *scalars,
            **_constexprs(q, window, rope_coords, cfg, off64))
    cfg = _config("dq", window, rope_coords, q.dtype, head_dim)
    table = block_table(_seqlens(host.cu_q), cfg.block_m, q.device)
    if table.shape[0]:
        win = _window_launch_args(window, coords, grid, host, cfg.block_m, cfg.block_n, q.device, cu_seqlens_q)
        _attn_bwd_dq_kernel[(table.shape[0], heads)](
            q, k, v, dout, dq, *common, table, *rope, *win, *strides,
            dq.stride(0), dq.stride(1), *scalars, **_constexprs(q, window, rope_coords, cfg, off64))
    return dq, dk, dv


# --- what the offline kernel report compiles ----------------------------------------------------
_KERNELS = {"fwd": _attn_fwd_kernel, "dkdv": _attn_bwd_dkdv_kernel, "dq": _attn_bwd_dq_kernel}
_PTR_ARGS = {
    "fwd": ("Q", "K", "V", "O", "LSE", "CU_Q", "CU_K", "TABLE", "COORDS", "AXIS", "FREQ", "WCOORDS", "LISTS",
            "NFULL", "NVISIT"),
    "dkdv": ("Q", "K", "V", "DO", "DK", "DV", "LSE", "DELTA", "CU_Q", "CU_K", "TABLE", "COORDS", "AXIS", "FREQ",
             "WCOORDS", "LISTS", "NFULL", "NVISIT"),
    "dq": ("Q", "K", "V", "DO", "DQ", "LSE", "DELTA", "CU_Q", "CU_K", "TABLE", "COORDS", "AXIS", "FREQ", "WCOORDS",
           "LISTS", "NFULL", "NVISIT"),
}
_DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}


def _report_config(kernel: str, head_dim: int, dtype: str, window: bool, rope: bool, off64: bool,
                   cfg: _Config | None = None, precision: str | None = None) -> KernelConfig:
    """The KernelConfig of one launcher choice, typed and hinted as the runtime specializes it (16-aligned
    pointers and strides). ``cfg`` / ``precision`` override the shipped tile and dot precision."""
    fn = _KERNELS[kernel]
    torch_dtype = _DTYPES[dtype]
    cfg = cfg or _gpu_config(kernel, window, rope, torch_dtype, head_dim)
    precision = precision or dot_precision(torch_dtype)
    block_d, block_dh = _dims(head_dim)
    float_ptrs = {"Q", "K", "V", "O", "DO", "DK", "DV", "DQ"}
    fp32_ptrs = {"LSE", "DELTA", "FREQ"}
    sig = {}
    for name in fn.arg_names:
        if name in _PTR_ARGS[kernel]:
            sig[name] = f"*{dtype}" if name in float_ptrs else ("*fp32" if name in fp32_ptrs else "*i32")
        elif name.startswith("stride") or name in ("n_q", "win_t", "win_h", "win_w", "list_stride"):
            sig[name] = "i32"
        elif name in ("qk_scale", "sm_scale"):
            sig[name] = "fp32"
        else:
            sig[name] = "constexpr"
    constexprs = dict(HEAD_DIM=head_dim, BLOCK_D=block_d, BLOCK_DH=block_dh, BLOCK_M=cfg.block_m,
                      BLOCK_N=cfg.block_n, WINDOW=window, ROPE=rope, UPCAST=False, PRECISION=precision,
                      OFF64=off64)
    aligned = tuple(n for n in sig if sig[n].startswith("*") or n.startswith("stride"))
    variant = "+".join(n for n, on in (("window", window), ("rope", rope)) if on) or "dense"
    tag = f" {precision}" if dtype == "fp32" else ""
    return KernelConfig(
        name=f"attention_{kernel} d{head_dim} {dtype}{tag} {variant}{' off64' if off64 else ''} "
             f"m{cfg.block_m} n{cfg.block_n}",
        fn=fn, signature=sig, constexprs=constexprs, num_warps=cfg.num_warps, num_stages=cfg.num_stages,
        divisible_by_16=aligned, tensor_core=precision != "ieee", async_copy=window)


def shipped_configs() -> list[KernelConfig]:
    """Every (kernel, head dim, dtype, variant, offset width) config the GPU launchers can pick, for the
    report: bf16/fp16 at head dims 64 and 128, fp32 (tf32x3 dots, so HGMMA is expected too) where it has
    a tile, at every BLOCK_D it has one for. ``tensor_core`` would be False only for exact-fp32 ("ieee")
    dots, which issue no wgmma."""
    variants = ((False, False), (True, False), (False, True), (True, True))
    picks = [(kernel, head_dim, dtype, window, rope)
             for kernel in _KERNELS for head_dim in (64, 128) for dtype in ("bf16", "fp16")
             for window, rope in variants]
    picks += [(kernel, block_d, "fp32", window, rope) for kernel, window, rope, block_d in _GPU_CONFIGS_FP32]
    return [_report_config(kernel, head_dim, dtype, window, rope, off64)
            for kernel, head_dim, dtype, window, rope in picks for off64 in (False, True)]
