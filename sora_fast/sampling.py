"""Flow-matching generation on packed latents: Euler steps with the resolution shift and packed CFG.

Convention (Wan / SD3 rectified flow): ``x_σ = (1 − σ)·x0 + σ·ε``, the DiT predicts ``v = ε − x0`` at
timestep ``1000·σ``, and one Euler step from σ to σ' is ``x ← x + (σ' − σ)·v``. σ runs from 1 (noise)
to 0 (data) on the shifted schedule ``σ' = sσ / (1 + (s − 1)σ)``.

Everything is packed: several prompts at different resolutions and durations denoise in one stream,
and classifier-free guidance puts the conditional and unconditional copies of every video in the same
pack, so each step is **one** DiT forward. Because timesteps are per sequence, each video may use its
own shift (``shift="auto"``: from its token count), which a padded batch could not do.

Editing (SDEdit) starts a video part-way down its schedule, from its input's latents noised to the
level its ``strength`` gives. :func:`strength_sigmas` is the one place that turns ``(steps, shift,
strength)`` into noise levels; every sampler uses it.

Conditioning (image-to-video, extension, keyframes) gives every latent frame its own noise level: a
*given* frame is held at a fixed level ``σc`` (0 = clean) from ``(1 − σc)·x0 + σc·ε`` and never updated,
the others follow their video's schedule, and the DiT gets per-frame timesteps ``(F,)``.
:func:`frame_sigmas` is the one place that turns a video's schedule and its given levels into per-frame
levels; samplers take them from it.
"""
from __future__ import annotations

import math
from typing import Callable, Optional, Sequence, Union

import torch

from .packing import PackedSequences, PackedVideos, frame_ids, pack_sequences, pack_videos
from .training.flow import resolution_shift, shift_sigmas, sigma_schedule

__all__ = ["concat_text", "sample_euler", "strength_sigmas", "schedule_sigmas", "frame_sigmas", "check_given",
           "check_strength", "check_finite", "SCHEDULES"]

DenoiseFn = Callable[[PackedVideos, torch.Tensor, PackedSequences], torch.Tensor]


def concat_text(*packs: PackedSequences) -> PackedSequences:
    """Packed text streams one after another: sequence order ``packs[0]``'s, then ``packs[1]``'s, ..."""
    seqs = [s for p in packs for s in p.unpack(p.tokens)]
    return pack_sequences(seqs)


def check_sampling(steps, guidance, shift, n: int) -> None:
    """The sampling arguments of ``generate`` and ``generate_long``: ``steps`` a positive int, ``guidance``
    a finite number, ``shift`` as :func:`_check_shift` takes it for ``n`` videos."""
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
SCHEDULES = ("sora_fast", "diffusers_flow_euler")


def schedule_sigmas(steps: int, shift: float, schedule: Optional[dict] = None) -> torch.Tensor:
    """The ``steps + 1`` noise levels (float64, from the start level down to exactly 0) of a full run.

    ``schedule`` None or ``{"kind": "sora_fast"}``: :func:`sigma_schedule` (``shift_sigmas(linspace(1, 0,
    steps + 1))``). ``{"kind": "diffusers_flow_euler", "num_train_timesteps": T}``: what diffusers'
    ``FlowMatchEulerDiscreteScheduler(shift=s, num_train_timesteps=T)`` (no dynamic shifting, no Karras /
    exponential / beta levels) runs: ``linspace(1, m, steps)`` with ``m = shift(1 / T)`` (its smallest
    training level, already shifted), shifted once more, each level rounded to float32 as diffusers holds it,
    then 0. Loading a diffusers pipeline records its scheduler's schedule, so the same steps give the same
    levels and the same video.
    """
    kind = "sora_fast" if schedule is None else schedule.get("kind") if isinstance(schedule, dict) else None
    if kind not in SCHEDULES:
        raise ValueError(f"schedule must be None or a dict with 'kind' one of {', '.join(SCHEDULES)}, got {schedule!r}")
    if kind == "sora_fast":
        return sigma_schedule(steps, shift, dtype=torch.float64)
    import numpy as np

    t = schedule.get("num_train_timesteps", 1000)
    if isinstance(t, bool) or not isinstance(t, int) or t < 1:
        raise ValueError(f"schedule['num_train_timesteps'] must be a positive int, got {t!r}")
    lowest = torch.tensor(1.0, dtype=torch.float32) / t                         # float32, as diffusers' init
    sigma_min = (shift * lowest / (1 + (shift - 1) * lowest)).item()
    levels = np.linspace(1.0 * t, sigma_min * t, steps) / t                    # numpy float64, as set_timesteps
    levels = shift * levels / (1 + (shift - 1) * levels)
    levels = torch.from_numpy(levels).to(torch.float32).to(torch.float64)
    return torch.cat([levels, levels.new_zeros(1)])


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
    0-dim tensor). The result is ``(T,)`` in ``levels``' dtype."""
    return torch.where(torch.isnan(levels), sigma.to(levels.dtype), levels)


def check_given(given, given_levels, noise: Sequence[torch.Tensor], patch: Sequence[int]
                ) -> tuple[list, list]:
    """Validate ``given`` / ``given_levels`` of :func:`sample_euler` -> two lists of B entries (None where a
    video has no given frame; levels as float64 ``(T,)`` on the CPU, NaN = denoised)."""
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


@torch.no_grad()
def sample_euler(denoise: DenoiseFn, noise: Sequence[torch.Tensor], text: PackedSequences, *,
                 patch: Sequence[int] = (1, 2, 2), steps: int = 30, guidance: float = 5.0,
                 uncond_text: Optional[PackedSequences] = None,
                 shift: Union[float, Sequence[float], str] = 5.0,
                 progress: Optional[Callable[[int, int], None]] = None,
                 init: Optional[Sequence[Optional[torch.Tensor]]] = None,
                 strength: Union[float, Sequence[float]] = 1.0,
                 given: Optional[Sequence[Optional[torch.Tensor]]] = None,
                 given_levels: Optional[Sequence[Optional[torch.Tensor]]] = None,
                 schedule: Optional[dict] = None) -> list[torch.Tensor]:
    """Denoise a list of noise latents with flow-matching Euler steps, all videos in one pack.

    Args:
        denoise: ``f(x: PackedVideos, timesteps (B,), text: PackedSequences) -> (N, C·pt·ph·pw)`` velocity
            tokens, e.g. a :class:`sora_fast.models.VideoDiT`.
        noise: B latents ``(C, T, H, W)`` of standard normal noise, any sizes divisible by ``patch``.
        text: packed conditional text, B sequences.
        guidance: CFG scale g; ``v = v_u + g·(v_c − v_u)``. ``g == 1`` or ``uncond_text=None`` runs the
            conditional branch alone; otherwise both branches go in one pack of 2B videos.
        uncond_text: packed unconditional text (e.g. the empty prompt), B sequences.
        shift: the schedule shift s, one for all, one per video, or ``"auto"`` (per video, from its
            token count: :func:`sora_fast.training.flow.resolution_shift`).
        steps: Euler steps of a full (strength 1) schedule.
        progress: called as ``progress(step, total)`` after every DiT forward (``total`` = the most steps
            any video runs).
        init: for editing, B clean latents ``x0`` (each of its noise's shape) or None (generate from noise).
        strength: one number for all videos or one per video, in [0, 1]; video i runs the levels
            :func:`strength_sigmas` gives and starts from ``(1 − σ0)·x0 + σ0·ε`` (``ε`` its noise; exactly
            ``ε`` when ``σ0 = 1``, exactly ``x0`` when strength is 0). A video without ``init`` must have
            strength 1. Videos of different strengths share one pack: each joins when its remaining steps
            begin (all end together), so a video is denoised only over its own steps.
        given, given_levels: conditioning, one entry per video (None: no given frame), both or neither.
            ``given[i]`` is a clean latent ``x0`` of its noise's shape and ``given_levels[i]`` a ``(T,)`` tensor:
            NaN for a latent frame that is denoised, else the fixed level ``σc`` in [0, 1] of a given frame.
            A given frame starts at ``(1 − σc)·x0 + σc·ε`` (exactly ``x0`` when ``σc == 0``) and is never
            updated; at every step the DiT gets per-frame timesteps ``(F,)`` with ``1000·σc`` at given frames
            and the video's level at the others (:func:`frame_sigmas`). In the returned latents a given frame
            holds ``x0`` exactly. With a temporal patch ``pt > 1`` a patch frame is given whole or not at all.
            Without any given frame the DiT gets ``(B,)`` timesteps, as before.
        schedule: the levels of a full run (:func:`schedule_sigmas`; None: sora_fast's own), e.g. a diffusers
            scheduler's, recorded by :meth:`sora_fast.pipeline.VideoPipeline.from_diffusers`.

    Returns the B denoised latents ``(C, T, H, W)`` in the noise's dtype. Non-finite arguments are refused
    up front; latents that end with NaN / Inf values (a diverged or corrupt model) raise a ValueError with
    their count instead of being returned.
    """
    if not isinstance(steps, int) or isinstance(steps, bool) or steps < 1:
        raise ValueError(f"steps must be a positive int, got {steps!r}")
    if isinstance(guidance, bool) or not isinstance(guidance, (int, float)):
        raise TypeError(f"guidance must be a number, got {type(guidance).__name__}")
    if not math.isfinite(guidance):
        raise ValueError(f"guidance must be a finite number, got {guidance!r}")
    x = pack_videos(list(noise), patch=tuple(patch))
    b = x.num_sequences
    if text.num_sequences != b:
        raise ValueError(f"text has {text.num_sequences} sequences, expected one per video ({b})")
    cfg = uncond_text is not None and guidance != 1.0
    if cfg and uncond_text.num_sequences != b:
        raise ValueError(f"uncond_text has {uncond_text.num_sequences} sequences, expected one per video ({b})")

    shifts = _check_shift(shift, b)
    strengths = check_strength(strength, b)
    inits = [None] * b if init is None else list(init)
    if len(inits) != b:
        raise ValueError(f"init has {len(inits)} entries, expected one per video ({b})")
    for i, (z, e, st) in enumerate(zip(inits, noise, strengths)):
        if z is None and st != 1.0:
            raise ValueError(f"strength[{i}]={st} needs an init latent (a video without one starts from noise "
                             "at strength 1)")
        if z is not None and tuple(z.shape) != tuple(e.shape):
            raise ValueError(f"init[{i}] has shape {tuple(z.shape)}, expected its noise's {tuple(e.shape)}")
    g_lat, g_lev = check_given(given, given_levels, noise, patch)
    shifts = [resolution_shift(n) if s == "auto" else s for s, n in zip(shifts, x.seqlens)]
    scheds = [strength_sigmas(steps, s, st, schedule) for s, st in zip(shifts, strengths)]
    total = max(len(sc) - 1 for sc in scheds)                                 # DiT forwards
    first = [total - (len(sc) - 1) for sc in scheds]                          # the step each video joins
    # (B, total+1): a video holds its starting level until it joins, so its dσ is 0 before that
    sigmas = torch.stack([torch.cat([sc[:1].expand(f), sc]) for sc, f in zip(scheds, first)])

    md = torch.promote_types(x.tokens.dtype, torch.float32)                    # state in >= fp32
    start = []
    for z, e, sc in zip(inits, noise, scheds):
        s0 = float(sc[0])
        if z is None or s0 == 1.0:
            start.append(e)
        elif s0 == 0.0:
            start.append(z.to(e.dtype))
        else:
            start.append(((1 - s0) * z.to(md) + s0 * e.to(md)).to(e.dtype))
    for k, (z, lv, e) in enumerate(zip(g_lat, g_lev, noise)):
        if z is None:
            continue
        st = start[k].clone()
        for j in torch.nonzero(~torch.isnan(lv)).flatten().tolist():
            sc = float(lv[j])
            if sc == 0.0:
                st[:, j] = z[:, j].to(e.dtype)
            else:
                st[:, j] = ((1 - sc) * z[:, j].to(md) + sc * e[:, j].to(md)).to(e.dtype)
        start[k] = st
    x = pack_videos(start, patch=tuple(patch))
    conditioned = any(lv is not None for lv in g_lev)
    pt = int(patch[0])
    # per patch frame (the DiT's frame): fixed level (NaN = denoised), for all videos in pack order
    frame_lv = [torch.full((int(g),), float("nan"), dtype=torch.float64) if lv is None else lv[::pt]
                for lv, g in zip(g_lev, x.frames_per_video)]
    fixed_tok = ~torch.isnan(torch.cat(frame_lv))[frame_ids(x).long().cpu()].to(x.tokens.device)  # (N,)
    if cfg:  # the conditional copies, then the unconditional ones, in one stream
        both = pack_videos(start * 2, patch=tuple(patch))
        text_in = concat_text(text, uncond_text)
    else:
        both, text_in = x, text
    seq_ids = x.seq_ids.long()
    tokens = x.tokens.to(md)                                                   # (N, D)
    n = tokens.shape[0]
    cu = x.cu_seqlens.tolist()
    texts = text.unpack(text.tokens)
    utexts = uncond_text.unpack(uncond_text.tokens) if cfg else None
    subs: dict = {}

    def sub_pack(active: tuple):
        """The pack, text and token rows of the videos in ``active`` (those whose steps have begun)."""
        if active not in subs:
            rows = torch.cat([torch.arange(cu[k], cu[k + 1]) for k in active]).to(tokens.device)
            vids = [start[k] for k in active]
            txt = [texts[k] for k in active] + ([utexts[k] for k in active] if cfg else [])
            subs[active] = (pack_videos(vids * (2 if cfg else 1), patch=tuple(patch)), pack_sequences(txt), rows,
                            torch.tensor(active, device=tokens.device))
        return subs[active]

    def timesteps(sig: torch.Tensor, active) -> torch.Tensor:
        """``(B_active,)`` timesteps, or ``(F_active,)`` per-frame ones when any video has given frames."""
        if not conditioned:
            return (sig[list(active)] * 1000).to(md).to(tokens.device)
        lv = torch.cat([frame_sigmas(sig[k], frame_lv[k]) for k in active])
        return (lv * 1000).to(md).to(tokens.device)

    def update(old: torch.Tensor, new: torch.Tensor, fixed: torch.Tensor) -> torch.Tensor:
        return torch.where(fixed[:, None], old, new) if conditioned else new

    for i in range(total):
        sig = sigmas[:, i]                                                     # (B,)
        active = tuple(k for k in range(b) if first[k] <= i)
        t = timesteps(sig, active)
        if len(active) == b:
            inp = torch.cat([tokens, tokens]) if cfg else tokens
            v = denoise(both.with_tokens(inp.to(x.tokens.dtype)), torch.cat([t, t]) if cfg else t, text_in)
            v = v.to(md)                                                       # (N or 2N, D)
            if cfg:
                v_c, v_u = v[:n], v[n:]
                v = v_u + guidance * (v_c - v_u)
            dsig = (sigmas[:, i + 1] - sig).to(md).to(tokens.device)           # (B,)
            tokens = update(tokens, tokens + dsig[seq_ids, None] * v, fixed_tok)
        else:
            pack, txt, rows, ids = sub_pack(active)
            sub = tokens[rows]
            m = sub.shape[0]
            ts = t
            v = denoise(pack.with_tokens((torch.cat([sub, sub]) if cfg else sub).to(x.tokens.dtype)),
                        torch.cat([ts, ts]) if cfg else ts, txt).to(md)
            if cfg:
                v_c, v_u = v[:m], v[m:]
                v = v_u + guidance * (v_c - v_u)
            dsig = (sigmas[:, i + 1] - sig).to(md).to(tokens.device)[seq_ids[rows], None]
            tokens = tokens.index_copy(0, rows, update(sub, sub + dsig * v, fixed_tok[rows]))
        if progress is not None:
            progress(i + 1, total)
    out = x.unpack(tokens.to(x.tokens.dtype))
    for k, (z, lv) in enumerate(zip(g_lat, g_lev)):
        if z is not None:  # a given frame comes back as its clean latent, whatever level it was held at
            keep = ~torch.isnan(lv)
            out[k] = out[k].clone()
            out[k][:, keep] = z[:, keep].to(out[k].dtype)
    check_finite(out, f"the latents after {total} denoising steps")
    return out


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
