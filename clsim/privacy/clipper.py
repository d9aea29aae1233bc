"""The clipper interface (clsim/privacy/clipping.py describes and chooses the clippers; each
lives where its machinery does, e.g. BookKeeping in bk.py, so they all import it from here)."""
from __future__ import annotations

from contextlib import contextmanager

import torch
from torch import nn


class Clipper:
    """The clipped sum of a batch's per-unit gradients (what each does: clsim/privacy/clipping.py)."""

    name = ""

    def __init__(self, max_grad_norm: float):
        self.max_grad_norm = max_grad_norm

    def clipped_sum(self, losses: torch.Tensor, batch, params: list[nn.Parameter]) -> set[nn.Parameter]:
        raise NotImplementedError

    def forget(self) -> None:
        """A step without a batch: drop whatever the last forwards left behind."""

    @contextmanager
    def lifted(self):
        """Hooks off meanwhile (torch.func transforms cannot pass them, e.g. the DP-Fisher's)."""
        yield
