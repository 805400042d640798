"""Step caches for the packed sampler: reuse a VideoDiT's deep features on steps where a video's input barely
changed, decided per video and separately for the conditional and unconditional CFG halves ("streams").

Each step, every stream of the pack is embedded (and, for the first-block cache, runs block 0); a cheap
probe decides per stream whether the rest of the network must run. Only the streams that must are run,
as a sub-pack of their own tokens, so one slow-changing video does not hold the others back; the others
add their cached residual (last computed output of the blocks minus their input) and go through the
output head. Every stream computes on its first step and on the last step.

- :class:`FirstBlockCache` (``"first-block:0.05"``, ParaAttention's / diffusers' FirstBlockCache): the probe
  is block 0's residual ``r``; the rest runs when ``mean|r − r_ref| / mean|r_ref| > threshold``, ``r_ref``
  the residual of the last computed step.
- :class:`TeaCache` (``"teacache:0.1"``, TeaCache): the probe is block 0's timestep-modulated input ``y``;
  ``acc += poly(mean|y − y_prev| / mean|y_prev|)`` each step (``y_prev`` the previous step's) and the network
  runs, resetting ``acc`` to 0, once ``acc >= threshold``. ``poly`` rescales the input change to the output
  change; :func:`calibrate_teacache` fits it on the model.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Optional, Sequence

import torch

from .. import ops
from ..packing import PackedSequences, PackedVideos, frame_ids, pack_sequences, select_videos

__all__ = ["CACHES", "FirstBlockCache", "TeaCache", "parse_cache", "start_cache", "calibrate_teacache"]

CACHES = ("first-block", "teacache")


def _check_threshold(v, name: str) -> float:
    if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v) or v < 0:
        raise ValueError(f"{name} must be a finite number >= 0, got {v!r}")
    return float(v)


@dataclass(frozen=True)
class FirstBlockCache:
    """Reuse blocks 1.. of a stream while block 0's residual changed by at most ``threshold`` (relative L1)."""

    threshold: float = 0.05

    def __post_init__(self):
        _check_threshold(self.threshold, "FirstBlockCache.threshold")

    def spec(self) -> str:
        return f"first-block:{self.threshold:g}"


@dataclass(frozen=True)
class TeaCache:
    """Reuse every block of a stream while the accumulated, rescaled relative L1 change of block 0's modulated
    input stays under ``threshold``. ``coefficients``: the rescaling polynomial, highest degree first
    (``numpy.polyval`` order); the default ``(1, 0)`` is the identity. ``probe``: a list to which every step
    appends ``(input change, output change)`` per stream, with every step computed (calibration)."""

    threshold: float = 0.1
    coefficients: tuple = (1.0, 0.0)
    probe: Optional[list] = field(default=None, compare=False, repr=False)

    def __post_init__(self):
        _check_threshold(self.threshold, "TeaCache.threshold")
        c = self.coefficients
        if not isinstance(c, (tuple, list)) or not c or not all(
                isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v) for v in c):
            raise ValueError(f"TeaCache.coefficients must be a non-empty list of finite numbers (highest degree "
                             f"first), got {c!r}")
        object.__setattr__(self, "coefficients", tuple(float(v) for v in c))

    def spec(self) -> str:
        poly = "" if self.coefficients == (1.0, 0.0) else ":" + ",".join(f"{v:.6g}" for v in self.coefficients)
        return f"teacache:{self.threshold:g}{poly}"

    def rescale(self, rel: float) -> float:
        out = 0.0
        for c in self.coefficients:
            out = out * rel + c
        return out


def parse_cache(cache):
    """``None`` | a :class:`FirstBlockCache` / :class:`TeaCache` | a spec string -> None or a cache object.

    Specs: ``"first-block:THRESH"``, ``"teacache:THRESH"`` or ``"teacache:THRESH:C_n,...,C_0"`` (the rescaling
    polynomial, highest degree first, as :func:`calibrate_teacache` prints it)."""
    if cache is None or isinstance(cache, (FirstBlockCache, TeaCache)):
        return cache
    if not isinstance(cache, str):
        raise TypeError(f"cache must be None, a spec string such as 'first-block:0.05' or 'teacache:0.1', or a "
                        f"FirstBlockCache / TeaCache, got {type(cache).__name__}")
    name, _, rest = cache.partition(":")
    thresh, _, poly = rest.partition(":")
    if name not in CACHES or not thresh or (poly and name != "teacache"):
        raise ValueError(f"cache must be 'first-block:THRESH' or 'teacache:THRESH[:C_n,...,C_0]' (e.g. "
                         f"'first-block:0.05'), got {cache!r}")
    try:
        t = float(thresh)
        coef = tuple(float(v) for v in poly.split(",")) if poly else (1.0, 0.0)
    except ValueError:
        raise ValueError(f"cache {cache!r}: the threshold and coefficients must be numbers") from None
    return FirstBlockCache(_check_threshold(t, "the cache threshold")) if name == "first-block" else \
        TeaCache(_check_threshold(t, "the cache threshold"), coef)


def start_cache(cache, denoise, streams: int):
    """A fresh per-call cache state over ``streams`` streams, or None without a cache. ``denoise``: a VideoDiT,
    or an :class:`~sora_fast.sampling.Experts` of VideoDiTs (one cache state per expert)."""
    cfg = parse_cache(cache)
    if cfg is None:
        return None
    from ..models.dit import VideoDiT
    from .experts import Experts

    if isinstance(denoise, Experts):
        for k, e in enumerate(denoise.experts):
            if not isinstance(e, VideoDiT):
                raise TypeError(f"a step cache runs each expert block by block and needs every expert to be a "
                                f"sora_fast VideoDiT, got {type(e).__name__} for expert {k} (leave cache None with "
                                f"custom or parallel experts)")
        return _ExpertsRun(denoise, [_CacheRun(cfg, e, streams) for e in denoise.experts])
    if not isinstance(denoise, VideoDiT):
        raise TypeError(f"a step cache runs the DiT block by block and needs denoise to be a sora_fast VideoDiT, got "
                        f"{type(denoise).__name__} (leave cache None with a custom or parallel denoiser)")
    return _CacheRun(cfg, denoise, streams)


def _rel_l1(a: torch.Tensor, ref: torch.Tensor) -> float:
    return float((a - ref).abs().mean() / ref.abs().mean().clamp_min(1e-30))


def _select(x: PackedVideos, text: PackedSequences, keep: list[int]):
    """The sub-pack of sequences ``keep``: ``(x_sub, text_sub, token rows, frame rows, text rows)``."""
    xs, rows, frows = select_videos(x, keep)
    tcu = text.cu_seqlens.tolist()
    trows = torch.cat([torch.arange(tcu[k], tcu[k + 1]) for k in keep]).to(x.tokens.device)
    ts = pack_sequences([text.tokens[tcu[k]:tcu[k + 1]] for k in keep])
    return xs, ts, rows, frows, trows


class _CacheRun:
    """One sampling call's cache state: per stream, the reference probe, the cached residual, TeaCache's
    accumulator. Called once per step with the pack the sampler would give the DiT."""

    def __init__(self, cfg, dit, streams: int):
        self.cfg, self.dit = cfg, dit
        self.ref: list = [None] * streams       # FBC: block-0 residual of the last computed step; Tea: last input
        self.res: list = [None] * streams       # output of the blocks minus their input, last computed step
        self.acc = [0.0] * streams

    def _decide(self, s: int, probe: torch.Tensor, fresh: bool) -> bool:
        cfg, ref = self.cfg, self.ref[s]
        if isinstance(cfg, FirstBlockCache):
            run = fresh or ref is None or self.res[s] is None or _rel_l1(probe, ref) > cfg.threshold
            if run:
                self.ref[s] = probe
            return run
        rel = None if ref is None else _rel_l1(probe, ref)
        self.ref[s] = probe
        if fresh or rel is None or self.res[s] is None or cfg.probe is not None:
            self.acc[s] = 0.0
            return True
        self.acc[s] += cfg.rescale(rel)
        if self.acc[s] < cfg.threshold:
            return False
        self.acc[s] = 0.0
        return True

    def __call__(self, x: PackedVideos, timesteps: torch.Tensor, text: PackedSequences, streams: Sequence[int],
                 fresh: Sequence[bool]):
        """-> ``(velocity (N, D_out), the streams whose every block ran)``."""
        dit, fbc = self.dit, isinstance(self.cfg, FirstBlockCache)
        eps = dit.config.eps
        ids, h, y, mods, norms, context, backends = dit.embed(x, timesteps, text)      # (N, D) h, y
        cu = x.cu_seqlens.tolist()
        first = 0
        if fbc:
            h0 = h
            h, y = dit.blocks[0](h, y, mods[0], *norms[0], x, context, text, backends, ids)   # (N, D), (N, D)
            probe, first = h - h0, 1
        else:
            probe = y
        inp_rel = [None] * len(streams)
        if self.cfg.__class__ is TeaCache and self.cfg.probe is not None:
            inp_rel = [None if self.ref[s] is None else _rel_l1(probe[cu[k]:cu[k + 1]], self.ref[s])
                       for k, s in enumerate(streams)]
        run = [k for k, s in enumerate(streams) if self._decide(s, probe[cu[k]:cu[k + 1]].clone(), fresh[k])]
        h_out = h.clone()
        y_out = None
        if run:
            xs, ts, rows, frows, trows = _select(x, text, run) if len(run) < len(streams) else \
                (x, text, None, None, None)
            sub = (lambda t: t) if rows is None else (lambda t: t[rows])
            hs, ys, cs = sub(h), sub(y), context if trows is None else context[trows]
            ids_s = ids if rows is None else frame_ids(xs)
            fsel = (lambda t: t) if frows is None else (lambda t: t[:, frows])
            h_in = hs
            for blk, mod, (shift, scale) in list(zip(dit.blocks, mods, norms))[first:]:
                sh, sc = (shift, scale) if frows is None else (shift[frows], scale[frows])
                hs, ys = blk(hs, ys, fsel(mod), sh, sc, xs, cs, ts, backends, ids_s)    # (M, D), (M, D)
            lens = xs.seqlens
            off = 0
            for k, n in zip(run, lens):
                out = hs[off:off + n]
                if self.cfg.__class__ is TeaCache and self.cfg.probe is not None and self.res[streams[k]] is not None:
                    new_res = out - h_in[off:off + n]
                    if inp_rel[k] is not None:
                        self.cfg.probe.append((inp_rel[k], _rel_l1(new_res, self.res[streams[k]])))
                self.res[streams[k]] = out - h_in[off:off + n]
                off += n
            if rows is None:
                h_out, y_out = hs, ys
            else:
                h_out = h_out.index_copy(0, rows, hs)
        if y_out is None:
            reused = [k for k in range(len(streams)) if k not in run]
            for k in reused:
                h_out[cu[k]:cu[k + 1]] = h[cu[k]:cu[k + 1]] + self.res[streams[k]]
            shift, scale = norms[-1]
            y_out = ops.adaln_modulate(h_out, shift, scale, ids, eps=eps, backend=backends["adaln"])  # (N, D)
            if run:
                y_out = y_out.index_copy(0, rows, ys)            # the computed streams' fused head norm, as forward
        return dit.proj_out(y_out), [streams[k] for k in run]


class _ExpertsRun:
    """The cache state of an :class:`~sora_fast.sampling.Experts` denoiser: one :class:`_CacheRun` per expert,
    so a stream never reuses another expert's residual and TeaCache's accumulator starts over on each expert.
    Each step, the streams go to the cache run of their video's expert (by its step timestep); streams on
    different experts in one step (editing strengths, per-video shifts) are split into one sub-pack per expert,
    as :meth:`Experts.__call__` does. A stream's first step on an expert always computes (the expert's state
    holds nothing for it yet; the sampler also marks it ``fresh``)."""

    def __init__(self, experts, runs: list):
        self.experts, self.runs = experts, runs

    def __call__(self, x: PackedVideos, timesteps: torch.Tensor, text: PackedSequences, streams: Sequence[int],
                 fresh: Sequence[bool], step: torch.Tensor):
        """``step``: ``(B,)`` each sequence's step timestep. -> ``(velocity (N, D_out), the streams computed)``."""
        from .experts import split_by_expert

        which = [self.experts.index(t) for t in step.tolist()]
        v, ran = split_by_expert(which, x, timesteps, text, lambda k, xs, ts, txt, keep: self.runs[k](
            xs, ts, txt, [streams[i] for i in keep], [fresh[i] for i in keep]))
        return v, [s for r in ran for s in r]


def calibrate_teacache(dit, noise: Sequence[torch.Tensor], text: PackedSequences, *, degree: int = 4,
                       **sample_kwargs) -> tuple:
    """Fit TeaCache's rescaling polynomial on ``dit``: sample ``noise`` with every step computed, record per
    stream and step the relative L1 change of block 0's modulated input (x) and of the blocks' residual
    (y), and least-squares fit ``y ≈ poly(x)`` of ``degree``. Returns the coefficients, highest degree first
    (pass them as ``TeaCache(threshold, coefficients)`` or the spec ``"teacache:T:" + ",".join(...)``).
    ``sample_kwargs`` go to :func:`sora_fast.sampling.sample` (steps, guidance, uncond_text, solver, ...)."""
    import numpy as np

    from .sampler import sample

    if isinstance(degree, bool) or not isinstance(degree, int) or not 1 <= degree <= 8:
        raise ValueError(f"degree must be an int in 1..8, got {degree!r}")
    pairs: list = []
    sample(dit, noise, text, cache=TeaCache(0.0, probe=pairs), **sample_kwargs)
    if len(pairs) <= degree:
        raise ValueError(f"calibration recorded {len(pairs)} (input, output) changes, need more than degree={degree}: "
                         "use more steps or videos")
    xs, ys = np.array([p[0] for p in pairs]), np.array([p[1] for p in pairs])
    return tuple(float(c) for c in np.polyfit(xs, ys, degree))

