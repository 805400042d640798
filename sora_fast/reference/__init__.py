"""The plain-torch meaning of every op family (readable, fp32-accurate; fp64 for gradcheck), below both
:mod:`sora_fast.ops` and the kernel launchers (:mod:`sora_fast.triton`, :mod:`sora_fast.cuda`).

One module per family (``attention``, ``rope``, ``conv3d``, ``adaln``, ``vae_norm``) holds its ``*_ref``
function, the shape and layout rules the launchers share (window mask, grid coordinates, RoPE split,
conv output shape and weight packing), and its reference backward. ``_order`` holds the token orders of
a video's patch grid (t-major raster, tile by tile) as index math, shared by packing, the references and
the launchers. Nothing here imports ops, models, training or integrations: the meaning of an op does not
depend on how it is wrapped.
"""
from .adaln import adaln_modulate_ref, gated_residual_adaln_ref
from .attention import grid_coords, spacetime_attention_ref, window_mask
from .conv3d import causal_conv3d_next_cache, causal_conv3d_output_shape, causal_conv3d_pack_weight, causal_conv3d_ref
from .rope import apply_rope3d_ref, rope3d_angles, rope3d_split
from .vae_norm import channel_rms_norm_silu_ref, group_norm_silu_ref

__all__ = [
    "spacetime_attention_ref", "grid_coords", "window_mask",
    "apply_rope3d_ref", "rope3d_angles", "rope3d_split",
    "adaln_modulate_ref", "gated_residual_adaln_ref",
    "causal_conv3d_ref", "causal_conv3d_output_shape", "causal_conv3d_next_cache", "causal_conv3d_pack_weight",
    "group_norm_silu_ref", "channel_rms_norm_silu_ref",
]
