"""Packed varlen spacetime attention: many videos of different sizes in one token stream.

q ``(Nq, H, D)``, k/v ``(Nk, H, D)``; sequence ``i`` is rows ``cu_seqlens[i]:cu_seqlens[i+1]``. No token
attends across sequences. Optional 3D local window over each video's (t, h, w) patch grid, optional 3D
RoPE on q and k (fused into the kernels' loads), LSE output. Zero-length sequences are legal; a query
sequence whose key sequence is empty (cross-attention to an empty caption) gets zeros and LSE = -inf.
"""
from __future__ import annotations

from typing import NamedTuple, Optional, Sequence

import torch

from . import _dispatch
from ._common import (check_cu_seqlens_values, check_float, check_int_tuple, check_positive, check_same_dtype,
                      check_shape, check_tensor, math_dtype, reference_vjp)
from .rope import _rope_backward_ref, apply_rope3d_ref, validate_rope_args

OP = "spacetime_attention"

__all__ = ["grid_coords", "window_mask", "spacetime_attention_ref", "spacetime_attention", "SpacetimeAttention"]


def grid_coords(grid_thw: Sequence[int], device=None) -> torch.Tensor:
    """(t, h, w) of every token of one video in packing order (t-major raster): ``(T*H*W, 3)`` int64."""
    t, h, w = (int(g) for g in grid_thw)
    axes = [torch.arange(n, device=device) for n in (t, h, w)]
    return torch.stack(torch.meshgrid(*axes, indexing="ij"), dim=-1).reshape(-1, 3)


def window_mask(grid_thw: Sequence[int], window: Sequence[int], device=None, rows: Optional[slice] = None
                ) -> torch.Tensor:
    """``(L, L)`` bool: query token i may attend key token j (|dt| <= wt, |dh| <= wh, |dw| <= ww).
    ``rows``: only those query rows (a slice of the L tokens)."""
    c = grid_coords(grid_thw, device)
    dist = (c[:, None, :] if rows is None else c[rows, None, :]) - c[None, :, :]
    dist = dist.abs()
    return (dist <= torch.tensor(window, device=device)).all(dim=-1)


# --- reference ---------------------------------------------------------------------------------
def spacetime_attention_ref(q, k, v, cu_seqlens_q, cu_seqlens_k=None, *, scale=None, window=None, grid=None,
                            rope_coords=None, rope_theta=10000.0, return_lse=False):
    """Per-sequence softmax attention in fp32 (fp64 for fp64 inputs). Returns out in q's dtype and,
    with ``return_lse``, the natural-log LSE ``(H, Nq)`` in fp32 (fp64 for fp64 inputs)."""
    md = math_dtype(q.dtype)
    scale = q.shape[-1] ** -0.5 if scale is None else scale
    qf, kf, vf = q.to(md), k.to(md), v.to(md)
    if rope_coords is not None:
        qf = apply_rope3d_ref(qf, rope_coords, theta=rope_theta)
        kf = apply_rope3d_ref(kf, rope_coords, theta=rope_theta)
    cu_k = cu_seqlens_q if cu_seqlens_k is None else cu_seqlens_k
    bq, bk = cu_seqlens_q.tolist(), cu_k.tolist()
    heads, dv = q.shape[1], v.shape[2]
    outs = [qf.new_zeros(0, heads, dv)]
    lses = [qf.new_zeros(heads, 0)]
    for i in range(len(bq) - 1):
        lq, lk = bq[i + 1] - bq[i], bk[i + 1] - bk[i]
        if lq == 0:
            continue
        if lk == 0:
            outs.append(qf.new_zeros(lq, heads, dv))
            lses.append(qf.new_full((heads, lq), float("-inf")))
            continue
        qi = qf[bq[i]:bq[i + 1]].transpose(0, 1)                     # (H, Lq, D)
        ki = kf[bk[i]:bk[i + 1]].transpose(0, 1)                     # (H, Lk, D)
        vi = vf[bk[i]:bk[i + 1]].transpose(0, 1)                     # (H, Lk, Dv)
        s = (qi @ ki.transpose(1, 2)) * scale                         # (H, Lq, Lk)
        if window is not None:
            s = s.masked_fill(~window_mask(grid[i].tolist(), window, q.device), float("-inf"))
        lse = torch.logsumexp(s, dim=-1)                              # (H, Lq)
        p = torch.exp(s - lse[..., None])
        outs.append((p @ vi).transpose(0, 1))                         # (Lq, H, Dv)
        lses.append(lse)
    out = torch.cat(outs).to(q.dtype)
    if return_lse:
        return out, torch.cat(lses, dim=1)
    return out


def _attention_padded(q, k, v, cu_seqlens_q, cu_seqlens_k=None, *, scale=None, window=None, grid=None,
                      rope_coords=None, rope_theta=10000.0):
    """The eager CPU/GPU path when no LSE is asked for: the same math as :func:`spacetime_attention_ref`, but
    every sequence padded into one ``(B, H, L, D)`` batch and a single fused
    ``F.scaled_dot_product_attention`` call, with a mask that keeps each query inside its own sequence (and
    window). One call instead of a Python loop of small matmuls per sequence: several times fewer ops for
    a packed training batch of short videos.

    Padding never changes a real row: padded keys are masked out; a query whose key sequence is empty sees
    only the all-zero padding (values zero, so its output is zero, as in the reference); a padded query row
    sees every key, so its softmax stays finite, and it is dropped from the output (zero gradient).
    """
    md = math_dtype(q.dtype)
    scale = q.shape[-1] ** -0.5 if scale is None else scale
    qf, kf, vf = q.to(md), k.to(md), v.to(md)
    if rope_coords is not None:
        qf = apply_rope3d_ref(qf, rope_coords, theta=rope_theta)
        kf = apply_rope3d_ref(kf, rope_coords, theta=rope_theta)
    cu_k = cu_seqlens_q if cu_seqlens_k is None else cu_seqlens_k
    dev, heads, dv = q.device, q.shape[1], v.shape[2]
    cq, ck = cu_seqlens_q.long(), cu_k.long()
    lq, lk = cq.diff(), ck.diff()
    nseq, max_q, max_k = lq.numel(), int(lq.max()), int(lk.max())
    if q.shape[0] == 0:
        return qf.new_zeros(0, heads, dv).to(q.dtype)
    if max_k == 0:
        return qf.new_zeros(q.shape[0], heads, dv).to(q.dtype)
    seq_q = torch.repeat_interleave(torch.arange(nseq, device=dev), lq)          # (Nq,)
    pos_q = torch.arange(q.shape[0], device=dev) - cq[seq_q]
    seq_k = torch.repeat_interleave(torch.arange(nseq, device=dev), lk)          # (Nk,)
    pos_k = torch.arange(k.shape[0], device=dev) - ck[seq_k]

    def pad(x, seq, pos, length):
        out = x.new_zeros(nseq, length, *x.shape[1:])
        return out.index_put((seq, pos), x).transpose(1, 2)                      # (B, H, L, D)

    qp, kp, vp = pad(qf, seq_q, pos_q, max_q), pad(kf, seq_k, pos_k, max_k), pad(vf, seq_k, pos_k, max_k)
    key_ok = torch.arange(max_k, device=dev)[None, :] < lk[:, None]              # (B, Lk)
    key_ok = key_ok | (lk == 0)[:, None]                                         # empty key sequence: zeros
    allowed = key_ok[:, None, :].expand(nseq, max_q, max_k)
    if window is not None:
        coords = qf.new_zeros(nseq, max_q, 3, dtype=torch.long)
        coords[seq_q, pos_q] = torch.cat([grid_coords(g, dev) for g in grid.tolist()])
        dist = (coords[:, :, None, :] - coords[:, None, :, :]).abs()
        allowed = allowed & (dist <= torch.tensor(window, device=dev)).all(dim=-1)
    query_pad = torch.arange(max_q, device=dev)[None, :] >= lq[:, None]          # (B, Lq)
    allowed = allowed | query_pad[:, :, None]
    o = torch.nn.functional.scaled_dot_product_attention(qp, kp, vp, attn_mask=allowed[:, None], scale=scale)
    return o.transpose(1, 2)[seq_q, pos_q].to(q.dtype)                          # (Nq, H, Dv)


# Padding pays while the padded batch's extra score elements cost less than the per-sequence loop's
# overhead. Measured on a CPU (fwd + bwd, fp32, one thread, head dim 32): the fused padded call costs
# ~10 ns per score element, the loop ~2-3x that per real element plus ~0.25 ms per sequence (about 20k
# elements' worth). So pad when padded <= 2 * real + 20k per sequence (score elements over all heads),
# and never past a memory cap (the loop's peak is one sequence's scores, the padded call's all of them).
_PAD_REAL_FACTOR = 2
_PAD_ELEMS_PER_SEQ = 20_000
_PAD_MAX_ELEMS = 1 << 28


def _padding_pays(cu_seqlens_q, cu_seqlens_k, heads: int) -> bool:
    """Whether :func:`_attention_padded` is the faster eager path for this pack (see the constants)."""
    lq = cu_seqlens_q.diff().tolist()
    lk = (cu_seqlens_q if cu_seqlens_k is None else cu_seqlens_k).diff().tolist()
    padded = len(lq) * max(lq, default=0) * max(lk, default=0) * heads
    real = sum(a * b for a, b in zip(lq, lk)) * heads
    return padded <= _PAD_MAX_ELEMS and padded <= _PAD_REAL_FACTOR * real + _PAD_ELEMS_PER_SEQ * len(lq)


# --- validation ---------------------------------------------------------------------------------
# Window half-sizes are clamped to this: grid extents are int32, so no two tokens are farther apart on
# an axis, and the result is the same as for any larger window (an "unbounded" 10**9 or sys.maxsize).
_WINDOW_MAX = 2 ** 31 - 1


def _check_tensors(q, k, v, cu_seqlens_q, cu_seqlens_k, grid, rope_coords, rope_theta):
    """Shapes, dtypes and devices (no tensor values read): run by the public function and again by the
    registered ops, which torch.compile graphs and direct callers reach without the public function."""
    check_float("q", q, ndim=3, layout="(Nq, H, D)")
    check_float("k", k, ndim=3, layout="(Nk, H, D)", device=q.device)
    check_float("v", v, ndim=3, layout="(Nk, H, Dv)", device=q.device)
    check_same_dtype("k", k, "q", q)
    check_same_dtype("v", v, "q", q)
    if k.shape[1:] != q.shape[1:]:
        raise ValueError(f"k must have q's heads and head dim (_, {q.shape[1]}, {q.shape[2]}), got {tuple(k.shape)}")
    if v.shape[:2] != k.shape[:2]:
        raise ValueError(f"v must have k's rows and heads ({k.shape[0]}, {k.shape[1]}, _), got {tuple(v.shape)}")
    if q.shape[2] == 0:
        raise ValueError(f"q must have a head dim >= 1, got q.shape={tuple(q.shape)}")
    check_tensor("cu_seqlens_q", cu_seqlens_q, ndim=1, layout="(B+1,)", dtypes=(torch.int32,), device=q.device)
    if cu_seqlens_q.shape[0] < 2:
        raise ValueError(f"cu_seqlens_q must hold B+1 >= 2 offsets, got {cu_seqlens_q.shape[0]}")
    num_seqs = cu_seqlens_q.shape[0] - 1
    if cu_seqlens_k is not None:
        check_tensor("cu_seqlens_k", cu_seqlens_k, ndim=1, layout="(B+1,)", dtypes=(torch.int32,), device=q.device)
        if cu_seqlens_k.shape != cu_seqlens_q.shape:
            raise ValueError(f"cu_seqlens_k must have cu_seqlens_q's length {num_seqs + 1}, got {cu_seqlens_k.shape[0]}")
    if grid is not None:
        check_tensor("grid", grid, ndim=2, layout="(B, 3)", dtypes=(torch.int32,), device=q.device)
        if grid.shape != (num_seqs, 3):
            raise ValueError(f"grid must have shape ({num_seqs}, 3), one (T', H', W') per sequence, got {tuple(grid.shape)}")
    if rope_coords is not None:
        validate_rope_args(q, rope_coords, rope_theta, None, name="q", cname="rope_coords")


def _check_window(window, grid):
    """3 ints >= 0, with a grid; returned clamped to ``_WINDOW_MAX`` (the same attention)."""
    window = check_int_tuple("window", window, 3)
    if grid is None:
        raise ValueError("window needs grid: the (T', H', W') patch grid of each sequence, shape (B, 3)")
    return tuple(min(w, _WINDOW_MAX) for w in window)


def _validate(q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, scale, window, grid,
              rope_coords, rope_theta):
    _check_tensors(q, k, v, cu_seqlens_q, cu_seqlens_k, grid, None, rope_theta)
    if cu_seqlens_k is None and k.shape[0] != q.shape[0]:
        raise ValueError(f"self-attention (cu_seqlens_k=None) needs as many k rows as q rows ({q.shape[0]}), "
                         f"got {k.shape[0]}; pass cu_seqlens_k for cross-attention")
    for name, m in (("max_seqlen_q", max_seqlen_q), ("max_seqlen_k", max_seqlen_k)):
        if m is not None and (isinstance(m, bool) or not isinstance(m, int) or m < 0):
            raise ValueError(f"{name} must be None or an int >= 0, got {m!r}")
    if scale is not None:
        check_positive("scale", scale)
    if window is not None:
        check_int_tuple("window", window, 3)
        if cu_seqlens_k is not None:
            raise ValueError("window needs self-attention (cu_seqlens_k=None): keys must share the queries' grid")
        window = _check_window(window, grid)
    if rope_coords is not None:
        if cu_seqlens_k is not None:
            raise ValueError("rope_coords needs self-attention (cu_seqlens_k=None): keys must share the queries' coordinates")
        validate_rope_args(q, rope_coords, rope_theta, None, name="q", cname="rope_coords")
    return window


def _check_op_args(q, k, v, cu_seqlens_q, cu_seqlens_k, scale, window, grid, rope_coords, rope_theta, fake=False):
    """The registered op's own checks (its callers may bypass :func:`spacetime_attention`): everything the
    kernels rely on that does not read tensor values; windows and RoPE need self-attention (checked on
    the values by :func:`_check_values`). ``fake``: the fake (meta) implementation, where torch.compile
    may pass the scalars scale and window as symbols: only shapes, dtypes and devices are checked there
    (the real op checks the values when it runs)."""
    _check_tensors(q, k, v, cu_seqlens_q, cu_seqlens_k, grid, rope_coords, rope_theta)
    if not fake:
        check_positive("scale", scale)
    if window is not None:
        if fake:
            if len(window) != 3 or grid is None:
                raise ValueError(f"window needs 3 half-sizes and a grid, got window={window!r}, grid={grid!r}")
        else:
            _check_window(window, grid)
    if (window is not None or rope_coords is not None) and k.shape[0] != q.shape[0]:
        raise ValueError(f"window and rope_coords need self-attention: as many k rows as q rows ({q.shape[0]}), "
                         f"got {k.shape[0]}")


class PackOnHost(NamedTuple):
    """The pack's metadata read to the host: cu_seqlens_q, cu_seqlens_k and grid (None without one)
    as lists. The checks and the kernels' launch tables share it, so an op call waits for the device
    once (one transfer, see :func:`read_pack`) instead of once per ``.tolist()``."""
    cu_q: list
    cu_k: list
    grid: Optional[list]


def read_pack(cu_seqlens_q: torch.Tensor, cu_seqlens_k: torch.Tensor, grid: Optional[torch.Tensor]) -> PackOnHost:
    """The values of cu_seqlens_q, cu_seqlens_k and grid in one device-to-host transfer."""
    parts = [cu_seqlens_q.reshape(-1), cu_seqlens_k.reshape(-1)] + ([] if grid is None else [grid.reshape(-1)])
    flat = torch.cat([t.to(torch.int64) for t in parts]).tolist()
    nq, nk = cu_seqlens_q.numel(), cu_seqlens_k.numel()
    g = None if grid is None else [flat[i:i + 3] for i in range(nq + nk, len(flat), 3)]
    return PackOnHost(flat[:nq], flat[nq:nq + nk], g)


def _check_values(q, k, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, grid, self_attention=False
                  ) -> PackOnHost:
    """Data-dependent checks, run on real tensors inside the op (also under torch.compile); returns the
    values read (for the kernels' launch tables). ``self_attention``: keys must share the queries'
    sequences (windows and RoPE)."""
    host = read_pack(cu_seqlens_q, cu_seqlens_k, grid)
    bq = check_cu_seqlens_values("cu_seqlens_q", host.cu_q, q.shape[0])
    bk = check_cu_seqlens_values("cu_seqlens_k", host.cu_k, k.shape[0])
    if self_attention and bk != bq:
        raise ValueError(f"window and rope_coords need self-attention: cu_seqlens_k must equal cu_seqlens_q "
                         f"{bq}, got {bk}")
    for name, m, b in (("max_seqlen_q", max_seqlen_q, bq), ("max_seqlen_k", max_seqlen_k, bk)):
        longest = max(b[i + 1] - b[i] for i in range(len(b) - 1))
        if m is not None and m < longest:
            raise ValueError(f"{name} must be >= the longest sequence ({longest}), got {m}")
    if grid is not None:
        g = host.grid
        for i, (t, h, w) in enumerate(g):
            if min(t, h, w) < 0 or t * h * w != bq[i + 1] - bq[i]:
                raise ValueError(f"grid[{i}]={g[i]} must be >= 0 and multiply to sequence {i}'s length "
                                 f"{bq[i + 1] - bq[i]}")
    return host


def _lse_dtype(q: torch.Tensor) -> torch.dtype:
    """The LSE output's dtype: fp32, fp64 for fp64 inputs (the reference's math dtype)."""
    return torch.float64 if q.dtype == torch.float64 else torch.float32


def _check_bwd_args(dout, dlse, q, k, v, out, lse, cu_seqlens_q, cu_seqlens_k, scale, window, grid, rope_coords,
                    rope_theta, fake=False):
    """The backward op's checks: the forward's, and the forward's outputs and their gradients."""
    _check_op_args(q, k, v, cu_seqlens_q, cu_seqlens_k, scale, window, grid, rope_coords, rope_theta, fake)
    lse_dtype = _lse_dtype(q)
    rows = (q.shape[0], q.shape[1], v.shape[2])
    for name, t, shape, dtype in (("out", out, rows, q.dtype), ("dout", dout, rows, q.dtype),
                                  ("lse", lse, rows[1::-1], lse_dtype), ("dlse", dlse, rows[1::-1], lse_dtype)):
        if t is None and name == "dlse":
            continue
        check_tensor(name, t, dtypes=(dtype,), device=q.device)
        check_shape(name, t, shape, "(the forward's output)")


# --- custom op ----------------------------------------------------------------------------------
@torch.library.custom_op("sora_fast::spacetime_attention", mutates_args=())
def _attention_op(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, cu_seqlens_q: torch.Tensor,
                  cu_seqlens_k: torch.Tensor, max_seqlen_q: Optional[int], max_seqlen_k: Optional[int],
                  scale: float, window: Optional[Sequence[int]], grid: Optional[torch.Tensor],
                  rope_coords: Optional[torch.Tensor], rope_theta: float, backend: str
                  ) -> tuple[torch.Tensor, torch.Tensor]:
    _check_op_args(q, k, v, cu_seqlens_q, cu_seqlens_k, scale, window, grid, rope_coords, rope_theta)
    host = _check_values(q, k, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, grid,
                         self_attention=window is not None or rope_coords is not None)
    kernel = _dispatch.get_kernel(OP, backend, q.device)
    return kernel(q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, scale=scale,
                  window=None if window is None else _check_window(window, grid), grid=grid,
                  rope_coords=rope_coords, rope_theta=rope_theta, host=host)


@_attention_op.register_fake
def _(q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, scale, window, grid, rope_coords,
      rope_theta, backend):
    _check_op_args(q, k, v, cu_seqlens_q, cu_seqlens_k, scale, window, grid, rope_coords, rope_theta, fake=True)
    return q.new_empty(q.shape[0], q.shape[1], v.shape[2]), q.new_empty(q.shape[1], q.shape[0], dtype=_lse_dtype(q))


@torch.library.custom_op("sora_fast::spacetime_attention_backward", mutates_args=())
def _attention_bwd_op(dout: torch.Tensor, dlse: Optional[torch.Tensor], q: torch.Tensor, k: torch.Tensor,
                      v: torch.Tensor, out: torch.Tensor, lse: torch.Tensor, cu_seqlens_q: torch.Tensor,
                      cu_seqlens_k: torch.Tensor, max_seqlen_q: Optional[int], max_seqlen_k: Optional[int],
                      scale: float, window: Optional[Sequence[int]], grid: Optional[torch.Tensor],
                      rope_coords: Optional[torch.Tensor], rope_theta: float, backend: str
                      ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    _check_bwd_args(dout, dlse, q, k, v, out, lse, cu_seqlens_q, cu_seqlens_k, scale, window, grid, rope_coords,
                    rope_theta)
    host = _check_values(q, k, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, grid,
                         self_attention=window is not None or rope_coords is not None)
    kernel = _dispatch.get_kernel(OP + "_backward", backend, q.device)
    return kernel(dout, dlse, q, k, v, out, lse, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k,
                  scale=scale, window=None if window is None else _check_window(window, grid), grid=grid,
                  rope_coords=rope_coords, rope_theta=rope_theta, host=host)


@_attention_bwd_op.register_fake
def _(dout, dlse, q, k, v, out, lse, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, scale, window, grid,
      rope_coords, rope_theta, backend):
    _check_bwd_args(dout, dlse, q, k, v, out, lse, cu_seqlens_q, cu_seqlens_k, scale, window, grid, rope_coords,
                    rope_theta, fake=True)
    return torch.empty_like(q), torch.empty_like(k), torch.empty_like(v)


def _setup(ctx, inputs, output):
    q, k, v, cu_q, cu_k, max_q, max_k, scale, window, grid, rope_coords, rope_theta, backend = inputs
    ctx.save_for_backward(q, k, v, output[0], output[1], cu_q, cu_k, grid, rope_coords)
    ctx.args = (max_q, max_k, scale, window)
    ctx.rope_args = (rope_theta, backend)


def _backward(ctx, dout, dlse):
    q, k, v, out, lse, cu_q, cu_k, grid, rope_coords = ctx.saved_tensors
    dq, dk, dv = _attention_bwd_op(dout, dlse, q, k, v, out, lse, cu_q, cu_k, *ctx.args, grid, rope_coords,
                                   *ctx.rope_args)
    return dq, dk, dv, None, None, None, None, None, None, None, None, None, None


_attention_op.register_autograd(_backward, setup_context=_setup)


def _forward_ref(q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, host=None, **kw):
    return spacetime_attention_ref(q, k, v, cu_seqlens_q, cu_seqlens_k, return_lse=True, **kw)


def _backward_ref(dout, dlse, q, k, v, out, lse, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, host=None,
                  **kw):
    g = reference_vjp(spacetime_attention_ref, {"q": q, "k": k, "v": v}, (dout, dlse), ["q", "k", "v"],
                      cu_seqlens_q=cu_seqlens_q, cu_seqlens_k=cu_seqlens_k, return_lse=True, **kw)
    return g["q"], g["k"], g["v"]


def attention_backward_streamed(dout, dlse, q, k, v, out, lse, cu_seqlens_q, cu_seqlens_k, *, scale, window=None,
                                grid=None, rope_coords=None, rope_theta=10000.0, host: Optional[PackOnHost] = None,
                                block_elems: int = 2 ** 26):
    """The attention backward in torch math (fp32; fp64 for fp64 inputs), FlashAttention-2's way: one
    sequence and one block of query rows at a time, recomputing ``P = exp(S - lse)`` from the forward's
    LSE, so memory is ``O(block_elems)`` (about 4 score-sized blocks of ``block_elems`` elements), not
    O(H * Lq * Lk) as in a vector-Jacobian product through the reference. Same arguments and results as
    the op's backward (``dlse`` may be None); the triton backend runs it where no spill-free fp32 kernel
    tile ships. Returns ``(dq, dk, dv)`` in the inputs' dtypes."""
    md = math_dtype(q.dtype)
    qf, kf, vf, dof = (t.to(md) for t in (q, k, v, dout))
    if rope_coords is not None:
        qf = apply_rope3d_ref(qf, rope_coords, theta=rope_theta)
        kf = apply_rope3d_ref(kf, rope_coords, theta=rope_theta)
    delta = softmax_delta(dof, out, dlse, md)
    lse = lse.to(md)
    host = host or read_pack(cu_seqlens_q, cu_seqlens_k, grid)
    heads = q.shape[1]
    dq, dk, dv = torch.zeros_like(qf), torch.zeros_like(kf), torch.zeros_like(vf)
    for i in range(len(host.cu_q) - 1):
        q0, q1, k0, k1 = host.cu_q[i], host.cu_q[i + 1], host.cu_k[i], host.cu_k[i + 1]
        if q1 == q0 or k1 == k0:        # no queries, or no keys (zero output, -inf LSE): no gradient
            continue
        ki, vi = kf[k0:k1].transpose(0, 1), vf[k0:k1].transpose(0, 1)  # (H, Lk, D), (H, Lk, Dv)
        dki, dvi = torch.zeros_like(ki), torch.zeros_like(vi)
        rows = max(1, block_elems // (heads * (k1 - k0)))
        for r0 in range(q0, q1, rows):
            r1 = min(r0 + rows, q1)
            qc, doc = qf[r0:r1].transpose(0, 1), dof[r0:r1].transpose(0, 1)
            s = (qc @ ki.transpose(1, 2)) * scale                       # (H, rows, Lk)
            if window is not None:
                near = window_mask(host.grid[i], window, q.device, rows=slice(r0 - q0, r1 - q0))
                s = s.masked_fill(~near, float("-inf"))
            p = torch.exp(s - lse[:, r0:r1, None])
            del s
            dvi += p.transpose(1, 2) @ doc
            ds = p * ((doc @ vi.transpose(1, 2)) - delta[:, r0:r1, None])
            del p
            dq[r0:r1] = ((ds @ ki) * scale).transpose(0, 1)
            dki += (ds.transpose(1, 2) @ qc) * scale
        dk[k0:k1], dv[k0:k1] = dki.transpose(0, 1), dvi.transpose(0, 1)
    if rope_coords is not None:     # back through the rotation to the unrotated q and k
        dq, dk = (_rope_backward_ref(g, g, rope_coords, theta=rope_theta, split=None) for g in (dq, dk))
    return dq.to(q.dtype), dk.to(k.dtype), dv.to(v.dtype)


def softmax_delta(dout: torch.Tensor, out: torch.Tensor, dlse: Optional[torch.Tensor], dtype: torch.dtype
                  ) -> torch.Tensor:
    """``(H, Nq)`` ``rowsum(dO * O) - dlse`` in ``dtype``: with it ``dS = P * (dP - delta)``, as
    d lse / d s = p (the FlashAttention-2 backward's row term)."""
    delta = (dout.to(dtype) * out.to(dtype)).sum(-1).transpose(0, 1)
    return delta if dlse is None else delta - dlse.to(dtype)


_dispatch.register_kernel(OP, "torch", _forward_ref)
_dispatch.register_kernel(OP + "_backward", "torch", _backward_ref)
_dispatch.register_kernel(OP, "triton", "sora_fast.triton.attention:attention_forward")
_dispatch.register_kernel(OP + "_backward", "triton", "sora_fast.triton.attention:attention_backward")


# --- public API ---------------------------------------------------------------------------------
def spacetime_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, cu_seqlens_q: torch.Tensor,
                        cu_seqlens_k: Optional[torch.Tensor] = None, max_seqlen_q: Optional[int] = None,
                        max_seqlen_k: Optional[int] = None, *, scale: Optional[float] = None,
                        window: Optional[Sequence[int]] = None, grid: Optional[torch.Tensor] = None,
                        rope_coords: Optional[torch.Tensor] = None, rope_theta: float = 10000.0,
                        return_lse: bool = False, backend: Optional[str] = None):
    """Attention over packed sequences, each attending only to itself.

    Args:
        q: ``(Nq, H, D)`` fp16/bf16/fp32, D >= 1. k, v: ``(Nk, H, D)`` / ``(Nk, H, Dv)``, q's dtype and device.
        cu_seqlens_q: ``(B+1,)`` int32 offsets of the query sequences.
        cu_seqlens_k: ``(B+1,)`` int32 offsets of the key sequences (cross-attention, e.g. video
            queries against packed text); None for self-attention.
        max_seqlen_q, max_seqlen_k: longest sequence, an upper bound is fine (kernel grids); None
            computes it.
        scale: softmax scale, default ``D ** -0.5``.
        window: ``(wt, wh, ww)``: a query attends only to keys of its own video with |dt| <= wt,
            |dh| <= wh, |dw| <= ww, coordinates taken from the packing order (t-major raster of
            ``grid``). Self-attention only; needs ``grid``. Any half-size past the grid (e.g. 10**9
            for "unbounded in t") is the same as the grid's extent.
        grid: ``(B, 3)`` int32 patch grid (T', H', W') of each sequence.
        rope_coords: ``(Nq, 3)`` int32 (t, h, w) per token: 3D RoPE applied to q and k first, exactly
            :func:`sora_fast.ops.apply_rope3d` with the default split. Self-attention only.
        return_lse: also return the LSE ``(H, Nq)`` fp32, natural log (-inf for rows with no keys).

    Returns ``out`` ``(Nq, H, Dv)`` in q's dtype, or ``(out, lse)``. Differentiable in q, k, v.
    """
    window = _validate(q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, scale, window, grid,
                       rope_coords, rope_theta)
    if not isinstance(return_lse, bool):
        raise TypeError(f"return_lse must be a bool, got {type(return_lse).__name__}")
    backend = _dispatch.resolve_backend(OP, backend, q.device)
    if _dispatch.eager_reference(backend):
        _check_values(q, k, cu_seqlens_q, cu_seqlens_q if cu_seqlens_k is None else cu_seqlens_k, max_seqlen_q,
                      max_seqlen_q if cu_seqlens_k is None else max_seqlen_k, grid)
        padded = not return_lse and _padding_pays(cu_seqlens_q, cu_seqlens_k, q.shape[1])
        eager = _attention_padded if padded else spacetime_attention_ref
        kw = {"return_lse": True} if return_lse else {}
        return eager(q, k, v, cu_seqlens_q, cu_seqlens_k, scale=scale, window=window, grid=grid,
                     rope_coords=rope_coords, rope_theta=float(rope_theta), **kw)
    out, lse = _attention_op(q, k, v, cu_seqlens_q, cu_seqlens_q if cu_seqlens_k is None else cu_seqlens_k,
                             max_seqlen_q, max_seqlen_q if cu_seqlens_k is None else max_seqlen_k,
                             float(q.shape[-1] ** -0.5 if scale is None else scale),
                             None if window is None else list(window), grid, rope_coords, float(rope_theta),
                             backend)
    return (out, lse) if return_lse else out


class SpacetimeAttention(torch.nn.Module):
    """Module form of :func:`spacetime_attention` (no weights: fixed window, RoPE theta and backend).

    ``forward(q, k, v, cu_seqlens_q, cu_seqlens_k=None, max_seqlen_q=None, max_seqlen_k=None, *,
    grid=None, rope_coords=None)``."""

    def __init__(self, window: Optional[Sequence[int]] = None, rope_theta: float = 10000.0,
                 scale: Optional[float] = None, backend: Optional[str] = None):
        super().__init__()
        self.window, self.rope_theta, self.scale, self.backend = window, rope_theta, scale, backend

    def forward(self, q, k, v, cu_seqlens_q, cu_seqlens_k=None, max_seqlen_q=None, max_seqlen_k=None, *,
                grid=None, rope_coords=None):
        return spacetime_attention(q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k,
                                   scale=self.scale, window=self.window, grid=grid, rope_coords=rope_coords,
                                   rope_theta=self.rope_theta, backend=self.backend)

    def extra_repr(self) -> str:
        return f"window={self.window}, rope_theta={self.rope_theta}, scale={self.scale}"
