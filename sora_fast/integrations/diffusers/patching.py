"""The patching machinery: patches recorded so that ``undo()`` restores every original object, the handle
that :func:`~sora_fast.integrations.diffusers.accelerate` returns, and the checks made before patching
(what the installed diffusers provides, forwards already replaced by hooks)."""
from __future__ import annotations

from typing import Optional

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
    """Sets attributes and remembers how to put the old ones back (in reverse order).

    What it remembers is data, not closures: ``(object, name, in _modules, had it, old value, new
    value)``. A patched model's handle (stored on the model) holds its patcher, so ``copy.deepcopy`` of
    the model maps every recorded object to the copy's own (the copy's handle undoes the copy, never
    the original), and pickling the model pickles the record with it."""

    def __init__(self):
        self._entries: list[tuple] = []
        self.active = True

    def set(self, obj, name: str, value) -> None:
        if isinstance(obj, nn.Module) and name in obj._modules:
            self._entries.append((obj, name, True, True, obj._modules[name], value))
            obj._modules[name] = value
            return
        had = name in vars(obj)
        old = vars(obj).get(name)
        setattr(obj, name, value)
        self._entries.append((obj, name, False, had, old, value))

    def problems(self) -> list[str]:
        out = []
        for obj, name, in_modules, _, _, value in self._entries:
            current = obj._modules.get(name) if in_modules else vars(obj).get(name)
            if current is not value:
                out.append(f"{type(obj).__name__}.{name} was replaced after accelerate")
        return out

    def restore_all(self) -> None:
        while self._entries:
            obj, name, in_modules, had, old, _ = self._entries.pop()
            if in_modules:
                obj._modules[name] = old
            elif had:
                setattr(obj, name, old)
            else:
                delattr(obj, name)
        self.active = False


class AccelerationHandle:
    """What :func:`accelerate` did; ``undo()`` restores the original objects. Also a context manager:
    ``with accelerate(pipe): ...`` undoes on exit.

    Each accelerated model also holds a handle of its own patches (attribute ``HANDLE_ATTR``); a deep
    copy or an unpickled copy of the model holds its own copy of that handle, which acts on the copy.

    ``patched``: what was patched; ``skipped``: the pipeline components left alone; ``choices``: per model and
    op family (``"transformer.attention"``), the backend and the path it runs on the model's device."""

    def __init__(self, patchers: list[_Patcher], patched: list[str], skipped: list[str],
                 choices: Optional[dict] = None):
        self._patchers, self.patched, self.skipped = patchers, patched, skipped
        self.choices = dict(choices or {})

    @property
    def active(self) -> bool:
        """Whether some patch of this handle is still in place (False once undone)."""
        return any(p.active for p in self._patchers)

    def undo(self) -> None:
        """Put every original module, processor and forward back. A second call does nothing. Raises
        RuntimeError, restoring nothing, if a patched attribute was replaced since (e.g. a hook added
        after accelerate): undoing then would drop that replacement."""
        if not self.active:
            return
        problems = [q for p in self._patchers if p.active for q in p.problems()]
        if problems:
            raise RuntimeError("cannot undo the sora_fast acceleration cleanly: " + "; ".join(problems[:5])
                               + ("; ..." if len(problems) > 5 else "") + ". Remove what was added after "
                               "accelerate first.")
        for p in reversed(self._patchers):
            p.restore_all()

    def __enter__(self) -> "AccelerationHandle":
        return self

    def __exit__(self, *exc) -> None:
        self.undo()

    def __repr__(self) -> str:
        state = "active" if self.active else "undone"
        return f"AccelerationHandle({state}; " + "; ".join(self.patched) + ")"
