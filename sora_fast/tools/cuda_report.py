"""Resource and instruction gates of the CUDA C++ kernels (kernels/*.cuh) for sm_90a, without a GPU.

Compiles every shipped kernel instantiation with ``nvcc -cubin -gencode=arch=compute_90a,code=sm_90a
-Xptxas -v`` into a temporary directory, reads registers / spills / shared memory from the ptxas
log and counts 16-byte global accesses (``LDG.E.128`` / ``STG.E.128``) in the SASS printed by the
``cuobjdump`` that ships in the triton wheel (docs/kernels.md §3). The gates: 0 spill bytes and no stack
frame (local memory) everywhere, and the main-path (vectorized) kernels use 16-byte loads.
:func:`sora_fast.tools.kernel_report` merges these rows (:meth:`KernelRow.report_row`) into its table.

    python -m sora_fast.tools.cuda_report [--json PATH] [--nvcc PATH]
"""
from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Optional

ROOT = Path(__file__).resolve().parents[2]
ARCH = "-gencode=arch=compute_90a,code=sm_90a"
_NS = "sora_fast::kernels::"

# (kernel template, template arguments, main path: vectorized 16-byte accesses expected)
_ADALN_VARIANTS = [("4", "float", "float"), ("1", "float", "float")] + [
    (v, t, p) for t in ("bf16", "fp16") for p in (t, "float") for v in ("8", "1")]


def _instantiations() -> list[tuple[str, str, bool]]:
    out = []
    for kernel in ("adaln_fwd_kernel", "adaln_bwd_kernel"):
        for v, t, p in _ADALN_VARIANTS:
            args = f"{v}, {_q(t)}, {_q(p)}"
            out.append((kernel, args, v != "1"))
    for t in ("float", "bf16", "fp16"):
        vec = "4" if t == "float" else "8"  # 16 bytes of x's dtype
        for v in (vec, "1"):
            out.append(("group_norm_stats_kernel", f"{v}, {_q(t)}", v != "1"))
        for p in sorted({t, "float"}):
            for v in (vec, "1"):
                out.append(("group_norm_apply_kernel", f"{v}, {_q(t)}, {_q(p)}", v != "1"))
                out.append(("channel_rms_norm_cl_kernel", f"{v}, {_q(t)}, {_q(p)}", v != "1"))
            out.append(("channel_rms_norm_cf_kernel", f"{vec}, {_q(t)}, {_q(p)}", True))
            out.append(("channel_rms_norm_kernel", f"{_q(t)}, {_q(p)}", False))  # scalar fallback
    return out


def _q(t: str) -> str:
    return t if t == "float" else _NS + t


@dataclass
class KernelRow:
    kernel: str            # demangled-ish name with template arguments
    registers: int
    spill_bytes: int       # spill stores + spill loads
    stack_bytes: int
    smem_bytes: int        # static shared memory (dynamic is set at launch)
    ldg128: int            # LDG.E.128 in SASS
    stg128: int            # STG.E.128 in SASS
    main_path: bool        # a vectorized variant: must show LDG.E.128

    def gates(self) -> dict[str, bool]:
        """The gates this kernel must pass: no spills and no local memory; 16-byte loads on the main path."""
        gates = {"compiles": True, "no_spills": self.spill_bytes == 0 and self.stack_bytes == 0}
        if self.main_path:
            gates["ldg128"] = self.ldg128 > 0
        return gates

    def report_row(self) -> dict:
        """This kernel as a row of :mod:`sora_fast.tools.kernel_report` (same keys as its Triton rows)."""
        return {"kind": "cuda", "module": "cuda", "name": self.kernel, "kernel": self.kernel.split("<")[0],
                "target": "sm_90a", "registers": self.registers, "spill_bytes": self.spill_bytes,
                "stack_bytes": self.stack_bytes, "shared_total": self.smem_bytes, "main_path": self.main_path,
                "sass": {"LDG.E.128": self.ldg128, "STG.E.128": self.stg128}, "gates": self.gates()}


def find_nvcc(nvcc: Optional[str] = None) -> Optional[str]:
    for cand in (nvcc, os.environ.get("CUDACXX"), *(os.path.join(os.environ[v], "bin", "nvcc")
                                                   for v in ("CUDA_HOME", "CUDA_PATH") if os.environ.get(v)), "nvcc"):
        if cand and (found := shutil.which(cand)):
            return found
    return None


def find_cuobjdump() -> Optional[str]:
    try:
        import triton
    except Exception:
        triton = None
    if triton is not None:
        path = Path(triton.__file__).parent / "backends" / "nvidia" / "bin" / "cuobjdump"
        if path.is_file():
            return str(path)
    return shutil.which("cuobjdump")


def _source(part: int, parts: int) -> str:
    lines = ['#include "adaln.cuh"', '#include "vae_norm.cuh"', ""]
    for kernel, args, _ in _instantiations()[part::parts]:
        params = "const sora_fast::kernels::AdaLNArgs" if kernel.startswith("adaln") else \
            "const sora_fast::kernels::VaeNormArgs"
        lines.append(f"template __global__ void {_NS}{kernel}<{args}>({params});")
    return "\n".join(lines) + "\n"


def _demangle(names: list[str]) -> dict[str, str]:
    filt = shutil.which("c++filt")
    if not filt or not names:
        return {n: n for n in names}
    out = subprocess.run([filt], input="\n".join(names), capture_output=True, text=True).stdout.splitlines()
    return dict(zip(names, out)) if len(out) == len(names) else {n: n for n in names}


def cuda_kernel_rows(nvcc: Optional[str] = None) -> list[KernelRow]:
    """One row per shipped kernel instantiation (see the module docstring). Raises RuntimeError
    when nvcc is missing or the compile fails."""
    nvcc = find_nvcc(nvcc)
    if nvcc is None:
        raise RuntimeError("nvcc not found (set CUDACXX or CUDA_HOME, or put nvcc on PATH)")
    parts = max(1, min(4, os.cpu_count() or 1))  # one nvcc per core: the compile is the slow part
    with tempfile.TemporaryDirectory(prefix="sora_fast_cuda_report_") as tmp:
        procs = []
        for i in range(parts):
            src, cubin = Path(tmp) / f"report{i}.cu", Path(tmp) / f"report{i}.cubin"
            src.write_text(_source(i, parts))
            cmd = [nvcc, "-std=c++17", "-cubin", ARCH, "-Xptxas", "-v", "-lineinfo", f"-I{ROOT / 'kernels'}",
                   str(src), "-o", str(cubin)]
            procs.append((cubin, subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)))
        stats, sass = {}, {}
        for cubin, proc in procs:
            log = proc.communicate()[0]
            if proc.returncode != 0:
                raise RuntimeError(f"nvcc failed:\n{log[-4000:]}")
            stats.update(_parse_ptxas(log))
            sass.update(_sass_counts(cubin))
    pretty = _demangle(list(stats))
    main = {f"{_NS}{k}<{a}>".replace(" ", ""): m for k, a, m in _instantiations()}
    rows = []
    for mangled, st in stats.items():
        full = pretty[mangled].split("(")[0].removeprefix("void ")
        name = full.replace("sora_fast::kernels::", "")
        key = full.replace(" ", "")
        ldg, stg = sass.get(mangled, (0, 0))
        rows.append(KernelRow(name, st["registers"], st["spill"], st["stack"], st["smem"], ldg, stg,
                              main.get(key, False)))
    return sorted(rows, key=lambda r: r.kernel)


def _parse_ptxas(log: str) -> dict[str, dict]:
    stats: dict[str, dict] = {}
    cur = None
    for line in log.splitlines():
        if m := re.search(r"Compiling entry function '([^']+)'", line):
            cur = m.group(1)
            stats[cur] = {"registers": 0, "spill": 0, "stack": 0, "smem": 0}
        elif cur and (m := re.search(r"(\d+) bytes stack frame, (\d+) bytes spill stores, "
                                     r"(\d+) bytes spill loads", line)):
            stats[cur]["stack"] = int(m.group(1))
            stats[cur]["spill"] = int(m.group(2)) + int(m.group(3))
        elif cur and (m := re.search(r"Used (\d+) registers", line)):
            stats[cur]["registers"] = int(m.group(1))
            if s := re.search(r"(\d+) bytes smem", line):
                stats[cur]["smem"] = int(s.group(1))
    return stats


def _sass_counts(cubin: Path) -> dict[str, tuple[int, int]]:
    tool = find_cuobjdump()
    if tool is None:
        raise RuntimeError("cuobjdump not found (it ships in the triton wheel: triton/backends/nvidia/bin)")
    sass = subprocess.run([tool, "-sass", str(cubin)], capture_output=True, text=True, check=True).stdout
    counts: dict[str, tuple[int, int]] = {}
    for part in re.split(r"\n\s*Function : ", sass)[1:]:
        name = part.split("\n", 1)[0].strip()
        counts[name] = (len(re.findall(r"\bLDG\.E\.128\b", part)), len(re.findall(r"\bSTG\.E\.128\b", part)))
    return counts


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--json", metavar="PATH", help="also write the rows as JSON to PATH ('-' for stdout)")
    p.add_argument("--nvcc", metavar="PATH", help="the nvcc to use (default: CUDACXX, CUDA_HOME, PATH)")
    args = p.parse_args(argv)
    try:
        rows = cuda_kernel_rows(args.nvcc)
    except RuntimeError as e:
        print(f"cuda_report: {e}", file=sys.stderr)
        return 1
    width = max(len(r.kernel) for r in rows)
    print(f"{'kernel':<{width}}  regs  spill  stack  smem  LDG.128  STG.128  main  gates")
    for r in rows:
        print(f"{r.kernel:<{width}}  {r.registers:4d}  {r.spill_bytes:5d}  {r.stack_bytes:5d}  {r.smem_bytes:4d}  "
              f"{r.ldg128:7d}  {r.stg128:7d}  {'yes' if r.main_path else '   '}  "
              f"{'ok' if all(r.gates().values()) else 'FAIL ' + ','.join(g for g, ok in r.gates().items() if not ok)}")
    failing = [r.kernel for r in rows if not all(r.gates().values())]
    print(f"{len(rows)} kernels for sm_90a; gates (0 spills, no stack, 16-byte loads on the main path): "
          f"{'PASS' if not failing else 'FAIL: ' + ', '.join(failing)}")
    if args.json:
        text = json.dumps([asdict(r) for r in rows], indent=1)
        if args.json == "-":
            print(text)
        else:
            Path(args.json).write_text(text + "\n")
    return 0 if not failing else 2


if __name__ == "__main__":
    sys.exit(main())
