"""Training metrics: a JSONL log, a progress bar with loss / tokens per second / ETA, a loss-curve plot.

- :class:`MetricsLogger` appends one JSON object per step (flushed at once, so ``tail -f`` and a crash
  both see every finished step).
- :class:`ProgressBar` is tqdm on a terminal, a plain line every few steps otherwise (logs, CI), nothing
  when disabled; ``close()`` prints one summary line.
- :func:`plot_loss_curve` turns the JSONL into a PNG with matplotlib (optional dependency).
"""
from __future__ import annotations

import json
import math
import numbers
import os
import sys
import time
from pathlib import Path
from typing import Any, Mapping, Optional, TextIO, Union

import torch

__all__ = ["MetricsLogger", "ProgressBar", "read_metrics", "plot_loss_curve"]

PathLike = Union[str, os.PathLike]


def _jsonable(name: str, v: Any) -> Any:
    if isinstance(v, torch.Tensor):
        v = v.detach()
        return v.item() if v.numel() == 1 else v.tolist()
    if v is None or isinstance(v, (bool, str)):
        return v
    if isinstance(v, numbers.Integral):
        return int(v)
    if isinstance(v, numbers.Real):
        return float(v)
    if isinstance(v, (list, tuple)):
        return [_jsonable(name, x) for x in v]
    if isinstance(v, Mapping):
        return {str(k): _jsonable(f"{name}.{k}", x) for k, x in v.items()}
    raise TypeError(f"metric {name!r} must be a number, string, tensor, list or dict, got {type(v).__name__}")


class MetricsLogger:
    """Append ``{"step": step, "time": unix_seconds, **metrics}`` as one JSON line per :meth:`log` call.

    path:   the .jsonl file; parent directories are created. An existing file is appended to (a resumed
            run continues it; readers keep the last record of a repeated step), unless ``append=False``.
    Values may be numbers, strings, lists, dicts or tensors (one-element tensors become numbers: this
    syncs with the device, so log every few steps on a GPU). Non-finite floats are written as
    ``NaN`` / ``Infinity`` (Python's json reads them back).
    """

    def __init__(self, path: PathLike, *, append: bool = True):
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._file: Optional[TextIO] = open(self.path, "a" if append else "w", encoding="utf-8")

    def log(self, step: int, metrics: Optional[Mapping[str, Any]] = None, **kw: Any) -> dict[str, Any]:
        """Write one record and flush it; returns the record written."""
        if self._file is None:
            raise ValueError(f"MetricsLogger for {str(self.path)!r} is closed")
        if not isinstance(step, numbers.Integral) or isinstance(step, bool):
            raise TypeError(f"step must be an int, got {type(step).__name__}")
        items = {**(metrics or {}), **kw}
        record: dict[str, Any] = {"step": int(step), "time": time.time()}
        record.update({str(k): _jsonable(str(k), v) for k, v in items.items()})
        self._file.write(json.dumps(record) + "\n")
        self._file.flush()
        return record

    def close(self) -> None:
        if self._file is not None:
            self._file.close()
            self._file = None

    def __enter__(self) -> "MetricsLogger":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def _fmt_duration(seconds: float) -> str:
    if not math.isfinite(seconds):
        return "?"
    s = int(round(seconds))
    h, rem = divmod(s, 3600)
    m, s = divmod(rem, 60)
    return f"{h}:{m:02d}:{s:02d}" if h else f"{m:02d}:{s:02d}"


class ProgressBar:
    """Steps of a run with the last loss, tokens per second and ETA.

    total:       number of steps the run ends at; initial: steps already done (resume).
    disable:     show nothing at all (e.g. on every rank but 0); ``close()`` then prints nothing either.
    file:        stream to write to, default stderr. When it is a terminal (and tqdm is installed) a tqdm
                 bar is shown; otherwise a plain line every ``print_every`` steps (default: about 20 lines
                 per run) and at the last step.
    Use: ``bar.update(loss=loss, tokens=batch_tokens)`` once per step, ``bar.close()`` at the end.
    """

    def __init__(
        self,
        total: int,
        *,
        initial: int = 0,
        desc: str = "train",
        disable: bool = False,
        file: Optional[TextIO] = None,
        print_every: Optional[int] = None,
    ):
        if not isinstance(total, numbers.Integral) or total < 0:
            raise ValueError(f"total must be an int >= 0, got {total!r}")
        if not isinstance(initial, numbers.Integral) or not 0 <= initial <= total:
            raise ValueError(f"initial must be an int in [0, total={total}], got {initial!r}")
        if print_every is not None and (not isinstance(print_every, numbers.Integral) or print_every < 1):
            raise ValueError(f"print_every must be an int >= 1 or None, got {print_every!r}")
        self.total, self.step, self.desc, self.disable = int(total), int(initial), desc, disable
        self._initial = int(initial)
        self.file = sys.stderr if file is None else file
        self.print_every = print_every or max(1, (total - initial) // 20)
        self.tokens = 0
        self.loss: Optional[float] = None
        self._start = time.perf_counter()
        self._bar = None
        if not disable and getattr(self.file, "isatty", lambda: False)():
            try:
                from tqdm.auto import tqdm
            except ImportError:  # plain lines instead
                tqdm = None
            if tqdm is not None:
                self._bar = tqdm(total=total, initial=initial, desc=desc, file=self.file, dynamic_ncols=True,
                                 unit="step")

    @property
    def elapsed(self) -> float:
        return time.perf_counter() - self._start

    @property
    def tokens_per_second(self) -> float:
        """Tokens per second since the bar was created."""
        el = self.elapsed
        return self.tokens / el if el > 0 else 0.0

    @property
    def eta(self) -> float:
        """Seconds left at the average pace of the steps done so far (inf before the first step)."""
        done = self.step - self._initial
        return (self.total - self.step) * self.elapsed / done if done > 0 else math.inf

    def update(self, n: int = 1, *, loss: Optional[float] = None, tokens: int = 0, **extra: Any) -> None:
        """Advance ``n`` steps; ``loss`` (a float or a one-element tensor: that syncs), ``tokens`` processed
        in them, and any ``extra`` values to show."""
        self.step += n
        self.tokens += int(tokens)
        if loss is not None:
            self.loss = float(loss.detach().item() if isinstance(loss, torch.Tensor) else loss)
        if self.disable:
            return
        shown = {}
        if self.loss is not None:
            shown["loss"] = f"{self.loss:.4f}"
        if self.tokens:
            shown["tok/s"] = f"{self.tokens_per_second:,.0f}"
        shown.update({k: (f"{v:.4g}" if isinstance(v, float) else str(v)) for k, v in extra.items()})
        if self._bar is not None:
            self._bar.set_postfix(shown, refresh=False)
            self._bar.update(n)
        elif (self.step - self._initial) % self.print_every == 0 or self.step >= self.total:
            parts = [f"{self.desc} {self.step}/{self.total}", *(f"{k} {v}" for k, v in shown.items()),
                     f"elapsed {_fmt_duration(self.elapsed)}", f"eta {_fmt_duration(self.eta)}"]
            print(" ".join(parts), file=self.file, flush=True)

    def summary(self) -> str:
        """``"train: 100 steps in 01:23, 1,234,567 tokens (14,874 tok/s), last loss 0.4321"``."""
        done = self.step - self._initial
        parts = [f"{self.desc}: {done} steps in {_fmt_duration(self.elapsed)}"]
        if self.tokens:
            parts.append(f"{self.tokens:,} tokens ({self.tokens_per_second:,.0f} tok/s)")
        if self.loss is not None:
            parts.append(f"last loss {self.loss:.4f}")
        return ", ".join(parts)

    def close(self) -> str:
        """Close the bar, print the summary line (unless disabled) and return it."""
        if self._bar is not None:
            self._bar.close()
            self._bar = None
        text = self.summary()
        if not self.disable:
            print(text, file=self.file, flush=True)
        return text

    def __enter__(self) -> "ProgressBar":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def read_metrics(jsonl_path: PathLike) -> list[dict[str, Any]]:
    """Records of a metrics JSONL, by step; a step logged twice (a resumed run) keeps its last record.
    Lines that are not JSON objects with an int ``step`` (e.g. a line cut by a crash) are skipped."""
    by_step: dict[int, dict[str, Any]] = {}
    with open(jsonl_path, encoding="utf-8") as f:
        for line in f:
            try:
                rec = json.loads(line)
            except json.JSONDecodeError:
                continue
            if isinstance(rec, dict) and isinstance(rec.get("step"), int):
                by_step[rec["step"]] = rec
    return [by_step[s] for s in sorted(by_step)]


def plot_loss_curve(
    jsonl_path: PathLike,
    png_path: PathLike,
    *,
    key: str = "loss",
    smoothing: float = 0.9,
    logy: bool = False,
) -> Path:
    """Plot ``key`` against ``step`` from a metrics JSONL into a PNG: raw values (faint) and their
    bias-corrected exponential moving average with weight ``smoothing`` in [0, 1) (bold).

    Uses matplotlib's Agg canvas directly (no pyplot, no global backend change, no display needed).
    Raises ImportError with an install hint if matplotlib is missing, ValueError if no record has ``key``.
    Returns the PNG path.
    """
    if not 0 <= smoothing < 1:
        raise ValueError(f"smoothing must be in [0, 1), got {smoothing!r}")
    try:
        from matplotlib.backends.backend_agg import FigureCanvasAgg
        from matplotlib.figure import Figure
    except ImportError as e:
        raise ImportError("plot_loss_curve needs matplotlib: pip install matplotlib") from e
    points = [(r["step"], float(r[key])) for r in read_metrics(jsonl_path)
              if isinstance(r.get(key), (int, float)) and not isinstance(r.get(key), bool)]
    if not points:
        raise ValueError(f"no numeric {key!r} values in {str(jsonl_path)!r}")
    steps = [s for s, _ in points]
    values = [v for _, v in points]
    smooth, avg, weight = [], 0.0, 0.0
    for v in values:
        if math.isfinite(v):
            avg = smoothing * avg + (1 - smoothing) * v
            weight = smoothing * weight + (1 - smoothing)
        smooth.append(avg / weight if weight > 0 else math.nan)

    fig = Figure(figsize=(8, 4.5), dpi=100)
    FigureCanvasAgg(fig)
    ax = fig.add_subplot()
    ax.plot(steps, values, color="tab:blue", alpha=0.3, linewidth=0.8, label=key)
    ax.plot(steps, smooth, color="tab:blue", linewidth=1.8, label=f"{key} (EMA {smoothing:g})")
    ax.set_xlabel("step")
    ax.set_ylabel(key)
    if logy:
        ax.set_yscale("log")
    ax.grid(True, alpha=0.3)
    ax.legend()
    ax.set_title(f"{key}: last {values[-1]:.4g}, smoothed {smooth[-1]:.4g} at step {steps[-1]}")
    fig.tight_layout()
    png_path = Path(png_path)
    png_path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(png_path, format="png")
    return png_path
