"""sora_fast: custom kernels for Sora-style video diffusion transformers.

Videos of any size become spacetime patch tokens packed without padding (:mod:`sora_fast.packing`);
every hot path is an op in :mod:`sora_fast.ops` with a plain-torch reference and kernel backends.
"""
from . import ops, packing
from ._version import __version__
from .packing import PackedSequences, PackedVideos, pack_sequences, pack_videos, plan_batches

__all__ = [
    "__version__",
    "ops",
    "packing",
    "PackedVideos",
    "PackedSequences",
    "pack_videos",
    "pack_sequences",
    "plan_batches",
    "accelerate",
    "Condition",
]


def __getattr__(name: str):
    """``sora_fast.accelerate`` (diffusers pipelines on sora_fast kernels) and ``sora_fast.Condition``,
    imported on first use so that ``import sora_fast`` does not import diffusers or the models."""
    if name == "accelerate":
        from .integrations.diffusers import accelerate

        return accelerate
    if name == "Condition":  # imported on first use: the pipeline imports the models
        from .conditioning import Condition

        return Condition
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
