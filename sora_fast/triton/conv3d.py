"""Causal Conv3d in Triton: forward as an implicit GEMM over channels-last-3d (NDHWC) activations.

GEMM view: M = B·T_out·H_out·W_out output positions, N = Cout, K = kt·kh·kw·Cin. The weight is packed
to ``(K, Cout)`` with K ordered (dt, dh, dw, cin), so each K step is one kernel tap and a chunk of
contiguous input channels. One program per (M block, N block); a single flattened loop over
(tap, channel chunk) so the compiler can pipeline the loads (one loop, not two nested ones).

Causal time padding and the chunk cache are a second source read by index math: input frame
``t_out·st − (kt−1) + dt`` comes from x when ≥ 0, else from the front frames ``[pad…, cache…]`` — a
cache frame, a zero (masked) or, with ``pad_mode="replicate"``, the stream's first frame (cache frame 0,
or x frame 0 without a cache). No ``F.pad``, no ``torch.cat``. Spatial zero padding is masks.
Epilogue: fp32 accumulator + bias + residual, cast once, stored in the output's layout.

Layout: NDHWC is the native layout. A contiguous (NCDHW) x (and the cache, which is at most kt−1
frames) is converted to channels_last_3d inside the launcher — one copy of x; the output is still
written directly in x's memory format (contiguous NCDHW for contiguous x). The weight is packed on
every call for now (a weight-sized copy, small next to the activations); keeping the packed weight in
the module is still to do.

Backward: the torch reference (``_backward_ref`` in ``sora_fast.ops.conv3d``) is registered as the
``triton`` backend of ``causal_conv3d_backward``, so autograd through ``backend="triton"`` is the
reference VJP.

bf16 under the Triton interpreter: its bf16 arithmetic is wrong, so ``UPCAST`` converts tiles to fp32
right after loading (interpreter only; on a GPU bf16 tiles feed the tensor cores).
"""
from __future__ import annotations

import os
from dataclasses import dataclass

import torch
import triton
import triton.language as tl

from ..ops.conv3d import causal_conv3d_output_shape
from ._spec import KernelConfig
from .attention import _to_store

SUPPORTED_KERNELS = ((3, 3, 3), (3, 1, 1), (1, 3, 3), (1, 1, 1))
SUPPORTED_STRIDES = (1, 2)


# --- kernel --------------------------------------------------------------------------------------
@triton.jit
def _causal_conv3d_fwd_kernel(
        X, C, Wp, BIAS, RES, OUT,
        M, T_out, H_out, W_out, H, W, Cin, Cout, n_cache,
        sxb, sxt, sxh, sxw,                       # x (channel stride 1)
        scb, sct, sch, scw,                       # cache (channel stride 1)
        srb, src, srt, srh, srw,                  # residual
        sob, soc, sot, soh, sow,                  # out
        ST: tl.constexpr, SH: tl.constexpr, SW: tl.constexpr, PH: tl.constexpr, PW: tl.constexpr,
        KT: tl.constexpr, KH: tl.constexpr, KW: tl.constexpr,
        REPLICATE: tl.constexpr, HAS_BIAS: tl.constexpr, HAS_RES: tl.constexpr,
        BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
        UPCAST: tl.constexpr, PRECISION: tl.constexpr):
    pid_n = tl.program_id(0)
    pid_m = tl.program_id(1)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    m_mask = offs_m < M
    wo = offs_m % W_out
    r = offs_m // W_out
    ho = r % H_out
    r = r // H_out
    to = r % T_out
    b = (r // T_out).to(tl.int64)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    n_mask = offs_n < Cout
    offs_k = tl.arange(0, BLOCK_K)

    n_chunks = tl.cdiv(Cin, BLOCK_K)
    acc = tl.zeros([BLOCK_M, BLOCK_N], tl.float32)
    for it in range(0, KT * KH * KW * n_chunks):
        tap = it // n_chunks
        c0 = (it % n_chunks) * BLOCK_K
        dw = tap % KW
        dh = (tap // KW) % KH
        dt = tap // (KW * KH)
        # time: x frame ti if ti >= 0, else front frame p = ti + KT-1 of [pad (KT-1-n_cache), cache]
        ti = to * ST - (KT - 1) + dt
        in_x = ti >= 0
        cf = ti + n_cache                         # cache frame index (negative: a pad frame)
        use_cache = (~in_x) & (cf >= 0)
        if REPLICATE:                             # pad frames copy the stream's first frame
            use_cache = use_cache | ((~in_x) & (n_cache > 0))
            t_ok = m_mask
        else:
            t_ok = m_mask & (in_x | use_cache)
        hi = ho * SH - PH + dh
        wi = wo * SW - PW + dw
        row_ok = t_ok & (hi >= 0) & (hi < H) & (wi >= 0) & (wi < W)
        x_off = b * sxb + tl.maximum(ti, 0) * sxt + hi * sxh + wi * sxw
        c_off = b * scb + tl.maximum(cf, 0) * sct + hi * sch + wi * scw
        rows = tl.where(use_cache, C + c_off, X + x_off)
        cc = c0 + offs_k
        c_mask = cc < Cin
        a = tl.load(rows[:, None] + cc[None, :], mask=row_ok[:, None] & c_mask[None, :], other=0.0)
        kk = tap * Cin + cc
        w = tl.load(Wp + kk[:, None] * Cout + offs_n[None, :], mask=c_mask[:, None] & n_mask[None, :], other=0.0)
        if UPCAST:
            a = a.to(tl.float32)
            w = w.to(tl.float32)
        acc = tl.dot(a, w, acc, input_precision=PRECISION)

    if HAS_BIAS:
        acc += tl.load(BIAS + offs_n, mask=n_mask, other=0.0).to(tl.float32)[None, :]
    mask = m_mask[:, None] & n_mask[None, :]
    if HAS_RES:
        r_off = b * srb + to * srt + ho * srh + wo * srw
        res = tl.load(RES + r_off[:, None] + offs_n[None, :].to(tl.int64) * src, mask=mask, other=0.0)
        acc += res.to(tl.float32)
    o_off = b * sob + to * sot + ho * soh + wo * sow
    tl.store(OUT + o_off[:, None] + offs_n[None, :].to(tl.int64) * soc, _to_store(acc, OUT.dtype.element_ty, UPCAST),
             mask=mask)


# --- launch configuration ------------------------------------------------------------------------
@dataclass(frozen=True)
class _Config:
    block_m: int
    block_n: int
    block_k: int
    num_warps: int
    num_stages: int


def _interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET") == "1"


# GPU configs by (Cin bucket, Cout bucket), chosen with the offline sm_90 report
# (`python -m sora_fast.tools.kernel_report --module sora_fast.triton.conv3d`).
_GPU_CONFIGS = {
    ("small", "small"): _Config(128, 64, 32, num_warps=4, num_stages=3),
    ("small", "large"): _Config(128, 128, 32, num_warps=8, num_stages=3),
    ("large", "small"): _Config(128, 64, 64, num_warps=4, num_stages=3),
    ("large", "large"): _Config(128, 128, 64, num_warps=8, num_stages=3),
}
# The interpreter costs per tile operation, not per element: few, wide programs.
_INTERPRETER_CONFIG = _Config(128, 32, 16, num_warps=4, num_stages=1)


def _config(cin: int, cout: int) -> _Config:
    if _interpreting():
        return _INTERPRETER_CONFIG
    return _GPU_CONFIGS[("small" if cin <= 32 else "large", "small" if cout <= 64 else "large")]


def _empty(shape, dtype, device, memory_format) -> torch.Tensor:
    """Output allocation; every element is written by exactly one program (tests poison it with NaN)."""
    return torch.empty(shape, dtype=dtype, device=device, memory_format=memory_format)


def _check_supported(x, weight, stride) -> None:
    k = tuple(weight.shape[2:])
    if k not in SUPPORTED_KERNELS:
        raise ValueError(f"the triton causal_conv3d kernel supports kernel sizes {SUPPORTED_KERNELS}, got {k} "
                         f"(backend='torch' serves any size)")
    if any(s not in SUPPORTED_STRIDES for s in stride):
        raise ValueError(f"the triton causal_conv3d kernel supports strides {SUPPORTED_STRIDES} on each axis, got "
                         f"{tuple(stride)} (backend='torch' serves any stride)")
    if x.dtype not in (torch.float16, torch.bfloat16, torch.float32):
        raise ValueError(f"the triton causal_conv3d kernel takes fp16, bf16 or fp32 inputs, got {x.dtype}")


def _pack_weight(weight: torch.Tensor) -> torch.Tensor:
    """(Cout, Cin, kt, kh, kw) -> (kt·kh·kw·Cin, Cout), K ordered (dt, dh, dw, cin)."""
    cout = weight.shape[0]
    return weight.permute(2, 3, 4, 1, 0).reshape(-1, cout).contiguous()


def _channels_last(t: torch.Tensor) -> torch.Tensor:
    return t.contiguous(memory_format=torch.channels_last_3d)


def _out_format(x: torch.Tensor):
    """x's memory format, as the reference's ``like_layout`` decides it."""
    if not x.is_contiguous() and x.is_contiguous(memory_format=torch.channels_last_3d):
        return torch.channels_last_3d
    return torch.contiguous_format


# --- launcher (the triton backend of sora_fast.ops.causal_conv3d) -------------------------------
def causal_conv3d_forward(x, weight, bias, *, stride, padding, pad_mode, cache, residual):
    """Output ``(B, Cout, T_out, H_out, W_out)`` in x's dtype and memory format (see module docstring)."""
    _check_supported(x, weight, stride)
    out_shape = causal_conv3d_output_shape(x.shape, weight.shape, stride, padding)
    out = _empty(out_shape, x.dtype, x.device, _out_format(x))
    bsz, cout, t_out, h_out, w_out = out_shape
    _, cin, _, h, w = x.shape
    kt, kh, kw = weight.shape[2:]
    xc = _channels_last(x)
    wp = _pack_weight(weight)
    if cache is not None and cache.shape[2] > 0:
        cc, n_cache = _channels_last(cache), cache.shape[2]
    else:
        cc, n_cache = xc, 0
    res = residual if residual is not None else out
    bias_t = bias if bias is not None else wp
    m = bsz * t_out * h_out * w_out
    cfg = _config(cin, cout)
    grid = (triton.cdiv(cout, cfg.block_n), triton.cdiv(m, cfg.block_m))
    _causal_conv3d_fwd_kernel[grid](
        xc, cc, wp, bias_t, res, out,
        m, t_out, h_out, w_out, h, w, cin, cout, n_cache,
        xc.stride(0), xc.stride(2), xc.stride(3), xc.stride(4),
        cc.stride(0), cc.stride(2), cc.stride(3), cc.stride(4),
        *res.stride(), *out.stride(),
        ST=stride[0], SH=stride[1], SW=stride[2], PH=padding[0], PW=padding[1], KT=kt, KH=kh, KW=kw,
        REPLICATE=pad_mode == "replicate", HAS_BIAS=bias is not None, HAS_RES=residual is not None,
        BLOCK_M=cfg.block_m, BLOCK_N=cfg.block_n, BLOCK_K=cfg.block_k,
        UPCAST=_interpreting() and x.dtype == torch.bfloat16,
        PRECISION="ieee" if x.dtype == torch.float32 else "tf32",
        num_warps=cfg.num_warps, num_stages=cfg.num_stages)
    return out
