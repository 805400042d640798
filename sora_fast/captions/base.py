"""What every captioner returns, and the loop it shares: one :class:`CaptionOutcome` per file, never an exception.

A captioner (:class:`Captioner`) turns video or image files into :class:`~sora_fast.captions.CaptionSchema`.
Failures are outcomes too (``schema`` None, ``error`` the reason), so one bad file never stops a folder and the
caller (``sora-fast caption``) can keep the file's old caption and name it in its summary.
"""
from __future__ import annotations

import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Optional, Sequence

from .schema import CaptionSchema

__all__ = ["CaptionOutcome", "Captioner"]


@dataclass
class CaptionOutcome:
    """One file's result: its ``schema`` (None on failure, with ``error`` saying why), the frame indices the
    captioner looked at, the seconds it took and whether it came from a cache (nothing was computed or sent)."""

    path: Path
    schema: Optional[CaptionSchema] = None
    frames: list = field(default_factory=list)
    seconds: float = 0.0
    cached: bool = False
    error: Optional[str] = None

    @property
    def ok(self) -> bool:
        return self.schema is not None


class Captioner:
    """Base of the captioners: subclasses set :attr:`name` and implement :meth:`caption_file`; a captioner with
    its own concurrency (the chat captioner) overrides :meth:`caption_files`."""

    name = "captioner"

    def caption_file(self, path: Path) -> CaptionOutcome:   # pragma: no cover - abstract
        raise NotImplementedError

    def caption_files(self, paths: Sequence[Path],
                      on_done: Optional[Callable[[CaptionOutcome], None]] = None) -> list[CaptionOutcome]:
        """Caption ``paths`` in order; ``on_done`` is called after each (a progress bar). A file that raises is
        an outcome with its error, never an exception out of here (KeyboardInterrupt aside)."""
        out = []
        for p in paths:
            t0 = time.perf_counter()
            try:
                res = self.caption_file(Path(p))
            except Exception as e:   # noqa: BLE001 - every failure is one file's outcome
                res = CaptionOutcome(Path(p), error=f"{type(e).__name__}: {e}", seconds=time.perf_counter() - t0)
            out.append(res)
            if on_done is not None:
                on_done(res)
        return out
