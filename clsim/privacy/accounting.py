"""ε(δ) of a sequence of subsampled Gaussian mechanisms, with Opacus's accountants."""
from __future__ import annotations


def epsilon(mechanisms: list[tuple[float, float, int]], delta: float, accountant: str = "rdp") -> float:
    """`mechanisms`: (noise_multiplier, sample_rate, steps) in order of use."""
    from opacus.accountants import create_accountant
    acc = create_accountant(accountant)
    acc.history = list(mechanisms)
    return float(acc.get_epsilon(delta=delta))
