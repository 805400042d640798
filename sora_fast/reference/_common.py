"""Helpers shared by the references: their math dtype, the memory format of their outputs, and the
reference backward (a vector-Jacobian product through a reference function)."""
from __future__ import annotations

from typing import Callable, Optional, Sequence

import torch


def math_dtype(dtype: torch.dtype) -> torch.dtype:
    """References compute in fp32; fp64 inputs (gradcheck) stay in fp64."""
    return torch.float64 if dtype == torch.float64 else torch.float32


def like_layout(out: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """Give a 5-D output x's memory format (channels_last_3d in, channels_last_3d out)."""
    if x.dim() == 5 and not x.is_contiguous() and x.is_contiguous(memory_format=torch.channels_last_3d):
        return out.contiguous(memory_format=torch.channels_last_3d)
    return out.contiguous()


def reference_vjp(fn: Callable, inputs: dict, grads: Sequence[Optional[torch.Tensor]],
                  differentiable: Sequence[str], **static) -> dict:
    """Gradients of ``fn(**inputs, **static)`` w.r.t. the tensors named in ``differentiable``.

    The reference backward of every op: a vector-Jacobian product through its plain-torch reference.
    ``grads`` match fn's outputs (a tensor or a tuple); None entries count as zeros. Returns
    name -> gradient, or None for an absent input. ``torch.func.vjp`` is used rather than
    ``torch.autograd.grad`` because custom-op implementations run with autograd dispatch disabled.
    """
    names = [k for k in differentiable if inputs.get(k) is not None]
    result = {k: None for k in differentiable}
    if not names:
        return result

    def call(*primals):
        return fn(**{**inputs, **dict(zip(names, primals))}, **static)

    outs, vjp_fn = torch.func.vjp(call, *(inputs[k] for k in names))
    single = not isinstance(outs, tuple)
    outs_t = (outs,) if single else outs
    cot = tuple(torch.zeros_like(o) if g is None else g.to(o.dtype) for o, g in zip(outs_t, grads))
    got = vjp_fn(cot[0] if single else cot)
    # A custom op may not return an alias of an input or of another output (the gradient of a plain
    # add is the incoming gradient itself): copy those.
    seen = {t.untyped_storage().data_ptr() for t in (*inputs.values(), *grads) if isinstance(t, torch.Tensor)}
    for k, g in zip(names, got):
        ptr = g.untyped_storage().data_ptr()
        result[k] = g.clone() if ptr in seen else g
        seen.add(ptr)
    return result
