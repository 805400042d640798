"""The files a user keeps (checkpoints, pipelines, latent caches): content hashes, and reads that name the file.

- :func:`sha256_file` streams a file through sha256 in 1 MiB chunks (the one hashing helper of the package).
- :func:`file_records` / :func:`verify_files`: the ``{name: bytes}`` and ``{name: sha256}`` records written
  next to the files at save time, and their check at load time; a difference raises
  :class:`CorruptFileError` naming the file, what was recorded and what is there.
- :func:`read_json` / :func:`load_safetensors`: a missing file is a FileNotFoundError, a truncated, empty
  or unparsable one a :class:`CorruptFileError` (a ValueError); both messages name the file and what it
  was expected to hold, never a bare parser message.
- :func:`apply_umask`: files written through ``tempfile`` or safetensors are created 0600 / 0700; this gives
  them the mode a plain ``open`` would (``0o666`` / ``0o777`` minus the user's umask).
"""
from __future__ import annotations

import hashlib
import json
import os
import shutil
import tempfile
import warnings
from pathlib import Path
from typing import Any, Callable, Iterable, Mapping, Optional, Union

import torch

__all__ = ["CorruptFileError", "sha256_file", "file_records", "verify_files", "read_json", "load_safetensors",
           "apply_umask", "fsync_file", "fsync_dir"]

PathLike = Union[str, os.PathLike]
_CHUNK = 1 << 20


class CorruptFileError(ValueError):
    """A saved file that is truncated, unparsable, or whose bytes differ from the size / sha256 recorded
    when it was written. The message starts with the file's path and says what was expected."""


def sha256_file(path: PathLike, chunk_size: int = _CHUNK) -> str:
    """Hex sha256 of a file's bytes, read in ``chunk_size`` chunks (memory flat in the file size)."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(chunk_size), b""):
            h.update(block)
    return h.hexdigest()


def file_records(directory: PathLike, names: Iterable[str]) -> tuple[dict[str, int], dict[str, str]]:
    """``({name: size in bytes}, {name: sha256})`` of the files ``names`` in ``directory``."""
    d = Path(directory)
    names = sorted(names)
    return {n: (d / n).stat().st_size for n in names}, {n: sha256_file(d / n) for n in names}


def verify_files(directory: PathLike, sizes: Mapping[str, Any], hashes: Optional[Mapping[str, Any]], *,
                 verify: bool = True, record: str = "the marker") -> None:
    """Check the files of ``directory`` against what ``record`` (e.g. a ``complete`` marker) says of them.

    Sizes are always checked (cheap); with ``verify`` and ``hashes`` every file's sha256 too (reads every
    byte once). Raises :class:`CorruptFileError` naming the first file that is missing, of another size or
    of another content, or when ``sizes`` / ``hashes`` are not mappings of the expected kind.
    """
    d = Path(directory)
    if not isinstance(sizes, Mapping) or not all(isinstance(k, str) and isinstance(v, int) and not isinstance(v, bool)
                                                 for k, v in sizes.items()):
        raise CorruptFileError(f"{str(d)!r}: {record} must map file names to sizes in bytes, got {sizes!r}")
    if hashes is not None and (not isinstance(hashes, Mapping) or not all(
            isinstance(k, str) and isinstance(v, str) and len(v) == 64 for k, v in hashes.items())):
        raise CorruptFileError(f"{str(d)!r}: {record} must map file names to sha256 hex digests, got {hashes!r}")
    for name, size in sizes.items():
        f = d / name
        if not f.is_file():
            raise CorruptFileError(f"{str(f)!r} is missing: {record} lists it with {size} bytes")
        got = f.stat().st_size
        if got != size:
            raise CorruptFileError(f"{str(f)!r} is {got} bytes, {record} says {size}: the file is truncated or "
                                   "was changed after it was written")
    if not verify or hashes is None:
        return
    for name, digest in hashes.items():
        f = d / name
        if not f.is_file():
            raise CorruptFileError(f"{str(f)!r} is missing: {record} lists its sha256")
        got = sha256_file(f)
        if got != digest:
            raise CorruptFileError(f"{str(f)!r} has sha256 {got}, {record} recorded {digest} when it was written: "
                                   "its content is corrupted")



def first_good(candidates: list, check: Callable[[Path], Any], what: str, where: PathLike) -> tuple[Path, Any]:
    """The first of ``candidates`` (newest first) whose ``check`` passes, as ``(path, check's result)``.
    A lone candidate raises its own error; otherwise each corrupt one is skipped with a warning naming it
    and why, the one taken says which it replaces, and if none passes the error lists them all."""
    if len(candidates) == 1:  # nothing to fall back to: the error itself
        return candidates[0], check(candidates[0])
    tried = []
    for cand in candidates:
        try:
            result = check(cand)
        except CorruptFileError as e:
            tried.append(f"{cand.name}: {e}")
            warnings.warn(f"{what} {str(cand)!r} is corrupt, not loading it: {e}", stacklevel=4)
            continue
        if tried:
            warnings.warn(f"falling back to {what} {str(cand)!r}: the newer one(s) failed their check "
                          f"({'; '.join(tried)})", stacklevel=4)
        return cand, result
    raise CorruptFileError(f"no loadable {what} in {str(where)!r}: every complete one failed its check: "
                           + "; ".join(tried))



def warn_unchecked(what: str, path: PathLike, hashes: Optional[Mapping[str, Any]], verify: bool,
                   stacklevel: int = 3) -> None:
    """Say what :func:`verify_files` could not check: the files of ``what`` at ``path`` when its record holds
    no hashes (written by an older version), or their sha256 when ``verify`` is False."""
    if hashes is None:
        warnings.warn(f"{what} {str(path)!r} was written without content hashes (an older version): only the "
                      "sizes of its files are checked", stacklevel=stacklevel + 1)
    elif not verify:
        warnings.warn(f"verify=False: the sha256 of the {len(hashes)} files of {what} {str(path)!r} "
                      f"({', '.join(sorted(hashes))}) is not checked (only sizes)", stacklevel=stacklevel + 1)


def read_json(path: PathLike, what: str) -> Any:
    """The parsed JSON of ``path``. FileNotFoundError when missing; :class:`CorruptFileError` when it is not
    UTF-8 JSON; both name the file and ``what`` it should hold (e.g. "a pipeline description")."""
    p = Path(path)
    try:
        text = p.read_bytes().decode("utf-8")
    except FileNotFoundError as e:
        raise FileNotFoundError(f"{str(p)!r} is missing: expected {what}") from e
    except IsADirectoryError as e:
        raise CorruptFileError(f"{str(p)!r} is a directory: expected a JSON file with {what}") from e
    except UnicodeDecodeError as e:
        raise CorruptFileError(f"{str(p)!r} is not UTF-8 text: expected a JSON file with {what}") from e
    try:
        return json.loads(text)
    except json.JSONDecodeError as e:
        raise CorruptFileError(f"{str(p)!r} is not valid JSON ({e}): expected {what}; the file is truncated "
                               "or corrupted") from e


def load_safetensors(path: PathLike, what: str, device: str = "cpu") -> dict[str, torch.Tensor]:
    """``safetensors.torch.load_file(path)``; FileNotFoundError when missing, :class:`CorruptFileError` when
    empty, truncated or not a safetensors file (safetensors' own error names no file)."""
    from safetensors.torch import load_file

    p = Path(path)
    if not p.is_file():
        raise FileNotFoundError(f"{str(p)!r} is missing: expected a safetensors file with {what}")
    if p.stat().st_size == 0:
        raise CorruptFileError(f"{str(p)!r} is empty: expected a safetensors file with {what}")
    try:
        return load_file(str(p), device=device)
    except MemoryError:
        raise
    except Exception as e:  # SafetensorError (truncated, bad header), OSError, ...
        raise CorruptFileError(f"{str(p)!r} is not a readable safetensors file ({type(e).__name__}: {e}): "
                               f"expected {what}; the file is truncated or corrupted") from e


def _umask() -> int:
    old = os.umask(0o022)
    os.umask(old)
    return old


def apply_umask(path: PathLike) -> None:
    """Give ``path`` the permissions a plain ``open`` / ``mkdir`` would: 0o666 (files) or 0o777 (directories)
    minus the user's umask. tempfile and safetensors create files 0600 and directories 0700."""
    p = Path(path)
    os.chmod(p, (0o777 if p.is_dir() else 0o666) & ~_umask())


def fsync_file(path: PathLike) -> None:
    with open(path, "rb+") as f:
        os.fsync(f.fileno())


def fsync_dir(path: PathLike) -> None:
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:  # pragma: no cover - platforms without directory handles
        return
    try:
        os.fsync(fd)
    except OSError:  # pragma: no cover - filesystems that cannot fsync a directory
        pass
    finally:
        os.close(fd)


# --- a directory written whole: a temporary name, then two renames ---------------------------------
def _old_dir(final: Path) -> Path:
    return final.with_name(f".{final.name}.old")


def _new_prefix(final: Path) -> str:
    return f".{final.name}.new-"


def _complete_dir(d: Path, record: str) -> bool:
    """``d`` holds files that match the sizes and hashes listed in its ``record`` JSON file."""
    try:
        desc = read_json(d / record, "a directory's record of its files")
        if not isinstance(desc, dict) or "sha256" not in desc:
            return False
        verify_files(d, desc.get("files"), desc["sha256"], verify=True, record=record)
    except (OSError, ValueError):
        return False
    return True


def recover_dir(final: Path, record: str) -> Optional[Path]:
    """Put a directory back under ``final`` after a crash in the middle of :func:`atomic_dir`'s swap.

    The swap renames ``final`` to ``.NAME.old``, then the complete new ``.NAME.new-*`` to ``final``. When
    ``final`` is missing, the newest new directory is renamed into place if its files pass their hash check
    (its save had finished writing), else ``.NAME.old`` (the previous directory). Warns naming what was
    recovered and returns it (None when nothing needed recovery). Safe to run by several processes at once.
    """
    if final.exists() or not final.parent.is_dir():
        return None
    new = sorted((p for p in final.parent.iterdir() if p.name.startswith(_new_prefix(final)) and p.is_dir()),
                 key=lambda p: p.stat().st_mtime, reverse=True)
    for cand in [p for p in new if _complete_dir(p, record)] + [p for p in [_old_dir(final)] if (p / record).is_file()]:
        try:
            os.replace(cand, final)
        except OSError:
            if not (final / record).is_file():
                continue
            return None  # another process recovered it meanwhile
        fsync_dir(final.parent)
        warnings.warn(f"{str(final)!r} was missing (a save was interrupted between its two renames): recovered "
                      f"it from {str(cand)!r}", stacklevel=3)
        return cand
    return None


def atomic_dir(final: Path, write: Callable[[Path], None], record: str) -> None:
    """Write a directory under a temporary name beside ``final``, then swap it in.

    Every file gets the user's umask (tempfile and safetensors create 0700 / 0600) and is fsynced before
    the swap. A crash between the swap's two renames leaves ``.NAME.old`` and the complete new directory;
    :func:`recover_dir` (run by ``load`` and by the next ``save``; ``record`` names the JSON file listing
    the sizes and hashes of the directory's files) puts one of them back under ``final``.
    """
    final.parent.mkdir(parents=True, exist_ok=True)
    recover_dir(final, record)
    tmp = Path(tempfile.mkdtemp(prefix=_new_prefix(final), dir=final.parent))
    old = None
    try:
        write(tmp)
        for f in sorted(tmp.rglob("*"), key=lambda p: -len(p.parts)):  # files and subdirectories, deepest first
            apply_umask(f)
            if f.is_dir():
                fsync_dir(f)
            else:
                fsync_file(f)
        apply_umask(tmp)
        fsync_dir(tmp)
        if final.exists():
            old = _old_dir(final)
            shutil.rmtree(old, ignore_errors=True)
            os.replace(final, old)
        os.replace(tmp, final)
        fsync_dir(final.parent)
    except BaseException:
        if old is not None and not final.exists():
            try:  # the second rename failed: put the previous directory back
                os.replace(old, final)
            except OSError:
                pass  # left for recover_dir
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)
    for p in final.parent.iterdir():  # new directories of saves that crashed while writing
        if p.name.startswith(_new_prefix(final)) and p.is_dir():
            shutil.rmtree(p, ignore_errors=True)
