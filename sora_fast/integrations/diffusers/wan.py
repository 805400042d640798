"""diffusers ``WanTransformer3DModel`` (Wan 2.1 / 2.2) on sora_fast: attention processors with the 3D RoPE
fused into the kernel, and each block's norm -> modulate -> gate -> residual chain on the adaLN ops
(in inference the last gated add of a block is fused with the next block's first norm)."""
from __future__ import annotations

import math
from typing import Callable, Optional

import torch
from torch import nn

from ... import ops
from ...models.activations import gelu_tanh
from ...models.dit import feed_forward
from ...reference._plan import PackPlan
from .attention import _offsets, packed_attention
from .patching import _diffusers_attr, _own_forward_free

__all__ = ["WanAttnProcessor"]

#: On a CPU, a block or attention call whose hidden states hold fewer elements (B·S·D) than this runs diffusers'
#: own code: at a few hundred tokens the patched path's per-call work (checks, tables, plans) costs more than
#: its fused ops save (docs/benchmarks.md, "accelerate at small sizes"). None of it applies under torch.compile.
CPU_MIN_ELEMENTS = 1 << 17


def _diffusers_faster(x: torch.Tensor) -> bool:
    return x.device.type == "cpu" and x.numel() < CPU_MIN_ELEMENTS and not torch.compiler.is_compiling()


class _GridRope(tuple):
    """Wan's ``(freqs_cos, freqs_sin)`` plus the latent patch grid they were built for, so that the
    attention can apply the same rotation from integer coordinates inside its kernel. ``plans``: where
    the :class:`~sora_fast.reference._plan.PackPlan` of each (grid, batch, device) is kept across forwards
    (None under torch.compile: no cached tensor enters a graph)."""

    def __new__(cls, cos: torch.Tensor, sin: torch.Tensor, grid: tuple, plans: Optional[dict] = None):
        self = super().__new__(cls, (cos, sin))
        self.grid, self._coords, self._plans = grid, {}, plans
        return self

    def coords(self, batch: int, device) -> torch.Tensor:
        """``(batch * T'H'W', 3)`` int32 (t, h, w) of every token, cached (the plan's, when there is one)."""
        plan = self.plan(batch, device)
        if plan is not None:
            return plan.coords
        key = (batch, str(device))
        if key not in self._coords:
            self._coords[key] = ops.grid_coords(self.grid, device).to(torch.int32).repeat(batch, 1)
        return self._coords[key]

    def grid_tensor(self, batch: int, device) -> torch.Tensor:
        """``(batch, 3)`` int32: the latent patch grid of every batch element (the plan's, when there is one)."""
        plan = self.plan(batch, device)
        if plan is not None:
            return plan.grid
        return torch.tensor([self.grid] * batch, dtype=torch.int32, device=device)

    def plan(self, batch: int, device) -> Optional[PackPlan]:
        """The plan of ``batch`` videos of this grid: offsets, grid and coordinates made once, the RoPE
        table and the attention layout on first use, shared by every layer and every later forward."""
        if self._plans is None:
            return None
        key = (self.grid, batch, str(device))
        if key not in self._plans:
            if len(self._plans) >= _PLANS_KEPT:
                self._plans.clear()
            s = math.prod(self.grid)
            with torch.no_grad(), torch.inference_mode(False):
                coords = ops.grid_coords(self.grid, device).to(torch.int32).repeat(batch, 1)
                grid = torch.tensor([self.grid] * batch, dtype=torch.int32, device=device)
            self._plans[key] = PackPlan(_offsets(batch, s, device), grid, coords,
                                        host_cu=range(0, (batch + 1) * s, s), host_grid=[self.grid] * batch)
        return self._plans[key]


_PLANS_KEPT = 8     # (grid, batch, device) plans a patched rope keeps: the shapes of one pipeline's calls


def _rotate(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Wan's rotary embedding from explicit cos/sin tables (interleaved pairs), as diffusers applies it."""
    x1, x2 = x.unflatten(-1, (-1, 2)).unbind(-1)
    c, s = cos[..., 0::2], sin[..., 1::2]
    return torch.stack((x1 * c - x2 * s, x1 * s + x2 * c), dim=-1).flatten(-2).type_as(x)


class WanAttnProcessor:
    """diffusers' ``WanAttnProcessor`` with the attention (and RoPE, fused) on sora_fast.

    Same projections, QK RMSNorm (the module's own layers) and I2V image branch as diffusers; the
    softmax attention runs as packed sequences, one per batch element. Self-attention with a
    :class:`_GridRope` (what the patched ``rope`` module returns) rotates q and k inside the kernel;
    with plain cos/sin tables (the sequence split by context parallelism, a hand-made call) they are
    rotated first, as diffusers does.

    ``window`` ``(wt, wh, ww)`` (self-attention processors only): each query attends only to the keys of
    its own video within those half-sizes of latent patches, on the grid the :class:`_GridRope` carries
    (diffusers' tokens are the t-major raster of that grid). It needs that grid: a call with plain cos/sin
    tables or without RoPE raises ValueError.
    """

    def __init__(self, backend: Optional[str] = None, *, qkv: Callable, added_kv: Callable,
                 window: Optional[tuple] = None, plain: Optional[Callable] = None):
        self.backend, self._qkv, self._added_kv, self.window = backend, qkv, added_kv, window
        self._plain = plain if window is None else None    # diffusers' processor, for small calls on a CPU

    def __call__(self, attn, hidden_states: torch.Tensor, encoder_hidden_states: Optional[torch.Tensor] = None,
                 attention_mask: Optional[torch.Tensor] = None, rotary_emb=None) -> torch.Tensor:
        if attention_mask is not None:
            raise ValueError("WanAttnProcessor (sora_fast) takes no attention_mask (Wan attends to every token), "
                             f"got a tensor of shape {tuple(attention_mask.shape)}")
        if self._plain is not None and _diffusers_faster(hidden_states):
            return self._plain(attn, hidden_states, encoder_hidden_states, None, rotary_emb)
        img = None
        if attn.add_k_proj is not None:
            image_len = encoder_hidden_states.shape[1] - 512          # diffusers: 512 text tokens follow
            img, encoder_hidden_states = encoder_hidden_states[:, :image_len], encoder_hidden_states[:, image_len:]
        q, k, v = self._qkv(attn, hidden_states, encoder_hidden_states)   # (B, S|L, H*d)
        q, k = attn.norm_q(q), attn.norm_k(k)
        q, k, v = (t.unflatten(2, (attn.heads, -1)) for t in (q, k, v))   # (B, S|L, H, d)
        coords = plan = grid = None
        b, s = q.shape[:2]
        on_grid = isinstance(rotary_emb, _GridRope) and math.prod(rotary_emb.grid) == s
        if self.window is not None and not on_grid:
            got = "no rotary embedding" if rotary_emb is None else "plain cos/sin tables"
            raise ValueError(f"a window {self.window} needs the whole latent grid of the self-attention (the "
                             f"patched rope module's output), got {got} for {s} tokens (a sequence split by "
                             "context parallelism or a hand-made call); accelerate without window for these")
        if on_grid:
            plan = rotary_emb.plan(b, q.device)                             # None under torch.compile
            coords = rotary_emb.coords(b, q.device)                         # (B*S, 3) int32
            if self.window is not None:
                grid = rotary_emb.grid_tensor(b, q.device)                  # (B, 3) int32
        elif rotary_emb is not None:
            q, k = _rotate(q, *rotary_emb), _rotate(k, *rotary_emb)
        out = packed_attention(q, k, v, rope_coords=coords, window=self.window, grid=grid, backend=self.backend,
                               plan=plan).flatten(2, 3).type_as(q)
        if img is not None:
            k_img, v_img = self._added_kv(attn, img)
            k_img = attn.norm_added_k(k_img).unflatten(2, (attn.heads, -1))
            v_img = v_img.unflatten(2, (attn.heads, -1))
            out = out + packed_attention(q, k_img, v_img, backend=self.backend).flatten(2, 3).type_as(q)
        return attn.to_out[1](attn.to_out[0](out))                          # (B, S, dim)


class _WanChain:
    """Hands the fused next-block norm from one patched block to the next one (inference only): block
    i's last gated add also computes block i+1's first modulated norm; block i+1 takes it only if it
    receives exactly that residual tensor with the same time projection."""

    def __init__(self):
        self.clear()

    def clear(self) -> None:
        self.h = self.temb = self.block = self.y = None

    def __getstate__(self) -> dict:
        return {}                # one forward's hand-over only: a copy (deepcopy, pickle) starts clear

    def __setstate__(self, state: dict) -> None:
        self.clear()

    def take(self, block, h, temb) -> Optional[torch.Tensor]:
        y = self.y if (self.block is block and self.h is h and self.temb is temb) else None
        self.clear()
        return y


def _wan_tables(block, temb: torch.Tensor, n: int, count: int = 6):
    """The first ``count`` of a block's six fp32 modulation tables (shift, scale, gate of self-attention,
    then of the FFN): (B, D) each with per-token seq_ids (Wan 2.1, 2.2 A14B), or (N, D) per token and
    seq_ids None (Wan 2.2 TI2V, whose time projection is (B, S, 6, D))."""
    if temb.dim() == 4:
        mod = (block.scale_shift_table.unsqueeze(0) + temb.float()).reshape(n, 6, -1)   # (N, 6, D)
        per_token = True
    else:
        mod = block.scale_shift_table + temb.float()                                   # (B, 6, D)
        per_token = False
    return tuple(t.contiguous() for t in mod.unbind(1)[:count]), per_token


_IDS: dict = {}     # (batch, length, device) -> int32 element of every token: made once, never modified


def _batch_ids(batch: int, length: int, device) -> torch.Tensor:
    """``(batch * length,)`` int32: the batch element of every token (cached outside torch.compile)."""
    if torch.compiler.is_compiling():
        return torch.arange(batch, dtype=torch.int32, device=device).repeat_interleave(length)
    key = (batch, length, str(device))
    if key not in _IDS:
        if len(_IDS) >= _PLANS_KEPT:
            _IDS.clear()
        with torch.inference_mode(False):
            _IDS[key] = torch.arange(batch, dtype=torch.int32, device=device).repeat_interleave(length)
    return _IDS[key]


def _ffn_hidden(ffn: nn.Module) -> Optional[int]:
    """The hidden width of diffusers' ``FeedForward`` (its first projection's outputs), None if not found."""
    net = getattr(ffn, "net", None)
    proj = getattr(net[0], "proj", None) if isinstance(net, nn.ModuleList) and len(net) else None
    return proj.out_features if isinstance(proj, nn.Linear) else None


def _ffn_rows(ffn: nn.Module):
    """diffusers' ``FeedForward`` as a function of rows, its tanh GELU through :func:`gelu_tanh` (the same
    function, faster on a CPU); any other FFN as it is."""
    net = getattr(ffn, "net", None)
    act = net[0] if isinstance(net, nn.ModuleList) and len(net) == 3 else None
    if (type(act).__name__ != "GELU" or getattr(act, "approximate", None) != "tanh"
            or not isinstance(getattr(act, "proj", None), nn.Module)):
        return ffn
    return lambda rows: net[2](net[1](gelu_tanh(act.proj(rows))))


class _WanBlockForward:
    """``WanTransformerBlock.forward`` with its norm/modulate/gate/residual chain on sora_fast ops.

    An object, not a closure: the block, the next block and the chain are its attributes, so a deep
    copy (or pickle) of the model gives the copy's blocks forwards over the copy's own modules."""

    def __init__(self, block, next_block, chain: _WanChain, backend: Optional[str]):
        self.block, self.next_block, self.chain, self.backend = block, next_block, chain, backend

    def __call__(self, hidden_states: torch.Tensor, encoder_hidden_states: torch.Tensor, temb: torch.Tensor,
                 rotary_emb) -> torch.Tensor:
        block, next_block, chain, backend = self.block, self.next_block, self.chain, self.backend
        if _diffusers_faster(hidden_states):
            chain.clear()
            return type(block).forward(block, hidden_states, encoder_hidden_states, temb, rotary_emb)
        b, s, d = hidden_states.shape
        n = b * s
        x = hidden_states.reshape(n, d)                                                  # (N, D)
        (shift1, scale1, gate1, shift2, scale2, gate2), per_token = _wan_tables(block, temb, n)
        ids = None if per_token else _batch_ids(b, s, x.device)                       # (N,) int32 element
        y = chain.take(block, hidden_states, temb)
        if y is None:
            y = ops.adaln_modulate(x, shift1, scale1, ids, eps=block.norm1.eps, backend=backend)  # (N, D)
        a = block.attn1(y.view(b, s, d), None, None, rotary_emb).reshape(n, d)        # (N, D)
        norm2 = block.norm2 if isinstance(block.norm2, nn.LayerNorm) else None
        h, y = ops.gated_residual_adaln(x, a, gate1, None, None, ids, weight=getattr(norm2, "weight", None),
                                        bias=getattr(norm2, "bias", None),
                                        eps=norm2.eps if norm2 is not None else block.norm1.eps,
                                        backend=backend)                                # h + g1*a, LN_affine(h)
        if norm2 is None:
            y = h                                                                       # no cross-attn norm
        c = block.attn2(y.view(b, s, d), encoder_hidden_states, None, None).reshape(n, d)  # (N, D)
        h, y = ops.gated_residual_adaln(h, c, None, shift2, scale2, ids, eps=block.norm3.eps,
                                        backend=backend)                                # h + c, LN(h)*(1+s2)+sh2
        f = feed_forward(_ffn_rows(block.ffn), y, _ffn_hidden(block.ffn))             # (N, D)
        if next_block is not None and not torch.is_grad_enabled():
            (nshift, nscale), _ = _wan_tables(next_block, temb, n, count=2)
            h, y_next = ops.gated_residual_adaln(h, f, gate2, nshift, nscale, ids, eps=next_block.norm1.eps,
                                                 backend=backend)                       # h + g2*f, next y
            out = h.view(b, s, d)
            chain.h, chain.temb, chain.block, chain.y = out, temb, next_block, y_next
            return out
        # last block (its output norm needs the transformer's temb), or training: a plain gated add,
        # as diffusers writes it, so no fused norm tensor outlives the block
        g = gate2.view(b, s, d) if ids is None else gate2[:, None]                     # (B, S|1, D)
        return (h.view(b, s, d).float() + f.view(b, s, d).float() * g).to(h.dtype)


class _WanRopeForward:
    """The ``rope`` module's forward that also hands the latent patch grid along (:class:`_GridRope`);
    an object over the module, as :class:`_WanBlockForward`."""

    def __init__(self, rope, chain: _WanChain):
        self.rope, self.chain, self.plans = rope, chain, {}

    def __getstate__(self) -> dict:
        return {"rope": self.rope, "chain": self.chain}     # plans are a cache: a copy makes its own

    def __setstate__(self, state: dict) -> None:
        self.__dict__.update(state, plans={})

    def __call__(self, hidden_states: torch.Tensor):
        self.chain.clear()                             # a new transformer forward starts here
        rope = self.rope
        cos, sin = type(rope).forward(rope, hidden_states)
        _, _, t, h, w = hidden_states.shape
        pt, ph, pw = rope.patch_size
        plans = None if torch.compiler.is_compiling() else self.plans
        return _GridRope(cos, sin, (t // pt, h // ph, w // pw), plans)


def _plan_wan(name: str, model: nn.Module, flags: dict, backends: dict) -> list:
    purpose = "the Wan transformer acceleration"
    module = "diffusers.models.transformers.transformer_wan"
    block_cls = _diffusers_attr(module, "WanTransformerBlock", purpose)
    proc_cls = _diffusers_attr(module, "WanAttnProcessor", purpose)
    qkv = _diffusers_attr(module, "_get_qkv_projections", purpose)
    added_kv = _diffusers_attr(module, "_get_added_kv_projections", purpose)
    layer_norm = _diffusers_attr("diffusers.models.normalization", "FP32LayerNorm", purpose)
    blocks = list(model.blocks)
    steps = []
    if flags["attention"]:
        rope = model.rope
        head_dim = model.config.attention_head_dim
        if (rope.t_dim, rope.h_dim, rope.w_dim) != ops.rope3d_split(head_dim):
            raise ValueError(f"{name}: RoPE split {(rope.t_dim, rope.h_dim, rope.w_dim)} differs from Wan's "
                             f"{ops.rope3d_split(head_dim)} for head dim {head_dim}")
        _own_forward_free(rope, f"{name}.rope")
        attns = [(f"{name}.blocks.{i}.{a}", getattr(blk, a)) for i, blk in enumerate(blocks)
                 for a in ("attn1", "attn2")]
        for where, attn in attns:
            if not isinstance(attn.processor, proc_cls):
                raise ValueError(f"{where} has processor {type(attn.processor).__name__}; sora_fast replaces "
                                 f"diffusers' {proc_cls.__name__} only (call model.set_default_attn_processor())")
        window = flags.get("window")
        proc = WanAttnProcessor(backends["attention"], qkv=qkv, added_kv=added_kv, plain=proc_cls())
        self_proc = proc if window is None else WanAttnProcessor(backends["attention"], qkv=qkv, added_kv=added_kv,
                                                                 window=window)
        chain = _WanChain()

        def apply_attention(p):
            p.set(rope, "forward", _WanRopeForward(rope, chain))
            for where, attn in attns:
                p.set(attn, "processor", self_proc if where.endswith(".attn1") else proc)

        how = "RoPE fused" + ("" if window is None else f"; self-attention window {window}, cross-attention dense")
        steps.append((f"{name}: {len(attns)} attention processors ({how})", apply_attention))
    if flags["norms"]:
        for i, blk in enumerate(blocks):
            where = f"{name}.blocks.{i}"
            if type(blk) is not block_cls:
                raise ValueError(f"{where} is a {type(blk).__name__}, not diffusers' {block_cls.__name__}")
            _own_forward_free(blk, where)
            for norm in ("norm1", "norm3"):
                m = getattr(blk, norm)
                if not isinstance(m, layer_norm) or m.elementwise_affine:
                    raise ValueError(f"{where}.{norm} must be a non-affine FP32LayerNorm, got {m!r}")
            if not isinstance(blk.norm2, (layer_norm, nn.Identity)):
                raise ValueError(f"{where}.norm2 must be an FP32LayerNorm or Identity, got {blk.norm2!r}")
        chain = _WanChain() if not flags["attention"] else chain

        def apply_norms(p):
            for i, blk in enumerate(blocks):
                nxt = blocks[i + 1] if i + 1 < len(blocks) else None
                p.set(blk, "forward", _WanBlockForward(blk, nxt, chain, backends["adaln"]))

        steps.append((f"{name}: {len(blocks)} blocks' adaLN chains", apply_norms))
    return steps
