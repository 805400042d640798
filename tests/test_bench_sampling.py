"""``bench/bench_sampling.py`` on a tiny random pipeline: a row per setting, the reference scoring itself
perfectly, cache rows scored against their uncached run, evaluations per video, and the table."""
import math

import pytest
import torch

from bench import bench_sampling as bench


def test_rows_and_table(tiny_pipeline):
    pipe, _ = tiny_pipeline
    prompts = ["a red circle moving left slowly", "a blue square"]
    lines = []
    rows = bench.run(pipe, prompts, [(5, 16, 16), (1, 16, 32)], guidance=3.0, seed=0, base=("unipc", 4),
                     teacache_coef=(1.0, 0.0), log=lines.append, solver_runs=[("unipc", 4), ("euler", 50)],
                     cache_runs=[("first-block", 0.0), ("teacache", 0.5)])
    assert [bench._label(r) for r in rows] == ["euler 50", "unipc 4", "unipc 4 + first-block:0",
                                               "unipc 4 + teacache:0.5"]
    ref, uni, fbc0, tea = rows
    assert ref["psnr_vs_euler50"] == math.inf and ref["evaluations_per_video"] == 100
    assert uni["evaluations_per_video"] == 8 and math.isfinite(uni["psnr_vs_euler50"])
    assert fbc0["psnr_vs_uncached"] == math.inf                      # threshold 0 recomputes every step
    assert tea["evaluations_per_video"] <= 8 and tea["psnr_vs_uncached"] is not None
    assert len(lines) == 4 and all(0 <= r["pass_rate"] <= 1 for r in rows)
    table = bench.report(rows, "n/a").splitlines()
    assert table[0].split()[:3] == ["setting", "pass", "rate"] and len(table) == 6
    no_ssim = bench._ssim_fn()[0] is None
    assert (ref["ssim_vs_euler50"] is None) == no_ssim and (no_ssim or ref["ssim_vs_euler50"] == pytest.approx(1.0))
    assert "inf" in table[1] and table[1].count("n/a") == 1 + no_ssim   # reference: no uncached row (and SSIM)


def test_psnr():
    a = torch.rand(3, 2, 4, 4)
    assert bench.psnr(a, a) == math.inf
    assert abs(bench.psnr(a, a + 0.1) - 20.0) < 1e-4
    assert abs(bench.psnr([a, a], [a, a + 0.1]) - 10 * math.log10(2 / 0.01)) < 1e-4   # pooled MSE, finite


@pytest.mark.parametrize("flag, value", [("--solvers", "unipc:x"), ("--solvers", "heun:10"),
                                         ("--caches", "teacache:-1"), ("--caches", "fast:0.1")])
def test_setting_lists_are_checked(flag, value):
    with pytest.raises(SystemExit) as e:
        bench.main(["--pipeline", "unused", flag, value])
    assert flag in str(e.value.code) and value.split(":")[0] in str(e.value.code)
