"""The adaLN benchmark's CPU path (``bench/bench_adaln.py --cpu``): it says GB/s needs a GPU, checks the
emulated kernels against the reference, and exits 0 only when they agree."""
import os
import subprocess
import sys
from pathlib import Path

from bench import bench_adaln as bench

BENCH = Path(__file__).resolve().parents[1] / "bench" / "bench_adaln.py"


def _run(*args):
    return subprocess.run([sys.executable, str(BENCH), *args], capture_output=True, text=True, timeout=120,
                          env=dict(os.environ, OMP_NUM_THREADS="1"))


def test_bench_adaln_cpu_path_says_so_and_checks_the_emulated_kernels(tmp_path):
    # --cpu: on a GPU machine the real benchmark takes minutes; this test is about the CPU path.
    proc = _run("--cpu", "--out", str(tmp_path))
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "GB/s needs a GPU" in proc.stdout
    assert "x_new identical" in proc.stdout and proc.stdout.rstrip().endswith("-> OK"), proc.stdout
    assert not list(tmp_path.iterdir())  # no GPU rows are written by the CPU path


def test_bench_adaln_smoke_fails_when_the_kernel_is_wrong(monkeypatch):
    """The smoke's verdict is real: a kernel off by two bf16 ulps on y (a relative 2**-6) fails it."""
    import sora_fast.ops as O

    real = O.gated_residual_adaln

    def off_by_two_ulps(*a, **k):
        x_new, y = real(*a, **k)
        return x_new, (y.float() * (1 + 2.0 ** -6)).to(y.dtype)

    assert bench.cpu_smoke()
    monkeypatch.setattr(O, "gated_residual_adaln", off_by_two_ulps)
    assert not bench.cpu_smoke()


def test_bench_adaln_byte_counts_are_the_floors_of_kernels_md():
    """Bytes per element and pass: read x + write y (2), gated also branch in and x_new out (4); the
    backward reads x, dy (+ branch, dx_new) and writes dx (+ dbranch)."""
    assert bench.BYTES_PER_ELEM_PASS == {("adaln_modulate", "fwd"): 2, ("gated_residual_adaln", "fwd"): 4,
                                         ("adaln_modulate", "bwd"): 3, ("gated_residual_adaln", "bwd"): 6}
    assert bench.SHAPES == {"wan1.3b-480p": (32760, 1536), "wan14b-720p": (75600, 5120)}
    assert bench.TARGET_PCT_OF_COPY == 85.0


def test_bench_adaln_help_documents_every_flag():
    out = _run("--help").stdout
    for flag in ("--out", "--cpu"):
        assert flag in out
