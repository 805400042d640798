// GPU launchers (sora_fast::gpu): kernels/*.cuh compiled by nvcc, launched on the caller's stream.
#include <cuda_runtime.h>

#include <cmath>
#include <stdexcept>
#include <string>
#include <tuple>

#include "adaln.cuh"
#include "launchers.h"
#include "vae_norm.cuh"

namespace sora_fast::gpu {
namespace {
void check_launch(const char* what) {
  const cudaError_t err = cudaGetLastError();
  if (err != cudaSuccess)
    throw std::runtime_error(std::string(what) + " launch failed: " + cudaGetErrorName(err) + ": " +
                             cudaGetErrorString(err));
}
}  // namespace
}  // namespace sora_fast::gpu

#define SF_NAMESPACE gpu
#define SF_LAUNCH(kernel, grid, block, smem, stream, args)                                     \
  do {                                                                                          \
    (kernel)<<<(grid), (block), (smem), reinterpret_cast<cudaStream_t>(stream)>>>(args);       \
    ::sora_fast::gpu::check_launch(#kernel);                                                    \
  } while (0)
#define SF_ALLOW_SMEM(kernel, bytes)                                                                    \
  do {                                                                                                  \
    if ((bytes) > 48 * 1024) {                                                                          \
      const cudaError_t e = cudaFuncSetAttribute(reinterpret_cast<const void*>(kernel),                 \
                                                 cudaFuncAttributeMaxDynamicSharedMemorySize, (int)(bytes)); \
      if (e != cudaSuccess) throw std::runtime_error(std::string("cudaFuncSetAttribute: ") + cudaGetErrorString(e)); \
    }                                                                                                   \
  } while (0)

#include "launch_impl.inc"
