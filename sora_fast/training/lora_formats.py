"""A VideoDiT's LoRA adapters in the layouts other tools read, and back: diffusers' and ComfyUI's.

One table maps every adaptable linear of :class:`~sora_fast.models.dit.VideoDiT` to its diffusers
``WanTransformer3DModel`` name and its original Wan name; both converters read it, in both directions.

- **diffusers** (``pytorch_lora_weights.safetensors``, what ``WanPipeline.load_lora_weights(dir)`` reads):
  ``transformer.<diffusers name>.lora_A.weight`` ``(r, in)`` / ``.lora_B.weight`` ``(out, r)``. diffusers applies
  such a file with scaling 1 (alpha = rank), so ``alpha / rank`` is folded into ``lora_B`` when writing.
- **ComfyUI** (``comfyui.safetensors``, its generic LoRA format for Wan): ``diffusion_model.<original Wan
  name>.lora_down.weight`` ``(r, in)``, ``.lora_up.weight`` ``(out, r)`` and ``.alpha`` (0-d); the loader scales
  by ``alpha / r``. diffusers' own converter for this layout reads it too.

The output projection's rows are in sora_fast's feature order ``(C, pt, ph, pw)``; Wan's and diffusers' are
``(pt, ph, pw, C)``, so its ``lora_B`` rows are permuted on the way out and back (as the weight converter does).
"""
from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Mapping, Union

import torch
from torch import nn

from .._files import atomic_dir, file_records, load_safetensors
from .lora import LoRALinear, apply_lora, load_lora, lora_state_dict

__all__ = ["FORMATS", "DIFFUSERS_FILE", "COMFYUI_FILE", "export_lora", "import_lora", "save_lora_files",
           "load_lora_file", "module_name", "EXPERT_DIRS", "save_expert_lora_files", "load_expert_lora_files"]

FORMATS = ("sora_fast", "diffusers", "comfyui")
DIFFUSERS_FILE, COMFYUI_FILE, RECORD = "pytorch_lora_weights.safetensors", "comfyui.safetensors", "lora.json"
# Wan 2.2 A14B: one directory per expert, each in the one-DiT layout (diffusers loads the second with
# ``load_lora_weights(dir, load_into_transformer_2=True)``), highest noise first
EXPERT_DIRS = ("high_noise", "low_noise")
_PREFIX = {"diffusers": "transformer.", "comfyui": "diffusion_model."}

# sora_fast module -> (diffusers module, original Wan module); ``{i}`` is a block index
_BLOCK = {
    "attn1.to_q": ("attn1.to_q", "self_attn.q"), "attn1.to_k": ("attn1.to_k", "self_attn.k"),
    "attn1.to_v": ("attn1.to_v", "self_attn.v"), "attn1.to_out": ("attn1.to_out.0", "self_attn.o"),
    "attn2.to_q": ("attn2.to_q", "cross_attn.q"), "attn2.to_k": ("attn2.to_k", "cross_attn.k"),
    "attn2.to_v": ("attn2.to_v", "cross_attn.v"), "attn2.to_out": ("attn2.to_out.0", "cross_attn.o"),
    "ffn.0": ("ffn.net.0.proj", "ffn.0"), "ffn.2": ("ffn.net.2", "ffn.2"),
}
_TOP = {
    "time_embed.0": ("condition_embedder.time_embedder.linear_1", "time_embedding.0"),
    "time_embed.2": ("condition_embedder.time_embedder.linear_2", "time_embedding.2"),
    "time_proj": ("condition_embedder.time_proj", "time_projection.1"),
    "text_embed.0": ("condition_embedder.text_embedder.linear_1", "text_embedding.0"),
    "text_embed.2": ("condition_embedder.text_embedder.linear_2", "text_embedding.2"),
    "proj_out": ("proj_out", "head.head"),
}
_COLUMN = {"sora_fast": None, "diffusers": 0, "comfyui": 1}
_BLOCK_RE = re.compile(r"blocks\.(\d+)\.(.+)")


def module_name(name: str, src: str, dst: str) -> str:
    """A module's name in format ``dst`` from its name in format ``src`` (both of :data:`FORMATS`), prefixes
    excluded; KeyError naming the module when the table has no such module (another model's adapter)."""
    def column(table, key_fmt, fmt):
        return {(k if _COLUMN[key_fmt] is None else v[_COLUMN[key_fmt]]):
                (k if _COLUMN[fmt] is None else v[_COLUMN[fmt]]) for k, v in table.items()}

    if src not in FORMATS or dst not in FORMATS:
        raise ValueError(f"formats must be among {FORMATS}, got {src!r} -> {dst!r}")
    m = _BLOCK_RE.fullmatch(name)
    if m:
        sub = column(_BLOCK, src, dst).get(m.group(2))
        if sub is not None:
            return f"blocks.{m.group(1)}.{sub}"
    elif name in column(_TOP, src, dst):
        return column(_TOP, src, dst)[name]
    if name == "patch_embed":
        raise KeyError("'patch_embed' is a Conv3d in diffusers and Wan: its LoRA cannot be written in their layouts "
                       "(leave it out of the LoRA targets)")
    raise KeyError(f"{name!r} is not a {src} name of a Wan text-to-video DiT linear layer (an adapter of another "
                   f"model, or of a layer sora_fast's VideoDiT does not have)")


def _permute_rows(b: torch.Tensor, p: int, c: int, to_theirs: bool) -> torch.Tensor:
    """``proj_out``'s ``lora_B`` rows between sora_fast's ``(C, p)`` order and Wan's ``(p, C)``."""
    first, second = (c, p) if to_theirs else (p, c)
    return b.reshape(first, second, -1).transpose(0, 1).reshape(b.shape)


def _split(sd: Mapping[str, torch.Tensor]) -> dict[str, dict]:
    """``{module: {"A": (r, in), "B": (out, r), "alpha": float | None}}`` from sora_fast adapter keys."""
    mods: dict[str, dict] = {}
    for k, v in sd.items():
        for suffix, part in ((".lora_A.weight", "A"), (".lora_B.weight", "B"), (".lora_alpha", "alpha")):
            if k.endswith(suffix):
                mods.setdefault(k[: -len(suffix)], {})[part] = v
                break
    return mods


def export_lora(adapters: Mapping[str, torch.Tensor], fmt: str, config) -> dict[str, torch.Tensor]:
    """sora_fast adapters (:func:`~sora_fast.training.lora.lora_state_dict`) -> the tensors of format ``fmt``
    (``"diffusers"`` or ``"comfyui"``) for a DiT of ``config`` (:class:`~sora_fast.models.dit.DiTConfig`)."""
    if fmt not in ("diffusers", "comfyui"):
        raise ValueError(f"fmt must be 'diffusers' or 'comfyui', got {fmt!r}")
    out = {}
    for name, m in _split(adapters).items():
        a, b = m["A"].detach(), m["B"].detach()
        alpha = float(m["alpha"]) if "alpha" in m else float(a.shape[0])
        if name == "proj_out":
            b = _permute_rows(b, config.patch_volume, config.out_channels, to_theirs=True)
        key = _PREFIX[fmt] + module_name(name, "sora_fast", fmt)
        if fmt == "diffusers":   # diffusers scales by 1: alpha / rank goes into lora_B
            out[f"{key}.lora_A.weight"] = a.contiguous()
            out[f"{key}.lora_B.weight"] = (b.float() * (alpha / a.shape[0])).to(b.dtype).contiguous()
        else:
            out[f"{key}.lora_down.weight"] = a.contiguous()
            out[f"{key}.lora_up.weight"] = b.contiguous()
            out[f"{key}.alpha"] = torch.tensor(alpha, dtype=torch.float32)
    return out


def _detect(sd: Mapping[str, torch.Tensor]) -> str:
    keys = list(sd)
    if any(k.startswith(_PREFIX["diffusers"]) for k in keys):
        return "diffusers"
    if any(k.startswith(_PREFIX["comfyui"]) for k in keys):
        return "comfyui"
    if any(k.endswith(".lora_alpha") for k in keys):
        return "sora_fast"
    raise ValueError(f"not a Wan LoRA this version reads: expected keys starting with 'transformer.' (diffusers), "
                     f"'diffusion_model.' (ComfyUI / original Wan) or sora_fast adapter keys (.lora_A.weight, "
                     f".lora_B.weight, .lora_alpha); found e.g. {keys[:3]}")


def import_lora(sd: Mapping[str, torch.Tensor], config) -> tuple[dict[str, torch.Tensor], str]:
    """A LoRA state dict in any of :data:`FORMATS` -> ``(sora_fast adapters, the format it was in)`` for a DiT of
    ``config``. Keys that are not adapters of a Wan DiT linear (bias deltas ``diff_b``, image-conditioning layers,
    other models' layers) raise ValueError naming them."""
    fmt = _detect(sd)
    if fmt == "sora_fast":
        return dict(sd), fmt
    prefix = _PREFIX[fmt]
    parts = {"diffusers": {"lora_A.weight": "A", "lora_B.weight": "B"},
             "comfyui": {"lora_down.weight": "A", "lora_up.weight": "B", "lora_A.weight": "A", "lora_B.weight": "B",
                         "alpha": "alpha"}}[fmt]
    mods: dict[str, dict] = {}
    bad = []
    for k, v in sd.items():
        body = k[len(prefix):] if k.startswith(prefix) else None
        hit = None if body is None else next(((body[: -len(s) - 1], p) for s, p in parts.items()
                                              if body.endswith("." + s)), None)
        if hit is None:
            bad.append(k)
            continue
        try:
            name = module_name(hit[0], fmt, "sora_fast")
        except KeyError as e:
            raise ValueError(f"LoRA key {k!r}: {e.args[0]}") from None
        mods.setdefault(name, {})[hit[1]] = v
    if bad:
        raise ValueError(f"{len(bad)} LoRA key(s) are not {fmt} adapter weights of a Wan DiT linear layer, e.g. "
                         f"{bad[:3]} (expected {prefix}<layer>.{' / '.join(parts)})")
    out = {}
    for name, m in sorted(mods.items()):
        if "A" not in m or "B" not in m:
            raise ValueError(f"the {fmt} LoRA of {name!r} has {sorted(m)}, expected both the down (A) and the up (B) "
                             "weight")
        b = m["B"]
        if name == "proj_out":
            b = _permute_rows(b, config.patch_volume, config.out_channels, to_theirs=False)
        rank = m["A"].shape[0]
        alpha = float(m["alpha"]) if "alpha" in m else float(rank)
        out.update({f"{name}.lora_A.weight": m["A"], f"{name}.lora_B.weight": b,
                    f"{name}.lora_alpha": torch.tensor(alpha, dtype=torch.float32)})
    return out, fmt


def _write_lora_files(dit: nn.Module, directory: Path) -> dict:
    """Write ``dit``'s adapters into the existing ``directory`` (the three files); returns its record."""
    from safetensors.torch import save_file

    adapters = {k: v.detach().cpu() for k, v in lora_state_dict(dit).items()}
    mods = _split(adapters)
    ranks = sorted({int(m["A"].shape[0]) for m in mods.values()})
    alphas = sorted({float(m["alpha"]) for m in mods.values()})
    for fmt, name in (("diffusers", DIFFUSERS_FILE), ("comfyui", COMFYUI_FILE)):
        save_file(export_lora(adapters, fmt, dit.config), str(directory / name), metadata={"format": "pt"})
    sizes, hashes = file_records(directory, [DIFFUSERS_FILE, COMFYUI_FILE])
    record = {"ranks": ranks, "alphas": alphas, "modules": sorted(mods), "files": sizes, "sha256": hashes}
    (directory / RECORD).write_text(json.dumps(record, indent=2))
    return record


def save_lora_files(dit: nn.Module, directory: Union[str, Path]) -> Path:
    """Write ``dit``'s adapters to ``directory`` atomically: :data:`DIFFUSERS_FILE` (diffusers' layout and file
    name), :data:`COMFYUI_FILE` (ComfyUI's) and ``lora.json`` (rank, alpha, modules, sizes and sha256)."""
    final = Path(directory)
    atomic_dir(final, lambda tmp: _write_lora_files(dit, tmp), RECORD)
    return final


def save_expert_lora_files(dit: nn.Module, dit_2: nn.Module, directory: Union[str, Path]) -> Path:
    """Wan 2.2 A14B: the adapters of both experts, atomically, ``high_noise/`` (``dit``'s) and ``low_noise/``
    (``dit_2``'s) under ``directory``, each as :func:`save_lora_files` writes it, and a ``lora.json`` listing
    both directories' files (sizes and sha256)."""
    def write(tmp: Path):
        files, hashes = {}, {}
        for name, model in zip(EXPERT_DIRS, (dit, dit_2)):
            (tmp / name).mkdir()
            rec = _write_lora_files(model, tmp / name)
            files.update({f"{name}/{k}": v for k, v in rec["files"].items()})
            hashes.update({f"{name}/{k}": v for k, v in rec["sha256"].items()})
        (tmp / RECORD).write_text(json.dumps({"experts": list(EXPERT_DIRS), "files": files, "sha256": hashes},
                                             indent=2))

    final = Path(directory)
    atomic_dir(final, write, RECORD)
    return final


def load_expert_lora_files(dit: nn.Module, dit_2: nn.Module, directory: Union[str, Path]) -> str:
    """Load the pair :func:`save_expert_lora_files` writes (``high_noise/`` into ``dit``, ``low_noise/`` into
    ``dit_2``; each a LoRA directory or file :func:`load_lora_file` reads). Returns the format read."""
    d = Path(directory)
    missing = [n for n in EXPERT_DIRS if not (d / n).exists()]
    if not d.is_dir() or missing:
        raise ValueError(f"{str(d)!r}: a LoRA of two experts (Wan 2.2 A14B) is a directory holding "
                         f"{' and '.join(n + '/' for n in EXPERT_DIRS)} (the high- and the low-noise expert's "
                         f"adapters), got {'no directory' if not d.is_dir() else 'one without ' + ', '.join(missing)}")
    fmt = load_lora_file(dit, d / EXPERT_DIRS[0])
    load_lora_file(dit_2, d / EXPERT_DIRS[1])
    return fmt


def load_lora_file(dit: nn.Module, path: Union[str, Path]) -> str:
    """Load a Wan LoRA file (diffusers, ComfyUI or sora_fast layout, detected from its keys) into ``dit``; a
    directory means its :data:`DIFFUSERS_FILE`. A DiT without LoRA layers gets them (:func:`apply_lora` on the
    file's modules, with its rank and alpha); one that has them must have the same modules and rank. Returns
    the format read. Adapters for another model (unknown layers, more blocks, other widths) or of another
    rank raise ValueError naming what was found and what was expected."""
    p = Path(path)
    if p.is_dir():
        p = p / DIFFUSERS_FILE
    adapters, fmt = import_lora(load_safetensors(p, "LoRA adapter weights"), dit.config)
    mods = _split(adapters)
    ranks = sorted({int(m["A"].shape[0]) for m in mods.values()})
    if len(ranks) != 1:
        raise ValueError(f"{str(p)!r}: its adapters have ranks {ranks}; expected one rank for every layer")
    rank = ranks[0]
    own = {n: m for n, m in dit.named_modules() if isinstance(m, (nn.Linear, LoRALinear))}
    for name, m in sorted(mods.items()):
        layer = own.get(name)
        if layer is None:
            n = getattr(dit.config, "num_layers", "?")
            raise ValueError(f"{str(p)!r} is a LoRA for another model: it adapts {name!r}, which this DiT ({n} "
                             "blocks) does not have")
        want = (rank, layer.in_features), (layer.out_features, rank)
        got = tuple(m["A"].shape), tuple(m["B"].shape)
        if got != want:
            raise ValueError(f"{str(p)!r} is a LoRA for another model: {name} is {layer.in_features} -> "
                             f"{layer.out_features} here, the file's adapter is {got[0][1]} -> {got[1][0]}")
    existing = {n: m for n, m in own.items() if isinstance(m, LoRALinear)}
    if existing:
        have = sorted({m.rank for m in existing.values()})
        if have != [rank]:
            raise ValueError(f"{str(p)!r} has rank {rank} adapters; this DiT's LoRA layers have rank "
                             f"{', '.join(map(str, have))}: expected the same rank")
    else:  # the exact modules of the file; each one's alpha is loaded with its weights below
        apply_lora(dit, rank, targets=sorted(mods))
    ref = next(dit.parameters())
    load_lora(dit, {k: v.to(ref.device) for k, v in adapters.items()})
    return fmt

