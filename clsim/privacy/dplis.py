"""DPlis (Wang et al., PETS 2021): DP-SGD on a loss smoothed by random parameter perturbations.

Each step draws K perturbations u_k ~ N(0, s²I), shared by the whole batch, with
s = radius·lr·σ·C/B: `radius` times the std of the noise one DP-SGD step adds to the parameters
(lr times N(0, σ²C²) on the summed gradient, divided by the batch size B). Without the /B the
perturbation would be B times that, e.g. a std of 1.5 per weight at lr 0.05, σ 1.5, radius 20,
which wipes out the model instead of smoothing its loss.
Example i's gradient is, by default, the mean over k of ∇θ ℓ(θ + u_k; x_i): the Monte-Carlo
estimate of the gradient of the smoothed loss E_u[ℓ(θ + u; x_i)] that the paper defines, so C and
the learning rate keep DP-SGD's meaning (with radius 0, any K is DP-SGD exactly). The authors' code
(wangwenxiao/DPlis, dp_train.py, `--mode smooth_loss`) sums instead: per example Σ_k ∇ℓ(θ + u_k),
then clipped to C, then noise σC; `--dplis-aggregate sum` is that form, which scales every
unclipped gradient by K (so the signal-to-noise ratio and the learning rate that works differ by
up to K: the authors' hyper-parameters transfer only with it; the preset dplis-mnist-smallcnn,
the sweep and the benches select it).
Either way the vector is clipped once (the `Smoothed` clipper), so noise and accounting are
exactly DP-SGD's with the same (q, σ, steps): the perturbations are data-independent, and each
example still contributes one clipped vector. Their perturbation std, radius·lr·σ·C, is clsim's
radius·lr·σ·C/B: their update applies lr to the noisy sum, clsim's (Opacus's) to the sum over B.

The per-example gradients come from torch.func (functional_call + vmap(grad)), vectorised over
examples and over chunks of the K copies (`dplis_k_chunk`); the sum over copies happens inside
the gradient, so one gradient per example is stored, never K.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn
from torch.func import functional_call, grad, vmap

from clsim.config import opt
from clsim.errors import UserError
from clsim.models import free_memory
from clsim.privacy.clipping import Clipper, clip_rows, head_filtered
from clsim.privacy.dpsgd import DPOptions, DPSGD
from clsim.registry import register_mechanism


@dataclass
class DPlisOptions(DPOptions):
    dplis_k: int = opt(10, "K: perturbed parameter copies per step", low=1)
    dplis_radius: float = opt(20.0, "perturbation std in units of one DP-SGD step's parameter noise "
                              "(s = radius·lr·σ·C/B)", low=0.0)
    dplis_aggregate: str = opt("mean", "each example's gradient over the K copies: mean (the smoothed "
                               "loss's gradient, C as in DP-SGD) or sum (the authors' dp_train.py: K times "
                               "larger before clipping)", choices=("mean", "sum"))
    dplis_k_chunk: int = opt(0, "copies vectorised together (0: one at a time on CPU, where measured "
                             "fastest; on a GPU as many as --dplis-memory-mb allows)", low=0)
    dplis_memory_mb: int = opt(1024, "GPU: memory a chunk of copies may use (with --dplis-k-chunk 0)", low=1)


class _Loss(nn.Module):
    """learner.forward as a module of the model, so functional_call can swap its parameters."""

    def __init__(self, learner):
        super().__init__()
        self.model = learner.model
        self._forward = learner.forward

    def forward(self, batch):
        return self._forward(batch)[0]


class Smoothed(Clipper):
    """Each example's gradient averaged (or summed) over K perturbed copies of the parameters,
    then clipped like Opacus's rows; the rows stay in p.grad_sample (one per example, never K)."""

    name = "smoothed"

    def __init__(self, learner, options: DPlisOptions, sigma: float, step_size, generator: torch.Generator):
        super().__init__(options.max_grad_norm)
        self.learner, self.options, self.sigma = learner, options, sigma
        self.step_size = step_size          # () -> the optimizer's learning rate now
        self.generator = generator
        self.wrapper = _Loss(learner)       # no Opacus hooks: gradients come from torch.func

    def clipped_sum(self, losses, batch, params):
        if batch is None or len(batch.y) != len(losses):
            raise UserError("dplis re-evaluates the loss of the sampled batch at perturbed parameters; "
                            "strategies that change the batches or add data terms cannot use it")
        model = self.learner.model
        active = set(head_filtered(model, params, set(batch.t.unique().tolist())))
        free = {n: p for n, p in model.named_parameters() if p in active}    # fixed order
        grads = self.smoothed_grads(batch, free)
        for n, p in free.items():
            p.grad_sample = grads[n]
        clip_rows({p: p.grad_sample for p in params if p in active}, self.max_grad_norm)
        return active

    def smoothed_grads(self, batch, free: dict[str, nn.Parameter]) -> dict[str, torch.Tensor]:
        """Per-example mean (or sum) over K perturbations of ∇ℓ, for the `free` parameters; rows in
        batch order."""
        o, model = self.options, self.learner.model
        scale = o.dplis_radius * self.step_size() * self.sigma * o.max_grad_norm / self.learner.batch_size
        theta = {n: p.detach() for n, p in free.items()}
        fixed = {f"model.{n}": t.detach() for n, t in list(model.named_parameters()) + list(model.named_buffers())
                 if n not in free}
        K = o.dplis_k
        # K draws for every parameter, shared across the batch (one stream, seeded from --seed).
        perturb = {n: scale * torch.randn((K, *t.shape), generator=self.generator, device=t.device)
                   for n, t in theta.items()}
        # The K dimension is summed inside the per-example gradient, so one gradient per example
        # is stored, never K. Vectorising copies costs their activations (and on CPU measured
        # slower than a loop: bench/privacy_cost.py), so the chunk is a choice.
        chunk = o.dplis_k_chunk or self.auto_chunk(theta, len(batch.y))
        total = {n: torch.zeros((len(batch.y), *t.shape), device=t.device) for n, t in theta.items()}
        for task in batch.t.unique().tolist():
            rows = torch.nonzero(batch.t == task).squeeze(1)
            index = batch.index[rows.cpu()]

            def loss_at(params, shift, x, y):
                one = type(batch)(x[None], y[None], task, index[:1])
                moved = {f"model.{n}": params[n] + shift[n] for n in params}
                return functional_call(self.wrapper, {**fixed, **moved}, (one,)).sum()

            def summed_over_copies(params, shifts, x, y):
                copies = vmap(loss_at, in_dims=(None, 0, None, None), randomness="different")
                return copies(params, shifts, x, y).sum()

            per_example = vmap(grad(summed_over_copies), in_dims=(None, None, 0, 0), randomness="different")
            for start in range(0, K, chunk):
                shifts = {n: perturb[n][start:start + chunk] for n in theta}
                g = per_example(theta, shifts, batch.x[rows], batch.y[rows])   # name -> [rows, *shape]
                for n in total:
                    total[n][rows] += g[n]
        return total if o.dplis_aggregate == "sum" else {n: v / K for n, v in total.items()}

    def auto_chunk(self, theta: dict[str, torch.Tensor], batch_size: int) -> int:
        device = next(iter(theta.values())).device
        if device.type == "cpu":
            return 1
        numel = sum(t.numel() for t in theta.values())   # one copy's per-example work ~ B x numel
        return max(1, min(self.options.dplis_k, (self.options.dplis_memory_mb << 20) // (4 * numel * batch_size)))


class DPlis(DPSGD):
    """DPlis: DP-SGD on a smoothed loss, K parameter perturbations averaged per example."""

    name = "dplis"
    Options = DPlisOptions

    def check(self, learner, scenario, epochs: int, fisher_releases: int = 0, model_forwards: int = 1,
              data_terms: bool = False) -> None:
        if learner.privacy_unit != "example":
            raise UserError(f"dplis smooths per-example losses; this scenario's privacy unit is the "
                            f"{learner.privacy_unit}: use --privacy dpsgd")
        copies = self.options.dplis_k * sum(p.numel() * p.element_size() for p in learner.model.parameters())
        free = free_memory(learner.device)
        if free is not None and copies > free:   # every step draws K perturbations of every weight at once
            raise UserError(f"--dplis-k {self.options.dplis_k} perturbed copies of the model need "
                            f"{copies / 2**30:.1f} GiB, more than the {free / 2**30:.1f} GiB free on "
                            f"{learner.device}; give a smaller --dplis-k")
        if data_terms:   # its gradients re-evaluate only the learner's loss on its own sample
            raise UserError("dplis re-evaluates the learner's own loss on its sampled batch at perturbed "
                            "parameters, so what this strategy adds (distillation, a buffer's terms, its own "
                            "loss or batches) would be left out; use --privacy dpsgd")
        super().check(learner, scenario, epochs, fisher_releases, model_forwards)

    def make_clipper(self, learner) -> Clipper:
        if self.options.dp_clipping != "hooks":
            self._log("--dp-clipping does not apply to dplis: its smoothed per-example gradients come "
                      "from torch.func and are clipped one by one")
        self.perturb_generator = torch.Generator(learner.device)
        return Smoothed(learner, self.options, self.sigma, lambda: self.optimizer.param_groups[0]["lr"],
                        self.perturb_generator)

    def setup(self, learner, scenario, ledger) -> None:
        super().setup(learner, scenario, ledger)
        self.perturb_generator.manual_seed(self.seed + 1)

    def before_task(self, task, optimizer):
        self.perturb_generator.manual_seed(self.seed + 2 * task.index + 1)
        return super().before_task(task, optimizer)


register_mechanism("dplis")(DPlis)
