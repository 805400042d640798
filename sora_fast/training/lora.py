"""LoRA: low-rank adapters on a model's linear layers, for fine-tuning with a frozen base.

``y = x·Wᵀ + b + (alpha / rank)·dropout(x)·Aᵀ·Bᵀ`` with ``A (rank, in)`` Kaiming-initialised and
``B (out, rank)`` zero, so a freshly adapted model computes exactly what the base did.
:class:`LoRALinear` *is* an ``nn.Linear`` holding the base ``weight``/``bias`` under their usual names, so
a LoRA model still loads base checkpoints; adapters live at ``<name>.lora_A.weight``,
``<name>.lora_B.weight`` (the diffusers / PEFT key layout) and ``<name>.lora_alpha`` (a 0-d buffer, so a
saved adapter carries its scaling).
"""
from __future__ import annotations

import fnmatch
import math
import numbers
from typing import Mapping, Optional, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from ..models._convert import StateDictMismatchError

__all__ = [
    "DEFAULT_TARGETS",
    "LoRALinear",
    "apply_lora",
    "lora_state_dict",
    "load_lora",
    "merge_lora",
    "remove_lora",
]

# Attention projections and FFN linears under the common naming schemes: sora_fast's VideoDiT
# (attn1/attn2.to_q/to_k/to_v/to_out, ffn.0/ffn.2), Wan2.1 originals (self_attn.q/k/v/o, ffn.0/ffn.2),
# diffusers (attn1.to_q … to_out.0, ffn.net.0.proj, ffn.net.2), and fused / DiT-style (qkv, attn.proj,
# mlp.fc1/fc2). Embedders, time projections and the output head are left alone. fnmatch globs (see apply_lora).
DEFAULT_TARGETS = (
    "q", "k", "v", "o", "qkv", "kv",
    "to_q", "to_k", "to_v", "to_out", "to_out.0", "to_qkv", "to_kv",
    "attn*.proj", "attn*.out", "attn*.out_proj",
    "ffn.*", "mlp.*",
)

_ADAPTER_SUFFIXES = (".lora_A.weight", ".lora_B.weight", ".lora_alpha")


class LoRALinear(nn.Linear):
    """An ``nn.Linear`` with a frozen base and a trainable rank-``rank`` update.

    Built from an existing ``nn.Linear`` whose ``weight`` / ``bias`` Parameters it takes over (no copy).
    input ``(..., in_features)`` -> output ``(..., out_features)``.
    lora_A: ``nn.Linear(in, rank)`` Kaiming-uniform (nn.Linear's default), lora_B: ``nn.Linear(rank, out)``
    zeros, both without bias, in the base weight's dtype and device. scaling = ``lora_alpha / rank``.
    """

    def __init__(self, base: nn.Linear, rank: int, alpha: float, dropout: float = 0.0):
        nn.Module.__init__(self)  # not nn.Linear.__init__: it would allocate a second weight
        self.in_features, self.out_features = base.in_features, base.out_features
        self.weight = base.weight
        self.bias = base.bias
        self.rank = rank
        w = base.weight
        self.lora_A = nn.Linear(self.in_features, rank, bias=False, device=w.device, dtype=w.dtype)
        self.lora_B = nn.Linear(rank, self.out_features, bias=False, device=w.device, dtype=w.dtype)
        nn.init.kaiming_uniform_(self.lora_A.weight, a=math.sqrt(5))
        nn.init.zeros_(self.lora_B.weight)
        self.register_buffer("lora_alpha", torch.tensor(float(alpha), dtype=torch.float32, device=w.device))
        self.lora_dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()

    @property
    def scaling(self) -> torch.Tensor:
        """``alpha / rank`` as a 0-d tensor (no host sync in forward)."""
        return self.lora_alpha / self.rank

    def delta_weight(self) -> torch.Tensor:
        """``scaling · B·A``, ``(out, in)`` in fp32: what merging adds to ``weight``."""
        return (self.lora_B.weight.float() @ self.lora_A.weight.float()) * self.scaling.float()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = F.linear(x, self.weight, self.bias)  # (..., out)
        update = self.lora_B(self.lora_A(self.lora_dropout(x)))  # (..., out)
        return y + update * self.scaling.to(update.dtype)

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features}, out_features={self.out_features}, bias={self.bias is not None}, "
                f"rank={self.rank}")

    def to_linear(self, merge: bool) -> nn.Linear:
        """A plain ``nn.Linear`` sharing this layer's ``weight``/``bias`` Parameters (``requires_grad``
        unchanged); with ``merge`` the update ``scaling·B·A`` is first added to the weight in place."""
        if merge:
            with torch.no_grad():
                self.weight.copy_((self.weight.float() + self.delta_weight()).to(self.weight.dtype))
        lin = nn.Linear(1, 1, bias=False, device="meta")  # placeholder sizes, replaced below
        lin.in_features, lin.out_features = self.in_features, self.out_features
        lin.weight = self.weight
        lin.bias = self.bias
        return lin


def _matches(name: str, patterns: Sequence[str]) -> bool:
    return any(fnmatch.fnmatchcase(name, p) or fnmatch.fnmatchcase(name, "*." + p) for p in patterns)


def _set_submodule(model: nn.Module, name: str, module: nn.Module) -> None:
    parent_name, _, child = name.rpartition(".")
    parent = model.get_submodule(parent_name) if parent_name else model
    setattr(parent, child, module)


def _lora_modules(model: nn.Module) -> list[tuple[str, LoRALinear]]:
    return [(n, m) for n, m in model.named_modules() if isinstance(m, LoRALinear)]


def apply_lora(
    model: nn.Module,
    rank: int,
    alpha: Optional[float] = None,
    targets: Sequence[str] = DEFAULT_TARGETS,
    dropout: float = 0.0,
) -> list[str]:
    """Replace every matching ``nn.Linear`` of ``model`` by a :class:`LoRALinear`; freeze everything else.

    rank:    int >= 1.
    alpha:   scaling numerator (scaling = alpha / rank); default ``rank`` (scaling 1).
    targets: fnmatch patterns over dotted module names; a pattern matches a module whose full name it
             matches or whose name ends with ``"." + pattern`` (so ``"q"`` matches ``blocks.3.attn.q`` and
             ``"ffn.*"`` every linear under an ``ffn``). Only modules of type exactly ``nn.Linear`` are
             adapted (not subclasses such as MultiheadAttention's out_proj, whose forward is bypassed).
    dropout: dropout probability on the adapter's input, in [0, 1).
    Afterwards only the adapters' A and B are trainable. Modifies ``model`` in place; returns the
    adapted module names. Raises ValueError for a bad rank / alpha / dropout, when no linear matches
    (listing the linear layers there are), or when the model already has LoRA layers.
    """
    if not isinstance(rank, numbers.Integral) or isinstance(rank, bool) or rank < 1:
        raise ValueError(f"rank must be an int >= 1, got {rank!r}")
    if alpha is None:
        alpha = float(rank)
    if not isinstance(alpha, numbers.Real) or isinstance(alpha, bool) or not math.isfinite(alpha) or alpha <= 0:
        raise ValueError(f"alpha must be a finite number > 0 (or None for alpha = rank), got {alpha!r}")
    if not isinstance(dropout, numbers.Real) or not 0 <= dropout < 1:
        raise ValueError(f"dropout must be in [0, 1), got {dropout!r}")
    if isinstance(targets, str):
        targets = (targets,)
    if not targets or not all(isinstance(p, str) and p for p in targets):
        raise ValueError(f"targets must be a non-empty sequence of non-empty name patterns, got {targets!r}")
    existing = _lora_modules(model)
    if existing:
        raise ValueError(
            f"model already has {len(existing)} LoRA layers (e.g. {existing[0][0]}); "
            "call merge_lora or remove_lora before applying LoRA again"
        )
    linears = [(n, m) for n, m in model.named_modules() if type(m) is nn.Linear]
    chosen = [(n, m) for n, m in linears if _matches(n, targets)]
    if not chosen:
        names = [n for n, _ in linears]
        shown = ", ".join(names[:40]) + (f", ... ({len(names) - 40} more)" if len(names) > 40 else "")
        raise ValueError(
            f"no nn.Linear matches targets={tuple(targets)}; the model's linear layers are: "
            + (shown or "(none)")
        )
    for p in model.parameters():
        p.requires_grad_(False)
    for n, m in chosen:
        _set_submodule(model, n, LoRALinear(m, int(rank), float(alpha), float(dropout)))
    return [n for n, _ in chosen]


def lora_state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    """The adapters only: ``{<name>.lora_A.weight: (rank, in), <name>.lora_B.weight: (out, rank),
    <name>.lora_alpha: ()}`` for every :class:`LoRALinear`, detached, on their current device."""
    if not _lora_modules(model):
        raise ValueError("model has no LoRA layers; call apply_lora first")
    return {k: v.detach() for k, v in model.state_dict().items() if k.endswith(_ADAPTER_SUFFIXES)}


def load_lora(model: nn.Module, state_dict: Mapping[str, torch.Tensor]) -> None:
    """Load adapters saved by :func:`lora_state_dict` into a model with the same LoRA layers, strictly.

    Raises :class:`StateDictMismatchError` (a ValueError) listing, by name, missing and unexpected
    adapter tensors and shape mismatches (a different rank shows here) before anything is copied.
    """
    own = lora_state_dict(model)
    missing = sorted(k for k in own if k not in state_dict)
    unexpected = sorted(k for k in state_dict if k not in own)
    bad = sorted(f"{k} (expected {tuple(own[k].shape)}, got {tuple(state_dict[k].shape)})"
                 for k in own if k in state_dict and tuple(state_dict[k].shape) != tuple(own[k].shape))
    if missing or unexpected or bad:
        parts = [f"{title} ({len(names)}): {', '.join(names[:20])}" + (" ..." if len(names) > 20 else "")
                 for title, names in (("missing", missing), ("unexpected", unexpected), ("shape mismatch", bad))
                 if names]
        raise StateDictMismatchError("LoRA state dict does not fit the model's adapters: " + "; ".join(parts))
    model.load_state_dict(dict(state_dict), strict=False)  # only adapter keys, all checked above


def merge_lora(model: nn.Module) -> list[str]:
    """Fold every adapter into its base weight (``W += alpha/rank · B·A``, computed in fp32) and put a
    plain ``nn.Linear`` back in its place; the model's output is unchanged up to rounding of W.
    ``requires_grad`` of the base weights is left as it is (frozen after apply_lora). Returns the names."""
    mods = _lora_modules(model)
    if not mods:
        raise ValueError("model has no LoRA layers to merge")
    for n, m in mods:
        _set_submodule(model, n, m.to_linear(merge=True))
    return [n for n, _ in mods]


def remove_lora(model: nn.Module) -> list[str]:
    """Drop every adapter without merging (the base model comes back exactly). Returns the names."""
    mods = _lora_modules(model)
    if not mods:
        raise ValueError("model has no LoRA layers to remove")
    for n, m in mods:
        _set_submodule(model, n, m.to_linear(merge=False))
    return [n for n, _ in mods]
