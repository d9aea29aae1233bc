"""DP-SGD (Abadi et al. 2016) through Opacus, with a per-dataset ledger and a DP-Fisher.

Per step: a Poisson batch (each example of the task kept with probability q = B/N), the
per-example gradients of the data losses (Opacus's GradSampleModule), each clipped to norm C,
summed, plus N(0, σ²C²), divided by B (Opacus's DPOptimizer). The strategy's data-independent
penalty (EWC's) has its gradient added after the noise: post-processing, no privacy cost.
All of that happens in `backward`, so gradient masks applied afterwards (after_backward) are
post-processing too. Each step is one subsampled-Gaussian release on the task's dataset.

The privacy unit is what the learner's `batches(task, epoch, subset)` indexes: one training
example for supervised learners. A learner whose unit is something else (an RL episode) says
how many units a task has with `privacy_units(task)`.
"""
from __future__ import annotations

import sys
import warnings
from contextlib import contextmanager
from dataclasses import dataclass

import torch
from torch import nn

from clsim.config import opt
from clsim.errors import UserError
from clsim.fisher import diagonal_fisher
from clsim.privacy import accounting
from clsim.privacy.mechanism import Mechanism
from clsim.registry import register_mechanism

DEFAULT_DELTA = 1e-5
DEFAULT_NOISE = 1.0


@dataclass
class DPOptions:
    noise_multiplier: float | None = opt(None, "σ: noise std relative to --max-grad-norm (give this or "
                                         f"--epsilon; {DEFAULT_NOISE} if neither)", low=0.0)
    epsilon: float | None = opt(None, "target ε for the whole stream: σ is chosen so that every task's "
                                "dataset, over all its steps, stays within it", low=0.0, low_open=True)
    delta: float | None = opt(None, f"δ (default {DEFAULT_DELTA:g}, or 1/(10·N) of the largest task when "
                              "smaller); must be < 1/N", low=0.0, low_open=True, high=1.0)
    max_grad_norm: float = opt(1.0, "C: every per-example gradient is clipped to this L2 norm",
                               low=0.0, low_open=True)
    accountant: str = opt("rdp", "privacy accountant (Opacus): rdp (ε logged every step) or prv (tighter, "
                          "slower: ε logged once per epoch)", choices=("rdp", "prv"))
    fisher_privacy: str = opt("dp", "Fisher information for EWC/BLIP: dp (clipped per-example squared "
                              "gradients + Gaussian noise, accounted) or raw (exact; that task's ε = ∞)",
                              choices=("dp", "raw"))
    fisher_noise_multiplier: float = opt(10.0, "σ of the DP-Fisher: noise std relative to its sensitivity "
                                         "C_F² (one release per Fisher pass)", low=0.0, low_open=True)
    fisher_max_grad_norm: float = opt(1.0, "C_F: per-example gradient norm bound of the DP-Fisher",
                                      low=0.0, low_open=True)


def replace_unsupported_layers(model: nn.Module, log=None) -> nn.Module:
    """BatchNorm mixes examples of a batch: Opacus's validator swaps it for GroupNorm. Raises a
    UserError naming the first layer Opacus still cannot handle."""
    from opacus.validators import ModuleValidator
    before = {n: type(m).__name__ for n, m in model.named_modules()}
    if ModuleValidator.validate(model, strict=False):
        model = ModuleValidator.fix(model)
        changed = [f"{n} ({before[n]} -> {type(m).__name__})" for n, m in model.named_modules()
                   if n in before and before[n] != type(m).__name__]
        if changed and log is not None:
            log(f"replaced for per-example gradients (Opacus ModuleValidator.fix): {', '.join(changed)}")
    errors = ModuleValidator.validate(model, strict=False)
    if errors:
        raise UserError(f"Opacus cannot make this model private: {errors[0]}")
    for name, module in model.named_modules():
        own = list(module.parameters(recurse=False))
        if any(p.requires_grad for p in own) and list(module.buffers(recurse=False)):
            raise UserError(f"Opacus cannot make this model private: layer {name!r} "
                            f"({type(module).__name__}) has trainable parameters and buffers")
    return model


class DPSGD(Mechanism):
    """DP-SGD through Opacus: Poisson batches, per-example clipping to C, Gaussian noise σC."""

    name = "dpsgd"
    Options = DPOptions

    def __init__(self, options=None):
        super().__init__(options if options is not None else self.Options())
        self.sigma = self.options.noise_multiplier
        self.notes: list[str] = []
        self.optimizer = self.task = self._batch = None

    # --- before anything runs -------------------------------------------------------------
    def units(self, learner, task) -> int:
        count = getattr(learner, "privacy_units", None)
        return count(task) if count is not None else len(task.train)

    def check(self, learner, scenario, epochs: int) -> None:
        o = self.options
        if o.noise_multiplier is not None and o.epsilon is not None:
            raise UserError("give either --noise-multiplier or --epsilon, not both")
        sizes = {t.dataset_id: self.units(learner, t) for t in scenario.tasks}
        batch = learner.batch_size
        for dataset, n in sizes.items():
            if batch > n:
                raise UserError(f"--batch-size {batch} exceeds the {n} examples of {dataset}: Poisson "
                                f"sampling needs a sample rate B/N <= 1; lower --batch-size")
        self.sample_rate = {d: batch / n for d, n in sizes.items()}
        self.steps_per_epoch = {d: max(1, round(n / batch)) for d, n in sizes.items()}
        largest = max(sizes.values())
        if o.delta is None:
            self.delta = min(DEFAULT_DELTA, 1.0 / (10 * largest))
            rule = "1e-5" if self.delta == DEFAULT_DELTA else f"1/(10·N) with N={largest}"
            self.notes.append(f"delta={self.delta:g} (default: {rule})")
        else:
            self.delta = o.delta
            self.notes.append(f"delta={self.delta:g} (given)")
        if self.delta >= 1.0 / largest:
            raise UserError(f"--delta {self.delta:g} must be < 1/N = {1.0 / largest:.3g} (N = {largest}, the "
                            f"largest task): δ ≥ 1/N allows releasing an example outright")
        if o.epsilon is not None:
            uses = {d: (self.sample_rate[d], epochs * self.steps_per_epoch[d]) for d in sizes}
            self.sigma = accounting.noise_for_target(o.epsilon, self.delta, uses, o.accountant)
            self.notes.append(f"noise_multiplier={self.sigma:.4g} chosen so every task's dataset meets "
                              f"epsilon={o.epsilon:g} over {epochs} epoch(s) of training (DP-Fisher releases, "
                              f"if the strategy makes any, come on top; the ledger's ε includes them)")
        elif self.sigma is None:
            self.sigma = DEFAULT_NOISE
        learner.model = replace_unsupported_layers(learner.model, self._log).to(learner.device)
        self.prepare(learner)

    def _log(self, line: str) -> None:
        print(f"privacy: {line}", file=sys.stderr)
        self.notes.append(line)

    def prepare(self, learner) -> None:
        """Attach Opacus's per-example gradient hooks (DPlis computes its own instead)."""
        from opacus import GradSampleModule
        try:
            self.sample_module = GradSampleModule(learner.model, batch_first=True, loss_reduction="sum")
        except NotImplementedError as exc:
            raise UserError(f"Opacus cannot make this model private: {exc}") from None

    def ledger_options(self) -> dict:
        return {"accountant": self.options.accountant}

    def setup(self, learner, scenario, ledger) -> None:
        super().setup(learner, scenario, ledger)
        ledger.delta = self.delta
        ledger.notes.extend(self.notes)
        # Noise and perturbations get their own streams, seeded from --seed through the learner
        # and reseeded at every task, so a run resumed at a task boundary draws the same noise.
        self.seed = int(torch.randint(0, 2 ** 60, (1,), generator=learner.generator))
        self.noise_generator = torch.Generator(learner.device).manual_seed(self.seed)
        self.perturb_generator = torch.Generator(learner.device).manual_seed(self.seed + 1)

    # --- one task ---------------------------------------------------------------------------
    def before_task(self, task, optimizer):
        from opacus.optimizers import DPOptimizer
        self.task = task
        self.noise_generator.manual_seed(self.seed + 2 * task.index)
        self.perturb_generator.manual_seed(self.seed + 2 * task.index + 1)
        self.optimizer = DPOptimizer(optimizer, noise_multiplier=self.sigma,
                                     max_grad_norm=self.options.max_grad_norm,
                                     expected_batch_size=self.learner.batch_size,
                                     loss_reduction="mean", generator=self.noise_generator)
        return self.optimizer

    def batches(self, task, epoch: int, subset):
        """Poisson batches (Opacus's sampler), as many per epoch as N/B. An empty draw still
        makes a noise-only step: skipping it would reveal that the batch was empty."""
        from opacus.utils.uniform_sampler import UniformWithReplacementSampler
        dataset = task.dataset_id
        sampler = UniformWithReplacementSampler(num_samples=self.units(self.learner, task),
                                                sample_rate=self.sample_rate[dataset],
                                                generator=self.learner.generator,
                                                steps=self.steps_per_epoch[dataset])
        for picked in sampler:
            index = torch.tensor(picked, dtype=torch.long)
            if subset is not None:
                index = index[torch.isin(index, torch.as_tensor(subset))]
            if len(index) == 0:
                self._noise_only_step()
                continue
            chunks = list(self.learner.batches(task, epoch, index))
            batch = chunks[0] if len(chunks) == 1 else type(chunks[0])(*map(torch.cat, zip(*chunks)))
            self._batch = batch
            yield batch

    def backward(self, losses: torch.Tensor, penalty: torch.Tensor | None) -> None:
        """Leaves the private gradient (+ the penalty's) in p.grad and accounts one step."""
        if losses.dim() != 1:
            raise UserError(f"{self.name} needs one loss per example, but the strategy returned a "
                            f"{losses.dim()}-d loss; this strategy cannot train under --privacy")
        trainable = self.optimizer.params
        penalty_grads = None
        if penalty is not None and torch.is_tensor(penalty) and penalty.requires_grad:
            penalty_grads = torch.autograd.grad(penalty, trainable, allow_unused=True)
        active = self.per_example_grads(losses)
        self._release(active, len(losses))
        if penalty_grads is not None:
            for p, g in zip(trainable, penalty_grads):
                if g is not None:
                    p.grad = g if p.grad is None else p.grad + g

    def per_example_grads(self, losses: torch.Tensor) -> set[nn.Parameter]:
        """Fill p.grad_sample (one row per example) and return the parameters the batch used.
        Opacus's hooks fill it for every layer the loss reached; a head the batch did not use
        gets none and is left out of this step (else it would take a noise-only update)."""
        with warnings.catch_warnings():   # inputs need no gradient: PyTorch's note about it is noise
            warnings.filterwarnings("ignore", message="Full backward hook is firing")
            losses.sum().backward()
        return {p for p in self.optimizer.params if getattr(p, "grad_sample", None) is not None}

    def _release(self, active: set[nn.Parameter], batch_size: int) -> None:
        """Opacus's clipping, noise and scaling over the active parameters; one ledger step."""
        idle = [p for p in self.optimizer.params if p not in active]
        for p in idle:
            p.requires_grad_(False)     # DPOptimizer.params skips them for this step
            p.grad = None
        try:
            self.optimizer.pre_step()
        finally:
            for p in idle:
                p.requires_grad_(True)
        task = self.task
        self.ledger.gaussian(task.dataset_id, f"{self.name} training", self.sample_rate[task.dataset_id],
                             self.sigma)

    def _noise_only_step(self) -> None:
        opt_ = self.optimizer
        opt_.zero_grad(set_to_none=True)
        active = self.head_filtered({self.task.index})
        for p in active:
            p.grad_sample = p.new_zeros((0, *p.shape))
        self._release(active, 0)
        opt_.original_optimizer.step()

    def head_filtered(self, tasks: set[int]) -> set[nn.Parameter]:
        """Trainable parameters minus the heads of tasks not in `tasks` (multi-head models)."""
        heads = getattr(self.learner.model, "heads", None)
        unused = set()
        if heads is not None and len(heads) > 1:
            unused = {id(p) for j, h in enumerate(heads) if j not in tasks for p in h.parameters()}
        return {p for p in self.optimizer.params if id(p) not in unused}

    def step(self, optimizer) -> None:
        # The gradient is already private (backward); the step itself is plain SGD.
        optimizer.original_optimizer.step()

    def step_metrics(self) -> dict:
        figures = {"privacy/noise_multiplier": self.sigma}
        # RDP costs milliseconds a step; PRV about a second, so it is reported once per epoch.
        steps = sum(a["steps"] for a in self.ledger.accesses[self.task.dataset_id] if a["mechanism"] == "gaussian")
        if self.options.accountant == "rdp" or steps % self.steps_per_epoch[self.task.dataset_id] == 0:
            figures["privacy/epsilon"] = self.ledger.worst_epsilon()
            figures["privacy/epsilon_current_task"] = self.ledger.epsilon(self.task.dataset_id)
        return figures

    # --- Fisher information -----------------------------------------------------------------
    def fisher(self, task, names, n_samples, empirical, purpose):
        """DP-Fisher: each example's gradient clipped to C_F, squared, summed, plus Gaussian
        noise of std σ_F·C_F² (the sum's sensitivity: ‖g²‖₂ ≤ ‖g‖₂² ≤ C_F²); one release with
        sample rate 1 (no amplification claimed). Clamped at 0 afterwards (post-processing)."""
        with self.hooks_lifted():
            return self._fisher(task, names, n_samples, empirical, purpose)

    @contextmanager
    def hooks_lifted(self):
        """torch.func transforms cannot pass Opacus's backward hooks: lift them meanwhile."""
        module = getattr(self, "sample_module", None)
        if module is None:
            yield
            return
        module.remove_hooks()
        try:
            yield
        finally:
            module.add_hooks(loss_reduction="sum", batch_first=True)

    def _fisher(self, task, names, n_samples, empirical, purpose):
        o = self.options
        if o.fisher_privacy == "raw":
            self.ledger.raw(task.dataset_id, purpose)
            return diagonal_fisher(self.learner, task, names, n_samples, empirical)
        bound = o.fisher_max_grad_norm ** 2

        def clip_and_sum(squared):
            norms2 = sum(s.flatten(1).sum(1) for s in squared.values())    # ‖g_i‖²
            factor = (bound / (norms2 + 1e-12)).clamp(max=1.0)
            return {n: torch.einsum("i,i...->...", factor, s) for n, s in squared.items()}

        fisher = diagonal_fisher(self.learner, task, names, n_samples, empirical, reduce=clip_and_sum)
        count = min(n_samples, self.units(self.learner, task))   # a public size, like B
        std = o.fisher_noise_multiplier * bound / count
        for n, f in fisher.items():
            noise = torch.randn(f.shape, generator=self.noise_generator, device=f.device)
            fisher[n] = (f + std * noise).clamp_(min=0.0)
        self.ledger.gaussian(task.dataset_id, f"dp-fisher ({purpose})", 1.0, o.fisher_noise_multiplier)
        return fisher


register_mechanism("dpsgd")(DPSGD)
