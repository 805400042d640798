"""The compiled extension sora_fast._C: it is built, says truthfully how, and fails clearly.

What these tests assume about the build: setup.py records in build_info() whether it found nvcc
("cuda_expected") and whether SORA_FAST_NO_CUDA was set ("cuda_requested" is False then). They do
not look for nvcc themselves, so they hold on machines with and without a CUDA toolkit.
"""

import importlib
import os
import re
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

import sora_fast._ext as ext
from sora_fast._version import __version__

ROOT = Path(__file__).resolve().parents[1]

BUILD_INFO_KEYS = {
    "version",
    "compiler",
    "build_type",
    "cuda_compiled",
    "cuda_requested",
    "cuda_expected",
    "cuda_archs",
    "cuda_version",
    "emulation",
}
CUDA_FUNCTIONS = ("cuda_runtime_version", "cuda_device_count", "cuda_kernel_arch")


@pytest.fixture
def C():
    # Imported directly rather than through sora_fast._ext, so a failure shows the real error.
    return importlib.import_module("sora_fast._C")


@pytest.fixture
def fresh_ext_cache(monkeypatch):
    """Forget the cached import result; monkeypatch restores the real one after the test."""
    monkeypatch.setattr(ext, "_loaded", None)


def test_extension_imports_with_package_version(C):
    assert C.__version__ == __version__
    info = C.build_info()
    assert set(info) == BUILD_INFO_KEYS
    assert info["version"] == __version__
    assert info["build_type"]
    assert re.fullmatch(r"\S+ \d+(\.\d+)*", info["compiler"]), info["compiler"]
    assert info["emulation"] is True  # csrc/kernels_emu.cpp: the host emulation is always built
    for key in ("cuda_compiled", "cuda_requested", "cuda_expected"):
        assert isinstance(info[key], bool), key


def test_build_info_is_consistent(C):
    info = C.build_info()
    if info["cuda_expected"]:
        # setup.py found nvcc, so CMake must have compiled the CUDA sources, not silently
        # fallen back to a host-only build (the build log has a CMake warning saying why).
        assert info["cuda_compiled"], "nvcc was found at build time but CUDA was not compiled in"
    if not info["cuda_requested"]:
        assert not info["cuda_compiled"], "SORA_FAST_NO_CUDA was set but CUDA was compiled in"
    if info["cuda_compiled"]:
        assert re.fullmatch(r"\d+\.\d+(\.\d+)*", info["cuda_version"]), info["cuda_version"]
        assert info["cuda_archs"]
    else:
        assert info["cuda_version"] is None
        assert info["cuda_archs"] == ""
    for name in CUDA_FUNCTIONS:
        assert hasattr(C, name) == info["cuda_compiled"], name


def test_ext_build_info_matches_module(C):
    assert ext.load_extension() is C
    assert ext.extension_error() is None
    assert ext.build_info() == {"available": True, **C.build_info()}


def test_cuda_queries_do_not_crash_without_gpu(C):
    if not C.build_info()["cuda_compiled"]:
        pytest.skip("host-only build: no CUDA functions to call")
    # cudart is linked statically from the toolkit whose nvcc compiled the module.
    runtime = C.cuda_runtime_version()
    assert re.fullmatch(r"\d+\.\d+", runtime), runtime
    assert C.build_info()["cuda_version"].startswith(runtime + ".")

    count, error = C.cuda_device_count()
    assert isinstance(count, int) and count >= 0
    if count == 0:
        assert isinstance(error, str) and error.startswith("cudaGetDeviceCount: cudaError"), error
        with pytest.raises(RuntimeError, match="cudaError"):
            C.cuda_kernel_arch(0)
    else:
        assert error is None
        # The kernel ran from one of the compiled architectures (sm_90a reports 900).
        arch = C.cuda_kernel_arch(0)
        built = {int(re.match(r"\d+", a).group()) for a in C.build_info()["cuda_archs"].split(";")}
        assert arch // 10 in built, (arch, built)


def test_require_extension_explains_a_missing_module(monkeypatch, fresh_ext_cache):
    # None in sys.modules makes the import fail, as it does when the module was never built.
    monkeypatch.setitem(sys.modules, "sora_fast._C", None)
    assert ext.load_extension() is None
    assert ext.extension_error().startswith("ModuleNotFoundError: import of sora_fast._C halted")
    assert ext.build_info() == {"available": False, "reason": ext.extension_error()}

    with pytest.raises(RuntimeError) as excinfo:
        ext.require_extension("the cuda backend of adaln_modulate")
    message = str(excinfo.value)
    assert "the cuda backend of adaln_modulate" in message
    assert "sora_fast._C" in message
    assert ext.extension_error() in message
    assert "pip install -e ." in message


class _BrokenLoader:
    """A meta-path finder standing in for a .so that fails to load (e.g. an undefined symbol)."""

    def find_spec(self, name, path=None, target=None):
        if name == "sora_fast._C":
            raise OSError("_C.so: undefined symbol: cudaLaunchKernel")
        return None


def test_broken_module_is_reported_not_raised(monkeypatch, fresh_ext_cache):
    monkeypatch.delitem(sys.modules, "sora_fast._C", raising=False)
    monkeypatch.setattr(sys, "meta_path", [_BrokenLoader(), *sys.meta_path])
    assert ext.load_extension() is None
    assert ext.extension_error() == "OSError: _C.so: undefined symbol: cudaLaunchKernel"
    with pytest.raises(RuntimeError, match="undefined symbol"):
        ext.require_extension("test_broken_module")


def test_stale_build_is_refused(monkeypatch, fresh_ext_cache, C):
    # As after a version bump without a rebuild: the .so in the tree reports the old version.
    monkeypatch.setattr(ext, "__version__", "999.0.0")
    assert ext.load_extension() is None
    assert "stale build" in ext.extension_error()
    assert repr(C.__version__) in ext.extension_error()


def _cmake_and_pybind11():
    """cmake and pybind11's CMake dir, from this interpreter's environment, or skip."""
    bin_dir = str(Path(sys.executable).parent)
    cmake = shutil.which("cmake", path=os.pathsep.join([bin_dir, os.environ.get("PATH", "")]))
    found = subprocess.run(
        [sys.executable, "-m", "pybind11", "--cmakedir"], capture_output=True, text=True
    )
    if cmake is None or found.returncode != 0:
        # They are build requirements, installed in pip's isolated build environment only.
        pytest.skip("needs cmake and pybind11 in this environment: pip install cmake pybind11")
    return cmake, found.stdout.strip()


def _run(cmd, env) -> str:
    """Runs a command; returns its stdout and stderr together, or fails showing their ends."""
    done = subprocess.run(cmd, env=env, capture_output=True, text=True)
    log = done.stdout + done.stderr
    assert done.returncode == 0, f"{cmd[:2]} failed:\n{log[-6000:]}"
    return log


@pytest.mark.slow
@pytest.mark.parametrize("case", ["no_cuda_env", "unusable_nvcc"])
def test_host_only_build_from_scratch(tmp_path, case):
    """The host-only build works and imports, whatever the machine has.

    no_cuda_env: SORA_FAST_NO_CUDA=1 wins even where a working nvcc exists.
    unusable_nvcc: a CUDA compiler that cannot compile (as on a machine without one, or with a
    broken one) gives a host-only build, with a warning when the build driver expected CUDA.
    """
    cmake, pybind11_dir = _cmake_and_pybind11()
    build = tmp_path / "build"
    configure = [
        cmake, "-S", str(ROOT), "-B", str(build),
        f"-DPython_EXECUTABLE={sys.executable}", f"-Dpybind11_DIR={pybind11_dir}",
    ]  # fmt: skip
    env = dict(os.environ)
    if case == "no_cuda_env":
        env["SORA_FAST_NO_CUDA"] = "1"  # read by CMakeLists.txt as the option's default
    else:
        env.pop("SORA_FAST_NO_CUDA", None)
        fake_nvcc = tmp_path / "nvcc"
        fake_nvcc.write_text("#!/bin/sh\necho 'nvcc: broken on purpose' >&2\nexit 1\n")
        fake_nvcc.chmod(0o755)
        env["CUDACXX"] = str(fake_nvcc)  # what setup.py hands CMake
        configure.append("-DSORA_FAST_EXPECT_CUDA=ON")
    log = _run(configure, env)
    if case == "unusable_nvcc":
        assert "cannot compile CUDA with it" in log
    _run([cmake, "--build", str(build), "--parallel", str(os.cpu_count() or 1)], env)
    module = Path((build / "sora_fast_C_location.txt").read_text().strip())
    assert module.is_file()

    # A fresh interpreter, importing the module as top-level `_C`: the copy installed in the
    # package stays out of the way.
    requested = case != "no_cuda_env"
    check = textwrap.dedent(
        f"""
        import sys
        sys.path.insert(0, {str(module.parent)!r})
        import _C
        info = _C.build_info()
        assert info["version"] == {__version__!r}, info
        assert info["cuda_compiled"] is False, info
        assert info["cuda_requested"] is {requested}, info
        assert not hasattr(_C, "cuda_device_count")
        print("ok", info["compiler"])
        """
    )
    done = subprocess.run([sys.executable, "-c", check], capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    assert done.stdout.startswith("ok")
