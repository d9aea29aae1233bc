"""SparCL (Wang et al., NeurIPS 2022): sparse continual learning on top of ER or DER++.

Three mechanisms, as the authors' code runs them (see the design note sparcl.md):

- Task-aware dynamic masking (TDM). Masked layers are every backbone convolution with a kernel
  larger than 1x1 except the first (the stem), i.e. the 3x3 block convolutions of ResNet-18 and
  the convolutions after the first in the small CNN; a backbone without such convolutions (an
  MLP) masks its Linear layers except the first. 1x1 shortcuts, heads, biases and normalisation
  stay dense. Each masked layer starts magnitude-pruned to exactly `sparcl_sparsity` s. At the
  start of every `sparcl_update_every`-th epoch of a task the layer is pruned to sparsity L by
  importance |w| + lambda*|g| (g: the gradient of the epoch's last step, after gradient masking)
  and regrown at random, at value 0, to sparsity U <= L:
      first update of the task: (L, U) = (s, s - swap)
      later updates:            (L, U) = (s + swap, s)
      the task's last update:   (L, U) = (s, s)     so every task ends at density 1 - s.
  Pruned weights are multiplied by their mask after every optimizer step.
- Dynamic data removal (DDR). The correctness of every presented current-task example is
  recorded; its score is its number of forgetting events (correct -> wrong) in the window, or
  "never learned" (ranks above everything) if it was never right. At epochs k*every (k=1..rounds)
  the lowest-scoring floor(fraction*N / rounds) kept examples are removed for the rest of the task
  (ties broken by a seeded permutation) and the window restarts.
- Dynamic gradient masking (DGM), as the official `gradient_efficient_mix` mode. Every
  `sparcl_grad_refresh` steps of an epoch (and on its first) each masked layer's gradient is
  masked by its weight mask, then only entries above the `sparcl_grad_sparsity` percentile of |g|
  over the whole tensor keep theirs: the largest (1 - that) share of *all* entries, never more
  than the active weights. At weight sparsity 0.75 and gradient sparsity 0.8 that is 80%
  of the active weights; at weight sparsity >= 0.8 the percentile is 0 and every active weight
  keeps its gradient, as in the official code (so DGM saves nothing there, and the FLOPs counted
  at 0.90/0.95 are the paper's setting, not a smaller share). The other steps reuse that mask.
- As the official script: the current batch's cross-entropy sees only the current task's classes
  in class_il (`replay_mask_current`, on by default here, off for plain ER/DER++), and each
  epoch's last batch is dropped when smaller than the batch size (`sparcl_drop_last`).
- Replay. The official training loop (main_sparse_train_w_data_gradient_efficient.py, train())
  draws from the buffer only when `t > 0`, from the second task on, and fills it from the first.
  clsim's replay default follows Mammoth (strategies/replay.py: from the first task's second
  step); `--replay-from-task 1`, which the sparcl presets set, follows the official code.

Training FLOPs are counted by clsim.flops with the measured weight and gradient densities.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from clsim.config import opt, redefault
from clsim.errors import UserError
from clsim.flops import weight_layers
from clsim.learners import to_device
from clsim.registry import register_strategy
from clsim.strategies.replay import DERPP, ER, Replay, ReplayOptions


def masked_layers(model: nn.Module) -> dict[str, nn.Module]:
    """The layers SparCL sparsifies (see the module docstring), by module name."""
    backbone = getattr(model, "backbone", model)
    prefix = "backbone." if backbone is not model else ""
    layers = weight_layers(backbone)
    convs = [n for n, m in layers.items() if isinstance(m, nn.Conv2d) and m.kernel_size != (1, 1)]
    names = convs[1:] if convs else [n for n, m in layers.items() if isinstance(m, nn.Linear)][1:]
    return {prefix + n: layers[n] for n in names}


def keep_top(score: torch.Tensor, k: int) -> torch.Tensor:
    """A 0/1 mask of score's shape with exactly its k largest entries set."""
    mask = torch.zeros(score.numel(), dtype=score.dtype, device=score.device)
    if k > 0:
        mask[score.flatten().topk(k, sorted=False).indices] = 1
    return mask.view_as(score)


def without_partial_last(batches, size: int):
    """The batches, less the last one if it holds fewer than `size` examples."""
    held = None
    for batch in batches:
        if held is not None:
            yield held
        held = batch
    if held is not None and len(held.y) >= size:
        yield held


@register_strategy("sparcl")
class SparCL(Replay):
    """SparCL: sparse replay training (weight masks, data removal, gradient masks) on ER or DER++."""

    @dataclass
    class Options(DERPP.Options, ER.Options):
        sparcl_base: str = opt("derpp", "replay method made sparse", choices=("er", "derpp"))
        sparcl_sparsity: float = opt(0.75, "target sparsity s of every masked layer (paper: 0.75, 0.90, 0.95)",
                                     low=0.0, high=0.999)
        sparcl_swap: float = opt(0.01, "share of each layer's entries pruned and regrown per mask update "
                                 "(L - U)", low=0.0, high=0.5)
        sparcl_update_every: int = opt(5, "mask update every this many epochs of a task (from epoch 0)", low=1)
        sparcl_lambda: float = opt(0.5, "λ in the prune importance |w| + λ|g|", low=0.0)
        sparcl_remove: float = opt(0.3, "share of each task's training examples removed by DDR (0: off)",
                                   low=0.0, high=0.99)
        sparcl_remove_rounds: int = opt(4, "DDR rounds per task the removal is split over", low=1)
        sparcl_remove_every: int = opt(5, "epochs between DDR rounds (rounds at every, 2*every, ...)", low=1)
        sparcl_grad_sparsity: float = opt(0.8, "DGM: the official gradient_sparse: at a refresh only the largest-|g| "
                                          "(1 - this) share of each masked layer's entries, active or not, keeps "
                                          "its gradient (none beyond the active weights: a no-op at weight "
                                          "sparsity >= this; 0: off)", low=0.0, high=0.99)
        sparcl_grad_refresh: int = opt(30, "DGM: steps between gradient-mask refreshes", low=1)
        sparcl_drop_last: bool = opt(True, "drop each epoch's last batch when it is smaller than --batch-size "
                                     "(the official code does)")
        replay_mask_current: bool = redefault(ReplayOptions, "replay_mask_current", True)

    def __init__(self, options=None):
        super().__init__(options)
        self.mode = self.options.sparcl_base
        o = self.options
        if o.sparcl_sparsity + o.sparcl_swap >= 1 or o.sparcl_sparsity - o.sparcl_swap < 0:
            raise UserError(f"--sparcl-sparsity {o.sparcl_sparsity} with --sparcl-swap {o.sparcl_swap} leaves "
                            f"a bound outside [0, 1); lower --sparcl-swap")

    def add_replay(self, losses, k, forwarded):
        base = DERPP if self.mode == "derpp" else ER
        return base.add_replay(self, losses, k, forwarded)

    # -- set-up and weight masks -----------------------------------------------------------------
    def setup(self, learner, scenario, mechanism):
        super().setup(learner, scenario, mechanism)
        self.layers = masked_layers(learner.model)
        if not self.layers:
            raise UserError("sparcl found no layer to mask in this model (it masks convolutions after the "
                            "stem, or hidden Linear layers after the first); pick a larger backbone")
        self.masks = {}
        for name, layer in self.layers.items():
            w = layer.weight.detach()
            self.masks[name] = keep_top(w.abs(), self.active_count(w, self.options.sparcl_sparsity))
            w.mul_(self.masks[name])
        self.active = {n: self.active_count(m, self.options.sparcl_sparsity) for n, m in self.masks.items()}
        self.reset_grad_masks()
        self.last_grads: dict[str, torch.Tensor] = {}
        self.epoch = self.step_in_epoch = 0
        self.swaps: list[dict] = []   # per update and layer: entries pruned and regrown

    @staticmethod
    def active_count(w: torch.Tensor, sparsity: float) -> int:
        return w.numel() - int(round(sparsity * w.numel()))

    def bounds(self, epoch: int, epochs: int) -> tuple[float, float] | None:
        """(L, U) of the mask update at the start of `epoch`, or None when there is none."""
        s, swap, every = self.options.sparcl_sparsity, self.options.sparcl_swap, self.options.sparcl_update_every
        if epoch % every:
            return None
        if epoch == every * ((epochs - 1) // every):
            return s, s
        return (s, s - swap) if epoch == 0 else (s + swap, s)

    @torch.no_grad()
    def update_masks(self, lower: float, upper: float) -> None:
        """Prune each masked layer to sparsity `lower` by |w| + λ|g|, regrow at random to `upper`."""
        lam = self.options.sparcl_lambda
        record = {}
        for name, layer in self.layers.items():
            w = layer.weight
            grad = self.last_grads.get(name)
            importance = w.abs() if grad is None else w.abs() + lam * grad.abs()
            old = self.masks[name]
            # an active entry of zero importance (a regrown weight still at 0) outranks an inactive one
            importance = importance.double() + old.double() * torch.finfo(torch.float64).tiny
            mask = keep_top(importance, self.active_count(w, lower)).to(old.dtype)
            pruned = int((old.bool() & ~mask.bool()).sum())
            zeros = (mask == 0).flatten().nonzero().squeeze(1)
            grow = max(0, self.active_count(w, upper) - int(mask.sum()))
            pick = torch.randperm(len(zeros), generator=self.learner.generator)[:grow].to(zeros.device)
            mask.view(-1)[zeros[pick]] = 1
            w.mul_(mask)                         # pruned entries to 0; regrown ones start at 0
            self.masks[name] = mask
            self.active[name] = self.active_count(w, upper)   # pruned to `lower`, regrown to `upper`
            record[name] = {"pruned": pruned, "regrown": int((mask.bool() & ~old.bool()).sum())}
        self.reset_grad_masks()
        self.swaps.append(record)

    # -- data removal ----------------------------------------------------------------------------
    def before_task(self, task):
        super().before_task(task)
        # A task's first mask update prunes from sparsity s to s, which keeps exactly the active set
        # (inactive entries have w = 0 and a masked g = 0), so the previous task's gradients never
        # score anything: dropped here, a checkpoint (taken between tasks) need not keep them.
        self.last_grads = {}
        n = len(task.train)
        self.kept = torch.arange(n)
        self.removed_in_task = torch.zeros(0, dtype=torch.long)
        self.reset_window(n)
        if self.options.sparcl_remove > 0:
            self.ledger.raw(task.dataset_id, "sparcl data-removal statistics")

    def reset_window(self, n: int) -> None:
        """The window's per-example record, on the learner's device: updated every step without
        a host read, read on the host only at a removal round."""
        dev = self.learner.device
        self.last_correct = torch.zeros(n, dtype=torch.bool, device=dev)
        self.presented = torch.zeros(n, dtype=torch.bool, device=dev)
        self.ever_correct = torch.zeros(n, dtype=torch.bool, device=dev)
        self.forgets = torch.zeros(n, dtype=torch.long, device=dev)

    def forgetting_scores(self) -> torch.Tensor:
        """Forgetting events per example in the window (on the host); never-learned examples rank highest."""
        never = torch.iinfo(torch.long).max
        return torch.where(self.ever_correct, self.forgets, torch.full_like(self.forgets, never)).cpu()

    def removal_per_round(self, n: int) -> int:
        return int(self.options.sparcl_remove * n) // self.options.sparcl_remove_rounds

    def select_examples(self, task, epoch):
        self.epoch = epoch
        o = self.options
        rnd = epoch // o.sparcl_remove_every
        if o.sparcl_remove > 0 and epoch > 0 and epoch % o.sparcl_remove_every == 0 and rnd <= o.sparcl_remove_rounds:
            drop = min(self.removal_per_round(len(task.train)), len(self.kept) - 1)
            scores = self.forgetting_scores()[self.kept]
            shuffle = torch.randperm(len(self.kept), generator=self.learner.generator)   # seeded tie-break
            order = shuffle[torch.sort(scores[shuffle], stable=True).indices]
            self.removed_in_task = torch.cat([self.removed_in_task, self.kept[order[:drop]]])
            self.kept = self.kept[order[drop:]].sort().values
            self.reset_window(len(task.train))
        return self.kept

    def record_correctness(self, batch, outputs) -> None:
        if (batch.index < 0).any():     # the index is the host's
            return
        index = to_device(batch.index, self.learner.device)
        correct = outputs.detach().argmax(1) == batch.y
        forgot = self.presented[index] & self.last_correct[index] & ~correct
        self.forgets[index] += forgot.long()
        self.ever_correct[index] |= correct
        self.last_correct[index] = correct
        self.presented[index] = True

    # -- training hooks --------------------------------------------------------------------------
    def train_batches(self, task, batches):
        bounds = self.bounds(self.epoch, self.epochs)
        if bounds is not None:
            self.update_masks(*bounds)
        self.step_in_epoch = 0
        if self.options.sparcl_drop_last:
            batches = without_partial_last(batches, self.learner.batch_size)
        for batch in batches:
            yield batch
            self.step_in_epoch += 1
        # Resumed after the epoch's last step: its (masked) gradient scores the next mask update.
        self.last_grads = {n: l.weight.grad.detach().clone() for n, l in self.layers.items()
                           if l.weight.grad is not None}

    def loss(self, batch, losses, outputs):
        if self.options.sparcl_remove > 0:
            self.record_correctness(batch, outputs)
        return super().loss(batch, losses, outputs)

    @torch.no_grad()
    def after_backward(self):
        refresh = self.step_in_epoch % self.options.sparcl_grad_refresh == 0
        for name, layer in self.layers.items():
            g = layer.weight.grad
            if g is None:
                continue
            if refresh:
                g.mul_(self.masks[name])
                # the official percentile over the whole tensor, active weights only (ties stay inside)
                k = min(self.active_count(g, self.options.sparcl_grad_sparsity), self.active[name])
                self.grad_masks[name] = keep_top(torch.where(self.masks[name].bool(), g.abs(), -1.0), k)
                self.grad_kept[name] = k     # keep_top sets exactly k entries
            g.mul_(self.grad_masks[name])

    @torch.no_grad()
    def after_step(self):
        for name, layer in self.layers.items():
            layer.weight.mul_(self.masks[name])
        super().after_step()

    def reset_grad_masks(self) -> None:
        """Gradient masks equal to the weight masks, and both masks' entry counts on the host (read
        here, when the weight masks change, so that the per-step FLOP count reads nothing)."""
        self.grad_masks = {n: m.clone() for n, m in self.masks.items()}
        self.weight_kept = {n: int(m.sum()) for n, m in self.masks.items()}
        self.grad_kept = dict(self.weight_kept)

    # -- figures ---------------------------------------------------------------------------------
    def weight_density(self):
        return {n: self.weight_kept[n] / m.numel() for n, m in self.masks.items()}

    def grad_density(self):
        return {n: self.grad_kept[n] / m.numel() for n, m in self.grad_masks.items()}

    def model_density(self) -> float:
        """Non-zero share of all Conv2d/Linear weights of the model."""
        layers = weight_layers(self.learner.model).values()
        total = sum(l.weight.numel() for l in layers)
        return sum(int((l.weight != 0).sum()) for l in layers) / total

    def overall(self, density: dict[str, float]) -> float:
        sizes = {n: self.masks[n].numel() for n in self.masks}
        return sum(density[n] * sizes[n] for n in sizes) / sum(sizes.values())

    def step_metrics(self):
        return {**super().step_metrics(),
                "strategy/sparcl_weight_density": self.overall(self.weight_density()),
                "strategy/sparcl_grad_density": self.overall(self.grad_density()),
                "strategy/sparcl_examples_kept": len(self.kept),
                "strategy/sparcl_examples_removed": len(self.removed_in_task)}

    def task_metrics(self):
        return {**super().task_metrics(),
                "sparcl_weight_density": self.overall(self.weight_density()),
                "sparcl_grad_density": self.overall(self.grad_density()),
                "sparcl_model_density": self.model_density(),
                "sparcl_examples_removed": len(self.removed_in_task),
                **{f"sparcl_density/{n}": d for n, d in self.weight_density().items()}}

    def state_tensors(self):
        return super().state_tensors() + list(self.masks.values())

    def state_dict(self):
        return {**super().state_dict(), "masks": self.masks}

    def load_state_dict(self, state):
        super().load_state_dict(state)
        self.masks = {n: m.to(self.learner.device) for n, m in state["masks"].items()}
        self.active = {n: int(m.sum()) for n, m in self.masks.items()}
        self.reset_grad_masks()
