"""GEM (Lopez-Paz & Ranzato, NeurIPS 2017) and A-GEM (Chaudhry et al., ICLR 2019).

Both keep an episodic memory: at the end of each task, `--gem-memory / n_tasks` of its training
examples drawn at random (as Mammoth's models/agem.py at the DER paper's commit 7ab9db9: the first
batch of a shuffled loader of that size; since 0d727a7, 2022, Mammoth adds the task's first training
batch of --batch_size examples through its reservoir buffer instead; the authors' code fills it with
the task's latest examples), kept raw on the learner's device. The rest is Mammoth's at both
commits too: the reference gradient of up to --agem-batch (their minibatch_size) memory examples
drawn without replacement, the projection below, plain SGD. With SAC (Continual World's A-GEM,
methods/agem.py) the memory holds transitions drawn from the task's replay buffer
(`learner.memory_sample`) and the gradients are those of SAC's whole update (actor, critics and,
unlike CW, which leaves it out of the projection, the entropy coefficient α); PPO learns on-policy
from fresh rollouts and keeps nothing to remember, so it is refused. After every backward the gradient g over all the model's
parameters is checked against the memory's:

  A-GEM: g_ref, the gradient of a batch of `--agem-batch` examples drawn from the whole memory;
         if g·g_ref < 0, g ← g − (g·g_ref / g_ref·g_ref) g_ref (so the result has g·g_ref = 0).
         The choice is made on the device (torch.where), so a GPU step never waits for the host;
         the count of projected steps is a device tensor, read one step late in the step figures.
  GEM:   one gradient g_k per earlier task (on all its memory); if some g·g_k < 0, g ← g + Mᵀv
         with v the dual solution of the projection QP, min ½vᵀ(MMᵀ + εI)v + gᵀMᵀv subject to
         v ≥ γ (the authors' `project2cone2`: margin γ = `--gem-margin`, ε = 1e-3). quadprog is not
         a dependency: the same QP is the bounded least-squares problem
         min ½‖Mᵀv + g‖² + ½ε‖v‖², v ≥ γ, which scipy.optimize.lsq_linear solves. Deciding
         whether to solve it and solving it happen on the host: on a GPU, GEM waits for the
         device every step once a task is done (inherent to a host QP solver).

The memory holds raw examples, so under a privacy mechanism every task's ε is ∞ (the ledger says
so); the memory gradient is exact, the current one the mechanism's.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from clsim import distributed
from clsim.config import opt
from clsim.errors import UserError
from clsim.learners import Batch, to_device
from clsim.metrics import tensor_bytes
from clsim.registry import register_strategy
from clsim.strategy import Strategy


@dataclass
class GEMOptions:
    gem_memory: int = opt(500, "examples kept over the whole run, an equal share per task", low=1)


class EpisodicMemory(Strategy):
    """A fixed share of every finished task's examples, and gradient projection onto them."""

    model_forwards = 2          # the memory's gradient comes from a forward of its own

    Options = GEMOptions
    learners = ("supervised", "rl")
    data_access = "raw: keeps examples in an episodic memory"
    state_attrs = ("memory", "projected")

    def setup(self, learner, scenario, mechanism):
        super().setup(learner, scenario, mechanism)
        if learner.kind == "rl" and not hasattr(learner, "memory_sample"):
            raise UserError(f"{type(self).__name__.lower()} keeps stored transitions, and this RL learner (PPO) "
                            f"learns on-policy from fresh rollouts; use a SAC scenario (cw10, cw20, cw_triplets, "
                            f"metaworld:<task>) or a supervised one")
        self.per_task = max(1, self.options.gem_memory // len(scenario.tasks))
        self.batch_type = getattr(learner, "batch_type", Batch)
        self.memory: list[tuple[torch.Tensor, ...]] = []   # one batch's fields per task
        self.projected = 0          # steps whose gradient was changed (A-GEM: a 0-dim device tensor)
        self._dot = None

    def after_task(self, task):
        dev = self.learner.device
        if hasattr(self.learner, "memory_sample"):
            batch = self.learner.memory_sample(task, self.per_task)
        else:
            pick = torch.randperm(len(task.train), generator=self.learner.generator)[:self.per_task]
            batch = Batch(task.train.x[pick], task.train.y[pick], torch.full((len(pick),), task.index),
                          torch.full((len(pick),), -1))
        self.memory.append(tuple(v.to(dev) for v in batch if isinstance(v, torch.Tensor)))
        self.ledger.raw(task.dataset_id, f"{type(self).__name__.lower()} episodic memory")

    def params(self) -> list[torch.nn.Parameter]:
        return [p for p in self.learner.model.parameters() if p.requires_grad]

    def memory_gradient(self, fields: tuple[torch.Tensor, ...]) -> torch.Tensor:
        """The flat gradient of the mean loss of memory examples (not touching p.grad)."""
        losses, _ = self.learner.forward(self.batch_type(*fields))
        params = self.params()
        grads = torch.autograd.grad(losses.mean(), params, allow_unused=True)
        flat = torch.cat([(torch.zeros_like(p) if g is None else g).reshape(-1) for p, g in zip(params, grads)])
        return distributed.all_reduce_sum({"g": flat})["g"] / distributed.size()   # data-parallel: every worker's rows

    def current_gradient(self) -> torch.Tensor:
        return torch.cat([(torch.zeros_like(p) if p.grad is None else p.grad).reshape(-1) for p in self.params()])

    def set_gradient(self, flat: torch.Tensor) -> None:
        offset = 0
        for p in self.params():
            n = p.numel()
            p.grad = flat[offset:offset + n].view_as(p).clone()
            offset += n

    def after_backward(self):
        if not self.memory:
            return
        g = self.current_gradient()
        projected = self.project(g)
        if projected is not None:
            self.set_gradient(projected)

    def project(self, g: torch.Tensor) -> torch.Tensor | None:
        """The gradient to step with (None: g unchanged); counts the steps it changes."""
        raise NotImplementedError

    def step_metrics(self):
        return {"strategy/projected_steps": self.projected}

    def task_metrics(self):
        return {"projected_steps": int(self.projected), "memory_bytes": tensor_bytes(self.state_tensors())}

    def state_tensors(self):
        return [tensor for entry in self.memory for tensor in entry]

    def load_state_dict(self, state):
        super().load_state_dict(state)
        self.memory = [tuple(t.to(self.learner.device) for t in entry) for entry in self.memory]
        if self.memory and len(self.memory[0]) == 3:   # a checkpoint from before memories kept whole batches
            self.memory = [(x, y, t, torch.full_like(t, -1)) for x, y, t in self.memory]


@register_strategy("agem")
class AGEM(EpisodicMemory):
    """A-GEM: project the gradient when it conflicts with a memory batch's (episodic memory)."""

    @dataclass
    class Options(GEMOptions):
        agem_batch: int = opt(256, "memory examples in each reference gradient", low=1)

    def project(self, g):
        columns = [torch.cat(column) for column in zip(*self.memory)]
        pick = torch.randperm(len(columns[0]), generator=self.learner.generator)[:self.options.agem_batch]
        pick = to_device(pick, self.learner.device)
        ref = self.memory_gradient(tuple(c[pick] for c in columns))
        dot = torch.dot(g, ref)
        conflict = dot < 0
        self.projected = self.projected + conflict.long()
        return torch.where(conflict, g - dot / torch.dot(ref, ref) * ref, g)


@register_strategy("gem")
class GEM(EpisodicMemory):
    """GEM: keep every earlier task's memory loss from rising (a QP per conflicting step, scipy)."""

    @dataclass
    class Options(GEMOptions):
        gem_margin: float = opt(0.5, "γ: lower bound of the dual variables (the authors' memory_strength)", low=0.0)

    def project(self, g):
        memories = torch.stack([self.memory_gradient(entry) for entry in self.memory])   # M: [tasks, params]
        # One host read (the QP below runs on the host anyway). A diverged step (non-finite gradients)
        # is left to the engine, which stops on its loss: the QP solver failed on it with a traceback.
        diverged = ~(memories.isfinite().all() & g.isfinite().all())
        if bool(diverged | (memories @ g >= 0).all()):
            return None
        self.projected += 1
        from scipy.optimize import lsq_linear
        m = memories.double().cpu().numpy()
        eps = 1e-3
        a = np.vstack([m.T, np.sqrt(eps) * np.eye(len(m))])
        b = np.concatenate([-g.double().cpu().numpy(), np.zeros(len(m))])
        v = lsq_linear(a, b, bounds=(self.options.gem_margin, np.inf)).x
        return g + torch.from_numpy(v @ m).to(g)
