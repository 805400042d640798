"""CausalVAE: the Wan2.1 video VAE (diffusers ``AutoencoderKLWan``) on sora_fast ops.

A video ``(B, 3, T, H, W)`` in [-1, 1] with ``T = 1 + tf*k`` frames becomes latents
``(B, z, 1 + k, H/sf, W/sf)`` (Wan2.1: tf = 4, sf = 8, z = 16) and back. Both directions run chunk by
chunk in time — the encoder takes the first frame, then ``tf`` frames per chunk; the decoder one latent
frame per chunk — and each causal conv hands its last input frames to the next chunk through
``causal_conv3d(cache=...)``. The result is the one of the whole video at once, and the working memory
does not grow with the number of frames (outputs are written into one preallocated tensor).

The layers (and Wan's chunk conventions) are in :mod:`~sora_fast.models.vae_blocks`.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Mapping, Optional, Union

import torch
import torch.nn as nn

from ..ops._dispatch import resolve_family_backends
from ._convert import load_converted
from .vae_blocks import (  # noqa: F401 (old home)
    AttentionBlock,
    CausalConv,
    Decoder,
    Encoder,
    MidBlock,
    Resample,
    ResidualBlock,
    RMSNorm,
    UpBlock,
    _Stream,
)

# convert_wan_vae_state_dict: from models.convert, on first use (module __getattr__ below)
__all__ = ["VAEConfig", "VAE_PRESETS", "CausalVAE", "LatentPosterior", "convert_wan_vae_state_dict"]  # noqa: F822

OPS = ("causal_conv3d", "channel_rms_norm_silu", "spacetime_attention")
WAN21_LATENTS_MEAN = (-0.7571, -0.7089, -0.9113, 0.1075, -0.1745, 0.9653, -0.1517, 1.5508,
                      0.4134, -0.0715, 0.5517, -0.3632, -0.1922, -0.9497, 0.2503, -0.2921)
WAN21_LATENTS_STD = (2.8184, 1.4541, 2.3275, 2.6558, 1.2196, 1.7708, 2.6052, 2.0743,
                     3.2687, 2.1526, 2.8652, 1.5579, 1.6382, 1.1253, 2.8251, 1.9160)


# --- config -----------------------------------------------------------------------------------
@dataclass
class VAEConfig:
    """Wan-VAE hyper-parameters, with diffusers' names (``temperal_downsample`` spelled right).

    One stage per ``dim_mult`` entry; every stage but the last halves H and W, and those flagged in
    ``temporal_downsample`` also halve time. ``latents_mean``/``latents_std`` (z values each) normalize
    latents for the DiT; None means 0 and 1.
    """
    base_dim: int = 96
    z_dim: int = 16
    dim_mult: tuple = (1, 2, 4, 4)
    num_res_blocks: int = 2
    attn_scales: tuple = ()
    temporal_downsample: tuple = (False, True, True)
    decoder_base_dim: Optional[int] = None
    dropout: float = 0.0
    in_channels: int = 3
    out_channels: int = 3
    latents_mean: Optional[tuple] = None
    latents_std: Optional[tuple] = None

    def __post_init__(self):
        for name in ("dim_mult", "attn_scales", "temporal_downsample", "latents_mean", "latents_std"):
            if getattr(self, name) is not None:
                setattr(self, name, tuple(getattr(self, name)))
        ints = {n: getattr(self, n) for n in ("base_dim", "z_dim", "num_res_blocks", "in_channels", "out_channels",
                                              "decoder_base_dim")}
        ints.update({f"dim_mult[{i}]": m for i, m in enumerate(self.dim_mult)})
        for name, v in ints.items():
            if v is not None and (isinstance(v, bool) or not isinstance(v, int) or v < 1):
                raise ValueError(f"VAEConfig.{name} must be a positive int, got {v!r}")
        if not self.dim_mult:
            raise ValueError("VAEConfig.dim_mult must hold at least one stage multiplier, got ()")
        if len(self.temporal_downsample) != len(self.dim_mult) - 1:
            raise ValueError(f"VAEConfig.temporal_downsample must hold one bool per downsampling stage "
                             f"(len(dim_mult) - 1 = {len(self.dim_mult) - 1}), got {self.temporal_downsample}")
        if self.attn_scales:  # diffusers' and Wan's chunked encoders cannot run them (no feat_cache argument)
            raise ValueError(f"VAEConfig.attn_scales must be empty (attention only in the mid blocks, as every "
                             f"released Wan VAE), got {self.attn_scales}")
        if not 0.0 <= self.dropout < 1.0:
            raise ValueError(f"VAEConfig.dropout must be in [0, 1), got {self.dropout!r}")
        for name in ("latents_mean", "latents_std"):
            v = getattr(self, name)
            if v is not None and len(v) != self.z_dim:
                raise ValueError(f"VAEConfig.{name} must hold z_dim={self.z_dim} values, got {len(v)}")
        if self.latents_std is not None and any(s == 0 for s in self.latents_std):
            raise ValueError(f"VAEConfig.latents_std must be nonzero, got {self.latents_std}")

    @property
    def temporal_factor(self) -> int:
        """Frames per latent frame (after the first): 2 ** (number of temporal downsamplings)."""
        return 2 ** sum(bool(t) for t in self.temporal_downsample)

    @property
    def spatial_factor(self) -> int:
        """Pixels per latent pixel along H and W: 2 ** (len(dim_mult) - 1)."""
        return 2 ** (len(self.dim_mult) - 1)

    @property
    def latent_channels(self) -> int:
        return self.z_dim

    @classmethod
    def from_name(cls, name: str) -> "VAEConfig":
        """A preset: ``"wan2.1"`` (4x time, 8x space, 16 channels), ``"tiny"`` (tests: 4x, 8x, 4) or
        ``"demo"`` (a CPU-trainable VAE: 2x time, 4x space, 8 channels)."""
        if name not in VAE_PRESETS:
            raise ValueError(f"unknown VAE preset {name!r}; valid names: {', '.join(sorted(VAE_PRESETS))}")
        return cls(**VAE_PRESETS[name])

    @classmethod
    def from_diffusers_config(cls, config: Mapping) -> "VAEConfig":
        """From an ``AutoencoderKLWan.config``. Wan2.2-only fields (``is_residual=True``, ``patch_size``)
        are rejected by name; ``scale_factor_*`` are ignored (the factors follow from the architecture)."""
        from .convert import vae_config_from_diffusers

        return vae_config_from_diffusers(config)


VAE_PRESETS = {
    "wan2.1": dict(latents_mean=WAN21_LATENTS_MEAN, latents_std=WAN21_LATENTS_STD),
    "tiny": dict(base_dim=8, z_dim=4, dim_mult=(1, 2, 2, 2), num_res_blocks=1),
    "demo": dict(base_dim=8, z_dim=8, dim_mult=(1, 2, 4), num_res_blocks=1, temporal_downsample=(False, True)),
}


# --- diffusers' spatial tiling (same tiles, same blending, so tiled results match too) ---------
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


def _check_chunked(chunked) -> None:
    if not isinstance(chunked, bool):
        raise TypeError(f"chunked must be a bool, got {type(chunked).__name__} {chunked!r}")


# --- the model --------------------------------------------------------------------------------
class LatentPosterior:
    """Diagonal Gaussian q(z | video) (diffusers' ``DiagonalGaussianDistribution``): ``mean``,
    ``logvar`` (clamped to [-30, 20]) and ``std``, each ``(B, z, T', h, w)``."""

    def __init__(self, mean: torch.Tensor, logvar: torch.Tensor):
        self.mean, self.logvar = mean, logvar.clamp(-30.0, 20.0)
        self.std = torch.exp(0.5 * self.logvar)

    def sample(self, generator: Optional[torch.Generator] = None) -> torch.Tensor:
        """``mean + std * eps``; eps drawn as diffusers' ``randn_tensor`` draws it (same generator, same z)."""
        device = generator.device if generator is not None else self.mean.device
        eps = torch.randn(self.mean.shape, generator=generator, device=device, dtype=self.mean.dtype)
        return self.mean + self.std * eps.to(self.mean.device)

    def kl(self) -> torch.Tensor:
        """KL(q || N(0, I)) summed over all but the batch dim: ``(B,)``."""
        return 0.5 * (self.mean.square() + self.logvar.exp() - 1.0 - self.logvar).flatten(1).sum(1)


class CausalVAE(nn.Module):
    """Wan2.1-style causal video VAE; loads diffusers ``AutoencoderKLWan`` weights (:meth:`from_diffusers`).

    ``backend``: None (auto), one backend name for every op, or a mapping from op name
    (``"causal_conv3d"``, ``"channel_rms_norm_silu"``, ``"spacetime_attention"``) to a backend; an op the
    backend lacks raises ``BackendUnavailableError``. Everything is differentiable.
    """

    def __init__(self, config: Union[VAEConfig, str, None] = None, *,
                 backend: Union[None, str, Mapping[str, Optional[str]]] = None):
        super().__init__()
        config = VAEConfig.from_name(config) if isinstance(config, str) else config or VAEConfig()
        if not isinstance(config, VAEConfig):
            raise TypeError(f"config must be a VAEConfig, a preset name or None, got {type(config).__name__}")
        self.config, self.backend, self.tiling = config, backend, None
        self._backends()  # validates backend
        self.encoder = Encoder(config)
        self.quant_conv = CausalConv(2 * config.z_dim, 2 * config.z_dim, 1)
        self.post_quant_conv = CausalConv(config.z_dim, config.z_dim, 1)
        self.decoder = Decoder(config)

    @property
    def temporal_factor(self) -> int:
        return self.config.temporal_factor

    @property
    def spatial_factor(self) -> int:
        return self.config.spatial_factor

    @property
    def latent_channels(self) -> int:
        return self.config.z_dim

    def _backends(self) -> dict:
        return resolve_family_backends(self.backend, OPS)

    # --- input checks ---
    def _check(self, name: str, t, channels: int, layout: str, frame_rule: bool, hw_multiple: int):
        if not isinstance(t, torch.Tensor):
            raise TypeError(f"{name} must be a torch.Tensor {layout}, got {type(t).__name__}")
        if not t.is_floating_point():
            raise TypeError(f"{name} must be a floating-point tensor, got dtype {t.dtype}")
        if t.dim() != 5:
            raise ValueError(f"{name} must be a 5-D tensor {layout}, got shape {tuple(t.shape)}")
        p = self.post_quant_conv.weight
        if t.device != p.device:
            raise ValueError(f"{name} must be on the model's device {p.device}, got {t.device}")
        b, c, n, h, w = t.shape
        if c != channels:
            raise ValueError(f"{name} must have {channels} channels in dim 1 {layout}, "
                             f"got {c} (shape {tuple(t.shape)})")
        tf = self.temporal_factor
        if b < 1 or n < 1 or (frame_rule and (n - 1) % tf):
            want = f"1 + {tf}k frames (1, {1 + tf}, {1 + 2 * tf}, ...)" if frame_rule else "at least 1 frame"
            raise ValueError(f"{name} must have {want} in dim 2 and a batch >= 1, got shape {tuple(t.shape)}")
        for what, size in (("height", h), ("width", w)):
            if size < 1 or size % hw_multiple:
                raise ValueError(f"{name} {what} must be a positive multiple of {hw_multiple} (the spatial factor)"
                                 f", got {size} (shape {tuple(t.shape)})" if hw_multiple > 1 else
                                 f"{name} {what} must be >= 1, got shape {tuple(t.shape)}")
        return t.to(p.dtype)

    # --- encode / decode ---
    def _encode_frames(self, x: torch.Tensor, chunked: bool = True) -> torch.Tensor:
        """(B, 3, 1 + tf*k, H, W) -> moments (B, 2z, 1 + k, H/sf, W/sf): the first frame, then tf at a time
        (``chunked=False``: all frames in one pass)."""
        if not chunked:
            s = _Stream(self._backends(), whole=True)
            return self.quant_conv(self.encoder(x, s), s)
        b, _, t, h, w = x.shape
        tf, sf, s = self.temporal_factor, self.spatial_factor, _Stream(self._backends())
        moments = x.new_empty(b, 2 * self.config.z_dim, 1 + (t - 1) // tf, h // sf, w // sf)
        for i in range(moments.shape[2]):
            chunk = x[:, :, max(0, 1 + tf * (i - 1)):1 + tf * i]                # (B, 3, 1 or tf, H, W)
            moments[:, :, i:i + 1] = self.quant_conv(self.encoder(chunk, s), s)  # (B, 2z, 1, h, w)
        return moments

    def _decode_frames(self, z: torch.Tensor, clamp: bool, chunked: bool = True) -> torch.Tensor:
        """(B, z, T', h, w) -> (B, 3, 1 + tf*(T'-1), h*sf, w*sf), one latent frame at a time
        (``chunked=False``: all frames in one pass)."""
        if not chunked:
            s = _Stream(self._backends(), whole=True)
            y = self.decoder(self.post_quant_conv(z, s), s)
            return y.clamp(-1.0, 1.0) if clamp else y
        b, _, t, h, w = z.shape
        tf, sf, s = self.temporal_factor, self.spatial_factor, _Stream(self._backends())
        out = z.new_empty(b, self.config.out_channels, 1 + tf * (t - 1), h * sf, w * sf)
        for i in range(t):
            y = self.decoder(self.post_quant_conv(z[:, :, i:i + 1], s), s)      # (B, 3, 1 or tf, H, W)
            out[:, :, max(0, 1 + tf * (i - 1)):1 + tf * i] = y.clamp(-1.0, 1.0) if clamp else y
        return out

    def encode_posterior(self, video: torch.Tensor, *, chunked: bool = True) -> LatentPosterior:
        """q(z | video) for ``video`` ``(B, 3, 1 + tf*k, H, W)`` in [-1, 1]; mean/std ``(B, z, 1 + k, H/sf, W/sf)``.

        ``chunked``: stream the video through chunk by chunk (the first frame, then ``tf`` at a time), as
        Wan does, so memory does not grow with the duration; ``False`` runs every frame in one pass — the
        same result up to rounding, fewer and larger convolutions (faster for short clips; training uses it),
        activation memory for the whole clip."""
        _check_chunked(chunked)
        x = self._check("video", video, self.config.in_channels, f"(B, {self.config.in_channels}, T, H, W)",
                        True, self.spatial_factor)
        tl = self.tiling
        if tl is not None and (x.shape[3] > tl[0] or x.shape[4] > tl[1]):
            sf = self.spatial_factor
            moments = tiled(x, lambda t: self._encode_frames(t, chunked), tl[:2], tl[2:], [v // sf for v in tl[:2]],
                             [v // sf for v in tl[2:]], [v // sf for v in x.shape[3:]])
        else:
            moments = self._encode_frames(x, chunked)
        return LatentPosterior(*moments.chunk(2, dim=1))

    def encode(self, video: torch.Tensor, *, sample: bool = False,
               generator: Optional[torch.Generator] = None, chunked: bool = True) -> torch.Tensor:
        """Latents ``(B, z, 1 + (T-1)/tf, H/sf, W/sf)`` of ``video`` ``(B, 3, T, H, W)`` in [-1, 1]: the
        posterior mean, or a sample of it with ``sample=True`` (drawn from ``generator``); ``chunked`` as in
        :meth:`encode_posterior`."""
        posterior = self.encode_posterior(video, chunked=chunked)
        return posterior.sample(generator) if sample else posterior.mean

    def decode(self, latent: torch.Tensor, *, clamp: bool = True, chunked: bool = True) -> torch.Tensor:
        """Video ``(B, 3, 1 + tf*(T'-1), h*sf, w*sf)`` from latents ``(B, z, T', h, w)``, clamped to
        [-1, 1] unless ``clamp=False`` (training may want the gradient beyond the range). ``chunked``: one
        latent frame at a time, or (``False``) all in one pass, as in :meth:`encode_posterior`."""
        _check_chunked(chunked)
        z = self._check("latent", latent, self.config.z_dim, f"(B, {self.config.z_dim}, T', h, w)", False, 1)
        tl, sf = self.tiling, self.spatial_factor
        if tl is not None and (z.shape[3] > tl[0] // sf or z.shape[4] > tl[1] // sf):
            out = tiled(z, lambda t: self._decode_frames(t, False, chunked), [v // sf for v in tl[:2]],
                         [v // sf for v in tl[2:]], tl[:2], tl[2:], [v * sf for v in z.shape[3:]])
            return out.clamp(-1.0, 1.0) if clamp else out
        return self._decode_frames(z, clamp, chunked)

    def forward(self, video: torch.Tensor, *, sample_posterior: bool = False,
                generator: Optional[torch.Generator] = None) -> torch.Tensor:
        """Reconstruction ``(B, 3, T, H, W)`` of ``video``: decode(encode(video))."""
        return self.decode(self.encode(video, sample=sample_posterior, generator=generator))

    def enable_tiling(self, tile_sample_min_height: int = 256, tile_sample_min_width: int = 256,
                      tile_sample_stride_height: int = 192, tile_sample_stride_width: int = 192) -> None:
        """Spatial tiling as diffusers' ``enable_tiling`` (same arguments, defaults and blending): frames
        larger than the tile are processed in overlapping tiles whose overlaps fade linearly."""
        args = dict(tile_sample_min_height=tile_sample_min_height, tile_sample_min_width=tile_sample_min_width,
                    tile_sample_stride_height=tile_sample_stride_height,
                    tile_sample_stride_width=tile_sample_stride_width)
        sf = self.spatial_factor
        for name, v in args.items():
            if isinstance(v, bool) or not isinstance(v, int) or v < sf or v % sf:
                raise ValueError(f"{name} must be a positive multiple of the spatial factor {sf}, got {v!r}")
        for dim in ("height", "width"):
            if args[f"tile_sample_stride_{dim}"] > args[f"tile_sample_min_{dim}"]:
                raise ValueError(f"tile_sample_stride_{dim} must be <= tile_sample_min_{dim} "
                                 f"({args[f'tile_sample_min_{dim}']}), got {args[f'tile_sample_stride_{dim}']}")
        self.tiling = tuple(args.values())

    def disable_tiling(self) -> None:
        self.tiling = None

    # --- latent normalization (as diffusers' Wan pipelines) ---
    def _stats(self, z: torch.Tensor):
        z = self._check("latents", z, self.config.z_dim, f"(B, {self.config.z_dim}, T', h, w)", False, 1)
        c = self.config
        mean = torch.tensor(c.latents_mean or [0.0] * c.z_dim).view(1, -1, 1, 1, 1).to(z.device, z.dtype)
        inv_std = 1.0 / torch.tensor(c.latents_std or [1.0] * c.z_dim).view(1, -1, 1, 1, 1).to(z.device, z.dtype)
        return z, mean, inv_std

    def normalize_latents(self, latents: torch.Tensor) -> torch.Tensor:
        """``(latents - latents_mean) / latents_std`` per channel: what the DiT trains on."""
        z, mean, inv_std = self._stats(latents)
        return (z - mean) * inv_std

    def denormalize_latents(self, latents: torch.Tensor) -> torch.Tensor:
        """Inverse of :meth:`normalize_latents`, applied to DiT outputs before :meth:`decode`."""
        z, mean, inv_std = self._stats(latents)
        return z / inv_std + mean

    # --- diffusers ---
    @classmethod
    def from_diffusers(cls, vae: nn.Module, *, backend=None) -> "CausalVAE":
        """The same model as a diffusers ``AutoencoderKLWan`` (weights copied, its dtype and device)."""
        if not hasattr(vae, "config") or not hasattr(vae, "state_dict"):
            raise TypeError(f"vae must be a diffusers AutoencoderKLWan, got {type(vae).__name__}")
        from .convert import convert_wan_vae_state_dict

        config = VAEConfig.from_diffusers_config(vae.config)
        p = next(vae.parameters())
        model = cls(config, backend=backend).to(device=p.device, dtype=p.dtype)
        load_converted(model, convert_wan_vae_state_dict(vae.state_dict(), config),
                       "the diffusers AutoencoderKLWan state dict")
        return model.train(vae.training)


def __getattr__(name: str):
    # the converter lives in models.convert, which imports this module: re-exported on first use
    if name == "convert_wan_vae_state_dict":
        from .convert import convert_wan_vae_state_dict

        return convert_wan_vae_state_dict
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
