"""BLIP: bit-level information preserving (Shi et al., CVPR 2021).

After each task the Fisher information of every quantised parameter is turned into a number of
bits; that many leading bits of the parameter's quantised value are frozen, and later tasks may
only move the parameter inside the interval the frozen bits leave open. The state is one uint8
bit count, one frozen value and one running Fisher per parameter: its size never grows with the
number of tasks.

What is quantised: the weight and bias of every linear and convolution layer among the learner's
shared parameters (`learner.shared_parameters()`), so the same code serves MLPs, CNNs, ResNets
and policy networks. task_il heads are float and free (each task owns its head). In class_il and
domain_il the single head is shared by every task, so it is quantised too (option
`blip_quantise_head`), as is task_il's one output layer under --task-heads shared (task t's
Fisher reaches only its own rows, so later tasks' rows keep no frozen bits until they are
trained; the authors' networks have a head per task); class_il still forgets more, because the
old classes' logits compete with the new ones in one softmax whatever the frozen bits.

Other shared parameters (batch-norm / layer-norm affine weights) cannot be quantised by the rule
above; they are frozen whole after task 0, and batch-norm modules keep the running statistics of
task 0 and normalise with them from then on (the note asks for statistics frozen after task 0).
The authors' ResNet-18 (miniImageNetClassification/src/networks/q_resnet.py, approaches/blip.py)
does the same with the statistics (its batch-norm layers go to eval mode from task 1 on) but has no
affine parameters at all (affine=False); clsim's ResNet keeps them, frozen after task 0. Either way
later tasks see task 0's statistics, which is why BLIP on a batch-norm ResNet depends on task 0
resembling the rest (split_cifar's default backbone is the normalisation-free `cnn`).

Fidelity to the authors' code (github.com/Yujun-Shi/BLIP: quant_layer.py, blip_utils.py,
ppo_blip.py, run_blip.py, RL/run_blip.sh):

- Fisher scale. Their per-example gradients are rows of the gradient of a *mean-reduced* loss over
  a batch of B examples (images: estimate_fisher's batches of 100; RL: a rollout of 16·125 states
  split into 32 minibatches of 62), so their Fisher is the true Fisher / B², and the published
  F_prior values (1e-15 MNIST, 5e-16 CIFAR, 5e-18 RL) were tuned on that scale. clsim computes the
  true Fisher (clsim/fisher.py, shared with EWC and the DP-Fisher) and divides it by B²
  (`blip_fisher_batch`, default: their B) before the gain, which gives their bit allocation with
  their priors; B = 1 is the true Fisher, which freezes about ½·log2(B²) ≈ 6.6 bits more per weight.
- Prior and range. F_old starts at F_prior·n and weights live in ±6/sqrt(n), with n = fan_in
  (image code) or n = max(fan_in, fan_out) (RL code), where a convolution's fan_out is its number
  of output channels as in their Conv2d_Q (not channels times kernel size).
- Initialisation. Image code: weights normal(0, 1/sqrt(fan_in)); RL code: orthogonal with ReLU gain
  √2; both clamped to ±bound, biases zero.
- Fisher labels. Their estimate_fisher (blip_utils.py) draws each target from the model's own
  predictive distribution (Categorical(logits=outputs).sample(), with the model in eval mode), i.e.
  the true Fisher, not the empirical Fisher of the data's labels; clsim's BLIP does the same
  (clsim/fisher.py's sampled targets, eval mode).
- Differences: their Fisher uses 8000 samples in batches of 100 (clsim: `blip_fisher_samples`, in
  the learner's chunks; the batching only sets the scale above), and their estimate_fisher asserts
  that the task has them (80 batches of 100): their code stops on a task of fewer than 8,000
  training examples, where clsim takes all the task has (every budget below 0.67 of MNIST-5's
  ~12,000 images a task; bench/blip_authors.py lowers their batch count to match). In RL theirs
  comes from the last rollout only, clsim's from the task's kept rollout states
  (PPOLearner.fisher_batches).
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import nn

from clsim.config import opt
from clsim.errors import UserError
from clsim.registry import register_strategy
from clsim.strategy import Strategy

#: F_prior per kind of input when --blip-f-prior is 0 (the paper's values, blip.md)
F_PRIOR_DEFAULTS = {"digits": 1e-15, "natural_images": 5e-16, "rl": 5e-18}
#: B of the authors' mean-reduced Fisher batches (their Fisher = true Fisher / B², see above):
#: estimate_fisher(batch_size=100) for images; 16 envs · 125 steps / 32 minibatches (drop_last) in RL.
AUTHORS_FISHER_BATCH = {"supervised": 100, "rl": 16 * 125 // 32}
HISTOGRAM_POINTS = 1000


def quantise(w: torch.Tensor, bits: torch.Tensor, bound: float) -> torch.Tensor:
    """round(w / bound · 2^bits) / 2^bits · bound, and 0 where bits = 0 (nothing frozen)."""
    scale = torch.exp2(bits.to(w.dtype))
    q = torch.round(w / bound * scale) / scale * bound
    return torch.where(bits == 0, torch.zeros_like(q), q)


def information_gain(f_new: torch.Tensor, f_old: torch.Tensor, t: int) -> torch.Tensor:
    """Bits of information task t (0-based) added: (0.5/ln 2)·ln((F_new + (t+1)F_old) / ((t+2)F_old))."""
    return 0.5 / math.log(2) * torch.log((f_new + (t + 1) * f_old) / ((t + 2) * f_old))


def fans(weight: torch.Tensor) -> tuple[int, int]:
    """fan_in and fan_out of a linear (out, in) or convolution (out, in/groups, *kernel) weight, as
    the authors' layers count them: a convolution's fan_out is its number of output channels."""
    return weight[0].numel(), weight.shape[0]


@register_strategy("blip")
class BLIP(Strategy):
    """BLIP: freeze Fisher-allocated leading bits of every weight (constant memory, plain SGD)."""

    default_setting = "task_il"   # the paper's setting: per-task heads (class_il forgets in the shared softmax)
    fisher_releases = 1   # one Fisher pass per task (after_task): the privacy budget plans for it

    @dataclass
    class Options:
        blip_max_bits: int = opt(20, "most bits a parameter can have frozen", low=1, high=23)
        blip_f_prior: float = opt(0.0, "F_prior, the Fisher prior per unit of fan-in (0: the "
                                  "scenario's default: 1e-15 digits/MNIST, 5e-16 CIFAR and other "
                                  "colour images, 5e-18 RL)", low=0.0)
        blip_fisher_samples: int = opt(8000, "examples (or RL states) of the true Fisher after each "
                                       "task; fewer if the task has fewer", low=1)
        blip_bound_rule: str = opt("auto", "range bound 6/sqrt(fan): fan_in, max_fan "
                                   "(max(fan_in, fan_out), the RL variant) or auto (max_fan for RL)",
                                   choices=("auto", "fan_in", "max_fan"))
        blip_fisher_batch: int = opt(0, "B: the Fisher is divided by B², the scale of the authors' Fisher "
                                     "(per-example rows of a loss averaged over B) on which the published "
                                     "F_prior values live (0: theirs, 100; RL 62; 1: the true Fisher)", low=0)
        blip_quantise_head: bool = opt(True, "quantise the single head shared by all tasks too (class_il, "
                                       "domain_il, task_il with --task-heads shared: a task's Fisher "
                                       "reaches its own rows only); per-task heads are always float and free")

    def setup(self, learner, scenario, mechanism):
        super().setup(learner, scenario, mechanism)
        if learner.momentum:
            raise UserError(f"BLIP needs plain SGD (momentum would keep pushing weights against "
                            f"their frozen intervals); drop --momentum {learner.momentum} or set it to 0")
        o = self.options
        self.is_rl = learner.kind == "rl"
        self.f_prior = o.blip_f_prior or self.default_f_prior(scenario)
        rule = o.blip_bound_rule if o.blip_bound_rule != "auto" else ("max_fan" if self.is_rl else "fan_in")
        shared = dict(learner.shared_parameters())
        if not learner.per_task_heads:
            # The single output head, by name (learner.is_head also names e.g. RL critics).
            head = {n: p for n, p in learner.model.named_parameters() if n.startswith(learner.HEAD_PREFIXES)}
            shared = {**shared, **head} if o.blip_quantise_head else \
                {n: p for n, p in shared.items() if n not in head}

        self.params: dict[str, nn.Parameter] = {}
        self.bound: dict[str, float] = {}
        self.fan: dict[str, int] = {}   # n of the prior F_prior·n and of the bound 6/sqrt(n)
        for mname, module in learner.model.named_modules():
            if not isinstance(module, (nn.Linear, nn.modules.conv._ConvNd)):
                continue
            fan_in, fan_out = fans(module.weight)
            fan = fan_in if rule == "fan_in" else max(fan_in, fan_out)
            for kind in ("weight", "bias"):
                p, name = getattr(module, kind), f"{mname}.{kind}" if mname else kind
                if p is None or name not in shared:
                    continue
                self.params[name], self.fan[name] = p, fan
                self.bound[name] = 6.0 / math.sqrt(fan) if kind == "weight" else 1.0
        if not self.params:
            raise UserError("BLIP found no linear or convolution layer outside the task heads to quantise")
        self.orthogonal = rule == "max_fan"
        self.fisher_batch = o.blip_fisher_batch or AUTHORS_FISHER_BATCH["rl" if self.is_rl else "supervised"]
        self._initialise()
        # State (blip.md): bits, the frozen quantised value, the running Fisher F_old.
        self.bits = {n: torch.zeros_like(p, dtype=torch.uint8) for n, p in self.params.items()}
        self.prev = {n: torch.zeros_like(p) for n, p in self.params.items()}
        self.f_old = {n: torch.full_like(p, self.f_prior * self.fan[n]) for n, p in self.params.items()}
        # Shared parameters BLIP cannot quantise (normalisation affine): frozen whole after task 0.
        # Allocated now so the state has one size from the start.
        self.others = {n: p for n, p in shared.items() if n not in self.params}
        self.frozen = {n: p.detach().clone() for n, p in self.others.items()}
        self.norms = [m for n, m in learner.model.named_modules()
                      if isinstance(m, nn.modules.batchnorm._NormBase) and not learner.is_head(n + ".")]
        self.tasks_done = 0
        self._hooks: list = []
        self._limits = None

    def default_f_prior(self, scenario) -> float:
        """The paper's F_prior for the kind of input the scenario declares (`input_kind`)."""
        kind = "rl" if self.is_rl else scenario.input_kind
        if kind not in F_PRIOR_DEFAULTS:
            raise UserError(f"scenario {scenario.name} declares no input kind BLIP has an F_prior for "
                            f"({', '.join(F_PRIOR_DEFAULTS)}); give --blip-f-prior")
        return F_PRIOR_DEFAULTS[kind]

    @torch.no_grad()
    def _initialise(self) -> None:
        """As the authors' layers: weights ~ normal(0, 1/sqrt(fan_in)) (fan_in rule, = bound/6) or
        orthogonal with ReLU gain (RL rule), kept inside ±bound; biases zero."""
        gen = self.learner.generator
        for n, p in self.params.items():
            if not n.endswith("weight"):
                p.zero_()
                continue
            w = torch.empty(p.shape, dtype=p.dtype)
            if self.orthogonal:
                nn.init.orthogonal_(w, gain=nn.init.calculate_gain("relu"), generator=gen)
            else:
                w.normal_(0.0, self.bound[n] / 6.0, generator=gen)
            p.copy_(w.clamp_(-self.edge(n), self.edge(n)).to(p.device))

    def edge(self, name: str) -> float:
        """Largest magnitude a parameter may take: bound·(1 − 2^−max_bits)."""
        return self.bound[name] * (1.0 - 2.0 ** -self.options.blip_max_bits)

    def limits(self) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
        """[prev − bound·2^−bits, prev + bound·2^−bits] ∩ ±edge per parameter. Derived from bits and
        prev (recomputed whenever they change), so not part of the state."""
        if self._limits is None:
            self._limits = {}
            for n, prev in self.prev.items():
                width = self.bound[n] * torch.exp2(-self.bits[n].to(prev.dtype))
                self._limits[n] = ((prev - width).clamp_(min=-self.edge(n)),
                                   (prev + width).clamp_(max=self.edge(n)))
        return self._limits

    @torch.no_grad()
    def after_step(self):
        for n, (low, high) in self.limits().items():
            p = self.params[n]
            torch.clamp(p, low, high, out=p)
        if self.tasks_done:
            for n, p in self.others.items():
                p.copy_(self.frozen[n])

    @torch.no_grad()
    def after_task(self, task):
        t, max_bits = self.tasks_done, self.options.blip_max_bits
        names = list(self.params)
        fisher = self.mechanism.fisher(task, names, self.options.blip_fisher_samples, False, "blip fisher")
        for n in names:
            f_new = fisher[n].to(self.f_old[n].dtype) / self.fisher_batch ** 2   # the authors' scale
            gain = information_gain(f_new, self.f_old[n], t).nan_to_num(nan=0.0)
            self.f_old[n] = ((t + 1) * self.f_old[n] + f_new) / (t + 2)
            added = gain.ceil().clamp(0, max_bits)
            bits = (self.bits[n].float() + added).clamp(max=max_bits)
            self.bits[n] = bits.to(torch.uint8)
            self.prev[n] = quantise(self.params[n].detach(), self.bits[n], self.bound[n])
            self.params[n].copy_(self.prev[n])
        self._limits = None
        if t == 0:
            for n, p in self.others.items():
                self.frozen[n].copy_(p)
            self._freeze_norm_statistics()
        self.tasks_done += 1

    def _freeze_norm_statistics(self) -> None:
        """Keep the shared batch-norm layers in eval mode for good: they normalise with task 0's
        running statistics and never update them (the engine puts the model in train mode at each
        task start, hence a pre-forward hook rather than one .eval())."""
        if self._hooks:
            return
        for m in self.norms:
            self._hooks.append(m.register_forward_pre_hook(_stay_in_eval_mode))

    # Figures -------------------------------------------------------------------------------

    def _all_bits(self) -> torch.Tensor:
        return torch.cat([b.flatten() for b in self.bits.values()])

    def capacity(self) -> float:
        """Σ bits / (max_bits · number of quantised parameters)."""
        bits = self._all_bits()
        return float(bits.sum(dtype=torch.float64)) / (self.options.blip_max_bits * bits.numel())

    def step_metrics(self):
        if not hasattr(self, "_bits_mean") or self._bits_mean[0] != self.tasks_done:
            self._bits_mean = (self.tasks_done, float(self._all_bits().float().mean()))
        return {"strategy/blip_bits_mean": self._bits_mean[1]}

    def task_metrics(self):
        bits = self._all_bits()
        ordered = bits.float().sort().values
        # Evenly spaced quantiles of the bits: the same histogram shape in TensorBoard at a fixed
        # size (the full tensor would put millions of numbers into log.jsonl for a ResNet).
        picks = torch.linspace(0, len(ordered) - 1, min(len(ordered), HISTOGRAM_POINTS)).round().long()
        return {"blip_bits_mean": float(bits.float().mean()),
                "blip_capacity": self.capacity(),
                "blip_frozen_share": float((bits > 0).float().mean()),
                "blip_bits_histogram": ordered[picks],
                "blip_bits_counts": torch.bincount(bits.long(), minlength=self.options.blip_max_bits + 1).tolist(),
                "blip_parameters": bits.numel()}

    # State ---------------------------------------------------------------------------------

    def state_tensors(self):
        return [*self.bits.values(), *self.prev.values(), *self.f_old.values(), *self.frozen.values()]

    def state_dict(self):
        return {"tasks_done": self.tasks_done,
                **{key: {n: v.clone() for n, v in getattr(self, key).items()}
                   for key in ("bits", "prev", "f_old", "frozen")}}

    @torch.no_grad()
    def load_state_dict(self, state):
        for key in ("bits", "prev", "f_old", "frozen"):
            mine = getattr(self, key)
            if set(state[key]) != set(mine):
                raise UserError(f"the BLIP checkpoint does not match this model ({key} names differ)")
            for n, v in state[key].items():
                mine[n] = v.to(device=mine[n].device, dtype=mine[n].dtype).clone()
        self.tasks_done = state["tasks_done"]
        self._limits = None
        if self.tasks_done:
            self._freeze_norm_statistics()


def _stay_in_eval_mode(module, args):
    module.training = False
