// CUDA runtime queries behind cuda_info.h; the one .cu file of the foundation build, so that
// every build with nvcc exercises the whole CUDA path (device compile for each architecture,
// static cudart link) long before the first real kernel lands.
#include "cuda_info.h"

#include <cuda_runtime.h>

#include <stdexcept>
#include <string>

#include "arch_probe.cuh"

namespace sora_fast {
namespace {

std::string describe(cudaError_t err) {
  return std::string(cudaGetErrorName(err)) + ": " + cudaGetErrorString(err);
}

void check(cudaError_t err, const char* what) {
  if (err != cudaSuccess) {
    // Clear the per-thread error so that a later, unrelated call does not report this one.
    cudaGetLastError();
    throw std::runtime_error(std::string(what) + " failed: " + describe(err));
  }
}

// Restores the calling thread's current device on exit, so a query does not move later launches.
class DeviceGuard {
 public:
  explicit DeviceGuard(int device) {
    check(cudaGetDevice(&previous_), "cudaGetDevice");
    check(cudaSetDevice(device), "cudaSetDevice");
  }
  ~DeviceGuard() { cudaSetDevice(previous_); }
  DeviceGuard(const DeviceGuard&) = delete;
  DeviceGuard& operator=(const DeviceGuard&) = delete;

 private:
  int previous_ = 0;
};

}  // namespace

std::string cuda_runtime_version() {
  int version = 0;
  check(cudaRuntimeGetVersion(&version), "cudaRuntimeGetVersion");
  // CUDA encodes major.minor as 1000 * major + 10 * minor.
  return std::to_string(version / 1000) + "." + std::to_string((version % 1000) / 10);
}

DeviceCount cuda_device_count() {
  DeviceCount result;
  const cudaError_t err = cudaGetDeviceCount(&result.count);
  if (err != cudaSuccess) {
    cudaGetLastError();
    result.count = 0;
    result.error = "cudaGetDeviceCount: " + describe(err);
  }
  return result;
}

int cuda_kernel_arch(int device) {
  DeviceGuard guard(device);
  int* d_arch = nullptr;
  check(cudaMalloc(&d_arch, sizeof(int)), "cudaMalloc");
  int arch = 0;
  try {
    check(cudaMemset(d_arch, 0, sizeof(int)), "cudaMemset");
    kernels::arch_probe_kernel<<<1, 1>>>(d_arch);
    check(cudaGetLastError(), "arch_probe_kernel launch");
    check(cudaMemcpy(&arch, d_arch, sizeof(int), cudaMemcpyDeviceToHost), "cudaMemcpy");
  } catch (...) {
    cudaFree(d_arch);
    throw;
  }
  check(cudaFree(d_arch), "cudaFree");
  return arch;
}

}  // namespace sora_fast
