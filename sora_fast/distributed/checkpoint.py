"""Sharded checkpoints through ``torch.distributed.checkpoint`` (DCP), resumable at another world size.

Each rank writes only its shards of the model, the optimizer state and the EMA; DCP stores them with
their global shapes, so a run saved on 2 ranks loads on 1, 4 or 8 (or into a plain single-process
model). Layout of a run directory::

    dcp_step_000100/          DCP files (.metadata, __0_0.distcp, ...) + meta.json (step, model config, mesh)
    latest_dcp                name of the newest complete checkpoint

A checkpoint directory appears under its final name only once complete (written under a temporary name,
renamed by rank 0 after every rank finished). Before anything is loaded, every rank reads ``meta.json``
and the DCP metadata itself and compares the model config and every tensor's name and global shape, so
a checkpoint of another model raises the same :class:`StateDictMismatchError` on every rank, without a
collective that could hang.

``meta.json`` (written last) also records the size and sha256 of every DCP file; every rank checks them
before loading (``verify=False`` checks sizes only, with a warning). Resuming from a run directory whose
latest checkpoint fails that check warns, naming it and the file, and falls back to the newest older good
one; every rank reads the same files, so every rank makes the same choice.
"""
from __future__ import annotations

import contextlib
import json
import shutil
import warnings
from pathlib import Path
from typing import Any, Mapping, Optional, Union

import torch
import torch.distributed as dist
from torch import nn

from .._files import CorruptFileError, file_records, first_good, read_json, verify_files, warn_unchecked
from ..models._convert import StateDictMismatchError, _listing
from ..training.checkpoint import _config_diff, _plain, check_writable
from ..training.ema import EMA

__all__ = ["save_sharded", "load_sharded", "latest_sharded", "list_sharded", "verify_sharded"]

FORMAT = "sora_fast-dcp-1"
_PREFIX, _LATEST, _META, _TMP = "dcp_step_", "latest_dcp", "meta.json", ".tmp-"
PathLike = Union[str, Path]


@contextlib.contextmanager
def _quiet_single_process():
    """DCP warns that it 'assumes the intent' of a single process when there is no process group: here
    that is the intent (a single-process run, or one resuming a multi-rank checkpoint on one rank)."""
    with warnings.catch_warnings():
        if not dist.is_initialized():
            warnings.filterwarnings("ignore", message="torch.distributed is disabled, unavailable or uninitialized")
        yield


def _barrier() -> None:
    if dist.is_initialized():
        dist.barrier()


def _is_main() -> bool:
    return not dist.is_initialized() or dist.get_rank() == 0


def list_sharded(run_dir: PathLike) -> list[Path]:
    """Complete sharded checkpoints of a run, oldest first."""
    run = Path(run_dir)
    if not run.is_dir():
        return []
    return sorted(p for p in run.iterdir() if p.name.startswith(_PREFIX) and (p / _META).is_file())


def latest_sharded(run_dir: PathLike) -> Optional[Path]:
    """The checkpoint ``latest_dcp`` names (or the newest complete one), None when there is none."""
    run = Path(run_dir)
    pointer = run / _LATEST
    if pointer.is_file():
        name = pointer.read_text(encoding="utf-8", errors="replace").strip()
        p = run / name
        if name.startswith(_PREFIX) and "/" not in name and (p / _META).is_file():
            return p
    found = list_sharded(run)
    return found[-1] if found else None


def _state(model: nn.Module, optimizer, ema: Optional[EMA]) -> dict[str, Any]:
    from torch.distributed.checkpoint.state_dict import get_state_dict

    msd, osd = get_state_dict(model, optimizer if optimizer is not None else [])
    state = {"model": msd}
    if optimizer is not None:
        state["optim"] = osd
    if ema is not None:
        state["ema"] = {"params": ema.params, "buffers": ema.buffers}
    return state


def save_sharded(run_dir: PathLike, step: int, model: nn.Module, optimizer=None, ema: Optional[EMA] = None, *,
                 meta: Optional[Mapping[str, Any]] = None, keep_last: Optional[int] = None) -> Path:
    """Write step ``step``'s sharded checkpoint (a collective: every rank calls it) and return its path.

    meta: JSON-able extras stored in ``meta.json`` (``config`` is what :func:`load_sharded` compares).
    keep_last: keep only the newest ``keep_last`` checkpoints (None: all).
    """
    import torch.distributed.checkpoint as dcp

    run = check_writable(run_dir) if _is_main() else Path(run_dir)
    name = f"{_PREFIX}{step:06d}"
    final, tmp = run / name, run / f"{_TMP}{name}"
    if _is_main():
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
    _barrier()
    with _quiet_single_process():
        dcp.save(_state(model, optimizer, ema), checkpoint_id=str(tmp))
    if _is_main():
        sizes, hashes = file_records(tmp, [p.name for p in tmp.iterdir() if p.is_file() and p.name != _META])
        record = {"format": FORMAT, "step": int(step), "ema_updates": ema.num_updates if ema is not None else None,
                  "world_size": dist.get_world_size() if dist.is_initialized() else 1, **dict(meta or {}),
                  "files": sizes, "sha256": hashes}
        (tmp / _META).write_text(json.dumps(_plain(record), indent=1))
        if final.exists():
            shutil.rmtree(final)
        tmp.rename(final)
        (run / _LATEST).write_text(name + "\n")
        if keep_last is not None:
            for old in list_sharded(run)[:-keep_last]:
                if old != final:
                    shutil.rmtree(old, ignore_errors=True)
    _barrier()
    return final


def _check_fits(ckpt: Path, record: dict, state: dict, config: Any) -> None:
    """Compare the model config and every tensor's name and global shape with the checkpoint's."""
    from torch.distributed.checkpoint import FileSystemReader
    from torch.distributed.checkpoint.metadata import TensorStorageMetadata

    saved = {k: tuple(v.size) for k, v in FileSystemReader(str(ckpt)).read_metadata().state_dict_metadata.items()
             if isinstance(v, TensorStorageMetadata)}
    own = {f"model.{k}": tuple(v.shape) for k, v in state["model"].items() if isinstance(v, torch.Tensor)}
    saved_model = {k: v for k, v in saved.items() if k.startswith("model.")}
    problems = _config_diff(_plain(record.get("config")), _plain(config)) if config is not None else []
    missing = sorted(k for k in own if k not in saved_model)
    unexpected = sorted(k for k in saved_model if k not in own)
    shapes = sorted(f"{k} (model {own[k]}, checkpoint {saved_model[k]})" for k in own
                    if k in saved_model and own[k] != saved_model[k])
    parts = ([_listing("config differs", problems)] if problems else []) + [
        _listing(t, n) for t, n in (("missing", missing), ("unexpected", unexpected), ("shape mismatch", shapes)) if n]
    if "ema" in state and not any(k.startswith("ema.") for k in saved):
        parts.append("EMA state was requested but the checkpoint was saved without one")
    if "optim" in state and not any(k.startswith("optim.") for k in saved):
        parts.append("optimizer state was requested but the checkpoint was saved without one")
    if parts:
        raise StateDictMismatchError(f"checkpoint {str(ckpt)!r} does not fit this model: " + "; ".join(parts))


def verify_sharded(path: PathLike, *, verify: bool = True) -> dict[str, Any]:
    """Check a sharded checkpoint's files against its ``meta.json`` and return that record.

    Sizes are always checked; with ``verify`` every file's sha256 too (warning when skipped, or when the
    checkpoint predates hashes). Raises :class:`CorruptFileError` (a ValueError) naming the bad file.
    """
    ckpt = Path(path)
    meta_path = ckpt / _META
    record = read_json(meta_path, "a sharded checkpoint's record: format, step, config, size and sha256 of its files")
    if not isinstance(record, dict):
        raise CorruptFileError(f"{str(meta_path)!r} must be a JSON object, got {type(record).__name__}")
    if record.get("format") != FORMAT:
        raise ValueError(f"checkpoint {str(ckpt)!r} has format {record.get('format')!r} in {_META}, expected "
                         f"{FORMAT!r}")
    hashes = record.get("sha256")
    if "files" in record or hashes is not None:
        verify_files(ckpt, record.get("files"), hashes, verify=verify, record=f"its {_META}")
    warn_unchecked("sharded checkpoint", ckpt, hashes, verify)
    return record


def _open_sharded(path: PathLike, verify: bool) -> tuple[Path, dict[str, Any]]:
    ckpt = Path(path)
    if (ckpt / _META).is_file():
        return ckpt, verify_sharded(ckpt, verify=verify)
    found = latest_sharded(ckpt)
    if found is None:
        raise FileNotFoundError(f"no complete sharded checkpoint (dcp_step_*/{_META}) in {str(ckpt)!r}")
    candidates = [found] + [p for p in list_sharded(ckpt) if p.name < found.name][::-1]
    return first_good(candidates, lambda c: verify_sharded(c, verify=verify), "sharded checkpoint", ckpt)


def load_sharded(path: PathLike, model: nn.Module, optimizer=None, ema: Optional[EMA] = None, *,
                 config: Any = None, verify: bool = True) -> dict[str, Any]:
    """Load a sharded checkpoint (a run directory: its latest, or the newest older one that passes its
    check, with a warning) into ``model`` / ``optimizer`` / ``ema``, resharded to this run's world size;
    returns ``meta.json``. ``verify``: check every file's sha256 (False: sizes only). A collective under a
    process group."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import set_state_dict

    ckpt, record = _open_sharded(path, verify)
    state = _state(model, optimizer, ema)
    _check_fits(ckpt, record, state, config)
    with _quiet_single_process():
        dcp.load(state, checkpoint_id=str(ckpt))
    set_state_dict(model, optimizer if optimizer is not None else [], model_state_dict=state["model"],
                   optim_state_dict=state.get("optim", {}))
    if ema is not None:
        ema.num_updates = int(record["ema_updates"])
    return record
