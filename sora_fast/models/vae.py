"""CausalVAE: the Wan 2.1 and Wan 2.2 video VAEs (diffusers ``AutoencoderKLWan``) on sora_fast ops.

A video ``(B, 3, T, H, W)`` in [-1, 1] with ``T = 1 + tf*k`` frames becomes latents
``(B, z, 1 + k, H/sf, W/sf)`` (Wan 2.1: tf = 4, sf = 8, z = 16; Wan 2.2 TI2V-5B: tf = 4, sf = 16, z = 48) and
back. Wan 2.2's VAE first folds each 2x2 block of pixels into channels (``patch_size``) and gives every stage a
parameter-free shortcut (``residual``). Both directions run chunk by
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
    patchify,
    unpatchify,
)

# convert_wan_vae_state_dict: from models.convert, on first use (module __getattr__ below)
__all__ = ["VAEConfig", "VAE_PRESETS", "CausalVAE", "LatentPosterior", "convert_wan_vae_state_dict"]  # noqa: F822

OPS = ("causal_conv3d", "channel_rms_norm_silu", "spacetime_attention")
WAN21_LATENTS_MEAN = (-0.7571, -0.7089, -0.9113, 0.1075, -0.1745, 0.9653, -0.1517, 1.5508,
                      0.4134, -0.0715, 0.5517, -0.3632, -0.1922, -0.9497, 0.2503, -0.2921)
WAN21_LATENTS_STD = (2.8184, 1.4541, 2.3275, 2.6558, 1.2196, 1.7708, 2.6052, 2.0743,
                     3.2687, 2.1526, 2.8652, 1.5579, 1.6382, 1.1253, 2.8251, 1.9160)
WAN22_LATENTS_MEAN = (-0.2289, -0.0052, -0.1323, -0.2339, -0.2799, 0.0174, 0.1838, 0.1557, -0.1382, 0.0542, 0.2813,
                      0.0891, 0.1570, -0.0098, 0.0375, -0.1825, -0.2246, -0.1207, -0.0698, 0.5109, 0.2665, -0.2108,
                      -0.2158, 0.2502, -0.2055, -0.0322, 0.1109, 0.1567, -0.0729, 0.0899, -0.2799, -0.1230, -0.0313,
                      -0.1649, 0.0117, 0.0723, -0.2839, -0.2083, -0.0520, 0.3748, 0.0152, 0.1957, 0.1433, -0.2944,
                      0.3573, -0.0548, -0.1681, -0.0667)
WAN22_LATENTS_STD = (0.4765, 1.0364, 0.4514, 1.1677, 0.5313, 0.4990, 0.4818, 0.5013, 0.8158, 1.0344, 0.5894, 1.0901,
                     0.6885, 0.6165, 0.8454, 0.4978, 0.5759, 0.3523, 0.7135, 0.6804, 0.5833, 1.4146, 0.8986, 0.5659,
                     0.7069, 0.5338, 0.4889, 0.4917, 0.4069, 0.4999, 0.6866, 0.4093, 0.5709, 0.6065, 0.6415, 0.4944,
                     0.5726, 1.2042, 0.5458, 1.6887, 0.3971, 1.0600, 0.3943, 0.5537, 0.5444, 0.4089, 0.7468, 0.7744)


# --- config -----------------------------------------------------------------------------------
@dataclass
class VAEConfig:
    """Wan-VAE hyper-parameters, with diffusers' names (``temperal_downsample`` spelled right).

    One stage per ``dim_mult`` entry; every stage but the last halves H and W, and those flagged in
    ``temporal_downsample`` also halve time. ``latents_mean``/``latents_std`` (z values each) normalize
    latents for the DiT; None means 0 and 1.

    Wan 2.2 (TI2V-5B) adds two fields, off by default: ``patch_size`` p folds each p x p block of pixels into
    channels before the encoder and back after the decoder (``in_channels``/``out_channels`` count the folded
    channels, as diffusers': 3·p² for RGB), and ``residual`` makes each stage one block with a parameter-free
    shortcut (diffusers' ``is_residual``: channel-group averages down, repeats up; the decoder's upsamplers then
    keep their channels).
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
    residual: bool = False
    patch_size: int = 1

    def __post_init__(self):
        for name in ("dim_mult", "attn_scales", "temporal_downsample", "latents_mean", "latents_std"):
            if getattr(self, name) is not None:
                setattr(self, name, tuple(getattr(self, name)))
        ints = {n: getattr(self, n) for n in ("base_dim", "z_dim", "num_res_blocks", "in_channels", "out_channels",
                                              "decoder_base_dim", "patch_size")}
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
        if not isinstance(self.residual, bool):
            raise ValueError(f"VAEConfig.residual must be a bool, got {self.residual!r}")
        p2 = self.patch_size ** 2
        for name in ("in_channels", "out_channels"):
            if getattr(self, name) % p2:
                raise ValueError(f"VAEConfig.{name} must be a multiple of patch_size**2 = {p2} (video channels x "
                                 f"{self.patch_size}x{self.patch_size} folded pixels), got {getattr(self, name)}")
        if self.residual:
            self._check_shortcuts()

    def _check_shortcuts(self) -> None:
        """Each residual shortcut spreads channel x (time x) 2 x 2 values over the stage's output channels
        evenly (down: cout divides cin·factor; up: cin divides cout·factor), as diffusers requires."""
        n, down = len(self.dim_mult), [self.base_dim * m for m in (1, *self.dim_mult)]
        up = [(self.decoder_base_dim or self.base_dim) * m for m in (self.dim_mult[-1], *self.dim_mult[::-1])]
        for i in range(n):
            last = i == n - 1
            f = 1 if last else 4 * (2 if self.temporal_downsample[i] else 1)
            if down[i] * f % down[i + 1]:
                raise ValueError(f"VAEConfig: residual encoder stage {i} averages {down[i]} channels x {f} pixels "
                                 f"into {down[i + 1]} channels, expected {down[i + 1]} to divide {down[i] * f} "
                                 f"(base_dim={self.base_dim}, dim_mult={self.dim_mult})")
            f = 4 * (2 if self.temporal_downsample[::-1][i] else 1) if not last else 0
            if f and up[i + 1] * f % up[i]:
                raise ValueError(f"VAEConfig: residual decoder stage {i} repeats {up[i]} channels over {f} pixels "
                                 f"of {up[i + 1]} channels, expected {up[i]} to divide {up[i + 1] * f} "
                                 f"(decoder_base_dim={self.decoder_base_dim or self.base_dim}, "
                                 f"dim_mult={self.dim_mult})")

    @property
    def temporal_factor(self) -> int:
        """Frames per latent frame (after the first): 2 ** (number of temporal downsamplings)."""
        return 2 ** sum(bool(t) for t in self.temporal_downsample)

    @property
    def spatial_factor(self) -> int:
        """Pixels per latent pixel along H and W: patch_size * 2 ** (len(dim_mult) - 1)."""
        return self.patch_size * 2 ** (len(self.dim_mult) - 1)

    @property
    def latent_channels(self) -> int:
        return self.z_dim

    @property
    def video_in_channels(self) -> int:
        """Channels of the videos :meth:`CausalVAE.encode` takes: in_channels / patch_size²."""
        return self.in_channels // self.patch_size ** 2

    @property
    def video_out_channels(self) -> int:
        """Channels of the videos :meth:`CausalVAE.decode` returns: out_channels / patch_size²."""
        return self.out_channels // self.patch_size ** 2

    @classmethod
    def from_name(cls, name: str) -> "VAEConfig":
        """A preset: ``"wan2.1"`` (4x time, 8x space, 16 channels), ``"wan2.2"`` (TI2V-5B's residual VAE: 4x,
        16x, 48), ``"tiny"`` (tests: 4x, 8x, 4) or ``"demo"`` (a CPU-trainable VAE: 2x time, 4x space, 8 channels)."""
        if name not in VAE_PRESETS:
            raise ValueError(f"unknown VAE preset {name!r}; valid names: {', '.join(sorted(VAE_PRESETS))}")
        return cls(**VAE_PRESETS[name])

    @classmethod
    def from_diffusers_config(cls, config: Mapping) -> "VAEConfig":
        """From an ``AutoencoderKLWan.config`` (Wan 2.1 or 2.2: ``is_residual`` -> ``residual``, ``patch_size``
        None -> 1). ``scale_factor_*`` must equal the architecture's factors; fields CausalVAE does not reproduce
        are ValueErrors naming them (:func:`~sora_fast.models.convert.wan_config_kwargs`)."""
        from .convert import vae_config_from_diffusers

        return vae_config_from_diffusers(config)


VAE_PRESETS = {
    "wan2.1": dict(latents_mean=WAN21_LATENTS_MEAN, latents_std=WAN21_LATENTS_STD),
    "wan2.2": dict(base_dim=160, decoder_base_dim=256, z_dim=48, in_channels=12, out_channels=12, residual=True,
                   patch_size=2, latents_mean=WAN22_LATENTS_MEAN, latents_std=WAN22_LATENTS_STD),
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
    """Wan-style causal video VAE (Wan 2.1, and Wan 2.2's residual, patchified one); loads diffusers
    ``AutoencoderKLWan`` weights (:meth:`from_diffusers`).

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
        """(B, 3, 1 + tf*k, H, W) -> moments (B, 2z, 1 + k, H/sf, W/sf): the first frame, then tf at a time, each
        chunk patchified on its own (``chunked=False``: all frames in one pass)."""
        p = self.config.patch_size
        if not chunked:
            s = _Stream(self._backends(), whole=True)
            return self.quant_conv(self.encoder(patchify(x, p), s), s)
        b, _, t, h, w = x.shape
        tf, sf, s = self.temporal_factor, self.spatial_factor, _Stream(self._backends())
        moments = x.new_empty(b, 2 * self.config.z_dim, 1 + (t - 1) // tf, h // sf, w // sf)
        for i in range(moments.shape[2]):
            chunk = patchify(x[:, :, max(0, 1 + tf * (i - 1)):1 + tf * i], p)   # (B, Cin, 1 or tf, H/p, W/p)
            moments[:, :, i:i + 1] = self.quant_conv(self.encoder(chunk, s), s)  # (B, 2z, 1, h, w)
        return moments

    def _decode_frames(self, z: torch.Tensor, clamp: bool, chunked: bool = True, unpatch: bool = True) -> torch.Tensor:
        """(B, z, T', h, w) -> (B, 3, 1 + tf*(T'-1), h*sf, w*sf), one latent frame at a time
        (``chunked=False``: all frames in one pass); ``unpatch=False``: the decoder's patchified output
        (B, out_channels, ..., h*sf/p, w*sf/p)."""
        p = self.config.patch_size if unpatch else 1
        if not chunked:
            s = _Stream(self._backends(), whole=True)
            y = unpatchify(self.decoder(self.post_quant_conv(z, s), s), p)
            return y.clamp(-1.0, 1.0) if clamp else y
        b, _, t, h, w = z.shape
        tf, sf, s = self.temporal_factor, self.spatial_factor // self.config.patch_size * p, _Stream(self._backends())
        out = z.new_empty(b, self.config.out_channels // p ** 2, 1 + tf * (t - 1), h * sf, w * sf)
        for i in range(t):
            y = self.decoder(self.post_quant_conv(z[:, :, i:i + 1], s), s)      # (B, Cout, 1 or tf, H/p, W/p)
            y = unpatchify(y, p)                                                # (B, 3, 1 or tf, H, W)
            out[:, :, max(0, 1 + tf * (i - 1)):1 + tf * i] = y.clamp(-1.0, 1.0) if clamp else y
        return out

    def encode_posterior(self, video: torch.Tensor, *, chunked: bool = True) -> LatentPosterior:
        """q(z | video) for ``video`` ``(B, 3, 1 + tf*k, H, W)`` in [-1, 1]; mean/std ``(B, z, 1 + k, H/sf, W/sf)``.

        ``chunked``: stream the video through chunk by chunk (the first frame, then ``tf`` at a time), as
        Wan does, so memory does not grow with the duration; ``False`` runs every frame in one pass — the
        same result up to rounding, fewer and larger convolutions (faster for short clips; training uses it),
        activation memory for the whole clip."""
        _check_chunked(chunked)
        c = self.config.video_in_channels
        x = self._check("video", video, c, f"(B, {c}, T, H, W)", True, self.spatial_factor)
        tl = self.tiling
        if tl is not None and (x.shape[3] > tl[0] or x.shape[4] > tl[1]):
            # as diffusers, whose tiles are laid on the patchified video: p times the sizes in pixels
            sf, p = self.spatial_factor, self.config.patch_size
            moments = tiled(x, lambda t: self._encode_frames(t, chunked), [v * p for v in tl[:2]],
                            [v * p for v in tl[2:]], [v * p // sf for v in tl[:2]], [v * p // sf for v in tl[2:]],
                            [v // sf for v in x.shape[3:]])
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
        tl, sf, p = self.tiling, self.spatial_factor, self.config.patch_size
        if tl is not None and (z.shape[3] > tl[0] // sf or z.shape[4] > tl[1] // sf):
            # as diffusers: tiles of tl/sf latents, blended in the decoder's patchified output, then unfolded
            out = tiled(z, lambda t: self._decode_frames(t, False, chunked, unpatch=False), [v // sf for v in tl[:2]],
                        [v // sf for v in tl[2:]], [v // p for v in tl[:2]], [v // p for v in tl[2:]],
                        [v * sf // p for v in z.shape[3:]])
            out = unpatchify(out, p)
            return out.clamp(-1.0, 1.0) if clamp else out
        return self._decode_frames(z, clamp, chunked)

    def forward(self, video: torch.Tensor, *, sample_posterior: bool = False,
                generator: Optional[torch.Generator] = None) -> torch.Tensor:
        """Reconstruction ``(B, 3, T, H, W)`` of ``video``: decode(encode(video))."""
        return self.decode(self.encode(video, sample=sample_posterior, generator=generator))

    def enable_tiling(self, tile_sample_min_height: int = 256, tile_sample_min_width: int = 256,
                      tile_sample_stride_height: int = 192, tile_sample_stride_width: int = 192) -> None:
        """Spatial tiling as diffusers' ``enable_tiling`` (same arguments, defaults and blending): frames
        larger than the tile are processed in overlapping tiles whose overlaps fade linearly. With
        ``patch_size`` p (Wan 2.2) encoding lays them on the patchified video, as diffusers does: its tiles and
        strides are p times these sizes in pixels."""
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
