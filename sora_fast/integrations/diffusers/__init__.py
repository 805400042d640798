"""Drop-in acceleration of diffusers video pipelines: ``accelerate(pipe)``, and back with ``handle.undo()``.

What changes, per diffusers model (everything else keeps running diffusers' own code):

- ``WanTransformer3DModel`` (Wan 2.1 / 2.2): every ``WanAttnProcessor`` becomes
  :class:`WanAttnProcessor` of this package, which runs :func:`sora_fast.ops.spacetime_attention` with
  the 3D RoPE fused into the kernel (coordinates from the latent grid, which the model's ``rope``
  module now hands along with its cos/sin tables); each ``WanTransformerBlock`` runs its
  norm -> modulate -> gate -> residual chain through ``adaln_modulate`` / ``gated_residual_adaln``, and
  in inference the last gated add of a block is fused with the next block's first norm. (Wan takes a
  processor, not the dispatcher backend below: a dispatcher backend receives q and k already rotated,
  so RoPE could not be fused.) ``accelerate(pipe, window=(wt, wh, ww))`` makes its self-attention a
  training-free local 3D window on the latent patch grid (cross-attention stays dense).
- ``AutoencoderKLWan``: ``WanCausalConv3d`` runs :func:`~sora_fast.ops.causal_conv3d` (the time-stride-2
  downsampling conv, which has no causal padding, stays diffusers'), ``WanRMS_norm`` runs
  :func:`~sora_fast.ops.channel_rms_norm_silu` with the SiLU that follows it fused in.
- ``HunyuanVideoTransformer3DModel``, ``LTXVideoTransformer3DModel``: their processors use a
  ``sora_fast`` backend registered with diffusers' attention dispatcher (usable by hand too:
  ``model.set_attention_backend("sora_fast")``).
- ``CogVideoXTransformer3DModel``: its processors (which call SDPA directly) are swapped.

Nothing is copied and no weight changes: patches are instance attributes, recorded, and ``undo()``
puts every original object back, so the model computes bit for bit what it did before. Everything is
validated before the first patch and a failure while patching rolls back what was done, so a model is
never left half-patched. The patched forwards are objects over their modules and the record is data,
so a deep copy or an unpickled copy of an accelerated model runs its own weights and carries a handle
(``HANDLE_ATTR``) that undoes the copy alone. Every accelerated model compiles with ``fullgraph=True``.
:func:`wan_packed_forward` runs a diffusers Wan transformer on latents of different sizes in one packed
forward (through :class:`~sora_fast.models.VideoDiT` sharing its weights).

Modules: ``_accelerate`` (the entry point), ``patching`` (recorded patches, the handle, hook checks),
``attention`` (packed attention on diffusers' layout), ``dispatch`` (the dispatcher backend; HunyuanVideo,
LTX-Video), ``wan``, ``wan_vae``, ``cogvideox`` (one per model family), ``wan_packed``.
"""
from ._accelerate import (
           OP_FAMILIES,
           SUPPORTED_MODELS,
           WINDOW_MODELS,
           Backend,  # noqa: F401 (importable here as before the split)
           accelerate,
)
from .attention import MASKED_BIAS, packed_attention  # noqa: F401
from .cogvideox import CogVideoXAttnProcessor
from .dispatch import dispatch_backend_name, register_attention_backends
from .patching import HANDLE_ATTR, AccelerationHandle, DiffusersHooksError  # noqa: F401
from .wan import WanAttnProcessor
from .wan_packed import wan_packed_forward

__all__ = ["accelerate", "AccelerationHandle", "DiffusersHooksError", "SUPPORTED_MODELS", "OP_FAMILIES",
           "WINDOW_MODELS", "WanAttnProcessor", "CogVideoXAttnProcessor", "wan_packed_forward", "dispatch_backend_name",
           "register_attention_backends", "packed_attention"]
