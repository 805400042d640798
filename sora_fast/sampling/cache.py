"""Step caches (placeholder: none yet)."""
from __future__ import annotations


def start_cache(cache, denoise, streams: int):
    if cache is None:
        return None
    raise ValueError(f"cache must be None, got {cache!r}")
