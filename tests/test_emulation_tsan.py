"""ThreadSanitizer over the host emulation of the CUDA kernels: our stand-in for compute-sanitizer
racecheck (docs/kernels.md §2), built with g++ -fsanitize=thread into tmp_path from the same sources.

- The clean build links the real launchers (csrc/kernels_emu.cpp, i.e. csrc/launch_impl.inc and every
  kernel of kernels/*.cuh) to a driver that runs every kernel family the way sora_fast.cuda.launchers
  calls it: adaLN forward (plain and gated; LayerNorm and RMSNorm; affine weight/bias; per-sequence
  and per-token tables; fp32, bf16, fp16 with fp32 tables; 16-byte and scalar paths), adaLN backward
  (per-sequence with every parameter gradient over several blocks and segments, per-token) and the
  parameter-gradient reduce, group_norm_silu (stats over several chunks, finalize, apply) and
  channel_rms_norm_silu (contiguous, channels-last warp kernel, scalar fallback), in contiguous and
  channels_last_3d layouts. It must report nothing, and every output element must be written (outputs
  start NaN-poisoned).
- A build with one __syncthreads removed (-DSORA_FAST_RACY_FOR_TEST, kernels/common.cuh block_sum2)
  must report a data race at that source, so the check is known to work.

Blocks run one after another in the emulation, so TSan sees races between the threads of a block
(shared memory, missing barriers, shuffles), which is what racecheck looks for.
"""
import os
import shutil
import subprocess
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
CXX = os.environ.get("CXX", "g++")
FLAGS = ["-std=c++20", "-O1", "-g", "-fsanitize=thread", "-pthread", f"-I{ROOT / 'csrc'}", f"-I{ROOT / 'kernels'}"]

# Every launcher of sora_fast::emu with the arguments sora_fast/cuda/launchers.py builds. Buffers hold raw
# bits; 16-bit inputs are multiples of 1/16 in [-4, 4), exact in bf16 and fp16. Prints the vector width
# each launcher picked ("<case> V=<n>") so the test can check both paths ran.
FULL_DRIVER = r"""
#include "launchers.h"
#include <cmath>
#include <cstdint>
#include <cstdio>
#include <cstring>
#include <exception>
#include <memory>
#include <string>
#include <vector>

using sora_fast::ArgMap;
namespace emu = sora_fast::emu;

enum { F32 = 0, F16 = 1, BF16 = 2 };

uint16_t to16(float f, int dt) {
  uint32_t u; std::memcpy(&u, &f, 4);
  if (dt == BF16) return static_cast<uint16_t>(u >> 16);
  if (f == 0.f) return static_cast<uint16_t>((u >> 16) & 0x8000);
  const int e = static_cast<int>((u >> 23) & 0xFF) - 127;  // normal fp16 range only: exact inputs
  return static_cast<uint16_t>(((u >> 16) & 0x8000) | ((e + 15) << 10) | ((u >> 13) & 0x3FF));
}

struct Buf {  // n elements of a dtype, 64-byte aligned
  int dt; int64_t n; std::unique_ptr<unsigned char[]> raw; unsigned char* p;
  Buf(int dt_, int64_t n_, int seed) : dt(dt_), n(n_), raw(new unsigned char[n_ * 4 + 64]) {
    p = raw.get() + (64 - reinterpret_cast<uintptr_t>(raw.get()) % 64) % 64;
    for (int64_t i = 0; i < n; ++i) set(i, ((i * 7 + seed * 13) % 61) / 16.f - 1.875f);
  }
  int size() const { return dt == F32 ? 4 : 2; }
  void set(int64_t i, float v) {
    if (dt == F32) std::memcpy(p + 4 * i, &v, 4);
    else { const uint16_t b = to16(v, dt); std::memcpy(p + 2 * i, &b, 2); }
  }
  void poison() { std::memset(p, 0xFF, n * size()); }
  bool written() const {  // no element still holds the 0xFF poison (NaN)
    for (int64_t i = 0; i < n; ++i) {
      if (dt == F32) { float v; std::memcpy(&v, p + 4 * i, 4); if (std::isnan(v)) return false; }
      else { uint16_t b; std::memcpy(&b, p + 2 * i, 2); if (b == 0xFFFF) return false; }
    }
    return true;
  }
  int64_t ptr() const { return static_cast<int64_t>(reinterpret_cast<uintptr_t>(p)); }
};

int failures = 0;
void expect_written(const char* what, const Buf& b) {
  if (!b.written()) { std::printf("UNWRITTEN %s\n", what); ++failures; }
}

// adaLN forward then backward (+ reduce). ids: per-sequence ids (empty: per-token tables);
// perm/rpb/block_seg0/seq_seg_ptr/nseg: what _cuda._adaln_backward computes for them.
void adaln_case(const char* name, int dt, int dp, int64_t n, int d, bool rms, bool gated, bool w, bool b,
                std::vector<int32_t> ids, std::vector<int32_t> perm, int64_t rpb, std::vector<int32_t> block_seg0,
                std::vector<int32_t> seq_seg_ptr, int nseg, int rows) {
  const bool per_seq = !ids.empty();
  const int64_t trows = per_seq ? rows : n;
  Buf x(dt, n * d, 1), br(dt, n * d, 2), gate(dp, trows * d, 3), shift(dp, trows * d, 4), scale(dp, trows * d, 5),
      wt(dp, d, 6), bs(dp, d, 7), y(dt, n * d, 0), xn(dt, n * d, 0), dy(dt, n * d, 8), dxn(dt, n * d, 9),
      dx(dt, n * d, 0), dbr(dt, n * d, 0), dsh(dp, n * d, 0), dsc(dp, n * d, 0), dg(dp, n * d, 0);
  for (Buf* o : {&y, &xn, &dx, &dbr, &dsh, &dsc, &dg}) o->poison();
  ArgMap a{{"n_rows", n}, {"d", d}, {"rms", rms}, {"gated", gated}, {"dtype_x", dt}, {"dtype_p", dp},
           {"x", x.ptr()}, {"x_stride", d}, {"shift", shift.ptr()}, {"shift_stride", d},
           {"scale", scale.ptr()}, {"scale_stride", d},
           {"seq_ids", per_seq ? static_cast<int64_t>(reinterpret_cast<uintptr_t>(ids.data())) : 0},
           {"weight", w ? wt.ptr() : 0}, {"bias", b ? bs.ptr() : 0}};
  if (gated) { a["gate"] = gate.ptr(); a["gate_stride"] = d; a["branch"] = br.ptr(); a["branch_stride"] = d; }
  ArgMap f = a;
  f["y"] = y.ptr(); f["y_stride"] = d;
  if (gated) { f["x_new"] = xn.ptr(); f["x_new_stride"] = d; }
  std::printf("%s fwd V=%d\n", name, emu::adaln_vector_width(f));
  emu::adaln_forward(f, 1e-6, 0);
  expect_written("y", y);
  if (gated) expect_written("x_new", xn);

  const int nslots = (per_seq ? (gated ? 3 : 2) : 0) + w + b;
  std::vector<float> partial(static_cast<size_t>(nseg) * nslots * d);
  ArgMap k = a;
  k["dy"] = dy.ptr(); k["dy_stride"] = d; k["dx"] = dx.ptr(); k["dx_stride"] = d;
  k["nslots"] = nslots; k["rows_per_block"] = rpb; k["backward"] = 1;
  if (gated) { k["dx_new"] = dxn.ptr(); k["dx_new_stride"] = d; k["dbranch"] = dbr.ptr(); k["dbranch_stride"] = d; }
  if (!per_seq) {
    k["dshift"] = dsh.ptr(); k["dshift_stride"] = d; k["dscale"] = dsc.ptr(); k["dscale_stride"] = d;
    if (gated) { k["dgate"] = dg.ptr(); k["dgate_stride"] = d; }
  }
  if (nslots) {
    if (per_seq) k["perm"] = static_cast<int64_t>(reinterpret_cast<uintptr_t>(perm.data()));
    k["block_seg0"] = static_cast<int64_t>(reinterpret_cast<uintptr_t>(block_seg0.data()));
    k["partial"] = static_cast<int64_t>(reinterpret_cast<uintptr_t>(partial.data()));
  }
  std::printf("%s bwd V=%d\n", name, emu::adaln_vector_width(k));
  emu::adaln_backward(k, 1e-6, 0);
  expect_written("dx", dx);
  if (gated) expect_written("dbranch", dbr);
  if (!per_seq) {
    expect_written("dshift", dsh);
    expect_written("dscale", dsc);
    if (gated) expect_written("dgate", dg);
  }
  if (nslots) {
    const int table_rows = per_seq ? rows : 0;
    std::vector<Buf> outs;
    for (int s = 0; s < 5; ++s) outs.emplace_back(F32, (s < 3 ? table_rows : 1) * static_cast<int64_t>(d) + 1, 0);
    ArgMap r{{"d", d}, {"nslots", nslots}, {"num_table_rows", table_rows}, {"num_segments", nseg},
             {"partial", static_cast<int64_t>(reinterpret_cast<uintptr_t>(partial.data()))},
             {"seq_seg_ptr", per_seq ? static_cast<int64_t>(reinterpret_cast<uintptr_t>(seq_seg_ptr.data())) : 0}};
    const char* names[5] = {"dshift", "dscale", "dgate", "dweight", "dbias"};
    const bool present[5] = {per_seq, per_seq, per_seq && gated, w, b};
    int slot = 0;
    for (int s = 0; s < 5; ++s) {
      if (!present[s]) continue;
      outs[s].poison();
      outs[s].set(outs[s].n - 1, 0.f);  // the guard element past the end stays as set
      r[std::string("slot_") + names[s]] = slot++;
      r[names[s]] = outs[s].ptr();
    }
    emu::adaln_param_reduce(r, 0);
    for (int s = 0; s < 5; ++s) if (present[s]) expect_written(names[s], outs[s]);
  }
}

void vae_case(const char* name, int dt, int64_t B, int64_t C, int64_t S, bool cl, int groups, int64_t chunk) {
  Buf x(dt, B * C * S, 1), y(dt, B * C * S, 0), w(F32, C, 2), b(F32, C, 3);
  const int64_t m = C / (groups ? groups : 1) * S, nchunks = groups ? (m + chunk - 1) / chunk : 0;
  std::vector<float> partial(B * groups * nchunks * 3 + 1), stats(B * groups * 2 + 1);
  ArgMap a{{"batch", B}, {"channels", C}, {"spatial", S}, {"channels_last", cl}, {"silu", 1}, {"dtype_x", dt},
           {"dtype_p", F32}, {"x", x.ptr()}, {"y", y.ptr()}, {"weight", w.ptr()}, {"bias", b.ptr()}};
  y.poison();
  if (groups) {
    a["groups"] = groups; a["chunk"] = chunk; a["nchunks"] = nchunks;
    a["partial"] = static_cast<int64_t>(reinterpret_cast<uintptr_t>(partial.data()));
    a["stats"] = static_cast<int64_t>(reinterpret_cast<uintptr_t>(stats.data()));
    const std::vector<int> v = emu::vae_vector_widths(a);
    std::printf("%s stats V=%d apply V=%d\n", name, v[0], v[1]);
    emu::group_norm_silu(a, 1e-6, 0);
  } else {
    std::printf("%s rms V=%d\n", name, emu::vae_vector_widths(a)[0]);
    emu::channel_rms_norm_silu(a, 1e-12, 0);
  }
  expect_written(name, y);
}

int main() {
  try {
    // adaLN. d = 1024 fp32 / bf16: 64 threads (two warps, so block_sum2's shared array is shared
    // across warps). Per-sequence backward: ids {1,0,1,0,1} sorted by perm {1,3,0,2,4} -> 0,0,1,1,1;
    // 2 blocks of 3 rows: segments [0,0],[1] | [1,1] -> block_seg0 {0,2}, seq_seg_ptr {0,1,3}.
    adaln_case("gated-layer-wb-seq-f32", F32, F32, 5, 1024, false, true, true, true, {1, 0, 1, 0, 1},
               {1, 3, 0, 2, 4}, 3, {0, 2}, {0, 1, 3}, 3, 2);
    // per-token tables, RMSNorm with weight, bf16: 2 blocks of 2 rows, one segment each
    adaln_case("modulate-rms-w-tok-bf16", BF16, BF16, 3, 1024, true, false, true, false, {}, {}, 2, {0, 1}, {}, 2, 0);
    // fp16 x, fp32 tables, d = 1001 (rows not 16-byte aligned): scalar path; gated RMSNorm with bias,
    // per-token gate/shift/scale gradients row by row
    adaln_case("gated-rms-b-tok-f16", F16, F32, 2, 1001, true, true, false, true, {}, {}, 1, {0, 1}, {}, 2, 0);
    // per-sequence, no affine, 3 sequences with the middle one empty: seq_seg_ptr {0,1,1,2}
    adaln_case("modulate-layer-seq-bf16", BF16, F32, 4, 512, false, false, false, false, {0, 2, 2, 0},
               {0, 3, 1, 2}, 2, {0, 1}, {0, 1, 1, 2}, 2, 3);
    // VAE norms: B = 1, C = 8, S = 16 (group norm: two stats chunks of 32 per group)
    for (int cl = 0; cl < 2; ++cl) {
      const char* layout = cl ? "cl" : "contiguous";
      std::string n;
      n = std::string("gn-f32-") + layout; vae_case(n.c_str(), F32, 1, 8, 16, cl, 2, 32);
      n = std::string("gn-bf16-g4-") + layout; vae_case(n.c_str(), BF16, 1, 8, 16, cl, 4, 16);
      n = std::string("gn-f32-s15-") + layout; vae_case(n.c_str(), F32, 1, 8, 15, cl, 2, 32);
      n = std::string("rms-f32-") + layout; vae_case(n.c_str(), F32, 2, 8, 16, cl, 0, 0);
      n = std::string("rms-bf16-c12-") + layout; vae_case(n.c_str(), BF16, 1, 12, 15, cl, 0, 0);
    }
  } catch (const std::exception& e) {
    std::printf("launcher error: %s\n", e.what());
    return 1;
  }
  std::printf(failures ? "FAILED\n" : "ok\n");
  return failures ? 1 : 0;
}
"""

# The racy build: one kernel suffices (kernels/adaln.cuh forward + backward through block_sum2).
RACY_DRIVER = r"""
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


def _compile(cmds):
    """Runs the compiler commands concurrently; skips when the compiler or TSan runtime is missing."""
    if shutil.which(CXX) is None:
        pytest.skip(f"no host C++ compiler ({CXX})")
    procs = [subprocess.Popen(c, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for c in cmds]
    for p in procs:
        _, err = p.communicate()
        if p.returncode != 0 and "sanitize" in err and "cannot find" in err:
            pytest.skip(f"{CXX} has no ThreadSanitizer runtime: {err[-300:]}")
        assert p.returncode == 0, err[-4000:]


def _run(exe: Path) -> subprocess.CompletedProcess:
    env = dict(os.environ, TSAN_OPTIONS="halt_on_error=0 exitcode=66 history_size=4")
    run = subprocess.run([str(exe)], capture_output=True, text=True, env=env, timeout=300)
    if "FATAL: ThreadSanitizer" in run.stderr:
        pytest.skip(f"ThreadSanitizer cannot run here: {run.stderr.strip()[:300]}")
    return run


def test_every_emulated_kernel_is_race_free(tmp_path):
    driver = tmp_path / "tsan_all.cpp"
    driver.write_text(FULL_DRIVER)
    objs = [tmp_path / "kernels_emu.o", tmp_path / "tsan_all.o"]
    _compile([[CXX, *FLAGS, "-c", str(src), "-o", str(obj)]
              for src, obj in zip((ROOT / "csrc" / "kernels_emu.cpp", driver), objs)])
    exe = tmp_path / "tsan_all"
    _compile([[CXX, *FLAGS, *map(str, objs), "-o", str(exe)]])
    run = _run(exe)
    assert "WARNING: ThreadSanitizer" not in run.stderr, run.stderr[-6000:]
    assert run.returncode == 0, (run.stdout[-3000:], run.stderr[-3000:])
    out = run.stdout.splitlines()
    assert out[-1] == "ok", run.stdout
    # Both the 16-byte and the scalar paths ran, in every family (the launchers' own choice).
    expected = {
        "gated-layer-wb-seq-f32 fwd V=4", "gated-layer-wb-seq-f32 bwd V=4",
        "modulate-rms-w-tok-bf16 fwd V=8", "modulate-rms-w-tok-bf16 bwd V=8",
        "gated-rms-b-tok-f16 fwd V=1", "gated-rms-b-tok-f16 bwd V=1",
        "gn-f32-contiguous stats V=4 apply V=4", "gn-f32-cl stats V=4 apply V=4",
        "gn-bf16-g4-cl stats V=1 apply V=8", "gn-f32-s15-contiguous stats V=1 apply V=1",
        "rms-f32-contiguous rms V=4", "rms-f32-cl rms V=4",
        "rms-bf16-c12-cl rms V=1", "rms-bf16-c12-contiguous rms V=0",
    }  # fmt: skip
    assert expected <= set(out), sorted(expected - set(out))


def test_missing_syncthreads_is_reported(tmp_path):
    src = tmp_path / "racy.cpp"
    src.write_text(RACY_DRIVER)
    exe = tmp_path / "racy"
    _compile([[CXX, "-DSORA_FAST_RACY_FOR_TEST", *FLAGS, str(src), "-o", str(exe)]])
    run = _run(exe)
    assert "WARNING: ThreadSanitizer: data race" in run.stderr, (run.returncode, run.stderr[-3000:])
    assert "common.cuh" in run.stderr  # the report points at the kernel source line
    assert run.returncode == 66
