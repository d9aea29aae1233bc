"""PackNet (Mallya & Lazebnik, CVPR 2018), as Continual World (Wolczyk et al. 2021) runs it.

Every kernel weight (the weights of layers, not biases) has an owner task. Task t trains only the
weights it owns: gradients of the others are zeroed and, since momentum or Adam would still move
them, they are put back after every step. When task t ends (unless it is the last), the fraction
(tasks left)/(tasks left + 1) of its weights with the smallest magnitudes in each layer are
pruned: set to zero and handed to task t+1; the rest stay t's for good. The last
`--packnet-retrain-epochs` epochs of a task retrain its kept weights after pruning (with a single
epoch the pruning happens after it, without retraining, as with Continual World's default of
0 retrain steps). Biases and normalisation parameters train on the first task only, then are
frozen (as Continual World does; batch-norm running statistics too). Evaluating task j uses the
weights owned by tasks ≤ j, the later ones zeroed.

Task heads are left to their tasks (--task-heads shared is refused: see `setup`). Defined for
task_il (evaluation must know the task) with supervised and RL learners. Deviation from the
paper: an equal share of the free weights per task (Continual World's schedule) instead of a
fixed pruning ratio. Under a privacy mechanism only the mechanism's gradients are masked and
only trained weights pruned: accounted.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from clsim.config import opt
from clsim.errors import UserError
from clsim.registry import register_strategy
from clsim.strategy import Strategy


@register_strategy("packnet")
class PackNet(Strategy):
    """PackNet: prune each task's weights by magnitude, freeze the kept ones, evaluate with task views."""

    settings = ("task_il",)

    @dataclass
    class Options:
        packnet_retrain_epochs: int = opt(1, "epochs at the end of each task that retrain after pruning "
                                          "(at least one epoch trains before it)", low=0)

    def setup(self, learner, scenario, mechanism):
        super().setup(learner, scenario, mechanism)
        retrain = self.options.packnet_retrain_epochs
        if retrain >= max(self.epochs, 2):   # one epoch alone prunes after it, without retraining (see above)
            raise UserError(f"--packnet-retrain-epochs {retrain} leaves no epoch of --epochs {self.epochs} to train "
                            f"before pruning; give at most {max(self.epochs - 1, 1)} (or more --epochs)")
        if getattr(learner.model, "shared", False):
            raise UserError("packnet gives every shared weight to one task and trains biases on the first task "
                            "only, so later tasks' rows of a shared output layer would stay untrained: use "
                            "--task-heads separate")
        shared = learner.shared_parameters()
        self.kernels = [n for n, p in shared.items() if p.dim() > 1]
        self.others = [n for n, p in shared.items() if p.dim() <= 1]
        self.owner = {n: torch.zeros(shared[n].shape, dtype=torch.int16, device=shared[n].device)
                      for n in self.kernels}
        self.pruned_tasks: set[int] = set()
        self._network_evaluate = learner.evaluate
        learner.evaluate = self.evaluate

    def params(self) -> dict[str, nn.Parameter]:
        return self.learner.shared_parameters()

    def before_task(self, task):
        self.task, self.epoch = task, 0
        self._save()

    def _save(self) -> None:
        """The values every weight that the current task does not train must keep."""
        self.saved = {n: p.detach().clone() for n, p in self.params().items()}

    def trainable(self, name: str) -> torch.Tensor | bool:
        if name in self.owner:
            return self.owner[name] == self.task.index
        return self.task.index == 0

    def train_batches(self, task, batches):
        self.epoch += 1
        if self.epoch == self.epochs - self.options.packnet_retrain_epochs + 1 and self.epoch > 1:
            self.prune(task)
        return batches

    def after_backward(self):
        for n, p in self.params().items():
            if p.grad is not None:
                p.grad.mul_(self.trainable(n))

    @torch.no_grad()
    def after_step(self):
        for n, p in self.params().items():
            keep = self.trainable(n)
            if keep is not True:
                p.copy_(torch.where(keep, p, self.saved[n]) if torch.is_tensor(keep) else self.saved[n])

    @torch.no_grad()
    def prune(self, task) -> None:
        """Hand the smallest-magnitude share of the task's weights, zeroed, to the next task."""
        if task.index in self.pruned_tasks or task is self.scenario.tasks[-1]:
            return
        left = len(self.scenario.tasks) - task.index - 1
        share = left / (left + 1)
        params = self.params()
        for n in self.kernels:
            mine = (self.owner[n] == task.index).nonzero(as_tuple=True)
            values = params[n][mine].abs()
            k = int(len(values) * share)
            if k == 0:
                continue
            drop = values.argsort()[:k]
            index = tuple(i[drop] for i in mine)
            params[n][index] = 0.0
            self.owner[n][index] = task.index + 1
        self.pruned_tasks.add(task.index)
        self._save()

    def after_task(self, task):
        self.prune(task)
        if task.index == 0:   # normalisation statistics are the first task's from now on
            for module in self.learner.model.modules():
                if isinstance(module, nn.modules.batchnorm._BatchNorm):
                    module.momentum = 0.0

    @torch.no_grad()
    def evaluate(self, task) -> float:
        """The score of task j with only the weights of tasks ≤ j (later tasks' weights zeroed)."""
        params = self.params()
        full = {n: params[n].detach().clone() for n in self.kernels}
        for n in self.kernels:
            params[n].mul_(self.owner[n] <= task.index)
        try:
            return self._network_evaluate(task)
        finally:
            for n in self.kernels:
                params[n].copy_(full[n])

    def task_metrics(self):
        total = sum(o.numel() for o in self.owner.values())
        return {f"owned_share_task{t.index}": sum(int((o == t.index).sum()) for o in self.owner.values()) / total
                for t in self.scenario.tasks}

    def state_tensors(self):
        return list(self.owner.values())

    def state_dict(self):
        return {"owner": self.owner, "pruned": sorted(self.pruned_tasks)}

    def load_state_dict(self, state):
        self.owner, self.pruned_tasks = state["owner"], set(state["pruned"])
