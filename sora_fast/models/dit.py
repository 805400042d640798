"""VideoDiT: a lean Wan2.1 video diffusion transformer on packed spacetime patches.

Per block (Wan2.1 / diffusers ``WanTransformerBlock``), with ``mod = scale_shift_table + time_proj(temb)``
split into six ``(F, D)`` tables with one row per latent frame (shift, scale, gate for self-attention;
shift, scale, gate for the FFN):

    x = x + gate1 * SelfAttn(LN(x) * (1 + scale1) + shift1)          QK-RMSNorm over all heads, 3D RoPE
    x = x + CrossAttn(LN_affine(x), text)                             ungated
    x = x + gate2 * FFN(LN(x) * (1 + scale2) + shift2)                GELU(tanh)

Gated adds run in fp32 (``sora_fast.ops.gated_residual_adaln``), fused with the norm + modulation that
follows them, so the residual stream is read once per add: a block takes ``(x, y)`` (``y`` = its first
modulated norm) and returns ``(x, y_next)`` where ``y_next`` is already the next block's (or the output
head's) modulated norm. Every latent frame of every video in a pack has its own timestep (a per-video
timestep is the case of equal values, computed the same way): the tables have one row per frame, video by
video, and every token picks its row with an int32 row index (:func:`sora_fast.packing.frame_ids`: its
video's frame offset plus its t coordinate), so they take O(frames x D) memory, never O(tokens x D).
:meth:`VideoDiT.from_diffusers` loads diffusers ``WanTransformer3DModel`` weights (converted by
:mod:`sora_fast.models.convert`); the same weights give the same output (fp32 parity is tested).
"""
from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from typing import Mapping, Optional, Sequence, Union

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint

from .. import ops
from ..ops._dispatch import resolve_family_backends
from ..packing import PackedSequences, PackedVideos, frame_ids, pack_sequences, pack_videos, segment_mean
from ..reference._order import DEFAULT_TILE, check_order, check_tile
from ._convert import load_converted
from .activations import GELUTanh

# convert_wan_transformer_state_dict: from models.convert, on first use (module __getattr__ below)
__all__ = ["DiTConfig", "VideoDiT", "PRESETS", "timestep_embedding", "convert_wan_transformer_state_dict"]  # noqa: F822

OP_FAMILIES = ("attention", "adaln")
Backend = Union[None, str, Mapping[str, Optional[str]]]


def _is_int(v) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


@dataclass
class DiTConfig:
    """Architecture of a :class:`VideoDiT` (names follow Wan2.1; diffusers' in brackets).

    dim [num_attention_heads * attention_head_dim], ffn_dim, num_heads [num_attention_heads],
    num_layers, in_channels / out_channels (latent channels), text_dim (text encoder width),
    freq_dim (sinusoidal timestep features), patch [patch_size] ``(pt, ph, pw)``, eps (every norm),
    cross_attn_norm (affine LayerNorm before cross-attention), qk_norm (only "rms_norm_across_heads"),
    rope_theta, window: optional ``(wt, wh, ww)`` local 3D window of self-attention (None: global).
    pooled_text: also condition adaLN on the text: the mean of each prompt's embedded tokens, through a
    zero-initialized linear, is added to the timestep embedding (as HunyuanVideo and SD3 add a pooled text
    vector). Not part of Wan2.1 (diffusers' configs never set it); off by default.
    token_order / token_tile: the order of the tokens in the packs made for this model (its own
    :meth:`VideoDiT.forward_videos`, the sampler, the trainer): ``"t-major"`` or ``"tile"`` with
    ``token_tile = (tt, th, tw)`` latent patches per tile (:func:`sora_fast.packing.pack_videos`). The model
    computes the same function in every order (it follows each pack's ``coords``); the order only changes
    which tokens sit together in memory. :meth:`VideoDiT.pack` packs latents the way the config says.
    """

    dim: int
    ffn_dim: int
    num_heads: int
    num_layers: int
    in_channels: int = 16
    out_channels: int = 16
    text_dim: int = 4096
    freq_dim: int = 256
    patch: tuple[int, int, int] = (1, 2, 2)
    eps: float = 1e-6
    cross_attn_norm: bool = True
    qk_norm: str = "rms_norm_across_heads"
    rope_theta: float = 10000.0
    window: Optional[tuple[int, int, int]] = None
    pooled_text: bool = False
    token_order: str = "t-major"
    token_tile: tuple[int, int, int] = DEFAULT_TILE

    def __post_init__(self):
        for name in ("dim", "ffn_dim", "num_heads", "num_layers", "in_channels", "out_channels", "text_dim",
                     "freq_dim"):
            v = getattr(self, name)
            if not _is_int(v) or v < 1:
                raise ValueError(f"DiTConfig.{name} must be a positive int, got {v!r}")
        if self.dim % self.num_heads:
            raise ValueError(f"DiTConfig.dim must be divisible by num_heads, got dim={self.dim}, "
                             f"num_heads={self.num_heads}")
        if self.head_dim % 2 or self.head_dim < 6:
            raise ValueError(f"DiTConfig head dim (dim / num_heads) must be even and >= 6 for the t/h/w RoPE "
                             f"split, got {self.dim} / {self.num_heads} = {self.head_dim}")
        if self.freq_dim % 2:
            raise ValueError(f"DiTConfig.freq_dim must be even (cos and sin halves), got {self.freq_dim}")
        patch = tuple(self.patch) if isinstance(self.patch, (tuple, list)) else None
        if patch is None or len(patch) != 3 or not all(_is_int(p) and p >= 1 for p in patch):
            raise ValueError(f"DiTConfig.patch must be 3 positive ints (pt, ph, pw), got {self.patch!r}")
        self.patch = patch
        if isinstance(self.eps, bool) or not isinstance(self.eps, (int, float)) or not 0 < self.eps < 1:
            raise ValueError(f"DiTConfig.eps must be a number in (0, 1), got {self.eps!r}")
        for name in ("cross_attn_norm", "pooled_text"):
            if not isinstance(getattr(self, name), bool):
                raise TypeError(f"DiTConfig.{name} must be a bool, got {getattr(self, name)!r}")
        if self.qk_norm != "rms_norm_across_heads":
            raise ValueError(f"DiTConfig.qk_norm must be 'rms_norm_across_heads' (RMSNorm of q and k over "
                             f"all heads, as Wan2.1), got {self.qk_norm!r}")
        if isinstance(self.rope_theta, bool) or not isinstance(self.rope_theta, (int, float)) \
                or not 0 < self.rope_theta < math.inf:
            raise ValueError(f"DiTConfig.rope_theta must be a positive number, got {self.rope_theta!r}")
        if self.window is not None:
            w = tuple(self.window) if isinstance(self.window, (tuple, list)) else None
            if w is None or len(w) != 3 or not all(_is_int(v) and v >= 0 for v in w):
                raise ValueError(f"DiTConfig.window must be None or 3 ints >= 0 (wt, wh, ww), got {self.window!r}")
            self.window = w
        check_order(self.token_order, None, name="DiTConfig.token_order")
        self.token_tile = check_tile(self.token_tile, "DiTConfig.token_tile")

    @property
    def head_dim(self) -> int:
        return self.dim // self.num_heads

    @property
    def patch_volume(self) -> int:
        return math.prod(self.patch)

    @classmethod
    def from_name(cls, name: str, **overrides) -> "DiTConfig":
        """A preset (see ``PRESETS``), optionally with fields replaced, e.g. ``from_name("demo", in_channels=4)``."""
        if name not in PRESETS:
            raise ValueError(f"unknown DiT preset {name!r}; valid names: {', '.join(sorted(PRESETS))}")
        return dataclasses.replace(PRESETS[name], **overrides)

    @classmethod
    def from_diffusers_config(cls, cfg) -> "DiTConfig":
        """From a diffusers ``WanTransformer3DModel`` config (the model's ``.config`` or a dict); see
        :func:`sora_fast.models.convert.dit_config_from_diffusers`."""
        from .convert import dit_config_from_diffusers

        return dit_config_from_diffusers(cfg)


PRESETS: dict[str, DiTConfig] = {
    "wan2.1-1.3b": DiTConfig(dim=1536, ffn_dim=8960, num_heads=12, num_layers=30),
    "wan2.1-14b": DiTConfig(dim=5120, ffn_dim=13824, num_heads=40, num_layers=40),
    # tests: heads of 32 (RoPE split t/h/w = 12/10/10), 2 layers
    "tiny": DiTConfig(dim=64, ffn_dim=128, num_heads=2, num_layers=2, in_channels=4, out_channels=4,
                      text_dim=32, freq_dim=32),
    # a small CPU-trainable model: 1.1M parameters, heads of 32 (RoPE split 12/10/10)
    "demo": DiTConfig(dim=128, ffn_dim=384, num_heads=4, num_layers=4, in_channels=16, out_channels=16,
                      text_dim=64, freq_dim=64),
}


def timestep_embedding(t: torch.Tensor, dim: int, max_period: float = 10000.0) -> torch.Tensor:
    """Sinusoidal features of ``t`` ``(B,)``: ``(B, dim)`` fp32, ``[cos | sin]`` (diffusers' ``Timesteps``
    with ``flip_sin_to_cos=True, downscale_freq_shift=0``, bit for bit)."""
    half = dim // 2
    exponent = -math.log(max_period) * torch.arange(half, dtype=torch.float32, device=t.device) / half
    args = t[:, None].float() * torch.exp(exponent)[None, :]
    return torch.cat([torch.cos(args), torch.sin(args)], dim=-1)


# On the CPU the FFN's (rows, ffn_dim) hidden activations of a large pack leave the L2 cache between the first
# matmul, the GELU and the second matmul; row chunks whose hidden activations fit in 2 MiB stay in it (measured
# on the CPU: the FFN forward 12-17% faster at 1,728-2,752 tokens, dim 256, ffn 1024; 7% with its backward).
_FFN_CHUNK_BYTES = 2 << 20


def feed_forward(ffn: nn.Module, y: torch.Tensor, hidden: Optional[int]) -> torch.Tensor:
    """``ffn(y)`` for a row-wise FFN on ``(N, D)`` rows with ``hidden`` features inside: on the CPU in row chunks
    of at least 256 rows whose hidden activations fit in ``_FFN_CHUNK_BYTES`` (one call when the rows fit in
    one chunk, off a CPU, under torch.compile, or for an unknown ``hidden``)."""
    if hidden is None or y.device.type != "cpu" or torch.compiler.is_compiling():
        return ffn(y)
    rows = max(256, _FFN_CHUNK_BYTES // (hidden * y.element_size()))
    if y.shape[0] <= rows:
        return ffn(y)
    return torch.cat([ffn(part) for part in y.split(rows)])


def _mlp(d_in: int, d_hidden: int, d_out: int, act: nn.Module) -> nn.Sequential:
    return nn.Sequential(nn.Linear(d_in, d_hidden), act, nn.Linear(d_hidden, d_out))


class Attention(nn.Module):
    """Multi-head attention over packed tokens with QK RMSNorm across heads (over ``dim``).

    Self-attention (``context=None``) applies 3D RoPE at the videos' patch coordinates inside the
    attention op; cross-attention attends each video to its own packed text sequence.
    """

    def __init__(self, dim: int, num_heads: int, eps: float):
        super().__init__()
        self.num_heads = num_heads
        self.to_q, self.to_k, self.to_v, self.to_out = (nn.Linear(dim, dim) for _ in range(4))
        self.norm_q, self.norm_k = nn.RMSNorm(dim, eps=eps), nn.RMSNorm(dim, eps=eps)

    def _rms(self, norm: nn.RMSNorm, t: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
        """RMSNorm over all heads in fp32 (also under autocast), then split heads: ``(N, D) -> (N, H, d)``."""
        t = F.rms_norm(t.float(), norm.normalized_shape, norm.weight.float(), norm.eps)
        return t.to(dtype).unflatten(1, (self.num_heads, -1))

    def forward(self, y: torch.Tensor, x: PackedVideos, context: Optional[torch.Tensor] = None,
                text: Optional[PackedSequences] = None, *, window=None, rope_theta: float = 10000.0,
                backend: Optional[str] = None) -> torch.Tensor:
        """y ``(N, D)`` modulated tokens of ``x``; context ``(L, D)`` projected tokens of ``text``."""
        plan = None if torch.compiler.is_compiling() else x.plan              # per-pack work, done once
        kv = y if context is None else context                               # (N or L, D)
        v = self.to_v(kv).unflatten(1, (self.num_heads, -1))                  # (N or L, H, d)
        q = self._rms(self.norm_q, self.to_q(y), v.dtype)                     # (N, H, d)
        k = self._rms(self.norm_k, self.to_k(kv), v.dtype)                    # (N or L, H, d)
        if context is None:
            o = ops.spacetime_attention(q, k, v, x.cu_seqlens, max_seqlen_q=x.max_seqlen, window=window,
                                        grid=x.grid, rope_coords=x.coords, rope_theta=rope_theta,
                                        coords=x.coords, backend=backend, plan=plan)  # (N, H, d)
        else:
            o = ops.spacetime_attention(q, k, v, x.cu_seqlens, text.cu_seqlens, max_seqlen_q=x.max_seqlen,
                                        max_seqlen_k=text.max_seqlen, backend=backend, plan=plan)  # (N, H, d)
        return self.to_out(o.flatten(1))                                      # (N, D)


class DiTBlock(nn.Module):
    """One Wan2.1 block on the packed stream; see the module docstring for the math."""

    def __init__(self, cfg: DiTConfig):
        super().__init__()
        self.cfg = cfg
        self.attn1 = Attention(cfg.dim, cfg.num_heads, cfg.eps)
        self.norm2 = nn.LayerNorm(cfg.dim, eps=cfg.eps) if cfg.cross_attn_norm else None
        self.attn2 = Attention(cfg.dim, cfg.num_heads, cfg.eps)
        self.ffn = _mlp(cfg.dim, cfg.ffn_dim, cfg.dim, GELUTanh())
        self.scale_shift_table = nn.Parameter(torch.randn(6, cfg.dim) / cfg.dim**0.5)

    def modulation(self, t6: torch.Tensor) -> torch.Tensor:
        """``t6`` ``(F, 6, D)`` shared time projection (one row per latent frame) -> this block's
        ``(6, F, D)`` fp32 tables."""
        return (self.scale_shift_table[:, None, :].float() + t6.float().transpose(0, 1)).contiguous()

    def forward(self, h: torch.Tensor, y: torch.Tensor, mod: torch.Tensor, next_shift: torch.Tensor,
                next_scale: torch.Tensor, x: PackedVideos, context: torch.Tensor, text: PackedSequences,
                backends: dict, ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """h ``(N, D)`` residual stream, y ``(N, D)`` = LN(h)·(1+scale1)+shift1, mod ``(6, F, D)``,
        next_shift/next_scale ``(F, D)`` of the norm after this block, ids ``(N,)`` int32 row (frame) of
        every token -> ``(h_new, y_next)``, each ``(N, D)``."""
        cfg, ada = self.cfg, backends["adaln"]
        _, _, gate1, shift2, scale2, gate2 = mod.unbind(0)                      # each (F, D) fp32
        a = self.attn1(y, x, window=cfg.window, rope_theta=cfg.rope_theta, backend=backends["attention"])  # (N, D)
        n2w, n2b = (self.norm2.weight, self.norm2.bias) if self.norm2 is not None else (None, None)
        h, y = ops.gated_residual_adaln(h, a, gate1, None, None, ids, weight=n2w, bias=n2b, eps=cfg.eps,
                                        backend=ada)                           # (N, D) h + g1*a, LN_affine(h)
        if self.norm2 is None:
            y = h                                                              # (N, D) no cross-attn norm
        c = self.attn2(y, x, context, text, backend=backends["attention"])    # (N, D)
        h, y = ops.gated_residual_adaln(h, c, None, shift2, scale2, ids, eps=cfg.eps,
                                        backend=ada)                           # (N, D) h + c, LN(h)*(1+s2)+sh2
        f = feed_forward(self.ffn, y, cfg.ffn_dim)                             # (N, D)
        return ops.gated_residual_adaln(h, f, gate2, next_shift, next_scale, ids, eps=cfg.eps,
                                        backend=ada)                           # (N, D) h + g2*f, next y


class VideoDiT(nn.Module):
    """Wan2.1 text-to-video DiT on :class:`~sora_fast.packing.PackedVideos`.

    backend: None / "torch" / "triton" / "cuda" for every op, or a mapping ``{"attention": ...,
    "adaln": ...}`` choosing per op family (missing keys: None). A backend with no kernel for an op
    raises :class:`sora_fast.ops.BackendUnavailableError`; nothing falls back silently.
    checkpointing: recompute each block in backward (``torch.utils.checkpoint``, non-reentrant).
    Both are plain attributes and may be changed at any time.
    """

    def __init__(self, config: DiTConfig, *, backend: Backend = None, checkpointing: bool = False):
        super().__init__()
        if not isinstance(config, DiTConfig):
            raise TypeError(f"config must be a DiTConfig, got {type(config).__name__}")
        self.config, self.backend, self.checkpointing = config, backend, checkpointing
        c, d = config, config.dim
        self.patch_embed = nn.Linear(c.in_channels * c.patch_volume, d)        # == Conv3d(kernel=stride=patch)
        self.text_embed = _mlp(c.text_dim, d, d, GELUTanh())
        self.time_embed = _mlp(c.freq_dim, d, d, nn.SiLU())
        self.time_proj = nn.Linear(d, 6 * d)
        self.text_pool = nn.Linear(d, d) if c.pooled_text else None            # pooled text -> adaLN
        self.blocks = nn.ModuleList(DiTBlock(c) for _ in range(c.num_layers))
        self.scale_shift_table = nn.Parameter(torch.randn(2, d) / d**0.5)     # output (shift, scale)
        self.proj_out = nn.Linear(d, c.out_channels * c.patch_volume)           # features (C, pt, ph, pw)
        self.initialize_weights()

    @classmethod
    def from_config(cls, config: DiTConfig, **kwargs) -> "VideoDiT":
        return cls(config, **kwargs)

    @classmethod
    def from_name(cls, name: str, *, backend: Backend = None, checkpointing: bool = False,
                  **overrides) -> "VideoDiT":
        """A freshly initialized preset model, e.g. ``VideoDiT.from_name("demo", in_channels=4)``."""
        return cls(DiTConfig.from_name(name, **overrides), backend=backend, checkpointing=checkpointing)

    @classmethod
    def from_diffusers(cls, model, **kwargs) -> "VideoDiT":
        """The same network as a diffusers ``WanTransformer3DModel``: same weights, device, and each
        tensor in the dtype diffusers holds it (e.g. fp32 tables and norms in a bf16 model).

        diffusers' ``timestep`` converts at the boundary with
        :func:`sora_fast.models.convert.wan_frame_timesteps`: ``(B,)`` as is, or Wan 2.2 TI2V's per-token
        ``(B, S)`` to one value per latent frame ``(F,)`` (values must be equal within a frame)."""
        from .convert import convert_wan_transformer_state_dict

        config = DiTConfig.from_diffusers_config(model.config)
        sd = convert_wan_transformer_state_dict(model.state_dict(), config)
        return cls._from_converted(config, sd, next(model.parameters()).device,
                                   "diffusers WanTransformer3DModel state dict", **kwargs)

    @classmethod
    def _from_converted(cls, config: DiTConfig, sd: dict, device, source: str, **kwargs) -> "VideoDiT":
        with torch.device("meta"):
            dit = cls(config, **kwargs)                     # no memory, no init: every tensor is loaded below
        for name, p in list(dit.named_parameters()):
            owner, _, leaf = name.rpartition(".")
            dtype = sd[name].dtype if name in sd else p.dtype
            dit.get_submodule(owner)._parameters[leaf] = nn.Parameter(torch.empty_like(p, dtype=dtype, device=device))
        load_converted(dit, sd, source=source)
        return dit

    @classmethod
    def from_diffusers_dir(cls, path, **kwargs) -> "VideoDiT":
        """A diffusers ``WanTransformer3DModel`` saved in ``path`` (``config.json`` + one or sharded
        ``diffusion_pytorch_model*.safetensors``), read with safetensors directly: neither diffusers nor
        accelerate is needed, and nothing is unpickled. Tensors keep their stored dtypes."""
        from pathlib import Path

        from .._files import load_safetensors, read_json
        from .convert import convert_wan_transformer_state_dict

        d = Path(path)
        if not (d / "config.json").is_file():
            raise FileNotFoundError(f"{d} is not a saved diffusers model: {d / 'config.json'} is missing")
        index = d / "diffusion_pytorch_model.safetensors.index.json"
        if index.is_file():
            index_json = read_json(index, "a safetensors index with a 'weight_map' of tensor -> file")
            weight_map = index_json.get("weight_map") if isinstance(index_json, dict) else None
            if not isinstance(weight_map, dict):
                raise ValueError(f"{str(index)!r} has no 'weight_map' object (tensor name -> file)")
            files = sorted(set(weight_map.values()))
        elif (d / "diffusion_pytorch_model.safetensors").is_file():
            files = ["diffusion_pytorch_model.safetensors"]
        else:
            raise FileNotFoundError(f"{d} holds no diffusion_pytorch_model*.safetensors weights")
        config = DiTConfig.from_diffusers_config(read_json(d / "config.json", "a WanTransformer3DModel config"))
        sd = {}
        for f in files:
            sd.update(load_safetensors(d / f, "WanTransformer3DModel weights"))
        return cls._from_converted(config, convert_wan_transformer_state_dict(sd, config), torch.device("cpu"),
                                   f"diffusers WanTransformer3DModel in {d}", **kwargs)

    @torch.no_grad()
    def initialize_weights(self) -> None:
        """Wan-style init for training from scratch, adaLN-zero: xavier linears with zero bias, N(0, 0.02)
        text/time embedders, and zero time_proj, gate rows and output head, so every block starts as the
        identity and the model outputs zeros. Converted weights overwrite all of it."""
        for m in self.modules():
            if isinstance(m, nn.Linear):
                nn.init.xavier_uniform_(m.weight)
                nn.init.zeros_(m.bias)
        for m in (*self.text_embed, *self.time_embed):
            if isinstance(m, nn.Linear):
                nn.init.normal_(m.weight, std=0.02)
        for blk in self.blocks:
            blk.scale_shift_table[2].zero_()
            blk.scale_shift_table[5].zero_()
        zero = [self.time_proj.weight, self.time_proj.bias, self.proj_out.weight, self.proj_out.bias]
        if self.text_pool is not None:
            zero += [self.text_pool.weight, self.text_pool.bias]
        for p in zero:
            nn.init.zeros_(p)

    def _backends(self) -> dict:
        return resolve_family_backends(self.backend, OP_FAMILIES)

    def _validate(self, x, timesteps, text) -> int:
        c = self.config
        if not isinstance(x, PackedVideos):
            raise TypeError(f"x must be a PackedVideos (sora_fast.packing.pack_videos), got {type(x).__name__}")
        if not isinstance(text, PackedSequences):
            raise TypeError(f"text must be a PackedSequences (sora_fast.packing.pack_sequences), "
                            f"got {type(text).__name__}")
        if tuple(x.patch) != c.patch:
            raise ValueError(f"x.patch must be the model's patch {c.patch}, got {tuple(x.patch)}")
        feats = x.tokens.shape[1]
        if feats != c.in_channels * c.patch_volume:
            raise ValueError(f"x has {feats / c.patch_volume:g} latent channels ({feats} features per token, "
                             f"patch {c.patch}), the model expects in_channels={c.in_channels}")
        if text.num_sequences != x.num_sequences:
            raise ValueError(f"text has {text.num_sequences} sequences, x has {x.num_sequences} videos; "
                             f"every video needs its own (possibly empty) text sequence")
        if text.tokens.shape[1] != c.text_dim:
            raise ValueError(f"text tokens must have text_dim={c.text_dim} features, got {text.tokens.shape[1]}")
        b, f = x.num_sequences, x.num_frames                  # host count: no device read when the pack has it
        shapes = f"({b},), one per video of x," + ("" if f == b else f" or ({f},), one per latent frame of x,")
        if not isinstance(timesteps, torch.Tensor):
            raise TypeError(f"timesteps must be a torch.Tensor of shape {shapes} got {type(timesteps).__name__}")
        if tuple(timesteps.shape) not in ((b,), (f,)):
            raise ValueError(f"timesteps must have shape {shapes} got {tuple(timesteps.shape)}")
        if timesteps.dtype == torch.bool or timesteps.is_complex():
            raise TypeError(f"timesteps must be real numbers (float or int), got {timesteps.dtype}")
        if timesteps.device != x.tokens.device or text.tokens.device != x.tokens.device:
            raise ValueError(f"timesteps and text must be on x's device {x.tokens.device}, "
                             f"got {timesteps.device} and {text.tokens.device}")
        return f

    @staticmethod
    def frame_timesteps(x: PackedVideos, timesteps: torch.Tensor, num_frames: Optional[int] = None
                        ) -> tuple[torch.Tensor, torch.Tensor]:
        """``timesteps`` ``(B,)`` or ``(F,)`` -> ``(per-frame timesteps (F,), video of each frame (F,) int64)``.

        A ``(B,)`` tensor gives every frame its video's value; an ``(F,)`` one is taken as is (when every
        video has one frame, B == F and both readings are the same). No validation: see :meth:`forward`.
        """
        b = x.num_sequences
        f = x.num_frames if num_frames is None else num_frames
        video = torch.repeat_interleave(torch.arange(b, device=x.grid.device), x.grid[:, 0].long(),
                                        output_size=f)                                     # (F,)
        if timesteps.shape[0] == b and b != f:
            timesteps = timesteps[video]                                                   # (F,)
        return timesteps, video

    def forward(self, x: PackedVideos, timesteps: torch.Tensor, text: PackedSequences) -> torch.Tensor:
        """Predict the flow/noise of every patch token.

        x: B packed videos, tokens ``(N, in_channels*pt*ph*pw)``, F = ``int(x.grid[:, 0].sum())`` latent
        frames in all (T' of each video). timesteps: diffusion time in [0, 1000] as Wan, either ``(B,)``
        one per video, or ``(F,)`` one per latent frame, video by video, frames in time order (e.g. 0 for
        frames given as conditions). With B == F (every video one frame) both mean the same. A per-video
        value runs exactly as that value repeated for each of its frames (the same ops, bit for bit).
        text: B packed sequences, tokens ``(L, text_dim)``.
        Returns ``(N, out_channels*pt*ph*pw)`` tokens in ``x``'s feature order: ``x.unpack(out)``
        gives the B videos ``(out_channels, T, H, W)``.

        The modulation tables have one row per latent frame, ``(F, D)`` each, and every token reads its
        frame's row (:func:`sora_fast.packing.frame_ids`); per-video conditioning (the pooled text) is
        gathered to the frames of its video.
        """
        ids, h, y, mods, norms, context, backends = self.embed(x, timesteps, text)
        for blk, mod, (shift, scale) in zip(self.blocks, mods, norms):
            args = (h, y, mod, shift, scale, x, context, text, backends, ids)
            if self.checkpointing and torch.is_grad_enabled():
                h, y = checkpoint(blk, *args, use_reentrant=False)                  # (N, D), (N, D)
            else:
                h, y = blk(*args)                                                   # (N, D), (N, D)
        return self.proj_out(y)                                                     # (N, C_out*pt*ph*pw)

    def embed(self, x: PackedVideos, timesteps: torch.Tensor, text: PackedSequences) -> tuple:
        """What :meth:`forward` computes before its first block (validated): ``(ids (N,) int32 frame row of every
        token, h (N, D) patch embeddings, y (N, D) block 0's modulated norm, mods L x (6, F, D) fp32 tables,
        norms L x (shift, scale) of the norm after each block (the last: the output head's), context (L, D)
        embedded text, backends)``. Step caches run the blocks from here (:mod:`sora_fast.sampling.cache`)."""
        num_frames = self._validate(x, timesteps, text)
        c, backends = self.config, self._backends()
        ids = frame_ids(x)                                                          # (N,) int32 row of each token
        t_rows, video = self.frame_timesteps(x, timesteps, num_frames)              # (F,), (F,) int64
        h = self.patch_embed(x.tokens)                                              # (N, D)
        context = self.text_embed(text.tokens)                                      # (L, D)
        t_freq = timestep_embedding(t_rows, c.freq_dim)                             # (F, freq_dim) fp32
        temb = self.time_embed(t_freq.to(self.time_embed[0].weight.dtype)).to(h.dtype)  # (F, D)
        if self.text_pool is not None:                                              # + pooled text, per frame
            pooled = segment_mean(context, text.seq_ids, text.num_sequences)[0]       # (B, D)
            temb = temb + self.text_pool(pooled).to(h.dtype)[video]                  # (F, D)
        t6 = self.time_proj(F.silu(temb)).unflatten(1, (6, c.dim))                  # (F, 6, D)
        mods = [blk.modulation(t6) for blk in self.blocks]                          # L x (6, F, D) fp32
        out_mod = (self.scale_shift_table[:, None].float() + temb.float()).contiguous()  # (2, F, D)
        norms = [m[:2] for m in mods[1:]] + [out_mod]                               # shift/scale after each block
        y = ops.adaln_modulate(h, mods[0][0], mods[0][1], ids, eps=c.eps, backend=backends["adaln"])  # (N, D)
        return ids, h, y, mods, norms, context, backends

    def forward_videos(self, latents: Sequence[torch.Tensor], timesteps, text_embeddings: Sequence[torch.Tensor]
                       ) -> list[torch.Tensor]:
        """Convenience: list of B ``(C, T, H, W)`` latents, timesteps, list of ``(L_i, text_dim)`` text
        embeddings -> list of ``(out_channels, T, H, W)`` predictions.

        timesteps: one number for all; ``(B,)`` one per video (tensor or list of numbers); ``(F,)`` one per
        latent frame as in :meth:`forward`; or per frame as a list or tuple of B 1-D tensors, the i-th
        with one value per latent frame of video i (``T_i / pt`` values), concatenated in order."""
        x = self.pack(latents)
        if isinstance(timesteps, (list, tuple)) and any(isinstance(t, torch.Tensor) for t in timesteps):
            timesteps = self._cat_frame_timesteps(x, timesteps)
        elif not isinstance(timesteps, torch.Tensor):
            timesteps = torch.as_tensor(timesteps, dtype=torch.float32, device=x.tokens.device)
            timesteps = timesteps.expand(x.num_sequences) if timesteps.dim() == 0 else timesteps
        out = self(x, timesteps, pack_sequences(text_embeddings))                   # (N, C_out*P)
        return x.unpack(out, channels=self.config.out_channels)

    def pack(self, latents: Sequence[torch.Tensor]) -> PackedVideos:
        """B latents ``(C, T, H, W)`` packed for this model: its patch and token order (``config.token_order``,
        ``config.token_tile``)."""
        c = self.config
        return pack_videos(latents, c.patch, order=c.token_order, tile=c.token_tile)

    @staticmethod
    def _cat_frame_timesteps(x: PackedVideos, timesteps: Sequence) -> torch.Tensor:
        """A list of B per-video tensors of per-frame timesteps -> the ``(F,)`` form, checked video by video."""
        frames = x.frames_per_video
        if len(timesteps) != len(frames):
            raise ValueError(f"timesteps as a list must hold one tensor per video ({len(frames)}), "
                             f"got {len(timesteps)}")
        for i, (t, n) in enumerate(zip(timesteps, frames)):
            if not isinstance(t, torch.Tensor):
                raise TypeError(f"timesteps[{i}] must be a torch.Tensor of shape ({n},), got {type(t).__name__}")
            if tuple(t.shape) != (n,):
                raise ValueError(f"timesteps[{i}] must have shape ({n},), one per latent frame of video {i}, "
                                 f"got {tuple(t.shape)}")
            if t.device != x.tokens.device:
                raise ValueError(f"timesteps[{i}] must be on x's device {x.tokens.device}, got {t.device}")
        return torch.cat([t.float() if not t.is_floating_point() else t for t in timesteps])


def __getattr__(name: str):
    # the converter lives in models.convert, which imports this module: re-exported on first use
    if name == "convert_wan_transformer_state_dict":
        from .convert import convert_wan_transformer_state_dict

        return convert_wan_transformer_state_dict
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
