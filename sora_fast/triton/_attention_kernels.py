"""Device code of the packed varlen spacetime attention (launched by :mod:`sora_fast.triton.attention`).

One program per (query block, head) from the pack's real block table (``_blocks.block_table``).
Online softmax in base 2 with fp32 statistics; LSE out. Backward in the FlashAttention-2 style:
``delta = rowsum(dO * O)``, then one kernel for dK/dV (a program per key block, looping over query
blocks) and one for dQ (a program per query block, looping over key blocks) — every gradient row is
written by exactly one program, so the result is deterministic without atomics.

Windows (``window=(wt, wh, ww)`` on the t-major grid): the key loop starts and ends at the frames the
window can reach, and a key block whose coordinate box is farther than the window from the query
block's box is skipped before any load (``SKIP_FAR``; see ``_blocks``); partial blocks are masked per
element.

Fused RoPE: q and k tiles are loaded whole (16-byte loads), split into their rotary pairs, rotated in
registers and re-joined, so the dots are the plain ones; dQ and dK are rotated back the same way before
the store. No rotated copy of q or k is ever written to memory. cos/sin come from a polynomial
(``_sincos``) rather than libdevice, whose slow path would put a local-memory array in every kernel.

The dK/dV kernel works on transposed scores (keys x queries) so no computed tile is transposed before a
dot. ``UPCAST`` (interpreter only) converts bf16 tiles to fp32 right after loading: the interpreter's
bf16 arithmetic is wrong. Offsets: the per-sequence bases are 64-bit, offsets inside a sequence 32-bit
unless ``OFF64``, which makes the strides, and so every offset, 64-bit.
"""
from __future__ import annotations

import triton
import triton.language as tl

from ._common import to_store, wide


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
def _attn_fwd_kernel(Q, K, V, O, LSE, CU_Q, CU_K, TABLE, GRID, COORDS, AXIS, FREQ,  # noqa: E741 (O: the output, as in the papers)
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
