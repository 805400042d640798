"""The ``sora_fast`` backend of diffusers' attention dispatcher, and the acceleration of the models whose
processors call that dispatcher (HunyuanVideo, LTX-Video): their processors are pointed at it."""
from __future__ import annotations

import functools
from typing import Callable, Optional

from torch import nn

from ...ops._dispatch import BACKENDS
from .attention import packed_attention
from .patching import DiffusersHooksError, _diffusers_attr

__all__ = ["dispatch_backend_name", "register_attention_backends"]


def dispatch_backend_name(backend: Optional[str] = None) -> str:
    """Name of the dispatcher backend that runs sora_fast attention with ``backend`` (None: auto):
    ``"sora_fast"`` or ``"sora_fast_<backend>"``."""
    if backend is not None and backend not in BACKENDS:
        raise ValueError(f"backend must be None or one of {BACKENDS}, got {backend!r}")
    return "sora_fast" if backend is None else f"sora_fast_{backend}"


def _dispatch_fn(backend: Optional[str]) -> Callable:
    def sora_fast_attention(query, key, value, attn_mask=None, dropout_p=0.0, is_causal=False, scale=None,
                            enable_gqa=False, _parallel_config=None):
        if dropout_p:
            raise ValueError(f"the sora_fast attention backend has no dropout, got dropout_p={dropout_p}")
        if is_causal:
            raise ValueError("the sora_fast attention backend is not causal, got is_causal=True")
        if _parallel_config is not None:
            raise ValueError("the sora_fast attention backend does not support context parallelism")
        return packed_attention(query, key, value, attn_mask, scale=scale, backend=backend)

    return sora_fast_attention


def register_attention_backends() -> list[str]:
    """Register ``sora_fast`` (auto) and ``sora_fast_<backend>`` for every backend with diffusers' attention
    dispatcher (once; :func:`accelerate` does it too) and return their names, e.g. for
    ``model.set_attention_backend("sora_fast")`` or ``attention_backend("sora_fast_triton")``."""
    return [_dispatch_member(b).value for b in (None, *BACKENDS)]


def _dispatch_member(backend: Optional[str]):
    """The ``AttentionBackendName`` member of our backend, added to diffusers' enum and registry once.

    diffusers keys its registry by the members of an enum with no public way to add one, so the member
    is created the way ``Enum`` creates its own (a ``str`` instance with ``_name_``/``_value_``) and
    entered in the enum's lookup tables; ``AttentionBackendName("sora_fast")``,
    ``set_attention_backend("sora_fast")`` and ``attention_backend("sora_fast")`` then all work.
    """
    purpose = "the sora_fast attention backend (diffusers' attention dispatcher)"
    module = "diffusers.models.attention_dispatch"
    enum = _diffusers_attr(module, "AttentionBackendName", purpose)
    registry = _diffusers_attr(module, "_AttentionBackendRegistry", purpose)
    _diffusers_attr(module, "dispatch_attention_fn", purpose)
    for attr in ("register", "_backends"):
        if not hasattr(registry, attr):
            import diffusers

            raise DiffusersHooksError(f"the installed diffusers {diffusers.__version__} has no "
                                      f"{module}._AttentionBackendRegistry.{attr}, which {purpose} needs")
    value = dispatch_backend_name(backend)
    member = enum._value2member_map_.get(value)
    if member is None:
        member = str.__new__(enum, value)
        member._name_, member._value_ = value.upper(), value
        member.__objclass__ = enum
        # pickled (a processor's _attention_backend in a saved model) as "register it and return it",
        # so a process that has not registered the sora_fast backends yet can load the model
        member.__reduce_ex__ = functools.partial(_reduce_member, backend)
        member._sort_order_ = len(enum._member_names_)
        enum._member_map_[member._name_] = member
        enum._value2member_map_[value] = member
        enum._member_names_.append(member._name_)
    if member not in registry._backends:
        registry.register(member)(_dispatch_fn(backend))
    return member


def _reduce_member(backend: Optional[str], protocol: int):
    return _dispatch_member, (backend,)


def _processors_with_backend(model: nn.Module) -> list:
    """Processors of the model that call the dispatcher (they carry ``_attention_backend``)."""
    seen, out = set(), []
    for m in model.modules():
        p = getattr(m, "processor", None)
        if p is not None and hasattr(p, "_attention_backend") and id(p) not in seen:
            seen.add(id(p))
            out.append(p)
    return out


def _plan_dispatch(name: str, model: nn.Module, flags: dict, backends: dict) -> list:
    if not flags["attention"]:
        return []
    register_attention_backends()
    member = _dispatch_member(backends["attention"])
    procs = _processors_with_backend(model)
    if not procs:
        import diffusers

        raise DiffusersHooksError(f"{name}: no attention processor of this {type(model).__name__} calls diffusers' "
                                  f"attention dispatcher (no _attention_backend attribute) in diffusers "
                                  f"{diffusers.__version__}")
    desc = f"{name}: {len(procs)} attention processors on the {member.value!r} dispatcher backend"
    return [(desc, lambda p: [p.set(proc, "_attention_backend", member) for proc in procs])]
