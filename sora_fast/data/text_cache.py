"""Text embeddings cached like latents: a frozen encoder (an 11 GB umT5) runs once per caption, not once per step.

``ensure_text_cache(encoder, captions, out / "text")`` encodes the captions the cache lacks (in batches), writes
them as a new safetensors shard (the real tokens of each caption only; ``pad_to`` zero rows are added back on
lookup) and records every caption's shard in ``index.json`` with the encoder's key. A cache of another encoder
(another key) is rebuilt; new captions are appended. :class:`CachedTextEncoder` answers ``encode(prompts)`` from
the cache (tensors read from the memory-mapped shards when asked), so the encoder itself can leave memory
(:func:`release_text_encoder`).
"""
from __future__ import annotations

import hashlib
import json
import os
import shutil
import sys
from pathlib import Path
from typing import Optional, Sequence, Union

import torch

from .._files import read_json
from ..models.text import T5TextEncoder, TextEncoder
from ..packing import PackedSequences, pack_sequences

__all__ = ["text_encoder_key", "ensure_text_cache", "CachedTextEncoder", "release_text_encoder"]

INDEX = "index.json"
FORMAT = "sora_fast.text"


def _caption_key(caption: str) -> str:
    return hashlib.sha256(caption.encode("utf-8")).hexdigest()


def text_encoder_key(encoder: TextEncoder) -> str:
    """What a cached embedding depends on. A T5 read from a directory: its class, path, token settings and the
    names, sizes and modification times of its files (hashing 11 GB of weights would cost what the cache
    saves); any other encoder: :func:`~sora_fast.data.module_key` of its config and weights."""
    if isinstance(encoder, T5TextEncoder) and encoder.path is not None:
        files = []
        for root in (encoder.path, encoder.tokenizer_path or encoder.path):
            for f in sorted(Path(root).rglob("*")):
                if f.is_file():
                    st = f.stat()
                    files.append([str(f), st.st_size, st.st_mtime_ns])
        desc = {"class": "T5TextEncoder", "max_length": encoder.max_length, "dtype": str(encoder.model.dtype),
                "files": files}
        return hashlib.sha256(json.dumps(desc, sort_keys=True).encode("utf-8")).hexdigest()
    from .latents import module_key

    return module_key(encoder)


def _read_index(out: Path) -> Optional[dict]:
    if not (out / INDEX).is_file():
        return None
    index = read_json(out / INDEX, "a text-embedding cache index (format, encoder, dim, captions)")
    if not (isinstance(index, dict) and index.get("format") == FORMAT and isinstance(index.get("captions"), dict)):
        raise ValueError(f"{str(out / INDEX)!r} is not a {FORMAT} index: expected format, encoder, dim, captions")
    return index


def ensure_text_cache(encoder: TextEncoder, captions: Sequence[str], out_dir: Union[str, os.PathLike], *,
                      batch_size: int = 16, progress: bool = True) -> tuple[Path, int]:
    """The cache of ``captions`` (the empty caption, CFG's and caption dropout's, is always added) under
    ``out_dir``, encoded by ``encoder``. Returns ``(out_dir, how many captions were encoded now)``."""
    from safetensors.torch import save_file

    out = Path(os.fspath(out_dir))
    key = text_encoder_key(encoder)
    index = _read_index(out)
    if index is not None and index.get("encoder") != key:
        print(f"text cache {out} was made by another text encoder; re-encoding it", file=sys.stderr)
        shutil.rmtree(out)
        index = None
    if index is None:
        index = {"format": FORMAT, "encoder": key, "dim": encoder.dim, "captions": {}}
    wanted = list(dict.fromkeys([*captions, ""]))
    todo = [c for c in wanted if _caption_key(c) not in index["captions"]]
    if todo:
        out.mkdir(parents=True, exist_ok=True)
        tensors = {}
        with torch.no_grad():
            for i in range(0, len(todo), batch_size):
                batch = todo[i:i + batch_size]
                packed = _encode_real(encoder, batch)
                for c, t in zip(batch, packed):
                    tensors[_caption_key(c)] = t.detach().to("cpu").contiguous()
        shard = f"text_{len({v for v in index['captions'].values()}):05d}.safetensors"
        tmp = out / f".{shard}.tmp"
        save_file(tensors, str(tmp))
        os.replace(tmp, out / shard)
        index["captions"].update({k: shard for k in tensors})
        tmp = out / f".{INDEX}.tmp"
        tmp.write_text(json.dumps(index))
        os.replace(tmp, out / INDEX)            # the index names the shard only once the shard is complete
    if progress:
        print(f"text cache {out}: {len(wanted)} captions, {len(todo)} encoded now", file=sys.stderr)
    return out, len(todo)


def _encode_real(encoder: TextEncoder, prompts: list[str]) -> list[torch.Tensor]:
    """Each prompt's rows without the ``pad_to`` zero rows (added back on lookup)."""
    pad_to = getattr(encoder, "pad_to", None)
    if pad_to is not None:
        encoder.pad_to = None
    try:
        packed = encoder.encode(prompts)
    finally:
        if pad_to is not None:
            encoder.pad_to = pad_to
    return packed.unpack(packed.tokens)


class CachedTextEncoder(TextEncoder):
    """A :class:`TextEncoder` that answers from a cache written by :func:`ensure_text_cache` (no parameters).

    ``pad_to`` appends zero rows to each caption as the encoder did. A prompt that is not cached raises a
    KeyError naming it (add it to the captions the cache is built from)."""

    def __init__(self, out_dir: Union[str, os.PathLike], *, pad_to: Optional[int] = None, device=None):
        super().__init__()
        from safetensors import safe_open

        self.dir = Path(os.fspath(out_dir))
        index = _read_index(self.dir)
        if index is None:
            raise FileNotFoundError(f"{str(self.dir)!r} holds no text cache: {INDEX} is missing")
        self.dim, self.pad_to, self.device = int(index["dim"]), pad_to, device
        self._where = index["captions"]
        self._files = {f: safe_open(str(self.dir / f), framework="pt") for f in set(self._where.values())}

    def encode(self, prompts: Sequence[str]) -> PackedSequences:
        seqs = []
        for p in prompts:
            k = _caption_key(p)
            if k not in self._where:
                raise KeyError(f"prompt {p[:80]!r} is not in the text cache {str(self.dir)!r}; it holds the "
                               f"{len(self._where)} captions it was built from")
            t = self._files[self._where[k]].get_tensor(k)
            if self.pad_to is not None and t.shape[0] < self.pad_to:
                t = torch.cat([t, t.new_zeros(self.pad_to - t.shape[0], t.shape[1])])
            seqs.append(t if self.device is None else t.to(self.device))
        return pack_sequences(seqs)


def release_text_encoder(encoder: TextEncoder) -> None:
    """Free a frozen T5's weights (its description, path and settings stay, so a pipeline holding it still
    saves): they move to the meta device."""
    if isinstance(encoder, T5TextEncoder):
        encoder.model.to("meta")
        if torch.cuda.is_available():
            torch.cuda.empty_cache()
