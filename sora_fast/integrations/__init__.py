"""Integrations with other libraries. :mod:`sora_fast.integrations.diffusers`: ``accelerate(pipe)`` makes a
diffusers video pipeline (Wan, HunyuanVideo, LTX-Video, CogVideoX) run on sora_fast kernels.

Imported lazily: ``import sora_fast.integrations`` does not import diffusers; the first use of a name
below does.
"""
_DIFFUSERS_NAMES = ("accelerate", "AccelerationHandle", "DiffusersHooksError", "wan_packed_forward")

__all__ = list(_DIFFUSERS_NAMES)


def __getattr__(name: str):
    if name in _DIFFUSERS_NAMES:
        from . import diffusers

        return getattr(diffusers, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
