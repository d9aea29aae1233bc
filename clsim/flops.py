"""Counted training FLOPs: one formula for dense and sparse training.

Each weight layer l (Conv2d, Linear) is profiled once with torch.utils.flop_counter on dense
shapes, for one example: F_l = its forward FLOPs (2 x multiply-accumulates). A training pass of
one example then costs, with weight density d_l and weight-gradient density g_l (both 1 for a
dense layer),

    forward F_l*d_l  +  input-gradient F_l*d_l  +  weight-gradient F_l*g_l

(the RigL convention; the dense cost is 3 x forward). Only weight layers count: normalisation,
activations, pooling, mask and percentile bookkeeping and evaluation are left out. The total is
that per-example cost times the examples actually forwarded (current batch + replay draws).
"""
from __future__ import annotations

import torch
from torch import nn
from torch.utils.flop_counter import FlopCounterMode


def weight_layers(model: nn.Module) -> dict[str, nn.Module]:
    """Conv2d and Linear modules by name, in registration order."""
    return {n: m for n, m in model.named_modules() if isinstance(m, (nn.Conv2d, nn.Linear))}


@torch.no_grad()
def forward_flops(model: nn.Module, x: torch.Tensor, t=0) -> dict[str, int]:
    """Forward FLOPs of every weight layer the forward of `x` (one example) reaches, counted by
    FlopCounterMode on each layer's own input shape."""
    layers = weight_layers(model)
    inputs: dict[str, torch.Tensor] = {}

    def keep_input(name):
        def hook(module, args, output):
            inputs.setdefault(name, args[0])   # returns None: the output stays as it is
        return hook
    hooks = [m.register_forward_hook(keep_input(n)) for n, m in layers.items()]
    was_training = model.training
    model.eval()  # the shapes are the same; eval keeps BatchNorm statistics untouched
    try:
        model(x, t)
    finally:
        model.train(was_training)
        for h in hooks:
            h.remove()
    counts = {}
    for name, inp in inputs.items():
        with FlopCounterMode(display=False) as counter:
            layers[name](inp)
        counts[name] = counter.get_total_flops() // len(inp)
    return counts


def example_flops(layer_flops: dict[str, int], weight_density: dict[str, float] | None = None,
                  grad_density: dict[str, float] | None = None) -> float:
    """Training FLOPs of one example: forward + input-gradient + weight-gradient passes."""
    weight_density, grad_density = weight_density or {}, grad_density or {}
    total = 0.0
    for name, f in layer_flops.items():
        d = weight_density.get(name, 1.0)
        g = grad_density.get(name, d)
        total += f * (2 * d + g)
    return total


class TrainingFlops:
    """Cumulative counted training FLOPs of a run; layer FLOPs are profiled once per task head."""

    def __init__(self, model: nn.Module, example: torch.Tensor):
        self.model, self.example = model, example[:1]
        self.per_task: dict[int, dict[str, int]] = {}
        self.total = 0.0

    def layer_flops(self, task_index: int) -> dict[str, int]:
        if task_index not in self.per_task:
            device = next(self.model.parameters()).device
            self.per_task[task_index] = forward_flops(self.model, self.example.to(device), task_index)
        return self.per_task[task_index]

    def add(self, task_ids: torch.Tensor, weight_density=None, grad_density=None) -> float:
        """Count one training step over examples of the given task ids; returns its FLOPs."""
        step = 0.0
        ids, counts = torch.unique(task_ids.cpu(), return_counts=True)
        for t, n in zip(ids.tolist(), counts.tolist()):
            step += n * example_flops(self.layer_flops(t), weight_density, grad_density)
        self.total += step
        return step
