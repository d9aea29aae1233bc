"""EWC and online EWC (Kirkpatrick et al. 2017; Schwarz et al. 2018).

Both modes keep the penalty as one quadratic over the flattened shared weights,
(λ/2)·[Σ A (θ - μ)² + c] (or λ·[...] under --ewc-penalty full, below). Separate mode's sum over tasks, Σ_t F_t (θ - θ*_t)², is exactly such a
quadratic: A = Σ_t F_t, μ = Σ_t F_t θ*_t / A, and c the constant that keeps its value (merging
A(θ-μ)² with F(θ-θ*)² adds A·F/(A+F)·(μ-θ*)² to c). So every step costs the same few kernels and
the state is two vectors whatever the number of tasks; same value and gradient as one term per task.

What other code does, and the options that select it (the presets name them):
- Penalty. Kirkpatrick et al. and van de Ven & Tolias's code (continual_learner.py, ewc_loss) take
  (λ/2)·Σ F (θ-θ*)², clsim's default. Mammoth's ewc_on (penalty: e_lambda·Σ fish·(θ-θ*)²) and
  Avalanche's EWCPlugin (ewc_lambda·Σ imp·(θ-θ*)²) have no ½, so their λ pulls twice as hard:
  --ewc-penalty full.
- Fisher. Mammoth's ewc_on (end_task) takes every training image of the task one at a time with its
  true label: the squared gradient of log p(y|x) times p(y|x) (--fisher weighted over all images),
  divided by the loader's batches × batch size (the task's size rounded up to whole batches; clsim
  divides by the examples used). It runs with the network still in training mode: its batch-norm
  layers normalise each single image by its own statistics and update their running statistics with
  every Fisher image, and the images come through the training augmentation; clsim computes every
  Fisher in eval mode (running statistics, untouched) on the stored images. Avalanche's EWCPlugin
  squares the gradient of each minibatch's mean loss on the data's labels (minibatches of the
  training batch size), averaged over the minibatches: about 1/batch of the per-example Fisher on
  uncorrelated gradients (clsim: per-example, --fisher empirical on --fisher-samples examples).
  van de Ven's 2019 estimate_fisher sums the squared gradients of all N images and divides by the
  last loop index, N - 1 (clsim: N; a factor 1.0001 at split MNIST's 12,000 images a task).
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from clsim.config import opt
from clsim.errors import UserError
from clsim.learners.supervised import SupervisedLearner
from clsim.registry import register_strategy
from clsim.strategy import Strategy, check_penalty_curvature

DEFAULT_LAMBDA = 10.0


@register_strategy("ewc")
class EWC(Strategy):
    """Elastic weight consolidation: a Fisher-weighted quadratic pull toward earlier tasks' weights."""

    fisher_releases = 1   # one Fisher pass per task (after_task): the privacy budget plans for it
    state_attrs = ("importance", "anchor", "offset", "fishers")

    @dataclass
    class Options:
        ewc_lambda: float | None = opt(None, "λ: strength of the penalty (λ/2)·Σ F (θ - θ*)² (default: the "
                                       "scenario's, else 10); too large a λ makes SGD diverge (a warning "
                                       "names the largest stable one)", low=0.0)
        ewc_penalty: str = opt("half", "half: (λ/2)·Σ F (θ - θ*)² (Kirkpatrick et al., van de Ven's code); "
                               "full: λ·Σ F (θ - θ*)², the same pull at half the λ (Mammoth's ewc_on, "
                               "Avalanche's EWCPlugin)", choices=("half", "full"))
        mode: str = opt("separate", "separate: every task's (F, θ*) term, Σ_t F_t (θ - θ*_t)²; "
                        "online: one running pair, F ← γ·F + F_t and θ* ← θ*_t",
                        choices=("separate", "online"))
        gamma: float = opt(1.0, "online mode: decay γ of the running Fisher, F ← γ·F + F_t", low=0.0, high=1.0)
        fisher: str | None = opt(None, "(default: the scenario's, else true; Continual World's: expected) "
                          "true: labels sampled from the model; empirical: the data's labels; "
                          "expected: the exact expectation over the model's labels (classifiers; one backward "
                          "per class; stays accurate on confident models where sampled labels miss the rare "
                          "classes that carry the Fisher); predicted: the model's most probable label "
                          "(van de Ven & Tolias's 2019 code); weighted: the data's label, its squared gradient "
                          "times the model's probability of that label (Mammoth's ewc_on); for SAC's Gaussian policy expected is "
                          "the exact Gaussian Fisher, as Continual World's EWC",
                          choices=("true", "empirical", "expected", "predicted", "weighted"))
        fisher_samples: int = opt(1000, "training examples used for each task's Fisher", low=1)

    def setup(self, learner, scenario, mechanism):
        super().setup(learner, scenario, mechanism)
        # A scenario may recommend its λ (e.g. cartpole: Fisher sums of policies are small), as it does lr.
        given = self.options.ewc_lambda
        self.ewc_lambda = given if given is not None else scenario.defaults.get("ewc_lambda", DEFAULT_LAMBDA)
        self.fisher = self.options.fisher or scenario.defaults.get("fisher", "true")
        exact = isinstance(learner, SupervisedLearner) or (self.fisher == "expected" and hasattr(learner, "gaussian_fisher"))
        if self.fisher in ("expected", "predicted", "weighted") and not exact:
            raise UserError(f"--fisher {self.fisher} needs a classifier (it reads the class "
                            f"probabilities) or a Gaussian policy (expected); use --fisher true")
        self.names = list(learner.shared_parameters())
        self.importance: torch.Tensor | None = None   # A: the summed (or running) Fisher
        self.anchor: torch.Tensor | None = None       # μ: the A-weighted mean of the θ*
        self.offset = 0.0                             # c: what separate mode's terms add beyond A(θ-μ)²
        self.fishers: list[float] = []                # each task's Fisher summed over the weights

    def _flat(self) -> torch.Tensor:
        params = self.learner.shared_parameters()
        return torch.cat([params[n].reshape(-1) for n in self.names])

    def penalty(self):
        if self.importance is None:
            return None
        quadratic = torch.dot(self.importance, (self._flat() - self.anchor).square())
        penalty = self._scale() * (quadratic + self.offset)
        self._last_penalty = penalty.detach()     # a tensor: the engine reads it without stalling a GPU
        return penalty

    def _scale(self) -> float:
        """The factor before the quadratic: λ/2, or λ under --ewc-penalty full."""
        return self.ewc_lambda * (0.5 if self.options.ewc_penalty == "half" else 1.0)

    def after_task(self, task):
        labels = {"true": False, "empirical": True}.get(self.fisher, self.fisher)
        fisher = self.mechanism.fisher(task, self.names, self.options.fisher_samples, labels, "ewc fisher")
        fisher = torch.cat([fisher[n].reshape(-1) for n in self.names])
        theta = self._flat().detach()
        self.fishers.append(float(fisher.sum()))
        if self.importance is None:
            self.importance, self.anchor = fisher, theta
        elif self.options.mode == "online":
            self.importance, self.anchor = self.options.gamma * self.importance + fisher, theta
        else:
            a, f = self.importance.double(), fisher.double()
            total = a + f
            safe = torch.where(total > 0, total, torch.ones_like(total))
            gap = self.anchor.double() - theta.double()
            self.offset += float((a * f / safe * gap.square()).sum())
            self.anchor = torch.where(total > 0, (a * self.anchor + f * theta) / safe, theta).float()
            self.importance = total.float()
        self._check_stable(task)

    def _check_stable(self, task):
        """The penalty alone pulls its stiffest weight with curvature λ·max A (2λ·max A under
        --ewc-penalty full); past what the optimiser survives, that weight oscillates ever wider:
        say so, with the λ that would do."""
        stiffest = 2 * self._scale() * float(self.importance.max())
        check_penalty_curvature(self, task, stiffest, f"EWC after task {task.index}: the penalty's curvature",
                                "--ewc-lambda", self.ewc_lambda)

    def step_metrics(self):
        return {"strategy/ewc_penalty": self._last_penalty} if self.importance is not None else {}

    def task_metrics(self):
        return {"fisher_sum": self.fishers[-1], "ewc_lambda": self.ewc_lambda} if self.fishers else {}

    def state_tensors(self):
        return [] if self.importance is None else [self.importance, self.anchor]
