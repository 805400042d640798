"""diffusers -> sora_fast: configs and weights of ``WanTransformer3DModel`` (-> :class:`VideoDiT`) and
``AutoencoderKLWan`` (Wan 2.1 and 2.2 -> :class:`CausalVAE`), and the Wan transformer's timesteps (per latent
or, Wan 2.2 TI2V, per patch token) in :class:`VideoDiT`'s per-frame form.

This module imports the models, never the other way: their ``from_diffusers*`` class methods import it
when called.
"""
from __future__ import annotations

import re
from dataclasses import fields
from typing import Iterable, Mapping, Sequence

import torch

from .dit import DiTConfig
from .vae import CausalVAE, VAEConfig

__all__ = ["dit_config_from_diffusers", "convert_wan_transformer_state_dict", "wan_frame_timesteps",
           "vae_config_from_diffusers", "wan_config_kwargs", "convert_wan_vae_state_dict"]


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


def wan_frame_timesteps(timestep: torch.Tensor, grid: Sequence[int]) -> torch.Tensor:
    """A diffusers ``WanTransformer3DModel`` ``timestep`` -> :class:`VideoDiT`'s per-frame ``(F,)`` timesteps.

    Args:
        timestep: what diffusers' forward takes for B latents of one shape: ``(B,)``, one per latent, or
            ``(B, S)``, one per patch token (Wan 2.2 TI2V, ``expand_timesteps``), S = T'·H'·W' in diffusers'
            token order (t slowest, then h, then w: :func:`~sora_fast.packing.pack_videos`' order).
        grid: ``(T', H', W')``, the latents' patch grid: ``(T // pt, H // ph, W // pw)``.

    Returns ``(B·T',)``: the value of every latent frame, latent by latent, frames in time order, the form
    :meth:`VideoDiT.forward` takes for ``pack_videos(list(hidden_states))``; the same output as diffusers
    (fp32 parity). VideoDiT's modulation tables have one row per latent frame, so per-token values must be
    equal within each frame (as the TI2V pipeline's are: 0 at the given first frame, ``t`` elsewhere); a
    frame whose tokens differ is a ValueError naming the latent, the frame and two of its values (diffusers
    itself, or ``sora_fast.integrations.diffusers.accelerate``, takes any per-token values). Reads the
    values once (a device sync): convert at the boundary, not per step inside a compiled graph.
    """
    g = tuple(grid) if isinstance(grid, (tuple, list, torch.Size)) else None
    if g is None or len(g) != 3 or not all(isinstance(v, int) and not isinstance(v, bool) and v >= 1 for v in g):
        raise ValueError(f"grid must be 3 positive ints (T', H', W'), the latents' patch grid, got {grid!r}")
    if not isinstance(timestep, torch.Tensor):
        raise TypeError(f"timestep must be a torch.Tensor of shape (B,) or (B, S), got {type(timestep).__name__}")
    if timestep.dtype == torch.bool or timestep.is_complex():
        raise TypeError(f"timestep must hold real numbers (float or int), got {timestep.dtype}")
    t, hw = g[0], g[1] * g[2]
    if timestep.dim() == 1:
        return timestep.repeat_interleave(t)                                     # (B*T',)
    if timestep.dim() != 2 or timestep.shape[1] != t * hw:
        raise ValueError(f"timestep must have shape (B,) or (B, {t * hw}) (one per token of a {g[0]}x{g[1]}x{g[2]} "
                         f"patch grid), got {tuple(timestep.shape)}")
    return _frame_values(timestep.reshape(timestep.shape[0], t, hw), [f"timestep[{b}]" for b in
                                                                      range(timestep.shape[0])])


def _frame_values(frames: torch.Tensor, names: Sequence[str]) -> torch.Tensor:
    """Per-token values ``(B, T', H'W')`` -> ``(B·T',)`` per-frame ones, or a ValueError naming ``names[b]``
    of the first row with a frame whose tokens differ."""
    hw = frames.shape[2]
    first = frames[:, :, :1]                                                    # (B, T', 1)
    same = (frames == first) | (torch.isnan(frames) & torch.isnan(first))
    if not bool(same.all()):
        b, f, k = (int(v) for v in torch.nonzero(~same)[0])
        raise ValueError(f"{names[b]} varies within latent frame {f} (tokens {f * hw}..{(f + 1) * hw - 1}: "
                         f"{frames[b, f, 0].item()!r} and {frames[b, f, k].item()!r}); VideoDiT takes one timestep "
                         f"per latent frame: give every token of a frame the same value")
    return first.reshape(-1)                                                    # (B*T',)


# --- AutoencoderKLWan -> CausalVAE -----------------------------------------------------------
# in an AutoencoderKLWan config, read by no AutoencoderKLWan of the diffusers versions this matches (Wan 2.2's
# TI2V-5B config has clip_output=false; diffusers' decode clamps to [-1, 1] whatever it says, as decode does)
_IGNORED_VAE_FIELDS = ("clip_output",)


def wan_config_kwargs(config: Mapping, known: Iterable[str]) -> dict:
    """``VAEConfig`` keyword arguments from an ``AutoencoderKLWan.config`` (Wan 2.1 or Wan 2.2).

    ``temperal_downsample`` -> ``temporal_downsample``, ``is_residual`` -> ``residual`` (a bool), ``patch_size``
    None -> 1 (else a positive int); ``scale_factor_*`` and ``clip_output`` are dropped (see
    :func:`vae_config_from_diffusers` for the factors). Any other field outside ``known`` is a ValueError naming it.
    """
    if not isinstance(config, Mapping):
        raise TypeError(f"config must be a mapping (AutoencoderKLWan.config), got {type(config).__name__}")
    cfg = {k: v for k, v in config.items() if not k.startswith("_")}
    residual = cfg.pop("is_residual", False)
    if not isinstance(residual, bool):
        raise ValueError(f"AutoencoderKLWan config is_residual must be a bool (true: Wan 2.2's residual stages), got "
                         f"{residual!r}")
    cfg["residual"] = residual
    patch_size = cfg.pop("patch_size", None)
    if patch_size is not None and (isinstance(patch_size, bool) or not isinstance(patch_size, int) or patch_size < 1):
        raise ValueError(f"AutoencoderKLWan config patch_size must be None or a positive int (Wan 2.2: 2, pixels "
                         f"folded into channels per side), got {patch_size!r}")
    cfg["patch_size"] = patch_size or 1
    for key in ("scale_factor_temporal", "scale_factor_spatial", *_IGNORED_VAE_FIELDS):
        cfg.pop(key, None)
    if "temperal_downsample" in cfg:
        cfg["temporal_downsample"] = cfg.pop("temperal_downsample")
    unknown = sorted(set(cfg) - set(known))
    if unknown:
        raise ValueError(f"AutoencoderKLWan config fields not supported by CausalVAE: {', '.join(unknown)}")
    return cfg


def vae_config_from_diffusers(config: Mapping) -> VAEConfig:
    """A :class:`VAEConfig` from an ``AutoencoderKLWan.config`` (see :func:`wan_config_kwargs`).

    ``scale_factor_temporal`` / ``scale_factor_spatial``, where set, must be the architecture's factors (diffusers'
    pipelines size latents and tiles by them, the architecture sizes what the VAE returns): a ValueError names
    the field, the expected and the received value.
    """
    vc = VAEConfig(**wan_config_kwargs(config, {f.name for f in fields(VAEConfig)}))
    for key, have, why in (("scale_factor_temporal", vc.temporal_factor, "2 ** temporal downsamplings"),
                           ("scale_factor_spatial", vc.spatial_factor, "patch_size x 2 ** (len(dim_mult) - 1)")):
        got = config.get(key)
        if got is not None and got != have:
            raise ValueError(f"AutoencoderKLWan config {key}={got!r} does not match its architecture: expected "
                             f"{have} ({why})")
    return vc


def _squeezed(shape) -> tuple:
    return tuple(d for d in shape if d != 1)


def convert_wan_vae_state_dict(state_dict: Mapping[str, torch.Tensor], config: VAEConfig) -> dict:
    """diffusers ``AutoencoderKLWan`` names and shapes -> :class:`CausalVAE`'s for ``config``.

    Renames ``*.resample.1.*`` -> ``*.conv.*`` and ``*.upsamplers.0.*`` -> ``*.upsampler.*`` (Wan 2.2's residual
    stages already say ``downsampler`` / ``upsampler``, their shortcuts have no weights); reshapes
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
