"""Loads the compiled extension ``sora_fast._C`` and explains its absence.

The extension is optional at import time: the torch and triton backends run without it, so a
missing or broken build must not break ``import sora_fast``. Only code that needs a CUDA C++ kernel
calls :func:`require_extension`, which raises an error saying what needed it, why the module did
not load, and how to fix the build. Importing this module never raises.

The module is imported once; the result (module or failure reason) is cached for the process.
"""

from __future__ import annotations

import importlib
from types import ModuleType
from typing import Any

from ._version import __version__

_MODULE_NAME = f"{__package__}._C"

# (module or None, failure reason or None) once load_extension() has run; None before.
_loaded: tuple[ModuleType | None, str | None] | None = None


def _import() -> tuple[ModuleType | None, str | None]:
    try:
        # import_module (not `from . import _C`) consults sys.modules, so tests can hide the module.
        module = importlib.import_module(_MODULE_NAME)
    except Exception as exc:  # ImportError, OSError from the loader, or anything its init raised
        return None, f"{type(exc).__name__}: {exc}"
    built = getattr(module, "__version__", None)
    if built != __version__:
        # An editable install keeps the old .so in the source tree until the next build.
        return None, (
            f"stale build: {_MODULE_NAME} is version {built!r} but the Python package is "
            f"{__version__!r}"
        )
    return module, None


def _state() -> tuple[ModuleType | None, str | None]:
    global _loaded
    if _loaded is None:
        _loaded = _import()
    return _loaded


def load_extension() -> ModuleType | None:
    """The ``sora_fast._C`` module, or None when it is not built or fails to import."""
    return _state()[0]


def extension_error() -> str | None:
    """Why ``sora_fast._C`` is unavailable (the import error's text), or None when it loaded."""
    return _state()[1]


def require_extension(what: str) -> ModuleType:
    """The ``sora_fast._C`` module; raises RuntimeError naming ``what`` needed it when it is missing.

    Args:
        what: the feature that needs the extension, e.g. "the cuda backend of adaln_modulate".
    """
    module = load_extension()
    if module is None:
        raise RuntimeError(
            f"{what} needs the compiled extension {_MODULE_NAME}, which is not available: "
            f"{extension_error()}. Rebuild it from the repository root with "
            f"`pip install -e .` (add -v to see the CMake and compiler output, and look there "
            f"for the first error), or reinstall the sora-fast wheel. Other backends "
            f"(backend='torch' or 'triton') do not need it."
        )
    return module


def build_info() -> dict[str, Any]:
    """Facts about the compiled extension.

    ``{"available": True, **sora_fast._C.build_info()}`` when it loaded: version, compiler,
    build_type, cuda_compiled, cuda_requested, cuda_expected, cuda_archs, cuda_version,
    emulation (see csrc/bindings.cpp). ``{"available": False, "reason": <import error>}`` otherwise.
    """
    module = load_extension()
    if module is None:
        return {"available": False, "reason": extension_error()}
    return {"available": True, **module.build_info()}
