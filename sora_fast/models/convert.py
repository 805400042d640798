"""diffusers -> sora_fast: configs and weights of ``WanTransformer3DModel`` (-> :class:`VideoDiT`) and
``AutoencoderKLWan`` (-> :class:`CausalVAE`).

This module imports the models, never the other way: their ``from_diffusers*`` class methods import it
when called.
"""
from __future__ import annotations

import re
from dataclasses import fields
from typing import Iterable, Mapping

import torch

from .dit import DiTConfig
from .vae import CausalVAE, VAEConfig

__all__ = ["dit_config_from_diffusers", "convert_wan_transformer_state_dict", "vae_config_from_diffusers",
           "wan_config_kwargs", "convert_wan_vae_state_dict"]


# --- WanTransformer3DModel -> VideoDiT -------------------------------------------------------
def dit_config_from_diffusers(cfg) -> DiTConfig:
    """A :class:`DiTConfig` from a diffusers ``WanTransformer3DModel`` config (the model's ``.config`` or a dict).

    Text-to-video models only: an image embedder (``image_dim``, ``pos_embed_seq_len``) or I2V
    image keys (``added_kv_proj_dim``) raise ValueError naming the field. diffusers builds QK
    RMSNorm over all heads whatever its ``qk_norm`` says, so that is what the config gets.
    """
    cfg = dict(cfg)
    for field in ("image_dim", "added_kv_proj_dim", "pos_embed_seq_len"):
        if cfg.get(field) is not None:
            raise ValueError(f"unsupported diffusers config: {field}={cfg[field]!r} (image conditioning, "
                             f"Wan I2V); VideoDiT supports text-to-video models with {field}=None")
    heads, head_dim = cfg.get("num_attention_heads", 40), cfg.get("attention_head_dim", 128)
    in_channels = cfg.get("in_channels", 16)
    return DiTConfig(dim=heads * head_dim, ffn_dim=cfg.get("ffn_dim", 13824), num_heads=heads,
                     num_layers=cfg.get("num_layers", 40), in_channels=in_channels,
                     out_channels=cfg.get("out_channels") or in_channels, text_dim=cfg.get("text_dim", 4096),
                     freq_dim=cfg.get("freq_dim", 256), patch=tuple(cfg.get("patch_size", (1, 2, 2))),
                     eps=cfg.get("eps", 1e-6), cross_attn_norm=bool(cfg.get("cross_attn_norm", True)))


_RENAMES = [  # (diffusers prefix, ours), first match wins
    ("condition_embedder.time_embedder.linear_1.", "time_embed.0."),
    ("condition_embedder.time_embedder.linear_2.", "time_embed.2."),
    ("condition_embedder.time_proj.", "time_proj."),
    ("condition_embedder.text_embedder.linear_1.", "text_embed.0."),
    ("condition_embedder.text_embedder.linear_2.", "text_embed.2."),
    ("patch_embedding.", "patch_embed."),
]
_BLOCK_RENAMES = [(".to_out.0.", ".to_out."), (".ffn.net.0.proj.", ".ffn.0."), (".ffn.net.2.", ".ffn.2.")]


def convert_wan_transformer_state_dict(sd: Mapping[str, torch.Tensor], config: DiTConfig) -> dict:
    """A diffusers ``WanTransformer3DModel`` state dict -> a :class:`VideoDiT` state dict for ``config``.

    Renames keys; flattens the Conv3d patch embedding ``(D, C, pt, ph, pw)`` to the Linear ``(D, C*P)``;
    squeezes the ``(1, 6, D)`` / ``(1, 2, D)`` scale-shift tables; permutes ``proj_out`` rows from
    diffusers' ``(pt, ph, pw, C)`` feature order to the packing's ``(C, pt, ph, pw)``. Keys it does not
    know pass through unchanged, so loading with :func:`~sora_fast.models._convert.load_converted`
    names them (and any missing or mis-shaped tensor).
    """
    p, c_out = config.patch_volume, config.out_channels
    out = {}
    for key, t in sd.items():
        new = key
        for old, ours in _RENAMES:
            if key.startswith(old):
                new = ours + key[len(old):]
                break
        if new.startswith("blocks."):
            for old, ours in _BLOCK_RENAMES:
                new = new.replace(old, ours)
        if new == "patch_embed.weight" and t.dim() == 5:
            t = t.reshape(t.shape[0], -1)                                   # (D, C*pt*ph*pw)
        elif new.endswith("scale_shift_table") and t.dim() == 3 and t.shape[0] == 1:
            t = t[0]                                                        # (6, D) or (2, D)
        elif new.startswith("proj_out.") and t.shape[0] == p * c_out:
            t = t.reshape(p, c_out, *t.shape[1:]).transpose(0, 1).reshape(t.shape)  # rows (pt,ph,pw,C)->(C,pt,ph,pw)
        out[new] = t
    return out


# --- AutoencoderKLWan -> CausalVAE -----------------------------------------------------------
def wan_config_kwargs(config: Mapping, known: Iterable[str]) -> dict:
    """``VAEConfig`` keyword arguments from an ``AutoencoderKLWan.config``.

    Wan2.2-only fields (``is_residual=True``, ``patch_size``) and fields outside ``known`` are rejected
    by name; ``scale_factor_*`` are dropped (the factors follow from the architecture).
    """
    if not isinstance(config, Mapping):
        raise TypeError(f"config must be a mapping (AutoencoderKLWan.config), got {type(config).__name__}")
    cfg = {k: v for k, v in config.items() if not k.startswith("_")}
    if cfg.pop("is_residual", False):
        raise ValueError("is_residual=True is a Wan2.2 VAE field (residual down/up blocks); only the Wan2.1 "
                         "architecture (is_residual=False) is supported")
    patch_size = cfg.pop("patch_size", None)
    if patch_size not in (None, 1):
        raise ValueError(f"patch_size={patch_size!r} is a Wan2.2 VAE field (patchified input); only "
                         f"patch_size=None is supported")
    cfg.pop("scale_factor_temporal", None)
    cfg.pop("scale_factor_spatial", None)
    if "temperal_downsample" in cfg:
        cfg["temporal_downsample"] = cfg.pop("temperal_downsample")
    unknown = sorted(set(cfg) - set(known))
    if unknown:
        raise ValueError(f"AutoencoderKLWan config fields not supported by CausalVAE: {', '.join(unknown)}")
    return cfg


def vae_config_from_diffusers(config: Mapping) -> VAEConfig:
    """A :class:`VAEConfig` from an ``AutoencoderKLWan.config`` (see :func:`wan_config_kwargs`)."""
    return VAEConfig(**wan_config_kwargs(config, {f.name for f in fields(VAEConfig)}))


def _squeezed(shape) -> tuple:
    return tuple(d for d in shape if d != 1)


def convert_wan_vae_state_dict(state_dict: Mapping[str, torch.Tensor], config: VAEConfig) -> dict:
    """diffusers ``AutoencoderKLWan`` names and shapes -> :class:`CausalVAE`'s for ``config``.

    Renames ``*.resample.1.*`` -> ``*.conv.*`` and ``*.upsamplers.0.*`` -> ``*.upsampler.*``; reshapes
    where only unit dims differ: norm gammas ``(C, 1, 1[, 1])`` -> ``(C,)``, the resamplers' Conv2d
    ``(O, I, 3, 3)`` -> ``(O, I, 1, 3, 3)``, the attention's 1x1 Conv2d -> Linear. Other keys pass
    unchanged, so :func:`~sora_fast.models._convert.load_converted` names whatever does not fit.
    """
    if not isinstance(state_dict, Mapping):
        raise TypeError(f"state_dict must be a mapping of name -> tensor, got {type(state_dict).__name__}")
    with torch.device("meta"):
        shapes = {k: v.shape for k, v in CausalVAE(config).state_dict().items()}
    out = {}
    for key, value in state_dict.items():
        name = re.sub(r"\.upsamplers\.0\.", ".upsampler.", re.sub(r"\.resample\.1\.", ".conv.", key))
        want = shapes.get(name)
        if want is not None and value.shape != want and _squeezed(value.shape) == _squeezed(want):
            value = value.reshape(want)
        out[name] = value
    return out
