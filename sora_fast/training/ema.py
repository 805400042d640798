"""Exponential moving average of a model's trainable weights, kept in fp32.

    shadow ← d·shadow + (1 − d)·param       (each update; d = the decay, see EMA.current_decay)

Only parameters with ``requires_grad`` at construction are averaged (after ``apply_lora`` that is the
adapters only); buffers are copied as they are at each update. Evaluate with the averaged weights via
``with ema.swapped(): ...`` or make them permanent with ``ema.copy_to(model)``.
"""
from __future__ import annotations

import contextlib
import math
import numbers
from typing import Any, Iterator, Mapping, Optional

import torch
from torch import nn

from ..models._convert import StateDictMismatchError

__all__ = ["EMA"]


class EMA:
    """fp32 shadow copies of ``model``'s trainable parameters (plus copies of its buffers).

    model:  the trained module; create the EMA after any surgery (``apply_lora``) so it sees the final
            parameters. The shadow lives on each parameter's device.
    decay:  in [0, 1], e.g. 0.9999 for long runs, 0.999 for short ones.
    warmup: >= 0. The decay used by update number n (0-based) is ``min(decay, n / (n + warmup))``: the
            first update copies the weights and the averaging horizon grows with n (like the
            ``(1 + n) / (10 + n)`` rule of TF / DiT-era code for ``warmup=10``), reaching ``decay`` after
            ``warmup·decay / (1 − decay)`` updates, so early near-random weights are forgotten quickly
            when training from scratch. 0 (default) uses ``decay`` from the first update (fine-tuning).
    """

    def __init__(self, model: nn.Module, decay: float = 0.9999, *, warmup: float = 0.0):
        if not isinstance(model, nn.Module):
            raise TypeError(f"model must be an nn.Module, got {type(model).__name__}")
        if not isinstance(decay, numbers.Real) or isinstance(decay, bool) or not 0.0 <= decay <= 1.0:
            raise ValueError(f"decay must be a number in [0, 1], got {decay!r}")
        if not isinstance(warmup, numbers.Real) or isinstance(warmup, bool) or not (
                math.isfinite(warmup) and warmup >= 0):
            raise ValueError(f"warmup must be a finite number >= 0, got {warmup!r}")
        self.model = model
        self.decay = float(decay)
        self.warmup = float(warmup)
        self.num_updates = 0
        with torch.no_grad():
            self.params: dict[str, torch.Tensor] = {
                n: p.detach().to(torch.float32, copy=True) for n, p in model.named_parameters() if p.requires_grad
            }
            self.buffers: dict[str, torch.Tensor] = {n: b.detach().clone() for n, b in model.named_buffers()}
        if not self.params:
            raise ValueError("model has no trainable parameters (requires_grad=True) to average")

    def current_decay(self) -> float:
        """The decay the next :meth:`update` uses: ``min(decay, n / (n + warmup))``, n = updates so far."""
        if self.warmup == 0:
            return self.decay
        n = self.num_updates
        return min(self.decay, n / (n + self.warmup))

    def _model_tensors(self, model: nn.Module) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
        params = dict(model.named_parameters())
        buffers = dict(model.named_buffers())
        missing = [n for n in self.params if n not in params] + [n for n in self.buffers if n not in buffers]
        if missing:
            raise ValueError(
                f"model lacks {len(missing)} tensors the EMA tracks (e.g. {', '.join(missing[:5])}); "
                "was the model changed after the EMA was created?"
            )
        return [params[n] for n in self.params], [buffers[n] for n in self.buffers]

    @torch.no_grad()
    def update(self) -> None:
        """Move the shadow towards the model's current weights; copy its buffers."""
        params, buffers = self._model_tensors(self.model)
        weight = 1.0 - self.current_decay()
        shadow = list(self.params.values())
        torch._foreach_lerp_(shadow, [p.detach().float() for p in params], weight)
        for s, b in zip(self.buffers.values(), buffers):
            s.copy_(b)
        self.num_updates += 1

    @torch.no_grad()
    def copy_to(self, model: Optional[nn.Module] = None) -> None:
        """Write the averaged weights (cast to each parameter's dtype) and buffers into ``model``
        (default: the tracked model)."""
        params, buffers = self._model_tensors(self.model if model is None else model)
        for p, s in zip(params, self.params.values()):
            p.copy_(s)
        for b, s in zip(buffers, self.buffers.values()):
            b.copy_(s)

    @contextlib.contextmanager
    def swapped(self, model: Optional[nn.Module] = None) -> Iterator[nn.Module]:
        """``with ema.swapped(): evaluate(model)`` — the averaged weights inside, the trained ones
        restored on exit (also on an exception). Yields the model."""
        model = self.model if model is None else model
        params, buffers = self._model_tensors(model)
        with torch.no_grad():
            saved = [t.detach().clone() for t in params + buffers]
        self.copy_to(model)
        try:
            yield model
        finally:
            with torch.no_grad():
                for t, s in zip(params + buffers, saved):
                    t.copy_(s)

    def state_dict(self) -> dict[str, Any]:
        """``{"decay", "warmup", "num_updates", "params": {name: fp32 tensor}, "buffers": {name: tensor}}``
        (the live tensors, not copies)."""
        return {
            "decay": self.decay,
            "warmup": self.warmup,
            "num_updates": self.num_updates,
            "params": dict(self.params),
            "buffers": dict(self.buffers),
        }

    @torch.no_grad()
    def load_state_dict(self, state_dict: Mapping[str, Any]) -> None:
        """Restore the shadow and the update count from :meth:`state_dict`, strictly (every tensor by
        name and shape, listed in a :class:`StateDictMismatchError` otherwise). ``decay`` and ``warmup``
        stay as constructed, so a resumed run may change them."""
        for key in ("num_updates", "params", "buffers"):
            if key not in state_dict:
                raise ValueError(f"EMA state dict lacks {key!r}; it has {sorted(state_dict)}")
        problems = []
        for kind, own in (("params", self.params), ("buffers", self.buffers)):
            given = state_dict[kind]
            problems += [f"missing {kind}.{n}" for n in own if n not in given]
            problems += [f"unexpected {kind}.{n}" for n in given if n not in own]
            problems += [f"{kind}.{n} (expected {tuple(t.shape)}, got {tuple(given[n].shape)})"
                         for n, t in own.items() if n in given and tuple(given[n].shape) != tuple(t.shape)]
        if problems:
            shown = ", ".join(problems[:20]) + (f", ... ({len(problems) - 20} more)" if len(problems) > 20 else "")
            raise StateDictMismatchError(f"EMA state dict does not fit the model ({len(problems)}): {shown}")
        for kind, own in (("params", self.params), ("buffers", self.buffers)):
            for n, t in own.items():
                t.copy_(state_dict[kind][n])
        self.num_updates = int(state_dict["num_updates"])
