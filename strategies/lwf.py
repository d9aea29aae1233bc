"""Learning without Forgetting (Li & Hoiem, ECCV 2016; TPAMI 2017).

While task t trains, the model of the end of task t−1 (a frozen copy) gives soft targets on the
current batch, and each example's loss gains α·Σ KL(softmax(y_old/T) ‖ softmax(y_new/T)):
summed over the previous tasks' heads in task_il (the paper's multi-head setting), over the
previously seen classes' logits of the one head in class_il (van de Ven et al. 2022's class-IL
LwF), over the whole head in domain_il. The paper writes the old-task term as the cross-entropy
−Σ y'_o log ŷ'_o; the KL differs from it by the old model's entropy, a constant, so the gradient
is the same, and the term is zero when the model still equals its old copy.

Deviations: the old model's outputs are computed on each batch as it is drawn (the paper records
them once before training; the same on un-augmented data), and the paper's warm-up phase that
trains only the new head first is not done. Each example's term reads only that example, so
under a privacy mechanism it is clipped and noised with the task loss: accounted.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch.func import functional_call

from clsim.config import opt
from clsim.registry import register_strategy
from clsim.strategy import Strategy


def frozen_copy(model) -> dict:
    """The model's parameters and buffers, detached: a previous model to call with `frozen_call`."""
    return {n: t.detach().clone() for n, t in (*model.named_parameters(), *model.named_buffers())}


def frozen_call(module, state: dict, *args):
    """`module` evaluated with the weights of `state` (a `frozen_copy`), without gradients."""
    with torch.no_grad():
        return functional_call(module, state, args)


def distillation(new: torch.Tensor, old: torch.Tensor, temperature: float) -> torch.Tensor:
    """Per-example KL(softmax(old/T) ‖ softmax(new/T))."""
    return F.kl_div(F.log_softmax(new / temperature, 1), F.log_softmax(old / temperature, 1),
                    reduction="none", log_target=True).sum(1)


@register_strategy("lwf")
class LwF(Strategy):
    """Learning without Forgetting: distil the previous model's outputs on current data (T, α)."""

    learners = ("supervised",)

    @dataclass
    class Options:
        lwf_alpha: float = opt(1.0, "α: weight of the distillation term (the paper's λ_o)", low=0.0)
        lwf_temperature: float = opt(2.0, "T: softmax temperature of the distillation", low=0.0, low_open=True)

    def setup(self, learner, scenario, mechanism):
        super().setup(learner, scenario, mechanism)
        self.old: dict | None = None          # the model at the end of the previous task
        self.seen: list = []                  # tasks finished
        self._last = None
        self._features = None
        if len(learner.model.heads) > 1:   # the backbone's output of the training forward, for the old heads
            learner.model.backbone.register_forward_hook(self._keep_features)

    def _keep_features(self, module, args, output):
        self._features = output

    def loss(self, batch, losses, outputs):
        if self.old is None:
            return losses
        o, model = self.options, self.learner.model
        if len(model.heads) > 1:   # task_il: every previous task's head, on the training forward's features
            features = self._features   # reusing them keeps one forward per layer (DP-SGD's ghost clipping)
            old_features = frozen_call(model.backbone, self._sub(self.old, "backbone."), batch.x)
            term = sum(distillation(model.heads[j](features),
                                    frozen_call(model.heads[j], self._sub(self.old, f"heads.{j}."), old_features),
                                    o.lwf_temperature) for j in (t.index for t in self.seen))
        else:
            old = frozen_call(model, self.old, batch.x, batch.t)
            if self.scenario.setting == "class_il":
                columns = sorted({c for t in self.seen for c in t.classes})
                outputs, old = outputs[:, columns], old[:, columns]
            term = distillation(outputs, old, o.lwf_temperature)
        self._last = term.detach().mean()
        return losses + o.lwf_alpha * term

    @staticmethod
    def _sub(state: dict, prefix: str) -> dict:
        return {n[len(prefix):]: v for n, v in state.items() if n.startswith(prefix)}

    def after_task(self, task):
        self.seen.append(task)
        self.old = frozen_copy(self.learner.model)

    def step_metrics(self):
        return {} if self._last is None else {"strategy/lwf_distillation": self._last}

    def state_tensors(self):
        return [] if self.old is None else list(self.old.values())

    def state_dict(self):
        return {"old": self.old, "seen": [t.index for t in self.seen]}

    def load_state_dict(self, state):
        self.old, self.seen = state["old"], [self.scenario.tasks[i] for i in state["seen"]]
