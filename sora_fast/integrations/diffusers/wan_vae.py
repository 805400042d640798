"""diffusers ``AutoencoderKLWan`` on sora_fast: ``WanCausalConv3d`` on :func:`~sora_fast.ops.causal_conv3d`
(the time-stride-2 downsampling conv, which has no causal padding, stays diffusers'), ``WanRMS_norm``
on :func:`~sora_fast.ops.channel_rms_norm_silu` with the SiLU that follows it fused in."""
from __future__ import annotations

from typing import Optional

import torch
from torch import nn

from ... import ops
from ...ops.conv3d import PackedConv3dWeight
from .patching import DiffusersHooksError, _diffusers_attr, _own_forward_free

__all__: list[str] = []

_SILU_AFTER = {"WanResidualBlock": ("norm1", "norm2"), "WanEncoder3d": ("norm_out",),
               "WanDecoder3d": ("norm_out",)}  # owners whose `nonlinearity` follows exactly these norms


class _ConvForward:
    """``WanCausalConv3d.forward`` on :func:`~sora_fast.ops.causal_conv3d`. An object over the module,
    not a closure, so a deep copy (or pickle) of the VAE runs the copy's own weights; the triton
    kernel's packed weight is a cache, not carried into copies."""

    def __init__(self, conv: nn.Conv3d, backend: Optional[str]):
        self.conv, self.backend = conv, backend
        self.packed = PackedConv3dWeight()                      # the triton kernel's weight, packed once

    def __getstate__(self) -> dict:
        return {"conv": self.conv, "backend": self.backend}

    def __setstate__(self, state: dict) -> None:
        self.__init__(state["conv"], state["backend"])

    def __call__(self, x: torch.Tensor, cache_x: Optional[torch.Tensor] = None) -> torch.Tensor:
        conv, backend = self.conv, self.backend
        kt = conv.weight.shape[2]
        padding = (conv._padding[2], conv._padding[0])
        cache = None
        if cache_x is not None and kt > 1:
            cache = cache_x[:, :, -(kt - 1):].to(x.device)      # diffusers pads the rest, crops older frames
        packed_weight = self.packed(conv.weight, backend)
        if packed_weight is not None:   # the triton kernel works in channels-last: no copy when x already is
            x, cache = (None if t is None else t.contiguous(memory_format=torch.channels_last_3d) for t in (x, cache))
        return ops.causal_conv3d(x, conv.weight, conv.bias, stride=conv.stride, padding=padding, cache=cache,
                                 packed_weight=packed_weight, backend=backend)


class _NormForward:
    """``WanRMS_norm.forward`` on :func:`~sora_fast.ops.channel_rms_norm_silu` (+ the SiLU after it when
    ``silu``); an object over the module, as :class:`_ConvForward`."""

    def __init__(self, norm: nn.Module, silu: bool, backend: Optional[str]):
        self.norm, self.silu, self.backend = norm, silu, backend

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        norm = self.norm
        bias = norm.bias.reshape(-1) if isinstance(norm.bias, torch.Tensor) else None
        x5 = x if x.dim() == 5 else x.unsqueeze(2)               # images (B*T, C, H, W): one frame each
        y = ops.channel_rms_norm_silu(x5, norm.gamma.reshape(-1), bias, silu=self.silu, backend=self.backend)
        return y if x.dim() == 5 else y.squeeze(2)


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
                  lambda p: [p.set(m, "forward", _ConvForward(m, backends["causal_conv3d"])) for _, m in convs]))
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
                p.set(m, "forward", _NormForward(m, id(m) in fused, rms))
            for m in owners:
                p.set(m, "nonlinearity", nn.Identity())          # the SiLU now runs inside the norm

        steps.append((f"{name}: {len(norms)} RMS norms ({len(fused)} with their SiLU fused)", apply_norms))
    return steps
