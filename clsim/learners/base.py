"""The learner interface (see clsim/learners/__init__.py)."""
from __future__ import annotations

from typing import Iterator, NamedTuple

import torch
from torch import nn


class Batch(NamedTuple):
    x: torch.Tensor
    y: torch.Tensor
    t: torch.Tensor        # task index of every example
    index: torch.Tensor    # example index in its task's training set (-1 when not applicable)


class Learner:
    HEAD_PREFIXES: tuple[str, ...] = ("heads.",)

    def __init__(self, model: nn.Module, lr: float, momentum: float, batch_size: int,
                 device: torch.device, generator: torch.Generator):
        self.model = model.to(device)
        self.lr, self.momentum, self.batch_size = lr, momentum, batch_size
        self.device, self.generator = device, generator

    def make_optimizer(self) -> torch.optim.Optimizer:
        return torch.optim.SGD(self.model.parameters(), lr=self.lr, momentum=self.momentum)

    def is_head(self, name: str) -> bool:
        """Whether a parameter belongs to a task-specific head; a single head serves every task
        (class_il/domain_il), so penalties and masks protect it like the trunk."""
        return name.startswith(self.HEAD_PREFIXES) and len(self.model.heads) > 1

    def shared_parameters(self) -> dict[str, nn.Parameter]:
        """Parameters outside the task heads: what Fisher-based penalties protect."""
        return {n: p for n, p in self.model.named_parameters() if not self.is_head(n)}

    # Subclasses implement these.
    def batches(self, task, epoch: int, subset: torch.Tensor | None = None) -> Iterator[Batch]:
        raise NotImplementedError

    def forward(self, batch: Batch) -> tuple[torch.Tensor, torch.Tensor]:
        raise NotImplementedError

    def evaluate(self, task) -> float:
        raise NotImplementedError

    def fisher_batches(self, task, n: int, empirical: bool) -> Iterator[tuple]:
        raise NotImplementedError

    def log_likelihood(self, x, y, t) -> torch.Tensor:
        raise NotImplementedError

    # Optional figures; the defaults add nothing.
    def step_metrics(self) -> dict:
        """Learner figures for the step just taken (e.g. RL episode return, env steps/sec)."""
        return {}

    def score_details(self) -> dict[str, list[float]]:
        """Figures behind the scores of the evaluate() calls since the last call, one list per
        name in call order (e.g. RL raw returns beside normalised scores); then forgets them."""
        return {}
