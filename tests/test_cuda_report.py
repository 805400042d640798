"""Offline sm_90a gates of the CUDA C++ kernels (docs/kernels.md §3): every kernel compiles with 0 spill
bytes, and the vectorized main-path kernels use 16-byte global loads (LDG.E.128) in SASS."""
import pytest

from sora_fast.tools import cuda_report


@pytest.fixture(scope="module")
def rows():
    if cuda_report.find_nvcc() is None:
        pytest.skip("nvcc not found: the sm_90a resource report needs the CUDA toolkit's nvcc")
    if cuda_report.find_cuobjdump() is None:
        pytest.skip("cuobjdump not found (ships with the triton wheel)")
    return cuda_report.cuda_kernel_rows()


def test_every_kernel_is_reported_without_spills(rows):
    names = {r.kernel.split("<")[0] for r in rows}
    assert {"adaln_fwd_kernel", "adaln_bwd_kernel", "adaln_param_reduce_kernel", "group_norm_stats_kernel",
            "group_norm_finalize_kernel", "group_norm_apply_kernel", "channel_rms_norm_kernel",
            "channel_rms_norm_cf_kernel", "channel_rms_norm_cl_kernel"} <= names
    assert len(rows) == len(cuda_report._instantiations()) + 2  # + the two non-template kernels
    spilling = [(r.kernel, r.spill_bytes) for r in rows if r.spill_bytes]
    assert not spilling, spilling
    assert all(r.registers > 0 for r in rows)


def test_main_path_uses_16_byte_global_accesses(rows):
    main = [r for r in rows if r.main_path]
    by_kernel = {}
    for r in main:
        by_kernel.setdefault(r.kernel.split("<")[0], []).append(r)
    # adaln fwd + bwd, group_norm_apply and both channel RMS main paths: 5 (x, param) dtype
    # combinations each; group_norm_stats: one per x dtype.
    assert {k: len(v) for k, v in by_kernel.items()} == {
        "adaln_fwd_kernel": 5, "adaln_bwd_kernel": 5, "group_norm_apply_kernel": 5, "group_norm_stats_kernel": 3,
        "channel_rms_norm_cf_kernel": 5, "channel_rms_norm_cl_kernel": 5}
    for r in main:
        assert r.ldg128 > 0, r
        if not r.kernel.startswith("group_norm_stats_kernel"):  # stats writes 3 floats per block, no y
            assert r.stg128 > 0, r


@pytest.mark.parametrize("change, failing", [
    ({}, []),
    ({"spill_bytes": 8}, ["no_spills"]),
    ({"stack_bytes": 16}, ["no_spills"]),
    ({"ldg128": 0}, ["ldg128"]),
    ({"ldg128": 0, "main_path": False}, []),   # the scalar fallback is not expected to vectorize
])
def test_gates_bite(change, failing):
    fields = dict(kernel="adaln_fwd_kernel<8, bf16, float>", registers=40, spill_bytes=0, stack_bytes=0,
                  smem_bytes=0, ldg128=3, stg128=2, main_path=True)
    row = cuda_report.KernelRow(**{**fields, **change})
    assert [g for g, ok in row.gates().items() if not ok] == failing
    merged = row.report_row()
    assert merged["gates"] == row.gates() and merged["kind"] == "cuda"
    assert merged["sass"]["LDG.E.128"] == row.ldg128 and merged["spill_bytes"] == row.spill_bytes


def test_shared_kernel_report_merges_the_cuda_rows():
    """`python -m sora_fast.tools.kernel_report` (no --no-cuda) lists every CUDA kernel with its gates and
    16-byte load count; a filter matching no Triton config leaves only the CUDA rows (no Triton compiles)."""
    if cuda_report.find_nvcc() is None or cuda_report.find_cuobjdump() is None:
        pytest.skip("nvcc or cuobjdump not found: the sm_90a resource report needs both")
    from sora_fast.tools.kernel_report import run_report_subprocess

    rc, data, output = run_report_subprocess(["--filter", "^no config has this name$"], timeout=600)
    assert rc == 0 and data.get("ok") is True, output
    rows = data["rows"]
    assert {r["kind"] for r in rows} == {"cuda"}, output
    assert len(rows) == len(cuda_report._instantiations()) + 2
    assert all(all(r["gates"].values()) for r in rows), output
    main = [r for r in rows if r["main_path"]]
    assert main and all(r["gates"]["ldg128"] and r["sass"]["LDG.E.128"] > 0 for r in main)
    assert "cuda_report" not in " ".join(s["module"] for s in data["skipped"]), data["skipped"]
    table_line = next(line for line in output.splitlines() if line.startswith("cuda ") and "adaln_fwd_kernel<8" in line)
    assert table_line.rstrip().endswith("ok") and str(main[0]["sass"]["LDG.E.128"]) in output
