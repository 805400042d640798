"""The compiled extension sora_fast._C: it is built, says truthfully how, and fails clearly.

What these tests assume about the build: setup.py records in build_info() whether it found nvcc
("cuda_expected") and whether SORA_FAST_NO_CUDA was set ("cuda_requested" is False then). The tests of it do
not look for nvcc themselves, so they hold on machines with and without a CUDA toolkit.

The build itself: the module links neither libtorch nor a shared CUDA runtime; SORA_FAST_CUDA_ARCHS goes
from setup.py to CMake to nvcc's -gencode (configure-only runs with a stand-in for pybind11's CMake
package, so no pybind11 install is needed); without a usable nvcc the host-only configuration still
compiles the emulation with the host compiler alone. The from-scratch build is the slow test at the end.
"""

import importlib
import importlib.util
import json
import os
import re
import shlex
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
        # the emulation is in the host-only build and runs: LayerNorm of one row, zero shift/scale
        from array import array
        x, y, t = array("f", [1, 2, 3, 6]), array("f", [float("nan")] * 4), array("f", [0] * 4)
        p = lambda a: a.buffer_info()[0]
        _C.emu.adaln_forward({{"n_rows": 1, "d": 4, "rms": 0, "gated": 0, "dtype_x": 0, "dtype_p": 0,
                               "x": p(x), "x_stride": 4, "shift": p(t), "shift_stride": 4, "scale": p(t),
                               "scale_stride": 4, "y": p(y), "y_stride": 4}}, 1e-6)
        want = [(v - 3) / (3.5 + 1e-6) ** 0.5 for v in x]
        assert max(abs(a - b) for a, b in zip(y, want)) < 1e-5, (list(y), want)
        print("ok", info["compiler"])
        """
    )
    done = subprocess.run([sys.executable, "-c", check], capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    assert done.stdout.startswith("ok")


# --- what the build links, which architectures it targets, and that the emulation needs no nvcc ----
def _elf_needed(path: Path) -> list[str]:
    """DT_NEEDED entries of a 64-bit little-endian ELF shared object (what `readelf -d` lists)."""
    import struct

    data = path.read_bytes()
    assert data[:4] == b"\x7fELF" and data[4] == 2 and data[5] == 1, "expected a 64-bit little-endian ELF"
    shoff, = struct.unpack_from("<Q", data, 0x28)
    shentsize, shnum = struct.unpack_from("<HH", data, 0x3A)
    sections = [struct.unpack_from("<IIQQQQIIQQ", data, shoff + i * shentsize) for i in range(shnum)]
    dynamic = next(s for s in sections if s[1] == 6)  # SHT_DYNAMIC; sh_link is its string table
    strtab_off = sections[dynamic[6]][4]
    needed = []
    for off in range(dynamic[4], dynamic[4] + dynamic[5], 16):
        tag, val = struct.unpack_from("<qQ", data, off)
        if tag == 0:  # DT_NULL
            break
        if tag == 1:  # DT_NEEDED
            end = data.index(b"\0", strtab_off + val)
            needed.append(data[strtab_off + val:end].decode())
    return needed


def test_extension_links_neither_libtorch_nor_the_cuda_runtime(C):
    """The module takes raw pointers, so it must not depend on the torch ABI; cudart is linked
    statically (import works without a driver)."""
    needed = _elf_needed(Path(C.__file__))
    assert any(n.startswith("libc.so") for n in needed), needed  # the parser found the real list
    bad = [n for n in needed if re.match(r"lib(torch|c10|cudart|cuda)([_.-]|$)", n)]
    assert not bad, needed


def test_compiled_cubins_are_the_reported_architectures(C):
    """build_info()['cuda_archs'] is what nvcc compiled: one cubin per listed architecture."""
    info = C.build_info()
    if not info["cuda_compiled"]:
        pytest.skip("host-only build: no cubins")
    from sora_fast.tools.cuda_report import find_cuobjdump

    tool = find_cuobjdump()
    if tool is None:
        pytest.skip("cuobjdump not found (ships with the triton wheel)")
    listing = subprocess.run([tool, "--list-elf", C.__file__], capture_output=True, text=True, check=True).stdout
    built = set(re.findall(r"\.sm_(\d+a?)\.cubin", listing))
    assert built == set(info["cuda_archs"].split(";")), (built, info["cuda_archs"])


class _Stop(Exception):
    pass


def test_setup_py_hands_the_arch_override_to_cmake(monkeypatch, tmp_path):
    """SORA_FAST_CUDA_ARCHS reaches the CMake configure line (and its absence resets the cache)."""
    import types

    # build_extension imports pybind11 (a build requirement, absent from a test environment): a stand-in.
    monkeypatch.setitem(sys.modules, "pybind11", types.SimpleNamespace(get_cmake_dir=lambda: "/pybind11/cmake"))
    spec = importlib.util.spec_from_file_location("sora_fast_setup", ROOT / "setup.py")
    monkeypatch.setattr("setuptools.setup", lambda **kw: None)
    setup_py = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(setup_py)
    calls = []

    def fake_run(cmd, **kw):
        calls.append((cmd, kw.get("env", {})))
        raise _Stop  # the configure line is all this test needs

    monkeypatch.setattr(setup_py.subprocess, "run", fake_run)
    monkeypatch.setattr(setup_py.shutil, "which", lambda name: f"/usr/bin/{name}")
    from setuptools import Distribution

    cmd = setup_py.CMakeBuild(Distribution())
    cmd.build_temp = str(tmp_path)
    ext = setup_py.CMakeExtension("sora_fast._C", ROOT)
    for archs, expected in (("87;90a", "-DSORA_FAST_CUDA_ARCHS=87;90a"), (None, "-USORA_FAST_CUDA_ARCHS")):
        if archs is None:
            monkeypatch.delenv("SORA_FAST_CUDA_ARCHS", raising=False)
        else:
            monkeypatch.setenv("SORA_FAST_CUDA_ARCHS", archs)
        with pytest.raises(_Stop):
            cmd.build_extension(ext)
        configure = calls[-1][0]
        assert configure[0].endswith("cmake") and "-S" in configure, configure
        assert expected in configure, configure


# Stands in for pybind11's CMake package so that a configure-only run works without pybind11 installed
# (it is a build requirement, present only in pip's isolated build environment).
_STUB_PYBIND11 = """
function(pybind11_add_module name)
  cmake_parse_arguments(ARG "MODULE;SHARED" "" "" ${ARGN})
  add_library(${name} MODULE ${ARG_UNPARSED_ARGUMENTS})
endfunction()
"""


def _configure(tmp_path: Path, env: dict, name: str) -> tuple[Path, str]:
    cmake = shutil.which("cmake", path=os.pathsep.join([str(Path(sys.executable).parent), env["PATH"]]))
    if cmake is None:
        pytest.skip("cmake not found")
    stub = tmp_path / "pybind11_stub"
    stub.mkdir(exist_ok=True)
    (stub / "pybind11Config.cmake").write_text(_STUB_PYBIND11)
    build = tmp_path / name
    log = _run([cmake, "-S", str(ROOT), "-B", str(build), f"-DPython_EXECUTABLE={sys.executable}",
                f"-Dpybind11_DIR={stub}", "-DCMAKE_EXPORT_COMPILE_COMMANDS=ON"], env)
    return build, log


def test_cmake_compiles_cuda_for_the_arch_override(tmp_path):
    """SORA_FAST_CUDA_ARCHS (read by CMakeLists.txt at first configure) becomes nvcc's -gencode."""
    from sora_fast.tools.cuda_report import find_nvcc

    nvcc = find_nvcc()
    if nvcc is None:
        pytest.skip("no nvcc: the architectures only reach a CUDA compile")
    env = {k: v for k, v in os.environ.items() if k != "SORA_FAST_NO_CUDA"}
    env.update(SORA_FAST_CUDA_ARCHS="87", CUDACXX=str(nvcc))
    build, log = _configure(tmp_path, env, "cuda87")
    assert "architectures 87" in log, log[-3000:]
    flags = (build / "CMakeFiles" / "_C.dir" / "flags.make").read_text()
    gencode = set(re.findall(r"arch=compute_(\w+),code=\[?compute_\w+,sm_(\w+)", flags))
    assert gencode == {("87", "87")}, flags


def test_emulation_builds_without_nvcc(tmp_path):
    """With no usable CUDA compiler (none on PATH, CUDACXX broken), CMake configures a host-only
    module that still holds the emulation, and the emulation's translation unit compiles with the
    host compiler alone, including no CUDA header."""
    fake_nvcc = tmp_path / "nvcc"
    fake_nvcc.write_text("#!/bin/sh\necho 'nvcc: broken on purpose' >&2\nexit 1\n")
    fake_nvcc.chmod(0o755)
    no_cuda_path = os.pathsep.join(p for p in os.environ.get("PATH", "").split(os.pathsep)
                                   if p and not (Path(p) / "nvcc").exists())
    env = {k: v for k, v in os.environ.items() if k not in ("SORA_FAST_NO_CUDA", "CUDA_HOME", "CUDA_PATH")}
    env.update(PATH=no_cuda_path, CUDACXX=str(fake_nvcc))
    build, _ = _configure(tmp_path, env, "hostonly")
    assert "#define SORA_FAST_WITH_CUDA 0" in (build / "generated" / "build_config.h").read_text()
    commands = json.loads((build / "compile_commands.json").read_text())
    files = {Path(c["file"]).name for c in commands}
    assert files == {"bindings.cpp", "kernels_emu.cpp"}, files
    emu = next(c for c in commands if c["file"].endswith("kernels_emu.cpp"))
    cmd = shlex.split(emu["command"])
    cmd = [a for i, a in enumerate(cmd) if a != "-o" and (i == 0 or cmd[i - 1] != "-o")]
    done = subprocess.run([*cmd, "-fsyntax-only", "-H"], cwd=emu["directory"], env=env, capture_output=True,
                          text=True)
    assert done.returncode == 0, done.stderr[-4000:]
    headers = [line.lstrip(". ") for line in done.stderr.splitlines() if line.startswith(".")]
    assert any(h.endswith("adaln.cuh") for h in headers) and any(h.endswith("emulation.h") for h in headers)
    cuda_headers = [h for h in headers if re.search(r"cuda_runtime|/cuda[-/]|/targets/", h)]
    assert not cuda_headers, cuda_headers
