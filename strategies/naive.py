"""Naive fine-tuning: the lower bound every method is compared with."""
from clsim.registry import register_strategy
from clsim.strategy import Strategy


@register_strategy("naive")
class Naive(Strategy):
    """Naive fine-tuning: train on each task in turn, keep nothing (the lower bound)."""
