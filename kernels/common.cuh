// Helpers shared by the device code in kernels/*.cuh.
//
// Everything under kernels/ is device code only: no host launchers (csrc/), no pybind11, no torch.
// These headers compile twice: with nvcc for the GPU, and later with g++ -std=c++20 through the
// host-emulation header for CPU tests (see KERNELS.md), so keep them free of nvcc-only host APIs.
#pragma once

#if defined(__CUDACC__)
#define SORA_FAST_HOST_DEVICE __host__ __device__
#else
#define SORA_FAST_HOST_DEVICE
#endif

namespace sora_fast {

// Number of blocks of `b` needed to cover `a` items.
template <typename T>
SORA_FAST_HOST_DEVICE constexpr T ceil_div(T a, T b) {
  return (a + b - 1) / b;
}

}  // namespace sora_fast
