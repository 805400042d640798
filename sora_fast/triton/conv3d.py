"""Causal Conv3d in Triton: forward as an implicit GEMM over channels-last-3d (NDHWC) activations.

GEMM view: M = B·T_out·H_out·W_out output positions, N = Cout, K = kt·kh·kw·Cin. The weight is packed
to ``(K, Cout)`` with K ordered (dt, dh, dw, cin), so each K step is one kernel tap and a chunk of
contiguous input channels. One program per (M block, N block); a single flattened loop over
(tap, channel chunk) so the compiler can pipeline the loads (one loop, not two nested ones).

Causal time padding and the chunk cache are a second source read by index math: input frame
``t_out·st − (kt−1) + dt`` comes from x when ≥ 0, else from the front frames ``[pad…, cache…]`` — a
cache frame, a zero (masked) or, with ``pad_mode="replicate"``, the stream's first frame (cache frame 0,
or x frame 0 without a cache). No ``F.pad``, no ``torch.cat``. Spatial zero padding is masks.
Epilogue: fp32 accumulator + bias + residual, cast once, stored channels-last.

Layout: the kernel reads and writes channels-last-3d (NDHWC) only: through NCDHW strides the contiguous
axis is along M, which wraps at W_out, so every element needs its own 64-bit address and the tiles spill
(measurements: docs/triton_kernels.md). A contiguous (NCDHW) x, cache or residual is converted to
channels_last_3d inside the launcher, and for a contiguous x the output is computed channels-last and
copied to x's format at the end: one copy each way. Feed channels-last activations to avoid the copies.

Packed weight: ``(K, Cout)`` from :func:`sora_fast.reference.conv3d.causal_conv3d_pack_weight`. Modules
keep it (``PackedConv3dWeight`` in ``sora_fast.ops.conv3d``, repacked only when the weight changes) and pass
it as ``packed_weight``; without it the launcher packs the weight on each call.

Grid: one axis, ``cdiv(M, BLOCK_M) · cdiv(Cout, BLOCK_N)`` programs with the N blocks of one M block
adjacent (they share its input tile in L2); CUDA allows 2**31 − 1 programs on axis 0 (axis 1 only 65535,
which M blocks exceed beyond 8.4 M output positions, e.g. a 720p video in one pass). ``_grid`` checks it.

fp32 inputs use ``input_precision="tf32x3"`` on the GPU (see ``FP32_PRECISION``); fp16/bf16 tiles feed
the tensor cores directly, with fp32 accumulation.

Backward: the torch reference (``_backward_ref`` in ``sora_fast.reference.conv3d``) is registered as the
``triton`` backend of ``causal_conv3d_backward``, so autograd through ``backend="triton"`` is the
reference VJP.

bf16 under the Triton interpreter: its bf16 arithmetic is wrong, so ``UPCAST`` converts tiles to fp32
right after loading (interpreter only; on a GPU bf16 tiles feed the tensor cores).
"""
from __future__ import annotations

import itertools
from dataclasses import dataclass

import torch
import triton
import triton.language as tl

from ..reference.conv3d import causal_conv3d_output_shape, causal_conv3d_pack_weight
from ._common import FP32_PRECISION, dot_precision, extent, to_store
from ._common import interpreting as _interpreting
from ._spec import KernelConfig

SUPPORTED_KERNELS = ((3, 3, 3), (3, 1, 1), (1, 3, 3), (1, 1, 1))
SUPPORTED_STRIDES = (1, 2)


# --- kernel --------------------------------------------------------------------------------------
@triton.jit
def _causal_conv3d_fwd_kernel(
        X, C, Wp, BIAS, RES, OUT,
        M, T_out, H_out, W_out, H, W, Cin, Cout, n_cache,
        sxb, sxt, sxh, sxw,                       # x (channel stride 1)
        scb, sct, sch, scw,                       # cache (channel stride 1)
        srb, srt, srh, srw,                       # residual (channel stride 1)
        sob, sot, soh, sow,                       # out (channel stride 1)
        ST: tl.constexpr, SH: tl.constexpr, SW: tl.constexpr, PH: tl.constexpr, PW: tl.constexpr,
        KT: tl.constexpr, KH: tl.constexpr, KW: tl.constexpr,
        REPLICATE: tl.constexpr, HAS_BIAS: tl.constexpr, HAS_RES: tl.constexpr, OFF64: tl.constexpr,
        BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
        UPCAST: tl.constexpr, PRECISION: tl.constexpr):
    # one grid axis (limit 2**31 - 1 programs), N blocks fastest: the programs of one M block run
    # together and share its input tile through L2
    n_blocks = tl.cdiv(Cout, BLOCK_N)
    pid = tl.program_id(0)
    pid_m = pid // n_blocks
    pid_n = pid - pid_m * n_blocks
    if OFF64:                                     # int32 offsets otherwise: fewer address registers
        pid_m = pid_m.to(tl.int64)
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
        res = tl.load(RES + r_off[:, None] + offs_n[None, :], mask=mask, other=0.0)
        acc += res.to(tl.float32)
    o_off = b * sob + to * sot + ho * soh + wo * sow
    tl.store(OUT + o_off[:, None] + offs_n[None, :], to_store(acc, OUT.dtype.element_ty, UPCAST), mask=mask)


# --- launch configuration ------------------------------------------------------------------------
@dataclass(frozen=True)
class _Config:
    block_m: int
    block_n: int
    block_k: int
    num_warps: int
    num_stages: int


# Cin buckets: small <= 32, large; Cout buckets: tiny <= 16 (the decoder's RGB head), small <= 64, large.
_CIN_BUCKETS = (("small", 32), ("large", None))
_COUT_BUCKETS = (("tiny", 16), ("small", 64), ("large", None))

# GPU configs by (dtype class, Cin bucket, Cout bucket), chosen with the offline sm_90 report
# (`python -m sora_fast.tools.kernel_report --module sora_fast.triton.conv3d`): every one compiles with
# no spills, shared memory within 227 KiB and wgmma (HGMMA).
_GPU_CONFIGS = {
    ("16bit", "small", "tiny"): _Config(128, 16, 16, num_warps=4, num_stages=3),
    ("16bit", "small", "small"): _Config(128, 64, 16, num_warps=4, num_stages=3),
    ("16bit", "small", "large"): _Config(128, 128, 16, num_warps=8, num_stages=3),
    ("16bit", "large", "tiny"): _Config(128, 16, 64, num_warps=4, num_stages=3),
    ("16bit", "large", "small"): _Config(128, 64, 64, num_warps=4, num_stages=3),
    ("16bit", "large", "large"): _Config(128, 128, 64, num_warps=8, num_stages=3),
    ("fp32", "small", "tiny"): _Config(128, 16, 16, num_warps=8, num_stages=3),
    ("fp32", "small", "small"): _Config(128, 64, 16, num_warps=8, num_stages=3),
    ("fp32", "small", "large"): _Config(128, 128, 16, num_warps=8, num_stages=3),
    ("fp32", "large", "tiny"): _Config(128, 16, 32, num_warps=4, num_stages=3),
    ("fp32", "large", "small"): _Config(128, 64, 32, num_warps=4, num_stages=3),
    ("fp32", "large", "large"): _Config(128, 128, 32, num_warps=8, num_stages=3),
}
# 64-bit offsets (tensors of 2**31 elements or more) need twice the address registers: half the M tile
# (fp32 with an unaligned Cin = 3 needs yet fewer live addresses per thread).
_GPU_CONFIGS_OFF64 = {key: _Config(64, c.block_n, c.block_k, num_warps=4, num_stages=c.num_stages)
                      for key, c in _GPU_CONFIGS.items()}
_GPU_CONFIGS_OFF64[("fp32", "small", "small")] = _Config(64, 32, 16, num_warps=4, num_stages=3)
_GPU_CONFIGS_OFF64[("fp32", "small", "large")] = _Config(64, 128, 16, num_warps=8, num_stages=3)
# The interpreter costs per tile operation, not per element: few, wide programs.
_INTERPRETER_CONFIG = _Config(128, 32, 16, num_warps=4, num_stages=1)

_MAX_BLOCK_M = max(c.block_m for c in (*_GPU_CONFIGS.values(), _INTERPRETER_CONFIG))

# CUDA's grid limits: gridDim.x up to 2**31 - 1, gridDim.y and gridDim.z up to 65535.
CUDA_MAX_GRID = (2 ** 31 - 1, 65535, 65535)


def _bucket(n: int, buckets) -> str:
    return next(name for name, top in buckets if top is None or n <= top)


def _gpu_config_key(dtype: torch.dtype, cin: int, cout: int) -> tuple[str, str, str]:
    return ("fp32" if dtype == torch.float32 else "16bit", _bucket(cin, _CIN_BUCKETS), _bucket(cout, _COUT_BUCKETS))


def _config(dtype: torch.dtype, cin: int, cout: int, off64: bool) -> _Config:
    if _interpreting():
        return _INTERPRETER_CONFIG
    return (_GPU_CONFIGS_OFF64 if off64 else _GPU_CONFIGS)[_gpu_config_key(dtype, cin, cout)]


def _grid(m: int, cout: int, cfg: _Config) -> tuple[int]:
    """One program per (M block, N block), all on grid axis 0 (N blocks fastest), checked against CUDA's
    limit: ``M = B·T_out·H_out·W_out`` output positions, ``cout`` output channels."""
    programs = triton.cdiv(m, cfg.block_m) * triton.cdiv(cout, cfg.block_n)
    if programs > CUDA_MAX_GRID[0]:
        raise ValueError(f"causal_conv3d (triton) would launch {programs} programs for {m} output positions and "
                         f"{cout} output channels, more than CUDA's grid limit {CUDA_MAX_GRID[0]}; split the batch "
                         f"or the video into chunks")
    return (programs,)


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


def _is_channels_last(t: torch.Tensor) -> bool:
    return t.is_contiguous(memory_format=torch.channels_last_3d)


def _channels_last(t: torch.Tensor) -> torch.Tensor:
    return t.contiguous(memory_format=torch.channels_last_3d)


def _out_format(x: torch.Tensor):
    """x's memory format, as the reference's ``like_layout`` decides it."""
    if not x.is_contiguous() and _is_channels_last(x):
        return torch.channels_last_3d
    return torch.contiguous_format


# --- launcher (the triton backend of sora_fast.ops.causal_conv3d) -------------------------------
def causal_conv3d_forward(x, weight, bias, *, stride, padding, pad_mode, cache, residual, packed_weight=None,
                          _force_off64=False):
    """Output ``(B, Cout, T_out, H_out, W_out)`` in x's dtype and memory format (see module docstring).

    ``packed_weight``: ``causal_conv3d_pack_weight(weight)`` when the caller keeps it (a module), else the
    weight is packed here. ``_force_off64`` (tests): 64-bit offsets even for small tensors."""
    _check_supported(x, weight, stride)
    out_shape = causal_conv3d_output_shape(x.shape, weight.shape, stride, padding)
    bsz, cout, t_out, h_out, w_out = out_shape
    _, cin, _, h, w = x.shape
    kt, kh, kw = weight.shape[2:]
    # the kernel reads and writes channels-last-3d only (see the module docstring)
    out = _empty(out_shape, x.dtype, x.device, torch.channels_last_3d)
    xc = _channels_last(x)
    wp = causal_conv3d_pack_weight(weight) if packed_weight is None else packed_weight
    if cache is not None and cache.shape[2] > 0:
        cc, n_cache = _channels_last(cache), cache.shape[2]
    else:
        cc, n_cache = xc, 0
    res = _channels_last(residual) if residual is not None else out
    bias_t = bias if bias is not None else wp
    m = bsz * t_out * h_out * w_out
    # 64-bit offsets when a row index (up to M + BLOCK_M) or an activation offset would overflow int32
    off64 = _force_off64 or m + _MAX_BLOCK_M >= 2 ** 31 or max(extent(t) for t in (xc, cc, res, out)) >= 2 ** 31
    cfg = _config(x.dtype, cin, cout, off64)
    _causal_conv3d_fwd_kernel[_grid(m, cout, cfg)](
        xc, cc, wp, bias_t, res, out,
        m, t_out, h_out, w_out, h, w, cin, cout, n_cache,
        xc.stride(0), xc.stride(2), xc.stride(3), xc.stride(4),
        cc.stride(0), cc.stride(2), cc.stride(3), cc.stride(4),
        res.stride(0), res.stride(2), res.stride(3), res.stride(4),
        out.stride(0), out.stride(2), out.stride(3), out.stride(4),
        ST=stride[0], SH=stride[1], SW=stride[2], PH=padding[0], PW=padding[1], KT=kt, KH=kh, KW=kw,
        REPLICATE=pad_mode == "replicate", HAS_BIAS=bias is not None, HAS_RES=residual is not None,
        OFF64=off64, BLOCK_M=cfg.block_m, BLOCK_N=cfg.block_n, BLOCK_K=cfg.block_k,
        UPCAST=_interpreting() and x.dtype == torch.bfloat16,
        PRECISION=dot_precision(x.dtype),
        num_warps=cfg.num_warps, num_stages=cfg.num_stages)
    return out if _out_format(x) == torch.channels_last_3d else out.contiguous()


# --- what the offline kernel report compiles ----------------------------------------------------
# Specializations the report gates, per config: (kernel, stride, pad_mode, bias, residual, OFF64).
# Other kernel/stride combinations are the same code with other constexprs.
# (OFF64: 64-bit offsets, which the launcher picks for tensors of 2**31 elements or more.)
_REPORT_VARIANTS = (
    ((3, 3, 3), (1, 1, 1), "replicate", True, True, False),
    ((1, 1, 1), (1, 1, 1), "zeros", True, False, False),
)
_REPORT_OFF64 = (((3, 3, 3), (1, 1, 1), "zeros", True, True, True),)
_REPORT_EXTRA = (  # the down-sampling convs, at the large bucket only
    ((3, 1, 1), (2, 1, 1), "zeros", True, False, False),
    ((1, 3, 3), (1, 2, 2), "zeros", True, False, False),
)
# Runtime specialization: an int argument that is a multiple of 16 gets the divisibility hint, as do
# 16-byte aligned pointers. With channels-last tensors the strides are multiples of the channel count,
# so VAE channel counts (multiples of 16) give aligned strides; an RGB side (Cin or Cout = 3) does not.
_X_INTS = ("Cin", "sxb", "sxt", "sxh", "sxw", "scb", "sct", "sch", "scw")
_OUT_INTS = ("Cout", "srb", "srt", "srh", "srw", "sob", "sot", "soh", "sow")
_INT_ARGS = ("M", "T_out", "H_out", "W_out", "H", "W", "n_cache") + _X_INTS + _OUT_INTS
_POINTERS = ("X", "C", "Wp", "BIAS", "RES", "OUT")


def _report_alignments(cin_b: str, cout_b: str) -> list[tuple[str, tuple[str, ...]]]:
    """(label, hinted arguments) of the specializations a config meets: 16-multiple channel counts (VAE
    layers), and for the buckets that hold an RGB side, Cin = 3 (the encoder's input conv: x strides
    unaligned) or Cout = 3 (the decoder's head: output and residual strides unaligned)."""
    cases = [("", _POINTERS + _X_INTS + _OUT_INTS)]
    if cin_b == "small" or cout_b == "tiny":
        unaligned = (_OUT_INTS if cout_b == "tiny" else ()) + (_X_INTS if cin_b == "small" else ())
        label = ("cin=3 " if cin_b == "small" else "") + ("cout=3 " if cout_b == "tiny" else "")
        cases.append((label, _POINTERS + tuple(n for n in _X_INTS + _OUT_INTS if n not in unaligned)))
    return cases


def shipped_configs() -> list[KernelConfig]:
    """Every GPU config of the launcher (per dtype class and (Cin, Cout) bucket), as the runtime specializes
    it: channels-last tensors (the only layout the kernel reads and writes), 16-divisible pointers, and
    16-divisible channel counts and strides for VAE channel counts (multiples of 16) or unaligned ones for
    an RGB side (Cin or Cout = 3) in the buckets that hold it. fp16 shares the bf16 code path."""
    fn = _causal_conv3d_fwd_kernel
    configs = []
    tables = [(key, cfg, _REPORT_VARIANTS + (_REPORT_EXTRA if key[1:] == ("large", "large") else ()))
              for key, cfg in _GPU_CONFIGS.items()]
    tables += [(key, cfg, _REPORT_OFF64) for key, cfg in _GPU_CONFIGS_OFF64.items()]
    for (dclass, cin_b, cout_b), cfg, variants in tables:
        dtypes = ("bf16", "fp16") if dclass == "16bit" else ("fp32",)
        for dtype, (label, aligned_names), (k, stride, pad_mode, has_bias, has_res, off64) in itertools.product(
                dtypes, _report_alignments(cin_b, cout_b), variants):
            sig = {n: f"*{dtype}" for n in _POINTERS}
            sig.update({n: "i32" for n in _INT_ARGS})
            constexprs = dict(ST=stride[0], SH=stride[1], SW=stride[2], PH=k[1] // 2, PW=k[2] // 2, KT=k[0],
                              KH=k[1], KW=k[2], REPLICATE=pad_mode == "replicate", HAS_BIAS=has_bias,
                              HAS_RES=has_res, OFF64=off64, BLOCK_M=cfg.block_m, BLOCK_N=cfg.block_n,
                              BLOCK_K=cfg.block_k, UPCAST=False,
                              PRECISION=FP32_PRECISION if dtype == "fp32" else "tf32")
            variant = f"k{''.join(map(str, k))} s{''.join(map(str, stride))} {pad_mode}" + \
                      (" +bias" if has_bias else "") + (" +res" if has_res else "") + (" off64" if off64 else "")
            configs.append(KernelConfig(
                name=f"causal_conv3d_fwd cin:{cin_b} cout:{cout_b} {dtype} {label}{variant} "
                     f"m{cfg.block_m} n{cfg.block_n} k{cfg.block_k}",
                fn=fn, signature=sig, constexprs=constexprs, num_warps=cfg.num_warps,
                num_stages=cfg.num_stages, divisible_by_16=aligned_names))
    return configs
