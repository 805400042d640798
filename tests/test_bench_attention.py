"""The attention benchmark's CPU path (``bench/bench_attention.py --quick --cpu``) runs and writes its rows."""
import re
import subprocess
import sys
from pathlib import Path

import pytest
from _utils import run_bench_cpu

from sora_fast.triton import attention as tri

BENCH = Path(__file__).resolve().parents[1] / "bench" / "bench_attention.py"
COLUMNS = {"kernel", "provider", "shape", "dtype", "metric", "value", "gpu", "versions", "note"}


def test_bench_attention_cpu_quick_writes_expected_rows(tmp_path):
    # --cpu: on a GPU machine the quick GPU run would take minutes; this test is about the CPU-side parts.
    rows = run_bench_cpu(BENCH, "bench_attention", tmp_path, COLUMNS, "--quick", timeout=120)
    assert all("torch" in r["versions"] for r in rows)
    by = {(r["kernel"], r["provider"], r["shape"].split()[0], r["metric"]): r["value"] for r in rows}

    # Window block density for every benchmark shape: a fraction, and visited + skipped add up.
    for shape in ("wan480", "wan720", "packed4"):
        density = by[("spacetime_attention_window", "sora_fast", shape, "block_density")]
        visited = by[("spacetime_attention_window", "sora_fast", shape, "visited_blocks")]
        total = by[("spacetime_attention_window", "sora_fast", shape, "total_blocks")]
        assert 0 < density < 1 and visited / total == density
        skipped = by[("spacetime_attention_window", "sora_fast", shape, "skipped_block_fraction")]
        assert abs(skipped + density - 1) < 1e-12
        # the backward is credited with the density at the dK/dV kernel's (smaller) tiles
        bwd = by[("spacetime_attention_window", "sora_fast", shape, "block_density_bwd")]
        assert 0 < bwd < 1
    note = next(r["note"] for r in rows if r["metric"] == "block_density_bwd" and r["shape"].startswith("wan480"))
    bm, bn, visited, total = (int(x) for x in re.search(r"BLOCK_M=(\d+) BLOCK_N=(\d+): (\d+)/(\d+)", note).groups())
    assert (bm, bn) == (tri.BWD_BLOCK_M, tri.BWD_BLOCK_N) and total == -(-32760 // bm) * -(-32760 // bn)
    assert by[("spacetime_attention_window", "sora_fast", "wan480", "block_density_bwd")] == visited / total

    # Wan 480p in one sequence: cdiv(32760, BLOCK_M) x cdiv(32760, BLOCK_N) block pairs.
    note = next(r["note"] for r in rows if r["metric"] == "total_blocks" and r["shape"].startswith("wan480"))
    bm, bn = (int(re.search(rf"{k}=(\d+)", note).group(1)) for k in ("BLOCK_M", "BLOCK_N"))
    total = by[("spacetime_attention_window", "sora_fast", "wan480", "total_blocks")]
    assert total == -(-32760 // bm) * -(-32760 // bn)

    # Packed vs padded FLOPs of the four-video pack: 4·L²·H·D summed vs padded to the longest video.
    lens, heads, d = [32760, 17160, 10080, 4032], 24, 128
    packed = by[("spacetime_attention_flops", "sora_fast", "packed4", "fwd_flops_packed")]
    padded = by[("spacetime_attention_flops", "sora_fast", "packed4", "fwd_flops_padded")]
    assert packed == sum(4 * n * n * heads * d for n in lens)
    assert padded == 4 * 4 * max(lens) ** 2 * heads * d
    assert by[("spacetime_attention_flops", "sora_fast", "packed4", "padded_over_packed")] == padded / packed

    # Reference timings on the small pack, the SDPA loop beside it, and their agreement.
    # The ratio row is the two medians' ratio (reference / SDPA loop), each a real (positive) time.
    ref_ms = by[("spacetime_attention_fwd", "sora_fast_torch_ref", "cpu-small", "ms")]
    sdpa_ms = by[("spacetime_attention_fwd", "sdpa_loop", "cpu-small", "ms")]
    assert ref_ms > 0 and sdpa_ms > 0
    assert by[("spacetime_attention_fwd", "sora_fast_torch_ref", "cpu-small", "ratio_vs_sdpa_loop")] == \
        pytest.approx(ref_ms / sdpa_ms, rel=1e-12)
    assert by[("spacetime_attention_fwd", "sora_fast_torch_ref", "cpu-small", "max_abs_diff_vs_sdpa_loop")] < 1e-4
    assert by[("spacetime_attention_fwd", "sora_fast_torch_ref", "cpu-small-window", "ms")] > 0


def test_bench_attention_help_documents_every_flag():
    out = subprocess.run([sys.executable, str(BENCH), "--help"], capture_output=True, text=True, timeout=60).stdout
    for flag in ("--quick", "--out", "--cpu", "--providers", "--modes", "--dtype", "--window", "--warmup-ms",
                 "--rep-ms", "--floor-tflops"):
        assert flag in out
