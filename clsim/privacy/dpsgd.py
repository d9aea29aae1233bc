"""DP-SGD (Abadi et al. 2016) through Opacus, with a per-dataset ledger and a DP-Fisher.

Per step: a Poisson batch (each example of the task kept with probability q = B/N), the
per-example gradients of the data losses (Opacus's GradSampleModule), each clipped to norm C,
summed, plus N(0, σ²C²), divided by B (Opacus's DPOptimizer). The strategy's data-independent
penalty (EWC's) has its gradient added after the noise: post-processing, no privacy cost.
All of that happens in `backward`, so gradient masks applied afterwards (after_backward) are
post-processing too. Each step is one subsampled-Gaussian release on the task's dataset.

The privacy unit is the learner's: one training example for supervised learners (Poisson
batches drawn here), the episode for PPO (the learner draws them in `private_batches` and rows
of one episode share `batch.index`: their gradients are summed before clipping). The learner's
`privacy_plan(task)` says how units are sampled and how many releases one unit can take part in
per epoch; only those are accounted.
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
from clsim.privacy.bk import BookKeeping, bk_layers
from clsim.privacy.dp_fisher import dp_fisher
from clsim.privacy.ledger import individual_groups
from clsim.privacy.mechanism import Mechanism
from clsim.registry import register_mechanism

DEFAULT_DELTA = 1e-5
DEFAULT_NOISE = 1.0
DEFAULT_FISHER_NOISE = 10.0
DEFAULT_FISHER_SHARE = 0.1
DEFAULT_FISHER_CLIP = 1e-3


@dataclass
class DPOptions:
    noise_multiplier: float | None = opt(None, "σ: noise std relative to --max-grad-norm (give this or "
                                         f"--epsilon; {DEFAULT_NOISE} if neither)", low=0.0)
    epsilon: float | None = opt(None, "target ε for the whole stream: σ (and the DP-Fisher's σ_F) are chosen "
                                "so that every individual, over every release of every task that holds "
                                "them, stays within it", low=0.0, low_open=True)
    delta: float | None = opt(None, f"δ (default {DEFAULT_DELTA:g}, or 1/(10·N) of the largest task when "
                              "smaller); must be < 1/N", low=0.0, low_open=True, high=1.0)
    max_grad_norm: float = opt(1.0, "C: every per-example gradient is clipped to this L2 norm",
                               low=0.0, low_open=True)
    accountant: str = opt("rdp", "privacy accountant (Opacus): rdp (ε logged every step) or prv (tighter, "
                          "slower: ε logged once per epoch)", choices=("rdp", "prv"))
    fisher_privacy: str = opt("dp", "Fisher information for EWC/BLIP: dp (clipped per-example squared "
                              "gradients + Gaussian noise, accounted) or raw (exact; that task's ε = ∞)",
                              choices=("dp", "raw"))
    fisher_noise_multiplier: float | None = opt(None, "σ_F of the DP-Fisher: noise std relative to its "
                                                "sensitivity C_F² (default: set by --fisher-budget-share "
                                                f"under --epsilon, else {DEFAULT_FISHER_NOISE})", low=0.0, low_open=True)
    fisher_max_grad_norm: float = opt(DEFAULT_FISHER_CLIP, "C_F: per-example gradient norm bound of the DP-Fisher "
                                      "(true-Fisher gradients of a trained net are small: split_mnist's median "
                                      "is 0.0014, and bench/dp_fisher.py keeps the most signal near it)",
                                      low=0.0, low_open=True)
    dp_clipping: str = opt("auto", "how per-example gradients are clipped, with the same clipped sum, noise "
                           "and ε: ghost (Opacus's fast gradient clipping: per-example norms, then a second "
                           "backward of the clipped loss; no per-example gradients stored), hooks (Opacus's "
                           "per-example gradients), bk (book-keeping, Bu et al. 2023: one backward, each "
                           "layer's norms by the cheaper of ghost norms and per-example gradients, the clipped "
                           "sum from what it kept; Linear, Conv2d, GroupNorm), auto (bk when it covers every "
                           "trained layer, else ghost when Opacus has ghost norms for them all, else hooks). "
                           "The log says which",
                           choices=("auto", "ghost", "hooks", "bk"))
    fisher_granularity: str = opt("unit", "DP-Fisher release: unit (one noisy sum per output unit of each weight, "
                                  "shared by its weights: some ranking survives the noise, see bench/dp_fisher.py) "
                                  "or weight (one per weight: pure noise at these ε)", choices=("unit", "weight"))
    fisher_budget_share: float = opt(DEFAULT_FISHER_SHARE, "under --epsilon, the share of the budget the "
                                     "strategy's DP-Fisher releases may spend: σ_F makes them alone cost "
                                     "this share of ε, then σ is set so that everything together meets ε",
                                     low=0.0, low_open=True, high=0.9)
    log_training_figures: bool = opt(False, "log figures read from private training data (step loss of the "
                                     "Poisson batch, examples seen, RL training returns); the ledger then "
                                     "marks every task raw (ε = ∞)")


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
        self.clipping = "hooks"     # set by prepare(): hooks, ghost or bk
        self.book = None            # bk's taps (clsim/privacy/bk.py)

    # --- before anything runs -------------------------------------------------------------
    def check(self, learner, scenario, epochs: int, fisher_releases: int = 0) -> None:
        """Validate the settings and choose σ (and σ_F) for the whole stream; changes nothing.
        `fisher_releases`: DP-Fisher passes the strategy makes per task (its `fisher_releases`)."""
        o = self.options
        if o.noise_multiplier is not None and o.epsilon is not None:
            raise UserError("give either --noise-multiplier or --epsilon, not both")
        if o.fisher_noise_multiplier is not None and o.epsilon is not None and fisher_releases:
            raise UserError("under --epsilon the DP-Fisher's noise follows --fisher-budget-share; "
                            "drop --fisher-noise-multiplier or give --noise-multiplier instead of --epsilon")
        self.plans = {t.dataset_id: learner.privacy_plan(t) for t in scenario.tasks}
        for dataset, plan in self.plans.items():
            if plan.sample_rate > 1:
                raise UserError(f"--batch-size {learner.batch_size} exceeds the {plan.units} examples of "
                                f"{dataset}: Poisson sampling needs a sample rate B/N <= 1; lower --batch-size")
            if plan.note and plan.note not in self.notes:
                self.notes.append(plan.note)
        self.sample_rate = {d: plan.sample_rate for d, plan in self.plans.items()}
        self.steps_per_epoch = {d: plan.releases_per_epoch for d, plan in self.plans.items()}
        largest = max(plan.units for plan in self.plans.values())
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
        self.fisher_sigma = o.fisher_noise_multiplier or DEFAULT_FISHER_NOISE
        if o.epsilon is not None:
            self.calibrate(individual_groups(scenario.tasks), epochs, fisher_releases)
        elif self.sigma is None:
            self.sigma = DEFAULT_NOISE

    def calibrate(self, groups, epochs: int, fisher_releases: int) -> None:
        """σ_F so that the DP-Fisher releases alone cost --fisher-budget-share of ε for the worst
        group of individuals (counted at sample rate 1: the Fisher's own rate is never higher),
        then σ so that each group's training steps and Fisher releases together meet ε."""
        o = self.options
        fisher = fisher_releases if o.fisher_privacy == "dp" else 0
        name = {g: f"{g.population} in {', '.join(g.tasks)}" for g in groups}
        if fisher:
            self.fisher_sigma = accounting.noise_for_target(
                o.fisher_budget_share * o.epsilon, self.delta,
                {name[g]: ([(1.0, fisher * len(g.tasks))], []) for g in groups}, o.accountant)
        plan = {name[g]: ([(self.sample_rate[d], epochs * self.steps_per_epoch[d]) for d in g.tasks],
                          [accounting.gaussian(1.0, self.fisher_sigma, fisher * len(g.tasks))] if fisher else [])
                for g in groups}
        self.sigma = accounting.noise_for_target(o.epsilon, self.delta, plan, o.accountant)
        fisher_text = (f" and DP-Fisher noise_multiplier={self.fisher_sigma:.4g} ({fisher} release(s) per task, "
                       f"{o.fisher_budget_share:g} of the budget)" if fisher else "")
        self.notes.append(f"noise_multiplier={self.sigma:.4g}{fisher_text} chosen so that every individual "
                          f"meets epsilon={o.epsilon:g} over {epochs} epoch(s) of every task that holds them")

    def attach(self, learner) -> None:
        """Make the model private-trainable: swap layers Opacus cannot handle, add its hooks."""
        learner.model = replace_unsupported_layers(learner.model, self._log).to(learner.device)
        self.prepare(learner)

    def _log(self, line: str) -> None:
        print(f"privacy: {line}", file=sys.stderr)
        self.notes.append(line)

    def prepare(self, learner) -> None:
        """Attach Opacus's hooks: per-example norms (ghost) or per-example gradients (hooks), or
        bk's taps on the layer outputs; DPlis computes its own instead."""
        from opacus import GradSampleModule
        from opacus.grad_sample import GradSampleModuleFastGradientClipping
        self.clipping, why = self._clipping(learner)
        self._log(f"--dp-clipping {self.clipping}: {why}")
        if self.clipping == "bk":
            self.book = BookKeeping(bk_layers(learner.model)[0])
            self.book.attach()
            return
        try:
            if self.clipping == "ghost":
                self.sample_module = GradSampleModuleFastGradientClipping(
                    learner.model, batch_first=True, loss_reduction="sum",
                    max_grad_norm=self.options.max_grad_norm, use_ghost_clipping=True)
            else:
                self.sample_module = GradSampleModule(learner.model, batch_first=True, loss_reduction="sum")
        except NotImplementedError as exc:
            raise UserError(f"Opacus cannot make this model private: {exc}") from None

    def _clipping(self, learner) -> tuple[str, str]:
        """How to clip (hooks, ghost or bk), and why."""
        from opacus.grad_sample import GradSampleModuleFastGradientClipping
        asked = self.options.dp_clipping
        if learner.privacy_unit != "example":
            return "hooks", (f"the privacy unit is the {learner.privacy_unit}, whose rows' gradients are summed "
                             f"before clipping, which needs them one by one")
        forwards = getattr(self, "model_forwards", 1)
        if forwards > 1:
            if asked in ("ghost", "bk"):
                raise UserError(f"--dp-clipping {asked} needs one forward of the model per step; this strategy "
                                f"makes {forwards} (e.g. a replay buffer's): use --dp-clipping hooks or auto")
            return "hooks", f"the strategy forwards the model {forwards} times a step, which ghost clipping cannot clip"
        layers, uncovered = bk_layers(learner.model)
        if asked == "bk" and layers is None:
            raise UserError(f"--dp-clipping bk covers Linear, Conv2d and GroupNorm layers, not {uncovered}: "
                            f"use --dp-clipping hooks or auto")
        if asked != "auto":
            return asked, "as asked"
        if layers is not None:
            return "bk", ("book-keeping covers every trained layer (one backward; bench/privacy_cost.py: "
                          "about half the time of hooks on conv nets, faster than ghost on MLPs)")
        others = sorted({type(m).__name__ for m in learner.model.modules()
                         if any(p.requires_grad for p in m.parameters(recurse=False))
                         and type(m) not in GradSampleModuleFastGradientClipping.NORM_SAMPLERS})
        if others:
            return "hooks", (f"book-keeping does not cover {uncovered} and Opacus has no ghost norms for "
                             f"{', '.join(others)} (their per-layer per-example gradients plus a second "
                             f"backward cost more than hooks)")
        return "ghost", f"book-keeping does not cover {uncovered}; Opacus has ghost norms for every trained layer"

    def ledger_options(self) -> dict:
        return {"accountant": self.options.accountant}

    def logs_training_figures(self) -> bool:
        return self.options.log_training_figures

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
        from opacus.optimizers import DPOptimizer, DPOptimizerFastGradientClipping
        self.task, self._released = task, 0
        if self.options.log_training_figures:
            self.ledger.raw(task.dataset_id, "training figures logged (--log-training-figures)")
        self.noise_generator.manual_seed(self.seed + 2 * task.index)
        self.perturb_generator.manual_seed(self.seed + 2 * task.index + 1)
        kind = DPOptimizer if self.clipping == "hooks" else DPOptimizerFastGradientClipping
        self.optimizer = kind(optimizer, noise_multiplier=self.sigma,
                                     max_grad_norm=self.options.max_grad_norm,
                                     expected_batch_size=self.plans[task.dataset_id].expected_batch,
                                     loss_reduction="mean", generator=self.noise_generator)
        return self.optimizer

    def batches(self, task, epoch: int, subset):
        """Poisson batches of the learner's units; None for an empty draw, on which the engine
        still takes a step (`noise_step`): skipping it would reveal that the batch was empty."""
        self._released = 0
        own = self.learner.private_batches if self.learner.draws_private_batches else None
        if own is not None and subset is not None:
            raise UserError("this strategy selects training examples, which this scenario's privacy "
                            "units (episodes) are not; use it with a supervised scenario")
        for batch in own(task, epoch) if own is not None else self._example_batches(task, epoch, subset):
            self._batch = batch
            yield batch

    def _example_batches(self, task, epoch: int, subset):
        """Poisson batches of examples (Opacus's sampler), as many per epoch as N/B."""
        from opacus.utils.uniform_sampler import UniformWithReplacementSampler
        plan = self.plans[task.dataset_id]
        sampler = UniformWithReplacementSampler(num_samples=plan.units, sample_rate=plan.sample_rate,
                                                generator=self.learner.generator,
                                                steps=plan.releases_per_epoch)
        for picked in sampler:
            index = torch.tensor(picked, dtype=torch.long)
            if subset is not None:
                index = index[torch.isin(index, torch.as_tensor(subset))]
            if len(index) == 0:
                yield None
                continue
            chunks = list(self.learner.batches(task, epoch, index))
            yield chunks[0] if len(chunks) == 1 else chunks[0]._replace(
                **{f: torch.cat([getattr(c, f) for c in chunks]) for f in ("x", "y", "t", "index")})

    def backward(self, losses: torch.Tensor, penalty: torch.Tensor | None) -> None:
        """Leaves the private gradient (+ the penalty's) in p.grad and accounts one step."""
        if losses.dim() != 1:
            raise UserError(f"{self.name} needs one loss per example, but the strategy returned a "
                            f"{losses.dim()}-d loss; this strategy cannot train under --privacy")
        penalty_grads = self._penalty_grads(penalty)
        if self.clipping == "bk":
            active = self.book.clipped_sum(losses, self.options.max_grad_norm)
        elif self.clipping == "ghost":
            active = self.clipped_sum(losses)
        else:
            active = self.per_example_grads(losses)
            if self.learner.privacy_unit != "example":
                if self._batch is None or len(self._batch.index) != len(losses):
                    raise UserError(f"the privacy unit here is the {self.learner.privacy_unit}: the strategy "
                                    f"must keep the mechanism's batches as they are")
                self._sum_rows_per_unit(active, self._batch.index)
        self._release(active)
        self._add(penalty_grads)

    def noise_step(self, penalty: torch.Tensor | None) -> None:
        """An empty Poisson draw: noise on the parameters this task's batches use, plus the
        penalty's gradient (data-independent), like any other step."""
        penalty_grads = self._penalty_grads(penalty)
        active = self.head_filtered({self.task.index})
        if self.book is not None:
            self.book.forget()
        for p in active:
            if self.clipping != "hooks":
                p.grad = torch.zeros_like(p)
            else:
                p.grad_sample = p.new_zeros((0, *p.shape))
        self._release(active)
        self._add(penalty_grads)

    def _penalty_grads(self, penalty):
        if penalty is None or not torch.is_tensor(penalty) or not penalty.requires_grad:
            return None
        return torch.autograd.grad(penalty, self.optimizer.params, allow_unused=True)

    def _add(self, penalty_grads) -> None:
        """The penalty's gradient on top of the private one (post-processing)."""
        if penalty_grads is not None:
            for p, g in zip(self.optimizer.params, penalty_grads):
                if g is not None:
                    p.grad = g if p.grad is None else p.grad + g

    def clipped_sum(self, losses: torch.Tensor) -> set[nn.Parameter]:
        """Ghost clipping (Opacus's fast gradient clipping): a first backward leaves each
        example's gradient norm in p._norm_sample (Linear layers from their activations and
        backprops alone, others from per-layer per-example gradients dropped at once); a second
        backward of Σ_i c_i·loss_i, c_i = min(1, C/(‖g_i‖ + 1e-6)) as in Opacus's DPOptimizer,
        leaves the clipped sum in p.grad. Returns the parameters the batch used (see
        `per_example_grads`)."""
        params = self.optimizer.params
        for p in params:
            p._norm_sample = None
        with warnings.catch_warnings():   # inputs need no gradient: PyTorch's note about it is noise
            warnings.filterwarnings("ignore", message="Full backward hook is firing")
            losses.sum().backward(retain_graph=True)
            active = {p for p in params if p._norm_sample is not None}
            for p in params:
                p.grad = None
            if not active:
                return active
            norms = torch.stack([p._norm_sample for p in params if p in active]).norm(2, dim=0)
            coef = (self.options.max_grad_norm / (norms + 1e-6)).clamp(max=1.0)
            self.sample_module.disable_hooks()
            try:
                (losses * coef.detach()).sum().backward()
            finally:
                self.sample_module.enable_hooks()
        return active

    def per_example_grads(self, losses: torch.Tensor) -> set[nn.Parameter]:
        """Fill p.grad_sample (one row per example) and return the parameters the batch used.
        Opacus's hooks fill it for every layer the loss reached; a head the batch did not use
        gets none and is left out of this step (else it would take a noise-only update)."""
        with warnings.catch_warnings():   # inputs need no gradient: PyTorch's note about it is noise
            warnings.filterwarnings("ignore", message="Full backward hook is firing")
            losses.sum().backward()
        active = {p for p in self.optimizer.params if getattr(p, "grad_sample", None) is not None}
        if getattr(self, "model_forwards", 1) > 1:
            self._align_rows(active)
        return active

    @staticmethod
    def _align_rows(active: set[nn.Parameter]) -> None:
        """Several forwards a step (replay: the current batch, then buffer draws): Opacus adds
        each forward's per-example gradients row by row from row 0, so row i is the sum of every
        forward's i-th example, and a layer has as many rows as the largest batch that reached
        it. A task head that only a smaller forward reached (task_il: an old task's head, used
        by the buffer draw alone) has fewer rows: the missing rows are examples that never
        reached it, whose gradient there is zero; pad them so all layers clip the same rows."""
        rows = max(len(p.grad_sample) for p in active) if active else 0
        for p in active:
            short = rows - len(p.grad_sample)
            if short > 0:
                p.grad_sample = torch.cat([p.grad_sample, p.grad_sample.new_zeros((short, *p.shape))])

    @staticmethod
    def _sum_rows_per_unit(active: set[nn.Parameter], unit: torch.Tensor) -> None:
        """One gradient per unit (e.g. an episode): the sum of its rows' gradients, then clipped."""
        _, group = torch.unique(unit, return_inverse=True)
        group = group.to(next(iter(active)).device)
        n = int(group.max()) + 1
        for p in active:
            rows = p.grad_sample
            p.grad_sample = rows.new_zeros((n, *rows.shape[1:])).index_add_(0, group, rows)

    def _release(self, active: set[nn.Parameter]) -> None:
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
        # Account the releases any one unit can take part in: all of an epoch's for examples,
        # one rollout's for episodes (later rollouts touch other episodes only).
        dataset = self.task.dataset_id
        if self._released < self.steps_per_epoch[dataset]:
            self.ledger.gaussian(dataset, f"{self.name} training", self.sample_rate[dataset], self.sigma)
        self._released += 1

    def head_filtered(self, tasks: set[int]) -> set[nn.Parameter]:
        """Trainable parameters minus the heads of tasks not in `tasks` (multi-head models; a
        --task-heads shared output layer is one tensor, noised whole at every step)."""
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
        """DP-Fisher (clsim/privacy/dp_fisher.py): Poisson-sampled examples, gradients clipped to
        C_F, squared, summed, plus Gaussian noise σ_F·C_F²; one accounted release."""
        with self.hooks_lifted():
            return self._fisher(task, names, n_samples, empirical, purpose)

    @contextmanager
    def hooks_lifted(self):
        """torch.func transforms cannot pass Opacus's backward hooks: lift them meanwhile (and
        bk's taps, which would keep the Fisher's forwards for a step)."""
        if self.book is not None:
            self.book.detach()
            try:
                yield
            finally:
                self.book.attach()
            return
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
        fisher, q = dp_fisher(self.learner, task, names, n_samples, empirical, noise_multiplier=self.fisher_sigma,
                              max_grad_norm=o.fisher_max_grad_norm, generator=self.noise_generator,
                              granularity=o.fisher_granularity)
        self.ledger.gaussian(task.dataset_id, f"dp-fisher ({purpose})", q, self.fisher_sigma)
        return fisher


register_mechanism("dpsgd")(DPSGD)
