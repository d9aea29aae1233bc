"""The strategy base class: do-nothing hooks a method overrides as it needs.

Call order within one task (drawn from clsim/engine.py):

    before_task(task)
    for each epoch:
        subset = select_examples(task, epoch)            # data removal drops examples
        for batch in train_batches(task, batches):       # replay mixes in its buffer
            losses = loss(batch, losses, outputs)        # extra data terms
            total  = losses.mean() + penalty()           # data-independent regulariser
            backward; after_backward()                   # gradient masks
            optimizer.step(); after_step()               # clamps, weight masks
            step_metrics()
    after_task(task)                                     # Fisher, bit allocation, buffers
    task_metrics(); state_tensors()                      # figures and memory

A new strategy is one file in strategies/ with a subclass registered by name:

    @register_strategy("mine")
    class Mine(Strategy):
        '''One line for the listing.'''
        @dataclass
        class Options:
            strength: float = opt(1.0, "how strong", low=0)
        def penalty(self): ...
"""
from __future__ import annotations

import math
import warnings
from dataclasses import dataclass
from typing import Iterable

import torch

from clsim.errors import UserError
from clsim.scenario import SETTINGS


class Strategy:
    """Naive fine-tuning: trains on each task in turn and keeps nothing."""

    @dataclass
    class Options:
        pass

    #: a privacy mechanism this strategy always trains under (e.g. "dpsgd"), else None
    privacy: str | None = None
    #: the settings and learners ("supervised", "rl") the method is defined for; setup refuses others
    settings: tuple[str, ...] = SETTINGS
    learners: tuple[str, ...] = ("supervised", "rl")
    #: what a privacy mechanism's ledger sees: "accounted" (task data read only through the
    #: mechanism) or "raw: <why>" (e.g. examples kept in a buffer: that task's ε = ∞)
    data_access: str = "accounted"
    #: the setting the method is designed for (e.g. BLIP: "task_il"), used when the user gives no
    #: --setting; None: the only one in `settings` if it has one, else the scenario's default
    default_setting: str | None = None
    #: Fisher passes per task through `self.mechanism.fisher` (--epsilon reserves budget for them)
    fisher_releases: int = 0
    #: forwards of the trained model in one step (replay adds the buffer's): DP-SGD's ghost
    #: clipping needs exactly one
    model_forwards: int = 1
    #: trains on batches it makes itself (a memory, the union of the tasks seen), not only on the
    #: mechanism's samples
    own_batches: bool = False
    #: attributes kept between tasks that a checkpoint saves and restores as they are (a method
    #: whose state needs converting overrides state_dict and load_state_dict instead)
    state_attrs: tuple[str, ...] = ()

    def __init_subclass__(cls, **kwargs):
        super().__init_subclass__(**kwargs)
        if cls.default_setting is None and len(cls.settings) == 1:
            cls.default_setting = cls.settings[0]

    def __init__(self, options=None):
        self.options = options if options is not None else self.Options()
        self.learner = self.scenario = self.mechanism = self.ledger = None
        self.epochs: int | None = None   # training epochs per task; the engine sets it before setup

    def setup(self, learner, scenario, mechanism) -> None:
        """Called once before the first task. `mechanism` makes gradients (private or not) and
        computes Fisher information (`self.mechanism.fisher`); `self.ledger` records every
        access to task data that does not go through it (e.g. a raw replay buffer)."""
        self.learner, self.scenario = learner, scenario
        self.mechanism, self.ledger = mechanism, mechanism.ledger
        self.check(scenario, learner)

    def check(self, scenario, learner) -> None:
        """Refuse a setting or learner the method is not defined for, in one line (both are
        declared: `scenario.setting`, `learner.kind`)."""
        from clsim.registry import STRATEGIES
        name = next((e.name for e in STRATEGIES.entries() if e.target is type(self)), type(self).__name__)
        if scenario.setting not in self.settings:
            raise UserError(f"strategy {name} works in {' and '.join(self.settings)} only, not "
                            f"{scenario.setting}; pass --setting {self.settings[0]} or pick another strategy")
        kind = learner.kind
        if kind not in self.learners:
            raise UserError(f"strategy {name} works with {' and '.join(self.learners)} learners only, and "
                            f"scenario {scenario.name} is {kind}; pick another strategy or scenario")

    def before_task(self, task) -> None:
        pass

    def select_examples(self, task, epoch: int) -> torch.Tensor | None:
        """Indices of the task's training examples to use this epoch (None: all)."""
        return None

    def train_batches(self, task, batches: Iterable) -> Iterable:
        return batches

    def loss(self, batch, losses: torch.Tensor, outputs: torch.Tensor) -> torch.Tensor:
        """Per-example losses (or a scalar) of the data terms; add replay terms here."""
        return losses

    @property
    def data_terms(self) -> bool:
        """Whether what the learner trains on holds data the mechanism did not sample: terms `loss`
        adds (LwF's distillation, a replay buffer's, iCaRL's loss) or batches the strategy makes
        itself (`own_batches`). A mechanism that re-evaluates only the learner's loss on its own
        sample (dplis) would leave them out, so it refuses such a strategy before training."""
        return self.own_batches or type(self).loss is not Strategy.loss

    def penalty(self) -> torch.Tensor | None:
        """A regulariser that does not read training data (e.g. EWC's), or None."""
        return None

    def after_backward(self) -> None:
        pass

    def after_step(self) -> None:
        pass

    def after_task(self, task) -> None:
        pass

    def step_metrics(self) -> dict:
        """Strategy-specific figures for the step just taken: numbers, or 0-dim tensors, which the
        engine reads without waiting for a GPU to finish the step (a step late there)."""
        return {}

    def task_metrics(self) -> dict:
        """Strategy-specific figures at a task end (numbers, or tensors logged as histograms)."""
        return {}

    def state_tensors(self) -> list[torch.Tensor]:
        """Everything kept between tasks, for the memory metric."""
        return []

    def state_dict(self) -> dict:
        return {name: getattr(self, name) for name in self.state_attrs}

    def load_state_dict(self, state: dict) -> None:
        for name in self.state_attrs:
            setattr(self, name, state[name])


def check_penalty_curvature(strategy: Strategy, task, stiffest: float, what: str, flag: str, strength: float) -> None:
    """A quadratic penalty pulls its stiffest weight with curvature `stiffest`; past what the
    optimiser survives, that weight oscillates ever wider: say so, with the strength that would do
    (none does when the importance overflowed)."""
    limit = strategy.learner.max_stable_curvature()
    if limit is None or task is strategy.scenario.tasks[-1] or stiffest <= limit:   # no more training to diverge
        return
    hint = (f"use {flag} below {strength * limit / stiffest:.3g} or a smaller --lr" if math.isfinite(stiffest) else
            f"the importance holds a non-finite value (it overflowed), so no {flag} helps: use a smaller --lr "
            f"or check the data")
    warnings.warn(f"{what} {stiffest:.3g} exceeds 2(1+momentum)/lr = {limit:.3g}, the most SGD survives, so "
                  f"training will likely diverge; {hint}")
