"""Kernel benchmarks as a command: ``sora-fast bench`` (:func:`run_bench`), every op across providers side by side.

:mod:`sora_fast.bench.suites` says what is measured (cases, providers, roofline work, the independent
reference each provider is checked against); :mod:`sora_fast.bench.runner` checks, times (pytest-benchmark on
a CPU, ``triton.testing.do_bench`` on a GPU) and writes the rows, JSON, CSV and plots. What the runner and the
``bench/bench_<op>.py`` scripts share has one home each: floors and tolerance (:mod:`~sora_fast.bench.floors`),
versions, rows and writers (:mod:`~sora_fast.bench.report`), timing (:mod:`~sora_fast.bench.timing`) and the
common flags (:mod:`~sora_fast.bench.args`).
"""
from .runner import COLUMNS, FLOORS, main, run_bench
from .suites import PROVIDERS, SUITES, Skip

__all__ = ["run_bench", "main", "COLUMNS", "FLOORS", "PROVIDERS", "SUITES", "Skip"]
