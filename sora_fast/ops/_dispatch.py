"""Backend registry and selection: the one place that decides which implementation of an op runs.

Every op has a ``torch`` backend (its reference, runs anywhere). Kernel backends register per op:

    register_kernel("spacetime_attention", "triton", "sora_fast.triton.attention:attention_forward")

The target is imported on first use, so ``import sora_fast`` never imports Triton or loads ``_C``.
Selection (``backend=None``): the ``SORA_FAST_BACKEND`` environment variable, else auto — CUDA
tensors take the first kernel registered for the op, CPU tensors take ``torch``. Asking for a backend
that cannot run raises :class:`BackendUnavailableError` saying which and why; nothing falls back
silently.
"""
from __future__ import annotations

import importlib
import os
from typing import Callable, Iterable, Mapping, Optional, Union

import torch

BACKENDS = ("torch", "triton", "cuda")
ENV_VAR = "SORA_FAST_BACKEND"

__all__ = [
    "BACKENDS",
    "ENV_VAR",
    "BackendUnavailableError",
    "register_kernel",
    "registered_backends",
    "resolve_backend",
    "resolve_family_backends",
    "get_kernel",
]


class BackendUnavailableError(RuntimeError):
    """The requested backend cannot run this op here (no kernel yet, no GPU, no extension, ...)."""


# (op, backend) -> callable or "module:attr" to import lazily; insertion order is auto preference.
_KERNELS: dict[tuple[str, str], Union[Callable, str]] = {}
_LOADED: dict[tuple[str, str], Callable] = {}


def register_kernel(op: str, backend: str, target: Union[Callable, str]) -> None:
    """Register ``target`` (a callable, or ``"module:attr"`` imported on first use) as ``op``'s
    implementation for ``backend``. Re-registering replaces the previous target."""
    if backend not in BACKENDS:
        raise ValueError(f"backend must be one of {BACKENDS}, got {backend!r}")
    if isinstance(target, str) and ":" not in target:
        raise ValueError(f"target must be a callable or 'module:attr', got {target!r}")
    _KERNELS[(op, backend)] = target
    _LOADED.pop((op, backend), None)


def registered_backends(op: str) -> list[str]:
    """Backends with an implementation registered for ``op`` (``torch`` first)."""
    return [b for (o, b) in _KERNELS if o == op]


def _check_name(backend: str, source: str) -> None:
    if backend not in BACKENDS:
        raise ValueError(f"{source} must be one of {BACKENDS} or None, got {backend!r}")


def resolve_backend(op: str, backend: Optional[str], device: torch.device) -> str:
    """Turn the user's ``backend`` argument into a concrete backend name for ``op`` on ``device``."""
    if backend is not None:
        _check_name(backend, "backend")
        return backend
    env = os.environ.get(ENV_VAR, "")
    if env:
        _check_name(env, f"the {ENV_VAR} environment variable")
        return env
    if device.type == "cuda":
        kernels = [b for b in registered_backends(op) if b != "torch"]
        if kernels:
            return kernels[0]
    return "torch"


def resolve_family_backends(backend: Union[None, str, Mapping[str, Optional[str]]],
                            families: Iterable[str]) -> dict[str, Optional[str]]:
    """A model's ``backend`` argument -> ``{family: backend name or None}`` for each of ``families``.

    ``backend`` is None (auto for every family), one backend name for every family, or a mapping from
    some of ``families`` to a name or None (missing families: None). Raises TypeError for any other
    type and ValueError for an unknown name or family, naming what is accepted.
    """
    families = tuple(families)
    if backend is None or isinstance(backend, str):
        if backend is not None and backend not in BACKENDS:
            raise ValueError(f"backend must be None, one of {BACKENDS} or a mapping with keys in {families}; "
                             f"a backend must be one of {BACKENDS} or None, got {backend!r}")
        return dict.fromkeys(families, backend)
    if not isinstance(backend, Mapping):
        raise TypeError(f"backend must be None, a backend name or a mapping with keys in {families}, "
                        f"got {type(backend).__name__}")
    unknown = sorted(set(backend) - set(families))
    bad = {k: v for k, v in backend.items() if v is not None and v not in BACKENDS}
    if unknown or bad:
        problems = [f"backend mapping has unknown ops {unknown}; valid keys: {', '.join(families)}"] if unknown else []
        problems += [f"{k}: {v!r} is not one of {BACKENDS} or None" for k, v in bad.items()]
        raise ValueError(f"backend must be None, one of {BACKENDS} or a mapping; a backend mapping must have keys "
                         f"in {families}, got {dict(backend)!r}: " + "; ".join(problems))
    return {k: backend.get(k) for k in families}


def eager_reference(backend: str) -> bool:
    """True when ``backend`` is the torch reference and nothing is being compiled: the functional API then
    runs the reference directly, so autograd differentiates it natively (one forward, one backward)
    instead of recomputing it inside the custom op's backward. Under ``torch.compile`` the custom op is
    kept, an opaque node of the graph."""
    return backend == "torch" and not torch.compiler.is_compiling()


def _unavailable(op: str, backend: str, why: str) -> BackendUnavailableError:
    return BackendUnavailableError(f"the {backend} backend of {op} cannot run: {why}")


def _check_runnable(op: str, backend: str, device: torch.device) -> None:
    if backend == "torch":
        return
    if device.type not in ("cpu", "cuda"):
        raise _unavailable(op, backend, f"tensors on {device.type} are not supported (use cpu or cuda)")
    if backend == "triton":
        if device.type == "cuda":
            return
        if os.environ.get("TRITON_INTERPRET") != "1":
            raise _unavailable(
                op, backend,
                "CPU tensors run under the Triton interpreter; set TRITON_INTERPRET=1 in the "
                "environment before the first kernel is imported, or move the tensors to a GPU",
            )
        return
    # cuda: the compiled extension, built with CUDA for GPU tensors or with host emulation for CPU.
    from .. import _ext

    ext = _ext.load_extension()
    if ext is None:
        raise _unavailable(op, backend, f"the extension sora_fast._C is not available ({_ext.extension_error()})")
    info = ext.build_info()
    if device.type == "cuda" and not info.get("cuda_compiled", False):
        raise _unavailable(op, backend, "sora_fast._C was built without CUDA (no nvcc at build time)")
    if device.type == "cpu" and not info.get("emulation", False):
        raise _unavailable(op, backend, "sora_fast._C was built without the host emulation of the CUDA kernels")


def get_kernel(op: str, backend: str, device: torch.device) -> Callable:
    """The implementation of ``op`` for ``backend``, after checking it can run on ``device``."""
    target = _KERNELS.get((op, backend))
    if target is None:
        have = ", ".join(registered_backends(op)) or "none"
        raise _unavailable(op, backend, f"no {backend} kernel is registered for {op} (registered: {have})")
    _check_runnable(op, backend, device)
    fn = _LOADED.get((op, backend))
    if fn is None:
        if callable(target):
            fn = target
        else:
            module, _, attr = target.partition(":")
            try:
                fn = getattr(importlib.import_module(module), attr)
            except Exception as e:  # an import failure must say what failed, not just "not found"
                raise _unavailable(op, backend, f"importing {target} failed: {type(e).__name__}: {e}") from e
        _LOADED[(op, backend)] = fn
    return fn
