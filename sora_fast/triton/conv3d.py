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
        REPLICATE: tl.constexpr, HAS_BIAS: tl.constexpr, HAS_RES: tl.constexpr, OFF64: tl.constexpr,
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
    b = r // T_out
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    n_mask = offs_n < Cout
    if OFF64:                                     # int32 offsets otherwise: fewer address registers
        b = b.to(tl.int64)
        to = to.to(tl.int64)
        ho = ho.to(tl.int64)
        wo = wo.to(tl.int64)
        n_idx = offs_n.to(tl.int64)
    else:
        n_idx = offs_n
    offs_k = tl.arange(0, BLOCK_K)
    # per-row origin of the receptive field; per tap only scalar offsets are added
    t0 = to * ST - (KT - 1)
    h0 = ho * SH - PH
    w0 = wo * SW - PW
    x_row = b * sxb + t0 * sxt + h0 * sxh + w0 * sxw
    c_row = b * scb + (t0 + n_cache) * sct + h0 * sch + w0 * scw

    n_chunks = tl.cdiv(Cin, BLOCK_K)
    acc = tl.zeros([BLOCK_M, BLOCK_N], tl.float32)
    for it in range(0, KT * KH * KW * n_chunks):
        tap = it // n_chunks
        c0 = (it - tap * n_chunks) * BLOCK_K
        dw = tap % KW
        dh = (tap // KW) % KH
        dt = tap // (KW * KH)
        # time: x frame ti if ti >= 0, else cache frame ti + n_cache if that is >= 0, else a pad frame
        ti = t0 + dt
        hi = h0 + dh
        wi = w0 + dw
        use_cache = (ti < 0) & (ti + n_cache >= 0)
        row_ok = m_mask & (hi >= 0) & (hi < H) & (wi >= 0) & (wi < W)
        x_off = x_row + (dt * sxt + dh * sxh + dw * sxw)
        c_off = c_row + (dt * sct + dh * sch + dw * scw)
        if REPLICATE:                             # pad frames copy the stream's first frame
            use_cache = (ti < 0) & (tl.zeros_like(ti) + n_cache > 0)   # a vector compare: bool in the interpreter too
            x_off -= tl.minimum(ti, 0) * sxt
            c_off -= tl.minimum(ti + n_cache, 0) * sct
        else:
            row_ok = row_ok & ((ti >= 0) | use_cache)
        cc = c0 + offs_k
        c_mask = cc < Cin
        # two masked loads rather than a select of pointers: a pointer select costs ~100 registers and
        # the 16-byte vectorization of the gather
        a_x = tl.load(X + x_off[:, None] + cc[None, :], mask=(row_ok & ~use_cache)[:, None] & c_mask[None, :],
                      other=0.0)
        a_c = tl.load(C + c_off[:, None] + cc[None, :], mask=(row_ok & use_cache)[:, None] & c_mask[None, :],
                      other=0.0)
        a = tl.where(use_cache[:, None], a_c, a_x)
        w = tl.load(Wp + (tap * Cin + cc)[:, None] * Cout + offs_n[None, :], mask=c_mask[:, None] & n_mask[None, :],
                    other=0.0)
        if UPCAST:
            a = a.to(tl.float32)
            w = w.to(tl.float32)
        acc = tl.dot(a, w, acc, input_precision=PRECISION)

    if HAS_BIAS:
        acc += tl.load(BIAS + offs_n, mask=n_mask, other=0.0).to(tl.float32)[None, :]
    mask = m_mask[:, None] & n_mask[None, :]
    if HAS_RES:
        r_off = b * srb + to * srt + ho * srh + wo * srw
        res = tl.load(RES + r_off[:, None] + n_idx[None, :] * src, mask=mask, other=0.0)
        acc += res.to(tl.float32)
    o_off = b * sob + to * sot + ho * soh + wo * sow
    tl.store(OUT + o_off[:, None] + n_idx[None, :] * soc, _to_store(acc, OUT.dtype.element_ty, UPCAST),
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


def _extent(t: torch.Tensor) -> int:
    """One past the largest element offset of t."""
    return 1 + sum((n - 1) * s for n, s in zip(t.shape, t.stride()))


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
        OFF64=max(_extent(t) for t in (xc, cc, res, out)) >= 2 ** 31,
        BLOCK_M=cfg.block_m, BLOCK_N=cfg.block_n, BLOCK_K=cfg.block_k,
        UPCAST=_interpreting() and x.dtype == torch.bfloat16,
        PRECISION="ieee" if x.dtype == torch.float32 else "tf32",
        num_warps=cfg.num_warps, num_stages=cfg.num_stages)
    return out


# --- what the offline kernel report compiles ----------------------------------------------------
# Specializations the report gates, per (Cin, Cout) bucket and dtype: (kernel, stride, pad_mode, bias, residual).
# Other kernel/stride combinations are the same code with other constexprs.
# (OFF64: 64-bit offsets, which the launcher picks for tensors of 2**31 elements or more.)
_REPORT_VARIANTS = (
    ((3, 3, 3), (1, 1, 1), "replicate", True, True, False),
    ((1, 1, 1), (1, 1, 1), "zeros", True, False, False),
)
_REPORT_EXTRA = (  # the down-sampling convs and 64-bit offsets, at the large bucket only
    ((3, 1, 1), (2, 1, 1), "zeros", True, False, False),
    ((1, 3, 3), (1, 2, 2), "zeros", True, False, False),
    ((3, 3, 3), (1, 1, 1), "zeros", True, True, True),
)


def shipped_configs() -> list[KernelConfig]:
    """Every GPU config of the launcher (per bucket and dtype), channels-last in and out, as the runtime
    specializes it for VAE channel counts (multiples of 16): 16-divisible pointers, channel counts and
    NDHWC strides; unit channel strides of the output and residual become the constant 1."""
    fn = _causal_conv3d_fwd_kernel
    configs = []
    ptrs = ("X", "C", "Wp", "BIAS", "RES", "OUT")
    aligned_ints = ("Cin", "Cout", "sxb", "sxt", "sxh", "sxw", "scb", "sct", "sch", "scw", "srb", "srt", "srh", "srw",
                    "sob", "sot", "soh", "sow")
    for (cin_b, cout_b), cfg in _GPU_CONFIGS.items():
        variants = _REPORT_VARIANTS + (_REPORT_EXTRA if (cin_b, cout_b) == ("large", "large") else ())
        for dtype in ("bf16", "fp16"):
            for k, stride, pad_mode, has_bias, has_res, off64 in variants:
                sig, constexprs = {}, {}
                for name in fn.arg_names:
                    if name in ptrs:
                        sig[name] = f"*{dtype}"
                    elif name in ("soc", "src"):
                        sig[name] = "constexpr"
                        constexprs[name] = 1
                    elif name[0].islower() or name in ("M", "T_out", "H_out", "W_out", "H", "W", "Cin", "Cout"):
                        sig[name] = "i32"
                    else:
                        sig[name] = "constexpr"
                constexprs.update(ST=stride[0], SH=stride[1], SW=stride[2], PH=k[1] // 2, PW=k[2] // 2, KT=k[0],
                                  KH=k[1], KW=k[2], REPLICATE=pad_mode == "replicate", HAS_BIAS=has_bias,
                                  HAS_RES=has_res, OFF64=off64, BLOCK_M=cfg.block_m, BLOCK_N=cfg.block_n,
                                  BLOCK_K=cfg.block_k, UPCAST=False, PRECISION="tf32")
                aligned = ptrs + tuple(n for n in aligned_ints if sig.get(n) == "i32")
                variant = f"k{''.join(map(str, k))} s{''.join(map(str, stride))} {pad_mode}" + \
                          (" +bias" if has_bias else "") + (" +res" if has_res else "") + (" off64" if off64 else "")
                configs.append(KernelConfig(
                    name=f"causal_conv3d_fwd cin:{cin_b} cout:{cout_b} {dtype} {variant} "
                         f"m{cfg.block_m} n{cfg.block_n} k{cfg.block_k}",
                    fn=fn, signature=sig, constexprs=constexprs, num_warps=cfg.num_warps,
                    num_stages=cfg.num_stages, divisible_by_16=aligned))
    return configs
