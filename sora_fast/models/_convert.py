"""Loading converted state dicts with every problem named: missing, unexpected and mis-shaped tensors."""
from __future__ import annotations

from typing import Mapping

import torch

__all__ = ["load_converted", "StateDictMismatchError"]


class StateDictMismatchError(ValueError):
    """A state dict that does not fit a model; the message lists every offending tensor by name."""


def _listing(title: str, names: list[str], limit: int = 20) -> str:
    """``title (n): a, b, ... (k more)``: the named problems of an error message (converters, checkpoints)."""
    shown = ", ".join(names[:limit]) + (f", ... ({len(names) - limit} more)" if len(names) > limit else "")
    return f"{title} ({len(names)}): {shown}"


def load_converted(module: torch.nn.Module, state_dict: Mapping[str, torch.Tensor], source: str, *,
                   assign: bool = False) -> None:
    """Copy ``state_dict`` into ``module`` strictly (``assign=True``: take its tensors as the module's own,
    no copy, e.g. into a module built on the meta device).

    Raises :class:`StateDictMismatchError` (a ValueError) that lists, by name, the tensors the module
    expects but ``state_dict`` lacks, the ones it has that the module does not, and the ones whose
    shapes differ (with both shapes). ``source`` says where the state dict came from, for the message.
    """
    if not isinstance(state_dict, Mapping):
        raise TypeError(f"state_dict must be a mapping of name -> tensor, got {type(state_dict).__name__}")
    own = module.state_dict()
    missing = sorted(k for k in own if k not in state_dict)
    unexpected = sorted(k for k in state_dict if k not in own)
    bad_shape = sorted(
        f"{k} (expected {tuple(own[k].shape)}, got {tuple(state_dict[k].shape)})"
        for k in own if k in state_dict and tuple(own[k].shape) != tuple(state_dict[k].shape)
    )
    if missing or unexpected or bad_shape:
        parts = [_listing(t, n) for t, n in (("missing", missing), ("unexpected", unexpected),
                                             ("shape mismatch", bad_shape)) if n]
        raise StateDictMismatchError(
            f"{source} does not fit {type(module).__name__}: " + "; ".join(parts)
        )
    module.load_state_dict(state_dict, strict=True, assign=assign)
