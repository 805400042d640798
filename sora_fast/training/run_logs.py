"""What a training run shows besides ``metrics.jsonl``: TensorBoard scalars and validation samples.

Both are ``on_step(step, metrics)`` callbacks of :meth:`~sora_fast.training.Trainer.train`, built by
:func:`run_callbacks` from the run file's ``"log"`` and ``"validation"`` keys, checked before training starts.
"""
from __future__ import annotations

import numbers
from pathlib import Path
from typing import Callable, Optional

__all__ = ["summary_writer", "TensorBoardLog", "ValidationSampler", "check_validation", "run_callbacks", "LOGS"]

LOGS = ("jsonl", "tensorboard")
_VALIDATION_KEYS = {"prompts", "every", "size", "steps", "guidance", "seed", "solver", "order", "cache"}


def summary_writer():
    """``torch.utils.tensorboard.SummaryWriter``, or an ImportError saying which package and extra it needs."""
    try:
        from torch.utils.tensorboard import SummaryWriter
    except ImportError as e:
        raise ImportError("\"log\": \"tensorboard\" needs the tensorboard package (pip install "
                          "'sora-fast[tensorboard]'); or use \"log\": \"jsonl\" (metrics.jsonl only)") from e
    return SummaryWriter


class TensorBoardLog:
    """Every numeric metric of a step as a TensorBoard scalar (``train/<name>``) under ``log_dir``, through
    ``torch.utils.tensorboard.SummaryWriter`` (the ``tensorboard`` package)."""

    def __init__(self, log_dir, every: int = 1):
        self.writer, self.every = summary_writer()(str(log_dir)), every

    def __call__(self, step: int, metrics: dict) -> None:
        if step % self.every:
            return
        for k, v in metrics.items():
            if isinstance(v, numbers.Real) and not isinstance(v, bool):
                self.writer.add_scalar(f"train/{k}", float(v), step)
        self.writer.flush()

    def close(self) -> None:
        self.writer.close()


def check_validation(v, where: str) -> Optional[dict]:
    """The run file's ``"validation"`` object: ``prompts`` (non-empty list of str), ``every`` (steps, int >= 1);
    optional ``size`` ([frames, height, width], default [9, 32, 32]), ``steps`` (20), ``guidance`` (4.0),
    ``seed`` (0), and the sampler's ``solver`` (``"euler"``), ``order`` and ``cache`` (None), named and checked as
    ``generate``'s. Errors name the key, what was expected and what was found."""
    if v is None:
        return None
    if not isinstance(v, dict):
        raise ValueError(f"{where}: 'validation' must be an object with prompts and every, got {type(v).__name__}")
    unknown = sorted(set(v) - _VALIDATION_KEYS)
    if unknown:
        raise ValueError(f"{where}: 'validation' has unknown keys {unknown}; valid: "
                         f"{', '.join(sorted(_VALIDATION_KEYS))}")
    out = {"size": [9, 32, 32], "steps": 20, "guidance": 4.0, "seed": 0, "solver": "euler", "order": None,
           "cache": None, **v}
    p = out.get("prompts")
    if not (isinstance(p, list) and p and all(isinstance(x, str) for x in p)):
        raise ValueError(f"{where}: validation.prompts must be a non-empty list of strings, got {p!r}")
    for key in ("every", "steps"):
        x = out.get(key)
        if isinstance(x, bool) or not isinstance(x, int) or x < 1:
            raise ValueError(f"{where}: validation.{key} must be an int >= 1, got {x!r}")
    s = out["size"]
    if not (isinstance(s, list) and len(s) == 3 and all(isinstance(x, int) and x >= 1 for x in s)):
        raise ValueError(f"{where}: validation.size must be [frames, height, width], got {s!r}")
    if isinstance(out["guidance"], bool) or not isinstance(out["guidance"], (int, float)):
        raise ValueError(f"{where}: validation.guidance must be a number, got {out['guidance']!r}")
    if isinstance(out["seed"], bool) or not isinstance(out["seed"], int):
        raise ValueError(f"{where}: validation.seed must be an int, got {out['seed']!r}")
    from ..sampling import check_solver, parse_cache

    try:
        check_solver(out["solver"], out["order"])
        parse_cache(out["cache"])
    except (TypeError, ValueError) as e:
        raise ValueError(f"{where}: validation: {e}") from None
    return out


class ValidationSampler:
    """Every ``every`` steps, the run's prompts generated with the model being trained (its current weights,
    adapters active) and written to ``out/samples/step_XXXXXX/``: one video per prompt (mp4; png for 1 frame)
    and ``contact_sheet.png``."""

    def __init__(self, pipe, settings: dict, out: Path, fps: float = 8.0):
        self.pipe, self.s, self.out, self.fps = pipe, settings, Path(out), fps
        pipe.check_size(tuple(settings["size"]), name="validation.size")   # before training starts

    def __call__(self, step: int, metrics: dict) -> None:
        if step % self.s["every"]:
            return
        from ..commands.generate import output_stems
        from ..data import write_contact_sheet, write_video

        s = self.s
        clips = self.pipe.generate(s["prompts"], tuple(s["size"]), steps=s["steps"], guidance=s["guidance"],
                                   seed=s["seed"], solver=s["solver"], order=s["order"], cache=s["cache"])
        d = self.out / "samples" / f"step_{step:06d}"
        d.mkdir(parents=True, exist_ok=True)
        for clip, stem in zip(clips, output_stems(s["prompts"])):
            write_video(d / f"{stem}.{'png' if clip.shape[1] == 1 else 'mp4'}", clip, fps=self.fps)
        write_contact_sheet(d / "contact_sheet.png", clips, s["prompts"])


def run_callbacks(log: str, validation: Optional[dict], pipe, out: Path, log_every: int,
                  is_main: bool = True) -> tuple[Optional[Callable[[int, dict], None]], list]:
    """``(on_step, closers)`` for the run file's ``log`` and ``validation`` (None when there is nothing to do)."""
    calls, closers = [], []
    if is_main and log == "tensorboard":
        tb = TensorBoardLog(out / "tensorboard", every=log_every)
        calls.append(tb)
        closers.append(tb.close)
    if validation is not None:
        calls.append(ValidationSampler(pipe, validation, out))
    if not calls:
        return None, closers

    def on_step(step: int, metrics: dict) -> None:
        for c in calls:
            c(step, metrics)
    return on_step, closers
