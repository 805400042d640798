"""Model-agnostic training building blocks for packed video diffusion.

- :mod:`.flow`: flow-matching noising, logit-normal timesteps with the resolution shift, the packed loss,
  and the sampler's sigma schedule.
- :mod:`.lora`: low-rank adapters on linear layers (apply, save/load, merge).
- :mod:`.ema`: fp32 exponential moving average of the trainable weights.
- :mod:`.checkpoint`: atomic safetensors + JSON checkpoints with RNG state for bit-identical resume.
- :mod:`.metrics`: JSONL metrics log, progress bar, loss-curve plot.
- :mod:`.trainer`: :class:`Trainer` / :class:`TrainConfig`, the DiT training loop built from the above.
- :mod:`.vae`: :func:`train_vae` and :func:`fit_latent_stats` for a VAE trained from scratch (the demo's).
"""
from .checkpoint import (
    StateDictMismatchError,
    check_writable,
    latest_checkpoint,
    list_checkpoints,
    load_checkpoint,
    save_checkpoint,
)
from .ema import EMA
from .flow import (
    add_noise,
    flow_matching_loss,
    flow_target,
    resolution_shift,
    sample_timesteps,
    sequence_mse,
    shift_sigmas,
    sigma_schedule,
)
from .lora import DEFAULT_TARGETS, LoRALinear, apply_lora, load_lora, lora_state_dict, merge_lora, remove_lora
from .metrics import MetricsLogger, ProgressBar, plot_loss_curve, read_metrics
from .trainer import TrainConfig, Trainer
from .vae import VAETrainConfig, fit_latent_stats, train_vae

__all__ = [
    "Trainer",
    "TrainConfig",
    "train_vae",
    "VAETrainConfig",
    "fit_latent_stats",
    # flow
    "shift_sigmas",
    "resolution_shift",
    "sample_timesteps",
    "add_noise",
    "flow_target",
    "sequence_mse",
    "flow_matching_loss",
    "sigma_schedule",
    # lora
    "DEFAULT_TARGETS",
    "LoRALinear",
    "apply_lora",
    "lora_state_dict",
    "load_lora",
    "merge_lora",
    "remove_lora",
    # ema
    "EMA",
    # checkpoint
    "save_checkpoint",
    "load_checkpoint",
    "latest_checkpoint",
    "list_checkpoints",
    "check_writable",
    "StateDictMismatchError",
    # metrics
    "MetricsLogger",
    "ProgressBar",
    "read_metrics",
    "plot_loss_curve",
]
