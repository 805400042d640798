"""What ``sora_fast.bench`` shares with the ``bench/`` scripts: versions in each script's order, one row writer,
the tolerance and roofline rules, interleaved timing, the common flags; the scripts import them and run as files."""
import csv
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from bench import bench_adaln, bench_attention, bench_conv3d, bench_system
from sora_fast.bench import args as cli
from sora_fast.bench import floors, report, runner, suites, timing

ROOT = Path(__file__).resolve().parents[1]


def test_versions_keep_each_scripts_order_and_form():
    v = report.versions(("torch", "cuda", "python", "no_such_module_here"), cuda_as_text=True)
    assert list(v) == ["torch", "cuda", "python"] and v["cuda"] == str(torch.version.cuda)
    if torch.version.cuda is None:
        assert "cuda" not in report.versions(("torch", "cuda"))
    assert list(runner.versions())[:3] == ["sora_fast", "torch", "python"]
    assert list(bench_attention.versions())[:3] == ["torch", "cuda", "python"]
    assert bench_adaln._versions().startswith(f"torch {torch.__version__}, sora_fast ")
    assert bench_conv3d.versions().startswith(f"torch {torch.__version__}, triton ")


def test_one_row_writer(tmp_path):
    rows = report.Rows("gpu0", "bf16", {"torch": "x", "a": "b"}, kernel="k")
    rows.add("p", "s", "ms", 1.5)
    rows.add("p", "s", "tflops", None, kernel="k2", note="n", dtype="-")
    jpath, cpath = rows.write(tmp_path, "bench_x")
    assert json.loads(jpath.read_text()) == rows.rows and not jpath.read_text().endswith("\n")
    with cpath.open() as f:
        table = list(csv.DictReader(f))
    assert list(table[0]) == ["kernel", "provider", "shape", "dtype", "metric", "value", "gpu", "versions", "note"]
    assert json.loads(table[0]["versions"]) == {"a": "b", "torch": "x"} and table[1]["value"] == ""
    assert [r["kernel"] for r in table] == ["k", "k2"] and table[1]["dtype"] == "-"
    plain = report.Rows("g", "d", "torch 1", notes=False)
    plain.add("p", "s", "m", 1, kernel="k")
    assert "note" not in plain.rows[0] and plain.rows[0]["versions"] == "torch 1"


def test_tolerance_and_roofline_rules():
    assert floors.check_tolerance(0.01, 4.0, torch.bfloat16) == 0.02 + 2e-2 * 4.0
    assert floors.check_tolerance(0.0, 0.5, torch.float32) == 1e-5
    assert floors.throughput(2e12, 1000.0, "TFLOP/s") == 2.0 and floors.throughput(3e9, 1000.0, "GB/s") == 3.0
    assert floors.pct_of_floor(494.5, 989.0) == 50.0 and floors.pct_of_floor(1.0, None) is None
    assert floors.floor_for("NVIDIA H200", "GB/s") == 4800.0 and floors.floor_for("cpu", "GB/s") is None
    # one home: the runner and the scripts use these objects, not copies
    assert runner.FLOORS is floors.FLOORS and runner.REL_TOL is floors.REL_TOL and runner.COLUMNS is report.COLUMNS
    assert bench_conv3d.conv_tolerance is floors.check_tolerance and bench_conv3d.rotations is timing.rotations
    assert bench_attention.Skip is suites.Skip and bench_system.time_interleaved is timing.time_interleaved
    assert bench_adaln.throughput is floors.throughput


def test_interleaved_timing():
    calls, syncs, last = [], [], {}
    fns = {"a": lambda: calls.append("a") or 1, "b": lambda: calls.append("b") or 2}
    times = timing.interleaved_times(fns, reps=3, warmup=1, sync=lambda: syncs.append(1), last=last)
    assert calls == ["a", "b"] * 4 and len(syncs) == 2 * 6 and last == {"a": 1, "b": 2}
    assert {k: len(v) for k, v in times.items()} == {"a": 3, "b": 3} and min(times["a"]) >= 0
    medians = timing.time_interleaved(fns, reps=3, warmup=0)
    assert set(medians) == {"a", "b", "min:a", "min:b"} and medians["min:a"] <= medians["a"]
    assert timing.do_bench_budget(True) == (25.0, 100.0) and timing.do_bench_budget(False) == (100.0, 500.0)


def test_common_flags_and_threads():
    p = cli.script_parser("doc")
    cli.add_cpu_flag(p, "cpu only")
    cli.add_out_flag(p, "where", ROOT / "bench" / "results")
    cli.add_dtype_flag(p)
    cli.add_do_bench_flags(p)
    p.add_argument("--quick", action="store_true")
    a = p.parse_args(["--quick", "--dtype", "fp16"])
    cli.resolve_do_bench(a)
    assert (a.warmup_ms, a.rep_ms) == (25.0, 100.0) and cli.GPU_DTYPES[a.dtype] is torch.float16
    assert a.out == ROOT / "bench" / "results" and a.cpu is False
    with pytest.raises(SystemExit, match="--val must be >= 1, got 0"):
        cli.check_at_least("--val", 0, 1, cli.exit_with)
    cli.check_at_least("--val", None, 1, cli.exit_with)
    threads = torch.get_num_threads()
    with cli.torch_threads(1):
        assert torch.get_num_threads() == 1
    assert torch.get_num_threads() == threads


def test_conv3d_rows_import_triton_only_at_the_first_row():
    """The CPU path chooses the Triton interpreter before triton is imported: making the rows must not import it."""
    code = ("import sys; from bench import bench_conv3d as b; r = b.Rows('none', 'fp32'); "
            "print('triton' in sys.modules, r.versions)")
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, cwd=ROOT, env=env)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.split() == ["False", "None"]


def test_a_script_that_imports_another_runs_as_a_file():
    """``python bench/bench_diffusers_accelerate.py`` imports ``bench.bench_system``: the script puts the checkout
    on sys.path itself."""
    proc = subprocess.run([sys.executable, str(ROOT / "bench" / "bench_diffusers_accelerate.py"), "--help"],
                          capture_output=True, text=True, timeout=120, cwd=ROOT / "tests")
    assert proc.returncode == 0, proc.stderr
    for flag in ("--quick", "--reps", "--threads", "--json"):
        assert flag in proc.stdout
