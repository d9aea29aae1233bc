"""Memory Aware Synapses (Aljundi et al., ECCV 2018), and the importance-weighted anchor it shares with SI.

After each task, every shared weight's importance is the mean over the task's inputs of the
absolute gradient of the squared L2 norm of the network's output, Ω = (1/N) Σ_k |∂‖F(x_k)‖²/∂θ|
(the paper's eq. 2-4, per example: torch.func's gradient of each input, vectorised). Importances
add up over tasks (as the authors' code and Continual World do) and the penalty is
λ·Σ Ω (θ - θ*)², θ* the weights at the end of the last task. No labels are used: F is the
logits (supervised) or the policy's action logits (PPO), so MAS runs on RL policies too; the
inputs are the learner's Fisher inputs (training examples, or the task's recent rollout states).
With SAC (Continual World's MAS) F is the actor's mean and log-std, and for the critics' weights
(--sac-regularize-critic) each critic's Q at the stored action (`SACLearner.mas_squared_norm`).

Deviations: up to `--mas-samples` inputs are used instead of the whole training set; under a
privacy mechanism this importance pass reads those inputs unclipped and un-noised, so the ledger
records it as a raw access (that task's ε = ∞).
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
from torch.func import functional_call, grad, vmap

from clsim.config import opt
from clsim.registry import register_strategy
from clsim.strategy import Strategy, check_penalty_curvature


class ImportanceAnchor(Strategy):
    """λ·Σ Ω (θ - θ*)² over the flattened shared weights; subclasses say how a task adds to Ω."""

    strength_option = "mas_lambda"
    state_attrs = ("importance", "anchor")

    def setup(self, learner, scenario, mechanism):
        super().setup(learner, scenario, mechanism)
        self.names = list(learner.shared_parameters())
        self.importance: torch.Tensor | None = None   # Ω, summed over tasks
        self.anchor: torch.Tensor | None = None       # θ*: the weights at the last task's end
        self._last_penalty = None

    def flat(self) -> torch.Tensor:
        params = self.learner.shared_parameters()
        return torch.cat([params[n].reshape(-1) for n in self.names])

    @property
    def strength(self) -> float:
        return getattr(self.options, self.strength_option)

    def penalty(self):
        if self.importance is None:
            return None
        penalty = self.strength * torch.dot(self.importance, (self.flat() - self.anchor).square())
        self._last_penalty = penalty.detach()
        return penalty

    def task_importance(self, task) -> torch.Tensor:
        raise NotImplementedError

    def after_task(self, task):
        new = self.task_importance(task)
        self.importance = new if self.importance is None else self.importance + new
        self.anchor = self.flat().detach().clone()
        self.check_stable(task)

    def check_stable(self, task):
        """The penalty pulls its stiffest weight with curvature 2λ·max Ω; past what the optimiser
        survives that weight oscillates ever wider (as EWC warns): say so, with a λ that would do."""
        flag = "--" + self.strength_option.replace("_", "-")
        check_penalty_curvature(self, task, 2 * self.strength * float(self.importance.max()),
                                f"after task {task.index}: the penalty's curvature 2·{flag}·max Ω =", flag, self.strength)

    def step_metrics(self):
        return {} if self._last_penalty is None else {"strategy/penalty": self._last_penalty}

    def task_metrics(self):
        return {} if self.importance is None else {"importance_sum": float(self.importance.sum())}

    def state_tensors(self):
        return [] if self.importance is None else [self.importance, self.anchor]


@register_strategy("mas")
class MAS(ImportanceAnchor):
    """Memory Aware Synapses: importance from the gradient of the output's squared norm (label-free)."""

    data_access = "raw: importance pass over task inputs"

    @dataclass
    class Options:
        mas_lambda: float = opt(0.1, "λ: strength of the penalty λ·Σ Ω (θ - θ*)² (the paper used 1; a warning "
                                "names the largest SGD survives)", low=0.0)
        mas_samples: int = opt(1000, "inputs of each task averaged for its importance", low=1)

    def task_importance(self, task):
        self.ledger.raw(task.dataset_id, "mas importance")
        model = self.learner.model
        params = {n: p.detach() for n, p in model.named_parameters()}
        buffers = dict(model.named_buffers())
        free = {n: params[n] for n in self.names}
        own = getattr(self.learner, "mas_squared_norm", None)   # SAC: Continual World's actor and critic norms

        def squared_norm(free, x, y, t):
            if own is not None:
                return own({**params, **free, **buffers}, x, y, t)
            out = functional_call(model, {**params, **free, **buffers}, (x[None], t))
            out = out[0] if isinstance(out, tuple) else out   # PPO: (action logits, value)
            return out.square().sum()

        was_training = model.training
        model.eval()   # per-example gradients: batch statistics would mix the examples
        total, count = torch.zeros_like(self.flat()), 0
        try:
            with self.mechanism.hooks_lifted():   # a private run's clipper hooks: torch.func cannot pass them
                for x, y, t in self.learner.fisher_batches(task, self.options.mas_samples, True):
                    g = vmap(grad(squared_norm), in_dims=(None, 0, 0, None))(free, x, y, t)
                    total += torch.cat([g[n].abs().sum(0).reshape(-1) for n in self.names])
                    count += len(x)
        finally:
            model.train(was_training)
        return total / max(count, 1)
