"""The learner interface (see clsim/learners/__init__.py)."""
from __future__ import annotations

from typing import Iterator, NamedTuple

import torch
import torch.nn.functional as F
from torch import nn


class Batch(NamedTuple):
    x: torch.Tensor
    y: torch.Tensor
    t: torch.Tensor        # task index of every example
    index: torch.Tensor    # example index in its task's training set (-1 when not applicable)
    task: int | None = None  # the one task of every example, when known on the host (no device read)


def to_device(index: torch.Tensor, device: torch.device) -> torch.Tensor:
    """A host tensor (an index decided by a seeded host generator) on `device`. On CUDA it goes
    through pinned memory asynchronously: a plain copy from pageable memory would make the host
    wait for every queued kernel. Unchanged on the CPU."""
    if device.type != "cuda":
        return index.to(device)
    return index.pin_memory().to(device, non_blocking=True)


class PrivacyPlan(NamedTuple):
    """How a privacy mechanism samples a task's privacy units (clsim/privacy/dpsgd.py)."""
    units: int               # N: units in the task (δ must stay below 1/N)
    sample_rate: float       # q: each unit's chance to be in one release's Poisson batch
    releases_per_epoch: int  # releases any one unit can take part in, per epoch: what is accounted
    expected_batch: int      # the public divisor of each noisy sum (q times the units sampled from)
    note: str = ""           # how the plan bounds a unit's participation, for the ledger


class Learner:
    """Declares what it offers (docs/architecture.md, "Capabilities"): `kind`, `privacy_unit`, whether it draws its
    own private batches, and (from its model) whether there is one head per task."""
    HEAD_PREFIXES: tuple[str, ...] = ("heads.",)
    #: "supervised" (tasks carry datasets) or "rl" (tasks carry environments)
    kind = "supervised"
    #: True: `private_batches(task, epoch)` samples the privacy units itself (e.g. PPO's episodes);
    #: False: a private mechanism Poisson-samples examples from `batches`
    draws_private_batches = False
    #: a function (x, generator) -> x applied to training batches (e.g. crop + flip), or None;
    #: replay strategies apply it to what they draw from their buffers
    augment = None
    # A private mechanism clips one gradient per unit: per row of a batch ("example"), or per
    # group of rows sharing `batch.index` (e.g. "episode": the sum of its transitions' gradients).
    privacy_unit = "example"
    # step_metrics() keys computed from training data: left out of the logs under a mechanism.
    training_figures: tuple[str, ...] = ()
    # class_il (set by clsim.engine.setup): evaluate() also records the task-aware score of the
    # same outputs, read back by `task_aware_scores`
    task_aware = False
    #: the run's privacy ledger (set by clsim.engine.setup), for data a learner itself keeps raw
    ledger = None

    def __init__(self, model: nn.Module, lr: float, momentum: float, batch_size: int,
                 device: torch.device, generator: torch.Generator, optimizer: str = "sgd"):
        self.model = model.to(device)
        self.lr, self.momentum, self.batch_size = lr, momentum, batch_size
        self.optimizer_kind = optimizer
        self.device, self.generator = device, generator

    def make_optimizer(self) -> torch.optim.Optimizer:
        if self.optimizer_kind == "adam":
            return torch.optim.Adam(self.model.parameters(), lr=self.lr, betas=(0.9, 0.999))
        return torch.optim.SGD(self.model.parameters(), lr=self.lr, momentum=self.momentum)

    def max_stable_curvature(self) -> float | None:
        """The largest curvature along one weight that the optimiser survives: SGD with
        heavy-ball momentum β diverges past 2(1+β)/lr; None for optimisers without such a bound."""
        if self.optimizer_kind == "adam":
            return None   # Adam rescales every step: no fixed bound
        return 2 * (1 + self.momentum) / self.lr

    @property
    def per_task_heads(self) -> bool:
        """Whether the model has one output head per task (task_il)."""
        return len(getattr(self.model, "heads", ())) > 1

    def is_head(self, name: str) -> bool:
        """Whether a parameter belongs to a task-specific head; a single head serves every task
        (class_il/domain_il, and task_il's one output layer under --task-heads shared), so
        penalties and masks protect it like the trunk."""
        return name.startswith(self.HEAD_PREFIXES) and self.per_task_heads

    def shared_parameters(self) -> dict[str, nn.Parameter]:
        """Parameters outside the task heads: what Fisher-based penalties protect."""
        return {n: p for n, p in self.model.named_parameters() if not self.is_head(n)}

    def privacy_plan(self, task) -> PrivacyPlan:
        """Examples: Poisson batches of expected size B from the task's N examples, N/B per epoch."""
        n = len(task.train)
        return PrivacyPlan(n, self.batch_size / n, max(1, round(n / self.batch_size)), self.batch_size)

    def fisher_pool(self, task) -> int:
        """How many units `fisher_batches` draws from (a public count: the DP-Fisher divides by it)."""
        return len(task.train)

    # Subclasses implement these.
    def batches(self, task, epoch: int, subset: torch.Tensor | None = None) -> Iterator[Batch]:
        raise NotImplementedError

    def forward(self, batch: Batch) -> tuple[torch.Tensor, torch.Tensor]:
        raise NotImplementedError

    def evaluate(self, task) -> float:
        raise NotImplementedError

    def fisher_batches(self, task, n: int, empirical: bool) -> Iterator[tuple]:
        """(x, y, t) chunks of up to `n` units of `task`; y is None for the true Fisher (targets
        sampled from the model: `sampled_log_likelihood`)."""
        raise NotImplementedError

    def logits(self, x, t) -> torch.Tensor:
        """The model's output that parameterises p(y | x): class scores (softmax), or an RL
        policy's action-distribution parameters."""
        raise NotImplementedError

    def log_prob(self, out: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        """log p(y_i | x_i) from the output `out` of `logits` (here: a softmax over classes)."""
        return F.log_softmax(out, 1).gather(1, y[:, None]).squeeze(1)

    def sample_targets(self, out: torch.Tensor) -> torch.Tensor:
        """y_i ~ p(y | x_i) from the output of `logits`, drawn with the learner's generator."""
        probs = F.softmax(out.detach(), 1).cpu()
        return torch.multinomial(probs, 1, generator=self.generator).squeeze(1).to(out.device)

    def log_likelihood(self, x, y, t) -> torch.Tensor:
        return self.log_prob(self.logits(x, t), y)

    def sampled_log_likelihood(self, x, t) -> tuple[torch.Tensor, torch.Tensor]:
        """log p(y_i | x_i) of targets y sampled from the model, and y: one forward pass."""
        out = self.logits(x, t)
        y = self.sample_targets(out)
        return self.log_prob(out, y), y

    def state_dict(self) -> dict:
        """What the learner carries from task to task besides its model and generator (plain data
        a checkpoint keeps, e.g. running training figures); none by default."""
        return {}

    def load_state_dict(self, state: dict) -> None:
        pass

    # Optional figures; the defaults add nothing.
    def step_metrics(self) -> dict:
        """Learner figures for the step just taken (e.g. RL episode return, env steps/sec):
        numbers, or 0-dim tensors (read as in Strategy.step_metrics)."""
        return {}

    def task_aware_scores(self) -> list[float] | None:
        """The task-aware scores of the evaluate() calls since the last call, in call order, then
        forgets them; None for a learner without them. Set `task_aware` (clsim.engine.setup does,
        in class_il) and a supervised learner also scores each evaluation's outputs with the task
        identity given (clsim/learners/supervised.py)."""
        return None

    def evaluation_curve(self) -> list[dict]:
        """Evaluations made while training since the last call (e.g. SAC's every N steps), one
        dict per point, then forgets them; the engine keeps them as summary.json's
        `evaluation_curve`."""
        return []

    def score_details(self) -> dict[str, list[float]]:
        """Figures behind the scores of the evaluate() calls since the last call, one list per
        name in call order (e.g. RL raw returns beside normalised scores); then forgets them."""
        return {}
