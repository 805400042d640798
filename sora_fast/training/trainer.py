"""The DiT trainer: flow matching on packed, mixed-resolution latent batches at native resolution.

One step = one :func:`~sora_fast.packing.plan_batches` batch (videos of any size and duration, never
cropped, at most ``token_budget`` tokens), packed into one stream; per-video logit-normal timesteps
shifted by each video's token count; loss ``‖v_θ(x_t, t, text) − (ε − x0)‖²`` averaged per video.

Reproducible and resumable bit for bit: the batch order of every epoch and all random draws of a step
(noise, timesteps, caption dropout) come from generators seeded by ``(seed, epoch)`` and ``(seed, step)``,
so a run resumed from a checkpoint continues with exactly the losses of an uninterrupted one.
Checkpoints are atomic (:mod:`sora_fast.training.checkpoint`); Ctrl-C and SIGTERM (what ``docker stop``,
Slurm and Kubernetes send before killing) write one before stopping.
"""
from __future__ import annotations

import dataclasses
import math
import os
import signal
import threading
import time
import typing
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Mapping, Optional, Sequence, Union

import torch
from torch import nn

from ..packing import frame_ids, pack_videos, plan_batches, select_videos
from .checkpoint import StateDictMismatchError, check_writable, latest_checkpoint, load_checkpoint, save_checkpoint
from .conditioning import COND_MODES, draw_conditioning, swap_given
from .ema import EMA
from .flow import add_noise, flow_matching_loss, resolution_shift, sample_timesteps, token_levels
from .lora import apply_lora, load_lora, lora_state_dict
from .metrics import MetricsLogger, ProgressBar, plot_loss_curve

__all__ = ["TrainConfig", "Trainer", "LatentItem", "config_from_dict", "COND_MODES", "draw_conditioning"]

@dataclass
class TrainConfig:
    """Everything a DiT training run needs besides the model and the data (all have defaults).

    steps:            optimizer steps in total (a resumed run continues up to this number).
    token_budget:     max tokens per packed batch (videos are never cropped; a larger one is an error).
    lr, betas, weight_decay, warmup_steps: AdamW with a linear warm-up to ``lr``.
    lr_schedule:      after the warm-up: ``"constant"``, or ``"cosine"`` / ``"linear"`` decay from ``lr`` to
                      ``min_lr_ratio · lr`` at step ``steps`` (a resumed run with another ``steps`` decays
                      over the new length from where it is).
    grad_clip:        max global gradient norm (0: off; a finite number >= 0).
    ema_decay:        EMA of the trainable weights (None: off); ``ema_warmup`` as in :class:`EMA`.
    caption_dropout:  probability a caption is replaced by the empty prompt (trains the CFG branch).
    timestep_shift:   ``"auto"`` (per video, from its token count) or a fixed positive number.
    checkpointing:    activation checkpointing of the DiT blocks.
    autocast:         ``"auto"`` (bf16 on CUDA, off on CPU), ``"bf16"`` or ``"off"``.
    lora_rank:        0 trains all weights; r >= 1 trains LoRA adapters of rank r on the attention and
                      FFN linears only (``lora_alpha`` default r), and saves adapters only.
    train_text_encoder: also train the text encoder (the tiny one; a frozen T5 never trains).
    save_every, keep_last, log_every: checkpoint / metrics cadence.
    seed:             all randomness of the run.
    cond_mix:         probabilities of the conditioning modes (:data:`COND_MODES`), drawn per video and
                      step: ``t2v``, ``i2v``, ``extend_forward``, ``extend_backward``, ``interpolate``,
                      ``keyframes``, ``diffusion_forcing``. Weights >= 0, normalised by their sum; absent
                      modes have 0. Default ``{"t2v": 1.0}``: pure text-to-video, so runs, tests and
                      checkpoints made before the mix existed train exactly (bit for bit) as before.
                      Given frames get level ``cond_noise`` and are left out of the loss; a video too
                      short for its mode (an image: always) is trained as ``t2v``. Given frames after
                      the first hold the item's standalone suffix latents when it has them
                      (``LatentItem.alone``; :mod:`sora_fast.training.conditioning` says why), else
                      their in-context latents (what ``sora-fast train``'s latent cache holds today).
    cond_frames:      the most frames given by ``extend_forward`` / ``extend_backward``: k is drawn
                      uniformly from ``1..min(cond_frames, T - 1)`` for a video of T latent frames.
                      Default 1 (one frame, the usual extension by a clip's last latent).
    cond_noise:       the level of given frames, in [0, 1) (LTX-Video's ``image_cond_noise_scale``,
                      SkyReels' ``addnoise_condition``): a little noise on the condition makes the model
                      robust to conditions that are themselves generated. Default 0: given frames clean.
    """

    steps: int = 1000
    token_budget: int = 4096
    lr: float = 3e-4
    betas: tuple = (0.9, 0.99)
    weight_decay: float = 0.0
    warmup_steps: int = 50
    lr_schedule: str = "constant"
    min_lr_ratio: float = 0.0
    grad_clip: float = 1.0
    ema_decay: Optional[float] = 0.999
    ema_warmup: float = 10.0
    caption_dropout: float = 0.1
    timestep_shift: Union[str, float] = "auto"
    checkpointing: bool = False
    autocast: str = "auto"
    lora_rank: int = 0
    lora_alpha: Optional[float] = None
    train_text_encoder: bool = True
    save_every: int = 500
    keep_last: int = 2
    log_every: int = 10
    seed: int = 0
    cond_mix: dict = dataclasses.field(default_factory=lambda: {"t2v": 1.0})
    cond_frames: int = 1
    cond_noise: float = 0.0

    def __post_init__(self):
        def positive_int(name, minimum=1):
            v = getattr(self, name)
            if not isinstance(v, int) or isinstance(v, bool) or v < minimum:
                raise ValueError(f"TrainConfig.{name} must be an int >= {minimum}, got {v!r}")

        for name in ("steps", "token_budget", "save_every", "keep_last", "log_every", "cond_frames"):
            positive_int(name)
        for name in ("warmup_steps", "lora_rank", "seed"):
            positive_int(name, 0)
        for name in ("lr", "weight_decay", "grad_clip", "ema_warmup", "caption_dropout"):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v):
                raise ValueError(f"TrainConfig.{name} must be a finite number, got {v!r}")
        if not self.lr > 0:
            raise ValueError(f"TrainConfig.lr must be > 0, got {self.lr!r}")
        if self.grad_clip < 0:
            raise ValueError(f"TrainConfig.grad_clip must be >= 0 (0 turns clipping off), got {self.grad_clip!r}")
        if self.weight_decay < 0:
            raise ValueError(f"TrainConfig.weight_decay must be >= 0, got {self.weight_decay!r}")
        if self.lora_alpha is not None and (isinstance(self.lora_alpha, bool)
                                            or not isinstance(self.lora_alpha, (int, float))
                                            or not math.isfinite(self.lora_alpha) or self.lora_alpha <= 0):
            raise ValueError(f"TrainConfig.lora_alpha must be None or a finite number > 0, got {self.lora_alpha!r}")
        if not isinstance(self.betas, (tuple, list)) or len(self.betas) != 2 or not all(
                isinstance(b, (int, float)) and not isinstance(b, bool) and 0 <= b < 1 for b in self.betas):
            raise ValueError(f"TrainConfig.betas must be two numbers in [0, 1), got {self.betas!r}")
        if self.lr_schedule not in ("constant", "cosine", "linear"):
            raise ValueError(f"TrainConfig.lr_schedule must be 'constant', 'cosine' or 'linear', "
                             f"got {self.lr_schedule!r}")
        if isinstance(self.min_lr_ratio, bool) or not isinstance(self.min_lr_ratio, (int, float)) \
                or not 0 <= self.min_lr_ratio <= 1:
            raise ValueError(f"TrainConfig.min_lr_ratio must be a number in [0, 1], got {self.min_lr_ratio!r}")
        if not 0 <= self.caption_dropout < 1:
            raise ValueError(f"TrainConfig.caption_dropout must be in [0, 1), got {self.caption_dropout!r}")
        if self.ema_decay is not None and not 0 <= self.ema_decay <= 1:
            raise ValueError(f"TrainConfig.ema_decay must be None or in [0, 1], got {self.ema_decay!r}")
        if self.autocast not in ("auto", "bf16", "off"):
            raise ValueError(f"TrainConfig.autocast must be 'auto', 'bf16' or 'off', got {self.autocast!r}")
        if not (self.timestep_shift == "auto" or (isinstance(self.timestep_shift, (int, float))
                                                 and not isinstance(self.timestep_shift, bool)
                                                 and self.timestep_shift > 0)):
            raise ValueError(f"TrainConfig.timestep_shift must be 'auto' or a positive number, "
                             f"got {self.timestep_shift!r}")
        self.betas = tuple(self.betas)
        if not isinstance(self.cond_mix, Mapping):
            raise ValueError(f"TrainConfig.cond_mix must be a mapping of mode -> probability, got "
                             f"{type(self.cond_mix).__name__}")
        for mode, w in self.cond_mix.items():
            if mode not in COND_MODES:
                raise ValueError(f"TrainConfig.cond_mix has an unknown mode {mode!r}; the modes are "
                                 f"{', '.join(COND_MODES)}")
            if isinstance(w, bool) or not isinstance(w, (int, float)) or not math.isfinite(w) or w < 0:
                raise ValueError(f"TrainConfig.cond_mix[{mode!r}] must be a finite number >= 0, got {w!r}")
        if not sum(self.cond_mix.values()) > 0:
            raise ValueError(f"TrainConfig.cond_mix must give some mode a probability > 0, got {self.cond_mix!r}")
        self.cond_mix = {m: float(w) for m, w in self.cond_mix.items()}
        if isinstance(self.cond_noise, bool) or not isinstance(self.cond_noise, (int, float)) \
                or not 0 <= self.cond_noise < 1:
            raise ValueError(f"TrainConfig.cond_noise must be a number in [0, 1), got {self.cond_noise!r}")


_TYPE_NAMES = {int: "an int", float: "a number", str: "a string", bool: "true or false", tuple: "a list",
               dict: "a table / mapping", type(None): "null / absent"}


def _accepts(tp: Any, value: Any) -> bool:
    """Whether a value read from a JSON / TOML file fits the annotation ``tp`` (ints count as floats, lists
    as tuples; bools are not numbers)."""
    origin = typing.get_origin(tp)
    if origin is Union:
        return any(_accepts(a, value) for a in typing.get_args(tp))
    tp = origin or tp
    if tp is Any:
        return True
    if tp is type(None):
        return value is None
    if tp is bool:
        return isinstance(value, bool)
    if isinstance(value, bool):
        return False
    if tp is float:
        return isinstance(value, (int, float))
    if tp in (tuple, list):
        return isinstance(value, (tuple, list))
    if tp is dict:
        return isinstance(value, Mapping)
    return isinstance(value, tp) if isinstance(tp, type) else True


def _describe_type(tp: Any) -> str:
    if typing.get_origin(tp) is Union:
        return " or ".join(_describe_type(a) for a in typing.get_args(tp))
    tp = typing.get_origin(tp) or tp
    return _TYPE_NAMES.get(tp, getattr(tp, "__name__", str(tp)))


def config_from_dict(cls, data: Mapping[str, Any], where: str = "config"):
    """``cls(**data)`` for a dataclass, with unknown keys named (and the valid ones listed) and values of
    the wrong type named by their key (``TypeError``)."""
    if not isinstance(data, Mapping):
        raise TypeError(f"{where} must be a mapping of field -> value, got {type(data).__name__}")
    names = [f.name for f in dataclasses.fields(cls)]
    unknown = sorted(k for k in data if k not in names)
    if unknown:
        raise ValueError(f"{where} has unknown keys {unknown}; valid keys of {cls.__name__}: {', '.join(names)}")
    try:
        hints = typing.get_type_hints(cls)
    except Exception:  # an annotation that does not resolve: leave the checks to the class
        hints = {}
    for key, value in data.items():
        if key in hints and not _accepts(hints[key], value):
            raise TypeError(f"{where}: {key!r} must be {_describe_type(hints[key])}, got "
                            f"{type(value).__name__} {value!r:.80}")
    return cls(**data)


@dataclass
class LatentItem:
    """One training sample: a normalized latent ``(C, T, H, W)``, its caption and, optionally, its suffixes
    encoded on their own (``alone``: :func:`~sora_fast.training.conditioning.standalone_latents`), which
    given frames after the first take (:func:`~sora_fast.training.conditioning.swap_given`)."""

    latent: torch.Tensor
    caption: str
    alone: Optional[torch.Tensor] = None


class _Adapters(nn.Module):
    """A view whose state dict is the LoRA adapters only (what LoRA checkpoints hold): of one model, keys as
    :func:`lora_state_dict` gives them, or of several, each model's keys under its prefix (``{"dit.": dit,
    "dit_2.": dit_2}``: both experts' adapters in one file)."""

    def __init__(self, models: Union[nn.Module, Mapping[str, nn.Module]]):
        super().__init__()
        # not submodules: their own weights must not appear here
        self._models = list(({"": models} if isinstance(models, nn.Module) else models).items())

    def state_dict(self, *args, **kwargs):
        return {p + k: v for p, m in self._models for k, v in lora_state_dict(m).items()}

    def load_state_dict(self, state_dict, strict: bool = True, assign: bool = False):
        prefixes = [p for p, _ in self._models]
        stray = sorted(k for k in state_dict if not any(k.startswith(p) for p in prefixes))
        if stray:
            raise StateDictMismatchError(f"LoRA state dict does not fit the model's adapters: unexpected "
                                         f"({len(stray)}): {', '.join(stray[:20])}")
        for p, m in self._models:
            load_lora(m, {k[len(p):]: v for k, v in state_dict.items() if k.startswith(p)})


def _can_fuse(params: list) -> bool:
    """Plain (not sharded) floating-point tensors all on one CPU or CUDA device: AdamW's fused kernel and
    the multi-tensor gradient norm apply (one kernel over every tensor instead of a loop of small ops)."""
    devices = {p.device for p in params}
    return (len(devices) == 1 and next(iter(devices)).type in ("cpu", "cuda")
            and all(type(p.data) is torch.Tensor and p.is_floating_point() for p in params))


def _step_generator(seed: int, step: int) -> torch.Generator:
    return torch.Generator().manual_seed((seed * 1_000_003 + step * 7_919 + 12_345) % (2**63))


class Trainer:
    """Trains ``dit`` (and a trainable text encoder) on ``items`` with flow matching; with ``dit_2``, two experts.

    Args:
        dit: a :class:`sora_fast.models.VideoDiT` (any module with its forward signature and ``config``).
        text_encoder: a :class:`sora_fast.models.text.TextEncoder`.
        items: a sequence of :class:`LatentItem` (or of dicts with ``latent`` and ``caption``); latents are
            already normalized and have ``dit.config.in_channels`` channels.
        config: a :class:`TrainConfig`.
        run_dir: where checkpoints (``step_XXXXXX/``, ``latest``), ``metrics.jsonl`` and ``loss.png`` go;
            checked writable before anything runs.
        model_config: JSON-able description of the model, stored in checkpoints and compared on resume
            (a checkpoint of another configuration is refused, its mismatched tensors listed).
        dit_2, boundary: Wan 2.2 A14B's low-noise expert and the timestep (in [0, 1000]) where it takes over from
            ``dit`` (the high-noise expert). Each video of a step trains the expert that sampling gives its level:
            ``dit`` when ``1000 · level >= boundary``, else ``dit_2`` (diffusers' and Wan's A14B rule), where a
            video's level is that of its noisiest denoised frame -- its drawn timestep, except under
            ``diffusion_forcing`` where every frame has its own. A step packs each expert's videos on their own
            (one forward and backward per expert that has videos) and takes one optimizer step over both experts'
            trainable weights (an expert without videos that step keeps its weights); the loss is still the mean
            over all the step's videos. EMA and checkpoints hold both experts.
    """

    is_main = True  # False on the ranks of a distributed run that must not write logs or plots
    _signal: Optional[int] = None  # set by the SIGTERM handler that train() installs

    def __init__(self, dit: nn.Module, text_encoder: nn.Module, items: Sequence, config: TrainConfig,
                 run_dir: Union[str, Path], *, model_config: Optional[Mapping[str, Any]] = None,
                 progress: bool = True, dit_2: Optional[nn.Module] = None, boundary: Optional[float] = None):
        if not isinstance(config, TrainConfig):
            raise TypeError(f"config must be a TrainConfig, got {type(config).__name__}")
        if dit_2 is not None:
            if isinstance(boundary, bool) or not isinstance(boundary, (int, float)) or not 0 <= boundary <= 1000:
                raise ValueError(f"boundary must be a timestep in [0, 1000] (where dit_2 takes over from dit) with "
                                 f"dit_2, got {boundary!r}")
            if dit_2.config != dit.config:
                raise ValueError("dit_2 must have dit's configuration (the experts share one architecture), got "
                                 f"{dit_2.config} for dit's {dit.config}")
        elif boundary is not None:
            raise ValueError(f"boundary={boundary!r} is where dit_2 takes over from dit; without dit_2, expected None")
        self.config, self.dit, self.text_encoder = config, dit, text_encoder
        self.dit_2, self.boundary = dit_2, (None if boundary is None else float(boundary))
        self.experts = [dit] if dit_2 is None else [dit, dit_2]
        self.run_dir = check_writable(run_dir)
        self.items = [it if isinstance(it, LatentItem) else LatentItem(it["latent"], it["caption"], it.get("alone"))
                      for it in items]
        if not self.items:
            raise ValueError("items is empty: nothing to train on")
        self.patch = tuple(dit.config.patch)
        self.token_layout = {"order": dit.config.token_order, "tile": dit.config.token_tile}  # pack_videos keywords
        c_in = dit.config.in_channels
        for i, it in enumerate(self.items):
            if it.latent.dim() != 4 or it.latent.shape[0] != c_in:
                raise ValueError(f"items[{i}].latent must be (C={c_in}, T, H, W) for this DiT, got "
                                 f"{tuple(it.latent.shape)}")
            c, n, h, w = it.latent.shape
            if it.alone is not None and tuple(it.alone.shape) != (c, n * (n - 1) // 2, h, w):
                raise ValueError(f"items[{i}].alone must be ({c}, {n * (n - 1) // 2}, {h}, {w}) (every suffix of its "
                                 f"{n} latent frames encoded on its own), got {tuple(it.alone.shape)}")
        self.plan = plan_batches([tuple(it.latent.shape) for it in self.items], config.token_budget, self.patch)
        self.model_config = dict(model_config or {})
        self.progress = progress

        for e in self.experts:
            e.checkpointing = config.checkpointing
            if config.lora_rank:
                apply_lora(e, config.lora_rank, config.lora_alpha)
        if config.lora_rank or not config.train_text_encoder:
            text_encoder.requires_grad_(False)
        parts = {"dit": dit, "text": text_encoder} if dit_2 is None else {"dit": dit, "dit_2": dit_2,
                                                                            "text": text_encoder}
        self.model = self._wrap_model(nn.ModuleDict(parts))
        params = [p for p in self.model.parameters() if p.requires_grad]
        if not params:
            raise ValueError("nothing to train: every parameter of the DiT and text encoder is frozen")
        self.optimizer = torch.optim.AdamW(params, lr=config.lr, betas=config.betas,
                                           weight_decay=config.weight_decay, fused=_can_fuse(params) or None)
        self.ema = EMA(self.model, config.ema_decay, warmup=config.ema_warmup) if config.ema_decay else None
        self.step = 0
        self.device = next(dit.parameters()).device

    def _wrap_model(self, model: nn.Module) -> nn.Module:
        """Hook for distributed trainers (e.g. FSDP sharding), run before the optimizer and EMA are built."""
        return model

    # --- data order -------------------------------------------------------------------------------
    def batch_for_step(self, step: int) -> list[int]:
        """Item indices of step ``step``: epoch ``step // len(plan)``, batches in a seeded shuffled order."""
        n = len(self.plan)
        epoch, k = divmod(step, n)
        order = torch.randperm(n, generator=torch.Generator().manual_seed(self.config.seed * 7_907 + epoch))
        return self.plan.batches[int(order[k])]

    def _lr(self, step: int) -> float:
        """The learning rate of step ``step`` (0-based): warm-up, then :attr:`TrainConfig.lr_schedule`."""
        cfg = self.config
        w = cfg.warmup_steps
        if w and step + 1 < w:
            return cfg.lr * (step + 1) / w
        if cfg.lr_schedule == "constant" or cfg.steps <= w:
            return cfg.lr
        frac = min(1.0, max(0.0, (step + 1 - w) / (cfg.steps - w)))     # 0 at the warm-up's end, 1 at the last step
        shape = 0.5 * (1 + math.cos(math.pi * frac)) if cfg.lr_schedule == "cosine" else 1 - frac
        return cfg.lr * (cfg.min_lr_ratio + (1 - cfg.min_lr_ratio) * shape)

    def _autocast(self):
        mode = self.config.autocast
        on = mode == "bf16" or (mode == "auto" and self.device.type == "cuda")
        return torch.autocast(self.device.type, dtype=torch.bfloat16, enabled=on)

    # --- one step -------------------------------------------------------------------------------
    def draw(self, step: int) -> dict[str, Any]:
        """All of step ``step``'s data and random draws (a function of the seed and the step only):
        ``indices``, ``captions`` (after dropout), ``x0`` (PackedVideos of the latents), ``noise``
        ``(N, C·p)``, ``t`` ``(B,)`` in [0, 1], and the conditioning mix (:func:`draw_conditioning`,
        drawn after everything else so the default pure text-to-video mix draws nothing new):
        ``modes`` (one per video), ``levels`` ``(F,)`` per latent frame and ``given`` ``(F,)`` bool."""
        cfg = self.config
        g = _step_generator(cfg.seed, step)
        idx = self.batch_for_step(step)
        latents = [self.items[i].latent.to(self.device, torch.float32) for i in idx]
        drop = torch.rand(len(idx), generator=g) < cfg.caption_dropout
        captions = ["" if d else self.items[i].caption for i, d in zip(idx, drop.tolist())]
        x0 = pack_videos(latents, patch=self.patch, **self.token_layout)          # (N, C·p) tokens
        noise = torch.randn(x0.tokens.shape, generator=g).to(self.device)          # (N, C·p)
        shift = (resolution_shift(x0.cu_seqlens.diff()) if cfg.timestep_shift == "auto"
                 else float(cfg.timestep_shift))
        t = sample_timesteps(len(idx), generator=g, shift=shift)                    # (B,)
        modes, levels, given = draw_conditioning(x0.frames_per_video, t, shift, cfg.cond_mix,
                                                 cfg.cond_frames, cfg.cond_noise, generator=g)
        swapped = swap_given(latents, [self.items[i].alone for i in idx], given)
        if any(a is not b for a, b in zip(swapped, latents)):   # given frames after the first: as sampling gives them
            x0 = pack_videos(swapped, patch=self.patch, **self.token_layout)
        return {"indices": idx, "captions": captions, "x0": x0, "noise": noise, "t": t.to(self.device),
                "modes": modes, "levels": levels.to(self.device), "given": given.to(self.device)}

    @staticmethod
    def _loss_mask(x0, given: torch.Tensor) -> Optional[torch.Tensor]:
        """``(N,)`` bool, True at the tokens of frames to denoise; None when no frame is given (the
        unmasked loss, bit for bit today's)."""
        if not bool(given.any()):
            return None
        return ~given[frame_ids(x0).long()]

    def expert_of(self, d: Mapping[str, Any]) -> list[int]:
        """The expert each video of draw ``d`` trains (0: ``dit``, 1: ``dit_2``): by the level of its noisiest
        denoised frame, ``dit`` while ``1000 · level >= boundary`` (all 0 with one DiT)."""
        b = len(d["indices"])
        if self.dit_2 is None:
            return [0] * b
        frames = d["x0"].frames_per_video
        video = torch.repeat_interleave(torch.arange(b), torch.tensor(frames))
        t = (d["levels"] * 1000).float().cpu().masked_fill(d["given"].cpu(), -math.inf)   # (F,) given frames out
        step_t = torch.full((b,), -math.inf).scatter_reduce(0, video, t, "amax")           # (B,)
        return [0 if v >= self.boundary else 1 for v in step_t.tolist()]

    def train_step(self, step: int) -> dict[str, float]:
        cfg = self.config
        d = self.draw(step)
        x0, noise, levels, idx = d["x0"], d["noise"], d["levels"], d["indices"]
        xt = add_noise(x0.tokens, noise, token_levels(x0, levels))                # (N, C·p)

        for group in self.optimizer.param_groups:
            group["lr"] = self._lr(step)
        self.model.train()
        self.optimizer.zero_grad(set_to_none=True)
        which, b = self.expert_of(d), len(idx)
        groups = [(k, [i for i in range(b) if which[i] == k]) for k in range(len(self.experts)) if k in which]
        loss = None
        for k, keep in groups:  # one pack, forward and backward per expert (activations of one at a time)
            if len(keep) == b:  # the whole step on one expert: the pack as drawn
                xs, xts, ns, lv, given, caps = x0, xt, noise, levels, d["given"], d["captions"]
            else:
                xs, rows, frows = select_videos(x0, keep)
                xts, ns, lv, given = xt[rows], noise[rows], levels[frows], d["given"][frows]
                caps = [d["captions"][i] for i in keep]
            with self._autocast():
                text = self.text_encoder.encode(caps)
                pred = self.experts[k](xs.with_tokens(xts), lv * 1000, text)          # (N_k, C·p) velocity
            # given frames are left out: per video, the mean over its denoised tokens (at least one frame's)
            part = flow_matching_loss(pred.float(), xs.tokens, ns, xs.seq_ids, len(keep),
                                      mask=self._loss_mask(xs, given))
            if len(keep) == b:
                part.backward()
                loss = part
            else:  # the step's loss is the mean over all its videos: each pack weighs by its videos
                (part * (len(keep) / b)).backward()
                loss = part.detach() * (len(keep) / b) + (0 if loss is None else loss)
        params = [p for p in self.model.parameters() if p.requires_grad]
        gnorm = torch.nn.utils.clip_grad_norm_(params, cfg.grad_clip if cfg.grad_clip > 0 else math.inf,
                                               foreach=_can_fuse(params) or None)
        self.optimizer.step()
        if self.ema is not None:
            self.ema.update()
        return {"loss": loss.item(), "grad_norm": float(gnorm), "lr": self._lr(step), "tokens": x0.num_tokens,
                "videos": len(idx)}

    # --- checkpoints ----------------------------------------------------------------------------
    def _ckpt_model(self) -> nn.Module:
        if not self.config.lora_rank:
            return self.model
        return _Adapters(self.dit if self.dit_2 is None else {"dit.": self.dit, "dit_2.": self.dit_2})

    def _state(self) -> dict[str, Any]:
        return {"step": self.step, "config": self.model_config, "train": dataclasses.asdict(self.config)}

    def save(self) -> Path:
        """Write a checkpoint of the current step (atomically) and return its directory."""
        return save_checkpoint(self.run_dir, model=self._ckpt_model(), optimizer=self.optimizer, ema=self.ema,
                               state=self._state(), keep_last=self.config.keep_last)

    def resume(self, path: Optional[Union[str, Path]] = None, *, verify: bool = True) -> int:
        """Load ``path`` (default: this run's latest checkpoint, or the newest older one that passes its
        integrity check, with a warning) and continue from its step. ``verify``: check file hashes."""
        if path is None and latest_checkpoint(self.run_dir) is None:
            raise FileNotFoundError(f"no complete checkpoint to resume from in {self.run_dir}")
        # the model configuration must match (differences and mismatched tensors are listed); the training
        # configuration may change between runs (e.g. more steps)
        state = load_checkpoint(path or self.run_dir, self._ckpt_model(), self.optimizer, self.ema,
                                config=self.model_config, restore_rng=False, verify=verify)
        self.step = int(state["step"])
        return self.step

    # --- the loop -------------------------------------------------------------------------------
    def _stop_requested(self) -> bool:
        """Whether a SIGTERM asked the run to stop. Distributed trainers agree on it across ranks, so all
        ranks stop after the same step (and write the same checkpoint together)."""
        return self._signal is not None

    def _install_sigterm(self):
        """Route SIGTERM to a flag checked after every step (main thread only; signal handlers cannot be
        installed elsewhere). Returns the previous handler, or None when nothing was installed."""
        self._signal = None
        if threading.current_thread() is not threading.main_thread():
            return None

        def on_sigterm(signum, frame):
            self._signal = signum

        try:
            previous = signal.signal(signal.SIGTERM, on_sigterm)
        except (ValueError, OSError):  # pragma: no cover - e.g. an embedded interpreter without signals
            return None
        return signal.SIG_DFL if previous is None else previous

    def train(self, *, on_step: Optional[Callable[[int, dict], None]] = None) -> dict[str, Any]:
        """Run from ``self.step`` to ``config.steps``. Returns a summary dict (``interrupted`` is True
        when stopped by Ctrl-C or SIGTERM, after a checkpoint was written; ``signal`` names the signal).

        SIGTERM (``docker stop``, Slurm, Kubernetes) is handled like Ctrl-C: the step in progress finishes,
        a checkpoint is written and the run stops; the previous SIGTERM handler is restored on return."""
        cfg = self.config
        logger = MetricsLogger(self.run_dir / "metrics.jsonl" if self.is_main else os.devnull)
        bar = ProgressBar(cfg.steps, initial=self.step, desc="train dit", disable=not self.progress)
        losses, start, interrupted, stop_signal = [], time.perf_counter(), False, None
        previous = self._install_sigterm()
        try:  # the handler stays until the last checkpoint is written: a SIGTERM then cannot cut it short
            try:
                while self.step < cfg.steps:
                    m = self.train_step(self.step)
                    self.step += 1
                    losses.append(m["loss"])
                    bar.update(1, loss=m["loss"], tokens=m["tokens"])
                    if self.step % cfg.log_every == 0 or self.step == cfg.steps:
                        logger.log(self.step, m)
                    if on_step is not None:
                        on_step(self.step, m)
                    if self.step < cfg.steps and self._stop_requested():
                        interrupted, stop_signal = True, "SIGTERM"
                        break
                    if self.step % cfg.save_every == 0 and self.step < cfg.steps:
                        self.save()
            except KeyboardInterrupt:
                interrupted, stop_signal = True, "SIGINT"
            finally:
                bar.close()
                logger.close()
            ckpt = self.save()
        finally:
            if previous is not None:
                signal.signal(signal.SIGTERM, previous)
        try:
            if self.is_main:
                plot_loss_curve(self.run_dir / "metrics.jsonl", self.run_dir / "loss.png")
        except (ImportError, ValueError):
            pass  # matplotlib missing or nothing logged: the JSONL log is the record
        return {"steps": self.step, "interrupted": interrupted, "signal": stop_signal, "checkpoint": str(ckpt),
                "seconds": time.perf_counter() - start, "losses": losses, "plan": self.plan.summary()}
