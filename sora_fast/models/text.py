"""Text encoders behind one interface: prompts in, packed text out (``PackedSequences``).

Every encoder has ``dim`` (the feature size the DiT's ``text_dim`` must equal) and
``encode(prompts) -> PackedSequences`` with ``tokens (L_total, dim)`` and ``cu_seqlens (B+1,)``: the
captions back to back without padding, ready for varlen cross-attention.

- :class:`TinyTextEncoder`: a small trainable transformer over hashed words. Needs no download and no
  tokenizer files; the default for demos and tests. Every prompt ends with an end token, so the empty
  prompt (the unconditional branch of classifier-free guidance) is one learned token, not nothing.
- :class:`T5TextEncoder`: a transformers T5 / umT5 encoder loaded from a local directory (Wan2.1 uses
  umT5-XXL). Only the real tokens of each prompt are packed; ``pad_to=512`` appends zero rows to each
  caption as diffusers' Wan pipeline does, for outputs identical to it.
"""
from __future__ import annotations

import os
import re
import zlib
from dataclasses import dataclass
from typing import Optional, Sequence

import torch
from torch import nn

from ..ops import spacetime_attention
from ..packing import PackedSequences, pack_sequences
from .activations import GELUTanh

__all__ = ["TextEncoder", "TinyTextConfig", "TinyTextEncoder", "T5TextEncoder", "load_text_encoder"]


def _check_prompts(prompts) -> list[str]:
    if isinstance(prompts, str):
        raise TypeError("prompts must be a list of strings, got a single str (wrap it in a list)")
    if not isinstance(prompts, Sequence) or len(prompts) == 0:
        raise TypeError(f"prompts must be a non-empty list of strings, got {type(prompts).__name__} "
                        f"of length {len(prompts) if isinstance(prompts, Sequence) else 'n/a'}")
    for i, p in enumerate(prompts):
        if not isinstance(p, str):
            raise TypeError(f"prompts[{i}] must be a str, got {type(p).__name__}")
    return list(prompts)


class TextEncoder(nn.Module):
    """Interface: ``dim`` and ``encode(prompts: list[str]) -> PackedSequences`` (tokens ``(L_total, dim)``)."""

    dim: int

    def encode(self, prompts: Sequence[str]) -> PackedSequences:  # pragma: no cover - interface
        raise NotImplementedError

    def forward(self, prompts: Sequence[str]) -> PackedSequences:
        return self.encode(prompts)


# --- tiny trainable encoder ----------------------------------------------------------------------
@dataclass
class TinyTextConfig:
    """Sizes of :class:`TinyTextEncoder`. Words are hashed (crc32, stable across runs) into ``vocab_size``
    buckets, so no vocabulary file is needed; collisions are rare for a demo's few hundred words."""

    dim: int = 64
    layers: int = 2
    heads: int = 2
    vocab_size: int = 4096
    max_words: int = 64

    def __post_init__(self):
        for name in ("dim", "layers", "heads", "vocab_size", "max_words"):
            v = getattr(self, name)
            if not isinstance(v, int) or isinstance(v, bool) or v < 1:
                raise ValueError(f"TinyTextConfig.{name} must be a positive int, got {v!r}")
        if self.dim % self.heads or (self.dim // self.heads) % 2:
            raise ValueError(f"TinyTextConfig.dim={self.dim} must split into heads={self.heads} heads of an even "
                             "size")


_WORD = re.compile(r"[a-z0-9]+")
_END, _UNK = 0, 1  # reserved ids; words hash into [2, vocab_size)


class _Block(nn.Module):
    def __init__(self, dim: int, heads: int):
        super().__init__()
        self.heads = heads
        self.norm1, self.norm2 = nn.LayerNorm(dim), nn.LayerNorm(dim)
        self.qkv, self.out = nn.Linear(dim, 3 * dim), nn.Linear(dim, dim)
        self.mlp = nn.Sequential(nn.Linear(dim, 4 * dim), GELUTanh(), nn.Linear(4 * dim, dim))

    def forward(self, x: torch.Tensor, cu: torch.Tensor, max_len: int) -> torch.Tensor:
        n, d = x.shape
        q, k, v = self.qkv(self.norm1(x)).view(n, 3, self.heads, d // self.heads).unbind(1)  # (N, H, Dh) each
        x = x + self.out(spacetime_attention(q, k, v, cu, max_seqlen_q=max_len).reshape(n, d))
        return x + self.mlp(self.norm2(x))                                                   # (N, D)


class TinyTextEncoder(TextEncoder):
    """A small pre-LN transformer over hashed words, attention packed per prompt (no padding).

    ``encode(prompts)`` lower-cases each prompt, keeps ``[a-z0-9]+`` words (at most ``max_words``),
    appends an end token and returns :class:`PackedSequences` with ``tokens (sum(L_i), dim)`` in the
    parameters' dtype and device; ``L_i = words_i + 1``.
    """

    def __init__(self, config: Optional[TinyTextConfig] = None, **overrides):
        super().__init__()
        if config is not None and overrides:
            raise TypeError("pass either a TinyTextConfig or keyword overrides, not both")
        if config is not None and not isinstance(config, TinyTextConfig):
            raise TypeError(f"config must be a TinyTextConfig, got {type(config).__name__}")
        self.config = config = config if config is not None else TinyTextConfig(**overrides)
        self.dim = config.dim
        self.embed = nn.Embedding(config.vocab_size, config.dim)
        self.pos = nn.Embedding(config.max_words + 1, config.dim)
        self.blocks = nn.ModuleList(_Block(config.dim, config.heads) for _ in range(config.layers))
        self.norm = nn.LayerNorm(config.dim)
        nn.init.normal_(self.embed.weight, std=0.5)
        nn.init.normal_(self.pos.weight, std=0.1)

    def token_ids(self, prompt: str) -> list[int]:
        """Word ids of one prompt, end token included."""
        words = _WORD.findall(prompt.lower())[: self.config.max_words]
        span = self.config.vocab_size - 2
        return [2 + zlib.crc32(w.encode()) % span if span > 0 else _UNK for w in words] + [_END]

    def encode(self, prompts: Sequence[str]) -> PackedSequences:
        prompts = _check_prompts(prompts)
        dev = self.embed.weight.device
        ids = [torch.tensor(self.token_ids(p), dtype=torch.long, device=dev) for p in prompts]
        pos = torch.cat([torch.arange(len(i), device=dev) for i in ids])
        x = self.embed(torch.cat(ids)) + self.pos(pos)                       # (L_total, D)
        packed = pack_sequences([x.new_empty(len(i), 0) for i in ids])        # metadata only
        for blk in self.blocks:
            x = blk(x, packed.cu_seqlens, packed.max_seqlen)
        return packed.with_tokens(self.norm(x))


# --- T5 / umT5 from a local directory ---------------------------------------------------------------
_TOKENIZER_FILES = ("tokenizer.json", "spiece.model", "tokenizer_config.json")


def _first_line(e: BaseException) -> str:
    return (str(e).strip().splitlines() or [""])[0]


class T5TextEncoder(TextEncoder):
    """A transformers T5 or umT5 encoder read from ``path`` (a directory holding the tokenizer and the
    encoder weights, e.g. a Wan2.1 diffusers checkout's ``text_encoder`` + ``tokenizer``); nothing is
    downloaded. Frozen (``requires_grad_(False)``, eval mode).

    Args:
        path: the model directory; ``tokenizer_path`` if the tokenizer lives elsewhere.
        max_length: prompts are truncated to this many tokens (Wan: 512).
        pad_to: None packs only each prompt's real tokens; an int appends zero rows up to that length
            (``pad_to=max_length`` reproduces diffusers' Wan pipeline exactly).
    """

    def __init__(self, path: str, *, tokenizer_path: Optional[str] = None, max_length: int = 512,
                 pad_to: Optional[int] = None, dtype: torch.dtype = torch.float32, device=None):
        super().__init__()
        for name, p in (("path", path), ("tokenizer_path", tokenizer_path or path)):
            if not isinstance(p, (str, os.PathLike)) or not os.path.isdir(p):
                raise ValueError(f"{name} must be an existing directory with a saved T5/umT5 "
                                 f"{'tokenizer' if name == 'tokenizer_path' else 'encoder'}, got {p!r}")
        if not isinstance(max_length, int) or max_length < 1:
            raise ValueError(f"max_length must be a positive int, got {max_length!r}")
        if pad_to is not None and (not isinstance(pad_to, int) or pad_to < max_length):
            raise ValueError(f"pad_to must be None or an int >= max_length={max_length}, got {pad_to!r}")
        try:
            import transformers
        except ImportError as e:  # pragma: no cover - depends on the environment
            raise ImportError("T5TextEncoder needs transformers: pip install transformers") from e
        tok_dir = tokenizer_path or path
        if not any(os.path.isfile(os.path.join(tok_dir, f)) for f in _TOKENIZER_FILES):
            raise ValueError(f"{os.fspath(tok_dir)!r} is not a tokenizer directory: expected one of "
                             f"{', '.join(_TOKENIZER_FILES)} (as written by a tokenizer's save_pretrained)")
        if not os.path.isfile(os.path.join(path, "config.json")):
            raise ValueError(f"{os.fspath(path)!r} is not a T5/umT5 encoder directory: expected config.json and the "
                             "weights (as written by the model's save_pretrained)")
        try:
            self.tokenizer = transformers.AutoTokenizer.from_pretrained(tok_dir, local_files_only=True)
        except Exception as e:  # transformers raises OSError, ValueError, TypeError, ... for a broken directory
            raise ValueError(f"{os.fspath(tok_dir)!r} holds no readable T5/umT5 tokenizer ({type(e).__name__}: "
                             f"{_first_line(e)})") from e
        try:
            model_cfg = transformers.AutoConfig.from_pretrained(path, local_files_only=True)
            cls = transformers.UMT5EncoderModel if model_cfg.model_type == "umt5" else transformers.T5EncoderModel
            model = cls.from_pretrained(path, local_files_only=True, torch_dtype=dtype)
        except Exception as e:  # a broken config.json, truncated weights (SafetensorError), missing files, ...
            raise ValueError(f"{os.fspath(path)!r} holds no readable T5/umT5 encoder ({type(e).__name__}: "
                             f"{_first_line(e)}): expected config.json and its weights") from e
        self.model = model.eval().requires_grad_(False)
        if device is not None:
            self.model.to(device)
        self.dim, self.max_length, self.pad_to = self.model.config.d_model, max_length, pad_to
        self.path, self.tokenizer_path = os.fspath(path), None if tokenizer_path is None else os.fspath(tokenizer_path)

    @classmethod
    def from_model(cls, model, tokenizer, *, max_length: int = 512, pad_to: Optional[int] = None) -> "T5TextEncoder":
        """Wrap a transformers T5 / umT5 encoder and its tokenizer already in memory (e.g. a diffusers
        pipeline's ``text_encoder`` and ``tokenizer``): no copy, frozen. ``path`` is None, so
        :meth:`sora_fast.pipeline.VideoPipeline.save` writes the encoder next to the other weights."""
        kind = getattr(getattr(model, "config", None), "model_type", None)
        if kind not in ("t5", "umt5"):
            raise TypeError(f"model must be a transformers T5EncoderModel or UMT5EncoderModel, got "
                            f"{type(model).__name__} (model_type {kind!r})")
        if not callable(tokenizer):
            raise TypeError(f"tokenizer must be a transformers tokenizer, got {type(tokenizer).__name__}")
        self = cls.__new__(cls)
        TextEncoder.__init__(self)
        self.tokenizer, self.model = tokenizer, model.eval().requires_grad_(False)
        self.dim, self.max_length, self.pad_to = model.config.d_model, max_length, pad_to
        self.path = self.tokenizer_path = None
        return self

    @torch.no_grad()
    def encode(self, prompts: Sequence[str]) -> PackedSequences:
        prompts = _check_prompts(prompts)
        dev = next(self.model.parameters()).device
        batch = self.tokenizer(prompts, padding="max_length", max_length=self.max_length, truncation=True,
                               add_special_tokens=True, return_attention_mask=True, return_tensors="pt")
        ids, mask = batch.input_ids.to(dev), batch.attention_mask.to(dev)
        hidden = self.model(ids, mask).last_hidden_state                      # (B, max_length, dim)
        lengths = mask.sum(dim=1).tolist()
        seqs = [h[:n] for h, n in zip(hidden, lengths)]
        if self.pad_to is not None:
            seqs = [torch.cat([s, s.new_zeros(self.pad_to - s.shape[0], s.shape[1])]) for s in seqs]
        return pack_sequences(seqs)


def load_text_encoder(name_or_path: str = "tiny", **kwargs) -> TextEncoder:
    """``"tiny"`` → a fresh :class:`TinyTextEncoder` (kwargs: :class:`TinyTextConfig` fields); a directory →
    :class:`T5TextEncoder` (kwargs: its options)."""
    if name_or_path == "tiny":
        return TinyTextEncoder(TinyTextConfig(**kwargs))
    if isinstance(name_or_path, (str, os.PathLike)) and os.path.isdir(name_or_path):
        return T5TextEncoder(name_or_path, **kwargs)
    raise ValueError(f"text encoder must be 'tiny' or a directory with a saved T5/umT5 model, got {name_or_path!r}")
