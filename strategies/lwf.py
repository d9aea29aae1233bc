"""Learning without Forgetting (Li & Hoiem, ECCV 2016; TPAMI 2017).

While task t trains, the model of the end of task t−1 (a frozen copy) gives soft targets on the
current batch, and each example's loss gains α·Σ KL(softmax(y_old/T) ‖ softmax(y_new/T)):
summed over the previous tasks' heads in task_il (the paper's multi-head setting; with
--task-heads shared, over each previous task's rows of the one output layer, as van de Ven's
Task-IL LwF), over the previously seen classes' logits of the one head in class_il (van de Ven
et al. 2022's class-IL LwF), over the whole head in domain_il. The paper writes the old-task term
as the cross-entropy −Σ y'_o log ŷ'_o; the KL differs from it by the old model's entropy, a
constant, so the gradient is the same, and the term is zero when the model still equals its old
copy.

van de Ven & Tolias's 2019 code (the "Three scenarios" comparison) weighs the two terms
differently: (1/t)·CE + (1 − 1/t)·T²·mean of the distillation terms (t the tasks so far, one term
per earlier head in task_il): `--lwf-balance true` with α = T². In class_il its student softmax
spans every class seen so far (the current task's too, whose target probability is 0), which
pushes the current classes' logits down on the earlier classes' evidence: clsim does so when
`--active-classes` is on (the softmax then spans those classes), and otherwise distils the earlier
classes' logits alone. Their code of April 2019, which made the paper's table (arXiv v1, 15 April),
averaged the distillation over the student's classes instead of summing it (fixed on 17 May 2019,
commit 26f00db): `--lwf-per-class true`, a distillation 2t times weaker in Class-IL at task t.

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

from clsim import distributed
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


def distillation(new: torch.Tensor, old: torch.Tensor, temperature: float, per_class: bool = False) -> torch.Tensor:
    """Per-example KL(softmax(old/T) ‖ softmax(new/T)); `new`'s columns past `old`'s (classes the
    old model never learned) take part in the student's softmax with target probability 0.
    `per_class`: divided by the student's number of classes (a mean over classes, not a sum)."""
    log_old = F.log_softmax(old / temperature, 1)
    log_new = F.log_softmax(new / temperature, 1)[:, :old.shape[1]]
    kl = (log_old.exp() * (log_old - log_new)).sum(1)
    return kl / new.shape[1] if per_class else kl


@register_strategy("lwf")
class LwF(Strategy):
    """Learning without Forgetting: distil the previous model's outputs on current data (T, α)."""

    learners = ("supervised",)

    @dataclass
    class Options:
        lwf_alpha: float = opt(1.0, "α: weight of the distillation term (the paper's λ_o)", low=0.0)
        lwf_temperature: float = opt(2.0, "T: softmax temperature of the distillation", low=0.0, low_open=True)
        lwf_balance: bool = opt(False, "weigh the current loss by 1/t and the distillation (averaged over the "
                                "earlier heads) by 1 − 1/t, t the tasks so far (van de Ven & Tolias's code; "
                                "theirs also multiplies it by T², so α = T² matches)")
        lwf_per_class: bool = opt(False, "divide each distillation term by the student's number of classes (a "
                                  "mean over classes: van de Ven & Tolias's code until May 2019, after the "
                                  "paper's table; fixed to a sum in its commit 26f00db)")

    def setup(self, learner, scenario, mechanism):
        super().setup(learner, scenario, mechanism)
        self.old: dict | None = None          # the model at the end of the previous task
        self.seen: list = []                  # tasks finished
        self._last = None
        self._features = None
        model = learner.model
        if getattr(model, "shared", False):   # task_il heads as rows of one layer: its output of the training forward
            model.heads[0].register_forward_hook(self._keep_features)
        elif len(model.heads) > 1:   # the backbone's output of the training forward, for the old heads
            model.backbone.register_forward_hook(self._keep_features)

    def _keep_features(self, module, args, output):
        self._features = output

    def loss(self, batch, losses, outputs):
        if self.old is None:
            return losses
        o, model = self.options, self.learner.model
        shared = getattr(model, "shared", False)
        if len(model.heads) > 1 or shared:   # task_il: every previous task's head, from the training forward
            # Reusing its features (or, with --task-heads shared, its one call of the output layer)
            # keeps one call per layer a step (DP-SGD's ghost and bk clipping). Read before the
            # frozen calls below, which run the hooked module too.
            kept = distributed.gather_rows(self._features, len(batch.y))   # data-parallel: every worker's rows
            old_features = frozen_call(model.backbone, self._sub(self.old, "backbone."), batch.x)
            if shared:
                old = frozen_call(model.heads[0], self._sub(self.old, "heads.0."), old_features)
                pairs = [(kept[:, model.columns(j)], old[:, model.columns(j)]) for j in self._seen_ids()]
            else:
                pairs = [(model.heads[j](kept),
                          frozen_call(model.heads[j], self._sub(self.old, f"heads.{j}."), old_features))
                         for j in self._seen_ids()]
            term = sum(distillation(new, old, o.lwf_temperature, o.lwf_per_class) for new, old in pairs)
            terms = len(self.seen)
        else:
            old = frozen_call(model, self.old, batch.x, batch.t)
            if self.scenario.setting == "class_il":
                earlier = sorted({c for t in self.seen for c in t.classes})
                student = earlier + [c for c in self.learner.active_classes or () if c not in earlier]
                outputs, old = outputs[:, student], old[:, earlier]
            term, terms = distillation(outputs, old, o.lwf_temperature, o.lwf_per_class), 1
        self._last = term.detach().mean()
        if o.lwf_balance:
            t = len(self.seen) + 1
            return losses / t + (1 - 1 / t) * o.lwf_alpha * term / terms
        return losses + o.lwf_alpha * term

    def _seen_ids(self) -> list[int]:
        return [t.index for t in self.seen]

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
