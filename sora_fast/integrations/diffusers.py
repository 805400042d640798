"""Drop-in acceleration of diffusers video pipelines: ``accelerate(pipe)``, and back with ``handle.undo()``.

What changes, per diffusers model (everything else keeps running diffusers' own code):

- ``WanTransformer3DModel`` (Wan 2.1 / 2.2): every ``WanAttnProcessor`` becomes
  :class:`WanAttnProcessor` of this module, which runs :func:`sora_fast.ops.spacetime_attention` with
  the 3D RoPE fused into the kernel (coordinates from the latent grid, which the model's ``rope``
  module now hands along with its cos/sin tables); each ``WanTransformerBlock`` runs its
  norm -> modulate -> gate -> residual chain through ``adaln_modulate`` / ``gated_residual_adaln``, and
  in inference the last gated add of a block is fused with the next block's first norm. (Wan takes a
  processor, not the dispatcher backend below: a dispatcher backend receives q and k already rotated,
  so RoPE could not be fused.)
- ``AutoencoderKLWan``: ``WanCausalConv3d`` runs :func:`~sora_fast.ops.causal_conv3d` (the time-stride-2
  downsampling conv, which has no causal padding, stays diffusers'), ``WanRMS_norm`` runs
  :func:`~sora_fast.ops.channel_rms_norm_silu` with the SiLU that follows it fused in.
- ``HunyuanVideoTransformer3DModel``, ``LTXVideoTransformer3DModel``: their processors use a
  ``sora_fast`` backend registered with diffusers' attention dispatcher (usable by hand too:
  ``model.set_attention_backend("sora_fast")``).
- ``CogVideoXTransformer3DModel``: its processors (which call SDPA directly) are swapped.

Nothing is copied and no weight changes: patches are instance attributes, recorded, and ``undo()``
puts every original object back, so the model computes bit for bit what it did before. Everything is
validated before the first patch and a failure while patching rolls back what was done, so a model is
never left half-patched. :func:`wan_packed_forward` runs a diffusers Wan transformer on latents of
different sizes in one packed forward (through :class:`~sora_fast.models.VideoDiT` sharing its weights).
"""
from __future__ import annotations

import math
from typing import Callable, Mapping, Optional, Sequence, Union

import torch
import torch.nn.functional as F
from torch import nn

from .. import ops
from ..ops._dispatch import BACKENDS, resolve_family_backends
from ..ops.conv3d import PackedConv3dWeight

__all__ = ["accelerate", "AccelerationHandle", "DiffusersHooksError", "SUPPORTED_MODELS", "OP_FAMILIES",
           "WanAttnProcessor", "CogVideoXAttnProcessor", "wan_packed_forward", "dispatch_backend_name",
           "register_attention_backends", "packed_attention"]

OP_FAMILIES = ("attention", "adaln", "causal_conv3d", "channel_rms_norm_silu")
SUPPORTED_MODELS = {
    "WanTransformer3DModel": "attention (RoPE fused) + adaLN chain",
    "AutoencoderKLWan": "causal convs + RMS norm/SiLU",
    "HunyuanVideoTransformer3DModel": "attention backend",
    "LTXVideoTransformer3DModel": "attention backend",
    "CogVideoXTransformer3DModel": "attention processors",
}
HANDLE_ATTR = "_sora_fast_acceleration"
MASKED_BIAS = -1e3  # an additive mask value at or below this drops the key (exp underflows to 0 in fp32)
Backend = Union[None, str, Mapping[str, Optional[str]]]


class DiffusersHooksError(RuntimeError):
    """The installed diffusers lacks a class, function or attribute that the acceleration relies on."""


def _supported_listing() -> str:
    return "; ".join(f"{k} ({v})" for k, v in SUPPORTED_MODELS.items())


def _diffusers_attr(module_path: str, name: str, purpose: str):
    """``module_path.name`` from the installed diffusers, or DiffusersHooksError saying what needs it."""
    import importlib

    import diffusers

    try:
        return getattr(importlib.import_module(module_path), name)
    except (ImportError, AttributeError) as e:
        raise DiffusersHooksError(f"the installed diffusers {diffusers.__version__} has no {module_path}.{name}, "
                                  f"which {purpose} needs ({type(e).__name__}: {e})") from e


def _own_forward_free(module: nn.Module, where: str) -> None:
    """A module whose ``forward`` was already replaced (a diffusers hook: caching, offloading, ...) is
    not patched: the hook would be lost, or would hide our forward."""
    if "forward" in module.__dict__:
        raise ValueError(f"{where} ({type(module).__name__}) already has its forward replaced, e.g. by a diffusers "
                         f"hook (caching, group offloading) or another patch; call accelerate before adding hooks")


# --- recording patches ------------------------------------------------------------------------
class _Patcher:
    """Sets attributes and remembers how to put the old ones back (in reverse order)."""

    def __init__(self):
        self._undo: list[tuple[Callable[[], Optional[str]], Callable[[], None]]] = []

    def set(self, obj, name: str, value) -> None:
        if isinstance(obj, nn.Module) and name in obj._modules:
            old_module = obj._modules[name]
            obj._modules[name] = value
            self._undo.append((lambda: None, lambda: obj._modules.__setitem__(name, old_module)))
            return
        had = name in vars(obj)
        old = vars(obj).get(name)
        setattr(obj, name, value)

        def check():
            if vars(obj).get(name) is not value:
                return f"{type(obj).__name__}.{name} was replaced after accelerate"
            return None

        def restore():
            if had:
                setattr(obj, name, old)
            else:
                delattr(obj, name)

        self._undo.append((check, restore))

    def problems(self) -> list[str]:
        return [p for check, _ in self._undo if (p := check()) is not None]

    def restore_all(self) -> None:
        while self._undo:
            self._undo.pop()[1]()


class AccelerationHandle:
    """What :func:`accelerate` did; ``undo()`` restores the original objects. Also a context manager:
    ``with accelerate(pipe): ...`` undoes on exit."""

    def __init__(self, patcher: _Patcher, patched: list[str], skipped: list[str]):
        self._patcher, self.patched, self.skipped = patcher, patched, skipped
        self.active = True

    def undo(self) -> None:
        """Put every original module, processor and forward back. A second call does nothing. Raises
        RuntimeError, restoring nothing, if a patched attribute was replaced since (e.g. a hook added
        after accelerate): undoing then would drop that replacement."""
        if not self.active:
            return
        problems = self._patcher.problems()
        if problems:
            raise RuntimeError("cannot undo the sora_fast acceleration cleanly: " + "; ".join(problems[:5])
                               + ("; ..." if len(problems) > 5 else "") + ". Remove what was added after "
                               "accelerate first.")
        self._patcher.restore_all()
        self.active = False

    def __enter__(self) -> "AccelerationHandle":
        return self

    def __exit__(self, *exc) -> None:
        self.undo()

    def __repr__(self) -> str:
        state = "active" if self.active else "undone"
        return f"AccelerationHandle({state}; " + "; ".join(self.patched) + ")"


# --- packed attention on diffusers' (B, S, H, D) layout ----------------------------------------
def _offsets(batch: int, length: int, device) -> torch.Tensor:
    return torch.arange(0, (batch + 1) * length, length, dtype=torch.int32, device=device)


def _key_padding(mask: Optional[torch.Tensor], shape: tuple) -> Optional[torch.Tensor]:
    """An SDPA ``attn_mask`` that only hides keys -> ``(B, Sk)`` bool of the kept keys (None: all).

    Bool masks keep True; additive masks keep 0 and drop values <= ``MASKED_BIAS`` (diffusers writes
    -10000 or -inf). A row whose every key is dropped by an additive mask keeps all of them, which is
    what the softmax of a constant bias does. A mask that differs between heads or queries, or holds
    other values, raises ValueError: it is not a key-padding mask.
    """
    if mask is None:
        return None
    b, h, sq, sk = shape
    if not isinstance(mask, torch.Tensor) or not 1 <= mask.dim() <= 4:
        raise ValueError(f"attn_mask must be None or a tensor broadcastable to (B, H, Sq, Sk) = {shape}, "
                         f"got {type(mask).__name__} {tuple(getattr(mask, 'shape', ()))}")
    m = mask.reshape((1,) * (4 - mask.dim()) + tuple(mask.shape))
    try:
        ok = torch.broadcast_shapes(m.shape, shape) == torch.Size(shape)
    except RuntimeError:
        ok = False
    if not ok:
        raise ValueError(f"attn_mask must broadcast to (B, H, Sq, Sk) = {shape}, got {tuple(mask.shape)}")
    if m.dtype == torch.bool:
        keep = m
    else:
        keep, drop = m == 0, m <= MASKED_BIAS
        if not bool((keep | drop).all()):
            raise ValueError(f"attn_mask must be a key-padding mask (bool, or additive 0 / <= {MASKED_BIAS:g}); "
                             f"got other additive values, e.g. {m[~(keep | drop)][0].item():g}")
    first = keep[:, :1, :1, :]
    if (keep.shape[1] > 1 or keep.shape[2] > 1) and not torch.equal(keep, first.expand_as(keep)):
        raise ValueError("attn_mask must be a key-padding mask (the same for every head and query); got one that "
                         f"differs between heads or queries, shape {tuple(mask.shape)}")
    keep = first[:, 0, 0, :].expand(b, sk)
    if m.dtype != torch.bool:
        keep = keep | ~keep.any(dim=1, keepdim=True)
    return None if bool(keep.all()) else keep.contiguous()


def packed_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, attn_mask: Optional[torch.Tensor] = None,
                     *, scale: Optional[float] = None, rope_coords: Optional[torch.Tensor] = None,
                     backend: Optional[str] = None) -> torch.Tensor:
    """Attention of diffusers' layout q ``(B, Sq, H, D)``, k/v ``(B, Sk, H, D)`` through
    :func:`sora_fast.ops.spacetime_attention`: the batch becomes B packed sequences, a key-padding
    mask drops the hidden keys from the packed keys (no padding is computed). ``rope_coords``
    ``(B*Sq, 3)`` int32 fuses 3D RoPE on q and k (self-attention). Returns ``(B, Sq, H, Dv)``."""
    b, sq, heads, _ = q.shape
    sk = k.shape[1]
    if k.shape[0] != b or v.shape[:2] != k.shape[:2] or k.shape[2] != heads or v.shape[2] != heads:
        raise ValueError(f"key/value must be (B, Sk, H, D) with query's B={b} and H={heads}, got key "
                         f"{tuple(k.shape)}, value {tuple(v.shape)}")
    keep = _key_padding(attn_mask, (b, heads, sq, sk))
    qp, cu_q = q.reshape(b * sq, heads, -1), _offsets(b, sq, q.device)
    if keep is None:
        kp, vp, cu_k = k.reshape(b * sk, heads, -1), v.reshape(b * sk, heads, -1), _offsets(b, sk, q.device)
    else:
        kp, vp = k[keep], v[keep]                                         # (Nk, H, D): kept keys only
        cu_k = F.pad(keep.sum(dim=1).cumsum(0), (1, 0)).to(torch.int32)
    if rope_coords is not None:
        if keep is not None or sk != sq:
            raise ValueError("rope_coords needs unmasked self-attention (keys = queries)")
        out = ops.spacetime_attention(qp, kp, vp, cu_q, None, sq, scale=scale, rope_coords=rope_coords,
                                      backend=backend)
    else:
        out = ops.spacetime_attention(qp, kp, vp, cu_q, cu_k, sq, sk, scale=scale, backend=backend)
    return out.view(b, sq, heads, -1)                                     # (B, Sq, H, Dv)


# --- diffusers' attention dispatcher ------------------------------------------------------------
def dispatch_backend_name(backend: Optional[str] = None) -> str:
    """Name of the dispatcher backend that runs sora_fast attention with ``backend`` (None: auto):
    ``"sora_fast"`` or ``"sora_fast_<backend>"``."""
    if backend is not None and backend not in BACKENDS:
        raise ValueError(f"backend must be None or one of {BACKENDS}, got {backend!r}")
    return "sora_fast" if backend is None else f"sora_fast_{backend}"


def _dispatch_fn(backend: Optional[str]) -> Callable:
    def sora_fast_attention(query, key, value, attn_mask=None, dropout_p=0.0, is_causal=False, scale=None,
                            enable_gqa=False, _parallel_config=None):
        if dropout_p:
            raise ValueError(f"the sora_fast attention backend has no dropout, got dropout_p={dropout_p}")
        if is_causal:
            raise ValueError("the sora_fast attention backend is not causal, got is_causal=True")
        if _parallel_config is not None:
            raise ValueError("the sora_fast attention backend does not support context parallelism")
        return packed_attention(query, key, value, attn_mask, scale=scale, backend=backend)

    return sora_fast_attention


def register_attention_backends() -> list[str]:
    """Register ``sora_fast`` (auto) and ``sora_fast_<backend>`` for every backend with diffusers' attention
    dispatcher (once; :func:`accelerate` does it too) and return their names, e.g. for
    ``model.set_attention_backend("sora_fast")`` or ``attention_backend("sora_fast_triton")``."""
    return [_dispatch_member(b).value for b in (None, *BACKENDS)]


def _dispatch_member(backend: Optional[str]):
    """The ``AttentionBackendName`` member of our backend, added to diffusers' enum and registry once.

    diffusers keys its registry by the members of an enum with no public way to add one, so the member
    is created the way ``Enum`` creates its own (a ``str`` instance with ``_name_``/``_value_``) and
    entered in the enum's lookup tables; ``AttentionBackendName("sora_fast")``,
    ``set_attention_backend("sora_fast")`` and ``attention_backend("sora_fast")`` then all work.
    """
    purpose = "the sora_fast attention backend (diffusers' attention dispatcher)"
    module = "diffusers.models.attention_dispatch"
    enum = _diffusers_attr(module, "AttentionBackendName", purpose)
    registry = _diffusers_attr(module, "_AttentionBackendRegistry", purpose)
    _diffusers_attr(module, "dispatch_attention_fn", purpose)
    for attr in ("register", "_backends"):
        if not hasattr(registry, attr):
            import diffusers

            raise DiffusersHooksError(f"the installed diffusers {diffusers.__version__} has no "
                                      f"{module}._AttentionBackendRegistry.{attr}, which {purpose} needs")
    value = dispatch_backend_name(backend)
    member = enum._value2member_map_.get(value)
    if member is None:
        member = str.__new__(enum, value)
        member._name_, member._value_ = value.upper(), value
        member.__objclass__ = enum
        member._sort_order_ = len(enum._member_names_)
        enum._member_map_[member._name_] = member
        enum._value2member_map_[value] = member
        enum._member_names_.append(member._name_)
    if member not in registry._backends:
        registry.register(member)(_dispatch_fn(backend))
    return member


def _processors_with_backend(model: nn.Module) -> list:
    """Processors of the model that call the dispatcher (they carry ``_attention_backend``)."""
    seen, out = set(), []
    for m in model.modules():
        p = getattr(m, "processor", None)
        if p is not None and hasattr(p, "_attention_backend") and id(p) not in seen:
            seen.add(id(p))
            out.append(p)
    return out


def _plan_dispatch(name: str, model: nn.Module, flags: dict, backends: dict) -> list:
    if not flags["attention"]:
        return []
    register_attention_backends()
    member = _dispatch_member(backends["attention"])
    procs = _processors_with_backend(model)
    if not procs:
        import diffusers

        raise DiffusersHooksError(f"{name}: no attention processor of this {type(model).__name__} calls diffusers' "
                                  f"attention dispatcher (no _attention_backend attribute) in diffusers "
                                  f"{diffusers.__version__}")
    desc = f"{name}: {len(procs)} attention processors on the {member.value!r} dispatcher backend"
    return [(desc, lambda p: [p.set(proc, "_attention_backend", member) for proc in procs])]


# --- Wan transformer ----------------------------------------------------------------------------
class _GridRope(tuple):
    """Wan's ``(freqs_cos, freqs_sin)`` plus the latent patch grid they were built for, so that the
    attention can apply the same rotation from integer coordinates inside its kernel."""

    def __new__(cls, cos: torch.Tensor, sin: torch.Tensor, grid: tuple):
        self = super().__new__(cls, (cos, sin))
        self.grid, self._coords = grid, {}
        return self

    def coords(self, batch: int, device) -> torch.Tensor:
        """``(batch * T'H'W', 3)`` int32 (t, h, w) of every token, cached."""
        key = (batch, str(device))
        if key not in self._coords:
            self._coords[key] = ops.grid_coords(self.grid, device).to(torch.int32).repeat(batch, 1)
        return self._coords[key]


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
    """

    def __init__(self, backend: Optional[str] = None, *, qkv: Callable, added_kv: Callable):
        self.backend, self._qkv, self._added_kv = backend, qkv, added_kv

    def __call__(self, attn, hidden_states: torch.Tensor, encoder_hidden_states: Optional[torch.Tensor] = None,
                 attention_mask: Optional[torch.Tensor] = None, rotary_emb=None) -> torch.Tensor:
        if attention_mask is not None:
            raise ValueError("WanAttnProcessor (sora_fast) takes no attention_mask (Wan attends to every token), "
                             f"got a tensor of shape {tuple(attention_mask.shape)}")
        img = None
        if attn.add_k_proj is not None:
            image_len = encoder_hidden_states.shape[1] - 512          # diffusers: 512 text tokens follow
            img, encoder_hidden_states = encoder_hidden_states[:, :image_len], encoder_hidden_states[:, image_len:]
        q, k, v = self._qkv(attn, hidden_states, encoder_hidden_states)   # (B, S|L, H*d)
        q, k = attn.norm_q(q), attn.norm_k(k)
        q, k, v = (t.unflatten(2, (attn.heads, -1)) for t in (q, k, v))   # (B, S|L, H, d)
        coords = None
        if rotary_emb is not None:
            b, s = q.shape[:2]
            if isinstance(rotary_emb, _GridRope) and math.prod(rotary_emb.grid) == s:
                coords = rotary_emb.coords(b, q.device)                     # (B*S, 3) int32
            else:
                q, k = _rotate(q, *rotary_emb), _rotate(k, *rotary_emb)
        out = packed_attention(q, k, v, rope_coords=coords, backend=self.backend).flatten(2, 3).type_as(q)
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


def _wan_block_forward(block, next_block, chain: _WanChain, backend: Optional[str]) -> Callable:
    """``WanTransformerBlock.forward`` with its norm/modulate/gate/residual chain on sora_fast ops."""

    def forward(hidden_states: torch.Tensor, encoder_hidden_states: torch.Tensor, temb: torch.Tensor,
                rotary_emb) -> torch.Tensor:
        b, s, d = hidden_states.shape
        n = b * s
        x = hidden_states.reshape(n, d)                                                  # (N, D)
        (shift1, scale1, gate1, shift2, scale2, gate2), per_token = _wan_tables(block, temb, n)
        ids = None if per_token else torch.arange(b, dtype=torch.int32, device=x.device).repeat_interleave(s)
        zero, one = torch.zeros_like(gate1), torch.ones_like(gate1)
        y = chain.take(block, hidden_states, temb)
        if y is None:
            y = ops.adaln_modulate(x, shift1, scale1, ids, eps=block.norm1.eps, backend=backend)  # (N, D)
        a = block.attn1(y.view(b, s, d), None, None, rotary_emb).reshape(n, d)        # (N, D)
        norm2 = block.norm2 if isinstance(block.norm2, nn.LayerNorm) else None
        h, y = ops.gated_residual_adaln(x, a, gate1, zero, zero, ids, weight=getattr(norm2, "weight", None),
                                        bias=getattr(norm2, "bias", None),
                                        eps=norm2.eps if norm2 is not None else block.norm1.eps,
                                        backend=backend)                                # h + g1*a, LN_affine(h)
        if norm2 is None:
            y = h                                                                       # no cross-attn norm
        c = block.attn2(y.view(b, s, d), encoder_hidden_states, None, None).reshape(n, d)  # (N, D)
        h, y = ops.gated_residual_adaln(h, c, one, shift2, scale2, ids, eps=block.norm3.eps,
                                        backend=backend)                                # h + c, LN(h)*(1+s2)+sh2
        f = block.ffn(y.view(b, s, d)).reshape(n, d)                                    # (N, D)
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

    return forward


def _wan_rope_forward(rope, chain: _WanChain) -> Callable:
    original = type(rope).forward.__get__(rope)

    def forward(hidden_states: torch.Tensor):
        chain.clear()                                  # a new transformer forward starts here
        cos, sin = original(hidden_states)
        _, _, t, h, w = hidden_states.shape
        pt, ph, pw = rope.patch_size
        return _GridRope(cos, sin, (t // pt, h // ph, w // pw))

    return forward


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
        proc = WanAttnProcessor(backends["attention"], qkv=qkv, added_kv=added_kv)
        chain = _WanChain()

        def apply_attention(p):
            p.set(rope, "forward", _wan_rope_forward(rope, chain))
            for _, attn in attns:
                p.set(attn, "processor", proc)

        steps.append((f"{name}: {len(attns)} attention processors (RoPE fused)", apply_attention))
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
                p.set(blk, "forward", _wan_block_forward(blk, nxt, chain, backends["adaln"]))

        steps.append((f"{name}: {len(blocks)} blocks' adaLN chains", apply_norms))
    return steps


# --- Wan VAE ------------------------------------------------------------------------------------
_SILU_AFTER = {"WanResidualBlock": ("norm1", "norm2"), "WanEncoder3d": ("norm_out",),
               "WanDecoder3d": ("norm_out",)}  # owners whose `nonlinearity` follows exactly these norms


def _conv_forward(conv: nn.Conv3d, backend: Optional[str]) -> Callable:
    kt = conv.weight.shape[2]
    padding = (conv._padding[2], conv._padding[0])

    packed = PackedConv3dWeight()                               # the triton kernel's weight, packed once

    def forward(x: torch.Tensor, cache_x: Optional[torch.Tensor] = None) -> torch.Tensor:
        cache = None
        if cache_x is not None and kt > 1:
            cache = cache_x[:, :, -(kt - 1):].to(x.device)      # diffusers pads the rest, crops older frames
        packed_weight = packed(conv.weight, backend)
        if packed_weight is not None:   # the triton kernel works in channels-last: no copy when x already is
            x, cache = (None if t is None else t.contiguous(memory_format=torch.channels_last_3d) for t in (x, cache))
        return ops.causal_conv3d(x, conv.weight, conv.bias, stride=conv.stride, padding=padding, cache=cache,
                                 packed_weight=packed_weight, backend=backend)

    return forward


def _norm_forward(norm: nn.Module, silu: bool, backend: Optional[str]) -> Callable:
    def forward(x: torch.Tensor) -> torch.Tensor:
        bias = norm.bias.reshape(-1) if isinstance(norm.bias, torch.Tensor) else None
        x5 = x if x.dim() == 5 else x.unsqueeze(2)               # images (B*T, C, H, W): one frame each
        y = ops.channel_rms_norm_silu(x5, norm.gamma.reshape(-1), bias, silu=silu, backend=backend)
        return y if x.dim() == 5 else y.squeeze(2)

    return forward


def _causal_conv_fits(conv) -> bool:
    """Wan's causal conv is ours when its front time padding is kt - 1 frames and the rest is plain."""
    kt, pt = conv.weight.shape[2], conv._padding[4]
    return (pt == kt - 1 and conv._padding[5] == 0 and conv._padding[0] == conv._padding[1]
            and conv._padding[2] == conv._padding[3] and conv.dilation == (1, 1, 1) and conv.groups == 1
            and conv.padding_mode == "zeros" and tuple(conv.padding) == (0, 0, 0))


def _plan_wan_vae(name: str, model: nn.Module, flags: dict, backends: dict) -> list:
    purpose = "the Wan VAE acceleration"
    module = "diffusers.models.autoencoders.autoencoder_kl_wan"
    conv_cls = _diffusers_attr(module, "WanCausalConv3d", purpose)
    norm_cls = _diffusers_attr(module, "WanRMS_norm", purpose)
    steps = []
    if not flags["vae"]:
        return steps
    mods = dict(model.named_modules())
    for n, m in mods.items():
        need = ("_padding",) if type(m) is conv_cls else ("gamma", "bias", "channel_first") \
            if type(m) is norm_cls else ()
        lacking = [a for a in need if not hasattr(m, a)]
        if lacking:
            import diffusers

            raise DiffusersHooksError(f"{name}.{n} ({type(m).__name__}) has no {', '.join(lacking)} in the installed "
                                      f"diffusers {diffusers.__version__}, which {purpose} needs")
    convs = [(n, m) for n, m in mods.items() if type(m) is conv_cls and _causal_conv_fits(m)]
    for n, m in convs:
        _own_forward_free(m, f"{name}.{n}")
    steps.append((f"{name}: {len(convs)} causal convs (of {sum(type(m) is conv_cls for m in mods.values())})",
                  lambda p: [p.set(m, "forward", _conv_forward(m, backends["causal_conv3d"])) for _, m in convs]))
    if flags["norms"]:
        fused, owners = set(), []
        for n, m in mods.items():
            names = _SILU_AFTER.get(type(m).__name__)
            if names and isinstance(getattr(m, "nonlinearity", None), nn.SiLU) \
                    and all(type(getattr(m, a, None)) is norm_cls for a in names):
                owners.append(m)
                fused.update(id(getattr(m, a)) for a in names)
        norms = [(n, m) for n, m in mods.items() if type(m) is norm_cls and m.channel_first]
        for n, m in norms:
            _own_forward_free(m, f"{name}.{n}")
        rms = backends["channel_rms_norm_silu"]

        def apply_norms(p):
            for _, m in norms:
                p.set(m, "forward", _norm_forward(m, id(m) in fused, rms))
            for m in owners:
                p.set(m, "nonlinearity", nn.Identity())          # the SiLU now runs inside the norm

        steps.append((f"{name}: {len(norms)} RMS norms ({len(fused)} with their SiLU fused)", apply_norms))
    return steps


# --- CogVideoX ----------------------------------------------------------------------------------
class CogVideoXAttnProcessor:
    """diffusers' ``CogVideoXAttnProcessor2_0`` (and its fused-projection twin) with the attention on
    sora_fast: text and video tokens joined, QK LayerNorm and RoPE on the video part as diffusers does."""

    def __init__(self, backend: Optional[str] = None):
        self.backend = backend

    def __call__(self, attn, hidden_states: torch.Tensor, encoder_hidden_states: torch.Tensor,
                 attention_mask: Optional[torch.Tensor] = None, image_rotary_emb=None):
        from diffusers.models.embeddings import apply_rotary_emb

        text_len = encoder_hidden_states.size(1)
        hidden_states = torch.cat([encoder_hidden_states, hidden_states], dim=1)        # (B, L+S, dim)
        b, n, _ = hidden_states.shape
        if getattr(attn, "fused_projections", False):
            q, k, v = attn.to_qkv(hidden_states).chunk(3, dim=-1)
        else:
            q, k, v = attn.to_q(hidden_states), attn.to_k(hidden_states), attn.to_v(hidden_states)
        q, k, v = (t.view(b, n, attn.heads, -1).transpose(1, 2) for t in (q, k, v))      # (B, H, N, d)
        if attn.norm_q is not None:
            q = attn.norm_q(q)
        if attn.norm_k is not None:
            k = attn.norm_k(k)
        if image_rotary_emb is not None:
            q[:, :, text_len:] = apply_rotary_emb(q[:, :, text_len:], image_rotary_emb)
            if not attn.is_cross_attention:
                k[:, :, text_len:] = apply_rotary_emb(k[:, :, text_len:], image_rotary_emb)
        mask = None
        if attention_mask is not None:
            mask = attn.prepare_attention_mask(attention_mask, n, b).view(b, attn.heads, -1, attention_mask.shape[-1])
        out = packed_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), mask,
                               backend=self.backend)                                  # (B, N, H, d)
        out = attn.to_out[1](attn.to_out[0](out.reshape(b, n, -1)))
        encoder_hidden_states, hidden_states = out.split([text_len, n - text_len], dim=1)
        return hidden_states, encoder_hidden_states


def _plan_cogvideox(name: str, model: nn.Module, flags: dict, backends: dict) -> list:
    if not flags["attention"]:
        return []
    purpose = "the CogVideoX acceleration"
    module = "diffusers.models.attention_processor"
    known = (_diffusers_attr(module, "CogVideoXAttnProcessor2_0", purpose),
             _diffusers_attr(module, "FusedCogVideoXAttnProcessor2_0", purpose))
    attns = [(n, m) for n, m in model.named_modules() if hasattr(m, "processor") and hasattr(m, "set_processor")]
    for n, m in attns:
        if not isinstance(m.processor, known):
            raise ValueError(f"{name}.{n} has processor {type(m.processor).__name__}; sora_fast replaces "
                             f"diffusers' CogVideoXAttnProcessor2_0 / FusedCogVideoXAttnProcessor2_0 only")
    proc = CogVideoXAttnProcessor(backends["attention"])
    return [(f"{name}: {len(attns)} attention processors",
             lambda p: [p.set(m, "processor", proc) for _, m in attns])]


# --- entry point --------------------------------------------------------------------------------
_PLANNERS = {
    "WanTransformer3DModel": _plan_wan,
    "AutoencoderKLWan": _plan_wan_vae,
    "HunyuanVideoTransformer3DModel": _plan_dispatch,
    "LTXVideoTransformer3DModel": _plan_dispatch,
    "CogVideoXTransformer3DModel": _plan_cogvideox,
}


def _supported_class(model) -> Optional[str]:
    """The supported diffusers class ``model`` is exactly an instance of (subclasses may change blocks)."""
    import diffusers

    for cls_name in _PLANNERS:
        cls = getattr(diffusers, cls_name, None)
        if cls is not None and type(model) is cls:
            return cls_name
    return None


def _targets(pipe_or_model) -> tuple[list[tuple[str, nn.Module, str]], list[str]]:
    """(name, model, class name) of every supported model; names of the skipped pipeline components."""
    if isinstance(pipe_or_model, nn.Module):
        cls_name = _supported_class(pipe_or_model)
        if cls_name is None:
            raise TypeError(f"pipe_or_model must be a diffusers pipeline or one of the supported diffusers models "
                            f"({_supported_listing()}), got {type(pipe_or_model).__name__}")
        return [(type(pipe_or_model).__name__, pipe_or_model, cls_name)], []
    components = getattr(pipe_or_model, "components", None)
    if not isinstance(components, Mapping):
        raise TypeError(f"pipe_or_model must be a diffusers pipeline (with .components) or a diffusers model, "
                        f"got {type(pipe_or_model).__name__}")
    targets, skipped = [], []
    for name, comp in components.items():
        if not isinstance(comp, nn.Module):
            continue
        cls_name = _supported_class(comp)
        if cls_name is None:
            skipped.append(f"{name} ({type(comp).__name__})")
        else:
            targets.append((name, comp, cls_name))
    if not targets:
        held = ", ".join(skipped) or "no models"
        raise TypeError(f"pipe_or_model ({type(pipe_or_model).__name__}) holds no supported model; supported: "
                        f"{_supported_listing()}; it holds {held}")
    return targets, skipped


def accelerate(pipe_or_model, *, attention: bool = True, norms: bool = True, vae: bool = True,
               backend: Backend = None) -> AccelerationHandle:
    """Make a diffusers pipeline (or one of its models) run on sora_fast kernels; same outputs.

    Args:
        pipe_or_model: a ``DiffusionPipeline`` (every supported component is accelerated, the others,
            e.g. text encoders, are left alone and listed in ``handle.skipped``) or a supported model:
            ``WanTransformer3DModel``, ``AutoencoderKLWan``, ``HunyuanVideoTransformer3DModel``,
            ``LTXVideoTransformer3DModel``, ``CogVideoXTransformer3DModel``.
        attention: route attention through :func:`sora_fast.ops.spacetime_attention`.
        norms: Wan transformer blocks' adaLN chains, and the Wan VAE's RMS norms (+ SiLU) when ``vae``.
        vae: the Wan VAE's causal convs (and its norms when ``norms``).
        backend: None (auto: kernels for CUDA tensors, the torch reference on CPU), a backend name for
            every op, or a mapping from ``"attention"``, ``"adaln"``, ``"causal_conv3d"``,
            ``"channel_rms_norm_silu"`` to a name. A backend without a kernel for an op raises
            :class:`sora_fast.ops.BackendUnavailableError` when the op runs.

    Returns an :class:`AccelerationHandle`: ``handle.undo()``, or ``with accelerate(pipe): ...``.
    Raises TypeError for an unsupported object (listing what is supported), ValueError for a model
    already accelerated or with processors/blocks it does not know, :class:`DiffusersHooksError` when
    the installed diffusers lacks what a patch needs; in every case nothing has been changed.
    """
    flags = {"attention": attention, "norms": norms, "vae": vae}
    for k, v in flags.items():
        if not isinstance(v, bool):
            raise TypeError(f"{k} must be a bool, got {type(v).__name__}")
    backends = resolve_family_backends(backend, OP_FAMILIES)
    targets, skipped = _targets(pipe_or_model)
    for name, model, _ in targets:
        prior = getattr(model, HANDLE_ATTR, None)
        if prior is not None and prior.active:
            label = name if name == type(model).__name__ else f"{name} ({type(model).__name__})"
            raise ValueError(f"{label} is already accelerated by sora_fast ({prior!r}); "
                             f"call that handle's undo() first")
    steps = []
    for name, model, cls_name in targets:
        steps += _PLANNERS[cls_name](name, model, flags, backends)
    if not steps:
        raise ValueError(f"nothing to accelerate with attention={attention}, norms={norms}, vae={vae} in "
                         + ", ".join(f"{n} ({type(m).__name__})" for n, m, _ in targets))
    patcher = _Patcher()
    handle = AccelerationHandle(patcher, [desc for desc, _ in steps], skipped)
    try:
        for _, model, _ in targets:
            patcher.set(model, HANDLE_ATTR, handle)
        for _, apply in steps:
            apply(patcher)
    except BaseException:
        patcher.restore_all()
        raise
    return handle


# --- packed multi-latent forward ----------------------------------------------------------------
def _shared_video_dit(transformer: nn.Module, backend) -> nn.Module:
    """A :class:`~sora_fast.models.VideoDiT` holding the transformer's own weight tensors (converted
    views: only the re-ordered output projection is a copy), built on the meta device, so nothing big
    is allocated and later in-place weight changes are seen."""
    from ..models.dit import DiTConfig, VideoDiT, convert_wan_transformer_state_dict

    config = DiTConfig.from_diffusers_config(transformer.config)
    sd = convert_wan_transformer_state_dict(transformer.state_dict(), config)
    with torch.device("meta"):
        dit = VideoDiT(config, backend=backend)
    dit.load_state_dict(sd, strict=True, assign=True)
    return dit.eval()


def wan_packed_forward(transformer: nn.Module, latents: Sequence[torch.Tensor], timesteps,
                       encoder_hidden_states: Sequence[torch.Tensor], *, backend=None) -> list[torch.Tensor]:
    """Run a diffusers ``WanTransformer3DModel`` on latents of different sizes in one packed forward.

    diffusers needs one shape per batch; here every latent is its own packed sequence (no padding,
    no attention across latents), with its own timestep and text, and output ``i`` equals
    ``transformer(latents[i][None], timesteps[i:i+1], encoder_hidden_states[i][None]).sample[0]``.

    Args:
        transformer: a diffusers ``WanTransformer3DModel`` (text-to-video: no image embedder).
        latents: list of ``(C, T, H, W)`` latents, each T, H, W divisible by the patch size.
        timesteps: ``(B,)`` one per latent, or one number for all.
        encoder_hidden_states: list of ``(L_i, text_dim)`` prompt embeddings (lengths may differ), or a
            ``(B, L, text_dim)`` tensor.
        backend: as :class:`~sora_fast.models.VideoDiT`'s (None, a name, or ``{"attention", "adaln"}``).

    Returns a list of ``(out_channels, T, H, W)`` predictions. Inference: the weights are the
    transformer's own tensors, detached (no gradient reaches the diffusers parameters).
    """
    if _supported_class(transformer) != "WanTransformer3DModel":
        raise TypeError(f"transformer must be a diffusers WanTransformer3DModel, got {type(transformer).__name__}")
    if not isinstance(latents, (list, tuple)) or not latents:
        raise TypeError(f"latents must be a non-empty list of (C, T, H, W) tensors, got {type(latents).__name__}"
                        + (" (empty)" if isinstance(latents, (list, tuple)) else ""))
    if isinstance(encoder_hidden_states, torch.Tensor):
        if encoder_hidden_states.dim() != 3:
            raise ValueError(f"encoder_hidden_states must be a list of (L_i, text_dim) tensors or a (B, L, "
                             f"text_dim) tensor, got shape {tuple(encoder_hidden_states.shape)}")
        encoder_hidden_states = list(encoder_hidden_states.unbind(0))
    if not isinstance(encoder_hidden_states, (list, tuple)) or len(encoder_hidden_states) != len(latents):
        got = len(encoder_hidden_states) if isinstance(encoder_hidden_states, (list, tuple)) else \
            type(encoder_hidden_states).__name__
        raise ValueError(f"encoder_hidden_states must hold one prompt embedding per latent ({len(latents)}), "
                         f"got {got}")
    return _shared_video_dit(transformer, backend).forward_videos(latents, timesteps, encoder_hidden_states)
