"""Triton kernels (tensor-core work: packed spacetime attention, causal conv3d as implicit GEMM).

Kernel modules here are imported lazily by :mod:`sora_fast.ops` through its backend registry
(``register_kernel(op, "triton", "sora_fast.triton.<module>:<function>")``), never by models
directly; they import only :mod:`sora_fast.reference` (an op's meaning: fallbacks, shape rules),
:mod:`sora_fast.packing` and each other. On CPU tensors they run under the Triton interpreter
(``TRITON_INTERPRET=1``, set before the first kernel module is imported).
"""
