// sora_fast._C: the pybind11 module holding the CUDA C++ kernels. This is its one bindings file.
//
// Layout
//   kernels/<op>.cuh    device code only (__global__ / __device__), shared with the host-emulation
//                       build, so no host CUDA API calls and no pybind11 there
//   csrc/<op>.cu        launcher: validates sizes/strides at the boundary, picks the grid, launches
//                       on the caller's stream, dispatches on dtype; declared in csrc/<op>.h
//   csrc/bindings.cpp   this file: one m.def per launcher, inside `#if SORA_FAST_WITH_CUDA`
//   CMakeLists.txt      nothing to do: every csrc/*.cpp and csrc/*.cu is picked up by a glob
//
// The module does not link libtorch (builds stay fast and independent of the torch ABI). Bound
// functions take raw data pointers, sizes and strides as Python ints and the CUDA stream as an
// int handle (torch.cuda.current_stream().cuda_stream); sora_fast/ops wraps them as torch ops.
//
// Adding a CUDA op touches these files:
//   1. kernels/<op>.cuh                 the kernel(s)
//   2. csrc/<op>.h, csrc/<op>.cu        the launcher
//   3. csrc/bindings.cpp                the binding (below, in the CUDA section)
//   4. sora_fast/ops/<family>.py        the wrapper: sora_fast._ext.require_extension("the cuda
//                                       backend of <op>"), pointers/strides from the tensors, and
//                                       the backend dispatch registration
//   5. tests/test_<op>.py               against the <op>_ref reference (and bench/bench_<op>.py)
//
// Python-facing errors: throw std::runtime_error / std::invalid_argument from a launcher and
// pybind11 turns them into RuntimeError / ValueError with the same message.
#include <pybind11/pybind11.h>

#include <string>

#include "build_config.h"

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
  // The host-emulated CUDA build (CPU tests of kernels/*.cuh) is not part of this module yet.
  info["emulation"] = false;
  return info;
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

#if SORA_FAST_WITH_CUDA
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
