"""EWC and online EWC (Kirkpatrick et al. 2017; Schwarz et al. 2018)."""
from __future__ import annotations

from dataclasses import dataclass

import torch

from clsim.config import opt
from clsim.registry import register_strategy
from clsim.strategy import Strategy


@register_strategy("ewc")
class EWC(Strategy):
    """Elastic weight consolidation: a Fisher-weighted quadratic pull toward earlier tasks' weights."""

    @dataclass
    class Options:
        ewc_lambda: float = opt(100.0, "λ: strength of the penalty (λ/2)·Σ F (θ - θ*)²", low=0.0)
        mode: str = opt("separate", "separate: one (F, θ*) per task (memory grows); "
                        "online: one running pair (constant memory)", choices=("separate", "online"))
        gamma: float = opt(1.0, "online mode: decay γ of the running Fisher, F ← γ·F + F_t", low=0.0, high=1.0)
        fisher: str = opt("true", "true: labels sampled from the model; empirical: the data's labels",
                          choices=("true", "empirical"))
        fisher_samples: int = opt(1000, "training examples used for each task's Fisher", low=1)

    def setup(self, learner, scenario, mechanism):
        super().setup(learner, scenario, mechanism)
        self.names = list(learner.shared_parameters())
        self.pairs: list[tuple[dict, dict]] = []   # (Fisher, anchor θ*) per task, or one online

    def penalty(self):
        if not self.pairs:
            return None
        params = self.learner.shared_parameters()
        total = 0.0
        for fisher, anchor in self.pairs:
            total = total + sum((fisher[n] * (params[n] - anchor[n]).pow(2)).sum() for n in self.names)
        penalty = 0.5 * self.options.ewc_lambda * total
        self._last_penalty = float(penalty.detach())
        return penalty

    def after_task(self, task):
        fisher = self.mechanism.fisher(task, self.names, self.options.fisher_samples,
                                       self.options.fisher == "empirical", "ewc fisher")
        anchor = {n: p.detach().clone() for n, p in self.learner.shared_parameters().items()}
        if self.options.mode == "separate" or not self.pairs:
            self.pairs.append((fisher, anchor))
        else:
            old, _ = self.pairs[0]
            self.pairs[0] = ({n: self.options.gamma * old[n] + fisher[n] for n in self.names}, anchor)

    def step_metrics(self):
        return {"strategy/ewc_penalty": self._last_penalty} if self.pairs else {}

    def state_tensors(self):
        return [t for fisher, anchor in self.pairs for d in (fisher, anchor) for t in d.values()]

    def state_dict(self):
        return {"pairs": self.pairs}

    def load_state_dict(self, state):
        self.pairs = state["pairs"]
