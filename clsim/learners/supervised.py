"""Supervised learner: backbone + head(s), cross-entropy, mini-batches sliced from tensors."""
from __future__ import annotations

import sys
from contextlib import nullcontext
from typing import Iterator

import torch
import torch.nn.functional as F

from clsim import distributed
from clsim.learners.base import Batch, Learner, to_device
from clsim.scenario import TaskData


def say(line: str) -> None:
    print(f"speed: {line}", file=sys.stderr)


class SupervisedLearner(Learner):
    def __init__(self, *args, augment=None, eval_batch_size: int | None = None,
                 fisher_batch_size: int | None = None, **kwargs):
        super().__init__(*args, **kwargs)
        self.augment = augment
        self.precision, self._compile, self._compiled = "32", False, None
        # NHWC convolutions are faster on CUDA (tensor cores); the CPU keeps NCHW.
        self.channels_last = (self.device.type == "cuda"
                              and any(isinstance(m, torch.nn.Conv2d) for m in self.model.modules()))
        if self.channels_last:
            self.model = self.model.to(memory_format=torch.channels_last)
        # On CPU small evaluation chunks keep activations in cache: 64 was 1.8-2x faster than 1000
        # for the CIFAR ResNet-18/CNN (same predictions); accelerators want large ones.
        self.eval_batch_size = eval_batch_size or (64 if self.device.type == "cpu" else 1000)
        # Per-example gradients (convolutions) hold one copy of the parameters per example: small
        # chunks keep that memory in cache; on CPU 32 was 1.2-1.6x faster than 128 for the CIFAR
        # ResNet-18/CNN. Linear layers form none, and a chunk like the training batch was 1.35x
        # faster than 32 for the 784-1200-1200 MLP at batch 64. A GPU wants fewer, larger launches
        # (128: the reduced ResNet-18's Fisher on an H100 took 0.4x Avalanche's batched pass).
        self.fisher_batch_size = fisher_batch_size or (
            min(max(32, self.batch_size), 128) if self.device.type == "cpu" else 128)
        self._on_device: dict[int, tuple[TaskData, TaskData]] = {}
        self.active_classes: list[int] | None = None   # output units the softmax spans (None: all)
        self._inactive: torch.Tensor | None = None
        self._task_aware: list[float] = []   # task-aware scores of evaluate() calls, until read

    def span_classes(self, classes: list[int] | None) -> None:
        """Let the training loss, the validation loss and the Fisher's softmax span only the output
        units `classes` (--active-classes; None: all); evaluation always chooses among all."""
        self.active_classes, self._inactive = classes, None

    def restricted(self, out: torch.Tensor) -> torch.Tensor:
        """`out` with the logits outside `active_classes` at -inf (their softmax share 0)."""
        if self.active_classes is None:
            return out
        if self._inactive is None or len(self._inactive) != out.shape[1]:
            self._inactive = torch.ones(out.shape[1], dtype=torch.bool)
            self._inactive[self.active_classes] = False
            self._inactive = self._inactive.to(out.device)
        return out.masked_fill(self._inactive, float("-inf"))

    def resident(self, data: TaskData) -> TaskData:
        """`data` on the learner's device, copied there once: an accelerator then slices batches
        in its own memory instead of taking one host copy per batch (continual-learning datasets
        fit in device memory; the CPU copy stays the reference for replay buffers and the like)."""
        if self.device.type == "cpu":
            return data
        hit = self._on_device.get(id(data))
        if hit is None or hit[0] is not data:
            hit = self._on_device[id(data)] = (data, TaskData(data.x.to(self.device), data.y.to(self.device)))
        return hit[1]

    def batches(self, task, epoch: int, subset: torch.Tensor | None = None) -> Iterator[Batch]:
        """One shuffled pass over the task's training set (or `subset` of it); keeps the last
        partial batch."""
        data = self.resident(task.train)
        index = torch.arange(len(data)) if subset is None else subset
        order = index[torch.randperm(len(index), generator=self.generator)]
        # One copy of the order per call (an epoch; a Poisson batch under DP-SGD), not per batch,
        # through pinned memory: a copy from pageable memory would wait for every queued kernel.
        on_device = to_device(order, self.device)
        for chunk, rows in zip(order.split(self.batch_size), on_device.split(self.batch_size)):
            x = data.x[rows]
            if self.augment is not None:
                x = self.augment(x, self.generator)
            t = torch.full((len(chunk),), task.index, dtype=torch.long, device=self.device)
            yield Batch(x, data.y[rows], t, chunk, task.index)

    def forward(self, batch: Batch) -> tuple[torch.Tensor, torch.Tensor]:
        """Per-example losses and outputs; data-parallel, of this worker's rows, gathered."""
        return distributed.sharded_forward(self._forward_rows, batch)

    def _forward_rows(self, batch: Batch) -> tuple[torch.Tensor, torch.Tensor]:
        x = batch.x
        if self.channels_last and x.dim() == 4:
            x = x.contiguous(memory_format=torch.channels_last)
        with self.autocast():
            out = self._forward_model(x, batch.t if batch.task is None else batch.task)
            losses = F.cross_entropy(self.restricted(out), batch.y, reduction="none")
        return losses, out

    # -- GPU options (--compile, --precision; channels_last for convolutions on CUDA)
    def speed_options(self, compile_model: bool, precision: str, blocker: str | None = None) -> None:
        """Training forwards through torch.compile(model) when `compile_model` (else, or when
        `blocker` says why it cannot, eagerly, said on stderr) under bf16 autocast when
        `precision` is "bf16-mixed". Evaluation, Fisher passes and private mechanisms use the
        eager model (same parameters)."""
        self.precision = precision
        if compile_model and blocker is not None:
            say(f"--compile: runs eagerly: {blocker}")
        self._compile = compile_model and blocker is None

    def autocast(self):
        if self.precision == "bf16-mixed":
            return torch.autocast(self.device.type, dtype=torch.bfloat16)
        return nullcontext()

    def _forward_model(self, x, t):
        if self._compiled is not None:
            return self._compiled(x, t)
        if not self._compile:
            return self.model(x, t)
        # Compiled at the first training forward (the model is final by then), where a compiler
        # failure shows: the run goes on eagerly and says why.
        self._compile = False
        try:
            compiled = torch.compile(self.model)
            out = compiled(x, t)
        except Exception as exc:        # noqa: BLE001 - any compiler failure: fall back, said
            say(f"--compile: runs eagerly: torch.compile failed on this model ({type(exc).__name__}: "
                f"{str(exc).splitlines()[0] if str(exc) else ''})")
            return self.model(x, t)
        self._compiled = compiled
        return out

    @torch.no_grad()
    def test_outputs(self, task) -> torch.Tensor:
        """The model's outputs (eval mode) on the task's test set, on the learner's device."""
        was_training = self.model.training
        self.model.eval()
        x = self.resident(task.test).x
        mine = x[distributed.block(len(x))]   # data-parallel: each worker its block, gathered
        out = torch.cat([self.model(chunk, task.index) for chunk in mine.split(self.eval_batch_size)])
        out = distributed.gather_rows(out, len(x), scale=False)
        self.model.train(was_training)
        return out

    def evaluate(self, task) -> float:
        return self.accuracy(task, self.test_outputs(task))

    def accuracy(self, task, scores: torch.Tensor, labels: list[int] | None = None) -> float:
        """Accuracy (%) on the task's test set of the highest of `scores` (one row per test
        example; column k scores label `labels[k]`, default k). Under `task_aware` (class_il) it
        also records the accuracy with the task identity given: the highest among the columns of
        the task's own classes (`task_aware_scores`). That is Mammoth's Task-IL figure of a
        class-IL run (utils/evaluate.py, `mask_classes`: the other tasks' outputs set to -inf
        before the argmax), from the same outputs: no second forward pass."""
        label = torch.arange(scores.shape[1]) if labels is None else torch.as_tensor(labels)
        label, y = label.to(scores.device), self.resident(task.test).y
        correct = (label[scores.argmax(1)] == y).float().mean()
        if self.task_aware:
            others = ~torch.isin(label, torch.as_tensor(task.classes, device=scores.device))
            aware = (label[scores.masked_fill(others, float("-inf")).argmax(1)] == y).float().mean()
            self._task_aware.append(100.0 * aware.item())
        return 100.0 * correct.item()

    def task_aware_scores(self) -> list[float] | None:
        if not self.task_aware:
            return None
        scores, self._task_aware = self._task_aware, []
        return scores

    @torch.no_grad()
    def mean_loss(self, task, data: TaskData) -> float:
        """Mean cross-entropy of `task`'s head on `data`, in eval mode (a validation pass)."""
        was_training = self.model.training
        self.model.eval()
        data = self.resident(data)
        total = sum(F.cross_entropy(self.restricted(self.model(x, task.index)), y, reduction="sum").item()
                    for x, y in zip(data.x.split(self.eval_batch_size), data.y.split(self.eval_batch_size)))
        self.model.train(was_training)
        return total / len(data)

    def fisher_batches(self, task, n: int, empirical: bool) -> Iterator[tuple]:
        """Up to `n` training examples of `task` with their labels (empirical Fisher) or None
        (true Fisher: targets sampled from the model's own predictive distribution)."""
        data = self.resident(task.train)
        pick = torch.randperm(len(data), generator=self.generator)[:n]
        for chunk in pick.split(self.fisher_batch_size):
            yield data.x[chunk], data.y[chunk] if empirical else None, task.index

    def logits(self, x, t) -> torch.Tensor:
        return self.restricted(self.model(x, t))
