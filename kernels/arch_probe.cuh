// The smallest real kernel: it reports which compiled architecture the device actually ran.
//
// A fatbin holds one cubin per entry of CUDA_ARCHITECTURES (plus PTX for the newest); the driver
// picks the best match for the device. Running this kernel proves the build's architecture list
// covers the device (e.g. 900 on an H100 from the sm_90a cubin) and that launches work at all.
#pragma once

#include "common.cuh"

namespace sora_fast::kernels {

__global__ void arch_probe_kernel(int* out) {
#if defined(__CUDA_ARCH__)
  *out = __CUDA_ARCH__;
#endif
}

}  // namespace sora_fast::kernels
