"""Latent caching: encode a video dataset once into safetensors shards, read the latents back for training.

Layout of a cache folder::

    shard-00000.safetensors   one tensor per item, keyed by its zero-padded item number ("000000")
    shard-00001.safetensors   ...
    index.json                format/version, items per shard with caption, latent shape and dtype,
                              source path and video shape; byte size and sha256 of every shard

The index also holds the cache's key (:func:`cache_key`): the dataset's identity (for a
:class:`~sora_fast.data.VideoFolder` every file read with its size and mtime, the captions, the manifest's
hash and the resize/frame settings), the encoder's identity (:func:`module_key`: a hash of the VAE's
config and weights) and the storage dtype. :func:`ensure_latent_cache` reuses a cache whose key matches
and re-encodes, saying why on stderr, when anything differs.

Every file is written to a temporary name and moved into place with ``os.replace``, the index last, so
an interrupted run leaves either the previous cache or the new one, never a mix. Reading checks each
shard against the index (size, header, keys and shapes; sha256 too with ``verify=True``); a corrupted or
missing shard is skipped and counted, never fatal.

safetensors is needed (``pip install safetensors``).
"""
from __future__ import annotations

import hashlib
import json
import os
import struct
import sys
import time
from pathlib import Path
from typing import Callable, NamedTuple, Optional, Union

import torch
from torch.utils.data import Dataset

from .._files import sha256_file
from .io import _AtomicFile, _progress
from .video_folder import Skipped, UnreadableFileError, first_readable

__all__ = ["cache_latents", "ensure_latent_cache", "cache_key", "module_key", "stale_reason", "LatentDataset",
           "INDEX_NAME"]

INDEX_NAME = "index.json"
_FORMAT = "sora_fast.latents"
_VERSION = 1
_SHARD_FMT = "shard-{:05d}.safetensors"


def _import_safetensors():
    try:
        import safetensors.torch as st
    except ImportError as e:  # pragma: no cover
        raise ImportError("safetensors is needed for latent caches: pip install safetensors") from e
    return st


def _sha256(path: Path) -> str:
    """Hex sha256 of a shard (the package's one streamed hash, shared with checkpoints and pipelines)."""
    return sha256_file(path)


def module_key(module: torch.nn.Module, config=None) -> str:
    """sha256 of a module's ``config`` (a dataclass or JSON-able value; the module's own ``.config`` when
    None) and of every state-dict tensor (name, dtype, shape, bytes): equal keys encode alike."""
    import dataclasses

    if config is None:
        config = getattr(module, "config", None)
    if dataclasses.is_dataclass(config) and not isinstance(config, type):
        config = dataclasses.asdict(config)
    h = hashlib.sha256()
    h.update(json.dumps({"class": type(module).__qualname__, "config": config}, sort_keys=True,
                        default=repr).encode("utf-8"))
    for name, t in module.state_dict().items():
        t = t.detach().to("cpu").contiguous()
        h.update(json.dumps([name, str(t.dtype), list(t.shape)]).encode("utf-8"))
        h.update(t.reshape(-1).view(torch.uint8).numpy().tobytes())
    return h.hexdigest()


def cache_key(dataset, encoder_key: str, *, dtype: Optional[torch.dtype] = None) -> dict:
    """The key a latent cache of ``dataset`` encoded by ``encoder_key`` (e.g. :func:`module_key` of the VAE)
    is stored under: ``{"data": dataset.identity(), "encoder": encoder_key, "dtype": ...}``, as JSON data.
    TypeError when the dataset has no ``identity()`` (its contents cannot be told apart)."""
    identity = getattr(dataset, "identity", None)
    if not callable(identity):
        raise TypeError(f"dataset must have an identity() method to key a latent cache on (as VideoFolder has),"
                        f" got {type(dataset).__name__}")
    if not isinstance(encoder_key, str) or not encoder_key:
        raise TypeError(f"encoder_key must be a non-empty str (e.g. module_key(vae)), got {encoder_key!r}")
    key = {"data": identity(), "encoder": encoder_key, "dtype": None if dtype is None else str(dtype)}
    return json.loads(json.dumps(key))  # as it reads back from the index


def _names(names: list, n: int = 3) -> str:
    return ", ".join(names[:n]) + (f" and {len(names) - n} more" if len(names) > n else "")


def _key_changes(old, new: dict) -> str:
    """What differs between a stored cache key and the current one, in words."""
    if not isinstance(old, dict):
        return ("the cache was written without a key (by an older version, or cache_latents without key=),"
                " so what it holds is unknown")
    parts = []
    od, nd = old.get("data") or {}, new.get("data") or {}
    of = {f[0]: f[1:] for f in od.get("files", []) if isinstance(f, list) and f}
    nf = {f[0]: f[1:] for f in nd.get("files", [])}
    for label, names in (("added", [k for k in nf if k not in of]), ("removed", [k for k in of if k not in nf]),
                         ("changed (size or mtime)", [k for k in nf if k in of and of[k] != nf[k]])):
        if names:
            parts.append(f"{len(names)} data file(s) {label}: {_names(names)}")
    if od.get("manifest_sha256") != nd.get("manifest_sha256"):
        parts.append("the manifest differs")
    if not parts and od.get("captions_sha256") != nd.get("captions_sha256"):
        parts.append("the captions differ")
    os_, ns = od.get("settings") or {}, nd.get("settings") or {}
    for k in sorted(set(os_) | set(ns)):
        if os_.get(k) != ns.get(k):
            parts.append(f"{k} {os_.get(k)!r} -> {ns.get(k)!r}")
    if old.get("encoder") != new.get("encoder"):
        parts.append("the encoder (VAE config or weights) differs")
    if old.get("dtype") != new.get("dtype"):
        parts.append(f"dtype {old.get('dtype')} -> {new.get('dtype')}")
    return "; ".join(parts) or "the cache key differs"


def stale_reason(out_dir: Union[str, "os.PathLike[str]"], key: dict) -> Optional[str]:
    """None when ``out_dir`` holds a latent cache written under ``key`` (:func:`cache_key`), else why not."""
    index_path = Path(os.fspath(out_dir)).expanduser() / INDEX_NAME
    if not index_path.exists():
        return f"no cache yet ({INDEX_NAME} not found)"
    try:
        index = json.loads(index_path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        return f"its {INDEX_NAME} is unreadable ({type(e).__name__}: {e})"
    stored = index.get("key") if isinstance(index, dict) else None
    if stored == json.loads(json.dumps(key)):
        return None
    return _key_changes(stored, key)


def ensure_latent_cache(dataset, encode_fn: Callable[[torch.Tensor], torch.Tensor],
                        out_dir: Union[str, "os.PathLike[str]"], *, encoder_key: str, shard_size: int = 256,
                        dtype: Optional[torch.dtype] = None, progress: bool = True) -> tuple[Path, Optional[str]]:
    """The latent cache of ``dataset`` in ``out_dir``: reused when its key (:func:`cache_key` of
    ``dataset``, ``encoder_key`` and ``dtype``) matches, else (re-)encoded with :func:`cache_latents`.
    A cache that exists but differs is rebuilt with a line on stderr saying what changed.
    returns: ``(out_dir, reason)``, reason None when the cache was reused, else why it was written."""
    key = cache_key(dataset, encoder_key, dtype=dtype)
    out = Path(os.fspath(out_dir)).expanduser()
    reason = stale_reason(out, key)
    if reason is None:
        if progress:
            print(f"latent cache {out} is up to date with the data and the VAE; reusing it", file=sys.stderr)
        return out, None
    if (out / INDEX_NAME).exists():
        print(f"latent cache {out} is out of date, re-encoding it: {reason}", file=sys.stderr)
    cache_latents(dataset, encode_fn, out, shard_size=shard_size, dtype=dtype, overwrite=True, progress=progress,
                  key=key)
    return out, reason


def _get_item(dataset, i: int):
    """``dataset.load(i)`` when the dataset has a no-fallback loader (VideoFolder), else ``dataset[i]``."""
    load = getattr(dataset, "load", None)
    return load(i) if callable(load) else dataset[i]


def cache_latents(dataset, encode_fn: Callable[[torch.Tensor], torch.Tensor],
                  out_dir: Union[str, "os.PathLike[str]"], *, shard_size: int = 256,
                  dtype: Optional[torch.dtype] = None, overwrite: bool = False, progress: bool = True,
                  key: Optional[dict] = None) -> Path:
    """Encode every item of ``dataset`` once and store the latents in safetensors shards.

    dataset:    a map-style dataset of ``{"video": (3, T, H, W) float in [-1, 1], "caption": str, "path": str}``
                items (e.g. :class:`~sora_fast.data.VideoFolder`; its ``load`` is used, so a broken file is
                skipped and counted instead of replaced by another item).
    encode_fn:  ``(3, T, H, W) -> (C, T', H', W')`` latent (e.g. a VAE's encode with a batch dim added and
                removed), run under ``torch.no_grad()``; any device, the result is moved to CPU.
    out_dir:    cache folder, created if needed; holding a cache already is a FileExistsError unless
                ``overwrite`` (then the new shards and index replace it, stale shards are removed).
    shard_size: items per shard. dtype: storage dtype of the latents (None keeps encode_fn's).
    key:        the cache's key (:func:`cache_key`), stored in the index for :func:`ensure_latent_cache`.
    returns: ``out_dir`` as a Path. Raises OSError naming ``out_dir`` when it cannot be written (checked first),
    ValueError when ``encode_fn`` returns something that is not a finite 4-D tensor.
    """
    st = _import_safetensors()
    if isinstance(shard_size, bool) or not isinstance(shard_size, int) or shard_size < 1:
        raise ValueError(f"shard_size must be a positive int, got {shard_size!r}")
    if dtype is not None and not isinstance(dtype, torch.dtype):
        raise TypeError(f"dtype must be a torch.dtype or None, got {dtype!r}")
    if not callable(encode_fn):
        raise TypeError(f"encode_fn must be callable (video -> latent), got {type(encode_fn).__name__}")
    if key is not None and not isinstance(key, dict):
        raise TypeError(f"key must be a dict (cache_key(...)) or None, got {type(key).__name__}")
    cache_key_ = key
    n = len(dataset)
    if n == 0:
        raise ValueError("dataset is empty; there is nothing to cache")
    out = Path(os.fspath(out_dir)).expanduser()
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise OSError(f"out_dir={str(out)!r} cannot be created: {e}") from e
    if not os.access(out, os.W_OK | os.X_OK):
        raise PermissionError(f"out_dir={str(out)!r} is not writable")
    if (out / INDEX_NAME).exists() and not overwrite:
        raise FileExistsError(f"out_dir={str(out)!r} already holds a latent cache ({INDEX_NAME}); pass overwrite=True"
                              " to replace it")

    t0 = time.perf_counter()
    shards: list[dict] = []
    skipped: list[Skipped] = []
    buf: dict[str, torch.Tensor] = {}
    rows: list[dict] = []

    def flush():
        name = _SHARD_FMT.format(len(shards))
        with _AtomicFile(out / name) as tmp:
            st.save_file(buf, tmp, metadata={"format": _FORMAT})
        shards.append({"file": name, "bytes": (out / name).stat().st_size, "sha256": _sha256(out / name),
                       "items": list(rows)})
        buf.clear()
        rows.clear()

    for i in _progress(range(n), total=n, desc="caching latents", enable=progress):
        try:
            item = _get_item(dataset, i)
        except UnreadableFileError as e:
            path = getattr(dataset, "paths", [None] * n)[i]
            skipped.append(Skipped(str(path) if path is not None else f"item {i}", str(e)))
            continue
        video = item["video"]
        if not isinstance(video, torch.Tensor) or video.dim() != 4 or video.shape[0] != 3:
            raise ValueError(f"dataset[{i}]['video'] must be a (3, T, H, W) tensor, got "
                             f"{tuple(video.shape) if isinstance(video, torch.Tensor) else type(video).__name__}")
        with torch.no_grad():
            z = encode_fn(video)
        if not isinstance(z, torch.Tensor) or z.dim() != 4:
            got = tuple(z.shape) if isinstance(z, torch.Tensor) else type(z).__name__
            raise ValueError(f"encode_fn must return a (C, T', H', W') tensor, got {got} for item {i}"
                             f" (video {tuple(video.shape)})")
        if z.is_floating_point() and not torch.isfinite(z).all():
            raise ValueError(f"encode_fn returned non-finite values for item {i} ({item.get('path', '')})")
        z = z.detach().to("cpu", dtype=dtype or z.dtype).contiguous()
        key = f"{i:06d}"
        buf[key] = z
        rows.append({"key": key, "caption": str(item.get("caption", "")), "path": str(item.get("path", "")),
                     "shape": list(z.shape), "dtype": str(z.dtype).replace("torch.", ""),
                     "video_shape": list(video.shape)})
        if len(buf) == shard_size:
            flush()
    if buf:
        flush()
    if not shards:
        raise ValueError(f"no item of the dataset could be read ({len(skipped)} skipped: "
                         f"{skipped[0].reason if skipped else ''}); nothing was cached in {str(out)!r}")
    index = {"format": _FORMAT, "version": _VERSION, "num_items": sum(len(s["items"]) for s in shards),
             "shards": shards, "skipped": [list(s) for s in skipped],
             "key": cache_key_}
    with _AtomicFile(out / INDEX_NAME) as tmp:
        tmp.write_text(json.dumps(index, indent=1), encoding="utf-8")
    keep = {s["file"] for s in shards}
    for stale in out.glob("shard-*.safetensors"):
        if stale.name not in keep:
            stale.unlink()
    if progress:
        size = sum(s["bytes"] for s in shards)
        print(f"cache_latents: {index['num_items']} latents in {len(shards)} shard(s) ({size / 2**20:.1f} MiB) at {out}"
              f" in {time.perf_counter() - t0:.1f}s; skipped {len(skipped)} unreadable item(s)", file=sys.stderr)
    return out


class _Item(NamedTuple):
    shard: Path
    key: str
    caption: str
    path: str
    shape: tuple[int, ...]


def _read_header(path: Path) -> dict:
    """The JSON header of a safetensors file, after checking the data it describes fits in the file."""
    size = path.stat().st_size
    with open(path, "rb") as f:
        head = f.read(8)
        if len(head) < 8:
            raise ValueError(f"{size} bytes, too short for a safetensors header")
        (n,) = struct.unpack("<Q", head)
        if n > size - 8:
            raise ValueError(f"header length {n} exceeds the file ({size} bytes)")
        header = json.loads(f.read(n))
    end = max((v["data_offsets"][1] for k, v in header.items() if k != "__metadata__"), default=0)
    if 8 + n + end > size:
        raise ValueError(f"truncated: tensors need {8 + n + end} bytes, the file has {size}")
    return header


class LatentDataset(Dataset):
    """Latents written by :func:`cache_latents`.

    out_dir:  the cache folder (FileNotFoundError naming it when it holds no index).
    verify:   also check every shard's sha256 against the index at construction (reads every byte once;
              catches silent corruption inside tensor data). Size, header, keys and shapes are always checked.
    progress: progress bar while checking, and a summary line on stderr.

    Items: ``{"latent": (C, T', H', W') tensor as stored, "caption": str, "path": str (source video), "index": int}``.
    :attr:`shapes` lists every latent shape (for :func:`sora_fast.packing.plan_batches`), :attr:`skipped` the
    shards left out. A shard that fails to load later is skipped the same way and the next item returned.
    """

    def __init__(self, out_dir: Union[str, "os.PathLike[str]"], *, verify: bool = True, progress: bool = False):
        self.root = Path(os.fspath(out_dir)).expanduser()
        index_path = self.root / INDEX_NAME
        if not index_path.is_file():
            raise FileNotFoundError(f"out_dir {str(self.root)!r} holds no latent cache ({INDEX_NAME} not found);"
                                    " write one with cache_latents(...)")
        try:
            index = json.loads(index_path.read_text(encoding="utf-8"))
        except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
            raise ValueError(f"{str(index_path)!r} is not a readable latent-cache index: {e}") from e
        if not isinstance(index, dict) or index.get("format") != _FORMAT or index.get("version") != _VERSION:
            got = (index.get("format"), index.get("version")) if isinstance(index, dict) else type(index).__name__
            raise ValueError(f"{str(index_path)!r} must be a {_FORMAT} index of version {_VERSION}, got {got}")
        self.skipped: list[Skipped] = []
        # items that could not be read when the cache was written
        self.encode_skipped = [Skipped(*s) for s in index.get("skipped", [])]
        self.items: list[_Item] = []
        self._broken: set[int] = set()
        shards = index["shards"]
        for s in _progress(shards, total=len(shards), desc="checking latent shards", enable=progress):
            path = self.root / s["file"]
            try:
                self._check_shard(path, s, verify)
            except Exception as e:
                self.skipped.append(Skipped(str(path), f"corrupted shard ({len(s['items'])} items lost): {e}"))
                continue
            self.items += [_Item(path, r["key"], r["caption"], r["path"], tuple(r["shape"])) for r in s["items"]]
        if not self.items:
            raise ValueError(f"no readable shard in the latent cache {str(self.root)!r}: all {len(shards)} failed"
                             f" ({self.skipped[0].reason if self.skipped else 'the index lists none'})")
        if progress:
            print(self.summary(), file=sys.stderr)

    @staticmethod
    def _check_shard(path: Path, s: dict, verify: bool) -> None:
        if not path.is_file():
            raise FileNotFoundError("missing file")
        size = path.stat().st_size
        if size != s["bytes"]:
            raise ValueError(f"{size} bytes, the index says {s['bytes']}")
        header = _read_header(path)
        for r in s["items"]:
            h = header.get(r["key"])
            if h is None or list(h["shape"]) != list(r["shape"]):
                got = None if h is None else h["shape"]
                raise ValueError(f"tensor {r['key']!r} has shape {got}, the index says {r['shape']}")
        if verify and _sha256(path) != s["sha256"]:
            raise ValueError("sha256 differs from the index")

    def __len__(self) -> int:
        return len(self.items)

    def load(self, index: int) -> dict:
        """Item ``index`` without fallback; raises :class:`UnreadableFileError` when its shard fails."""
        it = self.items[index]
        st = _import_safetensors()
        try:
            with st.safe_open(str(it.shard), framework="pt") as f:
                z = f.get_tensor(it.key)
        except Exception as e:
            raise UnreadableFileError(f"corrupted shard: {type(e).__name__}: {e}") from e
        return {"latent": z, "caption": it.caption, "path": it.path, "index": index}

    def __getitem__(self, index: int) -> dict:
        return first_readable(self, index, len(self.items), lambda j: f"{self.items[j].shard}:{self.items[j].key}",
                              f"every item of the latent cache {str(self.root)!r} failed to load")

    @property
    def shapes(self) -> list[tuple[int, ...]]:
        """``(C, T', H', W')`` of every latent, from the index."""
        return [it.shape for it in self.items]

    @property
    def captions(self) -> list[str]:
        return [it.caption for it in self.items]

    def summary(self) -> str:
        n_shards = len({it.shard for it in self.items})
        return (f"LatentDataset {self.root}: {len(self.items) - len(self._broken)} latents in {n_shards} shard(s);"
                f" skipped {len(self.skipped)}")
