"""Checkpoints in safetensors + JSON, committed atomically, resumable bit for bit.

Layout of a run directory::

    run_dir/
      latest                  "step_000300\\n": the checkpoint to resume from, replaced atomically
      step_000200/            one committed checkpoint
        model.safetensors     model.state_dict()
        optimizer.safetensors optimizer state tensors (keys like "state.0.exp_avg")   [if an optimizer]
        ema.safetensors       EMA shadow tensors                                      [if an EMA]
        extra.safetensors     torch / CUDA / generator RNG states, tensors of ``state``
        state.json            step, user state, config, the JSON structure of everything above
        complete              written last: size and sha256 of every file; a directory without it is
                              never loaded
      step_000300/

A checkpoint is written into a hidden temporary directory (every file: temp name, fsync, ``os.replace``),
the ``complete`` marker last, then the directory is renamed to ``step_XXXXXX`` and only then is ``latest``
replaced. A crash at any point leaves ``latest`` naming the previous complete checkpoint; temporary
directories are never loaded and are cleaned up by the next save. One writer per run directory.

Loading checks every file against the ``complete`` marker: its size, and its sha256 (streamed; skipped with
``verify=False``, with a warning saying so). Resuming from a run directory whose latest checkpoint fails
that check warns, naming it and the file, and falls back to the newest older checkpoint that passes.
Checkpoints written before hashes were recorded load with their sizes checked and a note.

Only safetensors and JSON are read back, never pickles: non-tensor optimizer / EMA / RNG state is JSON
with a small tagged encoding for tuples, non-string dict keys and numpy arrays.
"""
from __future__ import annotations

import dataclasses
import json
import math
import numbers
import os
import random
import re
import shutil
import uuid
from pathlib import Path
from typing import Any, Callable, Mapping, Optional, Union

import torch
from torch import nn

from .._files import (
    CorruptFileError,
    apply_umask,
    file_records,
    first_good,
    fsync_dir,
    fsync_file,
    load_safetensors,
    read_json,
    verify_files,
    warn_unchecked,
)
from ..models._convert import StateDictMismatchError, _listing
from .ema import EMA

__all__ = [
    "save_checkpoint",
    "load_checkpoint",
    "latest_checkpoint",
    "list_checkpoints",
    "check_writable",
    "checkpoint_name",
    "StateDictMismatchError",
    "verify_checkpoint",
    "CorruptFileError",
]

PathLike = Union[str, os.PathLike]

FORMAT_VERSION = 1
_STEP_RE = re.compile(r"^step_(\d+)$")
_COMPLETE = "complete"
_LATEST = "latest"
_STATE = "state.json"
_MODEL, _OPTIM, _EMA, _EXTRA = "model.safetensors", "optimizer.safetensors", "ema.safetensors", "extra.safetensors"
_TMP_PREFIX = ".tmp-"


def _safetensors():
    try:
        import safetensors.torch as st
    except ImportError as e:  # pragma: no cover - depends on the environment
        raise ImportError("checkpoints need the safetensors package: pip install safetensors") from e
    return st


# ----------------------------------------------------------------------------------------------
# files


_fsync_dir, _fsync_file = fsync_dir, fsync_file


def _atomic_write(path: Path, write: Callable[[Path], None]) -> None:
    """``write(tmp)`` to a temporary file beside ``path``, fsync it, then ``os.replace`` it onto ``path``."""
    tmp = path.with_name(f"{_TMP_PREFIX}{path.name}-{uuid.uuid4().hex[:8]}")
    try:
        write(tmp)
        apply_umask(tmp)  # safetensors creates files 0600
        _fsync_file(tmp)
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    _fsync_dir(path.parent)


def _write_text(path: Path, text: str) -> None:
    _atomic_write(path, lambda tmp: tmp.write_text(text, encoding="utf-8"))


def _write_tensors(path: Path, tensors: dict[str, torch.Tensor]) -> None:
    st = _safetensors()
    _atomic_write(path, lambda tmp: st.save_file(tensors, str(tmp), metadata={"format": "pt"}))


def check_writable(directory: PathLike) -> Path:
    """Create ``directory`` (and parents) if needed and prove a file can be written and fsynced there.

    Call it before training starts so an unwritable output path fails in seconds, not at the first save.
    Returns the directory as a Path; raises an OSError of the underlying kind (PermissionError,
    NotADirectoryError, ...) whose message names the directory and the reason.
    """
    path = Path(directory)
    try:
        path.mkdir(parents=True, exist_ok=True)
        probe = path / f"{_TMP_PREFIX}write-probe-{uuid.uuid4().hex[:8]}"
        try:
            with open(probe, "wb") as f:
                f.write(b"ok")
                f.flush()
                os.fsync(f.fileno())
        finally:
            probe.unlink(missing_ok=True)
    except OSError as e:
        raise type(e)(f"output directory {str(path)!r} is not writable: {e.strerror or e}") from e
    return path


def checkpoint_name(step: int) -> str:
    """``step_000100`` for step 100 (at least 6 digits; larger steps simply get more)."""
    return f"step_{step:06d}"


def _is_complete(path: Path) -> bool:
    return path.is_dir() and (path / _COMPLETE).is_file()


def list_checkpoints(run_dir: PathLike) -> list[Path]:
    """The committed checkpoints (``step_*`` directories with a ``complete`` marker), oldest step first."""
    run = Path(run_dir)
    if not run.is_dir():
        return []
    found = []
    for p in run.iterdir():
        m = _STEP_RE.match(p.name)
        if m and _is_complete(p):
            found.append((int(m.group(1)), p))
    return [p for _, p in sorted(found)]


def latest_checkpoint(run_dir: PathLike) -> Optional[Path]:
    """The checkpoint to resume from: the one ``latest`` names if it is complete, else (no or a dangling
    pointer) the complete checkpoint with the highest step, else None."""
    run = Path(run_dir)
    pointer = run / _LATEST
    if pointer.is_file():
        name = pointer.read_text(encoding="utf-8", errors="replace").strip()
        target = run / name
        if _STEP_RE.match(name) and _is_complete(target):
            return target
    found = list_checkpoints(run)
    return found[-1] if found else None


def _candidates(path: PathLike) -> list[Path]:
    """The checkpoints to try, in order: ``[path]`` for a checkpoint directory; for a run directory its
    latest, then the older complete ones, newest first (the fallbacks when the latest is corrupt)."""
    p = Path(path)
    if _is_complete(p):
        return [p]
    if p.is_dir() and _STEP_RE.match(p.name):
        raise FileNotFoundError(f"checkpoint {str(p)!r} is incomplete (no {_COMPLETE!r} marker): a save was "
                                "interrupted")
    found = latest_checkpoint(p) if p.is_dir() else None
    if found is None:
        raise FileNotFoundError(
            f"no complete checkpoint at {str(p)!r}: expected a step_XXXXXX directory with a {_COMPLETE!r} marker, "
            f"or a run directory holding one"
        )
    step = int(_STEP_RE.match(found.name).group(1))
    older = [c for c in list_checkpoints(p) if int(_STEP_RE.match(c.name).group(1)) < step]
    return [found] + older[::-1]


def verify_checkpoint(path: PathLike, *, verify: bool = True) -> dict[str, Any]:
    """Check a checkpoint directory's files against its ``complete`` marker and return its parsed state.json.

    Sizes are always checked; with ``verify`` the sha256 of every file too (a warning says when it is
    skipped, or when the checkpoint predates hashes). Raises :class:`CorruptFileError` (a ValueError) naming
    the file that is missing, truncated, unparsable or of another content; ValueError for another format.
    """
    ckpt = Path(path)
    marker_path = ckpt / _COMPLETE
    marker = read_json(marker_path, "a checkpoint's completion marker: step, and the size and sha256 of every file")
    if not isinstance(marker, dict) or not isinstance(marker.get("files"), dict):
        raise CorruptFileError(f"{str(marker_path)!r} must be a JSON object with 'files' (name -> bytes), got "
                               f"{type(marker).__name__}{'' if not isinstance(marker, dict) else ' without it'}")
    hashes = marker.get("sha256")
    verify_files(ckpt, marker["files"], hashes, verify=verify, record=f"its {_COMPLETE!r} marker")
    warn_unchecked("checkpoint", ckpt, hashes, verify)
    state_path = ckpt / _STATE
    meta = read_json(state_path, "a checkpoint's state: step, config, the structure of its tensors")
    if not isinstance(meta, dict):
        raise CorruptFileError(f"{str(state_path)!r} must be a JSON object, got {type(meta).__name__}")
    if meta.get("format") != FORMAT_VERSION:
        raise ValueError(f"checkpoint {str(ckpt)!r} has format {meta.get('format')!r} in {_STATE}, this version "
                         f"reads {FORMAT_VERSION}")
    for key in ("state", "rng"):
        if key not in meta:
            raise CorruptFileError(f"{str(state_path)!r} has no {key!r} entry: expected a checkpoint's state")
    return meta


def _open_checkpoint(path: PathLike, verify: bool) -> tuple[Path, dict[str, Any]]:
    """The first of :func:`_candidates` that passes :func:`verify_checkpoint`, warning about each one skipped."""
    return first_good(_candidates(path), lambda c: verify_checkpoint(c, verify=verify), "checkpoint", path)


# ----------------------------------------------------------------------------------------------
# JSON + tensors encoding of nested state (optimizer, EMA, RNG, user state)


def _encode(obj: Any, path: str, tensors: dict[str, torch.Tensor]) -> Any:
    """JSON-able structure of ``obj``; tensors are moved (copied to CPU) into ``tensors`` under a key."""
    if isinstance(obj, torch.Tensor):
        key = path or "tensor"
        while key in tensors:
            key += "_"
        tensors[key] = obj.detach().to("cpu", copy=True).contiguous()
        return {"__tensor__": key}
    if obj is None or isinstance(obj, (bool, str)):
        return obj
    if isinstance(obj, numbers.Integral):
        return int(obj)
    if isinstance(obj, numbers.Real):
        return float(obj)
    if isinstance(obj, torch.dtype):
        return {"__dtype__": str(obj).removeprefix("torch.")}
    if dataclasses.is_dataclass(obj) and not isinstance(obj, type):
        obj = dataclasses.asdict(obj)
    if isinstance(obj, Mapping):
        sub = lambda k: f"{path}.{k}" if path else str(k)  # noqa: E731
        if all(isinstance(k, str) and not k.startswith("__") for k in obj):
            return {k: _encode(v, sub(k), tensors) for k, v in obj.items()}
        return {"__dict__": [[_encode(k, "", {}), _encode(v, sub(k), tensors)] for k, v in obj.items()]}
    if isinstance(obj, tuple):
        return {"__tuple__": [_encode(v, f"{path}.{i}", tensors) for i, v in enumerate(obj)]}
    if isinstance(obj, list):
        return [_encode(v, f"{path}.{i}", tensors) for i, v in enumerate(obj)]
    if type(obj).__module__ == "numpy" and hasattr(obj, "tolist") and hasattr(obj, "dtype"):
        return {"__ndarray__": obj.tolist(), "dtype": str(obj.dtype)}
    raise TypeError(
        f"cannot store {path or 'value'} of type {type(obj).__name__} in a checkpoint: "
        "only tensors, numbers, strings, None, lists, tuples, dicts, dataclasses and numpy arrays"
    )


def _decode(obj: Any, tensors: Mapping[str, torch.Tensor]) -> Any:
    if isinstance(obj, list):
        return [_decode(v, tensors) for v in obj]
    if not isinstance(obj, dict):
        return obj
    if "__tensor__" in obj:
        return tensors[obj["__tensor__"]]
    if "__tuple__" in obj:
        return tuple(_decode(v, tensors) for v in obj["__tuple__"])
    if "__dict__" in obj:
        return {_decode(k, tensors): _decode(v, tensors) for k, v in obj["__dict__"]}
    if "__dtype__" in obj:
        name = obj["__dtype__"]
        dtype = getattr(torch, name, None) if isinstance(name, str) and name.isidentifier() else None
        if not isinstance(dtype, torch.dtype):
            raise ValueError(f"{name!r} is not a torch dtype name (e.g. 'float16', 'bfloat16')")
        return dtype
    if "__ndarray__" in obj:
        import numpy as np

        return np.array(obj["__ndarray__"], dtype=obj["dtype"])
    return {k: _decode(v, tensors) for k, v in obj.items()}


# ----------------------------------------------------------------------------------------------
# RNG


def _rng_state(generators: Optional[Mapping[str, torch.Generator]]) -> dict[str, Any]:
    state: dict[str, Any] = {"python": random.getstate(), "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    try:
        import numpy as np
    except ImportError:  # pragma: no cover - numpy is a dependency
        pass
    else:
        state["numpy"] = np.random.get_state()
    state["generators"] = {name: g.get_state() for name, g in (generators or {}).items()}
    return state


def _set_global_rng_state(state: Mapping[str, Any]) -> None:
    random.setstate(state["python"])
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        saved = state["cuda"]
        torch.cuda.set_rng_state_all(saved[: torch.cuda.device_count()])
    if "numpy" in state:
        import numpy as np

        np.random.set_state(state["numpy"])


def _set_generator_states(saved_gens: Mapping[str, torch.Tensor],
                          generators: Optional[Mapping[str, torch.Generator]]) -> None:
    for name, g in (generators or {}).items():
        if name not in saved_gens:
            raise ValueError(f"generators[{name!r}] has no saved state in the checkpoint; it has {sorted(saved_gens)}")
        g.set_state(saved_gens[name])


# ----------------------------------------------------------------------------------------------
# save / load


def _check_state(state: Any) -> int:
    if not isinstance(state, Mapping):
        raise TypeError(f"state must be a dict with at least 'step', got {type(state).__name__}")
    step = state.get("step")
    if not isinstance(step, numbers.Integral) or isinstance(step, bool) or step < 0:
        raise ValueError(f"state['step'] must be an int >= 0, got {step!r}")
    return int(step)


def _clean_stale(run: Path) -> None:
    """Remove temporary directories and files left by interrupted saves (single writer per run dir)."""
    for p in run.iterdir():
        if p.name.startswith(_TMP_PREFIX):
            if p.is_dir():
                shutil.rmtree(p, ignore_errors=True)
            else:
                p.unlink(missing_ok=True)


def _remove_dir(run: Path, path: Path) -> None:
    """Rename out of the ``step_*`` namespace first, so a crash mid-delete leaves nothing loadable-looking."""
    doomed = run / f"{_TMP_PREFIX}delete-{path.name}-{uuid.uuid4().hex[:8]}"
    os.rename(path, doomed)
    shutil.rmtree(doomed, ignore_errors=True)


def save_checkpoint(
    directory: PathLike,
    *,
    model: nn.Module,
    optimizer: Optional[torch.optim.Optimizer] = None,
    ema: Optional[EMA] = None,
    state: Mapping[str, Any],
    generators: Optional[Mapping[str, torch.Generator]] = None,
    keep_last: Optional[int] = None,
) -> Path:
    """Commit a checkpoint of step ``state["step"]`` to ``directory/step_XXXXXX`` and point ``latest`` at it.

    model:      its ``state_dict()`` goes to model.safetensors (as on the device, copied to CPU).
    optimizer:  any torch optimizer; its ``state_dict()`` is split into tensors and a JSON structure.
    ema:        an :class:`EMA`.
    state:      JSON-able dict (tensors, tuples and numpy arrays allowed) with ``"step"`` (int >= 0) and
                anything else the trainer needs back: config (dict or dataclass), metrics, data position...
                It is returned by :func:`load_checkpoint`, and its ``"config"`` is what ``config=`` there is
                compared with.
    generators: named ``torch.Generator`` s whose states to save besides the global RNGs (python
                ``random``, numpy, torch CPU, every CUDA device), which are always saved.
    keep_last:  keep only the newest ``keep_last`` (>= 1) checkpoints, never removing the one ``latest``
                names; None keeps all.
    Re-saving an existing step replaces it. Returns the checkpoint directory.
    """
    _safetensors()  # fail before any work when it is missing
    step = _check_state(state)
    if keep_last is not None and (not isinstance(keep_last, numbers.Integral) or isinstance(keep_last, bool)
                                  or keep_last < 1):
        raise ValueError(f"keep_last must be an int >= 1 or None, got {keep_last!r}")
    run = check_writable(directory)

    # Encode everything before writing anything, so unstorable state fails without touching the run dir.
    files: dict[str, dict[str, torch.Tensor]] = {
        _MODEL: {k: v.detach().to("cpu", copy=True).contiguous() for k, v in model.state_dict().items()}
    }
    meta: dict[str, Any] = {"format": FORMAT_VERSION, "step": step, "model_class": type(model).__name__}
    for key, fname, obj in (("optimizer", _OPTIM, optimizer), ("ema", _EMA, ema)):
        if obj is None:
            meta[key] = None
            continue
        tensors: dict[str, torch.Tensor] = {}
        meta[key] = _encode(obj.state_dict(), "", tensors)
        files[fname] = tensors
    extra: dict[str, torch.Tensor] = {}
    meta["rng"] = _encode(_rng_state(generators), "rng", extra)
    meta["state"] = _encode(dict(state), "state", extra)
    files[_EXTRA] = extra
    state_json = json.dumps(meta, indent=1, allow_nan=True)

    _clean_stale(run)
    name = checkpoint_name(step)
    final = run / name
    tmp = run / f"{_TMP_PREFIX}{name}-{uuid.uuid4().hex[:8]}"
    tmp.mkdir()
    try:
        for fname, tensors in files.items():
            _write_tensors(tmp / fname, tensors)
        _write_text(tmp / _STATE, state_json)
        sizes, hashes = file_records(tmp, [p.name for p in tmp.iterdir()])
        _write_text(tmp / _COMPLETE, json.dumps({"step": step, "files": sizes, "sha256": hashes}, indent=1))
        _fsync_dir(tmp)
        if final.exists():
            _remove_dir(run, final)
        os.rename(tmp, final)
        _fsync_dir(run)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    _write_text(run / _LATEST, name + "\n")

    if keep_last is not None:
        for old in list_checkpoints(run)[:-keep_last]:
            if old != final:
                _remove_dir(run, old)
    return final


def _plain(obj: Any) -> Any:
    """Dataclasses and mappings -> dicts, tuples -> lists, tensors / arrays -> lists: comparable values."""
    if dataclasses.is_dataclass(obj) and not isinstance(obj, type):
        obj = dataclasses.asdict(obj)
    if isinstance(obj, Mapping):
        return {k: _plain(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_plain(v) for v in obj]
    if hasattr(obj, "tolist"):
        return obj.tolist()
    return obj


def _config_diff(saved: Any, expected: Any, path: str = "config") -> list[str]:
    if isinstance(saved, dict) and isinstance(expected, dict):
        out = []
        for k in sorted(set(saved) | set(expected), key=str):
            if k not in saved:
                out.append(f"{path}.{k}: missing in the checkpoint, expected {expected[k]!r}")
            elif k not in expected:
                out.append(f"{path}.{k}: checkpoint has {saved[k]!r}, not in the expected config")
            else:
                out += _config_diff(saved[k], expected[k], f"{path}.{k}")
        return out
    same = saved == expected or (isinstance(saved, float) and isinstance(expected, float)
                                 and math.isnan(saved) and math.isnan(expected))
    return [] if same else [f"{path}: checkpoint has {saved!r}, expected {expected!r}"]


def load_checkpoint(
    path: PathLike,
    model: nn.Module,
    optimizer: Optional[torch.optim.Optimizer] = None,
    ema: Optional[EMA] = None,
    *,
    config: Any = None,
    generators: Optional[Mapping[str, torch.Generator]] = None,
    restore_rng: bool = True,
    verify: bool = True,
) -> dict[str, Any]:
    """Load a checkpoint into ``model`` (and ``optimizer``, ``ema``); return the saved ``state`` dict.

    path:        a ``step_XXXXXX`` directory, or a run directory (then :func:`latest_checkpoint`; when
                 that one fails its check, a warning names it and the newest older good one is loaded).
                 Incomplete (interrupted) checkpoints are never loaded.
    verify:      check every file's sha256 against the ``complete`` marker (reads each file once more);
                 False checks sizes only, with a warning saying so.
    config:      the model config (dict or dataclass) to compare with the saved ``state["config"]``.
    generators:  the same names as given to :func:`save_checkpoint`; their states are restored in place.
    restore_rng: restore python / numpy / torch / CUDA global RNG states, so a resumed run draws the same
                 numbers as an uninterrupted one.
    Before anything is modified, the model's tensors are checked against the checkpoint by name and shape
    (and the config, when given): any difference raises :class:`StateDictMismatchError` (a ValueError)
    listing the differing config fields and the missing, unexpected and mis-shaped tensors.
    Asking for optimizer / EMA state a checkpoint does not have is a ValueError. A corrupt file raises
    :class:`CorruptFileError` (a ValueError) naming it.
    """
    _safetensors()
    ckpt, meta = _open_checkpoint(path, verify)
    state_path = ckpt / _STATE

    def tensors(fname: str, what: str) -> dict[str, torch.Tensor]:
        return load_safetensors(ckpt / fname, what)

    def decode(key: str, tensors_of: Mapping[str, torch.Tensor]) -> Any:
        try:
            return _decode(meta[key], tensors_of)
        except (KeyError, TypeError, ValueError) as e:
            raise CorruptFileError(f"{str(state_path)!r}: its {key!r} entry cannot be decoded ({type(e).__name__}: "
                                   f"{e}): expected the structure written by save_checkpoint") from e

    extra = tensors(_EXTRA, "the checkpoint's RNG states and state tensors")
    state = decode("state", extra)

    problems = []
    if config is not None and "config" in state:
        problems += _config_diff(_plain(state["config"]), _plain(config))
    sd = tensors(_MODEL, "the model's state dict")
    own = model.state_dict()
    missing = sorted(k for k in own if k not in sd)
    unexpected = sorted(k for k in sd if k not in own)
    shapes = sorted(f"{k} (model {tuple(own[k].shape)}, checkpoint {tuple(sd[k].shape)})"
                    for k in own if k in sd and tuple(own[k].shape) != tuple(sd[k].shape))
    tensor_problems = [_listing(t, n) for t, n in (("missing", missing), ("unexpected", unexpected),
                                                   ("shape mismatch", shapes)) if n]
    if problems or tensor_problems:
        parts = ([_listing("config differs", problems)] if problems else []) + tensor_problems
        raise StateDictMismatchError(
            f"checkpoint {str(ckpt)!r} does not fit {type(model).__name__}: " + "; ".join(parts)
        )
    for key, obj in (("optimizer", optimizer), ("ema", ema)):
        if obj is not None and meta.get(key) is None:
            raise ValueError(f"{key} state was requested but checkpoint {str(ckpt)!r} was saved without one")

    opt_state = decode("optimizer", tensors(_OPTIM, "the optimizer state")) if optimizer is not None else None
    ema_state = decode("ema", tensors(_EMA, "the EMA weights")) if ema is not None else None
    rng = decode("rng", extra)
    model.load_state_dict(sd, strict=True)
    if optimizer is not None:
        optimizer.load_state_dict(opt_state)
    if ema is not None:
        ema.load_state_dict(ema_state)
    if restore_rng:
        _set_global_rng_state(rng)
    _set_generator_states(rng.get("generators", {}), generators)
    return state
