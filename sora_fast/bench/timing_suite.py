"""The pytest module ``sora-fast bench`` runs to time CPU providers with pytest-benchmark.

It is collected only when :func:`sora_fast.bench.runner.time_with_pytest_benchmark` passes it to
``pytest.main`` together with a plugin that parametrizes ``bench_item`` with the providers that passed
their correctness check. Each item is timed with ``benchmark.pedantic`` (one call per round, a warm-up
round first); the runner reads the rounds back from ``--benchmark-json``.
"""


def test_provider(bench_item, benchmark):
    benchmark.group = bench_item.group
    benchmark.extra_info["key"] = bench_item.key
    benchmark.pedantic(bench_item.fn, rounds=bench_item.rounds, warmup_rounds=1, iterations=1)
