"""The attention benchmark's CPU path (``bench/bench_attention.py --quick --cpu``) runs and writes its rows."""
import re
import subprocess
import sys
from pathlib import Path

import pytest
from _utils import run_bench_cpu

from bench import bench_attention as bench
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
                 "--rep-ms", "--floor-tflops", "--pipeline", "--quality-windows", "--quality-prompts"):
        assert flag in out


@pytest.mark.parametrize("grid,window", [((3, 5, 7), (1, 2, 0)), ((1, 4, 9), (0, 9, 2)), ((2, 1, 1), (5, 5, 5))])
def test_window_pairs_counts_the_mask(grid, window):
    from sora_fast.ops import window_mask

    assert bench.window_pairs(grid, window) == int(window_mask(grid, window).sum())


def test_sliding_tile_rows_against_the_token_mask(monkeypatch):
    """The sliding-tile table on a small grid: visited / full fractions equal a brute-force count of the
    block pairs from the token mask, in both orders; tile order visits fewer blocks; the projection is the
    dense time times the visited fraction."""
    import torch

    from sora_fast.ops import grid_coords

    mod = bench
    grid, window, tile, bm, bn = (4, 12, 20), (1, 3, 3), (2, 4, 4), 32, 16
    monkeypatch.setattr(mod, "WAN480", grid)
    monkeypatch.setattr(mod, "WAN720", grid)
    rows = mod.Rows("cpu", "fp32")
    table = mod.sliding_tile_rows(rows, [("w", window, tile, None)], bm, bn, (16, 32), heads=1, head_dim=8)
    n = grid[0] * grid[1] * grid[2]
    for e in table[:2]:
        c = grid_coords(grid, order="tile", tile=tile) if e["order"].startswith("tile") else grid_coords(grid)
        allowed = ((c[:, None] - c[None]).abs() <= torch.tensor(window)).all(-1)
        visited = full = total = 0
        for r in range(0, n, bm):
            for k in range(0, n, bn):
                blk = allowed[r:r + bm, k:k + bn]
                total += 1
                visited += bool(blk.any())
                full += bool(blk.all()) and k + bn <= n
        # the box test may list a block with no allowed pair (never the reverse): at least the mask's count
        assert e["visited"] >= visited / total and e["full"] == pytest.approx(full / max(1, e["visited"] * total))
        assert e["useful"] == pytest.approx(int(allowed.sum()) / (e["visited"] * total * bm * bn))
    t_major, tiled = table[0], table[1]
    assert tiled["visited"] < t_major["visited"] and tiled["full"] > t_major["full"] == 0
    proj = mod.project_windowed_ms({("wan480", "fwd"): 10.0, ("wan480", "bwd"): 30.0}, table)
    assert {(p["order"], p["mode"]): p["projected_ms"] for p in proj if p["shape"] == "wan480"} == {
        (e["order"], m): ms * e["visited" if m == "fwd" else "visited_bwd"]
        for e in table if e["shape"] == "wan480" for m, ms in (("fwd", 10.0), ("bwd", 30.0))}


def test_quality_rows_on_a_tiny_pipeline(tiny_pipeline):
    """--pipeline: the dense row and each window's pass rate, PSNR and kept pairs become rows."""
    pipe, _ = tiny_pipeline
    rows = bench.Rows("cpu", "fp32")
    table = bench.quality_rows(rows, pipe, [(0, 0, 0)], 1, sizes=[(5, 32, 32)], steps=1)
    got = {(r["shape"].split()[1], r["metric"]): r["value"] for r in rows.rows}
    assert [t["label"] for t in table] == ["dense", "0,0,0"]
    for t in table:
        for metric in ("pass_rate", "psnr_vs_dense", "pairs_kept"):
            assert got[(t["label"], metric)] == t[metric]


@pytest.mark.parametrize("grid,window,granule", [((5, 7, 9), (1, 1, 0), (2, 4, 4)), ((3, 8, 8), (0, 1, 2), (3, 3, 3))])
def test_window_pairs_tile_granular(grid, window, granule):
    """STA's tile-granular mask: pairs whose cells (coordinates // granule) are within the window."""
    import torch

    from sora_fast.ops import grid_coords

    c = grid_coords(grid) // torch.tensor(granule)
    mask = ((c[:, None] - c[None]).abs() <= torch.tensor(window)).all(-1)
    assert bench.window_pairs(grid, window, granule) == int(mask.sum())
