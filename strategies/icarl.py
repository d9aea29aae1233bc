"""iCaRL (Rebuffi, Kolesnikov, Sperl & Lampert, CVPR 2017), class-incremental only.

Representation: each task trains on its examples together with the exemplars of earlier classes
(one shuffled pass over their union per epoch), with a sigmoid binary cross-entropy per seen class
summed per example (the paper's loss): the target is the one-hot label for the current task's
classes and the previous model's sigmoid output for earlier classes (distillation).
Exemplars: with K = `--icarl-memory`, each of the s classes seen keeps m = ⌊K / s⌋ of them;
earlier sets are cut to their first m, and each new class's set is chosen by herding on
L2-normalised features φ (the backbone's output): with μ the class's mean feature, the k-th
exemplar is the example minimising ‖μ − (φ(x) + Σ_{j<k} φ(p_j)) / k‖, never picked twice.
Classification: nearest mean of exemplars, argmin_y ‖φ(x) − μ_y‖ over the classes seen, μ_y the
normalised mean of y's exemplar features (the network's own outputs only before the first task).

van de Ven & Tolias's 2019 code (the "Three scenarios" comparison, its iCaRL row) takes the
earlier classes' targets at a temperature, sigmoid(y_old / T) with T = 2 (its distillation
temperature): `--icarl-temperature 2`. The rest matches: exemplars in the task's shuffled batches,
the summed BCE over the classes seen so far, m = ⌊K / s⌋, herding and NME on normalised features
of the last hidden layer. Theirs re-normalises the class mean that herding aims at (clsim aims at
the plain mean of the normalised features: a slightly different choice of exemplars, left as is),
and trains 2000 iterations per task, where clsim's epochs run over the union with the exemplars
(21 epochs: ~2,300 steps per task from task 2 on).

Deviations: no horizontally flipped copies in the class means (clsim has no flip for every
input kind); features come from the model in eval mode. Exemplars are raw examples and the union
is batched here, not by a mechanism: under a privacy mechanism every task's ε is ∞ (the ledger
says so). iCaRL is defined for class-incremental learning; other settings are refused.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from clsim import distributed
from clsim.config import opt
from clsim.learners import Batch
from clsim.registry import register_strategy
from clsim.strategy import Strategy
from clsim.strategies.lwf import frozen_call, frozen_copy


def herding(features: torch.Tensor, m: int) -> torch.Tensor:
    """Indices of `m` rows of L2-normalised `features`, in iCaRL's herding order."""
    mean = features.mean(0)
    chosen: list[int] = []
    running = torch.zeros_like(mean)
    available = torch.ones(len(features), dtype=torch.bool)
    for k in range(1, min(m, len(features)) + 1):
        distance = (mean - (features + running) / k).norm(dim=1)
        distance[~available] = float("inf")
        i = int(distance.argmin())
        chosen.append(i)
        available[i] = False
        running += features[i]
    return torch.tensor(chosen, dtype=torch.long)


@register_strategy("icarl")
class ICaRL(Strategy):
    """iCaRL: herded exemplars, distillation, nearest-mean-of-exemplars classifier (class_il only)."""

    settings = ("class_il",)
    learners = ("supervised",)
    data_access = "raw: keeps exemplars"
    own_batches = True
    state_attrs = ("exemplars", "old", "seen", "means")

    @dataclass
    class Options:
        icarl_memory: int = opt(2000, "K: exemplars kept over all classes seen", low=1)
        icarl_temperature: float = opt(1.0, "T: the earlier classes' targets are sigmoid(old logits / T) (the "
                                       "paper: 1; van de Ven & Tolias's code: 2)", low=0.0, low_open=True)

    def setup(self, learner, scenario, mechanism):
        super().setup(learner, scenario, mechanism)
        self.exemplars: dict[int, tuple[torch.Tensor, int]] = {}   # class -> (inputs, task index)
        self.old: dict | None = None
        self.seen: list[int] = []
        self.means: torch.Tensor | None = None
        self._network_evaluate = learner.evaluate
        learner.evaluate = self.evaluate

    def before_task(self, task):
        self.task = task
        if self.exemplars:   # the union is batched here, not by a mechanism
            self.ledger.raw(task.dataset_id, "icarl: trained on with exemplars in its own batches")

    def train_batches(self, task, batches):
        if not self.exemplars:
            yield from batches
            return
        xs = torch.cat([task.train.x] + [x for x, _ in self.exemplars.values()])
        ys = torch.cat([task.train.y] + [torch.full((len(x),), c) for c, (x, _) in self.exemplars.items()])
        ts = torch.cat([torch.full((len(task.train),), task.index)] +
                       [torch.full((len(x),), t) for x, t in self.exemplars.values()])
        dev = self.learner.device
        for chunk in torch.randperm(len(ys), generator=self.learner.generator).split(self.learner.batch_size):
            x = xs[chunk]
            if self.learner.augment is not None:
                x = self.learner.augment(x, self.learner.generator)
            yield Batch(x.to(dev), ys[chunk].to(dev), ts[chunk].to(dev), torch.full((len(chunk),), -1))

    def loss(self, batch, losses, outputs):
        columns = self.seen + list(self.task.classes)
        targets = F.one_hot(batch.y, outputs.shape[1]).float()[:, columns]
        if self.old is not None:
            old = distributed.sharded(lambda x, t: frozen_call(self.learner.model, self.old, x, t), batch.x, batch.t)
            old = torch.sigmoid(old / self.options.icarl_temperature)
            targets[:, :len(self.seen)] = old[:, self.seen]
        return F.binary_cross_entropy_with_logits(outputs[:, columns], targets, reduction="none").sum(1)

    @torch.no_grad()
    def features(self, x: torch.Tensor) -> torch.Tensor:
        """L2-normalised backbone features in eval mode (data-parallel: each worker its rows, gathered)."""
        model = self.learner.model
        was_training = model.training
        model.eval()
        device = self.learner.device
        out = distributed.sharded(lambda rows: torch.cat([F.normalize(model.backbone(chunk.to(device)), dim=1)
                                                          for chunk in rows.split(256)]), x)
        model.train(was_training)
        return out

    def after_task(self, task):
        self.ledger.raw(task.dataset_id, "icarl exemplars")
        self.seen += list(task.classes)
        m = self.options.icarl_memory // len(self.seen)
        for c in self.exemplars:
            x, t = self.exemplars[c]
            self.exemplars[c] = (x[:m], t)
        for c in task.classes:
            x = task.train.x[task.train.y == c]
            self.exemplars[c] = (x[herding(self.features(x), m)], task.index)
        self.means = F.normalize(torch.stack([self.features(self.exemplars[c][0]).mean(0) for c in self.seen]), dim=1)
        self.old = frozen_copy(self.learner.model)

    def evaluate(self, task) -> float:
        """Accuracy (%) of the nearest-mean-of-exemplars classifier on the task's test set."""
        if self.means is None:
            return self._network_evaluate(task)
        return self.learner.accuracy(task, -torch.cdist(self.features(task.test.x), self.means), self.seen)

    def task_metrics(self):
        return {"exemplars": sum(len(x) for x, _ in self.exemplars.values())}

    def state_tensors(self):
        return [x for x, _ in self.exemplars.values()] + ([] if self.old is None else list(self.old.values()))
