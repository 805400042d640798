"""Offline sm_90a gates of the CUDA C++ kernels (KERNELS.md §3): every kernel compiles with 0 spill
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
            "group_norm_finalize_kernel", "group_norm_apply_kernel", "channel_rms_norm_kernel"} <= names
    assert len(rows) == len(cuda_report._instantiations()) + 2  # + the two non-template kernels
    spilling = [(r.kernel, r.spill_bytes) for r in rows if r.spill_bytes]
    assert not spilling, spilling
    assert all(r.registers > 0 for r in rows)


def test_main_path_uses_16_byte_global_accesses(rows):
    main = [r for r in rows if r.main_path]
    assert len(main) == 10  # adaln fwd + bwd, 5 dtype combinations each
    for r in main:
        assert r.ldg128 > 0 and r.stg128 > 0, r
