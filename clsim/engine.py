"""The engine loop: streams a scenario's tasks through a strategy and emits records."""
from __future__ import annotations

import contextlib
import dataclasses
import math
import random
import time
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch

from clsim import metrics
from clsim.config import ProtocolOptions
from clsim.errors import UserError
from clsim.protocol import TaskSchedule


class Timer:
    def __init__(self, device: torch.device, totals: dict[str, float]):
        self.totals = totals   # seconds by phase, added to in place
        self.device = device

    def add(self, phase: str, since: float) -> float:
        if self.device.type == "cuda":   # a phase ends when its queued kernels have run
            torch.cuda.synchronize(self.device)
        now = time.perf_counter()
        self.totals[phase] = self.totals.get(phase, 0.0) + now - since
        return now


def setup(scenario, strategy, learner, mechanism, ledger, epochs: int) -> None:
    """The parties' setup hooks, in order: the mechanism (it makes gradients and holds the ledger),
    then the strategy (which may re-initialise weights: the last step allowed to change the model
    before training; see docs/architecture.md)."""
    mechanism.setup(learner, scenario, ledger)
    # class_il: every evaluation also gives the task-aware score of the same outputs (Mammoth's
    # Task-IL column); task_il already evaluates with the task's own head, and domain_il's tasks
    # share every output, so masking to a task's classes has no meaning there
    learner.task_aware = (scenario.setting == "class_il" and learner.kind == "supervised"
                          and all(t.classes for t in scenario.tasks))
    strategy.epochs = epochs   # schedules within a task (e.g. SparCL's mask updates) need it
    learner.ledger = ledger    # a learner that keeps raw data itself (SAC's replay buffer) records it
    strategy.setup(learner, scenario, mechanism)


@dataclass
class Parts:
    """An assembled run (`clsim.Experiment.build()`, or made by hand): everything the loop trains with."""
    scenario: Any
    learner: Any
    strategy: Any
    mechanism: Any
    ledger: Any
    loggers: list
    epochs: int
    hparams: dict = field(default_factory=dict)

    def train(self, checkpoint=None, resume: dict | None = None, protocol: ProtocolOptions | None = None) -> dict:
        """Train these (set-up) parts through `loop`; returns its summary figures."""
        return loop(self, checkpoint, resume, protocol)


@dataclass
class Progress:
    """How far a run has come: everything the loop accumulates besides the parts' own state. A
    checkpoint saves it and a resume restores it whole (`snapshot`, `restore`)."""
    initial: list              # scores before any training
    details: dict              # name -> {"initial": row, "matrix": rows} (e.g. raw RL returns)
    matrix: list = field(default_factory=list)   # R: row i = scores on every task after task i
    task_aware: dict | None = None   # class_il: the same with the task identity given at test time
    step: int = 0
    examples: int = 0
    elapsed: float = 0.0       # seconds of training so far (the step records' wall_time)
    wall_time: dict = field(default_factory=dict)   # seconds by phase
    evaluation_curve: list = field(default_factory=list)   # evaluations while training (SAC), in order

    @classmethod
    def start(cls, learner, scenario) -> "Progress":
        """Before the first task: the initial scores (the b of FWT)."""
        initial = [learner.evaluate(t) for t in scenario.tasks]
        details = {name: {"initial": row, "matrix": []} for name, row in learner.score_details().items()}
        aware = learner.task_aware_scores()
        return cls(initial, details, task_aware=None if aware is None else
                   {"accuracy_matrix": [], "initial_scores": aware})


def run(parts: Parts, checkpoint=None, resume: dict | None = None, protocol: ProtocolOptions | None = None) -> dict:
    """`setup`, then `loop`: for parts built by hand (clsim.Experiment.build does both steps)."""
    setup(parts.scenario, parts.strategy, parts.learner, parts.mechanism, parts.ledger, parts.epochs)
    return loop(parts, checkpoint, resume, protocol)


def loop(parts: Parts, checkpoint=None, resume: dict | None = None, protocol: ProtocolOptions | None = None) -> dict:
    """Train on every task in order; evaluate on all tasks after each (the parts are set up).

        b = initial scores
        for task:
            strategy.before_task; optimizer = mechanism.before_task(fresh optimizer, or the
                                                                    run's one: --optimizer-reset false)
            for epoch: for batch in strategy.train_batches(mechanism.batches(...)):
                losses = strategy.loss(batch, *learner.forward(batch))
                mechanism.backward(losses, strategy.penalty()); strategy.after_backward()
                mechanism.step(optimizer); strategy.after_step(); loggers.step(record)
            strategy.after_task; mechanism.after_task
            R row = [learner.evaluate(t) for t in tasks]; loggers.task(record)
        returns the summary (matrix, ACC, BWT, FWT, forgetting, memory, wall time, privacy; in
        class_il also `task_aware`: the same figures with the task identity given at test time)

    `protocol` (clsim/protocol.py) sets the per-epoch lr schedule and early stopping.
    `checkpoint(state)` is called after every task with everything needed to continue (`snapshot`);
    passing that state back as `resume` continues the run exactly where it stopped. The call graph
    of one step is drawn in docs/architecture.md.
    """
    scenario, strategy, learner, mechanism, ledger = (parts.scenario, parts.strategy, parts.learner,
                                                      parts.mechanism, parts.ledger)
    protocol = protocol or ProtocolOptions()
    emit = _Emitter(parts.loggers)
    kept = None if protocol.optimizer_reset else learner.make_optimizer()   # --optimizer-reset false
    if resume is None:
        progress = Progress.start(learner, scenario)
    else:
        progress = restore(resume, parts, kept)
    R, aware = progress.matrix, progress.task_aware
    timer = Timer(learner.device, progress.wall_time)
    start = time.perf_counter() - progress.elapsed
    private = not mechanism.logs_training_figures()
    hidden = {"loss", "examples_seen", *getattr(learner, "training_figures", ())} if private else set()
    params = [p for p in learner.model.parameters()]
    for task in scenario.tasks[len(R):]:
        t0 = time.perf_counter()
        strategy.before_task(task)
        own_optimizer = learner.make_optimizer() if kept is None else restarted(kept, learner.lr)
        if protocol.active_classes:   # class_il: the softmax spans the classes seen so far
            learner.span_classes(sorted({c for seen in scenario.tasks[:task.index + 1] for c in seen.classes}))
        schedule = TaskSchedule(protocol, own_optimizer, learner, task, parts.epochs, ledger)
        optimizer = mechanism.before_task(task, own_optimizer)
        learner.model.train()
        queued = None   # a GPU step's record, its tensor figures on their way to the host

        def report(epoch: int, losses, n: int) -> None:
            """Emit the step's record; under a mechanism without figures read from training data."""
            nonlocal queued
            progress.step, progress.examples = progress.step + 1, progress.examples + n
            record = {"step": progress.step, "task": task.index, "epoch": epoch, "loss": losses,
                      "lr": optimizer.param_groups[0]["lr"], "examples_seen": progress.examples,
                      "wall_time": time.perf_counter() - start, **learner.step_metrics(),
                      **strategy.step_metrics(), **mechanism.step_metrics()}
            record = {k: v for k, v in record.items() if k not in hidden and v is not None}
            if private:   # stop on what the mechanism released (the weights), not on the batch's loss
                record["_finite"] = torch.stack([p.detach().isfinite().all() for p in params]).all()
            if queued is not None:
                _report_step(emit, queued.wait())
            queued = _HostCopy(record)
            if queued.event is None:   # figures already on the host (CPU): report at once
                _report_step(emit, queued.wait())
                queued = None

        def with_noise_steps(batches, epoch: int):
            """Take the step of an empty Poisson draw (None) here: noise, the strategy's penalty,
            gradient masks and after_step (BLIP's clamp) run as on any step."""
            for batch in batches:
                if batch is not None:
                    yield batch
                    continue
                optimizer.zero_grad(set_to_none=True)
                mechanism.noise_step(strategy.penalty())
                strategy.after_backward()
                mechanism.step(optimizer)
                strategy.after_step()
                report(epoch, None, 0)

        for epoch in range(parts.epochs):
            subset = strategy.select_examples(task, epoch)
            batches = with_noise_steps(mechanism.batches(task, epoch, subset), epoch)
            for batch in strategy.train_batches(task, batches):
                losses, outputs = learner.forward(batch)
                losses = strategy.loss(batch, losses, outputs)
                optimizer.zero_grad(set_to_none=True)
                mechanism.backward(losses, strategy.penalty())
                strategy.after_backward()
                mechanism.step(optimizer)
                strategy.after_step()
                report(epoch, losses.detach().mean(), len(batch[0]))
            if schedule.end_epoch():
                break
        if queued is not None:
            _report_step(emit, queued.wait())
        schedule_figures = schedule.finish()
        t1 = timer.add("train", t0)
        strategy.after_task(task)
        mechanism.after_task(task)
        t2 = timer.add("strategy", t1)
        R.append([learner.evaluate(t) for t in scenario.tasks])
        row_details = learner.score_details()   # e.g. raw RL returns behind normalised scores
        if set(row_details) != set(progress.details):
            raise UserError(f"the checkpoint's score details {sorted(progress.details)} are not this run's "
                            f"{sorted(row_details)}; it was damaged or edited: start the run again")
        for name, row in row_details.items():
            progress.details[name]["matrix"].append(row)
        aware_row = learner.task_aware_scores()
        if aware is not None:
            if len(aware_row) != len(scenario.tasks):
                raise RuntimeError(f"{len(aware_row)} task-aware scores for {len(scenario.tasks)} tasks: an "
                                   f"evaluate() that skips learner.accuracy records none")
            aware["accuracy_matrix"].append(aware_row)
        timer.add("eval", t2)
        points = learner.evaluation_curve()   # evaluations made while training (SAC)
        progress.evaluation_curve.extend(points)
        i = task.index
        emit("task", {"task": i, "step": progress.step, "row": R[-1], **metrics.after_task(R, progress.initial, i),
                      **({} if aware is None else {"task_aware": task_aware_figures(aware, i, row=True)}),
                      "details": row_details, **({"evaluation_curve": points} if points else {}),
                      "memory": memory(learner, strategy), "wall_time": dict(timer.totals),
                      "strategy": strategy.task_metrics(), "schedule": schedule_figures,
                      "privacy": ledger.report()})
        if checkpoint is not None:   # after the task's record: a checkpoint never runs ahead of the log
            progress.elapsed = time.perf_counter() - start
            checkpoint(snapshot(parts, progress, kept))
    return {"accuracy_matrix": R, "initial_scores": progress.initial, "score_details": progress.details,
            **({"evaluation_curve": progress.evaluation_curve} if progress.evaluation_curve else {}),
            **metrics.summary(R, progress.initial),
            **({} if aware is None else {"task_aware": task_aware_figures(aware, len(R) - 1)}),
            "memory": memory(learner, strategy),
            "wall_time": {**timer.totals, "total": time.perf_counter() - start},
            "privacy": ledger.report(), "steps": progress.step,
            **({} if private else {"examples_seen": progress.examples})}


def task_aware_figures(aware: dict, i: int, row: bool = False) -> dict:
    """ACC, BWT, FWT and forgetting of the task-aware matrix after task i, with that task's row
    (a task record) or the whole matrix and initial scores (the summary)."""
    M, b = aware["accuracy_matrix"], aware["initial_scores"]
    figures = metrics.after_task(M, b, i)
    return {"row": M[i], **figures} if row else {**aware, **figures}


class _HostCopy:
    """A step record whose tensor figures (0-dim: the loss, a penalty) are copied to the host. On a
    GPU the copy is queued behind the step's kernels and waited for one step later, so loggers see
    that step's record after the next step has been launched (reading at once made the host wait
    for the GPU's whole queue every step: 12% of a launch-bound H200 step). On a CPU it is at once."""

    def __init__(self, record: dict):
        self.record = record
        self.keys = [k for k, v in record.items() if isinstance(v, torch.Tensor)]   # the loss at least
        self.counts = {k for k in self.keys if not (record[k].is_floating_point() or record[k].is_complex())}
        values = torch.stack([record[k].detach().double().reshape(()) for k in self.keys])
        self.event = None
        if values.device.type == "cuda":
            self.values = values.to("cpu", non_blocking=True)   # into pinned memory, asynchronously
            self.event = torch.cuda.Event()
            self.event.record()
        else:
            self.values = values.cpu()

    def wait(self) -> dict:
        if self.event is not None:
            self.event.synchronize()   # only this step's copy; later steps keep running
        self.record.update((k, int(v) if k in self.counts else v) for k, v in zip(self.keys, self.values.tolist()))
        return self.record


def _report_step(emit, record: dict) -> None:
    loss = record.get("loss")
    if loss is not None and not math.isfinite(loss):
        raise UserError(f"the loss became {loss} at task {record['task']} epoch {record['epoch']} "
                        f"step {record['step']}; lower --lr or change the strategy's options")
    if record.pop("_finite", 1.0) != 1.0:
        raise UserError(f"the weights became non-finite at task {record['task']} epoch {record['epoch']} "
                        f"step {record['step']}; lower --lr or change the strategy's options")
    emit("step", record)


def restarted(optimizer: torch.optim.Optimizer, lr: float) -> torch.optim.Optimizer:
    """`optimizer` with its lr back at `lr`: a task's schedule starts from there, its state stays."""
    for group in optimizer.param_groups:
        group["lr"] = lr
    return optimizer


def snapshot(parts: Parts, progress: Progress, optimizer: torch.optim.Optimizer | None = None) -> dict:
    """The state a run continues from: its progress, model, strategy, ledger, the run's one
    optimizer (--optimizer-reset false) and every RNG, as tensors and plain data only (a resume
    loads it with torch.load(weights_only=True))."""
    name, keys, pos, has_gauss, cached = np.random.get_state()
    return {"progress": dataclasses.asdict(progress), "model": parts.learner.model.state_dict(),
            "learner": parts.learner.state_dict(),
            "strategy": parts.strategy.state_dict(), "ledger": parts.ledger.state_dict(),
            **({} if optimizer is None else {"optimizer": optimizer.state_dict()}),
            "rng": {"torch": torch.get_rng_state(),
                    "numpy": [name, torch.from_numpy(keys.astype(np.int64)), pos, has_gauss, cached],
                    "python": random.getstate(), "learner": parts.learner.generator.get_state()}}


def _rows(rows, n: int, count: int | None = None) -> bool:
    """`rows` is a list (of `count` rows, when given) of score rows of `n` finite numbers each."""
    return (isinstance(rows, list) and (count is None or len(rows) == count)
            and all(isinstance(r, list) and len(r) == n and all(map(metrics.finite_number, r)) for r in rows))


def _fits(progress: Progress, learner, n: int) -> bool:
    """A restored progress is that of a run of `n` tasks by this learner: every matrix it carries
    (scores, the task-aware scores, the details behind them) has one row per finished task. (Which
    details a learner keeps shows only once it evaluates: the loop checks their names.)"""
    done = len(progress.matrix)
    aware, details = progress.task_aware, progress.details
    return (_rows(progress.matrix, n) and done <= n and _rows([progress.initial], n)
            and (aware is None) == (not getattr(learner, "task_aware", False))
            and (aware is None or (isinstance(aware, dict) and set(aware) == {"accuracy_matrix", "initial_scores"}
                                   and _rows(aware["accuracy_matrix"], n, done) and _rows([aware["initial_scores"]], n)))
            and isinstance(details, dict)
            and all(isinstance(d, dict) and set(d) == {"initial", "matrix"} and _rows([d["initial"]], n)
                    and _rows(d["matrix"], n, done) for d in details.values())
            and isinstance(progress.step, int) and isinstance(progress.examples, int)
            and progress.step >= 0 and progress.examples >= 0
            and isinstance(progress.elapsed, float) and math.isfinite(progress.elapsed) and progress.elapsed >= 0
            and isinstance(progress.wall_time, dict) and all(isinstance(k, str) and metrics.finite_number(v)
                                                             for k, v in progress.wall_time.items())
            and isinstance(progress.evaluation_curve, list)
            and all(isinstance(p, dict) for p in progress.evaluation_curve))


@contextlib.contextmanager
def checkpoint_fields():
    """Reading a checkpoint being resumed. Its identity matched this run (clsim/rundir.py), so a
    field that is missing or does not fit means the file was damaged or edited: one line."""
    try:
        yield
    except KeyError as exc:
        raise UserError(f"the checkpoint lacks {exc} (it was damaged or edited); start the run again") from None
    except (RuntimeError, ValueError, TypeError, IndexError, AttributeError, OverflowError) as exc:
        why = " ".join(str(exc).split())[:200]
        raise UserError(f"the checkpoint does not fit this run ({type(exc).__name__}: {why}); it was damaged "
                        f"or edited: start the run again") from None


def restore(state: dict, parts: Parts, optimizer: torch.optim.Optimizer | None = None) -> Progress:
    """Put `snapshot`'s state back into the parts (and `optimizer`); returns the progress."""
    if "progress" not in state:
        raise UserError("this checkpoint was written by an older clsim (no progress record); start the run again")
    if optimizer is not None and "optimizer" not in state:
        raise UserError("this checkpoint holds no optimizer state, which --optimizer-reset false needs; "
                        "resume it with the options it was written with")
    with checkpoint_fields():
        missing = {f.name for f in dataclasses.fields(Progress)} - set(state["progress"])
        if missing:   # Progress's defaults are for a start, not for a checkpoint that lost a figure
            raise KeyError(sorted(missing)[0])
        progress = Progress(**state["progress"])
        n = len(parts.scenario.tasks)
        if not _fits(progress, parts.learner, n):
            raise TypeError(f"its progress is not that of a run of {n} tasks")
        if optimizer is not None:
            optimizer.load_state_dict(state["optimizer"])
        parts.learner.model.load_state_dict(state["model"])
        bad = next((name for name, p in parts.learner.model.named_parameters() if not p.detach().isfinite().all()),
                   None)
        if bad is not None:   # training stops before a checkpoint could hold them: the file was changed
            raise UserError(f"the checkpoint holds non-finite weights ({bad}); it was damaged or edited: "
                            f"start the run again")
        parts.learner.load_state_dict(state["learner"])
        parts.strategy.load_state_dict(state["strategy"])
        parts.ledger.load_state_dict(state["ledger"])
        rng = state["rng"]
        torch.set_rng_state(rng["torch"])
        name, keys, pos, has_gauss, cached = rng["numpy"]
        np.random.set_state((name, keys.numpy().astype(np.uint32), pos, has_gauss, cached))
        random.setstate(rng["python"])
        parts.learner.generator.set_state(rng["learner"])
    return progress


def memory(learner, strategy) -> dict:
    params = list(learner.model.parameters()) + list(learner.model.buffers())
    return {"parameter_bytes": metrics.tensor_bytes(params),
            "strategy_state_bytes": metrics.tensor_bytes(strategy.state_tensors()),
            "peak_rss_bytes": metrics.peak_rss_bytes(),
            **({"peak_device_bytes": torch.cuda.max_memory_allocated(learner.device)}
               if learner.device.type == "cuda" else {})}


class _Emitter:
    def __init__(self, loggers):
        self.loggers = loggers

    def __call__(self, kind: str, record: dict) -> None:
        for logger in self.loggers:
            getattr(logger, kind)(record)
