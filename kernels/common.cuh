// Helpers shared by the device code in kernels/*.cuh.
//
// Everything under kernels/ is device code only: no host launchers (csrc/), no pybind11, no torch.
// These headers compile twice: with nvcc for the GPU, and with g++ -std=c++20 through the
// host-emulation header csrc/emulation.h for CPU tests (docs/kernels.md §2), so they use only what that
// header provides: threadIdx/blockIdx/blockDim/gridDim, __syncthreads, __shfl_xor_sync, static
// __shared__ arrays, SF_DYNAMIC_SMEM, uint4 loads/stores.
#pragma once

#include <stdint.h>

#if defined(__CUDACC__)
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#define SORA_FAST_HOST_DEVICE __host__ __device__
#define SF_DEVICE __device__ __forceinline__
#define SF_UNROLL _Pragma("unroll")
#define SF_KERNELS_BEGIN namespace sora_fast::kernels {
#define SF_KERNELS_END }
// Dynamic shared memory as a typed pointer; 16-byte aligned for vector accesses.
#define SF_DYNAMIC_SMEM(type, name)                             \
  extern __shared__ __align__(16) unsigned char sf_dyn_smem_[]; \
  type* name = reinterpret_cast<type*>(sf_dyn_smem_)
#else
#include <cmath>
#include <cstring>
#define SORA_FAST_HOST_DEVICE
#define SF_DEVICE inline
#define SF_UNROLL
// The emulated kernels live in an inline namespace: same source names, different symbols, so the
// linker can never merge an emulated kernel (or template instantiation) with the nvcc-built one
// when both are in _C.
#define SF_KERNELS_BEGIN namespace sora_fast::kernels { inline namespace host_emulation {
#define SF_KERNELS_END }}
#endif

namespace sora_fast {

// Number of blocks of `b` needed to cover `a` items.
template <typename T>
SORA_FAST_HOST_DEVICE constexpr T ceil_div(T a, T b) {
  return (a + b - 1) / b;
}

}  // namespace sora_fast

SF_KERNELS_BEGIN

// 16-bit storage types with the same bits as torch.bfloat16 / torch.float16. Plain structs (not
// __nv_bfloat16 / __half) so the same code compiles for the host emulation; all math is fp32.
struct alignas(2) bf16 {
  unsigned short bits;
};
struct alignas(2) fp16 {
  unsigned short bits;
};

SF_DEVICE float to_float(float v) { return v; }

SF_DEVICE float to_float(bf16 v) {
#if defined(__CUDACC__)
  return __bfloat162float(__ushort_as_bfloat16(v.bits));
#else
  const uint32_t u = static_cast<uint32_t>(v.bits) << 16;
  float f;
  std::memcpy(&f, &u, 4);
  return f;
#endif
}

SF_DEVICE float to_float(fp16 v) {
#if defined(__CUDACC__)
  return __half2float(__ushort_as_half(v.bits));
#else
  _Float16 h;
  std::memcpy(&h, &v.bits, 2);
  return static_cast<float>(h);
#endif
}

template <typename T>
SF_DEVICE T from_float(float f);

template <>
SF_DEVICE float from_float<float>(float f) {
  return f;
}

template <>
SF_DEVICE bf16 from_float<bf16>(float f) {
#if defined(__CUDACC__)
  return bf16{__bfloat16_as_ushort(__float2bfloat16_rn(f))};
#else
  uint32_t u;
  std::memcpy(&u, &f, 4);
  if ((u & 0x7fffffffu) > 0x7f800000u) return bf16{static_cast<unsigned short>(((u >> 16) & 0x8000u) | 0x7fc0u)};
  u += 0x7fffu + ((u >> 16) & 1u);  // round to nearest even, as torch does
  return bf16{static_cast<unsigned short>(u >> 16)};
#endif
}

template <>
SF_DEVICE fp16 from_float<fp16>(float f) {
#if defined(__CUDACC__)
  return fp16{__half_as_ushort(__float2half_rn(f))};
#else
  const _Float16 h = static_cast<_Float16>(f);
  fp16 out;
  std::memcpy(&out.bits, &h, 2);
  return out;
#endif
}

// Rounds an fp32 value to T and back: what storing it as T and reading it again gives.
template <typename T>
SF_DEVICE float round_to(float f) {
  return to_float(from_float<T>(f));
}

// V consecutive elements of T as floats. V * sizeof(T) a multiple of 16 bytes: 128-bit accesses
// (LDG.E.128; p must then be 16-byte aligned), otherwise element by element.
template <int V, typename T>
SF_DEVICE void load_floats(const T* p, float* out) {
  constexpr int kBytes = V * static_cast<int>(sizeof(T));
  if constexpr (kBytes % 16 == 0) {
    union {
      uint4 u[kBytes / 16];
      T t[V];
    } pk;
SF_UNROLL
    for (int k = 0; k < kBytes / 16; ++k) pk.u[k] = reinterpret_cast<const uint4*>(p)[k];
SF_UNROLL
    for (int i = 0; i < V; ++i) out[i] = to_float(pk.t[i]);
  } else {
SF_UNROLL
    for (int i = 0; i < V; ++i) out[i] = to_float(p[i]);
  }
}

template <int V, typename T>
SF_DEVICE void store_floats(T* p, const float* in) {
  constexpr int kBytes = V * static_cast<int>(sizeof(T));
  if constexpr (kBytes % 16 == 0) {
    union {
      uint4 u[kBytes / 16];
      T t[V];
    } pk;
SF_UNROLL
    for (int i = 0; i < V; ++i) pk.t[i] = from_float<T>(in[i]);
SF_UNROLL
    for (int k = 0; k < kBytes / 16; ++k) reinterpret_cast<uint4*>(p)[k] = pk.u[k];
  } else {
SF_UNROLL
    for (int i = 0; i < V; ++i) p[i] = from_float<T>(in[i]);
  }
}

// Chunk of V elements starting at column `col` of a row of `d`: vector access when whole, else
// the scalar tail (missing elements read as 0 and are not written).
template <int V, typename T>
SF_DEVICE void load_chunk(const T* row, int col, int d, float* out) {
  if (col + V <= d) {
    load_floats<V>(row + col, out);
  } else {
SF_UNROLL
    for (int i = 0; i < V; ++i) out[i] = col + i < d ? to_float(row[col + i]) : 0.f;
  }
}

template <int V, typename T>
SF_DEVICE void store_chunk(T* row, int col, int d, const float* in) {
  if (col + V <= d) {
    store_floats<V>(row + col, in);
  } else {
SF_UNROLL
    for (int i = 0; i < V; ++i)
      if (col + i < d) row[col + i] = from_float<T>(in[i]);
  }
}

SF_DEVICE float warp_sum(float v) {
SF_UNROLL
  for (int m = 16; m > 0; m >>= 1) v += __shfl_xor_sync(0xffffffffu, v, m);
  return v;
}

// Sum over the block of a and b (blockDim.x a multiple of 32, every thread calls it). The result is
// the same on every thread and independent of timing: fixed shuffle tree, then warps in order.
SF_DEVICE void block_sum2(float& a, float& b) {
  __shared__ float red[2][32];
  a = warp_sum(a);
  b = warp_sum(b);
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
  if (lane == 0) {
    red[0][warp] = a;
    red[1][warp] = b;
  }
  __syncthreads();
  a = 0.f;
  b = 0.f;
  const int nwarps = blockDim.x / 32;
  for (int w = 0; w < nwarps; ++w) {
    a += red[0][w];
    b += red[1][w];
  }
#ifndef SORA_FAST_RACY_FOR_TEST
  // The next call overwrites red[]: nobody may still be reading it. (The TSan test removes this
  // barrier on purpose to show that the sanitizer catches it.)
  __syncthreads();
#endif
}

SF_DEVICE float block_sum(float a) {
  float b = 0.f;
  block_sum2(a, b);
  return a;
}

SF_KERNELS_END
