"""ε(δ) of a sequence of recorded mechanisms, and the noise that meets a target ε.

A ledger access is a dict {"mechanism": kind, "steps": k, ...parameters}. Each kind has a
Rényi-DP curve here (`register_rdp`): "gaussian" (Poisson-subsampled Gaussian, Opacus's
analysis) and "laplace" (Mironov 2017, Prop. 6). A third-party mechanism registers its own
curve and needs no other edit. The "prv" accountant (Opacus's PRV) is tighter for Gaussians;
a stream that holds any other kind is accounted with RDP instead (noted by the ledger), and so is
one whose RDP ε exceeds PRV_MAX_EPSILON (where PRV's grid no longer fits in memory or time).
"""
from __future__ import annotations

import math
import warnings
from functools import lru_cache
from typing import Callable

import numpy as np

from clsim.errors import UserError


def orders() -> list[float]:
    """Opacus's orders up to 63 plus 128…1024 (as Google's dp-accounting): without the large
    ones no ε below log(1/δ)/62 (0.19 at δ = 1e-5) could be certified, e.g. a small DP-Fisher share."""
    return [1 + x / 10.0 for x in range(1, 100)] + list(range(11, 64)) + [128, 256, 512, 1024]


_RDP: dict[str, Callable[..., np.ndarray]] = {}


def register_rdp(kind: str):
    """Register `fn(**parameters) -> RDP of one step at every order of orders()` for `kind`."""
    def decorate(fn):
        _RDP[kind] = fn
        return fn
    return decorate


#: σ below which the subsampled Gaussian counts as no noise at all (ε = ∞): Opacus's RDP analysis breaks
#: down further down (σ² underflows to a division by zero below ~1e-162, its series never ends near
#: 1e-155), and at σ = 1e-100 ε is already above 1e200
NO_NOISE = 1e-100
#: ε (by RDP) above which the PRV accountant is not tried and RDP's bound stands: PRV's grid grows with
#: ε (σ = 0.001 asked for 237 GiB, σ = 0.01 ran for minutes), and its tighter figure matters no more there
PRV_MAX_EPSILON = 100.0


@register_rdp("gaussian")
@lru_cache(maxsize=4096)
def gaussian_rdp(sample_rate: float, noise_multiplier: float) -> np.ndarray:
    """One release of the Poisson-subsampled Gaussian (add/remove adjacency), cached because
    the ledger asks after every training step (recomputing the curve each time took ~1 s)."""
    if noise_multiplier < NO_NOISE:
        return np.full(len(orders()), np.inf)
    from opacus.accountants.analysis.rdp import compute_rdp
    return np.asarray(compute_rdp(q=sample_rate, noise_multiplier=noise_multiplier, steps=1, orders=orders()))


@register_rdp("laplace")
@lru_cache(maxsize=1024)
def laplace_rdp(scale: float) -> np.ndarray:
    """Laplace noise of `scale` relative to the L1 sensitivity (b/Δ), no subsampling:
    ε(α) = 1/(α−1)·log(α/(2α−1)·e^((α−1)/b) + (α−1)/(2α−1)·e^(−α/b))."""
    out = []
    for a in orders():
        terms = [math.log(a / (2 * a - 1)) + (a - 1) / scale, math.log((a - 1) / (2 * a - 1)) - a / scale]
        out.append(float(np.logaddexp(*terms)) / (a - 1))
    return np.asarray(out)


def _parameters(access: dict) -> dict:
    return {k: v for k, v in access.items() if k not in ("mechanism", "steps", "purpose", "task")}


def accountable(access: dict) -> bool:
    return access["mechanism"] in _RDP


def epsilon(accesses: list[dict], delta: float, accountant: str = "rdp") -> float:
    """ε at `delta` of all `accesses` composed (one individual takes part in every one)."""
    if any(a["mechanism"] == "raw" for a in accesses):
        return math.inf
    unknown = sorted({a["mechanism"] for a in accesses if not accountable(a)})
    if unknown:
        raise ValueError(f"no RDP curve registered for mechanism(s) {', '.join(unknown)}")
    if not accesses:
        return 0.0
    with warnings.catch_warnings():   # "optimal order is the largest alpha": only a looser bound
        warnings.simplefilter("ignore")
        from opacus.accountants.analysis.rdp import get_privacy_spent
        rdp = sum(a["steps"] * _RDP[a["mechanism"]](**_parameters(a)) for a in accesses)
        bound = float(get_privacy_spent(orders=orders(), rdp=rdp, delta=delta)[0])
        if accountant == "prv" and bound <= PRV_MAX_EPSILON and all(a["mechanism"] == "gaussian" for a in accesses):
            from opacus.accountants import create_accountant
            acc = create_accountant("prv")
            acc.history = [(a["noise_multiplier"], a["sample_rate"], a["steps"]) for a in accesses]
            return float(acc.get_epsilon(delta=delta))
        return bound


def gaussian(sample_rate: float, noise_multiplier: float, steps: int, purpose: str = "") -> dict:
    """A ledger access of `steps` Poisson-subsampled Gaussian releases."""
    return {"mechanism": "gaussian", "purpose": purpose, "sample_rate": sample_rate,
            "noise_multiplier": noise_multiplier, "steps": steps}


def noise_for_target(target: float, delta: float, groups: dict[str, tuple[list, list]],
                     accountant: str = "rdp", budget: str = "") -> float:
    """The smallest σ (within 1% of `target` in ε) such that every group of individuals meets it.

    `groups`: name -> (uses, fixed): `uses` the (sample_rate, steps) trained at σ, `fixed` the
    accesses whose noise is already set (e.g. DP-Fisher releases). Each group's σ comes from a
    bisection on the composed ε; the answer is the largest (the worst-off group sets it).
    `budget`: what `target` is, for the error (default: --epsilon itself)."""
    sigma = 0.0
    for name, (uses, fixed) in groups.items():
        if not uses:
            continue

        def eps(s):
            return epsilon([gaussian(q, s, k) for q, k in uses] + fixed, delta, accountant)

        low, high = 0.0, 1.0
        while eps(high) > target:
            low, high = high, high * 2
            if high > 1e6:
                raise UserError(f"{budget or f'--epsilon {target:g}'} cannot be met for {name} ({describe(uses)}, "
                                f"δ={delta:g}) with any noise multiplier below 1e6; raise --epsilon or "
                                f"lower --epochs or --batch-size, or give the Fisher a larger share")
        while high - low > 1e-3 * high and eps(high) < 0.99 * target:
            mid = (low + high) / 2
            low, high = (mid, high) if eps(mid) > target else (low, mid)
        sigma = max(sigma, high)
    return sigma


def describe(uses: list[tuple[float, int]]) -> str:
    return ", ".join(f"{k} steps at sample rate {q:.4g}" for q, k in uses)
