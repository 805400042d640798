"""The one schedule of every sampler (Euler, UniPC, DPM++) and every cache: argument checks, the noise levels
of a video of ``(steps, shift, strength)``, and the per-frame levels of conditioned videos.

Editing (SDEdit) starts a video part-way down its schedule, from its input's latents noised to the
level its ``strength`` gives. :func:`strength_sigmas` is the one place that turns ``(steps, shift,
strength)`` into noise levels; every sampler uses it.

Conditioning (image-to-video, extension, keyframes) gives every latent frame its own noise level: a
*given* frame is held at a fixed level ``σc`` (0 = clean) from ``(1 − σc)·x0 + σc·ε`` and never updated,
the others follow their video's schedule, and the DiT gets per-frame timesteps ``(F,)``.
:func:`frame_sigmas` is the one place that turns a video's schedule and its given levels into per-frame
levels; samplers take them from it. Within a video the denoised frames are on one level at every step
(synchronous) or follow its levels one after another (staggered, Diffusion Forcing): :func:`frame_schedule`
is the one place that decides it.
"""
from __future__ import annotations

import math
from typing import Callable, Optional, Sequence

import torch

from ..packing import PackedSequences, PackedVideos, pack_sequences
from ..training.flow import shift_sigmas, sigma_schedule

__all__ = ["concat_text", "strength_sigmas", "schedule_sigmas", "schedule_timesteps", "SCHEDULES", "frame_sigmas",
           "check_given", "check_strength", "check_finite", "check_sampling", "DenoiseFn", "FRAME_SCHEDULES",
           "check_ar_step", "staggered_steps", "step_levels", "frame_schedule"]

DenoiseFn = Callable[[PackedVideos, torch.Tensor, PackedSequences], torch.Tensor]


def concat_text(*packs: PackedSequences) -> PackedSequences:
    """Packed text streams one after another: sequence order ``packs[0]``'s, then ``packs[1]``'s, ..."""
    seqs = [s for p in packs for s in p.unpack(p.tokens)]
    return pack_sequences(seqs)


def check_sampling(steps, guidance, shift, n: int, *, solver: str = "euler", order=None, cache=None,
                   denoiser=None) -> None:
    """The sampling arguments of ``generate`` and ``generate_long``: ``steps`` a positive int, ``guidance``
    a finite number, ``shift`` as :func:`_check_shift` takes it for ``n`` videos, ``solver`` / ``order`` as
    :func:`sora_fast.sampling.check_solver` and ``cache`` as :func:`sora_fast.sampling.parse_cache` take them
    (with a ``denoiser`` other than None, the one the cache will run)."""
    from .cache import parse_cache, start_cache
    from .solvers import check_solver

    check_solver(solver, order)
    if denoiser is not None:
        start_cache(cache, denoiser, 1)
    parse_cache(cache)
    if isinstance(steps, bool) or not isinstance(steps, int) or steps < 1:
        raise ValueError(f"steps must be a positive int, got {steps!r}")
    if isinstance(guidance, bool) or not isinstance(guidance, (int, float)):
        raise TypeError(f"guidance must be a number, got {type(guidance).__name__}")
    if not math.isfinite(guidance):
        raise ValueError(f"guidance must be a finite number, got {guidance!r}")
    _check_shift(shift, n)


def _check_shift(shift, n: int) -> list:
    if isinstance(shift, str):
        if shift != "auto":
            raise ValueError(f"shift must be a positive number, a list of them or 'auto', got {shift!r}")
        return [shift] * n
    values = list(shift) if isinstance(shift, (list, tuple)) else [shift] * n
    if len(values) != n:
        raise ValueError(f"shift has {len(values)} values, expected one per video ({n})")
    for i, s in enumerate(values):
        if isinstance(s, bool) or not isinstance(s, (int, float)) or not s > 0 or not math.isfinite(s):
            raise ValueError(f"shift[{i}] must be a positive number, finite, got {s!r}")
    return [float(s) for s in values]


def check_strength(strength, n: int, name: str = "strength") -> list[float]:
    """``strength`` as one float per video (a number for all, or a list of ``n``), each in [0, 1]."""
    if isinstance(strength, (list, tuple)):
        if len(strength) != n:
            raise ValueError(f"{name} must be a number or a list of {n} numbers (one per video), got a list of "
                             f"{len(strength)}")
        values = list(strength)
    elif isinstance(strength, bool) or not isinstance(strength, (int, float)):
        raise TypeError(f"{name} must be a number in [0, 1] or a list of {n} of them, got "
                        f"{type(strength).__name__}")
    else:
        values = [strength] * n
    for i, v in enumerate(values):
        label = name if not isinstance(strength, (list, tuple)) else f"{name}[{i}]"
        if isinstance(v, bool) or not isinstance(v, (int, float)):
            raise TypeError(f"{label} must be a number in [0, 1], got {type(v).__name__}")
        if not (0.0 <= v <= 1.0):  # NaN fails too
            raise ValueError(f"{label} must be a number in [0, 1], got {v!r}")
    return [float(v) for v in values]


# Named noise-level schedules of a full (strength 1) run; ``None`` is sora_fast's own.
SCHEDULES = ("sora_fast", "diffusers_flow_euler", "diffusers_flow_unipc")


def _schedule_kind(schedule) -> tuple[str, int]:
    """``(kind, num_train_timesteps)`` of a schedule dict (None: sora_fast's own), checked."""
    kind = "sora_fast" if schedule is None else schedule.get("kind") if isinstance(schedule, dict) else None
    if kind not in SCHEDULES:
        raise ValueError(f"schedule must be None or a dict with 'kind' one of {', '.join(SCHEDULES)}, got {schedule!r}")
    t = 1000 if schedule is None else schedule.get("num_train_timesteps", 1000)
    if isinstance(t, bool) or not isinstance(t, int) or t < 1:
        raise ValueError(f"schedule['num_train_timesteps'] must be a positive int, got {t!r}")
    return kind, t


def _unipc_levels(steps: int, shift: float, t: int):
    """diffusers' ``UniPCMultistepScheduler.set_timesteps`` with flow sigmas, in numpy float64 as it computes them:
    ``linspace(1, 1/T, steps + 1)[:-1]`` shifted, the top level 1 taken as ``1 - 1e-6``."""
    import numpy as np

    levels = np.linspace(1, 1 / t, steps + 1)[:-1]
    levels = shift * levels / (1 + (shift - 1) * levels)
    if np.fabs(levels[0] - 1) < 1e-6:
        levels[0] -= 1e-6
    return levels


def schedule_sigmas(steps: int, shift: float, schedule: Optional[dict] = None) -> torch.Tensor:
    """The ``steps + 1`` noise levels (float64, from the start level down to exactly 0) of a full run.

    ``schedule`` None or ``{"kind": "sora_fast"}``: :func:`sigma_schedule` (``shift_sigmas(linspace(1, 0,
    steps + 1))``). The others reproduce a diffusers scheduler's ``set_timesteps(steps)`` (``num_train_timesteps``
    T, default 1000), each level rounded to float32 as diffusers holds it, then 0:

    - ``{"kind": "diffusers_flow_euler"}``: ``FlowMatchEulerDiscreteScheduler(shift=s)`` (no dynamic shifting,
      no Karras / exponential / beta levels): ``linspace(1, m, steps)`` with ``m = shift(1 / T)`` (its smallest
      training level, already shifted), shifted once more;
    - ``{"kind": "diffusers_flow_unipc"}``: ``UniPCMultistepScheduler(use_flow_sigmas=True, flow_shift=s)``:
      ``linspace(1, 1/T, steps + 1)[:-1]`` shifted, the first level (1) taken as ``1 - 1e-6``.

    Loading a diffusers pipeline records its scheduler's schedule, so the same steps give the same levels (and,
    with :func:`schedule_timesteps`, the same model timesteps) and the same video.
    """
    kind, t = _schedule_kind(schedule)
    if kind == "sora_fast":
        return sigma_schedule(steps, shift, dtype=torch.float64)
    import numpy as np

    if kind == "diffusers_flow_euler":
        lowest = torch.tensor(1.0, dtype=torch.float32) / t                     # float32, as diffusers' init
        sigma_min = (shift * lowest / (1 + (shift - 1) * lowest)).item()
        levels = np.linspace(1.0 * t, sigma_min * t, steps) / t                # numpy float64, as set_timesteps
        levels = shift * levels / (1 + (shift - 1) * levels)
    else:
        levels = _unipc_levels(steps, shift, t)
    levels = torch.from_numpy(levels).to(torch.float32).to(torch.float64)
    return torch.cat([levels, levels.new_zeros(1)])


def schedule_timesteps(steps: int, shift: float, schedule: Optional[dict] = None) -> Optional[torch.Tensor]:
    """The ``steps`` timesteps (float64) the model sees on a full run of ``schedule``, or None where it sees
    ``1000·σ`` (sora_fast's own schedule). diffusers feeds its scheduler's ``timesteps``: for
    ``"diffusers_flow_euler"`` ``σ·T`` in float32 (σ its float32 level), for ``"diffusers_flow_unipc"`` the integer
    part of ``σ·T`` taken before the float32 rounding (999, not 999.999, at the top level)."""
    kind, t = _schedule_kind(schedule)
    if kind == "sora_fast":
        return None
    if kind == "diffusers_flow_euler":
        return (schedule_sigmas(steps, shift, schedule)[:-1].to(torch.float32) * t).to(torch.float64)
    import numpy as np

    return torch.from_numpy((_unipc_levels(steps, shift, t) * t).astype(np.int64)).to(torch.float64)


def strength_sigmas(steps: int, shift: float, strength: float = 1.0, schedule: Optional[dict] = None
                    ) -> torch.Tensor:
    """The noise levels (float64, decreasing to exactly 0) that a video of ``strength`` is sampled on.

    ``strength`` is the starting point on the *unshifted* time axis ``t ∈ [0, 1]`` of the ``steps``-step
    schedule :func:`sora_fast.training.flow.sigma_schedule`. The sampler runs the remaining
    ``n = ceil(strength · steps)`` steps on ``shift_sigmas(linspace(strength, 0, n + 1), shift)``: it starts
    at ``σ0 = s·strength / (1 + (s − 1)·strength)`` (the resolution shift ``s`` applied to the strength,
    the same map as every other level) from ``x = (1 − σ0)·x0 + σ0·ε``. So

    - ``strength == 1``: exactly :func:`sigma_schedule` (``steps`` steps from σ = 1, pure noise): plain
      generation;
    - ``strength == 0``: ``[0.0]``, no step: the input latents come back unchanged;
    - ``strength · steps`` an integer k: the last k levels of the full schedule (diffusers' img2img
      ``t_start = steps − int(steps·strength)``); otherwise the levels are evenly spaced from the strength,
      so results are continuous in the strength rather than rounded to a step.

    ``schedule`` (see :func:`schedule_sigmas`) chooses the levels of a full run (strength 1); an edit
    (strength < 1) always takes the rule above.
    """
    (strength,) = check_strength(strength, 1)
    if strength == 1.0:
        return schedule_sigmas(steps, shift, schedule)
    n = min(steps, math.ceil(round(strength * steps, 9)))  # round: 0.3 * 10 is 3.0000000000000004
    if n == 0:
        return torch.zeros(1, dtype=torch.float64)
    return shift_sigmas(torch.linspace(strength, 0.0, n + 1, dtype=torch.float64), float(shift))


def frame_sigmas(sigma: torch.Tensor, levels: torch.Tensor) -> torch.Tensor:
    """Per-frame noise levels of one video at one step: ``levels`` ``(T,)`` holds the fixed level of each
    given frame and NaN for a frame that is denoised; those take the video's current level ``sigma`` (a
    0-dim tensor, or ``(T,)``: each frame's own, as a staggered schedule gives). The result is ``(T,)`` in
    ``levels``' dtype."""
    return torch.where(torch.isnan(levels), sigma.to(levels.dtype), levels)


# The noise-level schedules of the frames within one video (``ar_step`` 0: synchronous, else staggered).
FRAME_SCHEDULES = ("synchronous", "staggered")


def check_ar_step(ar_step, name: str = "ar_step") -> int:
    """``ar_step`` as an int >= 0 (0: synchronous; see :func:`frame_schedule`)."""
    if isinstance(ar_step, bool) or not isinstance(ar_step, int) or ar_step < 0:
        raise ValueError(f"{name} must be an int >= 0 (steps each denoised frame lags the one before; 0: "
                         f"synchronous), got {ar_step!r}")
    return ar_step


def staggered_steps(steps: int, denoised: int, ar_step: int) -> int:
    """Model forwards of a video whose ``denoised`` frames each run ``steps`` steps, each frame ``ar_step``
    steps after the one before: ``steps + ar_step·(denoised − 1)`` (``steps`` when it runs no step or has at
    most one denoised frame)."""
    return steps + ar_step * (denoised - 1) if steps > 0 and denoised > 1 else steps


def step_levels(sched: torch.Tensor, start: int, total: int) -> torch.Tensor:
    """``(total + 1,)``: the levels ``sched`` (``n + 1`` of them) run from global step ``start``, held at
    ``sched[0]`` before it and at ``sched[n]`` after it ends (level at step i: ``sched[clamp(i − start, 0,
    n)]``); values copied exactly."""
    n = len(sched) - 1
    return torch.cat([sched[:1].expand(start), sched, sched[-1:].expand(total - start - n)])


def frame_schedule(sched: torch.Tensor, levels: torch.Tensor, total: int, ar_step: int = 0
                   ) -> tuple[torch.Tensor, list[int]]:
    """The level of every frame of one video at every global step of a pack of ``total`` steps, and the step
    at which each frame starts. The one place the schedule within a video is decided.

    ``sched``: the video's ``n + 1`` levels (:func:`strength_sigmas`); ``levels`` ``(F,)``: per frame (the
    DiT's frames, one per temporal patch) the fixed level of a given frame or NaN for a denoised one.
    Let ``D`` be the number of denoised frames and ``r`` a denoised frame's rank among them in time order
    (0 for the earliest). The video runs :func:`staggered_steps` ``(n, D, ar_step)`` steps, ending with
    the pack (it joins at ``first = total − that``), and denoised frame ``r`` runs ``sched`` from step
    ``first + ar_step·r`` (:func:`step_levels`):

    - ``ar_step == 0`` (**synchronous**): every denoised frame is on one level at every step;
    - ``ar_step > 0`` (**staggered**, Diffusion Forcing / SkyReels-V2's asynchronous ``ar_step``): frame
      ``r`` lags frame ``r − 1`` by ``ar_step`` steps, so at every step the levels of the denoised frames
      are non-decreasing in the frame index (a later frame is as noisy or noisier), every one runs all
      ``n`` steps of ``sched`` and ends at ``sched[n]`` (0) by step ``total``; frame 0 finishes ``ar_step·(D
      − 1)`` steps before the last.

    A given frame holds its fixed level at every step (start ``total``: it never runs). Returns ``(F,
    total + 1)`` float64 levels and the F start steps.
    """
    n = len(sched) - 1
    denoised = torch.isnan(levels)
    first = total - staggered_steps(n, int(denoised.sum()), ar_step)
    rows, starts, r = [], [], 0
    for f in range(len(levels)):
        if denoised[f]:
            starts.append(first + ar_step * r)
            rows.append(step_levels(sched, starts[-1], total))
            r += 1
        else:
            starts.append(total)
            rows.append(levels[f:f + 1].to(torch.float64).expand(total + 1))
    return torch.stack(rows) if rows else torch.zeros(0, total + 1, dtype=torch.float64), starts


def check_given(given, given_levels, noise: Sequence[torch.Tensor], patch: Sequence[int]
                ) -> tuple[list, list]:
    """Validate ``given`` / ``given_levels`` of :func:`sora_fast.sampling.sample` -> two lists of B entries (None
    where a video has no given frame; levels as float64 ``(T,)`` on the CPU, NaN = denoised)."""
    b = len(noise)
    if (given is None) != (given_levels is None):
        raise ValueError("given and given_levels go together: pass both (one entry per video) or neither")
    if given is None:
        return [None] * b, [None] * b
    given, given_levels = list(given), list(given_levels)
    for name, v in (("given", given), ("given_levels", given_levels)):
        if len(v) != b:
            raise ValueError(f"{name} has {len(v)} entries, expected one per video ({b})")
    pt = int(patch[0])
    lat, lev = [], []
    for i, (z, lv, e) in enumerate(zip(given, given_levels, noise)):
        if (z is None) != (lv is None):
            raise ValueError(f"given[{i}] and given_levels[{i}] must both be None or both be set")
        if z is None:
            lat.append(None)
            lev.append(None)
            continue
        t = e.shape[1]
        if tuple(z.shape) != tuple(e.shape):
            raise ValueError(f"given[{i}] has shape {tuple(z.shape)}, expected its noise's {tuple(e.shape)}")
        lv = torch.as_tensor(lv).detach().to("cpu", torch.float64)
        if tuple(lv.shape) != (t,):
            raise ValueError(f"given_levels[{i}] must have shape ({t},) (one level per latent frame), got "
                             f"{tuple(lv.shape)}")
        fixed = lv[~torch.isnan(lv)]
        if bool(((fixed < 0) | (fixed > 1)).any()):
            raise ValueError(f"given_levels[{i}] must hold levels in [0, 1] (or NaN for a denoised frame), got "
                             f"{fixed.tolist()}")
        if pt > 1:  # the DiT has one timestep per patch frame: a patch frame is given whole or not at all
            if t % pt:
                raise ValueError(f"video {i} has {t} latent frames, not a multiple of the temporal patch {pt}")
            groups = lv.view(-1, pt)
            same = (groups == groups[:, :1]).all(1) | torch.isnan(groups).all(1)
            if not bool(same.all()):
                raise ValueError(f"given_levels[{i}]: every group of {pt} latent frames (one temporal patch) must "
                                 "be all given at one level or all denoised")
        lat.append(z)
        lev.append(lv)
    return lat, lev


def check_finite(tensors: Sequence[torch.Tensor], what: str, names: Optional[Sequence[str]] = None) -> None:
    """Raise a ValueError naming the count of NaN / Inf values of each tensor that has any (never let them
    through to become flat grey frames)."""
    bad = []
    for i, t in enumerate(tensors):
        finite = torch.isfinite(t)
        if not bool(finite.all()):
            n_nan = int(torch.isnan(t).sum())
            n_bad = int((~finite).sum())
            label = names[i] if names is not None else f"video {i}"
            bad.append(f"{label}: {n_bad} of {t.numel()} values ({n_nan} NaN, {n_bad - n_nan} Inf)")
    if bad:
        raise ValueError(f"{what} are not finite -- " + "; ".join(bad)
                         + " (the model diverged or its weights are corrupt; nothing was written)")
