// Host-emulated launchers (sora_fast::emu): kernels/*.cuh compiled by the host compiler through
// csrc/emulation.h, so backend="cuda" runs these exact kernels on CPU tensors. Needs no nvcc.
#include "emulation.h"  // first: defines the CUDA vocabulary the kernels use

#include <cmath>
#include <tuple>

#include "adaln.cuh"
#include "launchers.h"
#include "vae_norm.cuh"

#define SF_NAMESPACE emu
#define SF_LAUNCH(kernel, grid, block, smem, stream, args) \
  ((void)(stream), ::sora_fast::emu::launch(kernel, grid, block, smem, args))
#define SF_ALLOW_SMEM(kernel, bytes) ((void)(kernel), (void)(bytes))

#include "launch_impl.inc"
