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
    if "dit_2" in desc and not isinstance(desc["dit_2"], dict):
        raise ValueError(f"{str(path)!r}: 'dit_2' (the second expert) must be an object like 'dit', got "
                         f"{desc['dit_2']!r}")
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


def check_experts(dit, dit_2, boundary) -> Optional[float]:
    """A second expert and its boundary (both or neither): ``dit_2`` a VideoDiT of ``dit``'s config, ``boundary`` a
    finite timestep; returns the boundary as a float (None without ``dit_2``)."""
    import dataclasses
    import math

    from .models.dit import VideoDiT

    if dit_2 is None:
        if boundary is not None:
            raise ValueError(f"boundary={boundary!r} is where dit_2 takes over from dit; without dit_2 expected "
                             "boundary None")
        return None
    if not isinstance(dit_2, VideoDiT):
        raise TypeError(f"dit_2 must be a VideoDiT (the low-noise expert) or None, got {type(dit_2).__name__}")
    if dit_2.config != dit.config:
        a, b = dataclasses.asdict(dit.config), dataclasses.asdict(dit_2.config)
        diff = ", ".join(f"{k} (dit: {a[k]!r}, dit_2: {b[k]!r})" for k in a if a[k] != b[k])
        raise ValueError(f"mismatched experts: dit_2's config differs from dit's in {diff}; expected the same "
                         "architecture")
    if isinstance(boundary, bool) or not isinstance(boundary, (int, float)) or not math.isfinite(boundary):
        raise ValueError(f"boundary must be a finite number (the timestep where dit_2 takes over) with dit_2, got "
                         f"{boundary!r}")
    return float(boundary)


def check_sampling_settings(sampling) -> Optional[dict]:
    """``VideoPipeline.sampling``: None, or ``{"solver", "shift", "schedule"}`` and optionally ``"order"`` (from a
    diffusers scheduler): the solver, order, shift and noise levels :meth:`VideoPipeline.generate` takes by default."""
    from .sampling import check_solver, schedule_sigmas

    if sampling is None:
        return None
    keys = {"solver", "shift", "schedule"}
    if not isinstance(sampling, dict) or not keys <= set(sampling) <= keys | {"order"}:
        raise ValueError(f"sampling must be None or a dict with keys solver, shift, schedule (and optionally order), "
                         f"got {sampling!r}")
    check_solver(sampling["solver"], sampling.get("order"))           # raises for an unknown solver or order
    schedule_sigmas(1, 1.0, sampling["schedule"])                    # raises for an unknown schedule
    s = sampling["shift"]
    if isinstance(s, bool) or not isinstance(s, (int, float)) or not s > 0:
        raise ValueError(f"sampling['shift'] must be a positive number, got {s!r}")
    return dict(sampling)
