"""The conv3d benchmark's CPU path (``bench/bench_conv3d.py --cpu``) runs, checks and writes its rows; its
numerical gate fails the run."""
import json
import subprocess
import sys
from pathlib import Path

import pytest
from _utils import run_bench_cpu

from bench import bench_conv3d as bench

BENCH = Path(__file__).resolve().parents[1] / "bench" / "bench_conv3d.py"
COLUMNS = {"kernel", "provider", "shape", "dtype", "metric", "value", "gpu", "versions", "note"}


def test_bench_conv3d_cpu_writes_expected_rows(tmp_path):
    # --cpu: on a GPU machine the full GPU run would take minutes; this test is about the CPU-side parts.
    rows = run_bench_cpu(BENCH, "bench_conv3d", tmp_path, COLUMNS)
    by = {(r["provider"], r["shape"].split()[0], r["metric"]): r["value"] for r in rows}
    assert by[("sora_fast", "smoke", "max_abs_err_vs_fp64_ref")] < 1e-4
    # the chunked decode, Triton conv (interpreted) against the torch reference conv, in one run
    assert by[("sora_fast", "e2e_decode", "ms")] > 0 and by[("torch_ref", "e2e_decode", "ms")] > 0
    assert by[("sora_fast", "e2e_decode", "max_abs_diff_vs_torch_ref")] < 1e-4
    assert by[("sora_fast", "e2e_decode", "weight_packs_in_timed_calls")] == 0
    assert by[("sora_fast", "e2e_decode", "speedup_vs_torch_ref")] == \
        pytest.approx(by[("torch_ref", "e2e_decode", "ms")] / by[("sora_fast", "e2e_decode", "ms")], rel=1e-12)


def test_numerical_failure_fails_the_run(tmp_path, monkeypatch):
    def bad_cpu(rows, failures):
        rows.add("sora_fast", "fake", "max_abs_err", 1.0)
        failures.check("fake case", 1.0, 0.5)

    monkeypatch.setattr(bench, "run_cpu", bad_cpu)
    assert bench.main(["--cpu", "--out", str(tmp_path)]) == 1
    assert json.loads((tmp_path / "bench_conv3d.json").read_text())   # rows are written before failing


def test_tolerance_and_rotation_rules():
    import torch

    # 2x cuDNN's own bf16 error plus REL_TOL[bf16] (2e-2) x max(1, max |ref|)
    assert bench.conv_tolerance(0.01, 4.0, torch.bfloat16) == 0.02 + 2e-2 * 4.0
    assert bench.conv_tolerance(0.0, 0.5, torch.float16) == 2e-3
    l2 = 50 * 2 ** 20
    assert bench.rotations(200 * 2 ** 20, l2) == 2               # one set already exceeds L2: still alternate
    n = bench.rotations(30 * 2 ** 20, l2)
    assert n * 30 * 2 ** 20 >= 3 * l2 and (n - 1) * 30 * 2 ** 20 < 3 * l2


def test_bench_conv3d_help_documents_every_flag():
    out = subprocess.run([sys.executable, str(BENCH), "--help"], capture_output=True, text=True, timeout=60).stdout
    for flag in ("--quick", "--cpu", "--dtype", "--warmup-ms", "--rep-ms", "--no-e2e", "--e2e-frames", "--e2e-reps",
                 "--out"):
        assert flag in out
