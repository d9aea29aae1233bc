"""Synaptic Intelligence (Zenke, Poole & Ganguli, ICML 2017).

While a task trains, each shared weight accumulates the path integral of the task loss,
ω ← ω − g·Δθ per step (g the gradient of the unregularised loss, Δθ the step actually taken). At
the task's end Ω ← max(0, Ω + ω / ((θ_end − θ_start)² + ξ)) and ω is reset; the penalty on later
tasks is c·Σ Ω (θ − θ*)², θ* the weights at the last task's end. As in the authors' code
(ganguli-lab/pathint: `unreg_grads`, omega_decay "sum", the ReLU) the gradient excludes SI's own
penalty: clsim takes p.grad after the backward and subtracts the penalty's exact gradient
2c·Ω(θ − θ*). Under a privacy mechanism p.grad is the mechanism's private gradient, so SI is
post-processing and stays accounted (the paper's g is the exact gradient there instead).

`--si-variant vandeven` follows van de Ven & Tolias's 2019 code (github.com/GMvandeVen/
continual-learning, the "Three scenarios" comparison) instead: g is the gradient of the total loss,
SI's own penalty included, and Ω is not clamped at 0 (a weight can get a negative importance). The
rest is the same in both: ξ added to the squared drift of the task, Ω summed over tasks, no ½ in
the penalty, θ* the weights at the end of the last task. Their single output layer is penalised
whole, as clsim's is in class_il/domain_il and in task_il with `--task-heads shared`; separate
task_il heads are not penalised, as for every anchor here.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from clsim.config import opt
from clsim.registry import register_strategy
from clsim.strategies.mas import ImportanceAnchor


@register_strategy("si")
class SI(ImportanceAnchor):
    """Synaptic Intelligence: path-integral importance of every weight, a quadratic anchor (c, ξ)."""

    strength_option = "si_c"

    @dataclass
    class Options:
        si_c: float = opt(1.0, "c: strength of the penalty c·Σ Ω (θ - θ*)²", low=0.0)
        si_xi: float = opt(0.1, "ξ: damping of the importance's denominator (Δθ² + ξ); the authors used 0.1 "
                           "(permuted MNIST) and 1e-3 (split MNIST, with Adam)", low=0.0, low_open=True)
        si_variant: str = opt("zenke", "zenke: the path integral of the task loss's gradient, Ω ≥ 0 (Zenke et "
                              "al.'s code); vandeven: of the total loss's gradient (SI's penalty included), Ω "
                              "unclamped (van de Ven & Tolias's 2019 code)", choices=("zenke", "vandeven"))

    def setup(self, learner, scenario, mechanism):
        super().setup(learner, scenario, mechanism)
        self.omega = torch.zeros_like(self.flat())
        self.start = self.flat().detach().clone()
        self._grad = self._before = None

    def before_task(self, task):
        self.omega.zero_()
        self.start = self.flat().detach().clone()

    def after_backward(self):
        params = self.learner.shared_parameters()
        g = torch.cat([(params[n].grad if params[n].grad is not None else torch.zeros_like(params[n])).reshape(-1)
                       for n in self.names])
        self._before = self.flat().detach().clone()
        if self.importance is not None and self.options.si_variant == "zenke":   # the task loss's alone
            g = g - 2 * self.options.si_c * self.importance * (self._before - self.anchor)
        self._grad = g

    def after_step(self):
        self.omega -= self._grad * (self.flat().detach() - self._before)

    def task_importance(self, task):
        drift = self.flat().detach() - self.start
        return self.omega / (drift.square() + self.options.si_xi)

    def after_task(self, task):
        super().after_task(task)
        if self.options.si_variant == "zenke":
            self.importance.clamp_(min=0.0)
