"""Naive fine-tuning under DPlis (the mechanism is clsim/privacy/dplis.py)."""
from clsim.registry import register_strategy
from clsim.strategy import Strategy


@register_strategy("dplis")
class DPlisNaive(Strategy):
    """Naive fine-tuning under DPlis: DP-SGD on a loss smoothed over K parameter perturbations."""

    privacy = "dplis"
