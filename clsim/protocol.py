"""Training protocols within a task: a validation split, learning-rate schedules, early stopping.

    --val-fraction f     hold out f of every task's training set (seeded, per task) as its
                         validation set; 0 with the plateau schedule validates on the training
                         set itself, as BLIP's PMNIST loader does (its 'valid' split is a copy of
                         'train').
    --lr-schedule        constant | plateau | cosine | step, stepped once per epoch and restarted
                         at --lr with every task.
    --active-classes     class_il: the training cross-entropy and the Fisher's softmax span only
                         the classes of the tasks trained so far, as van de Ven & Tolias's code
                         does in Class-IL (its `active_classes`; their EWC Fisher takes the same
                         units). clsim masks the other logits with -inf in the learner (one place:
                         `SupervisedLearner.span_classes`); strategies that read the raw outputs
                         themselves (DER++'s stored logits, iCaRL) see every unit as before;
                         LwF's student softmax spans them (see strategies/lwf.py).
                         Evaluation chooses among all classes; after the last task every class
                         is active, so the final row is the one their code reports.
    --optimizer-reset    true (default): a fresh optimizer per task; false: one optimizer for the
                         run, its state (Adam's moments and step count, SGD's momentum) carried
                         from task to task and saved in every checkpoint. van de Ven & Tolias's
                         code keeps one Adam across tasks unless run with --optimizer adam_reset.
                         The lr still restarts at --lr with each task's schedule (their code has
                         no schedule); a plateau decay changes only the lr, never the state.

plateau is the rule of the HAT and BLIP code (approaches/*.py, `train`): after each epoch the
validation loss is measured; an improvement (strictly lower) keeps a copy of the weights and
resets the patience; `--lr-patience` epochs in a row without one divide the lr by
`--lr-factor`, and once the lr falls below `--lr-min` the task stops; the best weights are
restored at the task end. Their defaults are patience 5, factor 3, floor 1e-4. clsim steps
torch's ReduceLROnPlateau (threshold 0, patience-1: torch reduces one epoch *after* `patience`
bad ones, HAT on the `patience`-th) instead of recreating the optimizer, which is the same for
plain SGD; with momentum or Adam their code also drops the optimizer state at each decay.

cosine and step follow Mammoth's schedulers (torch CosineAnnealingLR over the task's epochs,
MultiStepLR at `--lr-milestones` dividing by `--lr-factor`), optionally after
`--warmup-epochs` of linear warm-up (torch LinearLR). Note that SparCL's official script passes
`--lr-scheduler cosine` but builds no scheduler: its runs use a constant lr.

Privacy: the validation examples are part of the task's private dataset. Each validation pass
is a non-private read of them, recorded in the ledger as a raw access of that task's dataset
(so its ε is infinite under any mechanism) — never left out.
"""
from __future__ import annotations

import copy
import math

import torch

from clsim.config import ProtocolOptions
from clsim.errors import UserError
from clsim.scenario import TaskData


def check(options: ProtocolOptions, scenario, epochs: int, learner) -> None:
    """Refuse, before anything runs, what cannot apply to this scenario and its learner."""
    if learner.kind == "rl":
        given = [name for name, value, default in (
            ("--lr-schedule", options.lr_schedule, "constant"), ("--val-fraction", options.val_fraction, 0.0),
            ("--optimizer", options.optimizer, "sgd"), ("--warmup-epochs", options.warmup_epochs, 0),
            ("--optimizer-reset", options.optimizer_reset, True), ("--active-classes", options.active_classes, False))
            if value != default]
        if given:
            raise UserError(f"{', '.join(given)} apply to supervised scenarios; {scenario.name} trains "
                            f"with PPO, whose schedule is set by its --ppo-* options")
        return
    if options.active_classes and scenario.setting != "class_il":
        raise UserError(f"--active-classes applies to class_il (one head over every class); this run is "
                        f"{scenario.setting}: drop --active-classes or use --setting class_il")
    milestones(options)
    if options.warmup_epochs and options.lr_schedule == "plateau":
        raise UserError("--warmup-epochs does not combine with --lr-schedule plateau; drop one of them")
    if options.warmup_epochs >= epochs and options.warmup_epochs:
        raise UserError(f"--warmup-epochs {options.warmup_epochs} leaves no epoch of the {epochs} per task "
                        f"after warm-up; use fewer warm-up epochs or more --epochs")


def milestones(options: ProtocolOptions) -> list[int]:
    if not options.lr_milestones:
        if options.lr_schedule == "step":
            raise UserError("--lr-schedule step needs --lr-milestones, e.g. --lr-milestones 35,45")
        return []
    try:
        values = [int(v) for v in options.lr_milestones.split(",")]
    except ValueError:
        values = []
    if not values or min(values) < 1 or values != sorted(values):
        raise UserError(f"--lr-milestones {options.lr_milestones!r} must be increasing positive epochs "
                        f"separated by commas, e.g. 35,45")
    return values


def carve_validation(scenario, fraction: float, seed: int) -> None:
    """Move a seeded `fraction` of every task's training examples into `task.val`."""
    if fraction <= 0:
        return
    g = torch.Generator().manual_seed(seed)
    for task in scenario.tasks:
        n = len(task.train)
        n_val = int(round(fraction * n))
        if n_val < 1 or n_val >= n:
            raise UserError(f"--val-fraction {fraction} leaves task {task.name} ({n} training examples) "
                            f"with {n_val} validation and {n - n_val} training examples; each needs at least one")
        order = torch.randperm(n, generator=g)
        val, train = order[:n_val].sort().values, order[n_val:].sort().values
        task.val = TaskData(task.train.x[val], task.train.y[val])
        task.train = TaskData(task.train.x[train], task.train.y[train])


class TaskSchedule:
    """One task's learning-rate schedule on `optimizer` (the learner's own, before a privacy
    mechanism wraps it: both share its param_groups). Call `end_epoch()` after every epoch (True:
    stop the task) and `finish()` at the task end."""

    def __init__(self, options: ProtocolOptions, optimizer, learner, task, epochs: int, ledger):
        self.options, self.learner, self.task, self.ledger = options, learner, task, ledger
        self.optimizer = optimizer
        self.epochs_run = 0
        self.best_loss = math.inf
        self.best_state = None
        self.validation_loss: float | None = None
        o = options
        sched = torch.optim.lr_scheduler
        if o.lr_schedule == "plateau":
            self.scheduler = sched.ReduceLROnPlateau(optimizer, mode="min", factor=1 / o.lr_factor,
                                                     patience=o.lr_patience - 1, threshold=0.0,
                                                     threshold_mode="abs", cooldown=0, min_lr=0.0)
            return
        main_epochs = epochs - o.warmup_epochs
        parts = []
        if o.warmup_epochs:
            parts.append(sched.LinearLR(optimizer, start_factor=1 / (o.warmup_epochs + 1), end_factor=1.0,
                                        total_iters=o.warmup_epochs))
        if o.lr_schedule == "cosine":
            parts.append(sched.CosineAnnealingLR(optimizer, T_max=max(1, main_epochs)))
        elif o.lr_schedule == "step":
            parts.append(sched.MultiStepLR(optimizer, [m - o.warmup_epochs for m in milestones(o)],
                                           gamma=1 / o.lr_factor))
        if len(parts) == 2:
            self.scheduler = sched.SequentialLR(optimizer, parts, milestones=[o.warmup_epochs])
        else:
            self.scheduler = parts[0] if parts else None

    def _validate(self) -> float:
        data = self.task.val if self.task.val is not None else self.task.train
        self.ledger.raw(self.task.dataset_id, "validation loss (learning-rate schedule, best-weights restore)")
        return self.learner.mean_loss(self.task, data)

    def end_epoch(self) -> bool:
        self.epochs_run += 1
        if self.options.lr_schedule != "plateau":
            if self.scheduler is not None:
                self.scheduler.step()
            return False
        loss = self.validation_loss = self._validate()
        if loss < self.best_loss:
            self.best_loss = loss
            self.best_state = copy.deepcopy(self.learner.model.state_dict())
        self.scheduler.step(loss)
        return self.optimizer.param_groups[0]["lr"] < self.options.lr_min

    def finish(self) -> dict:
        """Restore the best weights (plateau); the figures the task record reports."""
        if self.best_state is not None:
            self.learner.model.load_state_dict(self.best_state)
        out = {"epochs_run": self.epochs_run, "final_lr": self.optimizer.param_groups[0]["lr"]}
        if self.options.lr_schedule == "plateau":
            out["best_validation_loss"] = self.best_loss
        return out
