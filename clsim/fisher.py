"""Diagonal Fisher information from per-example gradients (torch.func), shared by EWC, BLIP and
the DP-Fisher of the privacy mechanisms."""
from __future__ import annotations

from typing import Callable

import torch
from torch import nn
from torch.func import functional_call, grad, vmap


class _LogLikelihood(nn.Module):
    """Wraps `learner.log_likelihood` so functional_call can swap the model's parameters."""

    def __init__(self, learner):
        super().__init__()
        self.model = learner.model
        self._fn = learner.log_likelihood

    def forward(self, x, y, t):
        return self._fn(x, y, t)


def per_example_grads(learner, names: list[str], x, y, t) -> dict[str, torch.Tensor]:
    """Gradient of log p(y_i | x_i) w.r.t. the named parameters, one row per example."""
    wrapper = _LogLikelihood(learner)
    params = {f"model.{n}": p.detach() for n, p in learner.model.named_parameters()}
    buffers = {f"model.{n}": b for n, b in learner.model.named_buffers()}
    wanted = {f"model.{n}" for n in names}
    fixed = {k: v for k, v in params.items() if k not in wanted}

    def one(free, xi, yi):
        out = functional_call(wrapper, ({**fixed, **free, **buffers}), (xi[None], yi[None], t))
        return out.sum()

    free = {k: params[k] for k in wanted}
    grads = vmap(grad(one), in_dims=(None, 0, 0))(free, x, y)
    return {k[len("model."):]: g for k, g in grads.items()}


def sum_rows(squared: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    return {n: s.sum(0) for n, s in squared.items()}


def diagonal_fisher(learner, task, names: list[str], n_samples: int, empirical: bool = False,
                    reduce: Callable[[dict[str, torch.Tensor]], dict[str, torch.Tensor]] = sum_rows
                    ) -> dict[str, torch.Tensor]:
    """Mean over examples of squared per-example gradients of log p(y|x) on `task`.

    y is sampled from the model (true Fisher) unless `empirical`. `reduce` turns a batch's
    squared per-example gradients into their sum; the DP-Fisher clips and noises there. The
    model is in eval mode meanwhile (frozen normalisation statistics)."""
    model = learner.model
    was_training = model.training
    model.eval()
    total = {n: torch.zeros_like(p) for n, p in model.named_parameters() if n in names}
    count = 0
    try:
        for x, y, t in learner.fisher_batches(task, n_samples, empirical):
            squared = {n: g.pow(2) for n, g in per_example_grads(learner, names, x, y, t).items()}
            for n, s in reduce(squared).items():
                total[n] += s
            count += len(x)
    finally:
        model.train(was_training)
    return {n: v / max(count, 1) for n, v in total.items()}
