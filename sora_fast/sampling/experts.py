"""Several denoisers that share the noise levels between them, called as one (Wan 2.2 A14B's mixture of experts: a
high-noise expert for the first steps, a low-noise expert for the rest).

:class:`Experts` is a denoiser like any other (``f(x, timesteps, text) -> velocity``), so the sampler runs one
callable per step. Each video goes to the expert of its *step timestep* -- the timestep of the frames being
denoised: every entry of ``(B,)`` timesteps; with per-frame timesteps ``(F,)`` (given frames held at their own
level, e.g. 0) the sampler passes each video's step timestep as ``step`` and the expert is picked by it, never by a
given frame's level. In plain generation all videos of a pack are on the same step level and one expert runs the
whole pack; videos on different levels (editing strengths, per-video shifts) are split into one sub-pack per expert.
"""
from __future__ import annotations

import math
from typing import Optional, Sequence

import torch

from ..packing import PackedSequences, PackedVideos
from .schedule import DenoiseFn

__all__ = ["Experts", "split_by_expert"]


class Experts:
    """``experts[k]`` denoises the videos whose step timestep ``t`` has ``k`` boundaries above it: with one
    boundary ``b``, ``experts[0]`` while ``t >= b`` and ``experts[1]`` once ``t < b`` (diffusers' ``WanPipeline``:
    ``transformer`` while ``t >= boundary_ratio · num_train_timesteps``, then ``transformer_2``).

    Args:
        experts: K >= 2 denoisers ``f(x: PackedVideos, timesteps, text: PackedSequences) -> (N, D)``, highest noise
            first (e.g. two :class:`~sora_fast.models.VideoDiT`, or the parallel denoisers that run them).
        boundaries: K - 1 timesteps, strictly decreasing, finite.

    ``config`` is the first expert's (its token order serves every expert: the experts share one architecture).
    """

    def __init__(self, experts: Sequence[DenoiseFn], boundaries: Sequence[float]):
        experts, boundaries = list(experts), list(boundaries)
        if len(experts) < 2 or not all(callable(e) for e in experts):
            raise ValueError(f"experts must be 2 or more denoisers (callables), got {len(experts)}: "
                             f"{[type(e).__name__ for e in experts]}")
        if len(boundaries) != len(experts) - 1:
            raise ValueError(f"boundaries must hold {len(experts) - 1} timesteps (one between each two experts), got "
                             f"{len(boundaries)}")
        for i, b in enumerate(boundaries):
            if isinstance(b, bool) or not isinstance(b, (int, float)) or not math.isfinite(b):
                raise ValueError(f"boundaries[{i}] must be a finite number (a timestep), got {b!r}")
        if any(a <= b for a, b in zip(boundaries, boundaries[1:])):
            raise ValueError(f"boundaries must be strictly decreasing (experts go from high noise to low), got "
                             f"{boundaries}")
        self.experts, self.boundaries = experts, [float(b) for b in boundaries]
        self.config = getattr(experts[0], "config", None)

    def __len__(self) -> int:
        return len(self.experts)

    def index(self, t: float) -> int:
        """The expert of step timestep ``t``: how many boundaries lie above it (``t >= b`` stays on the higher)."""
        return sum(float(t) < b for b in self.boundaries)

    def __call__(self, x: PackedVideos, timesteps: torch.Tensor, text: PackedSequences,
                 step: Optional[torch.Tensor] = None) -> torch.Tensor:
        """The velocity ``(N, D)`` of every video from its expert.

        ``timesteps``: ``(B,)`` per video, or ``(F,)`` per frame (``F = sum(x.frames_per_video)``); ``step``:
        ``(B,)`` each video's step timestep, needed with per-frame timesteps (None: ``timesteps`` themselves).
        """
        b = x.num_sequences
        if step is None:
            if timesteps.shape[0] != b:
                raise ValueError(f"Experts picks an expert per video by its step timestep: with per-frame timesteps "
                                 f"({timesteps.shape[0]} for {b} videos) pass step, one timestep per video")
            step = timesteps
        if tuple(step.shape) != (b,):
            raise ValueError(f"step must hold one timestep per video, shape ({b},), got {tuple(step.shape)}")
        which = [self.index(t) for t in step.tolist()]
        return split_by_expert(which, x, timesteps, text, lambda k, xs, ts, txt, keep: (self.experts[k](xs, ts, txt),
                                                                                         None))[0]


def split_by_expert(which: Sequence[int], x: PackedVideos, timesteps: torch.Tensor, text: PackedSequences, run
                    ) -> tuple[torch.Tensor, list]:
    """Run each expert on its videos: ``which[i]`` is video ``i``'s expert; ``run(k, x_k, timesteps_k, text_k,
    keep)`` denoises the sub-pack of videos ``keep`` with expert ``k`` and returns ``(velocity, extra)``. One call
    on the whole pack when every video has one expert, else one per expert on a sub-pack, the velocities put
    back in the pack's rows. Returns ``(velocity (N, D), [extra of each call])``."""
    if len(set(which)) == 1:
        v, extra = run(which[0], x, timesteps, text, list(range(len(which))))
        return v, [extra]
    from .cache import _select

    per_frame = timesteps.shape[0] != x.num_sequences
    out, extras = None, []
    for k in sorted(set(which)):
        keep = [i for i, e in enumerate(which) if e == k]
        xs, ts, rows, frows, _ = _select(x, text, keep)
        v, extra = run(k, xs, timesteps[frows] if per_frame else timesteps[keep], ts, keep)
        if out is None:
            out = v.new_empty((x.tokens.shape[0], v.shape[1]))
        out[rows] = v
        extras.append(extra)
    return out, extras
