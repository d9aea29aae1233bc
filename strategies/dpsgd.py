"""Naive fine-tuning under DP-SGD: the private lower bound (the mechanism is clsim/privacy/dpsgd.py)."""
from clsim.registry import register_strategy
from clsim.strategy import Strategy


@register_strategy("dpsgd")
class DPSGDNaive(Strategy):
    """Naive fine-tuning under DP-SGD (Opacus): clipped per-example gradients plus Gaussian noise."""

    privacy = "dpsgd"
