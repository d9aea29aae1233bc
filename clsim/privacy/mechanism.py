"""How gradients are made from a batch. The base class is no privacy at all."""
from __future__ import annotations

from contextlib import nullcontext

import torch

from clsim import distributed
from clsim.fisher import diagonal_fisher


class Mechanism:
    """Plain back-propagation: every training pass is a raw access to the task's data."""

    name = "none"

    def __init__(self, options=None):
        self.options = options

    def ledger_options(self) -> dict:
        """Keyword arguments for the run's Ledger (δ, accountant)."""
        return {}

    def check(self, learner, scenario, epochs: int, fisher_releases: int = 0, model_forwards: int = 1,
              data_terms: bool = False) -> None:
        """Raise UserError before anything runs if the settings cannot work; changes nothing.
        `fisher_releases`: Fisher passes the strategy makes per task (part of the budget);
        `model_forwards`: forwards of the model in one training step (replay makes two);
        `data_terms`: the strategy's `loss` changes the learner's per-example losses (Strategy.data_terms)."""

    def attach(self, learner) -> None:
        """Prepare the learner's model for this mechanism (after `check`)."""

    def logs_training_figures(self) -> bool:
        """Whether figures read from the training data (the step loss, examples seen, RL training
        returns) may be logged: always without a mechanism (every access is raw anyway)."""
        return True

    def setup(self, learner, scenario, ledger) -> None:
        self.learner, self.scenario, self.ledger = learner, scenario, ledger
        distributed.split_rows(True)
        ledger.declare(scenario.tasks)

    def before_task(self, task, optimizer: torch.optim.Optimizer) -> torch.optim.Optimizer:
        """Returns the optimizer to train `task` with (a private one may wrap it)."""
        self.ledger.raw(task.dataset_id, "training")
        return optimizer

    def batches(self, task, epoch: int, subset):
        return self.learner.batches(task, epoch, subset)

    def backward(self, losses: torch.Tensor, penalty: torch.Tensor | None) -> None:
        loss = losses.mean()
        if penalty is not None:
            loss = loss + penalty
        loss.backward()
        distributed.average_gradients(self.learner.model.parameters())   # data-parallel: the whole batch's

    def noise_step(self, penalty: torch.Tensor | None) -> None:
        """A step without examples (a private mechanism's empty Poisson draw): only the noise and
        the penalty's gradient; `step` follows. Plain training never draws an empty batch."""
        raise NotImplementedError

    def step(self, optimizer: torch.optim.Optimizer) -> None:
        optimizer.step()

    def fisher(self, task, names: list[str], n_samples: int, empirical: bool, purpose: str
               ) -> dict[str, torch.Tensor]:
        """Diagonal Fisher of `task` for the named parameters; here a raw access to its data
        (a private mechanism clips, noises and accounts it instead)."""
        self.ledger.raw(task.dataset_id, purpose)
        return diagonal_fisher(self.learner, task, names, n_samples, empirical)

    def hooks_lifted(self):
        """A context in which the model runs without the mechanism's hooks, for torch.func transforms
        of it (which cannot pass them): the DP-Fisher's, MAS's importances. None here."""
        return nullcontext()

    def after_task(self, task) -> None:
        pass

    def step_metrics(self) -> dict:
        return {}
