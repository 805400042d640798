"""Builds the extension module ``sora_fast._C`` with CMake; the package metadata is in pyproject.toml.

``pip install -e .`` (PEP 660 editable) and ``pip wheel .`` both run the ``build_ext`` below, which
configures and builds CMakeLists.txt in setuptools' build_temp and copies the module to
``get_ext_fullpath()``: setuptools then puts it where the install kind needs it (the source tree for
an editable install, the wheel otherwise).

Environment variables read here (all optional):
  SORA_FAST_NO_CUDA=1         host-only build, even when nvcc is available
  SORA_FAST_CUDA_ARCHS="90a"  CUDA architectures (default "90a;80", set in CMakeLists.txt)
  SORA_FAST_BUILD_TYPE=Debug  CMake build type (default Release)
  CUDACXX, CUDA_HOME, CUDA_PATH  where to look for nvcc before PATH
  CMAKE_BUILD_PARALLEL_LEVEL  parallel compile jobs (default: all CPUs)
"""

import os
import shutil
import subprocess
import sys
from pathlib import Path

from setuptools import Extension, setup
from setuptools.command.build_ext import build_ext

ROOT = Path(__file__).resolve().parent


def _env_flag(name: str) -> bool:
    return os.environ.get(name, "").strip().lower() in {"1", "true", "yes", "on"}


def _find_nvcc() -> str | None:
    """The nvcc CMake should use: $CUDACXX, then $CUDA_HOME/bin, $CUDA_PATH/bin, then PATH.

    Locating it here (and handing it to CMake as CUDACXX) means setup.py knows whether a CUDA
    build is expected, so a CUDA compiler CMake silently failed to use shows up in build_info().
    """
    candidates = [os.environ.get("CUDACXX")]
    candidates += [
        os.path.join(os.environ[var], "bin", "nvcc")
        for var in ("CUDA_HOME", "CUDA_PATH")
        if os.environ.get(var)
    ]
    candidates.append("nvcc")
    for candidate in candidates:
        if candidate and (found := shutil.which(candidate)):
            return found
    return None


class CMakeExtension(Extension):
    """An extension whose sources are built by the CMake project at ``source_dir``."""

    def __init__(self, name: str, source_dir: Path):
        super().__init__(name, sources=[])
        self.source_dir = source_dir


class CMakeBuild(build_ext):
    def build_extension(self, ext: Extension) -> None:
        if not isinstance(ext, CMakeExtension):
            return super().build_extension(ext)

        import pybind11  # a build requirement (pyproject.toml), so import it only when building

        cmake = shutil.which("cmake")
        if cmake is None:
            raise RuntimeError("cmake not found on PATH: `pip install cmake`, or build with pip")

        build_dir = Path(self.build_temp).resolve() / ext.name
        build_dir.mkdir(parents=True, exist_ok=True)
        no_cuda = _env_flag("SORA_FAST_NO_CUDA")
        nvcc = None if no_cuda else _find_nvcc()

        # Every option is passed on every configure: CMake caches values, and a cached one would
        # otherwise survive a change of the environment between two builds in the same build_temp.
        configure = [
            cmake,
            "-S", str(ext.source_dir),
            "-B", str(build_dir),
            f"-DPython_EXECUTABLE={sys.executable}",
            f"-Dpybind11_DIR={pybind11.get_cmake_dir()}",
            f"-DCMAKE_BUILD_TYPE={os.environ.get('SORA_FAST_BUILD_TYPE', 'Release')}",
            f"-DSORA_FAST_NO_CUDA={'ON' if no_cuda else 'OFF'}",
            f"-DSORA_FAST_EXPECT_CUDA={'ON' if nvcc else 'OFF'}",
        ]  # fmt: skip
        if archs := os.environ.get("SORA_FAST_CUDA_ARCHS"):
            configure.append(f"-DSORA_FAST_CUDA_ARCHS={archs}")
        else:
            configure.append("-USORA_FAST_CUDA_ARCHS")  # back to the default in CMakeLists.txt
        env = dict(os.environ)
        if nvcc:
            env["CUDACXX"] = nvcc  # read by CMake's CUDA compiler check

        jobs = os.environ.get("CMAKE_BUILD_PARALLEL_LEVEL") or str(os.cpu_count() or 1)
        build = [cmake, "--build", str(build_dir), "--parallel", jobs]

        subprocess.run(configure, check=True, env=env)
        subprocess.run(build, check=True, env=env)

        # CMake names the module with the interpreter's ABI suffix; it writes the path it used.
        built = Path((build_dir / "sora_fast_C_location.txt").read_text().strip())
        target = Path(self.get_ext_fullpath(ext.name)).resolve()
        target.parent.mkdir(parents=True, exist_ok=True)
        # Copy, then rename over the target: a process that has the old module loaded keeps its
        # mapping of the old file instead of crashing on one rewritten under it.
        partial = target.with_name(target.name + ".partial")
        shutil.copy2(built, partial)
        os.replace(partial, target)


setup(
    ext_modules=[CMakeExtension("sora_fast._C", ROOT)],
    cmdclass={"build_ext": CMakeBuild},
)
