"""Packed varlen spacetime attention: validation, the ``spacetime_attention`` op (+ fake + autograd), the
function and the module. The meaning (reference, window mask, grid coordinates, reference and streamed
backward) is :mod:`sora_fast.reference.attention`.

q ``(Nq, H, D)``, k/v ``(Nk, H, D)``; sequence ``i`` is rows ``cu_seqlens[i]:cu_seqlens[i+1]``. No token
attends across sequences. Optional 3D local window over each video's (t, h, w) patch grid (positions from
``coords``, in whatever order the tokens are packed, or the t-major raster of ``grid``), optional 3D RoPE on
q and k (fused into the kernels' loads), LSE output. Zero-length sequences are legal; a query
sequence whose key sequence is empty (cross-attention to an empty caption) gets zeros and LSE = -inf.
"""
from __future__ import annotations

from typing import Optional, Sequence

import torch

from ..reference._host import PackOnHost, read_pack  # noqa: F401  (re-exported)
from ..reference._order import t_major_order
from ..reference.attention import (  # noqa: F401
    PackPlan,
    _backward_ref,
    _forward_ref,
    _padding_pays,
    attention_backward_streamed,
    attention_eager,
    grid_coords,
    softmax_delta,
    spacetime_attention_ref,
    window_mask,
)
from . import _dispatch
from ._common import (
    check_cu_seqlens_values,
    check_float,
    check_int_tuple,
    check_positive,
    check_same_dtype,
    check_shape,
    check_tensor,
)
from .rope import validate_rope_args

OP = "spacetime_attention"

__all__ = ["grid_coords", "window_mask", "spacetime_attention_ref", "spacetime_attention", "SpacetimeAttention"]


# --- validation ---------------------------------------------------------------------------------
# Window half-sizes are clamped to this: grid extents are int32, so no two tokens are farther apart on
# an axis, and the result is the same as for any larger window (an "unbounded" 10**9 or sys.maxsize).
_WINDOW_MAX = 2 ** 31 - 1


def _check_call(cu_seqlens_k, max_seqlen_q, max_seqlen_k, window, rope_coords, return_lse) -> None:
    """The public function's own arguments (no tensor read): the registered op never sees
    ``cu_seqlens_k=None`` (self-attention), absent bounds or ``return_lse``."""
    for name, m in (("max_seqlen_q", max_seqlen_q), ("max_seqlen_k", max_seqlen_k)):
        if m is not None and (isinstance(m, bool) or not isinstance(m, int) or m < 0):
            raise ValueError(f"{name} must be None or an int >= 0, got {m!r}")
    if cu_seqlens_k is not None and window is not None:
        raise ValueError("window needs self-attention (cu_seqlens_k=None): keys must share the queries' grid")
    if cu_seqlens_k is not None and rope_coords is not None:
        raise ValueError("rope_coords needs self-attention (cu_seqlens_k=None): "
                         "keys must share the queries' coordinates")
    if not isinstance(return_lse, bool):
        raise TypeError(f"return_lse must be a bool, got {type(return_lse).__name__}")


def _check_static(q, k, v, cu_seqlens_q, cu_seqlens_k, scale, window, grid, rope_coords, rope_theta, fake=False,
                  coords=None):
    """The one static check (shapes, dtypes, devices, scalars; no tensor values read), run by the public
    function, the registered ops (which torch.compile graphs and direct callers reach without the public
    function) and their fakes. ``cu_seqlens_k=None`` (the public function's self-attention) needs as many
    k rows as q rows; ``scale=None`` is the default. Windows and RoPE need self-attention (checked on the
    values by :func:`_check_values`). ``fake``: torch.compile may pass the scalars scale and window as
    symbols, so only the window's length and grid are checked there (the real op checks the values).
    ``coords``: the window's ``(Nq, 3)`` int32 positions (checked whenever given, used only with a window).
    Returns the window clamped to ``_WINDOW_MAX`` (the same attention), or None."""
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
            raise ValueError(f"cu_seqlens_k must have cu_seqlens_q's length {num_seqs + 1}, "
                             f"got {cu_seqlens_k.shape[0]}")
    if grid is not None:
        check_tensor("grid", grid, ndim=2, layout="(B, 3)", dtypes=(torch.int32,), device=q.device)
        if grid.shape != (num_seqs, 3):
            raise ValueError(f"grid must have shape ({num_seqs}, 3), one (T', H', W') per sequence, "
                             f"got {tuple(grid.shape)}")
    if cu_seqlens_k is None and k.shape[0] != q.shape[0]:
        raise ValueError(f"self-attention (cu_seqlens_k=None) needs as many k rows as q rows ({q.shape[0]}), "
                         f"got {k.shape[0]}; pass cu_seqlens_k for cross-attention")
    if not fake and scale is not None:
        check_positive("scale", scale)
    if window is not None:
        if fake:
            if len(window) != 3 or grid is None:
                raise ValueError(f"window needs 3 half-sizes and a grid, got window={window!r}, grid={grid!r}")
        else:
            window = check_int_tuple("window", window, 3)
            if grid is None:
                raise ValueError("window needs grid: the (T', H', W') patch grid of each sequence, shape (B, 3)")
            window = tuple(min(w, _WINDOW_MAX) for w in window)
    if rope_coords is not None:
        validate_rope_args(q, rope_coords, rope_theta, None, name="q", cname="rope_coords")
    if coords is not None:
        check_tensor("coords", coords, ndim=2, layout="(Nq, 3)", dtypes=(torch.int32,), device=q.device)
        if coords.shape != (q.shape[0], 3):
            raise ValueError(f"coords must have shape ({q.shape[0]}, 3), one (t, h, w) per row of q, "
                             f"got {tuple(coords.shape)}")
    if (window is not None or rope_coords is not None) and k.shape[0] != q.shape[0]:
        raise ValueError(f"window and rope_coords need self-attention: as many k rows as q rows ({q.shape[0]}), "
                         f"got {k.shape[0]}")
    return window


def _check_values(q, k, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, grid, self_attention=False,
                  rope_coords=None, plan: Optional[PackPlan] = None, coords=None) -> PackOnHost:
    """The one value check (cu_seqlens, grid and the bounds, read from the device once), run on real
    tensors inside the op (also under torch.compile) or by the eager path; returns the values read (for
    the kernels' launch tables). ``self_attention``: keys must share the queries' sequences (windows and
    RoPE). ``rope_coords``: their range is read in the same transfer (the triton kernel checks it).
    ``coords`` (the window's, with a grid): the count outside the grid is read in the same transfer.
    ``plan``: the queries' :class:`PackPlan`; the values come from it and each set of arguments is checked
    once per pack (the eager path, which needs no coordinate range; its window coordinates are checked
    where it reorders them, :func:`~sora_fast.reference._order.t_major_order`)."""
    if plan is not None:
        host_k = plan.keys_host(cu_seqlens_k)
        key = ("checked", q.shape[0], k.shape[0], max_seqlen_q, max_seqlen_k, tuple(host_k), self_attention,
               grid is not None)
        host = PackOnHost(plan.host_cu, host_k, None if grid is None else plan.host_grid)
        host = plan.memo(key, lambda: _check_host(host, q, k, max_seqlen_q, max_seqlen_k, self_attention))
        if coords is not None and grid is not None:
            t_major_order(plan, cu_seqlens_q, grid, coords)    # a permutation of each grid, checked once
        return host
    host = read_pack(cu_seqlens_q, cu_seqlens_k, grid, rope_coords, coords)
    return _check_host(host, q, k, max_seqlen_q, max_seqlen_k, self_attention)


def _check_host(host: PackOnHost, q, k, max_seqlen_q, max_seqlen_k, self_attention) -> PackOnHost:
    bq = check_cu_seqlens_values("cu_seqlens_q", host.cu_q, q.shape[0])
    bk = check_cu_seqlens_values("cu_seqlens_k", host.cu_k, k.shape[0])
    if self_attention and bk != bq:
        raise ValueError(f"window and rope_coords need self-attention: cu_seqlens_k must equal cu_seqlens_q "
                         f"{bq}, got {bk}")
    for name, m, b in (("max_seqlen_q", max_seqlen_q, bq), ("max_seqlen_k", max_seqlen_k, bk)):
        longest = max(b[i + 1] - b[i] for i in range(len(b) - 1))
        if m is not None and m < longest:
            raise ValueError(f"{name} must be >= the longest sequence ({longest}), got {m}")
    if host.grid is not None:
        g = host.grid
        for i, (t, h, w) in enumerate(g):
            if min(t, h, w) < 0 or t * h * w != bq[i + 1] - bq[i]:
                raise ValueError(f"grid[{i}]={g[i]} must be >= 0 and multiply to sequence {i}'s length "
                                 f"{bq[i + 1] - bq[i]}")
    if host.coords_outside:
        raise ValueError(f"coords must hold each token's (t, h, w) inside its own video's grid, got "
                         f"{host.coords_outside} tokens outside it")
    return host


def _check_plan(plan, cu_seqlens_q, grid, rope_coords, coords=None) -> None:
    """A plan given to :func:`spacetime_attention` must have been made from these tensors, unmodified."""
    if not isinstance(plan, PackPlan):
        raise TypeError(f"plan must be None or a PackPlan (PackedVideos.plan), got {type(plan).__name__}")
    for name, t, mine in (("cu_seqlens_q", cu_seqlens_q, plan.cu_seqlens), ("grid", grid, plan.grid),
                          ("rope_coords", rope_coords, plan.coords), ("coords", coords, plan.coords)):
        if t is not None and not plan.made_from(mine, t):
            raise ValueError(f"plan was not made from this {name} (or it changed since): pass the plan of the "
                             f"pack whose {name} this is (PackedVideos.plan), or plan=None")


def _lse_dtype(q: torch.Tensor) -> torch.dtype:
    """The LSE output's dtype: fp32, fp64 for fp64 inputs (the reference's math dtype)."""
    return torch.float64 if q.dtype == torch.float64 else torch.float32


def _check_bwd_static(dout, dlse, q, k, v, out, lse, cu_seqlens_q, cu_seqlens_k, scale, window, grid, rope_coords,
                      rope_theta, fake=False, coords=None):
    """The backward op's static check: the forward's, and the forward's outputs and their gradients.
    Returns the clamped window, as :func:`_check_static`."""
    window = _check_static(q, k, v, cu_seqlens_q, cu_seqlens_k, scale, window, grid, rope_coords, rope_theta, fake,
                           coords)
    lse_dtype = _lse_dtype(q)
    rows = (q.shape[0], q.shape[1], v.shape[2])
    for name, t, shape, dtype in (("out", out, rows, q.dtype), ("dout", dout, rows, q.dtype),
                                  ("lse", lse, rows[1::-1], lse_dtype), ("dlse", dlse, rows[1::-1], lse_dtype)):
        if t is None and name == "dlse":
            continue
        check_tensor(name, t, dtypes=(dtype,), device=q.device)
        check_shape(name, t, shape, "(the forward's output)")
    return window


@torch.library.custom_op("sora_fast::spacetime_attention", mutates_args=())
def _attention_op(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, cu_seqlens_q: torch.Tensor,
                  cu_seqlens_k: torch.Tensor, max_seqlen_q: Optional[int], max_seqlen_k: Optional[int],
                  scale: float, window: Optional[Sequence[int]], grid: Optional[torch.Tensor],
                  rope_coords: Optional[torch.Tensor], rope_theta: float, backend: str,
                  coords: Optional[torch.Tensor] = None) -> tuple[torch.Tensor, torch.Tensor]:
    window = _check_static(q, k, v, cu_seqlens_q, cu_seqlens_k, scale, window, grid, rope_coords, rope_theta,
                           coords=coords)
    coords = coords if window is not None else None
    host = _check_values(q, k, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, grid,
                         self_attention=window is not None or rope_coords is not None, rope_coords=rope_coords,
                         coords=coords)
    kernel = _dispatch.get_kernel(OP, backend, q.device)
    return kernel(q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, scale=scale, window=window,
                  grid=grid, rope_coords=rope_coords, rope_theta=rope_theta, host=host, **_coords_kw(coords, host))


def _coords_kw(coords: Optional[torch.Tensor], host: PackOnHost) -> dict:
    """The window coordinates as the kernels' keyword, only when they are not the t-major raster of the
    grid (read with the pack: ``host.coords_moved``), which is what a kernel does without them."""
    return {} if coords is None or not host.coords_moved else {"coords": coords}


@_attention_op.register_fake
def _(q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, scale, window, grid, rope_coords,
      rope_theta, backend, coords=None):
    _check_static(q, k, v, cu_seqlens_q, cu_seqlens_k, scale, window, grid, rope_coords, rope_theta, fake=True,
                  coords=coords)
    return q.new_empty(q.shape[0], q.shape[1], v.shape[2]), q.new_empty(q.shape[1], q.shape[0], dtype=_lse_dtype(q))


@torch.library.custom_op("sora_fast::spacetime_attention_backward", mutates_args=())
def _attention_bwd_op(dout: torch.Tensor, dlse: Optional[torch.Tensor], q: torch.Tensor, k: torch.Tensor,
                      v: torch.Tensor, out: torch.Tensor, lse: torch.Tensor, cu_seqlens_q: torch.Tensor,
                      cu_seqlens_k: torch.Tensor, max_seqlen_q: Optional[int], max_seqlen_k: Optional[int],
                      scale: float, window: Optional[Sequence[int]], grid: Optional[torch.Tensor],
                      rope_coords: Optional[torch.Tensor], rope_theta: float, backend: str,
                      coords: Optional[torch.Tensor] = None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    window = _check_bwd_static(dout, dlse, q, k, v, out, lse, cu_seqlens_q, cu_seqlens_k, scale, window, grid,
                               rope_coords, rope_theta, coords=coords)
    coords = coords if window is not None else None
    host = _check_values(q, k, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, grid,
                         self_attention=window is not None or rope_coords is not None, rope_coords=rope_coords,
                         coords=coords)
    kernel = _dispatch.get_kernel(OP + "_backward", backend, q.device)
    return kernel(dout, dlse, q, k, v, out, lse, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k,
                  scale=scale, window=window, grid=grid, rope_coords=rope_coords, rope_theta=rope_theta, host=host,
                  **_coords_kw(coords, host))


@_attention_bwd_op.register_fake
def _(dout, dlse, q, k, v, out, lse, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, scale, window, grid,
      rope_coords, rope_theta, backend, coords=None):
    _check_bwd_static(dout, dlse, q, k, v, out, lse, cu_seqlens_q, cu_seqlens_k, scale, window, grid, rope_coords,
                      rope_theta, fake=True, coords=coords)
    return torch.empty_like(q), torch.empty_like(k), torch.empty_like(v)


def _setup(ctx, inputs, output):
    q, k, v, cu_q, cu_k, max_q, max_k, scale, window, grid, rope_coords, rope_theta, backend, coords = inputs
    ctx.save_for_backward(q, k, v, output[0], output[1], cu_q, cu_k, grid, rope_coords, coords)
    ctx.args = (max_q, max_k, scale, window)
    ctx.rope_args = (rope_theta, backend)


def _backward(ctx, dout, dlse):
    q, k, v, out, lse, cu_q, cu_k, grid, rope_coords, coords = ctx.saved_tensors
    dq, dk, dv = _attention_bwd_op(dout, dlse, q, k, v, out, lse, cu_q, cu_k, *ctx.args, grid, rope_coords,
                                   *ctx.rope_args, coords)
    return dq, dk, dv, None, None, None, None, None, None, None, None, None, None, None


_attention_op.register_autograd(_backward, setup_context=_setup)


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
                        return_lse: bool = False, backend: Optional[str] = None, plan: Optional[PackPlan] = None,
                        coords: Optional[torch.Tensor] = None):
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
            |dh| <= wh, |dw| <= ww, at the positions ``coords`` gives (None: the t-major raster of
            ``grid``). Self-attention only; needs ``grid``. Any half-size past the grid (e.g. 10**9
            for "unbounded in t") is the same as the grid's extent.
        grid: ``(B, 3)`` int32 patch grid (T', H', W') of each sequence.
        coords: ``(Nq, 3)`` int32 (t, h, w) of every token inside its own video, the window's positions:
            tokens may be packed in any order (``PackedVideos.coords`` of a tile-order pack). Used only with
            ``window`` (ignored without one: nothing else depends on positions; RoPE takes
            ``rope_coords``). Every coordinate must lie inside its video's grid (checked); the torch
            backend's eager path also needs each video's coords to be a permutation of its grid (checked
            once per pack), as it gathers the tokens into the t-major raster and back.
        rope_coords: ``(Nq, 3)`` int32 (t, h, w) per token: 3D RoPE applied to q and k first, exactly
            :func:`sora_fast.ops.apply_rope3d` with the default split. Self-attention only. The triton
            backend computes the angles in fp32 and takes ``|rope_coords| <= 2**10`` (ValueError beyond;
            see ``sora_fast.triton.attention.ROPE_MAX_COORD``).
        return_lse: also return the LSE ``(H, Nq)`` fp32, natural log (-inf for rows with no keys).
        plan: the query pack's :class:`~sora_fast.reference.attention.PackPlan` (``PackedVideos.plan``),
            made from ``cu_seqlens_q`` (and ``grid`` / ``rope_coords`` / ``coords`` when given): the torch
            backend then reads the offsets, checks the values, builds the RoPE tables and the token order's
            index and chooses its SDPA layout once per pack instead of once per call. None: all of it per
            call.

    The torch backend without ``return_lse`` runs :func:`~sora_fast.reference.attention.attention_eager`:
    torch's fused SDPA (fp32 math, as the reference) on views of the pack, one call per run of equal-length
    sequences (padded into one batch only where many small runs cost more than the padding), windows
    frame block by frame block (key frames outside every query's window are never computed).

    Returns ``out`` ``(Nq, H, Dv)`` in q's dtype, or ``(out, lse)``. Differentiable in q, k, v.
    """
    _check_call(cu_seqlens_k, max_seqlen_q, max_seqlen_k, window, rope_coords, return_lse)
    window = _check_static(q, k, v, cu_seqlens_q, cu_seqlens_k, scale, window, grid, rope_coords, rope_theta,
                           coords=coords)
    coords = coords if window is not None else None
    backend = _dispatch.resolve_backend(OP, backend, q.device)
    if plan is not None:
        _check_plan(plan, cu_seqlens_q, grid, rope_coords, coords)
    if _dispatch.eager_reference(backend):
        plan = plan if plan is not None else PackPlan(cu_seqlens_q, grid, rope_coords if coords is None else coords)
        _check_values(q, k, cu_seqlens_q, cu_seqlens_q if cu_seqlens_k is None else cu_seqlens_k, max_seqlen_q,
                      max_seqlen_q if cu_seqlens_k is None else max_seqlen_k, grid,
                      self_attention=window is not None or rope_coords is not None, plan=plan, coords=coords)
        kw = dict(scale=scale, window=window, grid=grid, rope_coords=rope_coords, rope_theta=float(rope_theta),
                  coords=coords)
        if return_lse:
            return spacetime_attention_ref(q, k, v, cu_seqlens_q, cu_seqlens_k, return_lse=True, **kw)
        return attention_eager(q, k, v, cu_seqlens_q, cu_seqlens_k, plan=plan, **kw)
    out, lse = _attention_op(q, k, v, cu_seqlens_q, cu_seqlens_q if cu_seqlens_k is None else cu_seqlens_k,
                             max_seqlen_q, max_seqlen_q if cu_seqlens_k is None else max_seqlen_k,
                             float(q.shape[-1] ** -0.5 if scale is None else scale),
                             None if window is None else list(window), grid, rope_coords, float(rope_theta),
                             backend, coords)
    return (out, lse) if return_lse else out


class SpacetimeAttention(torch.nn.Module):
    """Module form of :func:`spacetime_attention` (no weights: fixed window, RoPE theta and backend).

    ``forward(q, k, v, cu_seqlens_q, cu_seqlens_k=None, max_seqlen_q=None, max_seqlen_k=None, *,
    grid=None, rope_coords=None, coords=None)``."""

    def __init__(self, window: Optional[Sequence[int]] = None, rope_theta: float = 10000.0,
                 scale: Optional[float] = None, backend: Optional[str] = None):
        super().__init__()
        self.window, self.rope_theta, self.scale, self.backend = window, rope_theta, scale, backend

    def forward(self, q, k, v, cu_seqlens_q, cu_seqlens_k=None, max_seqlen_q=None, max_seqlen_k=None, *,
                grid=None, rope_coords=None, coords=None):
        return spacetime_attention(q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k,
                                   scale=self.scale, window=self.window, grid=grid, rope_coords=rope_coords,
                                   rope_theta=self.rope_theta, backend=self.backend, coords=coords)

    def extra_repr(self) -> str:
        return f"window={self.window}, rope_theta={self.rope_theta}, scale={self.scale}"
