// sora_fast._C: the pybind11 module holding the CUDA C++ kernels. This is its one bindings file.
//
// Layout
//   kernels/<op>.cuh    device code only (__global__ / __device__), shared with the host-emulation
//                       build, so no host CUDA API calls and no pybind11 there
//   kernels/<op>_params.h  plain-C++ argument struct of the kernels (shared with the launchers)
//   csrc/launch_impl.inc   launchers: validate sizes/strides/alignment at the boundary, pick the
//                       grid and the vector width, dispatch on dtype. Compiled twice: by nvcc in
//                       csrc/kernels_cuda.cu (sora_fast::gpu, launches on the caller's stream) and by
//                       the host compiler in csrc/kernels_emu.cpp through csrc/emulation.h
//                       (sora_fast::emu: the same kernels on CPU memory, no nvcc needed)
//   csrc/launchers.h    their declarations
//   csrc/bindings.cpp   this file: the GPU launchers at the top level of _C (inside
//                       `#if SORA_FAST_WITH_CUDA`), the emulated ones in the submodule _C.emu
//   CMakeLists.txt      nothing to do: every csrc/*.cpp and csrc/*.cu is picked up by a glob
//
// The module does not link libtorch (builds stay fast and independent of the torch ABI). Bound
// functions take raw data pointers, sizes and strides as Python ints and the CUDA stream as an
// int handle (torch.cuda.current_stream().cuda_stream); sora_fast/ops wraps them as torch ops.
//
// Adding a CUDA op touches these files:
//   1. kernels/<op>.cuh (+ <op>_params.h)   the kernel(s), included by kernels_cuda.cu and kernels_emu.cpp
//   2. csrc/launch_impl.inc, csrc/launchers.h   the launcher (one definition, both builds)
//   3. csrc/bindings.cpp                the binding (below: GPU section and the emu submodule)
//   4. sora_fast/cuda/launchers.py      the wrapper: tensors -> pointers/strides, outputs allocated,
//                                       GPU or emulated launcher by device; and one
//                                       _dispatch.register_kernel(op, "cuda", ...) line in
//                                       sora_fast/ops/<family>.py
//   5. tests/test_<family>_cuda.py      against the <op>_ref reference on CPU through the emulation;
//                                       sora_fast/tools/cuda_report.py lists the kernel for the
//                                       sm_90a resource gates; bench/bench_<op>.py
//
// Python-facing errors: throw std::runtime_error / std::invalid_argument from a launcher and
// pybind11 turns them into RuntimeError / ValueError with the same message.
#include <pybind11/pybind11.h>
#include <pybind11/stl.h>

#include <string>

#include "build_config.h"
#include "launchers.h"

#if SORA_FAST_WITH_CUDA
#include "cuda_info.h"
#endif

namespace py = pybind11;

namespace {

py::object none_if_empty(const std::string& text) {
  if (text.empty()) return py::none();
  return py::str(text);
}

py::dict build_info() {
  py::dict info;
  info["version"] = SORA_FAST_VERSION;
  info["compiler"] = SORA_FAST_CXX_COMPILER;
  info["build_type"] = SORA_FAST_BUILD_TYPE;
  info["cuda_compiled"] = static_cast<bool>(SORA_FAST_WITH_CUDA);
  info["cuda_requested"] = static_cast<bool>(SORA_FAST_CUDA_REQUESTED);
  info["cuda_expected"] = static_cast<bool>(SORA_FAST_EXPECT_CUDA);
  info["cuda_archs"] = SORA_FAST_CUDA_ARCHS;
  info["cuda_version"] = none_if_empty(SORA_FAST_CUDA_VERSION);
  // The host-emulated build of kernels/*.cuh (csrc/kernels_emu.cpp) is always compiled in: _C.emu.
  info["emulation"] = true;
  return info;
}

// The same launcher set from either namespace (sora_fast::gpu or sora_fast::emu).
struct EmuLaunchers {
  static constexpr auto adaln_forward = &sora_fast::emu::adaln_forward;
  static constexpr auto adaln_backward = &sora_fast::emu::adaln_backward;
  static constexpr auto adaln_param_reduce = &sora_fast::emu::adaln_param_reduce;
  static constexpr auto adaln_vector_width = &sora_fast::emu::adaln_vector_width;
  static constexpr auto group_norm_silu = &sora_fast::emu::group_norm_silu;
  static constexpr auto channel_rms_norm_silu = &sora_fast::emu::channel_rms_norm_silu;
  static constexpr auto vae_vector_widths = &sora_fast::emu::vae_vector_widths;
};

#if SORA_FAST_WITH_CUDA
struct GpuLaunchers {
  static constexpr auto adaln_forward = &sora_fast::gpu::adaln_forward;
  static constexpr auto adaln_backward = &sora_fast::gpu::adaln_backward;
  static constexpr auto adaln_param_reduce = &sora_fast::gpu::adaln_param_reduce;
  static constexpr auto adaln_vector_width = &sora_fast::gpu::adaln_vector_width;
  static constexpr auto group_norm_silu = &sora_fast::gpu::group_norm_silu;
  static constexpr auto channel_rms_norm_silu = &sora_fast::gpu::channel_rms_norm_silu;
  static constexpr auto vae_vector_widths = &sora_fast::gpu::vae_vector_widths;
};
#endif

// Arguments: a dict of name -> int (pointers as ints, sizes and strides in elements, flags, dtype
// codes 0 float32 / 1 float16 / 2 bfloat16), eps, and the CUDA stream handle (ignored by _C.emu).
// The GIL is released while the kernels run.
template <typename L>
void bind_launchers(py::module_& m) {
  using py::arg;
  auto gil = py::call_guard<py::gil_scoped_release>();
  m.def("adaln_forward", L::adaln_forward, arg("args"), arg("eps"), arg("stream") = 0, gil,
        "adaln_modulate / gated_residual_adaln forward (kernels/adaln.cuh).");
  m.def("adaln_backward", L::adaln_backward, arg("args"), arg("eps"), arg("stream") = 0, gil,
        "adaLN backward: dx, dbranch, per-token table gradients, per-segment parameter partials.");
  m.def("adaln_param_reduce", L::adaln_param_reduce, arg("args"), arg("stream") = 0, gil,
        "Second pass of the deterministic parameter-gradient reduction (fixed order).");
  m.def("adaln_vector_width", L::adaln_vector_width, arg("args"),
        "Elements per access the adaLN launcher picks for these arguments (1: scalar path).");
  m.def("group_norm_silu", L::group_norm_silu, arg("args"), arg("eps"), arg("stream") = 0, gil,
        "GroupNorm + SiLU forward (kernels/vae_norm.cuh).");
  m.def("channel_rms_norm_silu", L::channel_rms_norm_silu, arg("args"), arg("eps"), arg("stream") = 0, gil,
        "Channel RMS norm + SiLU forward (kernels/vae_norm.cuh).");
  m.def("vae_vector_widths", L::vae_vector_widths, arg("args"),
        "Elements per access the VAE launchers pick for these arguments: [stats, apply] for group norm\n"
        "(args with 'groups'), [V] for channel RMS (0: the scalar fallback kernel).");
}

}  // namespace

PYBIND11_MODULE(_C, m) {
  m.doc() = "sora_fast CUDA C++ kernels (see csrc/bindings.cpp for the layout)";
  m.attr("__version__") = SORA_FAST_VERSION;

  m.def("build_info", &build_info,
        "Facts about this build, as a dict: version, compiler, build_type, cuda_compiled,\n"
        "cuda_requested (False when SORA_FAST_NO_CUDA was set), cuda_expected (setup.py found\n"
        "nvcc), cuda_archs ('90a;80', '' without CUDA), cuda_version (nvcc's, or None),\n"
        "emulation.");

  // ---- host emulation of the CUDA kernels (CPU memory; same launchers as the GPU section) ----
  py::module_ emu = m.def_submodule(
      "emu", "The CUDA kernels of kernels/*.cuh run on CPU memory through csrc/emulation.h (slow, exact).");
  bind_launchers<EmuLaunchers>(emu);

#if SORA_FAST_WITH_CUDA
  bind_launchers<GpuLaunchers>(m);
  // ---- CUDA section: bindings of csrc/*.cu launchers go below. ----
  m.def("cuda_runtime_version", &sora_fast::cuda_runtime_version,
        "Version of the statically linked CUDA runtime, 'major.minor'. Needs no driver.");

  m.def(
      "cuda_device_count",
      [] {
        const sora_fast::DeviceCount result = sora_fast::cuda_device_count();
        return py::make_tuple(result.count, none_if_empty(result.error));
      },
      "(count, error): devices visible to the CUDA runtime. Never raises: without a driver or a\n"
      "device it returns (0, '<cudaError name>: <message>'); error is None on success.");

  m.def("cuda_kernel_arch", &sora_fast::cuda_kernel_arch, py::arg("device") = 0,
        "Launch a one-thread kernel on `device` and return the __CUDA_ARCH__ that ran (900 for\n"
        "sm_90a). Raises RuntimeError with the CUDA error text when it cannot run.");
#endif
}
