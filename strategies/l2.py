"""The plain L2 anchor (Continual World's L2 baseline, Wolczyk et al. 2021): λ·Σ (θ - θ*)² over the
shared weights, θ* where the previous task left them."""
from dataclasses import dataclass

from clsim.config import opt
from clsim.registry import register_strategy
from clsim.strategy import Strategy


@register_strategy("l2")
class L2(Strategy):
    """Pull the shared weights toward where the previous task left them."""

    @dataclass
    class Options:
        l2_strength: float = opt(1.0, "weight of the squared distance", low=0.0)

    def after_task(self, task):
        self.anchor = {n: p.detach().clone() for n, p in self.learner.shared_parameters().items()}

    def penalty(self):
        if not hasattr(self, "anchor"):
            return None
        params = self.learner.shared_parameters()
        return self.options.l2_strength * sum(((params[n] - a) ** 2).sum() for n, a in self.anchor.items())

    def state_tensors(self):
        return list(getattr(self, "anchor", {}).values())

    def state_dict(self):
        return {"anchor": getattr(self, "anchor", None)}

    def load_state_dict(self, state):
        if state["anchor"] is not None:
            self.anchor = state["anchor"]
