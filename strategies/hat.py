"""HAT: Hard Attention to the Task (Serrà, Surís, Miron & Karatzoglou, ICML 2018).

Every unit of the backbone's Linear and Conv2d layers (a feature, or a channel) is gated by
a = σ(s·e_t), e_t a learnt task embedding (one row per task and layer, initialised N(0, 1)):
the layer's output is multiplied by a (before its ReLU; with a > 0 the same as after it). While
a task trains, s anneals within every epoch from 1/s_max to s_max, batch by batch; evaluation uses
s_max. After task t the cumulative mask a^{≤t} = max(a^{<t}, σ(s_max·e_t)) is kept, and on later
tasks the gradient of a weight between unit j (below) and unit i (above) is multiplied by
1 − min(a_i^{<t}, a_j^{<t}) (a bias by 1 − a_i^{<t}); the first layer's inputs are not gated. The
embeddings' gradients are compensated by s_max·(cosh(s·e) + 1) / (s·(cosh(e) + 1)) (cosh argument
clamped at 50) and the embeddings clamped to ±6 after each step, and the loss gains the capacity
regulariser c·Σ a_t (1 − a^{<t}) / Σ (1 − a^{<t}) over all gated units. Defaults are the authors'
(s_max 400, c 0.75; joansj/hat).

Deviations: the authors also clip gradients at norm 10000 and decay the learning rate on a
validation set; clsim uses the run's optimiser. Defined for task_il with supervised learners on
backbones without batch norm; plain SGD only (momentum would keep moving gated weights).
Refused under a privacy mechanism: the embeddings get no per-example gradients there.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from clsim.config import opt
from clsim.errors import UserError
from clsim.registry import register_strategy
from clsim.strategy import Strategy


@register_strategy("hat")
class HAT(Strategy):
    """HAT: per-task hard attention masks on units (annealed sigmoid gates, capacity regulariser)."""

    settings = ("task_il",)
    learners = ("supervised",)
    data_access = "refused: the task embeddings get no per-example gradients"
    state_attrs = ("cumulative",)

    @dataclass
    class Options:
        hat_smax: float = opt(400.0, "s_max: the gates' final sigmoid scale (the authors' 400)", low=1.0)
        hat_c: float = opt(0.75, "c: weight of the capacity regulariser (the authors' 0.75)", low=0.0)

    def setup(self, learner, scenario, mechanism):
        super().setup(learner, scenario, mechanism)
        if learner.momentum > 0:
            raise UserError("hat needs plain SGD (momentum would keep moving the weights its masks protect); "
                            "use --momentum 0")
        backbone = learner.model.backbone
        if any(isinstance(m, nn.modules.batchnorm._BatchNorm) for m in backbone.modules()):
            raise UserError("hat gates units of backbones without batch norm; use --backbone mlp or cnn")
        self.layers = [m for m in backbone.modules() if isinstance(m, (nn.Linear, nn.Conv2d))]
        if not self.layers:
            raise UserError("hat found no Linear or Conv2d layer in the backbone to gate")
        n_tasks = len(scenario.tasks)
        units = [m.out_features if isinstance(m, nn.Linear) else m.out_channels for m in self.layers]
        # Owned by the model: the optimiser trains them and checkpoints keep them.
        learner.model.hat_embeddings = nn.ParameterList(
            nn.Parameter(torch.randn(n_tasks, u, device=learner.device)) for u in units)
        self.embeddings = list(learner.model.hat_embeddings)
        self.cumulative: list[torch.Tensor] | None = None   # a^{<t}, per layer
        self.s = self.options.hat_smax
        self.t: int | torch.Tensor = 0
        learner.model.register_forward_pre_hook(self._remember_task)
        for layer, embedding in zip(self.layers, self.embeddings):
            layer.register_forward_hook(self._gate(embedding))

    def check(self, scenario, learner):
        super().check(scenario, learner)
        if self.mechanism.name != "none":
            raise UserError(f"hat cannot train under --privacy {self.mechanism.name}: its task embeddings get no "
                            f"per-example gradients; run it without --privacy")

    # -- gates
    def _remember_task(self, module, args):
        self.t = args[1] if len(args) > 1 else 0

    def scale(self) -> float:
        return self.s if self.learner.model.training else self.options.hat_smax

    def gates(self, t, s: float) -> list[torch.Tensor]:
        return [torch.sigmoid(s * e[t]) for e in self.embeddings]

    def _gate(self, embedding):
        def hook(module, args, output):
            a = torch.sigmoid(self.scale() * embedding[self.t])   # [units], or [examples, units]
            lead = (1,) if a.dim() == 1 else ()
            return output * a.reshape(lead + a.shape + (1,) * (output.dim() - 2))
        return hook

    # -- training
    def before_task(self, task):
        self.task = task

    def train_batches(self, task, batches):
        """s for each batch: from 1/s_max at the epoch's first example toward s_max (the authors' schedule)."""
        smax, n = self.options.hat_smax, len(task.train)
        for b, batch in enumerate(batches):
            self.s = 1 / smax + (smax - 1 / smax) * min(1.0, b * self.learner.batch_size / n)
            yield batch

    def penalty(self):
        a = self.gates(self.task.index, self.s)
        free = [torch.ones_like(x) for x in a] if self.cumulative is None else [1 - c for c in self.cumulative]
        used = sum((x * f).sum() for x, f in zip(a, free))
        return self.options.hat_c * used / sum(f.sum() for f in free).clamp(min=1e-12)

    @torch.no_grad()
    def after_backward(self):
        if self.cumulative is not None:
            below = None
            for layer, above in zip(self.layers, self.cumulative):
                out_shape = (-1,) + (1,) * (layer.weight.dim() - 1)
                keep = above.reshape(out_shape)
                if below is not None:
                    inputs = below
                    fan_in = layer.weight.shape[1]
                    if len(inputs) != fan_in:   # a flattened convolution below: each channel's positions
                        inputs = inputs.repeat_interleave(fan_in // len(inputs))
                    keep = torch.minimum(keep, inputs.reshape((1, -1) + (1,) * (layer.weight.dim() - 2)))
                if layer.weight.grad is not None:
                    layer.weight.grad.mul_(1 - keep)
                if layer.bias is not None and layer.bias.grad is not None:
                    layer.bias.grad.mul_(1 - above)
                below = above
        smax = self.options.hat_smax
        for e in self.embeddings:
            if e.grad is not None:
                e.grad.mul_(smax / self.s * (torch.cosh((self.s * e).clamp(-50, 50)) + 1) / (torch.cosh(e) + 1))

    @torch.no_grad()
    def after_step(self):
        for e in self.embeddings:
            e.clamp_(-6, 6)

    @torch.no_grad()
    def after_task(self, task):
        mask = self.gates(task.index, self.options.hat_smax)
        self.cumulative = mask if self.cumulative is None else \
            [torch.maximum(c, m) for c, m in zip(self.cumulative, mask)]

    def task_metrics(self):
        if self.cumulative is None:
            return {}
        used = torch.cat(self.cumulative)
        return {"hat_used_units": float((used > 0.5).float().mean())}

    def state_tensors(self):
        return [] if self.cumulative is None else list(self.cumulative)
