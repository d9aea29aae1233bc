"""How DP-SGD clips: one class per way of forming the clipped sum of a batch's gradients.

Every clipper's `clipped_sum(losses, batch, params)` leaves in p.grad, for each parameter the
batch reached, Σ_i c_i·g_i over the batch's privacy units i, c_i = min(1, C/(‖g_i‖ + 1e-6))
(Opacus DPOptimizer's rule), and returns those parameters. Nothing else: no noise, no scaling,
no accounting (clsim/privacy/dpsgd.py adds the noise once, on the sum), so sums made on several
workers may be added before the noise. `choose` picks the clipper for a model and says why.

- `Hooks`: Opacus's per-example gradients (GradSampleModule), clipped and summed here; the only
  one for units other than the example (an episode's rows are summed before clipping) and for
  several forwards a step (replay).
- `Ghost`: Opacus's fast gradient clipping: per-example norms, then a second backward of the
  clipped loss; no per-example gradient stored.
- `BookKeeping` (clsim/privacy/bk.py): one backward, norms and the sum from the layers' inputs
  and output gradients.
- `Smoothed` (clsim/privacy/dplis.py): DPlis's per-example gradients averaged (or summed) over
  perturbed parameter copies, then clipped like `Hooks`' rows.
"""
from __future__ import annotations

import warnings
from contextlib import contextmanager

import torch
from torch import nn

from clsim.errors import UserError
from clsim.privacy.clipper import Clipper


def clip_rows(rows: dict[nn.Parameter, torch.Tensor], max_grad_norm: float) -> None:
    """p.grad = Σ_i c_i·rows[p][i]: each row i (one unit's gradient over all parameters, in the
    given order) clipped to C, exactly as Opacus's DPOptimizer does it."""
    if not rows:
        return
    n = len(next(iter(rows.values())))
    if n == 0:
        for p in rows:
            p.grad = torch.zeros_like(p)
        return
    norms = torch.stack([r.reshape(n, -1).norm(2, dim=-1) for r in rows.values()], dim=1).norm(2, dim=1)
    coef = (max_grad_norm / (norms + 1e-6)).clamp(max=1.0)
    for p, r in rows.items():
        p.grad = torch.einsum("i,i...", coef.to(r.dtype), r.to(p.dtype))


def head_filtered(model: nn.Module, params, tasks: set[int]) -> list[nn.Parameter]:
    """`params` minus the heads of tasks not in `tasks` (multi-head models; a --task-heads
    shared output layer is one tensor, noised whole at every step)."""
    heads = getattr(model, "heads", None)
    unused = set()
    if heads is not None and len(heads) > 1:
        unused = {id(p) for j, h in enumerate(heads) if j not in tasks for p in h.parameters()}
    return [p for p in params if id(p) not in unused]


@contextmanager
def _quiet_backward():
    """Inputs need no gradient: PyTorch's note that a full backward hook fired anyway is noise."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="Full backward hook is firing")
        yield


class _OpacusClipper(Clipper):
    """A clipper whose hooks are Opacus's GradSampleModule(FastGradientClipping)."""

    def __init__(self, max_grad_norm: float, module):
        super().__init__(max_grad_norm)
        self.module = module

    @contextmanager
    def lifted(self):
        self.module.remove_hooks()
        try:
            yield
        finally:
            self.module.add_hooks(loss_reduction="sum", batch_first=True)


class Hooks(_OpacusClipper):
    """Opacus's per-example gradients in p.grad_sample, one row per unit, clipped and summed."""

    name = "hooks"

    def __init__(self, model: nn.Module, max_grad_norm: float, unit: str = "example", forwards: int = 1):
        from opacus import GradSampleModule
        super().__init__(max_grad_norm, _opacus(GradSampleModule, model, loss_reduction="sum"))
        self.unit, self.forwards = unit, forwards

    def clipped_sum(self, losses, batch, params):
        for p in params:
            p.grad_sample = None        # Opacus would add this backward's rows to the last ones
        with _quiet_backward():
            losses.sum().backward()
        # A head the batch did not use gets no rows and is left out of the step (else it would
        # take a noise-only update).
        active = [p for p in params if p.grad_sample is not None]
        if self.forwards > 1:
            align_rows(active)
        if self.unit != "example":
            if batch is None or len(batch.index) != len(losses):
                raise UserError(f"the privacy unit here is the {self.unit}: the strategy must keep the "
                                f"mechanism's batches as they are")
            sum_rows_per_unit(active, batch.index)
        clip_rows({p: p.grad_sample for p in active}, self.max_grad_norm)
        return set(active)


def align_rows(active: list[nn.Parameter]) -> None:
    """Several forwards a step (replay: the current batch, then buffer draws): Opacus adds each
    forward's per-example gradients row by row from row 0, so row i is the sum of every
    forward's i-th example, and a layer has as many rows as the largest batch that reached it.
    A task head that only a smaller forward reached (task_il: an old task's head, used by the
    buffer draw alone) has fewer rows: the missing rows are examples that never reached it,
    whose gradient there is zero; pad them so all layers clip the same rows."""
    rows = max(len(p.grad_sample) for p in active) if active else 0
    for p in active:
        short = rows - len(p.grad_sample)
        if short > 0:
            p.grad_sample = torch.cat([p.grad_sample, p.grad_sample.new_zeros((short, *p.shape))])


def sum_rows_per_unit(active: list[nn.Parameter], unit: torch.Tensor) -> None:
    """One gradient per unit (e.g. an episode): the sum of its rows' gradients, then clipped."""
    if not active:
        return
    _, group = torch.unique(unit, return_inverse=True)
    group = group.to(active[0].device)
    n = int(group.max()) + 1
    for p in active:
        rows = p.grad_sample
        p.grad_sample = rows.new_zeros((n, *rows.shape[1:])).index_add_(0, group, rows)


class Ghost(_OpacusClipper):
    """Opacus's fast gradient clipping: a first backward leaves each example's gradient norm in
    p._norm_sample (Linear layers from their activations and backprops alone, others from
    per-layer per-example gradients dropped at once); a second backward of Σ_i c_i·loss_i leaves
    the clipped sum in p.grad."""

    name = "ghost"

    def __init__(self, model: nn.Module, max_grad_norm: float):
        from opacus.grad_sample import GradSampleModuleFastGradientClipping
        super().__init__(max_grad_norm, _opacus(GradSampleModuleFastGradientClipping, model, loss_reduction="sum",
                                                max_grad_norm=max_grad_norm, use_ghost_clipping=True))

    def clipped_sum(self, losses, batch, params):
        for p in params:
            p._norm_sample = None
        with _quiet_backward():
            losses.sum().backward(retain_graph=True)
            active = [p for p in params if p._norm_sample is not None]
            for p in params:
                p.grad = None
            if not active:
                return set()
            norms = torch.stack([p._norm_sample for p in active]).norm(2, dim=0)
            coef = (self.max_grad_norm / (norms + 1e-6)).clamp(max=1.0)
            self.module.disable_hooks()
            try:
                (losses * coef.detach()).sum().backward()
            finally:
                self.module.enable_hooks()
        return set(active)


def _opacus(kind, model: nn.Module, **options):
    try:
        return kind(model, batch_first=True, **options)
    except NotImplementedError as exc:
        raise UserError(f"Opacus cannot make this model private: {exc}") from None


def choose(asked: str, model: nn.Module, unit: str, forwards: int) -> tuple[str, str]:
    """Which clipper (hooks, ghost or bk) for `--dp-clipping asked`, and why."""
    from opacus.grad_sample import GradSampleModuleFastGradientClipping

    from clsim.privacy.bk import bk_layers
    if unit != "example":
        return "hooks", (f"the privacy unit is the {unit}, whose rows' gradients are summed "
                         f"before clipping, which needs them one by one")
    if forwards > 1:
        if asked in ("ghost", "bk"):
            raise UserError(f"--dp-clipping {asked} needs one forward of the model per step; this strategy "
                            f"makes {forwards} (e.g. a replay buffer's): use --dp-clipping hooks or auto")
        return "hooks", f"the strategy forwards the model {forwards} times a step, which ghost clipping cannot clip"
    layers, uncovered = bk_layers(model)
    if asked == "bk" and layers is None:
        raise UserError(f"--dp-clipping bk covers Linear, Conv2d and GroupNorm layers, not {uncovered}: "
                        f"use --dp-clipping hooks or auto")
    if asked != "auto":
        return asked, "as asked"
    if layers is not None:
        return "bk", ("book-keeping covers every trained layer (one backward; bench/privacy_cost.py: "
                      "about half the time of hooks on conv nets, faster than ghost on MLPs)")
    others = sorted({type(m).__name__ for m in model.modules()
                     if any(p.requires_grad for p in m.parameters(recurse=False))
                     and type(m) not in GradSampleModuleFastGradientClipping.NORM_SAMPLERS})
    if others:
        return "hooks", (f"book-keeping does not cover {uncovered} and Opacus has no ghost norms for "
                         f"{', '.join(others)} (their per-layer per-example gradients plus a second "
                         f"backward cost more than hooks)")
    return "ghost", f"book-keeping does not cover {uncovered}; Opacus has ghost norms for every trained layer"


def make(name: str, model: nn.Module, max_grad_norm: float, unit: str = "example", forwards: int = 1) -> Clipper:
    """The clipper `choose` named, attached to `model`."""
    if name == "bk":
        from clsim.privacy.bk import BookKeeping, bk_layers
        return BookKeeping(bk_layers(model)[0], max_grad_norm)
    if name == "ghost":
        return Ghost(model, max_grad_norm)
    return Hooks(model, max_grad_norm, unit, forwards)
