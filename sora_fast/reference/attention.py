"""The meaning of packed varlen spacetime attention, in plain torch: q ``(Nq, H, D)``, k/v ``(Nk, H, D)``;
sequence ``i`` is rows ``cu_seqlens[i]:cu_seqlens[i+1]``; no token attends across sequences. Optional 3D
local window over each video's (t, h, w) patch grid (:func:`window_mask`), optional 3D RoPE on q and k,
LSE output. A query sequence whose key sequence is empty gets zeros and LSE = -inf.

Beside the reference: the eager path (:func:`_attention_padded`, one fused SDPA call over the padded
pack, picked by :func:`_padding_pays`), the reference backward (a VJP through the reference) and the
streamed backward (FlashAttention-2's recomputation in torch math, bounded memory) that the triton
launcher runs where no fp32 kernel tile ships.
"""
from __future__ import annotations

from typing import Optional, Sequence

import torch

from ._common import math_dtype, reference_vjp
from ._host import PackOnHost, read_pack
from .rope import _rope_backward_ref, apply_rope3d_ref

__all__ = ["grid_coords", "window_mask", "spacetime_attention_ref", "attention_backward_streamed", "softmax_delta",
           "PackOnHost", "read_pack"]


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


def _math_inputs(q, k, v, rope_coords, rope_theta):
    """The math dtype and q, k, v in it, q and k rotated by 3D RoPE when ``rope_coords`` is given."""
    md = math_dtype(q.dtype)
    qf, kf, vf = q.to(md), k.to(md), v.to(md)
    if rope_coords is not None:
        qf = apply_rope3d_ref(qf, rope_coords, theta=rope_theta)
        kf = apply_rope3d_ref(kf, rope_coords, theta=rope_theta)
    return md, qf, kf, vf


def spacetime_attention_ref(q, k, v, cu_seqlens_q, cu_seqlens_k=None, *, scale=None, window=None, grid=None,
                            rope_coords=None, rope_theta=10000.0, return_lse=False):
    """Per-sequence softmax attention in fp32 (fp64 for fp64 inputs). Returns out in q's dtype and,
    with ``return_lse``, the natural-log LSE ``(H, Nq)`` in fp32 (fp64 for fp64 inputs)."""
    md, qf, kf, vf = _math_inputs(q, k, v, rope_coords, rope_theta)
    scale = q.shape[-1] ** -0.5 if scale is None else scale
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
    md, qf, kf, vf = _math_inputs(q, k, v, rope_coords, rope_theta)
    scale = q.shape[-1] ** -0.5 if scale is None else scale
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


# Pad when the padded batch's extra score elements cost less than the per-sequence loop's overhead:
# padded <= 2 * real + 20k per sequence (score elements over all heads), never past a memory cap (the
# loop's peak is one sequence's scores, the padded call's all of them). Measurements: docs/triton_kernels.md.
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
    md, qf, kf, vf = _math_inputs(q, k, v, rope_coords, rope_theta)
    dof = dout.to(md)
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
