"""Training a (small) causal VAE from scratch on videos at native size, and fitting its latent statistics.

Loss: ``MSE(decode(z), video) + kl_weight · KL(q(z|video) ‖ N(0, I)) / numel(video)`` with ``z`` sampled from
the posterior. One video per step (any size and duration, never cropped), picked by a seeded generator,
so runs are reproducible. Used by ``sora-fast demo``; a real Wan VAE is loaded, not trained.
"""
from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Optional, Sequence

import torch

from .metrics import ProgressBar

__all__ = ["VAETrainConfig", "lr_at", "train_vae", "fit_latent_stats", "focus_weights"]


@dataclass
class VAETrainConfig:
    """steps, lr (AdamW), kl_weight, grad_clip, seed.

    Learning rate: linear warm-up over ``warmup_steps``, then ``lr`` until ``lr_drop_at`` of the steps, then
    ``lr · lr_drop`` (``lr_drop=1`` keeps it constant). The default, 1e-3 dropping to 2.5e-4 at half the
    steps, is the schedule that did not stall on the demo VAE: higher rates sat on the background-only plateau
    or lost a colour in some runs (measurements: docs/results.md, "VAE training").

    batch_size: videos per step, all of one shape (a random shape group, then random members of it;
        videos are never cropped or resized to make a batch).

    sample: decode a posterior sample (a VAE) or the posterior mean (an autoencoder with a KL penalty). The
    default is the mean: with small objects on a plain background, sampled latents (std 1 at
    initialization) drown the objects' signal and the decoder settles on the mean frame.
    l1_weight: adds ``l1_weight · |decode(z) − video|`` to the MSE; L1 keeps small objects' gradient alive.
    focus: per-pixel loss weight ``1 + focus · max_c |video_c − background_c|`` (background: the video's
        per-channel median), which makes pixels unlike the background (small objects) count more; 0 is a
        plain mean. The largest channel difference, not the mean over channels: a saturated red or green
        object differs from a dark background in one channel only, and a channel mean would give it half the
        weight of a white or yellow one (docs/results.md, "Loss weights").
    """

    steps: int = 400
    batch_size: int = 4
    lr: float = 1e-3
    warmup_steps: int = 20
    lr_drop_at: float = 0.5
    lr_drop: float = 0.25
    kl_weight: float = 1e-3
    grad_clip: float = 1.0
    sample: bool = False
    l1_weight: float = 1.0
    focus: float = 0.0
    seed: int = 0

    def __post_init__(self):
        for name in ("steps", "batch_size", "warmup_steps", "seed"):
            v = getattr(self, name)
            lo = 1 if name in ("steps", "batch_size") else 0
            if not isinstance(v, int) or isinstance(v, bool) or v < lo:
                raise ValueError(f"VAETrainConfig.{name} must be an int >= {lo}, got {v!r}")
        for name in ("lr_drop_at", "lr_drop"):
            v = getattr(self, name)
            if (isinstance(v, bool) or not isinstance(v, (int, float)) or not 0 <= v <= 1
                    or (name == "lr_drop" and v == 0)):
                raise ValueError(f"VAETrainConfig.{name} must be a number in "
                                 f"{'(0, 1]' if name == 'lr_drop' else '[0, 1]'}, got {v!r}")
        for name in ("lr", "kl_weight", "grad_clip", "l1_weight", "focus"):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, (int, float)) or v < 0 or (name == "lr" and v == 0):
                raise ValueError(f"VAETrainConfig.{name} must be a number {'> 0' if name == 'lr' else '>= 0'}, "
                                 f"got {v!r}")


def _check_videos(videos, vae) -> None:
    if not isinstance(videos, Sequence) or len(videos) == 0:
        raise ValueError("videos must be a non-empty list of (3, T, H, W) tensors")
    f, s = vae.temporal_factor, vae.spatial_factor
    for i, v in enumerate(videos):
        if not isinstance(v, torch.Tensor) or v.dim() != 4 or v.shape[0] != 3:
            raise ValueError(f"videos[{i}] must be a (3, T, H, W) tensor, got "
                             f"{tuple(v.shape) if isinstance(v, torch.Tensor) else type(v).__name__}")
        t, h, w = v.shape[1:]
        if (t - 1) % f or h % s or w % s:
            raise ValueError(f"videos[{i}] has (T, H, W)=({t}, {h}, {w}); the VAE needs T = 1 + {f}k and H, W "
                             f"multiples of {s}")


def focus_weights(video: torch.Tensor, focus: float) -> torch.Tensor:
    """Per-pixel loss weights of :class:`VAETrainConfig` ``focus`` for a batch ``video`` ``(b, 3, T, H, W)``:
    ``1 + focus · max_c |video_c − median_c|`` (median over each video's pixels), normalized to mean 1.
    Returns ``(b, 1, T, H, W)``."""
    bg = video.flatten(2).median(dim=2).values[..., None, None, None]             # (b, 3, 1, 1, 1)
    w = 1 + focus * (video - bg).abs().amax(dim=1, keepdim=True)                  # (b, 1, T, H, W)
    return w / w.mean()


def lr_at(cfg: VAETrainConfig, step: int) -> float:
    """The learning rate of (0-based) ``step`` under ``cfg``: warm-up, then ``lr``, then ``lr · lr_drop``."""
    if step >= cfg.lr_drop_at * cfg.steps:
        return cfg.lr * cfg.lr_drop
    return cfg.lr * min(1.0, (step + 1) / cfg.warmup_steps) if cfg.warmup_steps else cfg.lr


def train_vae(vae, videos: Sequence[torch.Tensor], config: Optional[VAETrainConfig] = None, *,
              progress: bool = True) -> dict:
    """Train ``vae`` (a :class:`sora_fast.models.CausalVAE`) in place on ``videos`` ``(3, T, H, W)`` in [-1, 1].

    Returns ``{"losses": [...], "recon": [...], "lr": [...], "seconds": s}`` (total and reconstruction loss
    and learning rate per step).
    """
    cfg = config or VAETrainConfig()
    _check_videos(videos, vae)
    device = next(vae.parameters()).device
    opt = torch.optim.AdamW(vae.parameters(), lr=cfg.lr, betas=(0.9, 0.99), weight_decay=0.0)
    g = torch.Generator().manual_seed(cfg.seed)
    groups: dict = {}
    for i, v in enumerate(videos):
        groups.setdefault(tuple(v.shape), []).append(i)
    groups = list(groups.values())
    losses, recons, lrs, start = [], [], [], time.perf_counter()
    bar = ProgressBar(cfg.steps, desc="train vae", disable=not progress)
    vae.train()
    try:
        for step in range(cfg.steps):
            group = groups[int(torch.randint(len(groups), (1,), generator=g))]
            pick = torch.randperm(len(group), generator=g)[:cfg.batch_size].tolist()
            video = torch.stack([videos[group[j]] for j in pick]).to(device, torch.float32)   # (b, 3, T, H, W)
            lr = lr_at(cfg, step)
            for group in opt.param_groups:
                group["lr"] = lr
            post = vae.encode_posterior(video, chunked=False)                   # one pass: fewer, larger convs
            z = (post.sample(generator=torch.Generator(device="cpu").manual_seed(cfg.seed * 100_003 + step))
                 if cfg.sample else post.mean)
            recon = vae.decode(z, clamp=False, chunked=False)                   # (b, 3, T, H, W)
            err = recon - video
            mse = err.square().mean()
            w = focus_weights(video, cfg.focus) if cfg.focus else 1.0              # (b, 1, T, H, W)
            loss = ((err.square() + cfg.l1_weight * err.abs()) * w).mean() \
                + cfg.kl_weight * post.kl().sum() / video.numel()
            opt.zero_grad(set_to_none=True)
            loss.backward()
            if cfg.grad_clip:
                torch.nn.utils.clip_grad_norm_(vae.parameters(), cfg.grad_clip)
            opt.step()
            losses.append(loss.item())
            recons.append(mse.item())
            lrs.append(lr)
            bar.update(1, loss=mse.item(), tokens=video.shape[0] * video.shape[2])
    finally:
        bar.close()
    vae.eval()
    return {"losses": losses, "recon": recons, "lr": lrs, "seconds": time.perf_counter() - start}


@torch.no_grad()
def fit_latent_stats(vae, videos: Sequence[torch.Tensor]) -> tuple[list[float], list[float]]:
    """Per-channel mean and std of the posterior means of ``videos`` (every latent pixel weighs the same);
    stored as the VAE's ``latents_mean`` / ``latents_std`` so the DiT sees ~unit-variance latents."""
    _check_videos(videos, vae)
    device = next(vae.parameters()).device
    total = s1 = s2 = 0
    for v in videos:
        z = vae.encode(v[None].to(device, torch.float32))[0].double()           # (z, T', h, w)
        s1 = s1 + z.sum(dim=(1, 2, 3))
        s2 = s2 + z.square().sum(dim=(1, 2, 3))
        total += z[0].numel()
    mean = s1 / total
    std = (s2 / total - mean.square()).clamp_min(1e-12).sqrt()
    mean_l, std_l = [float(x) for x in mean], [float(x) for x in std]
    vae.config.latents_mean, vae.config.latents_std = tuple(mean_l), tuple(std_l)
    return mean_l, std_l
