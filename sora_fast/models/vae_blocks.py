"""The layers of :class:`~sora_fast.models.vae.CausalVAE` (Wan 2.1's VAE and Wan 2.2's residual one), each
streaming a video chunk by chunk.

Wan's chunk conventions, reproduced exactly:
- a k=3 causal conv sees zeros before the first frame, then the stream's previous frames;
- downsample3d (time stride 2, no padding) passes the first chunk through; output m >= 1 covers the
  stream frames 2m-2 .. 2m;
- upsample3d passes the first chunk through and time-convolves the stream of the later chunks (zeros in
  front), doubling their frames.
Wan 2.2's residual stages add a parameter-free shortcut around each stage (diffusers' ``AvgDown3D`` /
``DupUp3D``): channel groups averaged over 2x2(x2) blocks on the way down -- a chunk of odd length gets a zero
frame in front, so the first frame pairs with zeros --, and each value repeated over the block on the way up,
the first chunk keeping only the last of its time copies (as upsample3d keeps one frame there). Both are
per chunk: no state crosses chunks, since every chunk after the first has an even number of frames.
"""
from __future__ import annotations

import math
from typing import TYPE_CHECKING, Optional

import torch
import torch.nn as nn
import torch.nn.functional as F

from ..ops import causal_conv3d, causal_conv3d_next_cache, channel_rms_norm_silu, spacetime_attention
from ..ops._dispatch import resolve_backend
from ..ops.conv3d import PackedConv3dWeight

if TYPE_CHECKING:
    from .vae import VAEConfig

__all__ = ["CausalConv", "RMSNorm", "ResidualBlock", "AttentionBlock", "Resample", "MidBlock", "Encoder",
           "UpBlock", "Decoder", "ResidualDownBlock", "ResidualUpBlock", "patchify", "unpatchify"]


class _Stream:
    """One video going through chunk by chunk: each causal conv's cache (its last input frames; for the
    time resamplers, that the first chunk has passed) and the backend of each op. ``whole``: the video
    goes through in one piece instead (every frame at once; the time resamplers then do what the chunks
    would have done, so the result is the same up to rounding)."""

    def __init__(self, backends: dict, whole: bool = False):
        self.cache: dict = {}
        self.backends = backends
        self.whole = whole


class CausalConv(nn.Module):
    """Wan's causal conv (zeros before the first frame) on :func:`causal_conv3d`; ``forward`` streams."""

    def __init__(self, cin: int, cout: int, kernel, stride=1, padding=None):
        super().__init__()
        kernel = (kernel,) * 3 if isinstance(kernel, int) else tuple(kernel)
        self.stride, self.padding = stride, padding
        self.weight = nn.Parameter(torch.empty(cout, cin, *kernel))
        self.bias = nn.Parameter(torch.empty(cout))
        nn.init.kaiming_uniform_(self.weight, a=math.sqrt(5))  # nn.Conv3d's default init
        bound = (cin * math.prod(kernel)) ** -0.5
        nn.init.uniform_(self.bias, -bound, bound)
        self.packed_weight = PackedConv3dWeight()  # the triton kernel's weight layout, repacked when weight changes

    @staticmethod
    def _layout(s: _Stream, *tensors):
        """The triton kernel reads and writes channels-last: hand it its operands in that layout (a copy only
        where a layout-changing op came before; none when already so), and its output stays channels-last
        for the norms, residual adds and the next conv. Other backends take the tensors as they are."""
        t0 = next(t for t in tensors if t is not None)
        if resolve_backend("causal_conv3d", s.backends["causal_conv3d"], t0.device) != "triton":
            return tensors
        return tuple(None if t is None else t.contiguous(memory_format=torch.channels_last_3d) for t in tensors)

    def conv(self, x, s: _Stream, cache=None, residual=None):
        backend = s.backends["causal_conv3d"]
        x, cache, residual = self._layout(s, x, cache, residual)
        return causal_conv3d(x, self.weight, self.bias, stride=self.stride, padding=self.padding, cache=cache,
                             residual=residual, packed_weight=self.packed_weight(self.weight, backend), backend=backend)

    def forward(self, x, s: _Stream, residual=None):
        """The next chunk of the stream ``(B, Cin, t, h, w)``; ``residual`` is added to the output."""
        kt = self.weight.shape[2]
        if kt == 1:
            return self.conv(x, s, residual=residual)
        x, = self._layout(s, x)        # so the next chunk's cache is in the kernel's layout too
        cache = s.cache.get(self)
        out = self.conv(x, s, cache, residual)
        s.cache[self] = causal_conv3d_next_cache(x, cache, kt)  # not detached: gradients cross chunks
        return out


class RMSNorm(nn.Module):
    """Wan's ``RMS_norm`` over channels (``F.normalize * sqrt(C) * gamma``), fused with SiLU if ``silu``."""

    def __init__(self, dim: int, silu: bool = True):
        super().__init__()
        self.silu = silu
        self.gamma = nn.Parameter(torch.ones(dim))

    def forward(self, x, s: _Stream):
        return channel_rms_norm_silu(x, self.gamma, silu=self.silu, backend=s.backends["channel_rms_norm_silu"])


class ResidualBlock(nn.Module):
    def __init__(self, cin: int, cout: int, dropout: float):
        super().__init__()
        self.norm1, self.conv1 = RMSNorm(cin), CausalConv(cin, cout, 3)
        self.norm2, self.conv2 = RMSNorm(cout), CausalConv(cout, cout, 3)
        self.conv_shortcut = CausalConv(cin, cout, 1) if cin != cout else None
        self.dropout = dropout

    def forward(self, x, s):                                                   # x: (B, Cin, t, h, w)
        h = x if self.conv_shortcut is None else self.conv_shortcut(x, s)       # (B, Cout, t, h, w)
        y = self.conv1(self.norm1(x, s), s)                                     # (B, Cout, t, h, w)
        y = self.norm2(y, s)
        if self.dropout and self.training:
            y = F.dropout(y, self.dropout, True)
        return self.conv2(y, s, residual=h)                                     # conv2(y) + h


class AttentionBlock(nn.Module):
    """Single-head self-attention inside each frame (the h*w pixels), one packed sequence per frame."""

    def __init__(self, dim: int):
        super().__init__()
        self.norm = RMSNorm(dim, silu=False)
        self.to_qkv, self.proj = nn.Linear(dim, 3 * dim), nn.Linear(dim, dim)

    def forward(self, x, s):                                                   # x: (B, C, t, h, w)
        b, c, t, h, w = x.shape
        y = self.norm(x, s).permute(0, 2, 3, 4, 1).reshape(b * t * h * w, c)     # (N, C), frame after frame
        q, k, v = self.to_qkv(y).view(-1, 3, 1, c).unbind(1)                    # 3 x (N, 1, C)
        cu = torch.arange(b * t + 1, device=x.device, dtype=torch.int32) * (h * w)  # (B*t + 1,)
        o = spacetime_attention(q, k, v, cu, max_seqlen_q=h * w, backend=s.backends["spacetime_attention"])
        o = self.proj(o.reshape(-1, c))                                         # (N, C)
        return x + o.view(b, t, h, w, c).permute(0, 4, 1, 2, 3)                 # (B, C, t, h, w)


class Resample(nn.Module):
    """2x resampling: a per-frame 3x3 conv after nearest 2x upsampling (C -> ``out_dim``, default C/2), or
    with stride 2 after a right/bottom zero pad; the *3d modes add Wan's causal time conv."""

    def __init__(self, dim: int, mode: str, out_dim: Optional[int] = None):
        super().__init__()
        self.mode, up = mode, mode.startswith("up")
        self.conv = CausalConv(dim, (out_dim or dim // 2) if up else dim, (1, 3, 3), stride=1 if up else (1, 2, 2),
                               padding=1 if up else 0)
        self.time_conv = (CausalConv(dim, 2 * dim, (3, 1, 1)) if mode == "upsample3d" else
                          CausalConv(dim, dim, (3, 1, 1), stride=(2, 1, 1)) if mode == "downsample3d" else None)

    def forward(self, x, s, residual=None):                                    # x: (B, C, t, h, w)
        """``residual`` (the output's shape) is added to the output (in the last conv's epilogue where it can)."""
        if self.mode == "upsample3d":
            x = self._time_up(x, s)                                             # (B, C, 2t, h, w) (t: first chunk)
        if self.mode.startswith("up"):
            x = F.interpolate(x, scale_factor=(1.0, 2.0, 2.0), mode="nearest-exact")  # (B, C, t, 2h, 2w)
            return self.conv(x, s, residual=residual)                           # (B, C/2, t, 2h, 2w)
        if self.mode == "downsample2d":  # the op pads only symmetrically: the right/bottom zero pad is explicit
            return self.conv(F.pad(x, (0, 1, 0, 1)), s, residual=residual)      # (B, C, t, h/2, w/2)
        x = self._time_down(self.conv(F.pad(x, (0, 1, 0, 1)), s), s)            # (B, C, t/2, h/2, w/2)
        return x if residual is None else x + residual

    def _time_up(self, x, s):
        if s.whole:   # frame 0 passes as the first chunk would; the rest as the later chunks (t' -> 1 + 2(t'-1))
            if x.shape[2] == 1:
                return x
            return torch.cat([x[:, :, :1], self._interleave(self.time_conv(x[:, :, 1:], s))], dim=2)
        if self not in s.cache:                                                 # the first chunk passes
            s.cache[self] = True
            return x
        return self._interleave(self.time_conv(x, s))

    @staticmethod
    def _interleave(y):
        """(B, 2C, t, h, w) -> (B, C, 2t, h, w): each frame's two halves of channels become two frames."""
        b, c2, t, h, w = y.shape
        return y.reshape(b, 2, c2 // 2, t, h, w).permute(0, 2, 3, 1, 4, 5).reshape(b, c2 // 2, 2 * t, h, w)

    def _time_down(self, x, s):
        if s.whole:   # frame 0 passes; output m >= 1 covers frames 2m-2 .. 2m (1 + 2k -> 1 + k frames)
            if x.shape[2] == 1:
                return x
            return torch.cat([x[:, :, :1], self.time_conv.conv(x[:, :, 2:], s, cache=x[:, :, :2])], dim=2)
        prev = s.cache.get(self)
        s.cache[self] = x[:, :, -1:].clone()
        if prev is None:                                                        # the first chunk passes
            return x
        # output m covers stream frames 2m-2 .. 2m: convolve x[1:] with the two frames before it as cache
        return self.time_conv.conv(x[:, :, 1:], s, cache=torch.cat([prev, x[:, :, :1]], dim=2))


class MidBlock(nn.Module):
    def __init__(self, dim: int, dropout: float):
        super().__init__()
        self.resnets = nn.ModuleList([ResidualBlock(dim, dim, dropout) for _ in range(2)])
        self.attentions = nn.ModuleList([AttentionBlock(dim)])

    def forward(self, x, s):
        return self.resnets[1](self.attentions[0](self.resnets[0](x, s), s), s)


class Encoder(nn.Module):
    def __init__(self, c: VAEConfig):
        super().__init__()
        dims = [c.base_dim * m for m in (1, *c.dim_mult)]
        self.conv_in = CausalConv(c.in_channels, dims[0], 3)
        blocks = []
        for i, (cin, cout) in enumerate(zip(dims[:-1], dims[1:])):
            mode = None if i == len(c.dim_mult) - 1 else "downsample3d" if c.temporal_downsample[i] else "downsample2d"
            if c.residual:      # Wan 2.2: one block per stage, its shortcut around the resampler too
                blocks.append(ResidualDownBlock(cin, cout, c.num_res_blocks, c.dropout, mode))
                continue
            blocks += [ResidualBlock(cin if j == 0 else cout, cout, c.dropout) for j in range(c.num_res_blocks)]
            if mode:
                blocks.append(Resample(cout, mode))
        self.down_blocks = nn.ModuleList(blocks)
        self.mid_block = MidBlock(dims[-1], c.dropout)
        self.norm_out = RMSNorm(dims[-1])
        self.conv_out = CausalConv(dims[-1], 2 * c.z_dim, 3)

    def forward(self, x, s):                                                   # x: (B, Cin, t, H, W), one chunk
        x = self.conv_in(x, s)                                                  # (B, d0, t, H, W)
        for block in self.down_blocks:
            x = block(x, s)                                                     # ... (B, dL, 1, H/sf, W/sf)
        return self.conv_out(self.norm_out(self.mid_block(x, s), s), s)          # (B, 2z, 1, H/sf, W/sf)


class UpBlock(nn.Module):
    def __init__(self, cin: int, cout: int, num_res_blocks: int, dropout: float, mode: Optional[str]):
        super().__init__()
        self.resnets = nn.ModuleList([ResidualBlock(cin if i == 0 else cout, cout, dropout)
                                      for i in range(num_res_blocks + 1)])
        self.upsampler = Resample(cout, mode) if mode else None

    def forward(self, x, s):
        for resnet in self.resnets:
            x = resnet(x, s)
        return x if self.upsampler is None else self.upsampler(x, s)


class Decoder(nn.Module):
    def __init__(self, c: VAEConfig):
        super().__init__()
        base, n = c.decoder_base_dim or c.base_dim, len(c.dim_mult)
        dims = [base * m for m in (c.dim_mult[-1], *c.dim_mult[::-1])]
        time_up = c.temporal_downsample[::-1]
        self.conv_in = CausalConv(c.z_dim, dims[0], 3)
        self.mid_block = MidBlock(dims[0], c.dropout)
        modes = [None if i == n - 1 else "upsample3d" if time_up[i] else "upsample2d" for i in range(n)]
        self.up_blocks = nn.ModuleList([
            ResidualUpBlock(cin, cout, c.num_res_blocks, c.dropout, mode) if c.residual else
            UpBlock(cin // 2 if i > 0 else cin, cout, c.num_res_blocks, c.dropout, mode)  # Wan 2.1's upsamplers halve C
            for i, (cin, cout, mode) in enumerate(zip(dims[:-1], dims[1:], modes))])
        self.norm_out = RMSNorm(dims[-1])
        self.conv_out = CausalConv(dims[-1], c.out_channels, 3)

    def forward(self, x, s):                                                   # x: (B, z, 1, h, w), one chunk
        x = self.mid_block(self.conv_in(x, s), s)                               # (B, d0, 1, h, w)
        for block in self.up_blocks:
            x = block(x, s)                                                     # ... (B, d, t, H, W)
        return self.conv_out(self.norm_out(x, s), s)                            # (B, Cout, 1 or tf, H, W)


# --- Wan 2.2: the residual stages and the patchified video ---------------------------------------
def _avg_down(x, cout: int, ft: int, fs: int):
    """diffusers' ``AvgDown3D``: (B, C, t, h, w) -> (B, cout, ceil(t/ft), h/fs, w/fs), the mean of each group
    of C*ft*fs*fs/cout consecutive values of (channel, dt, dh, dw); an odd t gets zero frames in front."""
    if ft == fs == 1 and x.shape[1] == cout:
        return x                                                                # groups of one: the identity
    pad = -x.shape[2] % ft
    if pad:
        x = F.pad(x, (0, 0, 0, 0, pad, 0))
    b, c, t, h, w = x.shape
    x = x.reshape(b, c, t // ft, ft, h // fs, fs, w // fs, fs).permute(0, 1, 3, 5, 7, 2, 4, 6)
    return x.reshape(b, cout, -1, t // ft, h // fs, w // fs).mean(2)           # (B, cout, t/ft, h/fs, w/fs)


def _dup_up(x, cout: int, ft: int, fs: int, first: bool):
    """diffusers' ``DupUp3D``: (B, C, t, h, w) -> (B, cout, ft*t, fs*h, fs*w), each channel repeated
    cout*ft*fs*fs/C times and spread over (cout, dt, dh, dw); the first chunk keeps only the last of its
    ``ft`` time copies of frame 0."""
    b, c, t, h, w = x.shape
    x = x.repeat_interleave(cout * ft * fs * fs // c, dim=1).reshape(b, cout, ft, fs, fs, t, h, w)
    x = x.permute(0, 1, 5, 2, 6, 3, 7, 4).reshape(b, cout, t * ft, h * fs, w * fs)
    return x[:, :, ft - 1:] if first else x


class ResidualDownBlock(nn.Module):
    """A Wan 2.2 encoder stage: residual blocks and the resampler (``mode``, or None in the last stage), plus
    the parameter-free average shortcut from the stage's input (diffusers' ``WanResidualDownBlock``)."""

    def __init__(self, cin: int, cout: int, num_res_blocks: int, dropout: float, mode: Optional[str]):
        super().__init__()
        self.resnets = nn.ModuleList([ResidualBlock(cin if j == 0 else cout, cout, dropout)
                                      for j in range(num_res_blocks)])
        self.downsampler = Resample(cout, mode) if mode else None
        self.cout, self.factors = cout, (2 if mode == "downsample3d" else 1, 2 if mode else 1)

    def forward(self, x, s):                                                   # x: (B, Cin, t, h, w)
        shortcut = _avg_down(x, self.cout, *self.factors)                       # (B, Cout, t/ft, h/fs, w/fs)
        for resnet in self.resnets:
            x = resnet(x, s)                                                    # (B, Cout, t, h, w)
        if self.downsampler is None:
            return x + shortcut
        return self.downsampler(x, s, residual=shortcut)                        # (B, Cout, t/ft, h/2, w/2)


class ResidualUpBlock(nn.Module):
    """A Wan 2.2 decoder stage: residual blocks and an upsampler that keeps the channels (``mode``, or None in
    the last stage, which has no shortcut), plus the parameter-free repeat shortcut from the stage's input
    (diffusers' ``WanResidualUpBlock``)."""

    def __init__(self, cin: int, cout: int, num_res_blocks: int, dropout: float, mode: Optional[str]):
        super().__init__()
        self.resnets = nn.ModuleList([ResidualBlock(cin if i == 0 else cout, cout, dropout)
                                      for i in range(num_res_blocks + 1)])
        self.upsampler = Resample(cout, mode, out_dim=cout) if mode else None
        self.cout, self.ft = cout, 2 if mode == "upsample3d" else 1

    def forward(self, x, s):                                                   # x: (B, Cin, t, h, w)
        x_in = x
        for resnet in self.resnets:
            x = resnet(x, s)                                                    # (B, Cout, t, h, w)
        if self.upsampler is None:
            return x
        first = s.whole or self not in s.cache                                  # the stream's first chunk
        s.cache[self] = True
        shortcut = _dup_up(x_in, self.cout, self.ft, 2, first)                  # (B, Cout, t', 2h, 2w)
        return self.upsampler(x, s, residual=shortcut)                          # (B, Cout, t', 2h, 2w)


def patchify(x: torch.Tensor, p: int) -> torch.Tensor:
    """(B, C, T, H, W) -> (B, C*p*p, T, H/p, W/p), channel ``c*p*p + dw*p + dh`` (diffusers' Wan 2.2 order);
    p = 1 returns x itself."""
    if p == 1:
        return x
    b, c, t, h, w = x.shape
    x = x.reshape(b, c, t, h // p, p, w // p, p).permute(0, 1, 6, 4, 2, 3, 5)  # (B, C, pw, ph, T, H/p, W/p)
    return x.reshape(b, c * p * p, t, h // p, w // p)


def unpatchify(x: torch.Tensor, p: int) -> torch.Tensor:
    """Inverse of :func:`patchify`: (B, C*p*p, T, h, w) -> (B, C, T, h*p, w*p)."""
    if p == 1:
        return x
    b, cp, t, h, w = x.shape
    x = x.reshape(b, cp // (p * p), p, p, t, h, w).permute(0, 1, 4, 5, 3, 6, 2)  # (B, C, T, h, ph, w, pw)
    return x.reshape(b, cp // (p * p), t, h * p, w * p)
