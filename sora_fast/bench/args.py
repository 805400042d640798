"""Command-line pieces the ``bench/bench_<op>.py`` scripts share: the flags they have in common, their checks,
and the torch thread count set for a run and restored after it."""
from __future__ import annotations

import argparse
import contextlib
from pathlib import Path
from typing import Callable, Iterator, NoReturn, Optional

import torch

from .timing import do_bench_budget

__all__ = ["GPU_DTYPES", "script_parser", "add_cpu_flag", "add_out_flag", "add_dtype_flag", "add_do_bench_flags",
           "resolve_do_bench", "add_threads_flag", "add_reps_flag", "check_at_least", "check_counts", "exit_with",
           "torch_threads", "on_gpu"]

GPU_DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16}


def script_parser(doc: str) -> argparse.ArgumentParser:
    """A parser whose ``--help`` prints the script's docstring as written."""
    return argparse.ArgumentParser(description=doc, formatter_class=argparse.RawDescriptionHelpFormatter)


def add_cpu_flag(p: argparse.ArgumentParser, help: str) -> None:
    p.add_argument("--cpu", action="store_true", help=help)


def on_gpu(args: argparse.Namespace) -> bool:
    """True when the GPU parts run: a CUDA GPU is here and ``--cpu`` was not given."""
    return torch.cuda.is_available() and not args.cpu


def add_out_flag(p: argparse.ArgumentParser, help: str, default: Path) -> None:
    """``--out DIR``, a :class:`~pathlib.Path` (the scripts' default: ``results/`` beside them, git-ignored)."""
    p.add_argument("--out", type=Path, default=default, help=help)


def add_dtype_flag(p: argparse.ArgumentParser) -> None:
    """``--dtype bf16|fp16``: the GPU input dtype (:data:`GPU_DTYPES`)."""
    p.add_argument("--dtype", default="bf16", choices=list(GPU_DTYPES), help="GPU input dtype (default bf16)")


def add_do_bench_flags(p: argparse.ArgumentParser, warmup: Optional[float] = None, rep: Optional[float] = None,
                       warmup_help: Optional[str] = None, rep_help: Optional[str] = None) -> None:
    """``--warmup-ms`` and ``--rep-ms`` for ``triton.testing.do_bench``; a default of None follows ``--quick``
    (:func:`resolve_do_bench`)."""
    p.add_argument("--warmup-ms", type=float, default=warmup, help=warmup_help)
    p.add_argument("--rep-ms", type=float, default=rep, help=rep_help)


def resolve_do_bench(args: argparse.Namespace) -> None:
    """Fill ``--warmup-ms`` / ``--rep-ms`` left unset from :func:`~sora_fast.bench.timing.do_bench_budget`."""
    warmup, rep = do_bench_budget(args.quick)
    args.warmup_ms = args.warmup_ms or warmup
    args.rep_ms = args.rep_ms or rep


def add_threads_flag(p: argparse.ArgumentParser, help: str = "torch intra-op CPU threads (default: torch's)") -> None:
    p.add_argument("--threads", type=int, default=None, help=help)


def add_reps_flag(p: argparse.ArgumentParser, per: str) -> None:
    p.add_argument("--reps", type=int, default=None, help=f"timed repetitions per {per} (median reported)")


def check_counts(args: argparse.Namespace, error: Callable[[str], None], flags=("reps", "threads")) -> None:
    """Each of ``flags`` (``--reps``, ``--threads``, ...), when given, must be >= 1 (:func:`check_at_least`)."""
    for name in flags:
        check_at_least(f"--{name}", getattr(args, name), 1, error)


def exit_with(message: str) -> NoReturn:
    """Stop the script with ``message`` on stderr and exit status 1 (``SystemExit(message)``)."""
    raise SystemExit(message)


def check_at_least(flag: str, value: Optional[int], lowest: int, error: Callable[[str], None]) -> None:
    """``error("--flag must be >= lowest, got value")`` when a given ``value`` is below ``lowest``; ``error`` is
    ``parser.error`` (exit status 2 with the usage) or :func:`exit_with`."""
    if value is not None and value < lowest:
        error(f"{flag} must be >= {lowest}, got {value}")


@contextlib.contextmanager
def torch_threads(n: Optional[int]) -> Iterator[None]:
    """torch's intra-op thread count set to ``n`` (when given) inside, restored after."""
    threads = torch.get_num_threads()
    try:
        if n:
            torch.set_num_threads(n)
        yield
    finally:
        torch.set_num_threads(threads)
