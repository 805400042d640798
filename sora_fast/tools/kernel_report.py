"""Offline sm_90 report of every shipped Triton kernel config: registers, spills, shared memory,
instruction mix, occupancy, and the gates a shipped config must pass.

Needs no GPU. Each kernel module exposes ``shipped_configs() -> list[KernelConfig]``
(:mod:`sora_fast.triton._spec`); every config is compiled with ``triton.compile`` for an H100/H200
target (``GPUTarget("cuda", 90, 32)``) with the same 16-divisibility hints the runtime would pass for
16-aligned pointers and strides (without them the code, and so every number here, is not the code that
runs: unaligned loads are not vectorized and spill far more). The cubin is then read with the
``cuobjdump`` shipped in the triton wheel:

* ``-res-usage``: registers per thread, STACK (bytes of local memory per thread: spills, since Triton
  kernels declare no local arrays) and static shared memory;
* ``-sass``: counts of HGMMA (wgmma), HMMA (mma.sync), UTMALDG (TMA loads), LDGSTS (cp.async),
  16-byte global loads (LDG.E.128) and local-memory traffic (LDL/STL).

Dynamic shared memory is ``compiled.metadata.shared`` (what the launcher requests).

Gates (a config failing one is not shipped): ``compiles``; ``no_spills`` (STACK == 0 and no STL);
``smem_fits`` (dynamic + static shared <= 227 KiB, the per-block opt-in maximum of sm_90);
``hgmma`` (at least one HGMMA when the config is marked ``tensor_core``); ``async_copy`` (asynchronous
global-to-shared copies, cp.async (LDGSTS) or TMA (UTMALDG), when the config is marked ``async_copy``: its
main loop's loads are software-pipelined, not issued and waited for one tile at a time). Exit status 1 when any gate of
any row fails, including the CUDA C++ kernels' rows merged from :mod:`sora_fast.tools.cuda_report`
(compiled with nvcc for sm_90a; their gates: ``no_spills`` (no spill bytes, no stack frame) and, for the
vectorized main-path kernels, ``ldg128`` (16-byte global loads in SASS)). Without nvcc those rows are
listed as skipped with the reason; ``--no-cuda`` leaves them out.

Usage::

    python -m sora_fast.tools.kernel_report                # attention + conv3d configs + the CUDA kernels
    python -m sora_fast.tools.kernel_report --module sora_fast.triton.conv3d --json report.json
    python -m sora_fast.tools.kernel_report --module path/to/file.py:sample_configs --per-kernel 1

``TRITON_INTERPRET`` must be unset for the kernels to be compiled (with it set, ``@triton.jit`` gives an
interpreter function); the command unsets it for itself, and :func:`run_report_subprocess` runs the report
in a clean child process for callers (tests) that imported triton under the interpreter.
"""
from __future__ import annotations

import argparse
import importlib
import importlib.util
import json
import math
import os
import re
import subprocess
import sys
import tempfile
import time
import warnings
from pathlib import Path
from typing import Any, Optional, Sequence

DEFAULT_MODULES = ("sora_fast.triton.attention", "sora_fast.triton.conv3d")
CONFIGS_FUNCTION = "shipped_configs"

# sm_90 (H100 / H200) limits, from the CUDA occupancy calculator's table for compute capability 9.0.
TARGET_ARCH = 90
SMEM_PER_BLOCK_MAX = 227 * 1024        # opt-in maximum of dynamic + static shared memory per block
SMEM_PER_SM = 228 * 1024               # the SM's carve-out; each resident block also reserves 1 KiB
SMEM_RESERVED_PER_BLOCK = 1024
SMEM_ALLOC_UNIT = 128
REGS_PER_SM = 65536
REG_SUBPARTITIONS = 4                  # the register file is split over 4 schedulers; warps do not straddle
REG_ALLOC_UNIT = 256                   # registers are allocated per warp in units of 256
THREADS_PER_SM = 2048
BLOCKS_PER_SM = 32

SASS_COUNTS = ("HGMMA", "HMMA", "UTMALDG", "LDGSTS", "LDG.E.128", "LDL", "STL")
_SASS_LINE = re.compile(r"/\*[0-9a-f]{4,}\*/\s+(?:@!?U?P[T0-9]+\s+)?([A-Z][A-Z0-9_.]*)")
_RES_USAGE = re.compile(r"REG:(\d+)\s+STACK:(\d+)\s+SHARED:(\d+)\s+LOCAL:(\d+)")

__all__ = ["DEFAULT_MODULES", "compile_config", "count_sass", "occupancy", "report", "run_report_subprocess",
           "main"]


# --- reading the cubin ----------------------------------------------------------------------------
def _cuobjdump() -> str:
    from triton import knobs

    try:
        return knobs.nvidia.cuobjdump.path
    except Exception as e:  # wheel without the NVIDIA tools
        raise RuntimeError(f"cuobjdump not found (triton ships it in triton/backends/nvidia/bin): {e}") from e


def count_sass(sass: str) -> dict[str, int]:
    """Counts of the instructions in :data:`SASS_COUNTS` in ``cuobjdump -sass`` output.

    Matches opcodes, not substrings: ``LDG.E.128`` is any LDG with a ``.128`` modifier (16-byte load),
    the others compare the opcode before its first modifier (``HGMMA.64x128x16.F32.BF16`` is an HGMMA).
    """
    counts = dict.fromkeys(SASS_COUNTS, 0)
    for m in _SASS_LINE.finditer(sass):
        parts = m.group(1).split(".")
        if parts[0] == "LDG" and "128" in parts[1:]:
            counts["LDG.E.128"] += 1
        elif parts[0] in counts:
            counts[parts[0]] += 1
    return counts


def _read_cubin(cubin: bytes) -> dict[str, Any]:
    tool = _cuobjdump()
    with tempfile.TemporaryDirectory() as tmp:
        path = os.path.join(tmp, "kernel.cubin")
        with open(path, "wb") as f:
            f.write(cubin)
        res = subprocess.run([tool, "-res-usage", path], capture_output=True, text=True, check=True).stdout
        sass = subprocess.run([tool, "-sass", path], capture_output=True, text=True, check=True).stdout
    m = _RES_USAGE.search(res)
    if m is None:
        raise RuntimeError(f"could not parse `cuobjdump -res-usage` output:\n{res}")
    regs, stack, static_smem, local = (int(x) for x in m.groups())
    return {"registers": regs, "stack_bytes": stack, "static_shared": static_smem, "local_bytes": local,
            "sass": count_sass(sass)}


def occupancy(registers: int, num_warps: int, shared_bytes: int) -> dict[str, int]:
    """Resident blocks per SM on sm_90, limited by registers, shared memory and threads (CUDA occupancy
    calculator rules: registers allocated per warp in units of 256 inside each of 4 sub-partitions;
    1 KiB of shared memory reserved per block; 2048 threads and 32 blocks per SM)."""
    regs_per_warp = math.ceil(max(registers, 1) * 32 / REG_ALLOC_UNIT) * REG_ALLOC_UNIT
    warps_by_regs = (REGS_PER_SM // REG_SUBPARTITIONS // regs_per_warp) * REG_SUBPARTITIONS
    by_regs = warps_by_regs // num_warps
    smem_block = math.ceil((shared_bytes + SMEM_RESERVED_PER_BLOCK) / SMEM_ALLOC_UNIT) * SMEM_ALLOC_UNIT
    by_smem = SMEM_PER_SM // smem_block if shared_bytes <= SMEM_PER_BLOCK_MAX else 0
    by_threads = THREADS_PER_SM // (num_warps * 32)
    blocks = min(by_regs, by_smem, by_threads, BLOCKS_PER_SM)
    return {"blocks_per_sm_by_regs": by_regs, "blocks_per_sm_by_smem": by_smem,
            "blocks_per_sm_by_threads": by_threads, "blocks_per_sm": blocks, "warps_per_sm": blocks * num_warps}


# --- compiling one config -------------------------------------------------------------------------
def _full_signature(cfg) -> dict[str, str]:
    """Signature in parameter order with constexprs marked, as the runtime's binder builds it."""
    names = list(cfg.fn.arg_names)
    unknown = sorted((set(cfg.signature) | set(cfg.constexprs)) - set(names))
    if unknown:
        raise ValueError(f"{cfg.name}: signature/constexprs name arguments {cfg.fn.__name__} does not have: {unknown}")
    missing = [n for n in names if n not in cfg.signature and n not in cfg.constexprs]
    if missing:
        raise ValueError(f"{cfg.name}: arguments of {cfg.fn.__name__} with neither a type in signature nor a "
                         f"constexpr value: {missing}")
    return {n: "constexpr" if n in cfg.constexprs else cfg.signature[n] for n in names}


def _divisibility_attrs(cfg) -> dict[tuple[int, ...], list]:
    """``{(arg_index,): [["tt.divisibility", 16]]}``: the runtime's ``parse_attr("D")`` for each hinted
    argument (triton 3.9 ``BaseBackend.parse_attr``), indexed by position among all parameters."""
    names = list(cfg.fn.arg_names)
    attrs = {}
    for n in cfg.divisible_by_16:
        if n not in cfg.signature:
            raise ValueError(f"{cfg.name}: divisible_by_16 names {n!r}, which is not a runtime argument of "
                             f"{cfg.fn.__name__} (signature: {sorted(cfg.signature)})")
        attrs[(names.index(n),)] = [["tt.divisibility", 16]]
    return attrs


def compile_config(cfg, arch: int = TARGET_ARCH) -> dict[str, Any]:
    """Compile one :class:`~sora_fast.triton._spec.KernelConfig` offline for ``sm_<arch>`` and return its
    report row (without ``module``). Compile errors become a row whose ``compiles`` gate is False."""
    row: dict[str, Any] = {
        "kind": "triton", "name": cfg.name, "kernel": getattr(cfg.fn, "__name__", str(cfg.fn)),
        "num_warps": cfg.num_warps, "num_stages": cfg.num_stages,
        "constexprs": {k: (v if isinstance(v, (int, float, str, bool)) or v is None else str(v))
                       for k, v in cfg.constexprs.items()},
        "divisible_by_16": list(cfg.divisible_by_16), "tensor_core": cfg.tensor_core,
        "async_copy": cfg.async_copy, "target": f"sm_{arch}",
    }
    t0 = time.perf_counter()
    try:
        import triton
        from triton.backends.compiler import GPUTarget
        from triton.compiler import ASTSource

        if not isinstance(cfg.fn, triton.runtime.JITFunction):
            raise TypeError(f"{cfg.name}: fn must be a @triton.jit function, got {type(cfg.fn).__name__} "
                            "(is TRITON_INTERPRET set? it must be unset to compile)")
        src = ASTSource(cfg.fn, _full_signature(cfg), dict(cfg.constexprs), _divisibility_attrs(cfg))
        with warnings.catch_warnings():
            # triton 3.9 warns once that the FP-fusion default will change; we compile with the default
            # the runtime uses today, so the warning is noise in a report.
            warnings.filterwarnings("ignore", message=".*TRITON_DEFAULT_FP_FUSION.*")
            compiled = triton.compile(src, target=GPUTarget("cuda", arch, 32),
                                      options={"num_warps": cfg.num_warps, "num_stages": cfg.num_stages})
        info = _read_cubin(compiled.asm["cubin"])
    except Exception as e:  # report it as a failed gate, keep going with the other configs
        row.update(error=f"{type(e).__name__}: {e}".strip()[:2000], compile_s=round(time.perf_counter() - t0, 2),
                   gates={"compiles": False})
        return row
    dyn = int(compiled.metadata.shared)
    total_smem = dyn + info["static_shared"]
    sass = info.pop("sass")
    row.update(info)
    row.update(shared_dynamic=dyn, shared_total=total_smem, spill_bytes=info["stack_bytes"], sass=sass,
               compile_s=round(time.perf_counter() - t0, 2))
    row.update(occupancy(info["registers"], cfg.num_warps, total_smem))
    gates = {"compiles": True, "no_spills": info["stack_bytes"] == 0 and sass["STL"] == 0,
             "smem_fits": total_smem <= SMEM_PER_BLOCK_MAX}
    if cfg.tensor_core:
        gates["hgmma"] = sass["HGMMA"] > 0
    if cfg.async_copy:
        gates["async_copy"] = sass["LDGSTS"] + sass["UTMALDG"] > 0
    row["gates"] = gates
    return row


# --- modules --------------------------------------------------------------------------------------
def _load_configs(spec: str):
    """``module.name``, ``path/to/file.py``, either with an optional ``:function`` (default
    ``shipped_configs``) -> (list of KernelConfig, None) or (None, reason skipped)."""
    target, _, func = spec.partition(":")
    if spec.count(":") > 1 or (len(target) == 1 and target.isalpha()):  # not meant for Windows drive letters
        return None, f"cannot parse {spec!r}: expected MODULE[:FUNCTION] or FILE.py[:FUNCTION]"
    func = func or CONFIGS_FUNCTION
    try:
        if target.endswith(".py"):
            path = Path(target).resolve()
            mod_spec = importlib.util.spec_from_file_location(f"_kernel_report_{path.stem}", path)
            if mod_spec is None or not path.exists():
                return None, f"file not found: {target}"
            mod = importlib.util.module_from_spec(mod_spec)
            sys.modules[mod_spec.name] = mod   # @triton.jit reads the source through the module
            mod_spec.loader.exec_module(mod)
        else:
            mod = importlib.import_module(target)
    except Exception as e:
        return None, f"import failed: {type(e).__name__}: {e}"
    fn = getattr(mod, func, None)
    if not callable(fn):
        return None, f"module has no {func}()"
    try:
        configs = list(fn())
    except Exception as e:
        return None, f"{func}() raised {type(e).__name__}: {e}"
    return configs, None


def _select(configs, per_kernel: int, name_filter: Optional[str]):
    """Configs matching ``name_filter`` (regex on the config name), at most ``per_kernel`` per kernel
    function (0 = all), keeping the module's order so the first config of each kernel is its default."""
    seen: dict[str, int] = {}
    chosen = []
    for cfg in configs:
        if name_filter and not re.search(name_filter, cfg.name):
            continue
        key = getattr(cfg.fn, "__name__", repr(cfg.fn))
        if per_kernel and seen.get(key, 0) >= per_kernel:
            continue
        seen[key] = seen.get(key, 0) + 1
        chosen.append(cfg)
    return chosen


def _cuda_rows() -> tuple[list[dict], Optional[str]]:
    """Rows of the CUDA C++ kernels from :mod:`sora_fast.tools.cuda_report` when it exists."""
    try:
        mod = importlib.import_module("sora_fast.tools.cuda_report")
    except ModuleNotFoundError as e:
        if e.name == "sora_fast.tools.cuda_report":
            return [], "sora_fast.tools.cuda_report does not exist"
        return [], f"import failed: {e}"
    except Exception as e:
        return [], f"import failed: {type(e).__name__}: {e}"
    fn = getattr(mod, "cuda_kernel_rows", None)
    if not callable(fn):
        return [], "sora_fast.tools.cuda_report has no cuda_kernel_rows()"
    try:
        rows = [r.report_row() for r in fn()]
    except Exception as e:
        return [], f"cuda_kernel_rows() raised {type(e).__name__}: {e}"
    return rows, None


def _compile_indexed(args):
    """Process-pool worker: configs are rebuilt in the child (JIT functions do not pickle)."""
    spec, index, per_kernel, name_filter = args
    configs, _ = _load_configs(spec)
    return compile_config(_select(configs, per_kernel, name_filter)[index])


def report(modules: Sequence[str] = DEFAULT_MODULES, *, per_kernel: int = 0, name_filter: Optional[str] = None,
           jobs: int = 1, include_cuda: bool = True, progress=None) -> dict[str, Any]:
    """Compile every selected config of every module; returns ``{"meta", "rows", "skipped", "ok"}``.

    Must run with ``TRITON_INTERPRET`` unset (see :func:`run_report_subprocess`)."""
    if os.environ.get("TRITON_INTERPRET", "0") not in ("", "0"):
        raise RuntimeError("TRITON_INTERPRET is set: @triton.jit gives interpreter functions that cannot be "
                           "compiled; unset it, or use run_report_subprocess()")
    import torch
    import triton

    rows: list[dict] = []
    skipped: list[dict] = []
    for spec in modules:
        configs, reason = _load_configs(spec)
        if configs is None:
            skipped.append({"module": spec, "reason": reason})
            continue
        chosen = _select(configs, per_kernel, name_filter)
        if not chosen:
            skipped.append({"module": spec, "reason": "no configs (after --per-kernel / --filter)"})
            continue
        if jobs > 1 and len(chosen) > 1:
            import concurrent.futures as cf
            import multiprocessing as mp

            # fork: the children inherit the imported modules (file-loaded ones too) and the environment.
            with cf.ProcessPoolExecutor(min(jobs, len(chosen)), mp_context=mp.get_context("fork")) as pool:
                results = pool.map(_compile_indexed, [(spec, i, per_kernel, name_filter) for i in range(len(chosen))])
                for row in results:
                    rows.append({"module": spec, **row})
                    if progress:
                        progress(rows[-1])
        else:
            for cfg in chosen:
                rows.append({"module": spec, **compile_config(cfg)})
                if progress:
                    progress(rows[-1])
    if include_cuda:
        cuda_rows, reason = _cuda_rows()
        rows.extend(cuda_rows)
        if reason:
            skipped.append({"module": "sora_fast.tools.cuda_report", "reason": reason})
    ok = all(all(r.get("gates", {"compiles": False}).values()) for r in rows)
    meta = {"target": f"sm_{TARGET_ARCH}", "triton": triton.__version__, "torch": torch.__version__,
            "smem_per_block_max": SMEM_PER_BLOCK_MAX, "python": sys.version.split()[0]}
    return {"meta": meta, "rows": rows, "skipped": skipped, "ok": ok}


def run_report_subprocess(args: Sequence[str] = (), *, timeout: Optional[float] = None,
                          cwd: Optional[str] = None) -> tuple[int, dict, str]:
    """Run ``python -m sora_fast.tools.kernel_report ARGS --json TMP`` in a child process without
    ``TRITON_INTERPRET``; returns (exit status, parsed JSON report, combined output)."""
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    with tempfile.TemporaryDirectory() as tmp:
        out = os.path.join(tmp, "report.json")
        proc = subprocess.run([sys.executable, "-m", "sora_fast.tools.kernel_report", *args, "--json", out],
                              env=env, cwd=cwd, capture_output=True, text=True, timeout=timeout)
        data = json.loads(Path(out).read_text()) if os.path.exists(out) else {}
    return proc.returncode, data, proc.stdout + proc.stderr


# --- printing -------------------------------------------------------------------------------------
_COLUMNS = ("module", "config", "warps", "stg", "regs", "spill B", "smem KiB", "blk/SM", "HGMMA", "HMMA", "TMA",
            "LDGSTS", "LDG128", "LDL/STL", "gates")


def _fmt_row(r: dict) -> list[str]:
    s = r.get("sass", {})
    gates = r.get("gates", {})
    failed = [k for k, v in gates.items() if not v]
    smem = r.get("shared_total", r.get("shared"))

    def g(key):
        v = r.get(key)
        return "-" if v is None else str(v)

    return [r.get("module", "").rsplit(".", 1)[-1] if r.get("kind") == "triton" else r.get("module", ""),
            g("name"), g("num_warps"), g("num_stages"), g("registers"), g("spill_bytes"),
            "-" if smem is None else f"{smem / 1024:.1f}", g("blocks_per_sm"),
            *(str(s.get(k, "-")) for k in ("HGMMA", "HMMA", "UTMALDG", "LDGSTS", "LDG.E.128")),
            f"{s.get('LDL', '-')}/{s.get('STL', '-')}", "ok" if not failed else "FAIL " + ",".join(failed)]


def format_table(rows: Sequence[dict]) -> str:
    """Fixed-width table, one line per row; a compile error adds its first and last lines below."""
    cells = [list(_COLUMNS)] + [_fmt_row(r) for r in rows]
    widths = [max(len(c[i]) for c in cells) for i in range(len(_COLUMNS))]
    lines = []
    for r, line in zip([None, *rows], cells):
        lines.append("  ".join(c.ljust(w) for c, w in zip(line, widths)).rstrip())
        if r is not None and "error" in r:
            err = [x for x in r["error"].splitlines() if x.strip()]
            lines.append(f"    error: {err[0][:200]}" + (f" ... {err[-1].strip()[:300]}" if len(err) > 1 else ""))
    return "\n".join(lines)


def main(argv=None, prog: str = "python -m sora_fast.tools.kernel_report") -> int:
    parser = argparse.ArgumentParser(prog=prog,
                                     description=__doc__.split("\n\n")[0],
                                     epilog="Exit status: 0 when every gate of every row passes, 1 otherwise, "
                                            "2 on a usage error.")
    parser.add_argument("--module", action="append", metavar="SPEC",
                        help="kernel module to report: a dotted module name or a .py file, optionally with "
                             f":FUNCTION (default :{CONFIGS_FUNCTION}); repeat for several. "
                             f"Default: {', '.join(DEFAULT_MODULES)}. A module that does not import or has no "
                             "such function is listed as skipped with the reason, not an error.")
    parser.add_argument("--json", metavar="PATH", help="also write {meta, rows, skipped, ok} as JSON to PATH")
    parser.add_argument("--per-kernel", type=int, default=0, metavar="N",
                        help="compile at most the first N configs of each kernel function (0: all; default 0). "
                             "Quick checks use 1: each kernel's first config.")
    parser.add_argument("--filter", metavar="REGEX", help="only configs whose name matches REGEX")
    parser.add_argument("--jobs", type=int, default=1, metavar="N",
                        help="compile N configs in parallel worker processes (default 1; ptxas is single-threaded)")
    parser.add_argument("--no-cuda", action="store_true",
                        help="do not merge CUDA C++ kernel rows from sora_fast.tools.cuda_report")
    parser.add_argument("--quiet", action="store_true", help="print only the table and the summary line")
    args = parser.parse_args(argv)
    if args.per_kernel < 0 or args.jobs < 1:
        parser.error(f"--per-kernel must be >= 0 and --jobs >= 1, got {args.per_kernel} and {args.jobs}")

    if "triton" in sys.modules and os.environ.get("TRITON_INTERPRET", "0") not in ("", "0"):
        # triton was already imported in interpreter mode by the caller: only a fresh process can compile.
        rc, data, output = run_report_subprocess(argv if argv is not None else sys.argv[1:])
        print(output, end="")
        return rc
    os.environ.pop("TRITON_INTERPRET", None)   # before triton (and any kernel module) is imported

    def progress(row):
        if not args.quiet:
            state = "ok" if all(row.get("gates", {}).values()) else "FAIL"
            print(f"  compiled {row['name']} in {row.get('compile_s', '?')} s: {state}", file=sys.stderr, flush=True)

    t0 = time.perf_counter()
    result = report(args.module or DEFAULT_MODULES, per_kernel=args.per_kernel, name_filter=args.filter,
                    jobs=args.jobs, include_cuda=not args.no_cuda, progress=progress)
    rows = result["rows"]
    print(f"sm_{TARGET_ARCH} offline kernel report (triton {result['meta']['triton']}); smem limit "
          f"{SMEM_PER_BLOCK_MAX} B per block")
    if rows:
        print(format_table(rows))
    for s in result["skipped"]:
        print(f"skipped {s['module']}: {s['reason']}")
    failed = sum(1 for r in rows if not all(r.get("gates", {"compiles": False}).values()))
    if args.json:
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json).write_text(json.dumps(result, indent=1))
    print(f"{len(rows)} configs, {failed} failing a gate, {len(result['skipped'])} modules skipped, "
          f"{time.perf_counter() - t0:.1f} s -> {'OK' if result['ok'] else 'FAILED'}")
    return 0 if result["ok"] else 1


if __name__ == "__main__":
    sys.exit(main())
