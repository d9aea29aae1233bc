"""ε(δ) of a sequence of subsampled Gaussian mechanisms, and the σ that meets a target ε,
with Opacus's accountants."""
from __future__ import annotations

import warnings
from functools import lru_cache

import numpy as np

from clsim.errors import UserError


def epsilon(mechanisms: list[tuple[float, float, int]], delta: float, accountant: str = "rdp") -> float:
    """`mechanisms`: (noise_multiplier, sample_rate, steps) in order of use."""
    with warnings.catch_warnings():   # "optimal order is the largest alpha": only a looser bound
        warnings.simplefilter("ignore")
        if accountant == "rdp":
            # What Opacus's RDPAccountant computes, with the per-step RDP curve of each (σ, q)
            # cached: RDP composes additively, so `steps` steps cost `steps` times one step.
            # (The ledger asks after every training step; recomputing the curve took ~1 s.)
            from opacus.accountants import RDPAccountant
            from opacus.accountants.analysis.rdp import get_privacy_spent
            rdp = sum(steps * _rdp_one_step(sigma, rate) for sigma, rate, steps in mechanisms)
            return float(get_privacy_spent(orders=RDPAccountant.DEFAULT_ALPHAS, rdp=rdp, delta=delta)[0])
        from opacus.accountants import create_accountant
        acc = create_accountant(accountant)
        acc.history = list(mechanisms)
        return float(acc.get_epsilon(delta=delta))


@lru_cache(maxsize=1024)
def _rdp_one_step(sigma: float, rate: float) -> np.ndarray:
    from opacus.accountants import RDPAccountant
    from opacus.accountants.analysis.rdp import compute_rdp
    return np.asarray(compute_rdp(q=rate, noise_multiplier=sigma, steps=1, orders=RDPAccountant.DEFAULT_ALPHAS))


def noise_for_target(target: float, delta: float, uses: dict[str, tuple[float, int]],
                     accountant: str = "rdp") -> float:
    """The smallest σ (to Opacus's search tolerance) such that every dataset meets `target`.

    `uses`: dataset -> (sample_rate, steps) it will see over the whole stream. Each dataset
    is accounted on its own, so the σ is the largest of the per-dataset answers: the dataset
    with the most steps (or the highest sample rate) is the worst case and sets it."""
    from opacus.accountants.utils import get_noise_multiplier
    sigma = 0.0
    distinct = {use: dataset for dataset, use in uses.items()}    # equal-sized tasks: one search
    for (rate, steps), dataset in distinct.items():
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                s = get_noise_multiplier(target_epsilon=target, target_delta=delta, sample_rate=rate,
                                         steps=steps, accountant=accountant, epsilon_tolerance=0.01 * target)
        except ValueError:
            raise UserError(f"--epsilon {target} cannot be met for {dataset} ({steps} steps at sample "
                            f"rate {rate:.4g}, δ={delta:g}) with any noise multiplier below 1e6; raise "
                            f"--epsilon or lower --epochs or --batch-size") from None
        sigma = max(sigma, s)
    return sigma
