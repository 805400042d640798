"""Multistep solvers for rectified flow: the coefficients of UniPC (bh1 / bh2, orders 1-3) and DPM-Solver++
(orders 1-2, "2M") in the data-prediction form, per video and per step, in float64.

With ``x_σ = (1 − σ)·x0 + σ·ε`` a flow model's velocity ``v`` gives the data prediction ``D = x − σ·v``, and
in ``λ = log((1 − σ)/σ)`` (half the log-SNR) both solvers are exponential integrators of the ODE for ``x/σ``.
Every step they take is *linear* in the state and the last few data predictions:

    x_next = a·x + Σ_m c_m·D_m        (D_0 the newest)

so this module only computes ``(a, c)`` from a video's levels (scalars, float64 on the host); the sampler
applies them to the packed tokens with one row of coefficients per video. The math is diffusers'
``UniPCMultistepScheduler`` / ``DPMSolverMultistepScheduler`` with ``prediction_type="flow_prediction"``,
``use_flow_sigmas=True``, ``final_sigmas_type="zero"`` and ``lower_order_final=True`` (what Wan2.1 samples
with), rewritten as coefficients:

- a level of exactly 1 (pure noise) is taken as ``1 − 1e-6`` (:data:`TOP_LEVEL`), as diffusers does with
  flow sigmas, so that λ is finite; the model sees that level too;
- the order warms up (``min(order, j + 1)`` at a video's step j) and the last step, to σ = 0, is first
  order: it returns the data prediction ``D_0`` exactly. (diffusers' bh1 computes ``B(h)·0`` with
  ``B(h) = −∞`` there and returns NaN; bh2 and DPM++ return ``D_0`` as here);
- UniPC corrects the state with the new model output before predicting (UniC, order of the previous
  predictor), on every step but the first; DPM++ 2M is the "midpoint" form.
"""
from __future__ import annotations

import math

import torch

__all__ = ["SOLVERS", "MAX_ORDER", "DEFAULT_ORDER", "VARIANTS", "TOP_LEVEL", "check_solver", "solver_levels",
           "step_orders", "unipc_predictor", "unipc_corrector", "dpmpp_step"]

SOLVERS = ("euler", "unipc", "dpm++")
MAX_ORDER = {"euler": 1, "unipc": 3, "dpm++": 2}
DEFAULT_ORDER = {"euler": 1, "unipc": 2, "dpm++": 2}
VARIANTS = ("bh1", "bh2")
TOP_LEVEL = 1.0 - 1e-6


def check_solver(solver, order=None, variant="bh2") -> tuple[str, int, str]:
    """``(solver, order, variant)`` checked, order defaulted (:data:`DEFAULT_ORDER`); ValueError / TypeError
    naming the argument, what is accepted and what was received."""
    if not isinstance(solver, str) or solver not in SOLVERS:
        raise ValueError(f"solver must be one of {', '.join(map(repr, SOLVERS))}, got {solver!r}")
    if order is None:
        order = DEFAULT_ORDER[solver]
    if isinstance(order, bool) or not isinstance(order, int):
        raise TypeError(f"order must be an int (1..{MAX_ORDER[solver]} for solver {solver!r}), got "
                        f"{type(order).__name__} {order!r}")
    if not 1 <= order <= MAX_ORDER[solver]:
        raise ValueError(f"order must be in 1..{MAX_ORDER[solver]} for solver {solver!r}, got {order}")
    if variant not in VARIANTS:
        raise ValueError(f"variant must be one of {', '.join(map(repr, VARIANTS))} (UniPC's B(h)), got {variant!r}")
    return solver, order, variant


def solver_levels(sigmas: torch.Tensor) -> torch.Tensor:
    """The levels a multistep solver runs on: ``sigmas`` with 1 replaced by :data:`TOP_LEVEL` (λ finite)."""
    return torch.where(sigmas >= TOP_LEVEL, torch.full_like(sigmas, TOP_LEVEL), sigmas)


def step_orders(solver: str, order: int, steps: int) -> list[int]:
    """The order of every step of a ``steps``-step schedule ending at σ = 0: warm-up from 1, and first order
    on the last step (UniPC: ``min(order, steps − j)`` as diffusers' ``lower_order_final``)."""
    if solver == "unipc":
        return [min(order, j + 1, steps - j) for j in range(steps)]
    return [1 if j == steps - 1 else min(order, j + 1) for j in range(steps)]


def _lam(s: float) -> float:
    return math.log(1.0 - s) - math.log(s)


def _unipc_rhs(h: float, order: int, variant: str, rks: list[float]):
    """UniPC's ``(hh, h·φ1, B(h), R, b)`` for step ``h`` in λ and history ratios ``rks`` (diffusers' names)."""
    hh = -h
    h_phi_1 = math.expm1(hh)
    h_phi_k = h_phi_1 / hh - 1
    b_h = hh if variant == "bh1" else math.expm1(hh)
    rk_all = list(rks) + [1.0]
    big_r, b, fact = [], [], 1
    for i in range(1, order + 1):
        big_r.append([r ** (i - 1) for r in rk_all])
        b.append(h_phi_k * fact / b_h)
        fact *= i + 1
        h_phi_k = h_phi_k / hh - 1 / fact
    return hh, h_phi_1, b_h, torch.tensor(big_r, dtype=torch.float64), torch.tensor(b, dtype=torch.float64)


def unipc_predictor(sig_next: float, sigs: list[float], order: int, variant: str) -> tuple[float, list[float]]:
    """UniP from level ``sigs[0]`` to ``sig_next``: ``x_next = a·x + Σ c_m·D_m`` with ``D_m`` the data prediction
    at ``sigs[m]`` (newest first; ``len(sigs) >= order``)."""
    s0 = sigs[0]
    if sig_next == 0.0:
        return 0.0, [1.0]                                          # last step: the data prediction
    alpha_t = 1.0 - sig_next
    lam0 = _lam(s0)
    h = _lam(sig_next) - lam0
    rks = [(_lam(sigs[i]) - lam0) / h for i in range(1, order)]
    _, h_phi_1, b_h, big_r, b = _unipc_rhs(h, order, variant, rks)
    c = [-alpha_t * h_phi_1] + [0.0] * (order - 1)
    if order > 1:
        rhos = [0.5] if order == 2 else torch.linalg.solve(big_r[:-1, :-1], b[:-1]).tolist()
        for i, (rho, rk) in enumerate(zip(rhos, rks), start=1):   # − α·B(h)·ρ_i·(D_i − D_0)/r_i
            c[i] -= alpha_t * b_h * rho / rk
            c[0] += alpha_t * b_h * rho / rk
    return sig_next / s0, c


def unipc_corrector(sig: float, sigs: list[float], order: int, variant: str) -> tuple[float, list[float]]:
    """UniC at level ``sig``, correcting the state reached from ``sigs[0]``: ``x_c = a·x_prev + Σ c_m·D_m`` with
    ``x_prev`` the (corrected) state at ``sigs[0]``, ``D_0`` the new data prediction at ``sig`` and ``D_m``
    (m >= 1) the one at ``sigs[m − 1]``. ``order`` is the order of the predictor that made the step."""
    s0 = sigs[0]
    alpha_t = 1.0 - sig
    lam0 = _lam(s0)
    h = _lam(sig) - lam0
    rks = [(_lam(sigs[i]) - lam0) / h for i in range(1, order)]
    _, h_phi_1, b_h, big_r, b = _unipc_rhs(h, order, variant, rks)
    rhos = [0.5] if order == 1 else torch.linalg.solve(big_r, b).tolist()
    c = [0.0, -alpha_t * h_phi_1] + [0.0] * (order - 1)            # [D_new, D(s0), D(s1), ...]
    c[0] -= alpha_t * b_h * rhos[-1]                                # − α·B(h)·ρ_last·(D_new − D(s0))
    c[1] += alpha_t * b_h * rhos[-1]
    for i, (rho, rk) in enumerate(zip(rhos[:-1], rks), start=1):
        c[i + 1] -= alpha_t * b_h * rho / rk
        c[1] += alpha_t * b_h * rho / rk
    return sig / s0, c


def dpmpp_step(sig_next: float, sigs: list[float], order: int) -> tuple[float, list[float]]:
    """DPM-Solver++ (multistep, midpoint) from ``sigs[0]`` to ``sig_next``: ``x_next = a·x + Σ c_m·D_m``."""
    s0 = sigs[0]
    alpha_t = 1.0 - sig_next
    if sig_next == 0.0:
        return 0.0, [1.0]
    lam0 = _lam(s0)
    h = _lam(sig_next) - lam0
    phi = alpha_t * math.expm1(-h)                                  # α_t·(e^{−h} − 1)
    if order == 1:
        return sig_next / s0, [-phi]
    r0 = (lam0 - _lam(sigs[1])) / h
    return sig_next / s0, [-phi * (1.0 + 0.5 / r0), 0.5 * phi / r0]
