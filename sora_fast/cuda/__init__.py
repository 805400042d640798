"""CUDA C++ kernel launchers (the ``cuda`` backend): torch tensors to the launchers of ``sora_fast._C``.

Sibling of :mod:`sora_fast.triton`. Modules here are imported lazily by :mod:`sora_fast.ops` through its
backend registry (``register_kernel(op, "cuda", "sora_fast.cuda.launchers:<function>")``), never by
models directly; they import only :mod:`sora_fast.reference`, :mod:`sora_fast.packing` and
:mod:`sora_fast._ext`. CPU tensors run the host emulation of the same CUDA source.
"""
