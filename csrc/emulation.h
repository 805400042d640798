// Host emulation of the CUDA execution model, so kernels/*.cuh compile with g++ -std=c++20 and run
// on CPU tensors (backend="cuda" on CPU; docs/kernels.md §2). Include this header first, then kernels.
//
//   - one std::thread per CUDA thread; the blocks of a grid run one after another on the same
//     threads; a grid-wide std::barrier separates blocks (the launching thread takes part);
//   - __syncthreads: a barrier per block; a thread that leaves the kernel calls arrive_and_drop(),
//     so barriers reached later by the others do not deadlock. The barrier is std::barrier's
//     interface on a mutex + condition variable: libstdc++'s std::barrier spins before it sleeps,
//     which with hundreds of emulated threads on 2 cores made every phase ~100x slower. A mutex
//     also gives ThreadSanitizer exact happens-before edges;
//   - __shared__ -> static (blocks run serially, so one copy per kernel instantiation is enough);
//     dynamic shared memory (SF_DYNAMIC_SMEM) is a per-launch buffer filled with 0xFF bytes (NaN in
//     fp32/bf16/fp16) before every block, as real shared memory starts uninitialized;
//   - warp shuffles: each lane writes its value to a per-warp buffer, a per-warp barrier, each
//     reads its partner's, a second barrier (full-mask, convergent shuffles only);
//   - atomicAdd: std::atomic_ref.
// Not emulated: inline PTX, cp.async, ldmatrix, wgmma, TMA, mbarriers, warp divergence semantics.
// Cost is ~tens of microseconds per emulated thread and barrier phase: keep grids small.
#pragma once

#include <array>
#include <atomic>
#include <condition_variable>
#include <cmath>
#include <cstddef>
#include <cstdint>
#include <cstring>
#include <memory>
#include <mutex>
#include <new>
#include <thread>
#include <vector>

struct dim3 {
  unsigned x = 1, y = 1, z = 1;
  constexpr dim3(unsigned x_ = 1, unsigned y_ = 1, unsigned z_ = 1) : x(x_), y(y_), z(z_) {}
};

struct alignas(16) uint4 {
  unsigned x, y, z, w;
};

struct alignas(8) float2 {
  float x, y;
};

namespace sora_fast::emu {

// std::barrier's arrive_and_wait / arrive_and_drop, sleeping instead of spinning.
class Barrier {
 public:
  explicit Barrier(std::ptrdiff_t expected) : expected_(expected), remaining_(expected) {}

  void arrive_and_wait() {
    std::unique_lock<std::mutex> lock(mu_);
    const uint64_t phase = phase_;
    if (arrive_locked()) return;
    cv_.wait(lock, [&] { return phase_ != phase; });
  }

  void arrive_and_drop() {
    std::unique_lock<std::mutex> lock(mu_);
    --expected_;
    arrive_locked();
  }

 private:
  bool arrive_locked() {  // true when this arrival completed the phase
    if (--remaining_ > 0) return false;
    remaining_ = expected_;
    ++phase_;
    cv_.notify_all();
    return true;
  }

  std::mutex mu_;
  std::condition_variable cv_;
  std::ptrdiff_t expected_, remaining_;
  uint64_t phase_ = 0;
};

struct BlockState {
  dim3 block_idx;
  std::unique_ptr<Barrier> block;
  std::vector<std::unique_ptr<Barrier>> warps;
  std::vector<std::array<uint64_t, 32>> warp_buf;
  unsigned char* smem = nullptr;
};

struct ThreadCtx {
  dim3 thread_idx, block_idx, block_dim, grid_dim;
  unsigned lane = 0, warp = 0;
  BlockState* state = nullptr;
};

inline thread_local ThreadCtx t_ctx;

inline std::mutex& launch_mutex() {
  static std::mutex m;
  return m;
}

inline void syncthreads() { t_ctx.state->block->arrive_and_wait(); }
inline void syncwarp() { t_ctx.state->warps[t_ctx.warp]->arrive_and_wait(); }
inline unsigned char* dynamic_smem() { return t_ctx.state->smem; }

template <typename T>
T shfl(T v, unsigned src_lane) {
  static_assert(sizeof(T) <= 8, "shuffles of at most 8 bytes");
  BlockState& st = *t_ctx.state;
  auto& buf = st.warp_buf[t_ctx.warp];
  std::memcpy(&buf[t_ctx.lane], &v, sizeof(T));
  st.warps[t_ctx.warp]->arrive_and_wait();
  T out;
  std::memcpy(&out, &buf[src_lane % 32], sizeof(T));
  st.warps[t_ctx.warp]->arrive_and_wait();  // nobody overwrites buf before all have read it
  return out;
}

// Runs kernel(args...) over grid x block, blocks serially. smem_bytes of dynamic shared memory.
template <typename... Params, typename... Args>
void launch(void (*kernel)(Params...), dim3 grid, dim3 block, size_t smem_bytes, Args... args) {
  std::lock_guard<std::mutex> lock(launch_mutex());
  const unsigned nthreads = block.x * block.y * block.z;
  const unsigned nwarps = (nthreads + 31) / 32;
  const size_t smem_alloc = smem_bytes < 16 ? 16 : smem_bytes;
  unsigned char* smem = static_cast<unsigned char*>(::operator new(smem_alloc, std::align_val_t{64}));
  BlockState st;
  st.smem = smem;
  st.warp_buf.resize(nwarps);
  Barrier grid_barrier(static_cast<std::ptrdiff_t>(nthreads) + 1);
  bool done = false;

  std::vector<std::thread> threads;
  threads.reserve(nthreads);
  for (unsigned t = 0; t < nthreads; ++t) {
    threads.emplace_back([&, t] {
      ThreadCtx& c = t_ctx;
      c.thread_idx = dim3(t % block.x, (t / block.x) % block.y, t / (block.x * block.y));
      c.block_dim = block;
      c.grid_dim = grid;
      c.lane = t % 32;
      c.warp = t / 32;
      c.state = &st;
      for (;;) {
        grid_barrier.arrive_and_wait();  // the launcher has set up the next block (or is done)
        if (done) break;
        c.block_idx = st.block_idx;
        kernel(args...);
        st.block->arrive_and_drop();
        st.warps[c.warp]->arrive_and_drop();
        grid_barrier.arrive_and_wait();  // every thread has left this block
      }
    });
  }
  for (unsigned bz = 0; bz < grid.z; ++bz)
    for (unsigned by = 0; by < grid.y; ++by)
      for (unsigned bx = 0; bx < grid.x; ++bx) {
        st.block_idx = dim3(bx, by, bz);
        st.block = std::make_unique<Barrier>(nthreads);
        st.warps.clear();
        for (unsigned w = 0; w < nwarps; ++w) {
          const unsigned in_warp = w + 1 < nwarps ? 32 : nthreads - 32 * w;
          st.warps.push_back(std::make_unique<Barrier>(in_warp));
        }
        std::memset(smem, 0xFF, smem_alloc);
        grid_barrier.arrive_and_wait();
        grid_barrier.arrive_and_wait();
      }
  done = true;
  grid_barrier.arrive_and_wait();
  for (auto& th : threads) th.join();
  ::operator delete(smem, std::align_val_t{64});
}

}  // namespace sora_fast::emu

#define threadIdx (::sora_fast::emu::t_ctx.thread_idx)
#define blockIdx (::sora_fast::emu::t_ctx.block_idx)
#define blockDim (::sora_fast::emu::t_ctx.block_dim)
#define gridDim (::sora_fast::emu::t_ctx.grid_dim)

#define __global__
#define __device__
#define __host__
#define __forceinline__ inline
#define __launch_bounds__(...)
#define __restrict__ __restrict
#define __shared__ static
#define __align__(n) alignas(n)

#define SF_DYNAMIC_SMEM(type, name) type* name = reinterpret_cast<type*>(::sora_fast::emu::dynamic_smem())

inline void __syncthreads() { ::sora_fast::emu::syncthreads(); }
inline void __syncwarp(unsigned = 0xffffffffu) { ::sora_fast::emu::syncwarp(); }

template <typename T>
inline T __shfl_xor_sync(unsigned, T v, int lane_mask, int width = 32) {
  (void)width;
  return ::sora_fast::emu::shfl(v, ::sora_fast::emu::t_ctx.lane ^ static_cast<unsigned>(lane_mask));
}

template <typename T>
inline T __shfl_sync(unsigned, T v, int src_lane, int width = 32) {
  (void)width;
  return ::sora_fast::emu::shfl(v, static_cast<unsigned>(src_lane));
}

template <typename T>
inline T atomicAdd(T* address, T val) {
  return std::atomic_ref<T>(*address).fetch_add(val);
}

inline float rsqrtf(float x) { return 1.0f / std::sqrt(x); }
inline float __expf(float x) { return std::exp(x); }
inline float __fdividef(float a, float b) { return a / b; }
