"""The only door to the kernels: every op's validation, registration, dispatch, function and module. The
plain-torch references live in :mod:`sora_fast.reference` and are re-exported here.

Each op takes ``backend=None | "torch" | "triton" | "cuda"`` (None: ``SORA_FAST_BACKEND``, else CUDA
tensors take the registered kernel and CPU tensors the torch reference). Every op is a
``torch.library`` custom op (``torch.ops.sora_fast.*``) with fake and autograd registrations, so it
works under ``torch.compile(fullgraph=True)``.
"""
from ._dispatch import BACKENDS, BackendUnavailableError, register_kernel, registered_backends
from .adaln import (
                    AdaLNModulate,
                    GatedResidualAdaLN,
                    adaln_modulate,
                    adaln_modulate_ref,
                    gated_residual_adaln,
                    gated_residual_adaln_ref,
)
from .attention import SpacetimeAttention, grid_coords, spacetime_attention, spacetime_attention_ref, window_mask
from .conv3d import (
                    CausalConv3d,
                    PackedConv3dWeight,
                    causal_conv3d,
                    causal_conv3d_next_cache,
                    causal_conv3d_output_shape,
                    causal_conv3d_pack_weight,
                    causal_conv3d_ref,
)
from .rope import Rope3D, apply_rope3d, apply_rope3d_ref, rope3d_angles, rope3d_split
from .vae_norm import (
                    ChannelRMSNormSiLU,
                    GroupNormSiLU,
                    channel_rms_norm_silu,
                    channel_rms_norm_silu_ref,
                    group_norm_silu,
                    group_norm_silu_ref,
)

__all__ = [
    "BACKENDS", "BackendUnavailableError", "register_kernel", "registered_backends",
    # attention + rope
    "spacetime_attention", "spacetime_attention_ref", "SpacetimeAttention", "grid_coords", "window_mask",
    "apply_rope3d", "apply_rope3d_ref", "Rope3D", "rope3d_split", "rope3d_angles",
    # adaLN family
    "adaln_modulate", "adaln_modulate_ref", "AdaLNModulate",
    "gated_residual_adaln", "gated_residual_adaln_ref", "GatedResidualAdaLN",
    # VAE
    "causal_conv3d", "causal_conv3d_ref", "causal_conv3d_output_shape", "causal_conv3d_next_cache", "CausalConv3d",
    "causal_conv3d_pack_weight", "PackedConv3dWeight",
    "group_norm_silu", "group_norm_silu_ref", "GroupNormSiLU",
    "channel_rms_norm_silu", "channel_rms_norm_silu_ref", "ChannelRMSNormSiLU",
]
