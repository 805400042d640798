"""The sampler loop: packed videos, packed CFG in one forward, per-video schedules and per-frame held levels,
for every solver (Euler, UniPC, DPM++) and every step cache."""
from __future__ import annotations

import math
from typing import Callable, Optional, Sequence, Union

import torch

from ..packing import PackedSequences, frame_ids, pack_sequences, pack_videos
from ..reference._order import check_order
from ..training.flow import resolution_shift
from .schedule import (
    DenoiseFn,
    _check_shift,
    check_ar_step,
    check_finite,
    check_given,
    check_strength,
    concat_text,
    frame_schedule,
    frame_sigmas,
    schedule_timesteps,
    staggered_steps,
    step_levels,
    strength_sigmas,
)
from .solvers import check_solver, dpmpp_step, solver_levels, step_orders, unipc_corrector, unipc_predictor

__all__ = ["sample", "sample_euler"]


class _Multistep:
    """UniPC / DPM++ state over the packed tokens: the last data predictions (newest first), UniPC's last
    corrected state, and per unit (a video, or a frame under a staggered schedule) its levels, start step,
    step count and step orders. Every update is the linear combination :mod:`.solvers` gives, with one row
    of float64 coefficients per unit; a unit before its start or after its last step is held."""

    def __init__(self, solver: str, order: int, variant: str, levels: torch.Tensor, first: list[int],
                 steps: list[int], unit_ids: torch.Tensor):
        self.solver, self.variant, self.levels, self.first, self.seq = solver, variant, levels, first, unit_ids
        self.steps = steps
        self.orders = [step_orders(solver, order, n) for n in steps]            # per unit, its own steps
        self.hist: list[torch.Tensor] = []                                      # D_j, D_{j-1}, ... (N, D)
        self.last: Optional[torch.Tensor] = None

    def _sigs(self, k: int, i: int, n: int) -> list[float]:
        """Levels of video k at global steps i, i-1, ..., i-n+1 (newest first)."""
        return [float(self.levels[k, i - m]) for m in range(n)]

    def _apply(self, rows: torch.Tensor, terms: Sequence[torch.Tensor]) -> torch.Tensor:
        """``Σ_m rows[:, m][seq]·terms[m]`` with ``rows`` ``(B, M)`` float64 coefficients."""
        c = rows.to(terms[0].dtype).to(terms[0].device)[self.seq]               # (N, M)
        out = c[:, :1] * terms[0]
        for m in range(1, len(terms)):
            out = out + c[:, m:m + 1] * terms[m]
        return out

    def step(self, i: int, x: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        """Global step i: ``x`` ``(N, D)`` the state the model saw, ``v`` its velocity (0 on inactive videos)."""
        b = self.levels.shape[0]
        sig = self.levels[:, i].to(x.dtype).to(x.device)[self.seq, None]        # (N, 1)
        d = x - sig * v                                                         # data prediction (N, D)
        hist = [d] + self.hist
        h = len(hist)
        if self.solver == "unipc" and self.last is not None:                    # UniC: [x, last, D_0, D_1...]
            rows = torch.zeros(b, 2 + h, dtype=torch.float64)
            for k in range(b):
                j = i - self.first[k]
                if j < 1 or j >= self.steps[k]:                                 # the last step is never corrected
                    rows[k, 0] = 1.0
                    continue
                p = self.orders[k][j - 1]
                a, c = unipc_corrector(float(self.levels[k, i]), self._sigs(k, i - 1, p), p, self.variant)
                rows[k, 1], rows[k, 2:2 + len(c)] = a, torch.tensor(c, dtype=torch.float64)
            x = self._apply(rows, [x, self.last, *hist])
        rows = torch.zeros(b, 1 + h, dtype=torch.float64)                       # predictor: [x, D_0, D_1...]
        for k in range(b):
            j = i - self.first[k]
            if j < 0 or j >= self.steps[k]:
                rows[k, 0] = 1.0
                continue
            p, nxt = self.orders[k][j], float(self.levels[k, i + 1])
            if self.solver == "unipc":
                a, c = unipc_predictor(nxt, self._sigs(k, i, p), p, self.variant)
            else:
                a, c = dpmpp_step(nxt, self._sigs(k, i, p), p)
            rows[k, 0], rows[k, 1:1 + len(c)] = a, torch.tensor(c, dtype=torch.float64)
        self.last = x
        self.hist = hist[:max((max(o) for o in self.orders if o), default=1)]
        return self._apply(rows, [x, *hist])


@torch.no_grad()
def sample(denoise: DenoiseFn, noise: Sequence[torch.Tensor], text: PackedSequences, *,
           solver: str = "euler", order: Optional[int] = None, variant: str = "bh2", cache=None,
           patch: Sequence[int] = (1, 2, 2), steps: int = 30, guidance: Union[float, Sequence[float]] = 5.0,
           uncond_text: Optional[PackedSequences] = None,
           shift: Union[float, Sequence[float], str] = 5.0,
           progress: Optional[Callable[[int, int], None]] = None,
           init: Optional[Sequence[Optional[torch.Tensor]]] = None,
           strength: Union[float, Sequence[float]] = 1.0,
           given: Optional[Sequence[Optional[torch.Tensor]]] = None,
           given_levels: Optional[Sequence[Optional[torch.Tensor]]] = None,
           stats: Optional[dict] = None, schedule: Optional[dict] = None, token_order: Optional[str] = None,
           token_tile: Optional[Sequence[int]] = None, ar_step: int = 0) -> list[torch.Tensor]:
    """Denoise a list of noise latents, all videos in one pack, with a flow-matching solver.

    Args:
        denoise: ``f(x: PackedVideos, timesteps (B,), text: PackedSequences) -> (N, C·pt·ph·pw)`` velocity
            tokens, e.g. a :class:`sora_fast.models.VideoDiT`, or an :class:`~sora_fast.sampling.Experts` of several
            (Wan 2.2 A14B's high- and low-noise experts), which also gets ``step``: each video's step timestep, the
            timestep of its denoised frames, by which it picks the video's expert (given frames do not count).
        noise: B latents ``(C, T, H, W)`` of standard normal noise, any sizes divisible by ``patch``.
        text: packed conditional text, B sequences.
        solver: ``"euler"`` (one model call per step, ``x ← x + (σ' − σ)·v``), ``"unipc"`` (UniPC, predictor
            and corrector, ``order`` 1-3, default 2; ``variant`` ``"bh1"`` or ``"bh2"``) or ``"dpm++"``
            (DPM-Solver++ multistep, ``order`` 1-2, default 2: "2M"). All take one model call per step; see
            :mod:`sora_fast.sampling.solvers` for the math and where it meets diffusers' schedulers.
        cache: None, a spec string (``"first-block:0.05"``, ``"teacache:0.1"``) or a cache object of
            :mod:`sora_fast.sampling.cache`: reuse the DiT's deep features on steps where a video's input
            barely changed, decided per video and per CFG half; ``denoise`` must then be a VideoDiT or an
            ``Experts`` of VideoDiTs (one cache state per expert; a video's first and last step on each expert
            always compute, and videos on different experts at one step run as one sub-pack per expert).
        guidance: CFG scale g; ``v = v_u + g·(v_c − v_u)``. ``g == 1`` or ``uncond_text=None`` runs the
            conditional branch alone; otherwise both branches go in one pack of 2B videos. With an ``Experts``
            denoiser, one number for all or one per expert (each video takes its step's expert's).
        uncond_text: packed unconditional text (e.g. the empty prompt), B sequences.
        shift: the schedule shift s, one for all, one per video, or ``"auto"`` (per video, from its
            token count: :func:`sora_fast.training.flow.resolution_shift`).
        steps: solver steps of a full (strength 1) schedule.
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
        ar_step: the schedule within a video (:func:`~.schedule.frame_schedule`, the one place it is decided):
            0 (synchronous, the default) puts every denoised frame of a video on its level at every step;
            ``k > 0`` staggers them (Diffusion Forcing; SkyReels-V2's asynchronous ``ar_step``): the r-th
            denoised frame (a DiT frame, one per temporal patch, counted in time order) runs the video's levels
            ``k·r`` steps after the first, so later frames are noisier at every step and all end at 0; a video of
            ``n`` steps and ``D`` denoised frames then takes ``n + k·(D − 1)`` DiT forwards, and the DiT gets
            per-frame timesteps (each frame's ``1000·σ``, also under a recorded ``schedule``). Given frames are
            held as above. Not with an ``Experts`` denoiser (ValueError).
        schedule: the levels of a full run (:func:`~.schedule.schedule_sigmas`; None: sora_fast's own), e.g. a
            diffusers scheduler's, recorded by :meth:`sora_fast.pipeline.VideoPipeline.from_diffusers`; the model
            sees that scheduler's timesteps (:func:`~.schedule.schedule_timesteps`) at the denoised frames, else
            ``1000·σ``. An edit (strength < 1) takes sora_fast's levels and ``1000·σ``.
        stats: a dict to fill: ``evaluations`` (per video, full DiT evaluations of its copies, CFG halves
            counted apart) and ``forwards`` (DiT calls).
        token_order, token_tile: the order of the tokens in the packs ``denoise`` gets
            (:func:`sora_fast.packing.pack_videos`'s ``order`` and ``tile``); None: ``denoise.config``'s
            ``token_order`` / ``token_tile`` when it has them (a :class:`~sora_fast.models.VideoDiT`), else
            ``"t-major"``. The returned latents do not depend on it beyond rounding.

    Returns the B denoised latents ``(C, T, H, W)`` in the noise's dtype. Non-finite arguments are refused
    up front; latents that end with NaN / Inf values (a diverged or corrupt model) raise a ValueError with
    their count instead of being returned.
    """
    from .cache import start_cache
    from .experts import Experts

    solver, order, variant = check_solver(solver, order, variant)
    if not isinstance(steps, int) or isinstance(steps, bool) or steps < 1:
        raise ValueError(f"steps must be a positive int, got {steps!r}")
    experts = denoise if isinstance(denoise, Experts) else None
    guidances = _check_guidance(guidance, experts)
    if stats is not None and not isinstance(stats, dict):
        raise TypeError(f"stats must be a dict (filled with the evaluation counts) or None, got {type(stats).__name__}")
    layout = _token_layout(denoise, token_order, token_tile, patch)

    def pack(latents):
        return pack_videos(latents, **layout)

    x = pack(list(noise))
    b = x.num_sequences
    if text.num_sequences != b:
        raise ValueError(f"text has {text.num_sequences} sequences, expected one per video ({b})")
    cfg = uncond_text is not None and any(g != 1.0 for g in guidances)
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
    ar_step = check_ar_step(ar_step)
    if ar_step and experts is not None:
        raise ValueError(f"ar_step={ar_step} (a staggered schedule) cannot run an Experts denoiser: the experts are "
                         "picked per video by its step timestep, and staggered frames have one each; use ar_step=0")
    runner = start_cache(cache, denoise, 2 * b if cfg else b)
    shifts = [resolution_shift(n) if s == "auto" else s for s, n in zip(shifts, x.seqlens)]
    scheds = [strength_sigmas(steps, s, st, schedule) for s, st in zip(shifts, strengths)]
    pt = int(patch[0])
    # per patch frame (the DiT's frame): fixed level (NaN = denoised), for all videos in pack order
    frame_lv = [torch.full((int(g),), float("nan"), dtype=torch.float64) if lv is None else lv[::pt]
                for lv, g in zip(g_lev, x.frames_per_video)]
    spans = [staggered_steps(len(sc) - 1, int(torch.isnan(lv).sum()), ar_step) for sc, lv in zip(scheds, frame_lv)]
    total = max(spans)                                                        # DiT forwards
    first = [total - n for n in spans]                                        # the step each video joins
    # units: the rows that share one level per step -- videos, or under a staggered schedule every frame
    if ar_step == 0:  # (B, total+1): a video holds its starting level until it joins, so its dσ is 0 before that
        sigmas = torch.stack([step_levels(sc, f, total) for sc, f in zip(scheds, first)])
        unit_first, unit_steps, unit_ids = first, [len(sc) - 1 for sc in scheds], x.seq_ids.long()
    else:  # (F, total+1), every frame of the pack
        tables = [frame_schedule(sc, lv, total, ar_step) for sc, lv in zip(scheds, frame_lv)]
        sigmas = torch.cat([t for t, _ in tables])
        unit_first = [s for _, st in tables for s in st]
        unit_steps = [len(sc) - 1 if torch.isnan(v) else 0 for sc, lv in zip(scheds, frame_lv) for v in lv]
        unit_ids = frame_ids(x).long()
    frame_rows = torch.cumsum(torch.tensor([0] + [len(lv) for lv in frame_lv]), 0).tolist()
    levels = sigmas if solver == "euler" else solver_levels(sigmas)          # what the model and the solver see
    step_t = None
    if ar_step == 0:
        # (B, total): the timestep of each video's denoised frames at every step: its scheduler's, else 1000·σ
        step_t = levels[:, :-1] * 1000
        for k, (s, st) in enumerate(zip(shifts, strengths)):
            ts = schedule_timesteps(steps, s, schedule) if st == 1.0 else None
            if ts is not None:
                step_t[k, first[k]:] = ts

    md = torch.promote_types(x.tokens.dtype, torch.float32)                    # state in >= fp32
    start = []
    for z, e, sc, st in zip(inits, noise, scheds, strengths):
        s0 = float(sc[0])
        if z is None or s0 == 1.0 or st == 1.0:                                # strength 1: from noise
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
    x = pack(start)
    conditioned = any(lv is not None for lv in g_lev)
    fixed_tok = ~torch.isnan(torch.cat(frame_lv))[frame_ids(x).long().cpu()].to(x.tokens.device)  # (N,)
    tokens = x.tokens.to(md)                                                   # (N, D)
    cu = x.cu_seqlens.tolist()
    texts = text.unpack(text.tokens)
    utexts = uncond_text.unpack(uncond_text.tokens) if cfg else None
    unit_ids = unit_ids.to(tokens.device)
    multistep = None if solver == "euler" else _Multistep(solver, order, variant, levels, unit_first, unit_steps,
                                                          unit_ids)
    evaluations = [0] * b
    subs: dict = {}

    def sub_pack(active: tuple):
        """The pack (both CFG halves), text and token rows of the videos in ``active`` (rows None: all)."""
        if active not in subs:
            if len(active) == b:
                both = pack(start * 2) if cfg else x
                subs[active] = (both, concat_text(text, uncond_text) if cfg else text, None)
            else:
                rows = torch.cat([torch.arange(cu[k], cu[k + 1]) for k in active]).to(tokens.device)
                vids = [start[k] for k in active]
                txt = [texts[k] for k in active] + ([utexts[k] for k in active] if cfg else [])
                subs[active] = (pack(vids * (2 if cfg else 1)), pack_sequences(txt), rows)
        return subs[active]

    def timesteps(i: int, active) -> torch.Tensor:
        """``(B_active,)`` timesteps, or ``(F_active,)`` per-frame ones when any video has given frames or the
        schedule is staggered (then every frame's ``1000·σ``)."""
        if ar_step:
            sig = levels[:, i]
            lv = torch.cat([frame_sigmas(sig[frame_rows[k]:frame_rows[k + 1]], frame_lv[k]) for k in active])
            return (lv * 1000).to(md).to(tokens.device)
        if not conditioned:
            return step_t[list(active), i].to(md).to(tokens.device)
        lv = torch.cat([frame_sigmas(step_t[k, i], frame_lv[k] * 1000) for k in active])
        return lv.to(md).to(tokens.device)

    def guidance_rows(i: int, active: tuple, seq: torch.Tensor) -> Union[float, torch.Tensor]:
        """The CFG scale of the conditional tokens (``seq`` their video in ``active``): one number, or ``(M, 1)``
        when the videos' experts take different scales."""
        g = [guidances[0 if experts is None else experts.index(step_t[k, i])] for k in active]
        if len(set(g)) == 1:
            return g[0]
        return torch.tensor(g, dtype=md, device=tokens.device)[seq.long(), None]

    def velocity(i: int, active: tuple) -> torch.Tensor:
        """The guided velocity ``(N, D)`` at step i (zero rows for the videos not yet active)."""
        pack, txt, rows = sub_pack(active)
        sub = tokens if rows is None else tokens[rows]
        m = sub.shape[0]
        t = timesteps(i, active)
        inp = pack.with_tokens((torch.cat([sub, sub]) if cfg else sub).to(x.tokens.dtype))
        tt = torch.cat([t, t]) if cfg else t
        st = None if experts is None else step_t[list(active), i]           # (B_active,) float64, on the host
        if runner is None:
            v = denoise(inp, tt, txt) if st is None else denoise(inp, tt, txt, step=torch.cat([st, st]) if cfg else st)
            for k in active:
                evaluations[k] += 2 if cfg else 1
        else:
            streams = list(active) + ([b + k for k in active] if cfg else [])
            fresh = [i == first[s % b] or i == total - 1 for s in streams]
            if st is None:
                v, ran = runner(inp, tt, txt, streams, fresh)
            else:  # also fresh: a video's first and last step on each expert
                ex = [experts.index(step_t[s % b, j]) if 0 <= j < total else None
                      for s in streams for j in (i - 1, i, i + 1)]
                fresh = [f or ex[3 * n] != ex[3 * n + 1] or ex[3 * n + 2] != ex[3 * n + 1]
                         for n, f in enumerate(fresh)]
                v, ran = runner(inp, tt, txt, streams, fresh, torch.cat([st, st]) if cfg else st)
            for s in ran:
                evaluations[s % b] += 1
        v = v.to(md)                                                           # (M or 2M, D)
        if cfg:
            v_c, v_u = v[:m], v[m:]
            v = v_u + guidance_rows(i, active, pack.seq_ids[:m]) * (v_c - v_u)
        return v if rows is None else torch.zeros_like(tokens).index_copy(0, rows, v)

    for i in range(total):
        active = tuple(k for k in range(b) if first[k] <= i)
        v = velocity(i, active)
        if multistep is None:
            dsig = (sigmas[:, i + 1] - sigmas[:, i]).to(md).to(tokens.device)  # (units,); 0 while a unit waits
            new = tokens + dsig[unit_ids, None] * v
        else:
            new = multistep.step(i, tokens, v)
        tokens = torch.where(fixed_tok[:, None], tokens, new) if conditioned else new
        if progress is not None:
            progress(i + 1, total)
    if stats is not None:
        stats.update(evaluations=evaluations, forwards=total)
    out = x.unpack(tokens.to(x.tokens.dtype))
    for k, (z, lv) in enumerate(zip(g_lat, g_lev)):
        if z is not None:  # a given frame comes back as its clean latent, whatever level it was held at
            keep = ~torch.isnan(lv)
            out[k] = out[k].clone()
            out[k][:, keep] = z[:, keep].to(out[k].dtype)
    check_finite(out, f"the latents after {total} denoising steps")
    return out


def _check_guidance(guidance, experts) -> list[float]:
    """``guidance`` as one CFG scale per expert (a list of one without experts), checked."""
    n = 1 if experts is None else len(experts)
    values = list(guidance) if isinstance(guidance, (list, tuple)) else [guidance] * n
    if isinstance(guidance, (list, tuple)) and len(values) != n:
        if experts is None:
            raise ValueError(f"guidance must be a number (a list, one per expert, needs an Experts denoiser), got "
                             f"{guidance!r}")
        raise ValueError(f"guidance must be a number or a list of {n} (one per expert of the Experts denoiser), got "
                         f"a list of {len(values)}")
    for g in values:
        if isinstance(g, bool) or not isinstance(g, (int, float)):
            raise TypeError(f"guidance must be a number, got {type(g).__name__}")
        if not math.isfinite(g):
            raise ValueError(f"guidance must be a finite number, got {g!r}")
    return [float(g) for g in values]


def _token_layout(denoise, token_order, token_tile, patch) -> dict:
    """``pack_videos`` keywords: the patch, and the token order given or ``denoise.config``'s (else t-major)."""
    config = getattr(denoise, "config", None)
    if token_order is None:
        token_order = getattr(config, "token_order", "t-major")
        token_tile = getattr(config, "token_tile", None) if token_tile is None else token_tile
    order, tile = check_order(token_order, token_tile, name="token_order", tile_name="token_tile")
    return {"patch": tuple(patch), "order": order, "tile": tile}


def sample_euler(denoise: DenoiseFn, noise: Sequence[torch.Tensor], text: PackedSequences, **kwargs
                 ) -> list[torch.Tensor]:
    """:func:`sample` with ``solver="euler"``: flow-matching Euler steps, ``x ← x + (σ' − σ)·v`` (same
    arguments, same results bit for bit)."""
    if "solver" in kwargs:
        raise TypeError("sample_euler takes no solver argument (it is sample(..., solver='euler'))")
    return sample(denoise, noise, text, solver="euler", **kwargs)
