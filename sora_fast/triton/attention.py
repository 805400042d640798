"""Packed varlen spacetime attention in Triton: forward, backward, 3D windows, fused 3D RoPE.

One program per (query block, head) from the pack's real block table (``_blocks.block_table``).
Online softmax in base 2 with fp32 statistics; LSE out. Backward in the FlashAttention-2 style:
``delta = rowsum(dO * O)``, then one kernel for dK/dV (a program per key block, looping over query
blocks) and one for dQ (a program per query block, looping over key blocks) — every gradient row is
written by exactly one program, so the result is deterministic without atomics.

Windows (``window=(wt, wh, ww)`` on the t-major grid): the key loop starts and ends at the frames the
window can reach, and a key block whose coordinate box is farther than the window from the query
block's box is skipped before any load (see ``_blocks``); partial blocks are masked per element.

Fused RoPE: q and k tiles are loaded whole (16-byte loads), split into their rotary pairs, rotated in
registers and re-joined, so the dots are the plain ones; dQ and dK are rotated back the same way before
the store. No rotated copy of q or k is ever written to memory. cos/sin come from a polynomial
(``_sincos``) rather than libdevice, whose slow path would put a local-memory array in every kernel.

Blocking: each (kernel, window, RoPE) variant has its own tile shape, chosen with the offline sm_90
report so that every shipped config compiles with 0 spill bytes and issues wgmma. The dK/dV kernel
works on transposed scores (keys x queries) so no computed tile is transposed before a dot.

bf16 under the Triton interpreter: its bf16 arithmetic is wrong, so ``UPCAST`` converts tiles to fp32
right after loading (interpreter only; on a GPU bf16 tiles feed the tensor cores).

fp32 inputs: dots in ``FP32_PRECISION`` ("tf32x3": three tf32 wgmmas per dot, near-fp32 accuracy) with
their own tiles; the backward variants for which no tile compiles without spills run torch fp32 math on
a GPU, one block of query rows at a time (``_fp32_reference``). The interpreter ignores the dot precision
(exact fp32 on CPU).

Offsets: the per-sequence bases are 64-bit, offsets inside a sequence 32-bit; ``OFF64`` (picked on the
host when some tensor spans 2**31 elements or more) makes the strides, and so every offset, 64-bit.
Every small table the kernels index (cu_seqlens, grid, RoPE coordinates) is made contiguous before the
launch, and window half-sizes are clamped to the grid's extents (same attention, int32 arithmetic).
"""
from __future__ import annotations

import warnings
from dataclasses import dataclass
from typing import Optional

import torch
import triton
import triton.language as tl

from ..ops.rope import rope3d_split
from ._blocks import block_table
from ._common import dot_precision, extent, interpreting as _interpreting, to_store, wide
from ._spec import KernelConfig

LOG2E = 1.4426950408889634
MAX_HEAD_DIM = 128


# --- device helpers ------------------------------------------------------------------------------
@triton.jit
def _load_tile(base, rows, row_mask, stride_n, cols, col_mask, UPCAST: tl.constexpr):
    x = tl.load(base + rows[:, None] * stride_n + cols[None, :], mask=row_mask[:, None] & col_mask[None, :],
                other=0.0)
    if UPCAST:
        x = x.to(tl.float32)
    return x


@triton.jit
def _sincos(x):
    """sin and cos in fp32 by Cody-Waite reduction to [-pi/4, pi/4] and minimax polynomials (cephes
    sinf/cosf, ~1 ulp for |x| < 1e5). libdevice's sinf/cosf carry a Payne-Hanek slow path with a
    local-memory array: stack bytes in every kernel that calls them, although RoPE angles never need it."""
    q = tl.floor(x * 0.6366197723675814 + 0.5)                    # nearest multiple of pi/2
    r = x - q * 1.5703125
    r = r - q * 4.837512969970703125e-4
    r = r - q * 7.54978995489188216e-8
    r2 = r * r
    sin_r = r + r * r2 * (-1.6666654611e-1 + r2 * (8.3321608736e-3 + r2 * -1.9515295891e-4))
    cos_r = 1.0 - 0.5 * r2 + r2 * r2 * (4.166664568298827e-2 + r2 * (-1.388731625493765e-3
                                                                    + r2 * 2.443315711809948e-5))
    quadrant = q.to(tl.int32) & 3
    sin_x = tl.where(quadrant == 0, sin_r, tl.where(quadrant == 1, cos_r, tl.where(quadrant == 2, -sin_r, -cos_r)))
    cos_x = tl.where(quadrant == 0, cos_r, tl.where(quadrant == 1, -sin_r, tl.where(quadrant == 2, -cos_r, sin_r)))
    return sin_x, cos_x


@triton.jit
def _rope_cos_sin(COORDS, tokens, row_mask, AXIS, FREQ, pairs, pair_mask):
    """cos/sin of the rotation of every (token, rotary pair): (rows, BLOCK_DH) fp32."""
    axis = tl.load(AXIS + pairs, mask=pair_mask, other=0)[None, :]
    freq = tl.load(FREQ + pairs, mask=pair_mask, other=0.0)
    # three coordinate vectors and a select, not a (rows, pairs) gather: far fewer address registers
    ct = tl.load(COORDS + tokens * 3, mask=row_mask, other=0).to(tl.float32)[:, None]
    ch = tl.load(COORDS + tokens * 3 + 1, mask=row_mask, other=0).to(tl.float32)[:, None]
    cw = tl.load(COORDS + tokens * 3 + 2, mask=row_mask, other=0).to(tl.float32)[:, None]
    angle = tl.where(axis == 0, ct, tl.where(axis == 1, ch, cw)) * freq[None, :]
    sin, cos = _sincos(angle)
    return cos, sin


@triton.jit
def _load_qk(base, tokens, row_mask, stride_n, cols, col_mask, COORDS, AXIS, FREQ, pairs, pair_mask,
             ROWS: tl.constexpr, BLOCK_D: tl.constexpr, ROPE: tl.constexpr, UPCAST: tl.constexpr):
    """A q or k tile, rotated by 3D RoPE in registers when ROPE, in the input dtype (fp32 if UPCAST).
    One contiguous load of whole rows (16-byte loads), pairs split and re-joined in registers."""
    if ROPE:
        x = _load_tile(base, tokens, row_mask, stride_n, cols, col_mask, True)
        xe, xo = tl.split(tl.reshape(x, (ROWS, BLOCK_D // 2, 2)))
        c, s = _rope_cos_sin(COORDS, tokens, row_mask, AXIS, FREQ, pairs, pair_mask)
        x = tl.reshape(tl.join(xe * c - xo * s, xe * s + xo * c), (ROWS, BLOCK_D))
        if not UPCAST:
            x = x.to(base.dtype.element_ty)
    else:
        x = _load_tile(base, tokens, row_mask, stride_n, cols, col_mask, UPCAST)
    return x


@triton.jit
def _block_box(first, last, gh, gw):
    """Coordinate bounding box of rows first..last of a t-major (T, gh, gw) grid."""
    hw = gh * gw
    t0 = first // hw
    t1 = last // hw
    same_frame = t0 == t1
    same_row = (first // gw) == (last // gw)
    h0 = tl.where(same_frame, (first // gw) % gh, 0)
    h1 = tl.where(same_frame, (last // gw) % gh, gh - 1)
    w0 = tl.where(same_row, first % gw, 0)
    w1 = tl.where(same_row, last % gw, gw - 1)
    return t0, t1, h0, h1, w0, w1


@triton.jit
def _boxes_far(a_first, a_last, b_first, b_last, gh, gw, win_t, win_h, win_w):
    at0, at1, ah0, ah1, aw0, aw1 = _block_box(a_first, a_last, gh, gw)
    bt0, bt1, bh0, bh1, bw0, bw1 = _block_box(b_first, b_last, gh, gw)
    far_t = (bt0 - at1 > win_t) | (at0 - bt1 > win_t)
    far_h = (bh0 - ah1 > win_h) | (ah0 - bh1 > win_h)
    far_w = (bw0 - aw1 > win_w) | (aw0 - bw1 > win_w)
    return far_t | far_h | far_w


@triton.jit
def _window_mask(rows_a, rows_b, gh, gw, win_t, win_h, win_w):
    hw = gh * gw
    dt = tl.abs(rows_a[:, None] // hw - rows_b[None, :] // hw)
    dh = tl.abs((rows_a[:, None] // gw) % gh - (rows_b[None, :] // gw) % gh)
    dw = tl.abs(rows_a[:, None] % gw - rows_b[None, :] % gw)
    return (dt <= win_t) & (dh <= win_h) & (dw <= win_w)


@triton.jit
def _loop_range(first, last, length, gh, gw, win_t, BLOCK: tl.constexpr, WINDOW: tl.constexpr):
    """Rows of the other side a block can interact with, block-aligned: [lo, hi)."""
    lo = 0
    hi = length
    if WINDOW:
        hw = gh * gw
        lo = tl.maximum(first // hw - win_t, 0) * hw
        lo = (lo // BLOCK) * BLOCK
        # frames past the last one reachable, clamped to the sequence's frame count before multiplying
        # (t_last + win_t + 1) * hw would overflow for a huge window
        t_last = last // hw
        hi = (t_last + 1 + tl.minimum(win_t, length // hw - 1 - t_last)) * hw
    return lo, hi


@triton.jit
def _program_block(TABLE, CU_Q, CU_K, GRID, WINDOW: tl.constexpr, OFF64: tl.constexpr):
    """This program's head, (sequence, first row of its block), the sequence's query and key ranges, and
    the sequence's grid rows/columns (used by windows; 1 without). With OFF64 the head and the sequence
    starts are 64-bit (offsets into the LSE and RoPE tables); row indices stay 32-bit."""
    pid = tl.program_id(0)
    head = tl.program_id(1)
    seq = tl.load(TABLE + 2 * pid)
    start = tl.load(TABLE + 2 * pid + 1)
    q_start = tl.load(CU_Q + seq)
    q_len = tl.load(CU_Q + seq + 1) - q_start
    k_start = tl.load(CU_K + seq)
    k_len = tl.load(CU_K + seq + 1) - k_start
    gh = 1
    gw = 1
    if WINDOW:
        gh = tl.load(GRID + 3 * seq + 1)
        gw = tl.load(GRID + 3 * seq + 2)
    if OFF64:
        head = head.to(tl.int64)
        q_start = q_start.to(tl.int64)
        k_start = k_start.to(tl.int64)
    return head, start, q_start, q_len, k_start, k_len, gh, gw


# --- forward -------------------------------------------------------------------------------------
@triton.jit
def _attn_fwd_kernel(Q, K, V, O, LSE, CU_Q, CU_K, TABLE, GRID, COORDS, AXIS, FREQ,
                     stride_qn, stride_qh, stride_kn, stride_kh, stride_vn, stride_vh, stride_on, stride_oh,
                     n_q, qk_scale, win_t, win_h, win_w,
                     HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_DH: tl.constexpr,
                     BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, WINDOW: tl.constexpr, ROPE: tl.constexpr,
                     UPCAST: tl.constexpr, PRECISION: tl.constexpr, OFF64: tl.constexpr,
                     SKIP_FAR: tl.constexpr):
    head, m0, q_start, q_len, k_start, k_len, gh, gw = _program_block(TABLE, CU_Q, CU_K, GRID, WINDOW, OFF64)
    stride_qn, stride_qh = wide(stride_qn, stride_qh, OFF64)
    stride_kn, stride_kh = wide(stride_kn, stride_kh, OFF64)
    stride_vn, stride_vh = wide(stride_vn, stride_vh, OFF64)
    stride_on, stride_oh = wide(stride_on, stride_oh, OFF64)

    offs_m = m0 + tl.arange(0, BLOCK_M)
    m_mask = offs_m < q_len
    offs_d = tl.arange(0, BLOCK_D)
    d_mask = offs_d < HEAD_DIM
    pairs = tl.arange(0, BLOCK_DH)
    pair_mask = pairs < HEAD_DIM // 2
    # 64-bit scalar bases per program, 32-bit offsets inside a sequence unless OFF64: few address registers
    q_base = Q + q_start.to(tl.int64) * stride_qn + head * stride_qh
    k_base = K + k_start.to(tl.int64) * stride_kn + head * stride_kh
    v_base = V + k_start.to(tl.int64) * stride_vn + head * stride_vh
    q_coords = COORDS + q_start * 3
    k_coords = COORDS + k_start * 3

    q = _load_qk(q_base, offs_m, m_mask, stride_qn, offs_d, d_mask, q_coords, AXIS, FREQ, pairs, pair_mask, BLOCK_M,
                 BLOCK_D, ROPE, UPCAST)

    m_last = tl.minimum(m0 + BLOCK_M, q_len) - 1
    lo, hi = _loop_range(m0, m_last, k_len, gh, gw, win_t, BLOCK_N, WINDOW)

    m_i = tl.full([BLOCK_M], float("-inf"), tl.float32)
    l_i = tl.zeros([BLOCK_M], tl.float32)
    acc = tl.zeros([BLOCK_M, BLOCK_D], tl.float32)
    for n0 in range(lo, hi, BLOCK_N):
        n_last = tl.minimum(n0 + BLOCK_N, k_len) - 1
        skip = False
        if WINDOW and SKIP_FAR:
            skip = _boxes_far(m0, m_last, n0, n_last, gh, gw, win_t, win_h, win_w)
        if not skip:
            offs_n = n0 + tl.arange(0, BLOCK_N)
            n_mask = offs_n < k_len
            k = _load_qk(k_base, offs_n, n_mask, stride_kn, offs_d, d_mask, k_coords, AXIS, FREQ, pairs, pair_mask,
                         BLOCK_N, BLOCK_D, ROPE, UPCAST)
            s = tl.dot(q, tl.trans(k), input_precision=PRECISION)
            valid = n_mask[None, :] & m_mask[:, None]
            if WINDOW:
                valid = valid & _window_mask(offs_m, offs_n, gh, gw, win_t, win_h, win_w)
            s = tl.where(valid, s * qk_scale, float("-inf"))
            m_new = tl.maximum(m_i, tl.max(s, 1))
            m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)
            alpha = tl.exp2(m_i - m_safe)
            p = tl.exp2(s - m_safe[:, None])
            l_i = l_i * alpha + tl.sum(p, 1)
            v = _load_tile(v_base, offs_n, n_mask, stride_vn, offs_d, d_mask, UPCAST)
            acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v, input_precision=PRECISION)
            m_i = m_new

    empty = l_i == 0.0
    l_safe = tl.where(empty, 1.0, l_i)
    out = acc / l_safe[:, None]
    o_base = O + q_start.to(tl.int64) * stride_on + head * stride_oh
    tl.store(o_base + offs_m[:, None] * stride_on + offs_d[None, :], to_store(out, O.dtype.element_ty, UPCAST),
             mask=m_mask[:, None] & d_mask[None, :])
    lse = tl.where(empty, float("-inf"), (m_i + tl.log2(l_safe)) / 1.4426950408889634)
    tl.store(LSE + head * n_q + q_start + offs_m, lse, mask=m_mask)


# --- backward ------------------------------------------------------------------------------------
@triton.jit
def _unrotate_store(base, tokens, row_mask, stride_n, cols, col_mask, g, COORDS, AXIS, FREQ, pairs, pair_mask,
                    ROWS: tl.constexpr, BLOCK_D: tl.constexpr, UPCAST: tl.constexpr):
    """Store the gradient w.r.t. the unrotated input from the gradient w.r.t. the rotated one
    (cos/sin recomputed here rather than kept live through the loop: registers are the scarce part)."""
    ga, gb = tl.split(tl.reshape(g, (ROWS, BLOCK_D // 2, 2)))
    c, s = _rope_cos_sin(COORDS, tokens, row_mask, AXIS, FREQ, pairs, pair_mask)
    g = tl.reshape(tl.join(ga * c + gb * s, gb * c - ga * s), (ROWS, BLOCK_D))
    tl.store(base + tokens[:, None] * stride_n + cols[None, :], to_store(g, base.dtype.element_ty, UPCAST),
             mask=row_mask[:, None] & col_mask[None, :])


@triton.jit
def _attn_bwd_dkdv_kernel(Q, K, V, DO, DK, DV, LSE, DELTA, CU_Q, CU_K, TABLE, GRID, COORDS, AXIS, FREQ,
                          stride_qn, stride_qh, stride_kn, stride_kh, stride_vn, stride_vh,
                          stride_don, stride_doh, stride_dkn, stride_dkh, stride_dvn, stride_dvh,
                          n_q, sm_scale, qk_scale, win_t, win_h, win_w,
                          HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_DH: tl.constexpr,
                          BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, WINDOW: tl.constexpr, ROPE: tl.constexpr,
                          UPCAST: tl.constexpr, PRECISION: tl.constexpr, OFF64: tl.constexpr,
                          SKIP_FAR: tl.constexpr):
    head, n0, q_start, q_len, k_start, k_len, gh, gw = _program_block(TABLE, CU_Q, CU_K, GRID, WINDOW, OFF64)
    stride_qn, stride_qh = wide(stride_qn, stride_qh, OFF64)
    stride_kn, stride_kh = wide(stride_kn, stride_kh, OFF64)
    stride_vn, stride_vh = wide(stride_vn, stride_vh, OFF64)
    stride_don, stride_doh = wide(stride_don, stride_doh, OFF64)
    stride_dkn, stride_dkh = wide(stride_dkn, stride_dkh, OFF64)
    stride_dvn, stride_dvh = wide(stride_dvn, stride_dvh, OFF64)

    offs_n = n0 + tl.arange(0, BLOCK_N)
    n_mask = offs_n < k_len
    offs_d = tl.arange(0, BLOCK_D)
    d_mask = offs_d < HEAD_DIM
    pairs = tl.arange(0, BLOCK_DH)
    pair_mask = pairs < HEAD_DIM // 2
    q_start64 = q_start.to(tl.int64)
    k_start64 = k_start.to(tl.int64)
    q_base = Q + q_start64 * stride_qn + head * stride_qh
    do_base = DO + q_start64 * stride_don + head * stride_doh
    lse_base = LSE + head * n_q + q_start
    delta_base = DELTA + head * n_q + q_start
    q_coords = COORDS + q_start * 3
    k_coords = COORDS + k_start * 3

    k = _load_qk(K + k_start64 * stride_kn + head * stride_kh, offs_n, n_mask, stride_kn, offs_d, d_mask, k_coords,
                 AXIS, FREQ, pairs, pair_mask, BLOCK_N, BLOCK_D, ROPE, UPCAST)
    v = _load_tile(V + k_start64 * stride_vn + head * stride_vh, offs_n, n_mask, stride_vn, offs_d, d_mask, UPCAST)
    dk = tl.zeros([BLOCK_N, BLOCK_D], tl.float32)
    dv = tl.zeros([BLOCK_N, BLOCK_D], tl.float32)

    n_last = tl.minimum(n0 + BLOCK_N, k_len) - 1
    lo, hi = _loop_range(n0, n_last, q_len, gh, gw, win_t, BLOCK_M, WINDOW)
    for m0 in range(lo, hi, BLOCK_M):
        m_last = tl.minimum(m0 + BLOCK_M, q_len) - 1
        skip = False
        if WINDOW and SKIP_FAR:
            skip = _boxes_far(m0, m_last, n0, n_last, gh, gw, win_t, win_h, win_w)
        if not skip:
            offs_m = m0 + tl.arange(0, BLOCK_M)
            m_mask = offs_m < q_len
            q = _load_qk(q_base, offs_m, m_mask, stride_qn, offs_d, d_mask, q_coords, AXIS, FREQ, pairs, pair_mask,
                         BLOCK_M, BLOCK_D, ROPE, UPCAST)
            # transposed scores (keys x queries), so every computed tile is used as the left operand
            # as it is: no register transposes feeding the tensor cores (as in Triton's FA2 tutorial)
            st = tl.dot(k, tl.trans(q), input_precision=PRECISION)
            lse2 = tl.load(lse_base + offs_m, mask=m_mask, other=0.0) * 1.4426950408889634
            valid = n_mask[:, None] & m_mask[None, :]
            if WINDOW:
                valid = valid & _window_mask(offs_n, offs_m, gh, gw, win_t, win_h, win_w)
            pt = tl.where(valid, tl.exp2(st * qk_scale - lse2[None, :]), 0.0)
            do = _load_tile(do_base, offs_m, m_mask, stride_don, offs_d, d_mask, UPCAST)
            dv += tl.dot(pt.to(do.dtype), do, input_precision=PRECISION)
            delta = tl.load(delta_base + offs_m, mask=m_mask, other=0.0)
            dpt = tl.dot(v, tl.trans(do), input_precision=PRECISION)
            dst = pt * (dpt - delta[None, :])
            dk += tl.dot(dst.to(q.dtype), q, input_precision=PRECISION)

    dv_ptr = DV + k_start64 * stride_dvn + head * stride_dvh + offs_n[:, None] * stride_dvn + offs_d[None, :]
    tl.store(dv_ptr, to_store(dv, DV.dtype.element_ty, UPCAST), mask=n_mask[:, None] & d_mask[None, :])
    dk_base = DK + k_start64 * stride_dkn + head * stride_dkh
    if ROPE:
        _unrotate_store(dk_base, offs_n, n_mask, stride_dkn, offs_d, d_mask, dk * sm_scale, k_coords, AXIS, FREQ,
                        pairs, pair_mask, BLOCK_N, BLOCK_D, UPCAST)
    else:
        dk_ptr = dk_base + offs_n[:, None] * stride_dkn + offs_d[None, :]
        tl.store(dk_ptr, to_store(dk * sm_scale, DK.dtype.element_ty, UPCAST), mask=n_mask[:, None] & d_mask[None, :])


@triton.jit
def _attn_bwd_dq_kernel(Q, K, V, DO, DQ, LSE, DELTA, CU_Q, CU_K, TABLE, GRID, COORDS, AXIS, FREQ,
                        stride_qn, stride_qh, stride_kn, stride_kh, stride_vn, stride_vh,
                        stride_don, stride_doh, stride_dqn, stride_dqh,
                        n_q, sm_scale, qk_scale, win_t, win_h, win_w,
                        HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_DH: tl.constexpr,
                        BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, WINDOW: tl.constexpr, ROPE: tl.constexpr,
                        UPCAST: tl.constexpr, PRECISION: tl.constexpr, OFF64: tl.constexpr,
                        SKIP_FAR: tl.constexpr):
    head, m0, q_start, q_len, k_start, k_len, gh, gw = _program_block(TABLE, CU_Q, CU_K, GRID, WINDOW, OFF64)
    stride_qn, stride_qh = wide(stride_qn, stride_qh, OFF64)
    stride_kn, stride_kh = wide(stride_kn, stride_kh, OFF64)
    stride_vn, stride_vh = wide(stride_vn, stride_vh, OFF64)
    stride_don, stride_doh = wide(stride_don, stride_doh, OFF64)
    stride_dqn, stride_dqh = wide(stride_dqn, stride_dqh, OFF64)

    offs_m = m0 + tl.arange(0, BLOCK_M)
    m_mask = offs_m < q_len
    offs_d = tl.arange(0, BLOCK_D)
    d_mask = offs_d < HEAD_DIM
    pairs = tl.arange(0, BLOCK_DH)
    pair_mask = pairs < HEAD_DIM // 2
    q_start64 = q_start.to(tl.int64)
    k_base = K + k_start.to(tl.int64) * stride_kn + head * stride_kh
    v_base = V + k_start.to(tl.int64) * stride_vn + head * stride_vh
    q_coords = COORDS + q_start * 3
    k_coords = COORDS + k_start * 3

    q = _load_qk(Q + q_start64 * stride_qn + head * stride_qh, offs_m, m_mask, stride_qn, offs_d, d_mask, q_coords,
                 AXIS, FREQ, pairs, pair_mask, BLOCK_M, BLOCK_D, ROPE, UPCAST)
    dq = tl.zeros([BLOCK_M, BLOCK_D], tl.float32)
    do = _load_tile(DO + q_start64 * stride_don + head * stride_doh, offs_m, m_mask, stride_don, offs_d, d_mask,
                    UPCAST)
    lse2 = tl.load(LSE + head * n_q + q_start + offs_m, mask=m_mask, other=0.0) * 1.4426950408889634
    delta = tl.load(DELTA + head * n_q + q_start + offs_m, mask=m_mask, other=0.0)

    m_last = tl.minimum(m0 + BLOCK_M, q_len) - 1
    lo, hi = _loop_range(m0, m_last, k_len, gh, gw, win_t, BLOCK_N, WINDOW)
    for n0 in range(lo, hi, BLOCK_N):
        n_last = tl.minimum(n0 + BLOCK_N, k_len) - 1
        skip = False
        if WINDOW and SKIP_FAR:
            skip = _boxes_far(m0, m_last, n0, n_last, gh, gw, win_t, win_h, win_w)
        if not skip:
            offs_n = n0 + tl.arange(0, BLOCK_N)
            n_mask = offs_n < k_len
            k = _load_qk(k_base, offs_n, n_mask, stride_kn, offs_d, d_mask, k_coords, AXIS, FREQ, pairs, pair_mask,
                         BLOCK_N, BLOCK_D, ROPE, UPCAST)
            s = tl.dot(q, tl.trans(k), input_precision=PRECISION)
            valid = n_mask[None, :] & m_mask[:, None]
            if WINDOW:
                valid = valid & _window_mask(offs_m, offs_n, gh, gw, win_t, win_h, win_w)
            p = tl.where(valid, tl.exp2(s * qk_scale - lse2[:, None]), 0.0)
            v = _load_tile(v_base, offs_n, n_mask, stride_vn, offs_d, d_mask, UPCAST)
            dp = tl.dot(do, tl.trans(v), input_precision=PRECISION)
            ds = p * (dp - delta[:, None])
            dq += tl.dot(ds.to(k.dtype), k, input_precision=PRECISION)

    dq_base = DQ + q_start64 * stride_dqn + head * stride_dqh
    if ROPE:
        _unrotate_store(dq_base, offs_m, m_mask, stride_dqn, offs_d, d_mask, dq * sm_scale, q_coords, AXIS, FREQ, pairs,
                        pair_mask, BLOCK_M, BLOCK_D, UPCAST)
    else:
        dq_ptr = dq_base + offs_m[:, None] * stride_dqn + offs_d[None, :]
        tl.store(dq_ptr, to_store(dq * sm_scale, DQ.dtype.element_ty, UPCAST), mask=m_mask[:, None] & d_mask[None, :])


# --- launch configuration ------------------------------------------------------------------------
@dataclass(frozen=True)
class _Config:
    block_m: int
    block_n: int
    num_warps: int
    num_stages: int
    # windows: skip key blocks whose box is farther than the window from the query block's (never
    # loaded). Off, every block of the frame range is visited and masked (same result, more work): only
    # where the skip test's registers make the tile spill.
    skip_far: bool = True


# GPU configs per (kernel, window, fused RoPE), chosen with the offline sm_90 report
# (`python -m sora_fast.tools.kernel_report`): every shipped config compiles with 0 spill bytes, fits
# shared memory and issues wgmma (HGMMA). RoPE keeps cos/sin tiles live, so its configs are smaller.
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
# fp32 inputs: FP32_PRECISION splits every dot into three tf32 wgmmas (hi*hi + hi*lo + lo*hi: near-fp32
# accuracy on the tensor cores). The split halves of the loop-invariant operands stay in registers, so only
# these (kernel, window, RoPE, BLOCK_D) variants have a tile that compiles for sm_90 without spills, with
# 32- and 64-bit offsets. At BLOCK_D 128 only the forward fits (128x16 on 8 warps, 235-255 of 255
# registers), the windowed one without the far-block skip (with it, 168-288 B spilled); the backward
# spilled 112-1104 B at every tile tried (BLOCK_M/N 16-128, 4-8 warps, 1-2 stages), and "ieee" FMA dots
# spill more. For the others, fp32 inputs on a GPU run torch fp32 math instead (see _fp32_reference).
_GPU_CONFIGS_FP32 = {
    **{("fwd", window, rope, block_d): _Config(64, 32, num_warps=4, num_stages=2)
       for window in (False, True) for rope in (False, True) for block_d in (32, 64)},
    **{("fwd", window, rope, 128): _Config(128, 16, num_warps=8, num_stages=2, skip_far=not window)
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
    (:func:`~sora_fast.ops.attention.attention_backward_streamed`, bounded memory) for the backward."""
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
            raise ValueError(f"the triton attention kernel takes fewer than {_OFF32_LIMIT} rows, got {name}.shape[0]={n}")
    if rope_coords is not None and 3 * q.shape[0] >= _OFF32_LIMIT:
        raise ValueError(f"the triton attention kernel's fused RoPE takes fewer than {_OFF32_LIMIT // 3 + 1} rows, "
                         f"got q.shape[0]={q.shape[0]}")


def _common_args(q, cu_seqlens_q, grid, rope_coords, rope_theta):
    """Tensors the kernels read beside q/k/v (unused ones are any valid pointer), contiguous: the kernels
    index them as dense arrays."""
    if rope_coords is not None:
        axis, freq = _rope_tables(q.shape[-1], rope_theta, q.device)
        coords = rope_coords.contiguous()
    else:
        axis = freq = coords = cu_seqlens_q
    grid_t = grid.contiguous() if grid is not None else cu_seqlens_q
    return grid_t, coords, axis, freq


def _constexprs(q, window, rope_coords, cfg: _Config, off64: bool) -> dict:
    block_d, block_dh = _dims(q.shape[-1])
    return dict(HEAD_DIM=q.shape[-1], BLOCK_D=block_d, BLOCK_DH=block_dh, BLOCK_M=cfg.block_m, BLOCK_N=cfg.block_n,
                WINDOW=window is not None, ROPE=rope_coords is not None,
                UPCAST=_interpreting() and q.dtype == torch.bfloat16, PRECISION=dot_precision(q.dtype), OFF64=off64,
                SKIP_FAR=cfg.skip_far,
                num_warps=cfg.num_warps, num_stages=cfg.num_stages)


def _window_args(window, grid: Optional[list]) -> tuple[int, int, int]:
    """(wt, wh, ww) clamped to the largest grid extent - 1 on each axis: no two tokens of a video are
    farther apart, so the result is the same, and the kernels' window arithmetic stays in int32.
    ``grid``: the grid's values on the host (:class:`~sora_fast.ops.attention.PackOnHost`)."""
    if window is None:
        return (0, 0, 0)
    extents = [max(axis) for axis in zip(*grid)] if grid else [0, 0, 0]
    return tuple(min(int(w), max(int(e) - 1, 0)) for w, e in zip(window, extents))


def _host(host, cu_seqlens_q, cu_seqlens_k, grid):
    """The pack's values on the host: the op passes what its checks read (one transfer for the call)."""
    if host is not None:
        return host
    from ..ops.attention import read_pack

    return read_pack(cu_seqlens_q, cu_seqlens_k, grid)


def _seqlens(cu: list) -> list:
    return [b - a for a, b in zip(cu, cu[1:])]


# --- launchers (the triton backend of sora_fast.ops.spacetime_attention) -----------------------
def attention_forward(q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, *, scale, window, grid,
                      rope_coords, rope_theta, host=None):
    """Returns ``(out (Nq, H, D) in q's dtype, lse (H, Nq) fp32)``. ``host``: the values of cu_seqlens
    and grid already on the host (read here when None)."""
    _check_supported(q, v)
    _check_rows(q, k, rope_coords)
    if _fp32_reference(("fwd",), q, window, rope_coords):
        from ..ops.attention import _forward_ref

        return _forward_ref(q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, scale=scale,
                            window=window, grid=grid, rope_coords=rope_coords, rope_theta=rope_theta)
    q, k, v = (_contig_last(t) for t in (q, k, v))
    cu_seqlens_q, cu_seqlens_k = cu_seqlens_q.contiguous(), cu_seqlens_k.contiguous()
    n_q, heads, head_dim = q.shape
    out = _empty(q.shape, q.dtype, q.device)
    lse = _empty((heads, n_q), torch.float32, q.device)
    cfg = _config("fwd", window, rope_coords, q.dtype, head_dim)
    host = _host(host, cu_seqlens_q, cu_seqlens_k, grid)
    table = block_table(_seqlens(host.cu_q), cfg.block_m, q.device)
    if table.shape[0] == 0 or heads == 0:
        return out, lse
    grid_t, coords, axis, freq = _common_args(q, cu_seqlens_q, grid, rope_coords, rope_theta)
    off64 = _needs_off64((q, k, v, out), n_q, heads)
    _attn_fwd_kernel[(table.shape[0], heads)](
        q, k, v, out, lse, cu_seqlens_q, cu_seqlens_k, table, grid_t, coords, axis, freq,
        q.stride(0), q.stride(1), k.stride(0), k.stride(1), v.stride(0), v.stride(1), out.stride(0), out.stride(1),
        n_q, scale * LOG2E, *_window_args(window, host.grid), **_constexprs(q, window, rope_coords, cfg, off64))
    return out, lse


def attention_backward(dout, dlse, q, k, v, out, lse, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, *,
                       scale, window, grid, rope_coords, rope_theta, host=None):
    """Returns ``(dq, dk, dv)`` like q, k, v. ``dlse`` (gradient of the LSE output) may be None.
    ``host`` as for :func:`attention_forward`."""
    _check_supported(q, v)
    _check_rows(q, k, rope_coords)
    from ..ops.attention import attention_backward_streamed, softmax_delta

    if _fp32_reference(("dkdv", "dq"), q, window, rope_coords):
        return attention_backward_streamed(dout, dlse, q, k, v, out, lse, cu_seqlens_q, cu_seqlens_k, scale=scale,
                                           window=window, grid=grid, rope_coords=rope_coords, rope_theta=rope_theta,
                                           host=host)
    q, k, v, dout = (_contig_last(t) for t in (q, k, v, dout))
    cu_seqlens_q, cu_seqlens_k = cu_seqlens_q.contiguous(), cu_seqlens_k.contiguous()
    n_q, heads, head_dim = q.shape
    delta = softmax_delta(dout, out, dlse, torch.float32).contiguous()   # (H, Nq)
    lse = lse.contiguous()
    dq, dk, dv = (_empty(t.shape, t.dtype, t.device) for t in (q, k, v))
    if heads == 0:
        return dq, dk, dv
    grid_t, coords, axis, freq = _common_args(q, cu_seqlens_q, grid, rope_coords, rope_theta)
    off64 = _needs_off64((q, k, v, dout, dq, dk, dv), n_q, heads)
    common = (lse, delta, cu_seqlens_q, cu_seqlens_k)
    strides = (q.stride(0), q.stride(1), k.stride(0), k.stride(1), v.stride(0), v.stride(1),
               dout.stride(0), dout.stride(1))
    host = _host(host, cu_seqlens_q, cu_seqlens_k, grid)
    scalars = (n_q, scale, scale * LOG2E, *_window_args(window, host.grid))

    cfg = _config("dkdv", window, rope_coords, q.dtype, head_dim)
    table = block_table(_seqlens(host.cu_k), cfg.block_n, q.device)
    if table.shape[0]:
        _attn_bwd_dkdv_kernel[(table.shape[0], heads)](
            q, k, v, dout, dk, dv, *common, table, grid_t, coords, axis, freq, *strides,
            dk.stride(0), dk.stride(1), dv.stride(0), dv.stride(1), *scalars,
            **_constexprs(q, window, rope_coords, cfg, off64))
    cfg = _config("dq", window, rope_coords, q.dtype, head_dim)
    table = block_table(_seqlens(host.cu_q), cfg.block_m, q.device)
    if table.shape[0]:
        _attn_bwd_dq_kernel[(table.shape[0], heads)](
            q, k, v, dout, dq, *common, table, grid_t, coords, axis, freq, *strides,
            dq.stride(0), dq.stride(1), *scalars, **_constexprs(q, window, rope_coords, cfg, off64))
    return dq, dk, dv


# --- what the offline kernel report compiles ----------------------------------------------------
_KERNELS = {"fwd": _attn_fwd_kernel, "dkdv": _attn_bwd_dkdv_kernel, "dq": _attn_bwd_dq_kernel}
_PTR_ARGS = {
    "fwd": ("Q", "K", "V", "O", "LSE", "CU_Q", "CU_K", "TABLE", "GRID", "COORDS", "AXIS", "FREQ"),
    "dkdv": ("Q", "K", "V", "DO", "DK", "DV", "LSE", "DELTA", "CU_Q", "CU_K", "TABLE", "GRID", "COORDS", "AXIS",
             "FREQ"),
    "dq": ("Q", "K", "V", "DO", "DQ", "LSE", "DELTA", "CU_Q", "CU_K", "TABLE", "GRID", "COORDS", "AXIS", "FREQ"),
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
        elif name.startswith("stride") or name in ("n_q", "win_t", "win_h", "win_w"):
            sig[name] = "i32"
        elif name in ("qk_scale", "sm_scale"):
            sig[name] = "fp32"
        else:
            sig[name] = "constexpr"
    constexprs = dict(HEAD_DIM=head_dim, BLOCK_D=block_d, BLOCK_DH=block_dh, BLOCK_M=cfg.block_m,
                      BLOCK_N=cfg.block_n, WINDOW=window, ROPE=rope, UPCAST=False, PRECISION=precision,
                      OFF64=off64, SKIP_FAR=cfg.skip_far)
    aligned = tuple(n for n in sig if sig[n].startswith("*") or n.startswith("stride"))
    variant = "+".join(n for n, on in (("window", window), ("rope", rope)) if on) or "dense"
    tag = f" {precision}" if dtype == "fp32" else ""
    return KernelConfig(
        name=f"attention_{kernel} d{head_dim} {dtype}{tag} {variant}{' off64' if off64 else ''} "
             f"m{cfg.block_m} n{cfg.block_n}{'' if cfg.skip_far or not window else ' no-skip'}",
        fn=fn, signature=sig, constexprs=constexprs, num_warps=cfg.num_warps, num_stages=cfg.num_stages,
        divisible_by_16=aligned, tensor_core=precision != "ieee")


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
