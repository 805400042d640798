"""The meaning of packed varlen spacetime attention, in plain torch: q ``(Nq, H, D)``, k/v ``(Nk, H, D)``;
sequence ``i`` is rows ``cu_seqlens[i]:cu_seqlens[i+1]``; no token attends across sequences. Optional 3D
local window over each video's (t, h, w) patch grid (:func:`window_mask`; positions from ``coords`` in any
token order, or the t-major raster of ``grid``), optional 3D RoPE on q and k, LSE output. A query
sequence whose key sequence is empty gets zeros and LSE = -inf.

Beside the reference: the eager path (:func:`attention_eager`: torch's fused SDPA on views of the pack,
one call per run of equal-length sequences, a padded batch where many small runs make the calls cost more
than the padding (:func:`_padding_pays`), windows computed frame block by frame block), the reference
backward (a VJP through the reference) and the streamed backward (FlashAttention-2's recomputation in
torch math, bounded memory) that the triton launcher runs where no fp32 kernel tile ships.
"""
from __future__ import annotations

from typing import Optional, Sequence

import torch
import torch.nn.functional as F

from ._common import math_dtype, reference_vjp
from ._host import PackOnHost, read_pack
from ._order import check_order, order_coords, t_major_order
from ._plan import PackPlan
from .rope import _rope_backward_ref, apply_rope3d_ref, rope3d_rotate, rope3d_tables

__all__ = ["grid_coords", "window_mask", "spacetime_attention_ref", "attention_eager", "attention_backward_streamed",
           "softmax_delta", "PackOnHost", "PackPlan", "read_pack"]


def grid_coords(grid_thw: Sequence[int], device=None, *, order: str = "t-major",
                tile: Optional[Sequence[int]] = None) -> torch.Tensor:
    """(t, h, w) of every token of one video in a packing order (:mod:`._order`: ``"t-major"`` raster, or
    ``"tile"`` with ``tile = (tt, th, tw)``, None: the default tile): ``(T*H*W, 3)`` int64."""
    order, tile = check_order(order, tile)
    return order_coords(grid_thw, order, tile, device)


def window_mask(grid_thw: Sequence[int], window: Sequence[int], device=None, rows: Optional[slice] = None, *,
                coords: Optional[torch.Tensor] = None) -> torch.Tensor:
    """``(L, L)`` bool: query token i may attend key token j (|dt| <= wt, |dh| <= wh, |dw| <= ww).
    ``rows``: only those query rows (a slice of the L tokens). ``coords``: ``(L, 3)`` (t, h, w) of the
    video's tokens in their order (None: the t-major raster of ``grid_thw``)."""
    c = grid_coords(grid_thw, device) if coords is None else coords.to(device=device, dtype=torch.int64)
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
                            rope_coords=None, rope_theta=10000.0, return_lse=False, coords=None):
    """Per-sequence softmax attention in fp32 (fp64 for fp64 inputs). Returns out in q's dtype and,
    with ``return_lse``, the natural-log LSE ``(H, Nq)`` in fp32 (fp64 for fp64 inputs). ``coords``:
    ``(Nq, 3)`` (t, h, w) of every token, the window's positions (None: the t-major raster of ``grid``)."""
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
            c = None if coords is None else coords[bq[i]:bq[i + 1]]
            s = s.masked_fill(~window_mask(grid[i].tolist(), window, q.device, coords=c), float("-inf"))
        lse = torch.logsumexp(s, dim=-1)                              # (H, Lq)
        p = torch.exp(s - lse[..., None])
        outs.append((p @ vi).transpose(0, 1))                         # (Lq, H, Dv)
        lses.append(lse)
    out = torch.cat(outs).to(q.dtype)
    if return_lse:
        return out, torch.cat(lses, dim=1)
    return out


# --- the eager path ----------------------------------------------------------------------------
# On the CPU, torch's fused SDPA (flash attention for CPU: no score matrix in memory, fp32 accumulation)
# on strided views of the pack beats any padding or nested layout: one call per run of consecutive
# sequences of equal (query, key) lengths, which is one call for a pack of same-size videos. Padding pays
# only for many small runs: a call costs about as much as 2**18 multiply-adds (H * D per query-key pair;
# measured on the CPU with torch 2.13, one thread), so the pack is padded into one masked batch when the
# padding adds less work than the calls it saves, never past a memory cap (padded scores over all heads).
_CALL_WORK = 2 ** 18
_PAD_MAX_ELEMS = 1 << 28
# The fused CPU kernel does not gain from a second thread on short sequences (its per-call setup and query
# blocks dominate); there the explicit math (scores, softmax, weighted values: three parallel ops) is faster.
# Measured with torch 2.13 on 2 CPU threads, fp32, head dims 32-128: forward + backward 1.3-2.5x and forward
# 1.1-1.9x faster at Lq x Lk <= 128 x 128; at 1 thread, and for longer sequences, the fused kernel is as fast
# or faster (`bench/bench_system.py --only sdpa`; docs/benchmarks.md). The scores of one call
# (B x H x Lq x Lk) then live in memory, at most 2**14 elements per head.
_MATH_MAX_SCORES = 128 * 128
_MATH_MIN_THREADS = 2


def _runs(lq: Sequence[int], lk: Sequence[int]) -> list[tuple[int, int, int]]:
    """Consecutive sequences of equal (query, key) lengths merged: ``[(count, Lq, Lk), ...]`` in pack order."""
    runs: list = []
    for a, b in zip(lq, lk):
        if runs and runs[-1][1:] == (a, b):
            runs[-1] = (runs[-1][0] + 1, a, b)
        else:
            runs.append((1, a, b))
    return runs


def _pad_choice(lq: Sequence[int], lk: Sequence[int], heads: int, head_dim: int) -> bool:
    """The rule above on the host lengths: whether one padded batch beats one SDPA call per run."""
    calls = sum(1 for _, a, b in _runs(lq, lk) if a and b)
    if calls <= 1:
        return False
    padded = len(lq) * max(lq) * max(lk)
    extra = heads * head_dim * (padded - sum(a * b for a, b in zip(lq, lk)))
    return padded * heads <= _PAD_MAX_ELEMS and extra <= _CALL_WORK * (calls - 1)


def _padding_pays(cu_seqlens_q, cu_seqlens_k, heads: int, head_dim: int = 64) -> bool:
    """Whether :func:`attention_eager` pads this pack into one masked batch (see ``_CALL_WORK``)."""
    lq = cu_seqlens_q.diff().tolist()
    lk = (cu_seqlens_q if cu_seqlens_k is None else cu_seqlens_k).diff().tolist()
    return _pad_choice(lq, lk, heads, head_dim)


def _math_pays(q: torch.Tensor, lq: int, lk: int) -> bool:
    """Whether :func:`_attend` takes the explicit math for one call of ``lq`` queries and ``lk`` keys (the rule
    above; CPU only, never under torch.compile, which fuses on its own)."""
    return (q.device.type == "cpu" and lq * lk <= _MATH_MAX_SCORES and not torch.compiler.is_compiling()
            and torch.get_num_threads() >= _MATH_MIN_THREADS)


def _attend(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float, mask: Optional[torch.Tensor] = None
            ) -> torch.Tensor:
    """``(B, H, Lq, D)``, ``(B, H, Lk, D)``, ``(B, H, Lk, Dv)`` -> ``(B, H, Lq, Dv)``: softmax attention with an
    optional additive float or keep-where-True bool ``mask`` broadcast over the scores, on torch's fused SDPA
    or, where :func:`_math_pays`, as the explicit math in the inputs' dtype. Every query must see a key."""
    if not _math_pays(q, q.shape[-2], k.shape[-2]):
        return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=scale)
    return _attention_math(q, k, v, scale, mask)


def _attention_math(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float,
                    mask: Optional[torch.Tensor] = None) -> torch.Tensor:
    """:func:`_attend`'s explicit math: scaled scores, mask, softmax, weighted values, in the inputs' dtype."""
    s = torch.matmul(q, k.transpose(-1, -2)).mul_(scale)                     # (B, H, Lq, Lk), a fresh tensor
    if mask is not None:
        s = s.masked_fill_(~mask, float("-inf")) if mask.dtype == torch.bool else s.add_(mask)
    return torch.matmul(torch.softmax(s, dim=-1), v)


def _heads_first(x: torch.Tensor, batch: int, length: int) -> torch.Tensor:
    """``(batch * length, H, D)`` rows -> a ``(batch, H, length, D)`` view."""
    return x.view(batch, length, *x.shape[1:]).transpose(1, 2)


def _sdpa_runs(q, k, v, runs, scale) -> list[torch.Tensor]:
    """One SDPA call per run, on views of the pack (no copy in, one reshape out per run)."""
    heads, dv = q.shape[1], v.shape[2]
    if len(runs) == 1:
        qs, ks, vs = (q,), (k,), (v,)
    else:
        qs = q.split([c * a for c, a, _ in runs])
        ks, vs = k.split([c * b for c, _, b in runs]), v.split([c * b for c, _, b in runs])
    outs = []
    for (c, a, b), qi, ki, vi in zip(runs, qs, ks, vs):
        if a == 0:
            continue
        if b == 0:                                   # no keys: zeros (the reference's convention)
            outs.append(q.new_zeros(c * a, heads, dv))
            continue
        o = _attend(_heads_first(qi, c, a), _heads_first(ki, c, b), _heads_first(vi, c, b), scale)  # (c, H, Lq, Dv)
        outs.append(o.transpose(1, 2).reshape(c * a, heads, dv))
    return outs


def _sdpa_padded(q, k, v, lq, lk, scale, plan: PackPlan) -> torch.Tensor:
    """Every sequence padded to the longest, one SDPA call with an additive key-padding mask ``(B, 1, 1, Lk)``
    (cached on the plan). Padded keys are masked out; a query whose key sequence is empty sees only the
    zero padding (output zero, as the reference); padded query rows are dropped (zero gradient)."""
    b, mq, mk = len(lq), max(lq), max(lk)

    def build():
        dev = q.device
        def rows(lens, width):
            return torch.cat([torch.arange(n, device=dev) + i * width for i, n in enumerate(lens)])
        keep = torch.arange(mk, device=dev)[None, :] < torch.tensor(lk, device=dev)[:, None]
        keep |= torch.tensor([n == 0 for n in lk], device=dev)[:, None]
        mask = torch.zeros(b, 1, 1, mk, dtype=q.dtype, device=dev).masked_fill_(~keep[:, None, None], float("-inf"))
        return rows(lq, mq), rows(lk, mk), mask

    rows_q, rows_k, mask = plan.memo(("padded", tuple(lq), tuple(lk), q.dtype), build)

    def pad(x, idx, length):
        return _heads_first(x.new_zeros(b * length, *x.shape[1:]).index_copy_(0, idx, x), b, length)

    o = _attend(pad(q, rows_q, mq), pad(k, rows_k, mk), pad(v, rows_k, mk), scale, mask)  # (B, H, Lq, Dv)
    return o.transpose(1, 2).reshape(b * mq, q.shape[1], v.shape[2]).index_select(0, rows_q)


def _spatial_mask(grid_thw, wh: int, ww: int, device) -> Optional[torch.Tensor]:
    """``(P, P)`` bool of one frame's P = H'W' tokens (|dh| <= wh, |dw| <= ww), None when it keeps all."""
    _, h, w = grid_thw
    if wh >= h - 1 and ww >= w - 1:
        return None
    return window_mask((1, h, w), (0, wh, ww), device)


def _sdpa_windowed(q, k, v, window, scale, plan: PackPlan) -> torch.Tensor:
    """Windowed self-attention that never computes a frame outside a query's window: per video, the
    frames whose window lies inside the video are one SDPA batch over overlapping views of their 2wt+1 key
    frames (``unfold``: no copy), the first and last wt frames one call each over their shorter key range;
    the spatial window (if it does not cover the frame) is one ``(P, P)`` mask tiled over the key frames."""
    wt, wh, ww = window
    heads, dv = q.shape[1], v.shape[2]
    cu, grid = plan.host_cu, plan.host_grid
    outs = []
    for i, (t, h, w) in enumerate(grid):
        p = h * w
        if t * p == 0:
            continue
        qv, kv, vv = (x[cu[i]:cu[i + 1]] for x in (q, k, v))               # (T'P, H, D) views
        sp = plan.memo(("window", h, w, wh, ww), lambda: _spatial_mask((t, h, w), wh, ww, q.device))

        def attend(qf, kf, vf):
            """qf ``(n, Lq, H, D)``, kf / vf ``(n, Lk, H, D)`` (whole frames) -> ``(n*Lq, H, Dv)``."""
            m = None if sp is None else sp.repeat(qf.shape[1] // p, kf.shape[1] // p)   # (Lq, Lk) tiled
            o = _attend(qf.transpose(1, 2), kf.transpose(1, 2), vf.transpose(1, 2), scale, m)
            return o.transpose(1, 2).reshape(-1, heads, dv)

        def frames(x, f0, f1):                       # frames f0 .. f1-1 as one (1, (f1-f0)*P, H, D) view
            return x[f0 * p:f1 * p][None]

        if wt >= t - 1:                              # every frame sees every frame: one call
            outs.append(attend(frames(qv, 0, t), frames(kv, 0, t), frames(vv, 0, t)))
            continue
        span, inner = 2 * wt + 1, max(0, t - 2 * wt)   # frames wt .. t-wt-1 see 2wt+1 whole frames

        def windows(x):                              # (T'P, H, D) -> (inner, span*P, H, D), overlapping views
            win = x.reshape(t, -1).unfold(0, span, 1)                   # (inner, P*H*D, span)
            return win.transpose(1, 2).reshape(inner, span * p, *x.shape[1:])

        def edge(f):                                 # a frame near an end: keys max(0, f-wt) .. min(t, f+wt+1)
            lo, hi = max(0, f - wt), min(t, f + wt + 1)
            return attend(frames(qv, f, f + 1), frames(kv, lo, hi), frames(vv, lo, hi))

        outs += [edge(f) for f in range(min(wt, t))]
        if inner:
            outs.append(attend(qv[wt * p:(t - wt) * p].view(inner, p, heads, -1), windows(kv), windows(vv)))
        outs += [edge(f) for f in range(max(wt, t - wt), t)]
    return torch.cat(outs) if outs else q.new_zeros(0, heads, dv)


def _sdpa_dtype(q: torch.Tensor) -> torch.dtype:
    """The dtype SDPA runs in: fp32 and fp64 inputs as they are (no copy); fp16 / bf16 inputs in fp32, the
    reference's math dtype. The CPU kernel's low-precision backward accumulates the key and value gradients
    in the low precision (measured: over twice the error of PyTorch's own low-precision math), and the same
    inputs must give the same output with and without autograd, so both run in fp32."""
    return math_dtype(q.dtype)


def attention_eager(q, k, v, cu_seqlens_q, cu_seqlens_k=None, *, scale=None, window=None, grid=None,
                    rope_coords=None, rope_theta=10000.0, coords=None, plan: Optional[PackPlan] = None
                    ) -> torch.Tensor:
    """The eager path (no LSE): the reference's values, on torch's fused SDPA (see :func:`_sdpa_dtype`). RoPE
    rotates q and k in fp32 (fp64 for fp64 inputs) from a table made once per pack. ``coords``: the window's
    (t, h, w) of every token, each sequence's a permutation of its grid (checked once per pack,
    :func:`._order.t_major_order`): tokens in another order than the t-major raster are gathered into it
    for the windowed SDPA and back. ``plan``: the
    pack's :class:`PackPlan` (made from ``cu_seqlens_q``, ``grid`` and ``coords`` or ``rope_coords``), or
    None for a plan of this call only. Returns ``out`` ``(Nq, H, Dv)`` in q's dtype."""
    plan = plan if plan is not None else PackPlan(cu_seqlens_q, grid, rope_coords if coords is None else coords)
    heads, dv, out_dtype = q.shape[1], v.shape[2], q.dtype
    if q.shape[0] == 0:
        return q.new_zeros(0, heads, dv)
    dtype = _sdpa_dtype(q)
    if rope_coords is not None:
        md, dim = math_dtype(q.dtype), q.shape[-1]
        rot = plan.memo(("rope", dim, float(rope_theta), md), lambda: rope3d_tables(rope_coords, dim, rope_theta, md))
        q, k = rope3d_rotate(q.to(md), rot).to(dtype), rope3d_rotate(k.to(md), rot).to(dtype)
    q, k, v = q.to(dtype), k.to(dtype), v.to(dtype)
    scale = q.shape[-1] ** -0.5 if scale is None else scale
    if window is not None:
        perm = None if coords is None else t_major_order(plan, cu_seqlens_q, grid, coords)
        if perm is None:
            return _sdpa_windowed(q, k, v, tuple(window), scale, plan).to(out_dtype)
        rows, inverse = perm                          # t-major = x[inverse], x = t-major[rows]
        q, k, v = q[inverse], k[inverse], v[inverse]
        return _sdpa_windowed(q, k, v, tuple(window), scale, plan)[rows].to(out_dtype)
    cu_q, cu_k = plan.host_cu, plan.keys_host(cu_seqlens_k)
    lq = [b - a for a, b in zip(cu_q, cu_q[1:])]
    lk = [b - a for a, b in zip(cu_k, cu_k[1:])]
    if _pad_choice(lq, lk, heads, q.shape[-1]):
        return _sdpa_padded(q, k, v, lq, lk, scale, plan).to(out_dtype)
    outs = _sdpa_runs(q, k, v, _runs(lq, lk), scale)
    return (outs[0] if len(outs) == 1 else torch.cat(outs)).to(out_dtype)


def _forward_ref(q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, host=None, **kw):
    return spacetime_attention_ref(q, k, v, cu_seqlens_q, cu_seqlens_k, return_lse=True, **kw)


def _backward_ref(dout, dlse, q, k, v, out, lse, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, host=None,
                  **kw):
    g = reference_vjp(spacetime_attention_ref, {"q": q, "k": k, "v": v}, (dout, dlse), ["q", "k", "v"],
                      cu_seqlens_q=cu_seqlens_q, cu_seqlens_k=cu_seqlens_k, return_lse=True, **kw)
    return g["q"], g["k"], g["v"]


def attention_backward_streamed(dout, dlse, q, k, v, out, lse, cu_seqlens_q, cu_seqlens_k, *, scale, window=None,
                                grid=None, rope_coords=None, rope_theta=10000.0, host: Optional[PackOnHost] = None,
                                block_elems: int = 2 ** 26, coords=None):
    """The attention backward in torch math (fp32; fp64 for fp64 inputs), FlashAttention-2's way: one
    sequence and one block of query rows at a time, recomputing ``P = exp(S - lse)`` from the forward's
    LSE, so memory is ``O(block_elems)`` (about 4 score-sized blocks of ``block_elems`` elements), not
    O(H * Lq * Lk) as in a vector-Jacobian product through the reference. Same arguments and results as
    the op's backward (``dlse`` may be None); the triton backend runs it where no spill-free fp32 kernel
    tile ships. ``coords``: the window's (t, h, w) of every token (None: the t-major raster of ``grid``).
    Returns ``(dq, dk, dv)`` in the inputs' dtypes."""
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
                near = window_mask(host.grid[i], window, q.device, rows=slice(r0 - q0, r1 - q0),
                                   coords=None if coords is None else coords[q0:q1])
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
