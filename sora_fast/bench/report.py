"""Where benchmark numbers go: versions and device names recorded with every row, the rows themselves, and
the writers (JSON, CSV, plots) shared by ``sora-fast bench`` and the ``bench/bench_<op>.py`` scripts.

Each script keeps its own file names and layout (a list of rows, or ``meta`` + rows); the functions here
take the differences as arguments so that one writer serves all of them.
"""
from __future__ import annotations

import csv
import importlib
import json
import platform
import sys
from pathlib import Path
from typing import Any, Iterable, Optional, Sequence

import torch

__all__ = ["RUNNER_VERSIONS", "versions", "versions_text", "cpu_name", "device_name", "Rows", "Failures",
           "write_json", "write_csv", "COLUMNS", "public_rows", "write_outputs", "plot_rows"]

# What ``sora-fast bench`` records; a script names its own list (the order is the order in its rows).
RUNNER_VERSIONS = ("sora_fast", "torch", "python", "cuda", "triton", "pytest_benchmark", "flash_attn", "liger_kernel")
# The columns of ``sora-fast bench``'s rows (bench.json, bench.csv).
COLUMNS = ("kernel", "case", "provider", "status", "ms", "ms_min", "rounds", "throughput", "unit", "pct_of_floor",
           "vs_eager", "max_error", "tolerance", "shape", "dtype", "device", "x", "timer", "telemetry", "note",
           "versions")


# --- environment -----------------------------------------------------------------------------------
def _version_of(name: str, cuda_as_text: bool) -> Optional[str]:
    if name == "torch":
        return torch.__version__
    if name == "python":
        return platform.python_version()
    if name == "cuda":     # the CUDA toolkit torch was built with (None in a CPU-only build)
        return str(torch.version.cuda) if torch.version.cuda or cuda_as_text else None
    if name == "sora_fast":
        from .._version import __version__

        return __version__
    try:
        return str(getattr(importlib.import_module(name), "__version__", "installed"))
    except Exception:
        return None


def versions(names: Sequence[str] = RUNNER_VERSIONS, *, cuda_as_text: bool = False) -> dict[str, str]:
    """``{name: version}`` in the order of ``names``: ``torch``, ``python``, ``sora_fast``, ``cuda`` (left out in a
    CPU-only build of torch, or written ``"None"`` with ``cuda_as_text``) and any module (its ``__version__``,
    ``"installed"`` when it has none; left out when it does not import)."""
    v = {n: _version_of(n, cuda_as_text) for n in names}
    return {k: s for k, s in v.items() if s is not None}


def versions_text(names: Sequence[str]) -> str:
    """:func:`versions` as one line, ``"torch 2.x, triton 3.y, python 3.z"``."""
    return ", ".join(f"{k} {v}" for k, v in versions(names).items())


def cpu_name() -> str:
    return platform.processor() or platform.machine()


def device_name(dev: torch.device) -> str:
    if dev.type == "cuda":
        return torch.cuda.get_device_name(dev)
    return f"cpu ({cpu_name()}, {torch.get_num_threads()} threads)"


# --- the per-op scripts' rows ------------------------------------------------------------------------
class Rows:
    """Result rows with the columns the per-op scripts write: kernel, provider, shape, dtype, metric, value,
    gpu, versions, and note unless ``notes`` is False."""

    def __init__(self, gpu: str, dtype: str, versions: Any, kernel: Optional[str] = None, notes: bool = True):
        self.rows: list[dict] = []
        self.gpu, self.dtype, self.versions, self.kernel, self.notes = gpu, dtype, versions, kernel, notes

    def add(self, provider: str, shape: str, metric: str, value, kernel: Optional[str] = None, note: str = "",
            dtype: Optional[str] = None) -> None:
        row = {"kernel": kernel or self.kernel, "provider": provider, "shape": shape, "dtype": dtype or self.dtype,
               "metric": metric, "value": value, "gpu": self.gpu, "versions": self.versions}
        if self.notes:
            row["note"] = note
        self.rows.append(row)

    def write(self, out: Path, name: str, newline: bool = False) -> tuple[Path, Path]:
        """``out/name.json`` (a list of rows; ``newline``: ending in a newline) and ``out/name.csv``."""
        out = Path(out)
        out.mkdir(parents=True, exist_ok=True)
        jpath, cpath = out / f"{name}.json", out / f"{name}.csv"
        write_json(jpath, self.rows, newline=newline)
        write_csv(cpath, self.rows, list(self.rows[0]) if self.rows else ["kernel"])
        return jpath, cpath


class Failures(list):
    """Numerical checks that failed; the run exits 1 when any did."""

    def check(self, what: str, err: float, tol: float) -> bool:
        ok = err <= tol
        if not ok:
            self.append(f"{what}: max error {err:.3e} > tolerance {tol:.3e}")
        return ok

    def exit_status(self) -> int:
        """1 after listing the failed checks on stderr, 0 when there are none."""
        if self:
            print("numerical checks FAILED:\n  " + "\n  ".join(self), file=sys.stderr)
            return 1
        return 0


# --- writers -------------------------------------------------------------------------------------------
def write_json(path, obj, *, indent: int = 1, newline: bool = True) -> Path:
    """``obj`` as indented JSON at ``path`` (its folder made when missing)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(obj, indent=indent) + ("\n" if newline else ""))
    return path


def write_csv(path, rows: Iterable[dict], fieldnames: Sequence[str]) -> Path:
    """One line per row; dict values (versions, telemetry) as JSON with sorted keys, None and missing as empty."""
    path = Path(path)
    with path.open("w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=list(fieldnames))
        w.writeheader()
        for r in rows:
            w.writerow({k: json.dumps(v, sort_keys=True) if isinstance(v, dict) else v for k, v in r.items()})
    return path


# --- sora-fast bench's outputs ---------------------------------------------------------------------------
def public_rows(rows: list[dict]) -> list[dict]:
    return [{c: r[c] for c in COLUMNS} for r in rows]


def write_outputs(result: dict, out: Path, plots: bool = True) -> list[Path]:
    out.mkdir(parents=True, exist_ok=True)
    rows = result["rows"]
    paths = [write_json(out / "bench.json", {"meta": result["meta"], "rows": rows}),
             write_csv(out / "bench.csv", rows, COLUMNS)]
    if plots:
        try:
            paths += plot_rows(rows, out)
        except ImportError as e:
            print(f"plots not written: {e} (pip install matplotlib)")
    return paths


def plot_rows(rows: list[dict], out: Path) -> list[Path]:
    """One PNG per op with timed rows: throughput of every provider against the op's size axis."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from .suites import SUITES

    written = []
    for op in dict.fromkeys(r["kernel"] for r in rows):
        timed = [r for r in rows if r["kernel"] == op and r["ms"] is not None]
        if not timed:
            continue
        suite = SUITES[op]
        fig, ax = plt.subplots(figsize=(6.4, 4.2))
        for prov in dict.fromkeys(r["provider"] for r in timed):
            pts = sorted((r["x"], r["throughput"]) for r in timed if r["provider"] == prov)
            ax.plot([p[0] for p in pts], [p[1] for p in pts], marker="o", label=prov)
        with_floor = next((r for r in timed if r["pct_of_floor"]), None)
        if with_floor is not None:
            ax.axhline(100 * with_floor["throughput"] / with_floor["pct_of_floor"], color="gray", linestyle="--",
                       label="datasheet floor")
        ax.set_xscale("log", base=2)
        ax.set_xlabel(suite.x_label)
        ax.set_ylabel(suite.unit)
        ax.set_title(f"{op} on {timed[0]['device']} ({timed[0]['dtype']})", fontsize=9)
        ax.grid(True, alpha=0.3)
        ax.legend(fontsize=8)
        fig.tight_layout()
        path = out / f"bench_{op}.png"
        fig.savefig(path, dpi=100)
        plt.close(fig)
        written.append(path)
    return written
