"""diffusers ``AutoencoderKLWan`` compatibility for :class:`~sora_fast.models.vae.CausalVAE`: config fields,
weights, and diffusers' spatial tiling algorithm (so tiled results match too)."""
from __future__ import annotations

import re
from typing import Callable, Iterable, Mapping

import torch

__all__ = ["wan_config_kwargs", "convert_wan_vae_state_dict", "tiled"]


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


def _squeezed(shape) -> tuple:
    return tuple(d for d in shape if d != 1)


def convert_wan_vae_state_dict(state_dict: Mapping[str, torch.Tensor], config) -> dict:
    """diffusers ``AutoencoderKLWan`` names and shapes -> :class:`CausalVAE`'s for ``config`` (a VAEConfig).

    Renames ``*.resample.1.*`` -> ``*.conv.*`` and ``*.upsamplers.0.*`` -> ``*.upsampler.*``; reshapes
    where only unit dims differ: norm gammas ``(C, 1, 1[, 1])`` -> ``(C,)``, the resamplers' Conv2d
    ``(O, I, 3, 3)`` -> ``(O, I, 1, 3, 3)``, the attention's 1x1 Conv2d -> Linear. Other keys pass
    unchanged, so :func:`~sora_fast.models._convert.load_converted` names whatever does not fit.
    """
    from .vae import CausalVAE

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


def _blend(a: torch.Tensor, b: torch.Tensor, extent: int, dim: int) -> torch.Tensor:
    """b with its first ``extent`` rows (dim=-2) or columns (dim=-1) faded in linearly from a's last
    ones, as diffusers' ``blend_v``/``blend_h`` (same weights, same rounding)."""
    n = min(a.shape[dim], b.shape[dim], extent)
    if n <= 0:
        return b
    r = torch.arange(n, dtype=torch.float64) / n
    shape = [n if d == b.dim() + dim else 1 for d in range(b.dim())]
    wa, wb = ((1 - r).to(b), r.to(b))
    mixed = a.narrow(dim, a.shape[dim] - n, n) * wa.view(shape) + b.narrow(dim, 0, n) * wb.view(shape)
    return torch.cat([mixed, b.narrow(dim, n, b.shape[dim] - n)], dim=dim)


def tiled(x: torch.Tensor, fn: Callable, tile, stride, out_tile, out_stride, out_hw) -> torch.Tensor:
    """diffusers' spatial tiling: ``fn`` on ``tile`` windows every ``stride`` pixels of x; each result
    fades into its upper and left neighbours over ``out_tile - out_stride`` pixels, then keeps its
    top-left ``out_stride`` block."""
    h, w = x.shape[-2:]
    rows = [[fn(x[..., i:i + tile[0], j:j + tile[1]]) for j in range(0, w, stride[1])]
            for i in range(0, h, stride[0])]
    out = []
    for i, row in enumerate(rows):
        for j in range(len(row)):  # neighbours are already blended, as in diffusers' in-place loop
            if i > 0:
                row[j] = _blend(rows[i - 1][j], row[j], out_tile[0] - out_stride[0], dim=-2)
            if j > 0:
                row[j] = _blend(row[j - 1], row[j], out_tile[1] - out_stride[1], dim=-1)
        out.append(torch.cat([t[..., :out_stride[0], :out_stride[1]] for t in row], dim=-1))
    return torch.cat(out, dim=-2)[..., :out_hw[0], :out_hw[1]]
