"""The patching machinery: patches recorded so that ``undo()`` restores every original object, the handle
that :func:`~sora_fast.integrations.diffusers.accelerate` returns, and the checks made before patching
(what the installed diffusers provides, forwards already replaced by hooks)."""
from __future__ import annotations

from typing import Callable, Optional

from torch import nn

__all__ = ["AccelerationHandle", "DiffusersHooksError", "HANDLE_ATTR"]

HANDLE_ATTR = "_sora_fast_acceleration"


class DiffusersHooksError(RuntimeError):
    """The installed diffusers lacks a class, function or attribute that the acceleration relies on."""


def _diffusers_attr(module_path: str, name: str, purpose: str):
    """``module_path.name`` from the installed diffusers, or DiffusersHooksError saying what needs it."""
    import importlib

    import diffusers

    try:
        return getattr(importlib.import_module(module_path), name)
    except (ImportError, AttributeError) as e:
        raise DiffusersHooksError(f"the installed diffusers {diffusers.__version__} has no {module_path}.{name}, "
                                  f"which {purpose} needs ({type(e).__name__}: {e})") from e


def _own_forward_free(module: nn.Module, where: str) -> None:
    """A module whose ``forward`` was already replaced (a diffusers hook: caching, offloading, ...) is
    not patched: the hook would be lost, or would hide our forward."""
    if "forward" in module.__dict__:
        raise ValueError(f"{where} ({type(module).__name__}) already has its forward replaced, e.g. by a diffusers "
                         f"hook (caching, group offloading) or another patch; call accelerate before adding hooks")


class _Patcher:
    """Sets attributes and remembers how to put the old ones back (in reverse order)."""

    def __init__(self):
        self._undo: list[tuple[Callable[[], Optional[str]], Callable[[], None]]] = []

    def set(self, obj, name: str, value) -> None:
        if isinstance(obj, nn.Module) and name in obj._modules:
            old_module = obj._modules[name]
            obj._modules[name] = value
            self._undo.append((lambda: None, lambda: obj._modules.__setitem__(name, old_module)))
            return
        had = name in vars(obj)
        old = vars(obj).get(name)
        setattr(obj, name, value)

        def check():
            if vars(obj).get(name) is not value:
                return f"{type(obj).__name__}.{name} was replaced after accelerate"
            return None

        def restore():
            if had:
                setattr(obj, name, old)
            else:
                delattr(obj, name)

        self._undo.append((check, restore))

    def problems(self) -> list[str]:
        return [p for check, _ in self._undo if (p := check()) is not None]

    def restore_all(self) -> None:
        while self._undo:
            self._undo.pop()[1]()


class AccelerationHandle:
    """What :func:`accelerate` did; ``undo()`` restores the original objects. Also a context manager:
    ``with accelerate(pipe): ...`` undoes on exit."""

    def __init__(self, patcher: _Patcher, patched: list[str], skipped: list[str]):
        self._patcher, self.patched, self.skipped = patcher, patched, skipped
        self.active = True

    def undo(self) -> None:
        """Put every original module, processor and forward back. A second call does nothing. Raises
        RuntimeError, restoring nothing, if a patched attribute was replaced since (e.g. a hook added
        after accelerate): undoing then would drop that replacement."""
        if not self.active:
            return
        problems = self._patcher.problems()
        if problems:
            raise RuntimeError("cannot undo the sora_fast acceleration cleanly: " + "; ".join(problems[:5])
                               + ("; ..." if len(problems) > 5 else "") + ". Remove what was added after "
                               "accelerate first.")
        self._patcher.restore_all()
        self.active = False

    def __enter__(self) -> "AccelerationHandle":
        return self

    def __exit__(self, *exc) -> None:
        self.undo()

    def __repr__(self) -> str:
        state = "active" if self.active else "undone"
        return f"AccelerationHandle({state}; " + "; ".join(self.patched) + ")"
