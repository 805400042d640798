"""The offline sm_90 kernel report (``python -m sora_fast.tools.kernel_report``) and its gates.

(a) A sample bf16 ``tl.dot`` matmul defined here compiles with HGMMA, no spills and shared memory in
range, and configs built to break one gate each (spills, too much shared memory, no tensor cores, no
alignment hints) fail exactly that gate, so the gates are known to bite.
(b) Every shipped config of the attention kernels passes the gates (the conv3d configs are checked in
test_conv3d_triton.py, the CUDA C++ kernels and their merge into this report in test_cuda_report.py).

Compiles run in a child process without ``TRITON_INTERPRET`` (conftest sets it on CPU-only machines, and
with it ``@triton.jit`` gives interpreter functions that cannot be compiled).
"""
import importlib
import importlib.util

import pytest
import triton
import triton.language as tl

from sora_fast.tools.kernel_report import SMEM_PER_BLOCK_MAX, count_sass, occupancy, run_report_subprocess
from sora_fast.triton._spec import KernelConfig

ATTENTION = "sora_fast.triton.attention"


# --- sample kernels (compiled by the child process, which loads this file by path) ---------------
@triton.jit
def _sample_matmul_kernel(a_ptr, b_ptr, c_ptr, M, N, K, stride_am, stride_bk, stride_cm,
                          BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
    pid_m = tl.program_id(0)
    pid_n = tl.program_id(1)
    rm = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    rn = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    rk = tl.arange(0, BLOCK_K)
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for k0 in range(0, K, BLOCK_K):
        a = tl.load(a_ptr + rm[:, None] * stride_am + (k0 + rk)[None, :],
                    mask=(rm[:, None] < M) & ((k0 + rk)[None, :] < K), other=0.0)
        b = tl.load(b_ptr + (k0 + rk)[:, None] * stride_bk + rn[None, :],
                    mask=((k0 + rk)[:, None] < K) & (rn[None, :] < N), other=0.0)
        acc = tl.dot(a, b, acc)
    tl.store(c_ptr + rm[:, None] * stride_cm + rn[None, :], acc.to(tl.bfloat16),
             mask=(rm[:, None] < M) & (rn[None, :] < N))


@triton.jit
def _sample_scale_kernel(x_ptr, y_ptr, n, BLOCK: tl.constexpr):
    offs = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    tl.store(y_ptr + offs, tl.load(x_ptr + offs, mask=offs < n) * 2.0, mask=offs < n)


_MM_SIG = {"a_ptr": "*bf16", "b_ptr": "*bf16", "c_ptr": "*bf16", "M": "i32", "N": "i32", "K": "i32",
           "stride_am": "i32", "stride_bk": "i32", "stride_cm": "i32"}
_MM_ALIGNED = ("a_ptr", "b_ptr", "c_ptr", "K", "stride_am", "stride_bk", "stride_cm")


def _mm(name, bm, bn, bk, warps, stages, aligned=True):
    return KernelConfig(name, _sample_matmul_kernel, _MM_SIG, {"BLOCK_M": bm, "BLOCK_N": bn, "BLOCK_K": bk},
                        warps, stages, _MM_ALIGNED if aligned else ())


def sample_configs():
    """Sizes measured with triton 3.9 for sm_90 (each compiles in ~0.3-5 s on 2 cores)."""
    return [
        _mm("good m128 n128 k64", 128, 128, 64, 4, 3),            # 64 KiB smem, ~247 regs, no spills
        _mm("spill m256 n128 k32", 256, 128, 32, 4, 2),           # 256x128 fp32 acc on 128 threads
        _mm("smem m64 n64 k512", 64, 64, 512, 8, 3),              # 2 x 128 KiB stage buffers
        _mm("unaligned m128 n128 k64", 128, 128, 64, 4, 3, aligned=False),
        KernelConfig("no-tc scale", _sample_scale_kernel, {"x_ptr": "*fp32", "y_ptr": "*fp32", "n": "i32"},
                     {"BLOCK": 1024}, 4, 1, ("x_ptr", "y_ptr"), tensor_core=True),   # wrongly claims HGMMA
    ]


# --- pure helpers ---------------------------------------------------------------------------------
def test_count_sass_matches_opcodes_not_substrings():
    sass = """
        /*0100*/                   LDGSTS.E.BYPASS.LTC128B.128 [R3], desc[UR6][R4.64] ;
        /*0110*/              @!P0 LDG.E.128.CONSTANT R8, desc[UR6][R2.64] ;
        /*0120*/                   LDG.E.U16 R9, desc[UR6][R2.64] ;
        /*0130*/                   HGMMA.64x128x16.F32.BF16 R24, gdesc[UR4], R24 ;
        /*0140*/               @P1 STL.64 [R1+0x8], R10 ;
        /*0150*/                   LDL.LU R4, [R1] ;
        /*0160*/                   UTMALDG.2D [UR8], [UR4] ;
        /*0170*/                   MOV R1, c[0x0][0x28] ;
    """
    assert count_sass(sass) == {"HGMMA": 1, "HMMA": 0, "UTMALDG": 1, "LDGSTS": 1, "LDG.E.128": 1, "LDL": 1,
                                "STL": 1}


def test_occupancy_follows_the_sm90_calculator():
    # 247 regs -> 248 x 32 = 7936 per warp -> 2 warps per 16K-register sub-partition -> 8 warps per SM.
    occ = occupancy(247, 4, 65536 + 1024)
    assert occ["blocks_per_sm_by_regs"] == 2
    assert occ["blocks_per_sm_by_smem"] == (228 * 1024) // (65536 + 2048)
    assert occ["blocks_per_sm"] == 2 and occ["warps_per_sm"] == 8
    assert occupancy(32, 4, 0)["blocks_per_sm"] == 16                # thread limit: 2048 / 128
    assert occupancy(32, 4, SMEM_PER_BLOCK_MAX + 1)["blocks_per_sm"] == 0


# --- (a) the gates bite on the sample kernels -----------------------------------------------------
@pytest.fixture(scope="module")
def sample_report():
    rc, data, output = run_report_subprocess(
        ["--module", f"{__file__}:sample_configs", "--module", "sora_fast.no_such_kernels", "--jobs", "2"],
        timeout=300)
    assert data, f"no JSON written; output:\n{output}"
    rows = {r["name"]: r for r in data["rows"] if r.get("kind") == "triton"}
    return rc, rows, data, output


def test_sample_matmul_passes_every_gate(sample_report):
    _, rows, _, output = sample_report
    r = rows["good m128 n128 k64"]
    assert r["gates"] == {"compiles": True, "no_spills": True, "smem_fits": True, "hgmma": True}, output
    assert r["sass"]["HGMMA"] > 0 and r["sass"]["LDGSTS"] > 0          # wgmma fed by cp.async pipelining
    assert r["spill_bytes"] == 0 and r["sass"]["LDL"] == r["sass"]["STL"] == 0
    # 2 stage buffers of (128x64 + 64x128) bf16 = 64 KiB, plus Triton's small static allocation.
    assert 32 * 1024 <= r["shared_dynamic"] <= 100 * 1024 and r["shared_total"] <= SMEM_PER_BLOCK_MAX
    assert 0 < r["registers"] <= 255 and r["blocks_per_sm"] >= 1


@pytest.mark.parametrize("name, failing", [
    ("spill m256 n128 k32", "no_spills"),
    ("smem m64 n64 k512", "smem_fits"),
    ("no-tc scale", "hgmma"),
])
def test_gate_fails_on_config_built_to_break_it(sample_report, name, failing):
    rc, rows, _, output = sample_report
    r = rows[name]
    assert [g for g, ok in r["gates"].items() if not ok] == [failing], r
    assert rc == 1, "a failing gate must make the report exit 1"


def test_alignment_hints_reach_the_compiler(sample_report):
    """Without the 16-divisibility hints, loads are not vectorized into cp.async and the kernel spills:
    if the hints were dropped on the way to triton.compile, both configs would look alike."""
    _, rows, _, _ = sample_report
    hinted, plain = rows["good m128 n128 k64"], rows["unaligned m128 n128 k64"]
    assert hinted["sass"]["LDGSTS"] > 0 and plain["sass"]["LDGSTS"] == 0
    assert plain["spill_bytes"] > hinted["spill_bytes"] == 0


def test_unimportable_module_is_skipped_with_reason(sample_report):
    _, _, data, _ = sample_report
    skipped = {s["module"]: s["reason"] for s in data["skipped"]}
    assert "import failed" in skipped["sora_fast.no_such_kernels"]
    assert data["meta"]["target"] == "sm_90"


# --- (b) the shipped attention configs -------------------------------------------------------------
def _attention_configs():
    return importlib.import_module(ATTENTION).shipped_configs()


def _check_attention(extra_args):
    configs = _attention_configs()
    rc, data, output = run_report_subprocess(["--module", ATTENTION, "--no-cuda", "--jobs", "2", *extra_args],
                                             timeout=1800)
    assert data.get("rows"), f"no rows compiled:\n{output}"
    failed = {r["name"]: [g for g, ok in r["gates"].items() if not ok] + ([r["error"]] if "error" in r else [])
              for r in data["rows"] if not all(r["gates"].values())}
    assert not failed, f"configs failing a gate: {failed}\n{output}"
    assert rc == 0, output
    kernels = {getattr(c.fn, "__name__", repr(c.fn)) for c in configs}
    assert {r["kernel"] for r in data["rows"]} == kernels, "every attention kernel must be compiled"
    return data


def test_attention_every_shipped_config_passes_gates():
    """Every config the launchers can pick on sm_90 (about a minute of offline compiles)."""
    data = _check_attention([])
    assert len(data["rows"]) == len(_attention_configs())
