"""The per-op benchmark scripts, importable as ``bench.bench_<op>`` (the tests do) and runnable as
``python bench/bench_<op>.py``. Each keeps its cases, providers and FLOP/byte counts; floors, tolerance,
versions, writers, timing and the common flags come from :mod:`sora_fast.bench`."""
