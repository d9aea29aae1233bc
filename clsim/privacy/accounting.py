"""ε(δ) of a sequence of subsampled Gaussian mechanisms, and the σ that meets a target ε,
with Opacus's accountants."""
from __future__ import annotations

import warnings

from clsim.errors import UserError


def epsilon(mechanisms: list[tuple[float, float, int]], delta: float, accountant: str = "rdp") -> float:
    """`mechanisms`: (noise_multiplier, sample_rate, steps) in order of use."""
    from opacus.accountants import create_accountant
    acc = create_accountant(accountant)
    acc.history = list(mechanisms)
    with warnings.catch_warnings():   # "optimal order is the largest alpha": only a looser bound
        warnings.simplefilter("ignore")
        return float(acc.get_epsilon(delta=delta))


def noise_for_target(target: float, delta: float, uses: dict[str, tuple[float, int]],
                     accountant: str = "rdp") -> float:
    """The smallest σ (to Opacus's search tolerance) such that every dataset meets `target`.

    `uses`: dataset -> (sample_rate, steps) it will see over the whole stream. Each dataset
    is accounted on its own, so the σ is the largest of the per-dataset answers: the dataset
    with the most steps (or the highest sample rate) is the worst case and sets it."""
    from opacus.accountants.utils import get_noise_multiplier
    sigma = 0.0
    for dataset, (rate, steps) in uses.items():
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
