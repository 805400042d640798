"""Flow-matching generation on packed latents: one schedule, three solvers (Euler, UniPC, DPM++), step caches.

Convention (Wan / SD3 rectified flow): ``x_σ = (1 − σ)·x0 + σ·ε``, the DiT predicts ``v = ε − x0`` at
timestep ``1000·σ``, and one Euler step from σ to σ' is ``x ← x + (σ' − σ)·v``. σ runs from 1 (noise)
to 0 (data) on the shifted schedule ``σ' = sσ / (1 + (s − 1)σ)``.

Everything is packed: several prompts at different resolutions and durations denoise in one stream,
and classifier-free guidance puts the conditional and unconditional copies of every video in the same
pack, so each step is **one** DiT forward. Because timesteps are per sequence, each video may use its
own shift (``shift="auto"``: from its token count), which a padded batch could not do.

- :mod:`.schedule`: the levels of every video (shift, editing strength, per-frame held levels) and of every
  frame within it (synchronous or staggered);
- :mod:`.solvers`: the UniPC / DPM-Solver++ coefficients for flow prediction;
- :mod:`.sampler`: :func:`sample` (every solver, every cache) and :func:`sample_euler`;
- :mod:`.cache`: first-block and TeaCache-style step caches, decided per video and per CFG half;
- :mod:`.experts`: :class:`Experts`, several denoisers sharing the noise levels (Wan 2.2 A14B) as one.
"""
from .cache import CACHES, FirstBlockCache, TeaCache, calibrate_teacache, parse_cache
from .experts import Experts
from .sampler import sample, sample_euler
from .schedule import (
    FRAME_SCHEDULES,
    SCHEDULES,
    DenoiseFn,
    check_ar_step,
    check_finite,
    check_given,
    check_sampling,
    check_strength,
    concat_text,
    frame_schedule,
    frame_sigmas,
    schedule_sigmas,
    schedule_timesteps,
    staggered_steps,
    step_levels,
    strength_sigmas,
)
from .solvers import DEFAULT_ORDER, MAX_ORDER, SOLVERS, check_solver

__all__ = ["sample", "sample_euler", "concat_text", "strength_sigmas", "schedule_sigmas", "schedule_timesteps",
           "SCHEDULES", "frame_sigmas", "check_given", "FRAME_SCHEDULES", "frame_schedule", "staggered_steps",
           "step_levels", "check_ar_step", "check_strength", "check_finite", "check_sampling", "check_solver",
           "DenoiseFn", "SOLVERS", "MAX_ORDER", "DEFAULT_ORDER", "CACHES", "FirstBlockCache", "TeaCache",
           "parse_cache", "calibrate_teacache", "Experts"]
