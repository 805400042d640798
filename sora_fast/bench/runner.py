"""``sora-fast bench``: every op across providers side by side in one run, checked, timed, written as rows.

For each op (:mod:`sora_fast.bench.suites`) and each of its cases:

1. the independent reference runs in float64 on the same inputs, and once more in the benchmark dtype
   (PyTorch's own error at that precision);
2. every provider is built (or skipped, with the reason) and run once; its output must be within
   ``2 x`` the reference's own low-precision error plus a few units in the last place of the dtype
   (``REL_TOL``, relative to the largest output) of the float64 reference. A provider that fails the
   check (or raises) gets a row with the error and no timing: no number is ever reported from a wrong run;
3. the providers that passed are timed: on a CPU by pytest-benchmark (``benchmark.pedantic`` in
   :mod:`sora_fast.bench.timing_suite`, run through ``pytest.main``; the passes over all cases and
   providers are interleaved so that machine noise hits every provider alike), on a GPU with
   ``triton.testing.do_bench`` (median, docs/kernels.md §5) while NVML telemetry is sampled.

Rows (one per op x case x provider) carry ms, the roofline throughput (TFLOP/s or GB/s), % of the
device's datasheet floor when it is known, the time relative to eager torch, the check's error and
tolerance, shape, dtype, device name and versions. Outputs: ``bench.json`` (``meta`` + ``rows``),
``bench.csv`` and one PNG per op (throughput against sequence length, hidden size or channels).

Floors and tolerance (:mod:`~sora_fast.bench.floors`), versions and writers (:mod:`~sora_fast.bench.report`)
and timing rules (:mod:`~sora_fast.bench.timing`) are shared with the ``bench/bench_<op>.py`` scripts.
"""
from __future__ import annotations

import argparse
import importlib.util
import json
import math
import os
import statistics
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Optional, Sequence

import torch

from .args import check_at_least, torch_threads
from .floors import FLOORS, REL_TOL, check_tolerance, floor_for, pct_of_floor, throughput
from .report import COLUMNS, device_name, public_rows, versions, write_outputs
from .suites import KERNEL_BACKENDS, OP_ALIASES, PROVIDERS, SUITES, BenchCase, ProviderFn, Skip, expand_ops
from .timing import do_bench_budget

# FLOORS, REL_TOL (floors.py) and COLUMNS (report.py) stay importable from here.
__all__ = ["run_bench", "main", "FLOORS", "REL_TOL", "COLUMNS", "DEVICES"]

DEVICES = ("auto", "cpu", "cuda")
TELEMETRY_KEYS = ("sm_clock_mhz", "mem_clock_mhz", "power_w", "memory_used_mib", "gpu_util_pct", "temperature_c")


@dataclass
class _Timed:
    """A provider that passed its check, waiting to be timed."""

    key: str
    group: str
    fn: Callable[[], Any]
    rounds: int
    row: dict


# --- environment -----------------------------------------------------------------------------------
def resolve_device(device: str) -> torch.device:
    if device not in DEVICES:
        raise ValueError(f"--device must be one of {', '.join(DEVICES)}; got {device!r}")
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if device == "cuda" and not torch.cuda.is_available():
        raise ValueError("--device cuda needs a CUDA GPU, but torch.cuda.is_available() is False here "
                         "(use --device cpu or auto)")
    return torch.device(device)


# --- the correctness gate ------------------------------------------------------------------------------
def _to64(a: dict) -> dict:
    return {k: v.double() if isinstance(v, torch.Tensor) and v.is_floating_point() else v for k, v in a.items()}


def _max_diff(got: Sequence[torch.Tensor], ref: Sequence[torch.Tensor]) -> float:
    if len(got) != len(ref):
        raise ValueError(f"the provider returned {len(got)} tensors, the reference {len(ref)}")
    err = 0.0
    for g, r in zip(got, ref):
        if tuple(g.shape) != tuple(r.shape):
            raise ValueError(f"output shape {tuple(g.shape)} differs from the reference's {tuple(r.shape)}")
        err = max(err, (g.double() - r.double()).abs().max().item() if g.numel() else 0.0)
    return err


def _sync(dev: torch.device) -> None:
    if dev.type == "cuda":
        torch.cuda.synchronize(dev)


def _first_line(e: BaseException) -> str:
    text = str(e).strip().splitlines()
    return f"{type(e).__name__}: {text[0] if text else ''}"[:300]


# --- timing --------------------------------------------------------------------------------------------
class _SuitePlugin:
    """Parametrizes the timing suite's ``bench_item`` with the providers to time (in pass order)."""

    def __init__(self, items: list[_Timed]):
        self.items = items

    def pytest_generate_tests(self, metafunc):
        if "bench_item" in metafunc.fixturenames:
            metafunc.parametrize("bench_item", self.items, ids=[f"p{i}-{t.key}" for i, t in enumerate(self.items)])


def time_with_pytest_benchmark(items: list[_Timed], passes: int, quiet: bool = False,
                               json_path: Optional[Path] = None) -> dict[str, list[float]]:
    """Seconds per round of each item, timed by pytest-benchmark in ``passes`` interleaved passes.

    pytest-benchmark's own JSON (every round, machine info) is kept at ``json_path`` when given."""
    import pytest

    from . import timing_suite

    if not items:
        return {}
    per_pass = []
    for p in range(passes):
        for t in items:
            per_pass.append(_Timed(t.key, t.group, t.fn, max(1, math.ceil(t.rounds / passes)), t.row))
    with tempfile.TemporaryDirectory() as tmp:
        js = Path(json_path) if json_path is not None else Path(tmp) / "benchmark.json"
        js.parent.mkdir(parents=True, exist_ok=True)
        # An empty ini of our own: no project's addopts (e.g. xdist's -n, which disables pytest-benchmark) and no
        # plugin that reorders tests (the order is the interleaving) changes how the providers are timed.
        ini = Path(tmp) / "pytest.ini"
        ini.write_text("[pytest]\n")
        args = [timing_suite.__file__, "-c", str(ini), "--rootdir", str(Path(timing_suite.__file__).parent),
                "-p", "no:cacheprovider", "-p", "no:logging", "-p", "no:randomly", "-q", "--no-header",
                "-o", "console_output_style=classic",
                f"--benchmark-json={js}", "--benchmark-disable-gc", "--benchmark-group-by=group",
                "--benchmark-columns=median,min,rounds", "--benchmark-sort=name"]
        if quiet:
            args.append("--benchmark-quiet")
        rc = pytest.main(args, plugins=[_SuitePlugin(per_pass)])
        data = json.loads(js.read_text()) if js.exists() else {"benchmarks": []}
    if rc not in (0, pytest.ExitCode.OK) and not data["benchmarks"]:
        raise RuntimeError(f"the pytest-benchmark run failed (exit code {int(rc)}); its output is above")
    times: dict[str, list[float]] = {}
    for b in data["benchmarks"]:
        times.setdefault(b["extra_info"]["key"], []).extend(b["stats"]["data"])
    return times


def _gpu_time(fn: Callable[[], Any], quick: bool) -> tuple[float, float]:
    import triton.testing

    warmup, rep = do_bench_budget(quick)
    median, fastest = triton.testing.do_bench(fn, warmup=warmup, rep=rep, quantiles=[0.5, 0.0])
    return median, fastest


# --- the run -------------------------------------------------------------------------------------------
_CPU_EMULATIONS = {"sora_fast_triton": "the Triton interpreter",
                   "sora_fast_cuda": "the host emulation of the CUDA kernels"}


def _default_skip(provider: str, dev: torch.device, quick: bool, explicit: bool) -> Optional[str]:
    """Why a provider is left out unless asked for by name (None: it runs)."""
    if explicit:
        return None
    if dev.type == "cpu" and provider in _CPU_EMULATIONS:
        return (f"on a CPU the {provider[len('sora_fast_'):]} backend runs under {_CPU_EMULATIONS[provider]}: a "
                f"correctness tool, not a speed provider (--provider {provider} times it anyway)")
    if quick and provider == "torch_compile":
        return ("--quick leaves out torch.compile (compiling every shape takes seconds to minutes); run without "
                "--quick or pass --provider torch_compile")
    return None


def _check_names(ops: list[str], providers: Optional[Sequence[str]], suites: dict[str, dict[str, ProviderFn]]):
    if providers is None:
        return None
    if isinstance(providers, str):
        raise TypeError(f"providers must be a list of names, got the string {providers!r}")
    if not providers:
        raise ValueError("providers must name at least one provider (or be None for all), got an empty list")
    valid = list(dict.fromkeys([*PROVIDERS, *(p for s in suites.values() for p in s)]))
    for p in providers:
        if p not in valid:
            raise ValueError(f"--provider must be among {', '.join(valid)}; got {p!r}")
    chosen = {p for op in ops for p in suites[op]}
    missing = [p for p in providers if p not in chosen]
    if missing:
        every = {op: {**SUITES[op].providers, **suites.get(op, {})} for op in SUITES}
        where = {p: [op for op, s in every.items() if p in s] for p in missing}
        detail = "; ".join(f"{p} applies to {', '.join(w) or 'no op'}" for p, w in where.items())
        raise ValueError(f"--provider {', '.join(missing)} does not apply to the chosen ops ({', '.join(ops)}): "
                         f"{detail}")
    return set(providers)


class _Progress:
    """Progress lines on stdout (none when quiet); a line with a ``once`` key is printed the first time only."""

    def __init__(self, quiet: bool):
        self.quiet, self.seen = quiet, set()

    def __call__(self, text: str = "", once: Optional[str] = None) -> None:
        if self.quiet or once in self.seen:
            return
        if once is not None:
            self.seen.add(once)
        print(text)


@dataclass
class _Run:
    """What every case of one ``run_bench`` call shares."""

    dev: torch.device
    dtype: torch.dtype
    quick: bool
    device_name: str
    versions: dict
    explicit: Optional[set]
    say: _Progress
    pending: list = field(default_factory=list)     # [_Timed]: CPU providers that passed, timed at the end
    nvml: Any = None                                # the NVML sampler of a GPU run

    @property
    def dtype_name(self) -> str:
        return str(self.dtype).replace("torch.", "")


def run_bench(ops: Optional[Sequence[str]] = None, providers: Optional[Sequence[str]] = None, *,
              device: str = "auto", quick: bool = False, out: Optional[str] = "bench_results",
              extra_providers: Optional[dict[str, dict[str, ProviderFn]]] = None, plots: bool = True,
              quiet: bool = False, argv: Optional[Sequence[str]] = None) -> dict:
    """Run the op suites and write ``bench.json``, ``bench.csv`` and ``bench_<op>.png`` to ``out``.

    Args:
        ops: op names or aliases (``adaln``, ``vae_norm``); None: every op.
        providers: provider names to run; None: every provider of the chosen ops, with the CPU kernel
            emulations and (with ``quick``) ``torch_compile`` reported as skipped unless named here.
        device: ``auto`` (a CUDA GPU if there is one), ``cpu`` or ``cuda``.
        quick: the smallest cases and short timing (seconds on a CPU).
        out: output directory; None writes nothing.
        extra_providers: ``{op: {name: builder}}`` added to the suites (a builder as in
            :mod:`sora_fast.bench.suites`), e.g. a provider under development.
        quiet: no progress output; argv: the command line, recorded in ``meta``.
    Returns ``{"meta": ..., "rows": [...]}``.
    """
    from ..profile import _environment, _NvmlSampler

    ops = expand_ops([ops] if isinstance(ops, str) else ops)
    dev = resolve_device(device)
    provs = {op: {**SUITES[op].providers, **(extra_providers or {}).get(op, {})} for op in ops}
    explicit = _check_names(ops, providers, provs)
    if dev.type == "cpu" and importlib.util.find_spec("pytest_benchmark") is None:
        raise ValueError("timing on a CPU uses pytest-benchmark, which is not installed: "
                         "pip install 'sora-fast[bench]' (or pytest-benchmark)")
    run = _Run(dev, torch.float32 if dev.type == "cpu" else torch.bfloat16, quick, device_name(dev), versions(),
               explicit, _Progress(quiet))
    passes = 1 if quick else 3
    load_start, t_start = os.getloadavg(), time.perf_counter()
    run.say(f"sora-fast bench on {run.device_name}, {run.dtype_name}, ops: {', '.join(ops)}"
            + (" (--quick)" if quick else ""))
    rows: list[dict] = []
    with _NvmlSampler(dev) as nvml:
        run.nvml = nvml
        for op in ops:
            for case in SUITES[op].cases(dev.type, quick, run.dtype):
                rows += _run_case(run, op, case, provs[op])
                if dev.type == "cuda":
                    torch.cuda.empty_cache()
    if run.pending:
        run.say(f"timing {len(run.pending)} providers with pytest-benchmark ({passes} interleaved pass(es))")
        _time_pending(run, passes, None if out is None else Path(out) / "pytest_benchmark.json")
    _relative_to_eager(rows)
    meta = {"command": None if argv is None else "sora-fast bench " + " ".join(argv),
            "device": run.device_name, "dtype": run.dtype_name, "quick": quick, "ops": ops,
            "providers": sorted(explicit) if explicit else "all",
            "timer": ("pytest-benchmark (benchmark.pedantic, 1 call per round, 1 warm-up round, GC off): median "
                      f"of the rounds of {passes} interleaved pass(es)") if dev.type == "cpu" else
                     "triton.testing.do_bench (median; min beside it)",
            "check": "max |provider - float64 reference| <= 2 x |reference at the dtype - float64 reference| + "
                     f"{REL_TOL[run.dtype]:g} x max(1, max |reference|)",
            "work": {op: SUITES[op].work_note for op in ops}, "floors": FLOORS, "versions": run.versions,
            "environment": _environment(dev),
            "telemetry": nvml.summary() if dev.type == "cuda" else {"available": False,
                                                                    "reason": "a CPU run: NVML reads NVIDIA GPUs"},
            "load_average": {"start": load_start, "end": os.getloadavg()},
            "seconds": time.perf_counter() - t_start}
    _print_summary(rows, run.say)
    result = {"meta": meta, "rows": public_rows(rows)}
    if out is not None:
        for path in write_outputs(result, Path(out), plots=plots):
            run.say(f"wrote {path}")
    return result


def _run_case(run: _Run, op: str, case: BenchCase, providers: dict[str, ProviderFn]) -> list[dict]:
    """Check every provider of one case against the float64 reference; time those that pass (GPU) or queue
    them for the interleaved pytest-benchmark run (CPU). One row per provider."""
    suite = SUITES[op]
    run.say(f"{op} {case.shape}")
    a = suite.make_inputs(case, run.dev, run.dtype)
    ref = suite.reference(_to64(a))
    tol = check_tolerance(_max_diff(suite.reference(a), ref), max(r.abs().max().item() for r in ref), run.dtype)
    floor = None if run.dev.type == "cpu" else floor_for(run.device_name, suite.unit)
    floor_note = ("no floor on a CPU (floors are GPU datasheet numbers)" if run.dev.type == "cpu" else
                  f"floor {floor} {suite.unit}" if floor else f"no datasheet floor known for {run.device_name}")
    rows = []
    for name, build in providers.items():
        if run.explicit is not None and name not in run.explicit:
            continue
        row = {"kernel": op, "case": case.name, "provider": name, "status": "ok", "ms": None, "ms_min": None,
               "rounds": None, "throughput": None, "unit": suite.unit, "pct_of_floor": None, "vs_eager": None,
               "max_error": None, "tolerance": tol, "shape": case.shape, "dtype": run.dtype_name,
               "device": run.device_name, "x": case.x, "timer": None, "telemetry": None, "note": "",
               "versions": run.versions,
               "_work": case.work, "_floor": floor, "_floor_note": floor_note}
        rows.append(row)
        label = f"  {op:<22} {case.name:<10} {name:<17}"
        why = _default_skip(name, run.dev, run.quick, run.explicit is not None and name in run.explicit)
        if why is not None:
            row.update(status="skipped", note=why)
            run.say(f"  {op:<22} {name:<17} skipped: {why}", once=f"{op}/{name}/{why}")
            continue
        try:
            fn, t_call = _check(build, a, ref, row, run.dev)
        except Exception as e:
            row.update(status=_status_of(e), note=str(e) if isinstance(e, (Skip, _CheckFailed)) else _first_line(e))
            if isinstance(e, Skip):
                run.say(f"  {op:<22} {name:<17} skipped: {e}", once=f"{op}/{name}/{e}")
            else:
                run.say(f"{label} {row['status']}: {row['note']}")
            continue
        if run.dev.type == "cpu" and name in _CPU_EMULATIONS:
            row["note"] = f"{_CPU_EMULATIONS[name]} on a CPU, asked for by name: not a performance number"
        if run.dev.type == "cuda":
            first = len(run.nvml.samples)
            try:
                ms, ms_min = _gpu_time(fn, run.quick)
                row["telemetry"] = _telemetry_during(run.nvml, first)
            except Exception as e:
                row.update(status=_status_of(e), note=f"timing raised {_first_line(e)}")
                run.say(f"{label} {row['status']}: {row['note']}")
                continue
            _fill_timing(row, ms, ms_min, None, timer="triton.testing.do_bench")
            pct = row["pct_of_floor"]
            run.say(f"{label} {ms:9.3f} ms  {row['throughput']:8.2f} {suite.unit}"
                    + (f"  {pct:5.1f}% of floor" if pct is not None else ""))
        else:
            target = 0.1 if run.quick else 1.0     # seconds of timed calls per provider and case
            rounds = min(1000, max(3 if run.quick else 10, math.ceil(target / max(t_call, 1e-6))))
            run.pending.append(_Timed(f"{op}/{case.name}/{name}", f"{op} {case.name}", fn, rounds, row))
    return rows


def _telemetry_during(nvml, first: int) -> Optional[dict]:
    """Mean of the NVML readings taken while one provider was timed (None when NVML is unavailable)."""
    samples = nvml.samples[first:]
    if not samples:
        return None
    return {"samples": len(samples),
            **{k: sum(x[k] for x in samples) / len(samples) for k in TELEMETRY_KEYS if k in samples[0]}}


class _CheckFailed(Exception):
    """The provider ran but its output is not within the tolerance of the reference."""


def _check(build: ProviderFn, a: dict, ref: tuple, row: dict, dev: torch.device) -> tuple[Callable[[], Any], float]:
    """Build the provider and run it twice (the first call may compile; the second's time sizes the timing
    run); its output must be within ``row["tolerance"]`` of the reference. Returns (fn, seconds per call)."""
    ctx = {"device": dev, "note": ""}
    fn, canon = build(a, ctx)
    fn()
    _sync(dev)
    t0 = time.perf_counter()
    out = fn()
    _sync(dev)
    t_call = time.perf_counter() - t0
    err = _max_diff(canon(out), ref)
    row.update(max_error=err, note=ctx["note"])
    if not err <= row["tolerance"]:   # also catches NaN
        raise _CheckFailed(f"correctness check failed: max |error| {err:.3g} > tolerance {row['tolerance']:.3g}; "
                           "not timed")
    return fn, t_call


def _status_of(e: BaseException) -> str:
    """Not available here (a Skip, an unavailable backend) or too large for this device: skipped; else failed."""
    from ..ops import BackendUnavailableError

    if isinstance(e, torch.OutOfMemoryError):
        torch.cuda.empty_cache()    # the next provider starts from the cached blocks this one left behind
    return "skipped" if isinstance(e, (Skip, BackendUnavailableError, torch.OutOfMemoryError)) else "failed"


def _time_pending(run: _Run, passes: int, json_path: Optional[Path]) -> None:
    """Time the CPU providers that passed, interleaved, with pytest-benchmark; fill their rows."""
    times = time_with_pytest_benchmark(run.pending, passes, quiet=run.say.quiet, json_path=json_path)
    for t in run.pending:
        data = times.get(t.key)
        if not data:
            t.row.update(status="failed", note="; ".join(
                n for n in ("the pytest-benchmark run of this provider raised (see its output)", t.row["note"]) if n))
            continue
        _fill_timing(t.row, 1e3 * statistics.median(data), 1e3 * min(data), len(data))


def _fill_timing(row: dict, ms: float, ms_min: float, rounds: Optional[int], timer: str = "pytest-benchmark"):
    tp = throughput(row["_work"], ms, row["unit"])
    row.update(ms=ms, ms_min=ms_min, rounds=rounds, throughput=tp, timer=timer,
               pct_of_floor=pct_of_floor(tp, row["_floor"]))
    row["note"] = "; ".join(n for n in (row["note"], row["_floor_note"]) if n)


def _relative_to_eager(rows: list[dict]) -> None:
    """``vs_eager``: eager torch's time / the provider's time in the same case (> 1: faster than eager)."""
    eager = {(r["kernel"], r["case"]): r["ms"] for r in rows if r["provider"] == "eager" and r["ms"]}
    for r in rows:
        e = eager.get((r["kernel"], r["case"]))
        if e and r["ms"]:
            r["vs_eager"] = e / r["ms"]


def _print_summary(rows: list[dict], say) -> None:
    say(f"\n{'op':<22} {'case':<10} {'provider':<17} {'ms':>9} {'throughput':>16} {'% floor':>8} {'vs eager':>9}")
    for r in rows:
        if r["status"] != "ok" or r["ms"] is None:
            say(f"{r['kernel']:<22} {r['case']:<10} {r['provider']:<17} {r['status']}")
            continue
        pct = f"{r['pct_of_floor']:.1f}" if r["pct_of_floor"] is not None else "-"
        say(f"{r['kernel']:<22} {r['case']:<10} {r['provider']:<17} {r['ms']:9.3f} "
            f"{r['throughput']:9.3f} {r['unit']:<6} {pct:>8} {r['vs_eager'] or 0:8.2f}x")
    n = {s: sum(r["status"] == s for r in rows) for s in ("ok", "skipped", "failed")}
    say(f"{len(rows)} rows: {n['ok']} timed, {n['skipped']} skipped, {n['failed']} failed")


# --- command line --------------------------------------------------------------------------------------
def build_parser(prog: str = "sora-fast bench") -> argparse.ArgumentParser:
    ops = ", ".join([*SUITES, *(f"{a} (= {' + '.join(v)})" for a, v in OP_ALIASES.items())])
    p = argparse.ArgumentParser(
        prog=prog, description="Every op across providers side by side in one run: each provider's output is "
                                "checked against a float64 reference, then timed (pytest-benchmark on a CPU, "
                                "triton.testing.do_bench on a GPU); rows with ms, TFLOP/s or GB/s and %% of the "
                                "floor go to JSON, CSV and one plot per op.",
        epilog=f"Ops: {ops}. Providers: {', '.join(PROVIDERS)} (sora_fast_<backend> is the op's kernel backend: "
               f"{', '.join(f'{k} {v}' for k, v in KERNEL_BACKENDS.items())}). A provider that cannot run here "
               "is a skipped row with the reason; one that fails its correctness check is a failed row with no "
               "timing.")
    p.add_argument("--quick", action="store_true",
                   help="the smallest cases, short timing, no torch.compile unless named (seconds on a CPU)")
    p.add_argument("--op", nargs="+", metavar="OP", help="ops to run (default: all)")
    p.add_argument("--provider", nargs="+", metavar="P",
                   help="providers to run (default: all of the chosen ops'); naming a CPU emulation or, with "
                        "--quick, torch_compile runs it")
    p.add_argument("--device", default="auto", metavar="DEV",
                   help=f"one of {', '.join(DEVICES)} (default: %(default)s: a CUDA GPU when there is one)")
    p.add_argument("--out", default="bench_results", metavar="DIR",
                   help="directory for bench.json, bench.csv and bench_<op>.png (default: %(default)s)")
    p.add_argument("--threads", type=int, metavar="N",
                   help="CPU threads for torch (default: torch's); 1 gives steadier CPU numbers on a shared machine")
    p.add_argument("--no-plots", action="store_true", help="write JSON and CSV only")
    return p


def main(argv: Optional[Sequence[str]] = None, prog: str = "sora-fast bench") -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    parser = build_parser(prog)
    args = parser.parse_args(argv)
    check_at_least("--threads", args.threads, 1, parser.error)
    try:
        with torch_threads(args.threads):
            result = run_bench(args.op, args.provider, device=args.device, quick=args.quick, out=args.out,
                               plots=not args.no_plots, argv=argv)
    except (ValueError, TypeError) as e:
        parser.error(str(e))
    return 1 if any(r["status"] == "failed" for r in result["rows"]) else 0
