"""diffusers ``CogVideoXTransformer3DModel`` on sora_fast: its processors (which call SDPA directly) are
swapped for one that runs the attention packed."""
from __future__ import annotations

from typing import Optional

import torch
from torch import nn

from .attention import packed_attention
from .patching import _diffusers_attr

__all__ = ["CogVideoXAttnProcessor"]


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
