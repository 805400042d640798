// Host-side queries of the CUDA runtime, implemented in cuda_info.cu.
//
// Declared here in plain C++ so that bindings.cpp (compiled by the host compiler, with pybind11)
// never includes CUDA headers, and cuda_info.cu (compiled by nvcc) never includes pybind11.
#pragma once

#include <string>

namespace sora_fast {

// Version of the CUDA runtime linked into _C, "major.minor". cudart is linked statically, so
// this needs no driver and no device.
std::string cuda_runtime_version();

// Devices visible to the CUDA runtime. Never throws: on a machine without a driver or a device
// the runtime reports an error, returned here with count 0 (the usual case on a CPU machine).
struct DeviceCount {
  int count = 0;
  std::string error;  // empty on success; "<cudaError name>: <cudaGetErrorString text>" otherwise
};
DeviceCount cuda_device_count();

// Launches a one-thread kernel on `device` and returns the __CUDA_ARCH__ of the code that ran
// (e.g. 900 for the sm_90a cubin on an H100). Throws std::runtime_error with the CUDA error text
// when there is no usable device or the build holds no code for it.
int cuda_kernel_arch(int device);

}  // namespace sora_fast
