"""DP-SGD (Abadi et al. 2016) through Opacus, with a per-dataset ledger and a DP-Fisher.

Per step: a Poisson batch (each example of the task kept with probability q = B/N), the
per-example gradients of the data losses, each clipped to norm C and summed (a clipper of
clsim/privacy/clipping.py), plus N(0, σ²C²), divided by B (Opacus's DPOptimizerFastGradientClipping,
the one place noise is added). σ and δ: clsim/privacy/calibration.py; each release goes into the
ledger (clsim/privacy/ledger.py) in `_release`. The strategy's data-independent
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
from dataclasses import dataclass

import torch
from torch import nn

from clsim import distributed
from clsim.config import opt
from clsim.errors import UserError
from clsim.fisher import diagonal_fisher
from clsim.privacy import clipping, streams
from clsim.privacy.calibration import DEFAULT_DELTA, DEFAULT_FISHER_NOISE, DEFAULT_NOISE, calibrate
from clsim.privacy.clipping import Clipper, head_filtered
from clsim.privacy.dp_fisher import dp_fisher
from clsim.privacy.mechanism import Mechanism
from clsim.registry import register_mechanism

DEFAULT_FISHER_SHARE = 0.1
DEFAULT_FISHER_CLIP = 1e-3


@dataclass
class DPOptions:
    noise_multiplier: float | None = opt(None, "σ: noise std relative to --max-grad-norm (give this or "
                                         f"--epsilon; {DEFAULT_NOISE} if neither; below 1e-100 it counts as no "
                                         "noise: ε = ∞)", low=0.0)
    epsilon: float | None = opt(None, "target ε for the whole stream: σ (and the DP-Fisher's σ_F) are chosen "
                                "so that every individual, over every release of every task that holds "
                                "them, stays within it", low=0.0, low_open=True)
    delta: float | None = opt(None, f"δ (default {DEFAULT_DELTA:g}, or 1/(10·N) of the largest task when "
                              "smaller); must be < 1/N", low=0.0, low_open=True, high=1.0)
    max_grad_norm: float = opt(1.0, "C: every per-example gradient is clipped to this L2 norm",
                               low=0.0, low_open=True)
    accountant: str = opt("rdp", "privacy accountant (Opacus): rdp (ε logged every step) or prv (tighter, "
                          "slower: ε logged once per epoch; where RDP's ε exceeds 100, RDP's bound stands)",
                          choices=("rdp", "prv"))
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
        self.clipper: Clipper | None = None      # made by attach()
        self.model_forwards = 1

    @property
    def clipping(self) -> str:
        """The clipper's name: hooks, ghost, bk (or dplis's smoothed)."""
        return self.clipper.name if self.clipper is not None else ""

    # --- before anything runs -------------------------------------------------------------
    def check(self, learner, scenario, epochs: int, fisher_releases: int = 0, model_forwards: int = 1,
              data_terms: bool = False) -> None:
        """Validate the settings and choose σ (and σ_F) for the whole stream; changes nothing
        but this mechanism. `fisher_releases`: DP-Fisher passes the strategy makes per task;
        `model_forwards`: forwards of the model in one step (replay: 2; only hooks clip those)."""
        o = self.options
        if o.noise_multiplier is not None and o.epsilon is not None:
            raise UserError("give either --noise-multiplier or --epsilon, not both")
        if o.fisher_noise_multiplier is not None and o.epsilon is not None and fisher_releases:
            raise UserError("under --epsilon the DP-Fisher's noise follows --fisher-budget-share; "
                            "drop --fisher-noise-multiplier or give --noise-multiplier instead of --epsilon")
        self.model_forwards = model_forwards
        self.plans = {t.dataset_id: learner.privacy_plan(t) for t in scenario.tasks}
        for dataset, plan in self.plans.items():
            if plan.sample_rate > 1:
                raise UserError(f"--batch-size {learner.batch_size} exceeds the {plan.units} examples of "
                                f"{dataset}: Poisson sampling needs a sample rate B/N <= 1; lower --batch-size")
            if plan.note and plan.note not in self.notes:
                self.notes.append(plan.note)
        self.sample_rate = {d: plan.sample_rate for d, plan in self.plans.items()}
        self.steps_per_epoch = {d: plan.releases_per_epoch for d, plan in self.plans.items()}
        noise = calibrate(o, self.plans, scenario.tasks, epochs, fisher_releases)
        self.delta, self.sigma, self.fisher_sigma = noise.delta, noise.sigma, noise.fisher_sigma
        self.notes.extend(noise.notes)

    def attach(self, learner) -> None:
        """Make the model private-trainable: swap layers Opacus cannot handle, attach the clipper."""
        learner.model = replace_unsupported_layers(learner.model, self._log).to(learner.device)
        self.clipper = self.make_clipper(learner)

    def make_clipper(self, learner) -> Clipper:
        name, why = clipping.choose(self.options.dp_clipping, learner.model, learner.privacy_unit,
                                    self.model_forwards)
        self._log(f"--dp-clipping {name}: {why}")
        return clipping.make(name, learner.model, self.options.max_grad_norm, learner.privacy_unit,
                             self.model_forwards)

    def _log(self, line: str) -> None:
        print(f"privacy: {line}", file=sys.stderr)
        self.notes.append(line)

    def ledger_options(self) -> dict:
        return {"accountant": self.options.accountant}

    def logs_training_figures(self) -> bool:
        return self.options.log_training_figures

    def setup(self, learner, scenario, ledger) -> None:
        """Also moves the learner's generator (seeded with --seed, like torch's global one that
        initialised the model) to a stream of its own (clsim/privacy/streams.py): what it draws
        from here on, Poisson masks (examples or episodes) and DP-Fisher samples among them,
        must not repeat the numbers that became the initial weights."""
        super().setup(learner, scenario, ledger)
        ledger.delta = self.delta
        ledger.notes.extend(self.notes)
        learner.generator.manual_seed(streams.derived_seed(learner.generator.initial_seed(), streams.PRIVATE_TRAINING))
        # Noise and perturbations get streams of their own, seeded from that one and reseeded
        # at every task, so a run resumed at a task boundary draws the same noise.
        self.seed = int(torch.randint(0, 2 ** 60, (1,), generator=learner.generator))
        self.noise_generator = torch.Generator(learner.device).manual_seed(self.seed)
        # Data-parallel: every worker draws the same Poisson batch and clips its block of the rows
        # once; the clipped sums are added before the noise, which every worker then draws alike
        # from the same generator: one draw of std σC on the global sum, the same on every worker.
        distributed.split_rows(False)

    # --- one task ---------------------------------------------------------------------------
    def before_task(self, task, optimizer):
        from opacus.optimizers import DPOptimizerFastGradientClipping
        self.task, self._released = task, 0
        if self.options.log_training_figures:
            self.ledger.raw(task.dataset_id, "training figures logged (--log-training-figures)")
        self.noise_generator.manual_seed(self.seed + 2 * task.index)
        # The clippers leave the clipped sum in p.grad: this optimizer adds the noise and divides
        # by the expected batch (it clips nothing itself).
        self.optimizer = DPOptimizerFastGradientClipping(
            optimizer, noise_multiplier=self.sigma, max_grad_norm=self.options.max_grad_norm,
            expected_batch_size=self.plans[task.dataset_id].expected_batch, loss_reduction="mean",
            generator=self.noise_generator)
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
            self._batch = None if batch is None else distributed.own_rows(batch, split=True)
            yield self._batch

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
        active = self._summed(self.clipper.clipped_sum(losses, self._batch, self.optimizer.params))
        self._release(active)
        self._add(penalty_grads)

    def _summed(self, active: set[nn.Parameter]) -> set[nn.Parameter]:
        """Data-parallel: the clipped sums of every worker's rows added up (before the noise), on
        the parameters any worker's rows reached."""
        if not distributed.active():
            return active
        params = self.optimizer.params
        device = params[0].device
        reached = distributed.all_reduce_sum({"r": torch.tensor([float(p in active) for p in params], device=device)})
        reached = [p for p, r in zip(params, reached["r"].tolist()) if r > 0]
        sums = distributed.all_reduce_sum({str(i): p.grad if p.grad is not None else torch.zeros_like(p)
                                           for i, p in enumerate(reached)})
        for i, p in enumerate(reached):
            p.grad = sums[str(i)]
        return set(reached)

    def noise_step(self, penalty: torch.Tensor | None) -> None:
        """An empty Poisson draw: noise on the parameters this task's batches use, plus the
        penalty's gradient (data-independent), like any other step."""
        penalty_grads = self._penalty_grads(penalty)
        active = self.head_filtered({self.task.index})
        self.clipper.forget()
        for p in active:
            p.grad = torch.zeros_like(p)
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

    def _release(self, active: set[nn.Parameter]) -> None:
        """Noise on the clipped sum of the active parameters, scaled by 1/B (Opacus); one
        ledger step. Parameters the batch did not reach take no step at all."""
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
        return set(head_filtered(self.learner.model, self.optimizer.params, tasks))

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
            o = self.options
            if o.fisher_privacy == "raw":
                self.ledger.raw(task.dataset_id, purpose)
                return diagonal_fisher(self.learner, task, names, n_samples, empirical)
            fisher, q = dp_fisher(self.learner, task, names, n_samples, empirical,
                                  noise_multiplier=self.fisher_sigma, max_grad_norm=o.fisher_max_grad_norm,
                                  generator=self.noise_generator, granularity=o.fisher_granularity)
            self.ledger.gaussian(task.dataset_id, f"dp-fisher ({purpose})", q, self.fisher_sigma)
            return fisher

    def hooks_lifted(self):
        return self.clipper.lifted()


register_mechanism("dpsgd")(DPSGD)
