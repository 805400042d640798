"""What the offline kernel report compiles: every shipped config of every Triton kernel.

Each kernel module exposes ``shipped_configs() -> list[KernelConfig]``, the configs its launcher can
pick on a GPU, with the argument types and the 16-byte alignment hints the runtime would pass (without
them the compiled code, and so the spill and instruction counts, are not the ones that run).
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable


@dataclass(frozen=True)
class KernelConfig:
    name: str                           # readable id, e.g. "attention_fwd d128 bf16 m128 n64"
    fn: Callable                        # the @triton.jit function (needs TRITON_INTERPRET unset)
    signature: dict[str, str]           # every runtime argument -> "*bf16", "*fp32", "*i32", "i32", "fp32"
    constexprs: dict[str, Any]          # constexpr argument -> value
    num_warps: int
    num_stages: int
    divisible_by_16: tuple[str, ...] = field(default=())   # pointer / int arguments hinted 16-divisible
    tensor_core: bool = True            # gate: HGMMA must appear in the SASS
    async_copy: bool = False            # gate: cp.async (LDGSTS) or TMA (UTMALDG) must appear in the SASS
