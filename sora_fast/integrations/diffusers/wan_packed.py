"""A diffusers Wan transformer on latents of different sizes in one packed forward, through a
:class:`~sora_fast.models.VideoDiT` that shares its weights."""
from __future__ import annotations

import weakref
from typing import Sequence

import torch
from torch import nn

from ...models.convert import _frame_values, convert_wan_transformer_state_dict, dit_config_from_diffusers
from ...models.dit import VideoDiT
from ._accelerate import _supported_class

__all__ = ["wan_packed_forward"]


_SHARED: "weakref.WeakKeyDictionary" = weakref.WeakKeyDictionary()   # transformer -> (signature, VideoDiT)


def _shared_video_dit(transformer: nn.Module, backend) -> nn.Module:
    """A :class:`~sora_fast.models.VideoDiT` holding the transformer's own weight tensors (converted
    views: only the re-ordered output projection is a copy), built on the meta device, so nothing big
    is allocated. Built once per transformer and kept while its parameters are the same tensors, unmodified
    (their version counters), so a sampling loop converts nothing per step and in-place weight changes
    are still seen (they rebuild it)."""
    signature = (repr(backend), tuple((id(p), p._version if not p.is_inference() else None)
                                      for p in transformer.parameters()))
    kept = _SHARED.get(transformer)
    if kept is not None and kept[0] == signature:
        return kept[1]
    dit = _build_video_dit(transformer, backend)
    _SHARED[transformer] = (signature, dit)
    return dit


def _build_video_dit(transformer: nn.Module, backend) -> nn.Module:
    config = dit_config_from_diffusers(transformer.config)
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
        timesteps: ``(B,)`` one per latent, one number for all, or a list of B 1-D tensors, the i-th either
            ``(T'_i,)``, one per latent frame, or ``(S_i,)``, one per patch token as diffusers takes them for
            that latent alone (Wan 2.2 TI2V, ``(1, S_i)``); per-token values must be equal within each latent
            frame (:func:`sora_fast.models.convert.wan_frame_timesteps`), else a ValueError.
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
    if isinstance(timesteps, (list, tuple)) and any(isinstance(t, torch.Tensor) for t in timesteps):
        timesteps = _per_frame(timesteps, latents, tuple(transformer.config.patch_size))
    return _shared_video_dit(transformer, backend).forward_videos(latents, timesteps, encoder_hidden_states)


def _per_frame(timesteps: Sequence, latents: Sequence[torch.Tensor], patch: tuple) -> list:
    """Per latent: a per-token tensor ``(S_i,)`` becomes its per-frame values ``(T'_i,)``; anything else is
    passed on for :meth:`VideoDiT.forward_videos` to check."""
    if len(timesteps) != len(latents):
        raise ValueError(f"timesteps as a list must hold one tensor per latent ({len(latents)}), got {len(timesteps)}")
    out = []
    for i, (t, lat) in enumerate(zip(timesteps, latents)):
        if isinstance(t, torch.Tensor) and isinstance(lat, torch.Tensor) and lat.dim() == 4 and t.dim() == 1:
            grid = [n // p for n, p in zip(lat.shape[1:], patch)]
            s = grid[0] * grid[1] * grid[2]
            if t.shape[0] == s and s != grid[0]:
                t = _frame_values(t.reshape(1, grid[0], -1), [f"timesteps[{i}]"])   # (T'_i,)
        out.append(t)
    return out
