"""Joint training: the upper bound that may revisit every task seen so far."""
from __future__ import annotations

import torch

from clsim.learners import Batch
from clsim.registry import register_strategy
from clsim.strategy import Strategy


@register_strategy("joint")
class Joint(Strategy):
    """Joint training on all tasks seen so far (the upper bound; keeps every example)."""

    learners = ("supervised",)
    data_access = "raw: keeps every example"
    own_batches = True

    def setup(self, learner, scenario, mechanism):
        super().setup(learner, scenario, mechanism)
        self.seen = []

    def before_task(self, task):
        self.seen.append(task)
        if len(self.seen) > 1:   # its own shuffled batches from then on, never a mechanism's samples
            for seen in self.seen:
                self.ledger.raw(seen.dataset_id, "joint: trained on in its own batches")

    def train_batches(self, task, batches):
        """Each epoch is one shuffled pass over the union of the seen tasks' training sets,
        with as many examples per batch as the learner's batch size."""
        if len(self.seen) == 1:
            yield from batches
            return
        sizes = [len(t.train) for t in self.seen]
        owner = torch.repeat_interleave(torch.arange(len(self.seen)), torch.tensor(sizes))
        local = torch.cat([torch.arange(n) for n in sizes])
        order = torch.randperm(len(owner), generator=self.learner.generator)
        device = self.learner.device
        for chunk in order.split(self.learner.batch_size):
            xs, ys, ts = [], [], []
            for k in owner[chunk].unique().tolist():
                rows = local[chunk[owner[chunk] == k]]
                data = self.seen[k].train
                xs.append(data.x[rows])
                ys.append(data.y[rows])
                ts.append(torch.full((len(rows),), self.seen[k].index, dtype=torch.long))
            yield Batch(torch.cat(xs).to(device), torch.cat(ys).to(device), torch.cat(ts).to(device),
                        torch.full((len(chunk),), -1))

    def state_tensors(self):
        return [t for task in self.seen[:-1] for t in (task.train.x, task.train.y)]

    def state_dict(self):
        return {"seen": [task.index for task in self.seen]}

    def load_state_dict(self, state):
        self.seen = [self.scenario.tasks[i] for i in state["seen"]]
