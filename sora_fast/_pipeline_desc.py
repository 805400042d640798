"""What ``pipeline.json`` holds: its format, the description of the three models and the sampling settings,
checked when read (every problem named with the file), and the text encoder it describes."""
from __future__ import annotations

from pathlib import Path
from typing import Optional

from .models.text import T5TextEncoder, TextEncoder, TinyTextConfig, TinyTextEncoder

DESC = "pipeline.json"
FORMAT = 1
TEXT_KINDS = ("tiny", "t5")


def check_description(desc, path: Path) -> None:
    """Refuse a pipeline.json of another format or shape, naming the file and what was expected."""
    if not isinstance(desc, dict):
        raise ValueError(f"{str(path)!r} must be a JSON object describing a pipeline, got {type(desc).__name__}")
    if desc.get("format") != FORMAT:
        raise ValueError(f"{str(path)!r} has format {desc.get('format')!r}; this version of sora_fast reads "
                         f"pipelines of format {FORMAT}")
    for key in ("dit", "vae", "text"):
        if not isinstance(desc.get(key), dict):
            raise ValueError(f"{str(path)!r} must have a {key!r} object, got {desc.get(key)!r}")
    kind = desc["text"].get("kind")
    if kind not in TEXT_KINDS:
        raise ValueError(f"{str(path)!r}: text.kind is {kind!r}, expected one of {', '.join(map(repr, TEXT_KINDS))}")
    for key, want in (("files", int), ("sha256", str)):
        v = desc.get(key)
        if v is not None and not (isinstance(v, dict) and all(isinstance(x, want) for x in v.values())):
            raise ValueError(f"{str(path)!r}: {key!r} must map file names to {'sizes' if want is int else 'hashes'},"
                             f" got {v!r}")


def text_encoder_from(text: dict, root: Path) -> TextEncoder:
    if text["kind"] == "tiny":
        return TinyTextEncoder(TinyTextConfig(**text["config"]))
    inside = text.get("inside", False)  # an encoder wrapped from memory is saved inside the pipeline
    path, tok = (None if p is None else root / p if inside else p for p in (text["path"], text.get("tokenizer_path")))
    return T5TextEncoder(str(path), tokenizer_path=None if tok is None else str(tok), max_length=text["max_length"],
                         pad_to=text["pad_to"])


def check_sampling_settings(sampling) -> Optional[dict]:
    """``VideoPipeline.sampling``: None, or ``{"solver", "shift", "schedule"}`` (from a diffusers scheduler)."""
    from .sampling import schedule_sigmas

    if sampling is None:
        return None
    if not isinstance(sampling, dict) or set(sampling) != {"solver", "shift", "schedule"}:
        raise ValueError(f"sampling must be None or a dict with keys solver, shift, schedule, got {sampling!r}")
    schedule_sigmas(1, 1.0, sampling["schedule"])                    # raises for an unknown schedule
    s = sampling["shift"]
    if isinstance(s, bool) or not isinstance(s, (int, float)) or not s > 0:
        raise ValueError(f"sampling['shift'] must be a positive number, got {s!r}")
    return dict(sampling)
