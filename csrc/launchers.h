// Host launchers of the kernels in kernels/*.cuh, declared in plain C++ for csrc/bindings.cpp.
//
// Each exists twice with the same signature: sora_fast::gpu:: (csrc/kernels_cuda.cu, nvcc, launches
// on the CUDA stream `stream`) and sora_fast::emu:: (csrc/kernels_emu.cpp, the host compiler with
// csrc/emulation.h; runs the same kernels on CPU memory, `stream` ignored). Both come from
// csrc/launch_impl.inc. Arguments travel as a name -> int64 map (pointers as integers, sizes,
// strides in elements, flags 0/1, dtype codes); a missing or invalid one raises
// std::invalid_argument (ValueError in Python) before anything runs.
#pragma once

#include <cstdint>
#include <map>
#include <string>
#include <vector>

namespace sora_fast {

using ArgMap = std::map<std::string, int64_t>;

// dtype codes of the "dtype_*" arguments
enum DtypeCode : int { kFloat32 = 0, kFloat16 = 1, kBFloat16 = 2 };

#define SORA_FAST_DECLARE_LAUNCHERS                                              \
  void adaln_forward(const ArgMap& args, double eps, int64_t stream);           \
  void adaln_backward(const ArgMap& args, double eps, int64_t stream);          \
  void adaln_param_reduce(const ArgMap& args, int64_t stream);                  \
  void group_norm_silu(const ArgMap& args, double eps, int64_t stream);         \
  void channel_rms_norm_silu(const ArgMap& args, double eps, int64_t stream);   \
  /* kernel names and the vector width the launcher would pick, for tests */    \
  int adaln_vector_width(const ArgMap& args);                                    \
  /* group norm (args with "groups"): {stats V, apply V}; channel RMS: {V}, 0 = scalar fallback */ \
  std::vector<int> vae_vector_widths(const ArgMap& args);

namespace gpu {
SORA_FAST_DECLARE_LAUNCHERS
}
namespace emu {
SORA_FAST_DECLARE_LAUNCHERS
}

#undef SORA_FAST_DECLARE_LAUNCHERS

}  // namespace sora_fast
