"""Experience replay (ER) and Dark Experience Replay++ (DER++, Buzzega et al. 2020).

Both keep a reservoir buffer of training examples seen so far (Vitter's algorithm R: the n-th
example seen enters with probability size/n, replacing a uniformly chosen slot), drawn from the
learner's seeded generator. As in Mammoth (models/er.py, models/derpp.py), every step on which
the buffer holds examples replays it, i.e. from the second step of the first task on
(`--replay-from-task T`: only from task T on, the buffer filling all the same):

    ER:    the mean cross-entropy over the current batch and one buffer draw concatenated
           (buffer rows weighted by er_weight, 1 in Mammoth)
    DER++: mean CE(current) + alpha * MSE(logits(buffer draw 1), stored logits)
           + beta * mean CE(buffer draw 2)

Where clsim differs: the buffer draw is forwarded apart from the current batch (Mammoth's ER
forwards them as one batch), which matters only for batch-norm statistics in training mode.

Stored logits are the model's outputs for the example when it entered the buffer (before that
step's update). The buffer lives on the CPU and keeps examples un-augmented; draws get the
learner's augmentation, as training batches do. Keeping raw examples
is a raw touch of every task's data in the privacy ledger. Training FLOPs are counted with
clsim.flops over every example forwarded, so replay runs compare with sparse ones.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from clsim import distributed
from clsim.config import opt
from clsim.errors import UserError
from clsim.flops import TrainingFlops
from clsim.learners import Batch, to_device
from clsim.metrics import tensor_bytes
from clsim.models import buffer_slots
from clsim.registry import register_strategy
from clsim.strategy import Strategy


class ReservoirBuffer:
    """Fixed-size reservoir of (x, y, t, logits); storage is allocated on the first insert.

    x, y and logits live on `device` (the learner's); the slots are decided on the host from the
    seeded generator and the counts alone (never from the data), and the task ids are kept on the
    host too, so that neither an insert nor a draw makes the host wait for a GPU."""

    def __init__(self, size: int, generator: torch.Generator, device: torch.device | str = "cpu"):
        self.size, self.generator, self.device = size, generator, torch.device(device)
        self.seen = 0          # examples offered so far, across epochs and tasks
        self.count = 0         # filled slots
        self.x = self.y = self.t = self.logits = None

    def add(self, x, y, t, logits) -> torch.Tensor:
        """Offer a batch in order (t on the host); returns the slot each example went to (-1: not kept)."""
        n = len(y)
        position = self.seen + torch.arange(n)                      # 0-based arrival number
        draw = (torch.rand(n, generator=self.generator) * (position + 1)).long()
        slot = torch.where(position < self.size, position, draw)
        slot = torch.where(slot < self.size, slot, torch.full_like(slot, -1))
        self.seen += n
        if self.x is None:
            dev = self.device
            self.x = torch.zeros((self.size, *x.shape[1:]), dtype=x.dtype, device=dev)
            self.y = torch.zeros(self.size, dtype=y.dtype, device=dev)
            self.t = torch.zeros(self.size, dtype=torch.long)
            self.logits = torch.zeros((self.size, logits.shape[1]), dtype=logits.dtype, device=dev)
        # Within one batch a later example overwrites an earlier one on the same slot, as if
        # they had been offered one at a time: keep only each slot's last writer.
        keep = slot >= 0
        later = (slot.unsqueeze(0) == slot.unsqueeze(1)).triu(1).any(1)
        keep &= ~later
        rows, slots = keep.nonzero().squeeze(1), slot[keep]
        self.t[slots] = t[rows]
        rows, slots = to_device(rows, self.device), to_device(slots, self.device)
        self.x[slots], self.y[slots] = x[rows].to(self.device), y[rows].to(self.device)
        self.logits[slots] = self._fit(logits[rows].to(self.device))
        self.count = min(self.size, self.count + int((position < self.size).sum()))
        return slot

    def _fit(self, logits: torch.Tensor) -> torch.Tensor:
        """Logits padded with -inf to the buffer's width (task heads may differ in size)."""
        width = self.logits.shape[1]
        if logits.shape[1] == width:
            return logits
        if logits.shape[1] > width:
            pad = self.logits.new_full((self.size, logits.shape[1] - width), float("-inf"))
            self.logits = torch.cat([self.logits, pad], 1)
            return logits
        return torch.cat([logits, logits.new_full((len(logits), width - logits.shape[1]), float("-inf"))], 1)

    def sample(self, k: int):
        """k distinct stored examples drawn uniformly (all of them when fewer are stored); the
        task ids on the host, the rest on the buffer's device."""
        pick = torch.randperm(self.count, generator=self.generator)[:k]
        rows = to_device(pick, self.device)
        return self.x[rows], self.y[rows], self.t[pick], self.logits[rows]

    def tensors(self) -> list[torch.Tensor]:
        return [] if self.x is None else [self.x, self.y, self.t, self.logits]

    def state_dict(self) -> dict:
        return {"seen": self.seen, "count": self.count, "tensors": self.tensors()}

    def load_state_dict(self, state: dict) -> None:
        self.seen, self.count = state["seen"], state["count"]
        if state["tensors"]:
            x, y, t, logits = state["tensors"]
            self.x, self.y, self.t, self.logits = x.to(self.device), y.to(self.device), t.cpu(), logits.to(self.device)


@dataclass
class ReplayOptions:
    replay_size: int = opt(500, "examples kept in the reservoir buffer (one larger than the examples a run "
                           "offers it, training examples x epochs, keeps every one: only that many are "
                           "allocated; one that does not fit in free memory is refused)", low=1)
    replay_batch: int = opt(32, "examples in each buffer draw (0: the learner's batch size)", low=0)
    replay_mask_current: bool = opt(False, "class_il: the current batch's cross-entropy sees only the "
                                    "current task's classes (SparCL's use_cl_mask; off in standard ER/DER++)")
    replay_from_task: int = opt(0, "draw from the buffer only from this task (0-based) on; it fills from the "
                                "first (0: whenever it holds examples, as Mammoth; 1: SparCL's official code)",
                                low=0)


class Replay(Strategy):
    """Shared machinery of ER and DER++ (not registered: pick er or derpp)."""

    Options = ReplayOptions
    learners = ("supervised",)
    data_access = "raw: keeps examples in a buffer"
    model_forwards = 2

    def setup(self, learner, scenario, mechanism):
        super().setup(learner, scenario, mechanism)
        if self.options.replay_from_task >= len(scenario.tasks):
            raise UserError(f"--replay-from-task {self.options.replay_from_task} is past the last task (this stream "
                            f"has {len(scenario.tasks)}, counted from 0), so the buffer would never be drawn "
                            f"from; give a value below {len(scenario.tasks)}")
        self.buffer = ReservoirBuffer(self.buffer_slots(scenario, learner), learner.generator, learner.device)
        self.flops = TrainingFlops(learner.model, scenario.tasks[0].train.x[:1])
        self._pending = None
        self._forwarded = None
        self._allowed = None      # class_il: the current task's classes, as a device mask
        self._last_terms: dict[str, torch.Tensor] = {}   # 0-dim: read a step late on a GPU
        self.tasks_done = 0

    def buffer_slots(self, scenario, learner) -> int:
        """--replay-size, or the examples the run offers the buffer (every training example once an
        epoch), where fewer: a reservoir that large keeps every one of them either way."""
        offers = self.epochs * sum(len(t.train) for t in scenario.tasks)
        x = scenario.tasks[0].train.x
        logits = sum(max(len(t.classes), t.n_outputs) for t in scenario.tasks)   # at most every head's outputs
        slot_bytes = x[0].numel() * x.element_size() + 16 + 4 * logits           # x, y and t, logits
        return buffer_slots("--replay-size", self.options.replay_size, offers, slot_bytes, learner.device)

    def after_task(self, task):
        self.tasks_done += 1

    def before_task(self, task):
        self.task = task
        self._allowed = None
        self.ledger.raw(task.dataset_id, "replay buffer")

    def current_losses(self, batch, losses, outputs):
        """Cross-entropy of the current batch, optionally over the current task's classes only."""
        if not (self.options.replay_mask_current and self.scenario.setting == "class_il"):
            return losses
        if self._allowed is None or len(self._allowed) != outputs.shape[1]:   # once per task: a host copy
            self._allowed = torch.zeros(outputs.shape[1], dtype=torch.bool, device=outputs.device)
            self._allowed[list(self.task.classes)] = True
        return F.cross_entropy(outputs.masked_fill(~self._allowed, float("-inf")), batch.y, reduction="none")

    def loss(self, batch, losses, outputs):
        losses = self.current_losses(batch, losses, outputs)
        forwarded = [self.host_task_ids(len(batch.y))]   # task ids on the host, for the FLOP count
        if self.buffer.count and self.task.index >= self.options.replay_from_task:
            k = self.options.replay_batch or self.learner.batch_size
            losses, self._last_terms = self.add_replay(losses, k, forwarded)
        self._forwarded = torch.cat(forwarded)
        self._pending = (batch, outputs.detach())
        return losses

    def host_task_ids(self, n: int) -> torch.Tensor:
        """The task id of each of n current examples, known on the host (every training batch is
        the current task's)."""
        return torch.full((n,), self.task.index, dtype=torch.long)

    def add_replay(self, losses: torch.Tensor, k: int, forwarded: list) -> tuple[torch.Tensor, dict]:
        """ER: the current losses with the buffer draw's appended, so that their mean is Mammoth's
        cross-entropy over the concatenated batch; and the figures. Appends the (host) task ids
        forwarded."""
        x, y, t, _ = self.draw(k, forwarded)
        replayed = self.learner.forward(Batch(x, y, t, torch.full((len(y),), -1)))[0]
        return torch.cat([losses, self.options.er_weight * replayed]), {"replay_ce": replayed.detach().mean()}

    def after_step(self):
        self.count_flops()
        batch, outputs = self._pending
        x = batch.x
        if self.learner.augment is not None and bool((batch.index >= 0).all()):   # a host index
            # keep the example un-augmented (draws augment it), from the device's copy of the data
            x = self.learner.resident(self.task.train).x[to_device(batch.index, self.learner.device)]
        self.buffer.add(x, batch.y, self.host_task_ids(len(batch.y)), outputs)

    def draw(self, k: int, forwarded: list):
        """k buffer examples on the learner's device (augmented like training batches); appends
        their task ids (on the host) to `forwarded`."""
        x, y, t, logits = self.buffer.sample(k)
        forwarded.append(t)
        if self.learner.augment is not None:
            x = self.learner.augment(x, self.learner.generator)
        return x, y, to_device(t, self.learner.device), logits

    # FLOPs: dense here; SparCL overrides the densities.
    def weight_density(self) -> dict[str, float]:
        return {}

    def grad_density(self) -> dict[str, float]:
        return {}

    def count_flops(self) -> None:
        self.flops.add(self._forwarded, self.weight_density(), self.grad_density())

    def step_metrics(self):
        return {"strategy/train_flops": self.flops.total, "strategy/buffer_bytes": self.buffer_bytes(),
                **{f"strategy/{k}": v for k, v in self._last_terms.items()}}

    def task_metrics(self):
        return {"train_flops": self.flops.total, "buffer_bytes": self.buffer_bytes(),
                "buffer_count": self.buffer.count, "buffer_seen": self.buffer.seen}

    def buffer_bytes(self) -> int:
        return tensor_bytes(self.buffer.tensors())

    def state_tensors(self):
        return self.buffer.tensors()

    def state_dict(self):
        return {"buffer": self.buffer.state_dict(), "train_flops": self.flops.total, "tasks_done": self.tasks_done}

    def load_state_dict(self, state):
        self.buffer.load_state_dict(state["buffer"])
        self.flops.total, self.tasks_done = state["train_flops"], state["tasks_done"]


@register_strategy("er")
class ER(Replay):
    """Experience replay: a reservoir buffer replayed with a cross-entropy term every step."""

    @dataclass
    class Options(ReplayOptions):
        er_weight: float = opt(1.0, "weight of the buffer batch's cross-entropy", low=0.0)


@register_strategy("derpp")
class DERPP(Replay):
    """DER++: replay of stored logits (MSE, alpha) and labels (CE, beta) from a reservoir buffer."""

    @dataclass
    class Options(ReplayOptions):
        derpp_alpha: float = opt(0.1, "α: weight of the MSE between current and stored logits", low=0.0)
        derpp_beta: float = opt(0.5, "β: weight of the cross-entropy on a second buffer draw", low=0.0)

    def add_replay(self, losses, k, forwarded):
        """DER++: the buffer terms (a scalar) added to every current loss, so that their mean is
        mean CE(current) + α·MSE + β·CE(buffer), as in Mammoth."""
        x1, _, t1, stored = self.draw(k, forwarded)
        now = distributed.sharded(self.learner.model, x1, t1)   # data-parallel: this worker's rows
        # MSE over the logits each example has (padding of narrower task heads is -inf in both).
        valid = torch.isfinite(stored)
        diff = torch.where(valid, now - torch.where(valid, stored, 0.0), 0.0)
        mse = (diff.pow(2).sum(1) / valid.sum(1).clamp(min=1)).mean()
        x2, y2, t2, _ = self.draw(k, forwarded)
        ce = self.learner.forward(Batch(x2, y2, t2, torch.full((len(y2),), -1)))[0].mean()
        o = self.options
        return losses + o.derpp_alpha * mse + o.derpp_beta * ce, {"derpp_mse": mse.detach(),
                                                                  "replay_ce": ce.detach()}
