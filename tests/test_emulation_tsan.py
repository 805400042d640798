"""ThreadSanitizer over the host emulation of the CUDA kernels: our stand-in for compute-sanitizer
racecheck (KERNELS.md §2). A small driver runs kernels/adaln.cuh (forward, and backward with its
shared-memory accumulators) through csrc/emulation.h, built with g++ -fsanitize=thread into tmp_path
from the same sources. The clean build must report nothing; a build with one __syncthreads removed
(-DSORA_FAST_RACY_FOR_TEST, kernels/common.cuh block_sum2) must report a data race, so the check is
known to work."""
import os
import shutil
import subprocess
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
CXX = os.environ.get("CXX", "g++")

DRIVER = r"""
#include "emulation.h"
#include "adaln.cuh"
#include <cstdio>
#include <vector>

using namespace sora_fast::kernels;

int main() {
  const int n = 3, d = 1024;  // 64 threads: two warps, so block_sum2's shared array is shared across warps
  std::vector<float> x(n * d), shift(2 * d), scale(2 * d), y(n * d), dy(n * d), dx(n * d);
  for (int i = 0; i < n * d; ++i) { x[i] = (i % 37) * 0.1f - 1.f; dy[i] = (i % 11) * 0.2f - 1.f; }
  for (int i = 0; i < 2 * d; ++i) { shift[i] = (i % 5) * 0.1f; scale[i] = (i % 7) * 0.05f; }
  std::vector<int> ids = {0, 1, 1}, block_seg0 = {0};
  std::vector<float> partial(2 * 2 * d);
  AdaLNArgs a;
  a.n_rows = n; a.d = d; a.x = x.data(); a.x_stride = d; a.shift = shift.data(); a.shift_stride = d;
  a.scale = scale.data(); a.scale_stride = d; a.seq_ids = ids.data(); a.y = y.data(); a.y_stride = d;
  sora_fast::emu::launch(&adaln_fwd_kernel<4, float, float>, dim3(n), dim3(64), 0, a);
  a.dy = dy.data(); a.dy_stride = d; a.dx = dx.data(); a.dx_stride = d;
  a.block_seg0 = block_seg0.data(); a.rows_per_block = n; a.partial = partial.data();
  sora_fast::emu::launch(&adaln_bwd_kernel<4, float, float>, dim3(1), dim3(64), 2 * d * sizeof(float), a);
  std::printf("ok %f %f\n", y[5], partial[7]);
  return 0;
}
"""


def _build_and_run(tmp_path: Path, racy: bool) -> subprocess.CompletedProcess:
    if shutil.which(CXX) is None:
        pytest.skip(f"no host C++ compiler ({CXX})")
    src = tmp_path / "tsan_driver.cpp"
    src.write_text(DRIVER)
    exe = tmp_path / ("racy" if racy else "clean")
    cmd = [CXX, "-std=c++20", "-O1", "-g", "-fsanitize=thread", "-pthread", f"-I{ROOT / 'csrc'}",
           f"-I{ROOT / 'kernels'}", str(src), "-o", str(exe)]
    if racy:
        cmd.insert(1, "-DSORA_FAST_RACY_FOR_TEST")
    built = subprocess.run(cmd, capture_output=True, text=True)
    if built.returncode != 0 and "sanitize" in built.stderr and "cannot find" in built.stderr:
        pytest.skip(f"{CXX} has no ThreadSanitizer runtime: {built.stderr[-300:]}")
    assert built.returncode == 0, built.stderr[-4000:]
    env = dict(os.environ, TSAN_OPTIONS="halt_on_error=0 exitcode=66 history_size=4")
    run = subprocess.run([str(exe)], capture_output=True, text=True, env=env, timeout=300)
    if "FATAL: ThreadSanitizer" in run.stderr:
        pytest.skip(f"ThreadSanitizer cannot run here: {run.stderr.strip()[:300]}")
    return run


def test_emulated_kernels_are_race_free(tmp_path):
    run = _build_and_run(tmp_path, racy=False)
    assert "WARNING: ThreadSanitizer" not in run.stderr, run.stderr[-6000:]
    assert run.returncode == 0, run.stderr[-3000:]
    assert run.stdout.startswith("ok")


def test_missing_syncthreads_is_reported(tmp_path):
    run = _build_and_run(tmp_path, racy=True)
    assert "WARNING: ThreadSanitizer: data race" in run.stderr, (run.returncode, run.stderr[-3000:])
    assert "common.cuh" in run.stderr  # the report points at the kernel source line
    assert run.returncode == 66
