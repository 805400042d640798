"""Device code of the packed varlen spacetime attention (launched by :mod:`sora_fast.triton.attention`).

One program per (query block, head) from the pack's real block table (``_blocks.block_table``).
Online softmax in base 2 with fp32 statistics; LSE out. Backward in the FlashAttention-2 style:
``delta = rowsum(dO * O)``, then one kernel for dK/dV (a program per key block, looping over query
blocks) and one for dQ (a program per query block, looping over key blocks) — every gradient row is
written by exactly one program, so the result is deterministic without atomics.

Windows (``window=(wt, wh, ww)`` on the tokens' ``(t, h, w)`` coordinates, any token order): each program
walks its block list (``_blocks.window_block_lists``, built once per pack on the device): first the full
blocks, every pair inside the window, with no mask at all; then the partial blocks, masked per element
from the coordinates. A block outside the window is not in the list, so it is never loaded, and neither
loop carries a branch: the compiler pipelines their loads (cp.async on sm_90, gated by the offline report).

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
def _load_coords(WCOORDS, rows, row_mask):
    """(t, h, w) of these rows of a sequence (WCOORDS points at the sequence's first token)."""
    t = tl.load(WCOORDS + rows * 3, mask=row_mask, other=0)
    h = tl.load(WCOORDS + rows * 3 + 1, mask=row_mask, other=0)
    w = tl.load(WCOORDS + rows * 3 + 2, mask=row_mask, other=0)
    return t, h, w


@triton.jit
def _window_mask(at, ah, aw, bt, bh, bw, win_t, win_h, win_w):
    """(rows_a, rows_b) bool: the pair is inside the window on every axis."""
    return ((tl.abs(at[:, None] - bt[None, :]) <= win_t) & (tl.abs(ah[:, None] - bh[None, :]) <= win_h)
            & (tl.abs(aw[:, None] - bw[None, :]) <= win_w))


@triton.jit
def _list_bounds(NFULL, NVISIT, LISTS, list_stride, pid):
    """This program's block list: (pointer to its row of block numbers, full count, full + partial count)."""
    n_full = tl.load(NFULL + pid)
    n_visit = tl.load(NVISIT + pid)
    return LISTS + pid.to(tl.int64) * list_stride, n_full, n_visit


@triton.jit
def _program_block(TABLE, CU_Q, CU_K, OFF64: tl.constexpr):
    """This program's head, (sequence, first row of its block) and the sequence's query and key ranges. With
    OFF64 the head and the sequence starts are 64-bit (offsets into the LSE and RoPE tables); row indices
    stay 32-bit."""
    pid = tl.program_id(0)
    head = tl.program_id(1)
    seq = tl.load(TABLE + 2 * pid)
    start = tl.load(TABLE + 2 * pid + 1)
    q_start = tl.load(CU_Q + seq)
    q_len = tl.load(CU_Q + seq + 1) - q_start
    k_start = tl.load(CU_K + seq)
    k_len = tl.load(CU_K + seq + 1) - k_start
    if OFF64:
        head = head.to(tl.int64)
        q_start = q_start.to(tl.int64)
        k_start = k_start.to(tl.int64)
    return pid, head, start, q_start, q_len, k_start, k_len


# --- forward -------------------------------------------------------------------------------------
@triton.jit
def _fwd_step(q, m_i, l_i, acc, n0, k_len, k_base, v_base, stride_kn, stride_vn, offs_d, d_mask, k_coords, AXIS,
              FREQ, pairs, pair_mask, qk_scale, WQ, offs_m, m_mask, WK, win_t, win_h, win_w,
              BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr, ROPE: tl.constexpr, UPCAST: tl.constexpr,
              PRECISION: tl.constexpr, MASK: tl.constexpr, WINDOW_MASK: tl.constexpr):
    """One key block of the online softmax. MASK: keys past the sequence's end (and, with WINDOW_MASK, pairs
    outside the window) get -inf; without MASK the whole tile is attended (a full block). The query
    coordinates are loaded here, per masked block, rather than kept live through the loops (registers)."""
    offs_n = n0 + tl.arange(0, BLOCK_N)
    n_mask = offs_n < k_len
    k = _load_qk(k_base, offs_n, n_mask, stride_kn, offs_d, d_mask, k_coords, AXIS, FREQ, pairs, pair_mask,
                 BLOCK_N, BLOCK_D, ROPE, UPCAST)
    s = tl.dot(q, tl.trans(k), input_precision=PRECISION) * qk_scale
    if MASK:
        valid = n_mask[None, :]
        if WINDOW_MASK:
            qt, qh, qw = _load_coords(WQ, offs_m, m_mask)
            kt, kh, kw = _load_coords(WK, offs_n, n_mask)
            valid = valid & _window_mask(qt, qh, qw, kt, kh, kw, win_t, win_h, win_w)
        s = tl.where(valid, s, float("-inf"))
    m_new = tl.maximum(m_i, tl.max(s, 1))
    m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)
    alpha = tl.exp2(m_i - m_safe)
    p = tl.exp2(s - m_safe[:, None])
    l_i = l_i * alpha + tl.sum(p, 1)
    v = _load_tile(v_base, offs_n, n_mask, stride_vn, offs_d, d_mask, UPCAST)
    acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v, input_precision=PRECISION)
    return m_new, l_i, acc


@triton.jit
def _attn_fwd_kernel(Q, K, V, O, LSE, CU_Q, CU_K, TABLE, COORDS, AXIS, FREQ,  # noqa: E741 (O: the output, as in the papers)
                     WCOORDS, LISTS, NFULL, NVISIT, list_stride,
                     stride_qn, stride_qh, stride_kn, stride_kh, stride_vn, stride_vh, stride_on, stride_oh,
                     n_q, qk_scale, win_t, win_h, win_w,
                     HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_DH: tl.constexpr,
                     BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, WINDOW: tl.constexpr, ROPE: tl.constexpr,
                     UPCAST: tl.constexpr, PRECISION: tl.constexpr, OFF64: tl.constexpr):
    pid, head, m0, q_start, q_len, k_start, k_len = _program_block(TABLE, CU_Q, CU_K, OFF64)
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

    m_i = tl.full([BLOCK_M], float("-inf"), tl.float32)
    l_i = tl.zeros([BLOCK_M], tl.float32)
    acc = tl.zeros([BLOCK_M, BLOCK_D], tl.float32)
    if WINDOW:
        # the program's block list: full key blocks without a mask, then the partial ones masked
        row, n_full, n_visit = _list_bounds(NFULL, NVISIT, LISTS, list_stride, pid)
        wq = WCOORDS + q_start * 3
        wk = WCOORDS + k_start * 3
        for j in range(0, n_full):
            n0 = tl.load(row + j) * BLOCK_N
            m_i, l_i, acc = _fwd_step(q, m_i, l_i, acc, n0, k_len, k_base, v_base, stride_kn, stride_vn, offs_d,
                                      d_mask, k_coords, AXIS, FREQ, pairs, pair_mask, qk_scale, wq, offs_m, m_mask, wk,
                                      win_t, win_h, win_w, BLOCK_N, BLOCK_D, ROPE, UPCAST, PRECISION, False, False)
        for j in range(n_full, n_visit):
            n0 = tl.load(row + j) * BLOCK_N
            m_i, l_i, acc = _fwd_step(q, m_i, l_i, acc, n0, k_len, k_base, v_base, stride_kn, stride_vn, offs_d,
                                      d_mask, k_coords, AXIS, FREQ, pairs, pair_mask, qk_scale, wq, offs_m, m_mask, wk,
                                      win_t, win_h, win_w, BLOCK_N, BLOCK_D, ROPE, UPCAST, PRECISION, True, True)
    else:
        for n0 in range(0, k_len, BLOCK_N):
            m_i, l_i, acc = _fwd_step(q, m_i, l_i, acc, n0, k_len, k_base, v_base, stride_kn, stride_vn, offs_d,
                                      d_mask, k_coords, AXIS, FREQ, pairs, pair_mask, qk_scale, WCOORDS, offs_m,
                                      m_mask, WCOORDS, win_t, win_h, win_w, BLOCK_N, BLOCK_D, ROPE, UPCAST, PRECISION,
                                      True, False)

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
def _dkdv_step(k, v, dk, dv, m0, q_len, q_base, do_base, lse_base, delta_base, stride_qn, stride_don, offs_d, d_mask,
               q_coords, AXIS, FREQ, pairs, pair_mask, qk_scale, WQ, kt, kh, kw, win_t, win_h, win_w,
               BLOCK_M: tl.constexpr, BLOCK_D: tl.constexpr, ROPE: tl.constexpr, UPCAST: tl.constexpr,
               PRECISION: tl.constexpr, MASK: tl.constexpr, WINDOW_MASK: tl.constexpr):
    """One query block's contribution to a key block's dK and dV (as :func:`_fwd_step`'s MASK)."""
    offs_m = m0 + tl.arange(0, BLOCK_M)
    m_mask = offs_m < q_len
    q = _load_qk(q_base, offs_m, m_mask, stride_qn, offs_d, d_mask, q_coords, AXIS, FREQ, pairs, pair_mask,
                 BLOCK_M, BLOCK_D, ROPE, UPCAST)
    # transposed scores (keys x queries), so every computed tile is used as the left operand
    # as it is: no register transposes feeding the tensor cores (as in Triton's FA2 tutorial)
    st = tl.dot(k, tl.trans(q), input_precision=PRECISION)
    lse2 = tl.load(lse_base + offs_m, mask=m_mask, other=0.0) * 1.4426950408889634
    pt = tl.exp2(st * qk_scale - lse2[None, :])
    if MASK:
        valid = m_mask[None, :]
        if WINDOW_MASK:
            qt, qh, qw = _load_coords(WQ, offs_m, m_mask)
            valid = valid & _window_mask(kt, kh, kw, qt, qh, qw, win_t, win_h, win_w)
        pt = tl.where(valid, pt, 0.0)
    do = _load_tile(do_base, offs_m, m_mask, stride_don, offs_d, d_mask, UPCAST)
    dv += tl.dot(pt.to(do.dtype), do, input_precision=PRECISION)
    delta = tl.load(delta_base + offs_m, mask=m_mask, other=0.0)
    dpt = tl.dot(v, tl.trans(do), input_precision=PRECISION)
    dst = pt * (dpt - delta[None, :])
    dk += tl.dot(dst.to(q.dtype), q, input_precision=PRECISION)
    return dk, dv


@triton.jit
def _attn_bwd_dkdv_kernel(Q, K, V, DO, DK, DV, LSE, DELTA, CU_Q, CU_K, TABLE, COORDS, AXIS, FREQ,
                          WCOORDS, LISTS, NFULL, NVISIT, list_stride,
                          stride_qn, stride_qh, stride_kn, stride_kh, stride_vn, stride_vh,
                          stride_don, stride_doh, stride_dkn, stride_dkh, stride_dvn, stride_dvh,
                          n_q, sm_scale, qk_scale, win_t, win_h, win_w,
                          HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_DH: tl.constexpr,
                          BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, WINDOW: tl.constexpr, ROPE: tl.constexpr,
                          UPCAST: tl.constexpr, PRECISION: tl.constexpr, OFF64: tl.constexpr):
    pid, head, n0, q_start, q_len, k_start, k_len = _program_block(TABLE, CU_Q, CU_K, OFF64)
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

    if WINDOW:
        row, n_full, n_visit = _list_bounds(NFULL, NVISIT, LISTS, list_stride, pid)
        wq = WCOORDS + q_start * 3
        kt, kh, kw = _load_coords(WCOORDS + k_start * 3, offs_n, n_mask)
        for j in range(0, n_full):
            m0 = tl.load(row + j) * BLOCK_M
            dk, dv = _dkdv_step(k, v, dk, dv, m0, q_len, q_base, do_base, lse_base, delta_base, stride_qn, stride_don,
                                offs_d, d_mask, q_coords, AXIS, FREQ, pairs, pair_mask, qk_scale, wq, kt, kh, kw,
                                win_t, win_h, win_w, BLOCK_M, BLOCK_D, ROPE, UPCAST, PRECISION, False, False)
        for j in range(n_full, n_visit):
            m0 = tl.load(row + j) * BLOCK_M
            dk, dv = _dkdv_step(k, v, dk, dv, m0, q_len, q_base, do_base, lse_base, delta_base, stride_qn, stride_don,
                                offs_d, d_mask, q_coords, AXIS, FREQ, pairs, pair_mask, qk_scale, wq, kt, kh, kw,
                                win_t, win_h, win_w, BLOCK_M, BLOCK_D, ROPE, UPCAST, PRECISION, True, True)
    else:
        for m0 in range(0, q_len, BLOCK_M):
            dk, dv = _dkdv_step(k, v, dk, dv, m0, q_len, q_base, do_base, lse_base, delta_base, stride_qn, stride_don,
                                offs_d, d_mask, q_coords, AXIS, FREQ, pairs, pair_mask, qk_scale, WCOORDS, offs_n,
                                offs_n, offs_n, win_t, win_h, win_w, BLOCK_M, BLOCK_D, ROPE, UPCAST, PRECISION, True,
                                False)

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
def _dq_step(q, do, lse2, delta, dq, n0, k_len, k_base, v_base, stride_kn, stride_vn, offs_d, d_mask, k_coords, AXIS,
             FREQ, pairs, pair_mask, qk_scale, WK, qt, qh, qw, win_t, win_h, win_w,
             BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr, ROPE: tl.constexpr, UPCAST: tl.constexpr,
             PRECISION: tl.constexpr, MASK: tl.constexpr, WINDOW_MASK: tl.constexpr):
    """One key block's contribution to a query block's dQ (as :func:`_fwd_step`'s MASK)."""
    offs_n = n0 + tl.arange(0, BLOCK_N)
    n_mask = offs_n < k_len
    k = _load_qk(k_base, offs_n, n_mask, stride_kn, offs_d, d_mask, k_coords, AXIS, FREQ, pairs, pair_mask,
                 BLOCK_N, BLOCK_D, ROPE, UPCAST)
    s = tl.dot(q, tl.trans(k), input_precision=PRECISION)
    p = tl.exp2(s * qk_scale - lse2[:, None])
    if MASK:
        valid = n_mask[None, :]
        if WINDOW_MASK:
            kt, kh, kw = _load_coords(WK, offs_n, n_mask)
            valid = valid & _window_mask(qt, qh, qw, kt, kh, kw, win_t, win_h, win_w)
        p = tl.where(valid, p, 0.0)
    v = _load_tile(v_base, offs_n, n_mask, stride_vn, offs_d, d_mask, UPCAST)
    dp = tl.dot(do, tl.trans(v), input_precision=PRECISION)
    ds = p * (dp - delta[:, None])
    dq += tl.dot(ds.to(k.dtype), k, input_precision=PRECISION)
    return dq


@triton.jit
def _attn_bwd_dq_kernel(Q, K, V, DO, DQ, LSE, DELTA, CU_Q, CU_K, TABLE, COORDS, AXIS, FREQ,
                        WCOORDS, LISTS, NFULL, NVISIT, list_stride,
                        stride_qn, stride_qh, stride_kn, stride_kh, stride_vn, stride_vh,
                        stride_don, stride_doh, stride_dqn, stride_dqh,
                        n_q, sm_scale, qk_scale, win_t, win_h, win_w,
                        HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_DH: tl.constexpr,
                        BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, WINDOW: tl.constexpr, ROPE: tl.constexpr,
                        UPCAST: tl.constexpr, PRECISION: tl.constexpr, OFF64: tl.constexpr):
    pid, head, m0, q_start, q_len, k_start, k_len = _program_block(TABLE, CU_Q, CU_K, OFF64)
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

    if WINDOW:
        row, n_full, n_visit = _list_bounds(NFULL, NVISIT, LISTS, list_stride, pid)
        wk = WCOORDS + k_start * 3
        qt, qh, qw = _load_coords(WCOORDS + q_start * 3, offs_m, m_mask)
        for j in range(0, n_full):
            n0 = tl.load(row + j) * BLOCK_N
            dq = _dq_step(q, do, lse2, delta, dq, n0, k_len, k_base, v_base, stride_kn, stride_vn, offs_d, d_mask,
                          k_coords, AXIS, FREQ, pairs, pair_mask, qk_scale, wk, qt, qh, qw, win_t, win_h, win_w,
                          BLOCK_N, BLOCK_D, ROPE, UPCAST, PRECISION, False, False)
        for j in range(n_full, n_visit):
            n0 = tl.load(row + j) * BLOCK_N
            dq = _dq_step(q, do, lse2, delta, dq, n0, k_len, k_base, v_base, stride_kn, stride_vn, offs_d, d_mask,
                          k_coords, AXIS, FREQ, pairs, pair_mask, qk_scale, wk, qt, qh, qw, win_t, win_h, win_w,
                          BLOCK_N, BLOCK_D, ROPE, UPCAST, PRECISION, True, True)
    else:
        for n0 in range(0, k_len, BLOCK_N):
            dq = _dq_step(q, do, lse2, delta, dq, n0, k_len, k_base, v_base, stride_kn, stride_vn, offs_d, d_mask,
                          k_coords, AXIS, FREQ, pairs, pair_mask, qk_scale, WCOORDS, offs_m, offs_m, offs_m, win_t,
                          win_h, win_w, BLOCK_N, BLOCK_D, ROPE, UPCAST, PRECISION, True, False)

    dq_base = DQ + q_start64 * stride_dqn + head * stride_dqh
    if ROPE:
        _unrotate_store(dq_base, offs_m, m_mask, stride_dqn, offs_d, d_mask, dq * sm_scale, q_coords, AXIS, FREQ, pairs,
                        pair_mask, BLOCK_M, BLOCK_D, UPCAST)
    else:
        dq_ptr = dq_base + offs_m[:, None] * stride_dqn + offs_d[None, :]
        tl.store(dq_ptr, to_store(dq * sm_scale, DQ.dtype.element_ty, UPCAST), mask=m_mask[:, None] & d_mask[None, :])
