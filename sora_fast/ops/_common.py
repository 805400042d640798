"""Helpers shared by the op families: argument validation with clear messages. The references' helpers
(math dtype, output layout, reference backward) live in :mod:`sora_fast.reference._common`."""
from __future__ import annotations

import math
from typing import Optional, Sequence, Union

import torch

from ..reference._common import like_layout, math_dtype, reference_vjp  # noqa: F401  (re-exported)

FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)


def _fmt_shape(t: torch.Tensor) -> str:
    return str(tuple(t.shape))


def check_tensor(name: str, t, *, ndim: Optional[int] = None, layout: str = "",
                 dtypes: Optional[Sequence[torch.dtype]] = None, device: Optional[torch.device] = None) -> None:
    """TypeError unless ``t`` is a tensor; ValueError on rank, dtype or device mismatch."""
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
    if ndim is not None and t.dim() != ndim:
        raise ValueError(f"{name} must be a {ndim}-D tensor {layout}, got shape {_fmt_shape(t)}".replace("  ", " "))
    if dtypes is not None and t.dtype not in dtypes:
        names = ", ".join(str(d).replace("torch.", "") for d in dtypes)
        raise ValueError(f"{name} must have dtype in ({names}), got {str(t.dtype).replace('torch.', '')}")
    if device is not None and t.device != device:
        raise ValueError(f"{name} must be on {device} like the main input, got {t.device}")


def check_float(name: str, t, *, ndim: Optional[int] = None, layout: str = "", device=None) -> None:
    check_tensor(name, t, ndim=ndim, layout=layout, dtypes=FLOAT_DTYPES, device=device)


def check_positive(name: str, value) -> None:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not (0 < value < math.inf):
        raise ValueError(f"{name} must be a positive number, got {value!r}")


def empty_grad(g: Optional[torch.Tensor], like: torch.Tensor) -> torch.Tensor:
    """Custom ops cannot return None: absent gradients travel as empty tensors."""
    return g if g is not None else like.new_empty(0)


def check_same_dtype(name: str, t: torch.Tensor, ref_name: str, ref: torch.Tensor) -> None:
    if t.dtype != ref.dtype:
        raise ValueError(f"{name} must have the dtype of {ref_name} ({ref.dtype}), got {t.dtype}")


def check_shape(name: str, t: torch.Tensor, expected: Sequence[int], what: str = "") -> None:
    if tuple(t.shape) != tuple(expected):
        exp = str(tuple(expected))
        raise ValueError(f"{name} must have shape {exp}{' ' + what if what else ''}, got {_fmt_shape(t)}")


def check_int_tuple(name: str, value, n: int, *, minimum: int = 0) -> tuple[int, ...]:
    """Accept an int (repeated n times) or a sequence of n ints, each >= minimum."""
    if isinstance(value, bool):
        raise TypeError(f"{name} must be an int or a tuple of {n} ints, got {value!r}")
    if isinstance(value, int):
        value = (value,) * n
    try:
        out = tuple(value)
    except TypeError:
        raise TypeError(f"{name} must be an int or a tuple of {n} ints, got {type(value).__name__}") from None
    if len(out) != n or not all(isinstance(v, int) and not isinstance(v, bool) for v in out):
        raise ValueError(f"{name} must be {n} ints, got {value!r}")
    if any(v < minimum for v in out):
        raise ValueError(f"{name} must be {n} ints >= {minimum}, got {out}")
    return out


def check_window(name: str, value) -> Optional[tuple[int, int, int]]:
    """None, or a local attention window ``(wt, wh, ww)``: exactly 3 ints >= 0, half-sizes in latent patches
    (a tuple or list; numpy ints too). TypeError for a non-sequence or a non-int entry, ValueError for the
    wrong count or a negative value; each names ``name``, what is expected and what was received."""
    import numbers

    if value is None:
        return None
    expected = f"{name} must be None or (wt, wh, ww): 3 ints >= 0, half-sizes in latent patches"
    if not isinstance(value, (tuple, list)):
        raise TypeError(f"{expected}, got {type(value).__name__} {value!r}")
    if len(value) != 3:
        raise ValueError(f"{expected}, got {len(value)} values {tuple(value)!r}")
    for v in value:
        if isinstance(v, bool) or not isinstance(v, numbers.Integral):
            raise TypeError(f"{expected}, got {tuple(value)!r} (a {type(v).__name__})")
    out = tuple(int(v) for v in value)
    if min(out) < 0:
        raise ValueError(f"{expected}, got {out!r}")
    return out


def check_index_values(name: str, ids: torch.Tensor, bound: int, what: str) -> None:
    """Values of an index vector lie in [0, bound): kernels index tables with them, unchecked."""
    if ids.numel() == 0:
        return
    lo, hi = int(ids.min()), int(ids.max())
    if lo < 0 or hi >= bound:
        raise ValueError(f"{name} values must lie in [0, {bound}) ({what}), got min {lo}, max {hi}")


def check_cu_seqlens_values(name: str, cu: Union[torch.Tensor, Sequence[int]], n_tokens: int) -> list[int]:
    """cu_seqlens (a tensor, or its values already read to the host) starts at 0, never decreases and
    ends at the token count; returns it as a list."""
    vals = cu.tolist() if isinstance(cu, torch.Tensor) else list(cu)
    if vals[0] != 0:
        raise ValueError(f"{name}[0] must be 0, got {vals[0]}")
    for i in range(1, len(vals)):
        if vals[i] < vals[i - 1]:
            raise ValueError(f"{name} must be non-decreasing, "
                             f"got {name}[{i - 1}]={vals[i - 1]} > {name}[{i}]={vals[i]}")
    if vals[-1] != n_tokens:
        raise ValueError(f"{name}[-1] must equal the number of tokens ({n_tokens}), got {vals[-1]}")
    return vals
