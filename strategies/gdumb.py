"""GDumb (Prabhu, Torr & Dokania, ECCV 2020): a greedy class-balanced memory, and a model trained
from scratch on the memory alone.

Sampler (the paper's Algorithm 1): each example of a task, in a seeded random order, enters the
memory while it has room; once full, an example of class y enters only if y holds fewer than
k / |classes seen| slots, evicting a random example of the largest class. Before training on each
task the memory is updated from the task's examples, the model is re-initialised, and every epoch
is one shuffled pass over the memory alone (the task's own batches are not used). A class is its
label in class_il and domain_il, and (task, label) in task_il, whose labels restart in every task.

Deviations: the paper trains with SGDR, cutmix and many epochs; clsim uses the run's optimiser and
epochs, so the learner's settings decide how well the memory is fitted. The memory keeps raw
examples: under a privacy mechanism every task's ε is ∞ (recorded in the ledger).
"""
from __future__ import annotations

from collections import Counter
from dataclasses import dataclass

import torch

from clsim.config import opt
from clsim.learners import Batch
from clsim.registry import register_strategy
from clsim.strategy import Strategy


class BalancedMemory:
    """GDumb's greedy class-balanced sampler over `size` slots of (x, y, t, class key)."""

    def __init__(self, size: int, generator: torch.Generator):
        self.size, self.generator = size, generator
        self.items: list[tuple[torch.Tensor, int, int, tuple]] = []
        self.counts: Counter = Counter()

    def offer(self, x: torch.Tensor, y: int, t: int, key: tuple) -> None:
        if len(self.items) < self.size:
            self._add(x, y, t, key)
            return
        seen = len(self.counts) + (key not in self.counts)
        if self.counts[key] >= self.size / seen:
            return
        largest = max(self.counts, key=lambda k: (self.counts[k], k))
        slots = [i for i, item in enumerate(self.items) if item[3] == largest]
        victim = slots[int(torch.randint(len(slots), (1,), generator=self.generator))]
        self.counts[largest] -= 1
        self.items[victim] = self.items[-1]
        self.items.pop()
        self._add(x, y, t, key)

    def _add(self, x, y, t, key) -> None:
        self.items.append((x, y, t, key))
        self.counts[key] += 1

    def tensors(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        x, y, t, _ = zip(*self.items)
        return torch.stack(x), torch.tensor(y), torch.tensor(t)


@register_strategy("gdumb")
class GDumb(Strategy):
    """GDumb: a greedy class-balanced memory; the model is retrained from scratch on it for every task."""

    learners = ("supervised",)
    data_access = "raw: keeps examples in a class-balanced memory"
    own_batches = True

    @dataclass
    class Options:
        gdumb_memory: int = opt(500, "k: examples kept in the class-balanced memory", low=1)

    def setup(self, learner, scenario, mechanism):
        super().setup(learner, scenario, mechanism)
        self.memory = BalancedMemory(self.options.gdumb_memory, learner.generator)

    def before_task(self, task):
        self.ledger.raw(task.dataset_id, "gdumb memory")
        order = torch.randperm(len(task.train), generator=self.learner.generator)
        per_task = self.scenario.setting == "task_il"
        for i in order.tolist():
            y = int(task.train.y[i])
            self.memory.offer(task.train.x[i], y, task.index, (task.index, y) if per_task else (y,))
        for module in self.learner.model.modules():   # from scratch, as the paper retrains
            if hasattr(module, "reset_parameters"):
                module.reset_parameters()

    def train_batches(self, task, batches):
        x, y, t = self.memory.tensors()
        order = torch.randperm(len(y), generator=self.learner.generator)
        dev = self.learner.device
        for chunk in order.split(self.learner.batch_size):
            yield Batch(x[chunk].to(dev), y[chunk].to(dev), t[chunk].to(dev), torch.full((len(chunk),), -1))

    def task_metrics(self):
        return {"memory_count": len(self.memory.items), "memory_classes": len(self.memory.counts)}

    def state_tensors(self):
        return list(self.memory.tensors()) if self.memory.items else []

    def state_dict(self):
        return {"items": self.memory.items, "counts": dict(self.memory.counts)}

    def load_state_dict(self, state):
        self.memory.items, self.memory.counts = state["items"], Counter(state["counts"])
