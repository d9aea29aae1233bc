"""PPO: an actor-critic learner for streams of gymnasium tasks, readable top to bottom.

A task carries an `EnvTask` (how to build its environment and how to score it). Nothing is
stored in advance: `batches` collects a rollout with the current policy from a SyncVectorEnv,
computes GAE advantages, yields minibatches (the engine takes one optimiser step per minibatch, so
strategy.loss/penalty/after_step run per minibatch), and repeats until the task's timestep budget
is spent. Private and non-private training share that one path (`_train`); they differ only in
what a rollout keeps and how it is cut into minibatches (see `private_batches`). The action
distribution (Discrete or Box) is the model's `actions` object (clsim/rl/models.py).

The objective follows CleanRL's ppo.py: clipped surrogate, ½·(V - return)² value loss, clipped
around the rollout's values by default (`ppo_clip_value`, as in CleanRL and the BLIP authors' RL
code), minus an entropy bonus; approx_kl ((r - 1) - log r, Schulman's estimator) and the clip
fraction are reported per step. Where clsim differs: the loss is returned per transition (its
mean is CleanRL's loss) so privacy mechanisms can clip per episode.

gymnasium 1.x autoreset: the vector envs run in AutoresetMode.SAME_STEP, so the step that ends an
episode already returns the next episode's first observation and the true last one sits in
info["final_obs"]; no transition is spurious. On truncation (a time limit) the value of that final
observation is bootstrapped into the reward, r + γ·V(s_final); on termination it is not.

Under a privacy mechanism the unit is the episode and `private_batches` replaces `batches`: whole-
episode rollouts, Poisson samples of episodes, no advantage normalisation (see its docstring).
"""
from __future__ import annotations

import math
import time
from collections import deque
from dataclasses import dataclass
from typing import Iterator, NamedTuple

import numpy as np
import torch
from torch import nn

from clsim import distributed
from clsim.config import opt
from clsim.errors import UserError
from clsim.learners.base import Learner, PrivacyPlan
from clsim.rl.envs import EVAL_SEED_BASE, eval_seeds, make_vector_env, normalised, run_episodes
from clsim.rl.models import ActorCritic
from clsim.scenario import ScenarioOptions, Task


@dataclass
class PPOOptions(ScenarioOptions):
    """PPO hyper-parameters; an RL scenario's options subclass this with their own defaults.
    The run options --lr (Adam) and --batch-size (minibatch) apply as well."""
    RUN_DEFAULTS = {"epochs": 1}   # a scenario adds its lr and batch_size
    SETTING = "task_il"
    ppo_timesteps: int = opt(100_000, "environment steps of training per task (and per --epochs)", low=1)
    ppo_envs: int = opt(8, "parallel environments in the training SyncVectorEnv", low=1)
    ppo_steps: int = opt(32, "steps per environment in each rollout", low=1)
    ppo_epochs: int = opt(20, "passes over each rollout", low=1)
    ppo_gamma: float = opt(0.98, "discount factor γ", low=0.0, high=1.0)
    ppo_gae_lambda: float = opt(0.8, "GAE λ", low=0.0, high=1.0)
    ppo_clip: float = opt(0.2, "clip range ε of the probability ratio", low=0.0, low_open=True)
    ppo_value_coef: float = opt(0.5, "weight c_v of the value loss ½·(V - return)²", low=0.0)
    ppo_clip_value: bool = opt(True, "clip the value loss around the rollout's values by ±ppo_clip "
                               "(CleanRL's clip_vloss)")
    ppo_entropy_coef: float = opt(0.0, "weight of the entropy bonus", low=0.0)
    ppo_max_grad_norm: float = opt(0.5, "clip the global gradient norm to this (0: off)", low=0.0)
    ppo_lr_decay: bool = opt(True, "decay the learning rate linearly to 0 over each task")
    ppo_norm_adv: bool = opt(True, "normalise advantages per minibatch (never under --privacy: it "
                             "mixes episodes)")
    ppo_hidden: int = opt(64, "width of the two hidden layers of an MLP trunk", low=1)
    ppo_eval_episodes: int = opt(10, "evaluation episodes per task, on fixed seeds disjoint from "
                                 "training", low=1)
    ppo_eval_policy: str = opt("argmax", "evaluation actions: argmax (deterministic) or sample",
                               choices=("argmax", "sample"))
    ppo_dp_sample_rate: float = opt(1.0, "under --privacy: each update Poisson-samples the rollout's "
                                    "episodes with this rate, round(1/rate) updates per PPO epoch",
                                    low=0.0, low_open=True, high=1.0)
    ppo_fisher_states: int = opt(2048, "most recent rollout states kept per task for Fisher-based "
                                 "strategies", low=1)


# ---------------------------------------------------------------- pure pieces

def gae(rewards: torch.Tensor, values: torch.Tensor, dones: torch.Tensor, last_value: torch.Tensor,
        gamma: float, lam: float) -> torch.Tensor:
    """Generalised advantage estimates of a [T, N] rollout. dones[t] = the episode ended at step t,
    so step t+1 (or `last_value` after the last step) belongs to a new episode."""
    advantages = torch.zeros_like(rewards)
    running = torch.zeros_like(last_value)
    for t in reversed(range(len(rewards))):
        next_value = last_value if t == len(rewards) - 1 else values[t + 1]
        keep = 1.0 - dones[t].float()
        delta = rewards[t] + gamma * next_value * keep - values[t]
        running = delta + gamma * lam * keep * running
        advantages[t] = running
    return advantages


# ---------------------------------------------------------------- the learner

class PPOBatch(NamedTuple):
    x: torch.Tensor           # observations
    y: torch.Tensor           # actions taken
    t: torch.Tensor           # task index of every transition
    index: torch.Tensor       # episode id within its rollout: the privacy unit under DP
    old_logp: torch.Tensor    # log π_old(a|s) at collection
    advantage: torch.Tensor
    ret: torch.Tensor         # value target: advantage + V_old(s)
    old_value: torch.Tensor   # V_old(s) at collection, the centre of the clipped value loss


class Rollout(NamedTuple):
    obs: torch.Tensor         # [T, N, ...]
    actions: torch.Tensor     # [T, N, ...]
    logp: torch.Tensor
    values: torch.Tensor
    rewards: torch.Tensor     # with γ·V(final obs) added on truncation
    dones: torch.Tensor       # terminated or truncated
    last_value: torch.Tensor  # V(obs after the last step), [N]


class _GradClippedAdam(torch.optim.Adam):
    """Adam that first clips the global gradient norm (PPO's max_grad_norm)."""

    def __init__(self, params, max_norm: float, **kwargs):
        super().__init__(params, **kwargs)
        self.max_norm = max_norm

    def step(self, closure=None):
        if self.max_norm > 0:
            nn.utils.clip_grad_norm_([p for g in self.param_groups for p in g["params"]], self.max_norm)
        return super().step(closure)


class PPOLearner(Learner):
    """Clipped PPO with GAE, value and entropy terms. `forward` gives per-transition losses
    whose mean is the usual PPO objective; `evaluate` the normalised mean evaluation return
    (raw returns come out through `score_details`)."""

    def is_head(self, name: str) -> bool:
        """Per-task policy heads and the whole critic (its trunk and value heads). The critic
        never enters the policy's Fisher; a single policy head (class_il/domain_il) serves every
        task, so penalties and masks protect it like the trunk."""
        return name.startswith(("critics.", "critic_trunk.")) or \
            (name.startswith("heads.") and len(self.model.heads) > 1)

    def __init__(self, model: ActorCritic, *, options: PPOOptions, **kwargs):
        super().__init__(model, **kwargs)
        self.o = options
        self.actions = model.actions
        self.optimizer: torch.optim.Optimizer | None = None
        self.fisher_states: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}
        self.details: dict[str, list[float]] = {}
        self.recent_returns: deque = deque(maxlen=20)   # finished training episodes
        self.env_steps = 0
        self._task_start = (0, time.perf_counter())
        self._update_stats: dict[str, torch.Tensor] = {}
        self._private = False

    def max_stable_curvature(self) -> None:
        return None   # Adam rescales every step: no fixed bound

    def make_optimizer(self) -> torch.optim.Optimizer:
        self.optimizer = _GradClippedAdam(self.model.parameters(), self.o.ppo_max_grad_norm,
                                          lr=self.lr, eps=1e-5)
        return self.optimizer

    # -- training data: one rollout -> GAE -> minibatch path for private and non-private training
    def batches(self, task: Task, epoch: int, subset: torch.Tensor | None = None) -> Iterator[PPOBatch]:
        if subset is not None:
            raise UserError("this strategy selects training examples, which RL tasks do not have; "
                            "use it with a supervised scenario")
        return self._train(task, private=False)

    def private_batches(self, task: Task, epoch: int) -> Iterator[PPOBatch | None]:
        """Batches for a privacy mechanism, with the episode as the unit. Every rollout starts
        from a fresh reset and keeps exactly one episode per env, cut after `ppo_steps` steps (a cut
        bootstraps V like a time limit), so each episode belongs to one rollout and every rollout
        has the same, public, number of episodes. Each PPO epoch makes round(1/q) updates on a
        Poisson sample of those episodes (rate q = ppo_dp_sample_rate); an empty draw yields None
        (the mechanism then takes a noise-only step). Advantages are left unnormalised: batch
        statistics would mix episodes. The Fisher keeps one state per episode, so a Fisher row
        is an episode too."""
        return self._train(task, private=True)

    def _train(self, task: Task, private: bool) -> Iterator[PPOBatch | None]:
        o = self.o
        self._private = private
        mine = distributed.block(o.ppo_envs)   # data-parallel: this worker's environments
        envs = make_vector_env(task.env, len(range(o.ppo_envs)[mine]), train=True)
        self._task_start = (self.env_steps, time.perf_counter())
        running_return = np.zeros(o.ppo_envs)
        try:
            obs = None
            for k in range(self.n_rollouts()):
                self._decay_lr(k)
                if private or obs is None:
                    obs, _ = envs.reset(seed=self._fresh_seeds()[mine])
                    running_return[:] = 0.0
                r, obs = self.collect(envs, obs, task.index, running_return, until_done=private)
                flat = self._flatten(r, task.index)
                if private:
                    keep = self._flat((r.dones.long().cumsum(0) - r.dones.long()) == 0)   # first episodes
                    # One random state of each episode for the Fisher (row-major [T, N] -> flat).
                    step = (torch.rand(o.ppo_envs, generator=self.generator) * keep.view(-1, o.ppo_envs).sum(0)).long()
                    one_each = step * o.ppo_envs + torch.arange(o.ppo_envs)
                    self._keep_fisher_states(task.index, flat.x[one_each], flat.y[one_each])
                    env = torch.arange(o.ppo_envs).repeat(len(keep) // o.ppo_envs)   # kept episode id = its env
                    yield from self._episode_samples(flat._replace(index=env), keep)
                else:
                    self._keep_fisher_states(task.index, flat.x, flat.y)
                    yield from self._minibatches(flat)
        finally:
            envs.close()

    def n_rollouts(self) -> int:
        return max(1, math.ceil(self.o.ppo_timesteps / (self.o.ppo_envs * self.o.ppo_steps)))

    def _fresh_seeds(self) -> list[int]:
        return torch.randint(0, EVAL_SEED_BASE, (self.o.ppo_envs,), generator=self.generator).tolist()

    def _decay_lr(self, k: int) -> None:
        if self.o.ppo_lr_decay and self.optimizer is not None:
            for group in self.optimizer.param_groups:
                group["lr"] = self.lr * (1.0 - k / self.n_rollouts())

    @staticmethod
    def _flat(v: torch.Tensor) -> torch.Tensor:
        return v.reshape(-1, *v.shape[2:])   # [T, N, ...] -> [T*N, ...]

    @torch.no_grad()
    def collect(self, envs, obs, task_index: int, running_return: np.ndarray, until_done: bool = False):
        """One rollout of `ppo_steps` steps from every env with the current (sampling) policy, or
        fewer when `until_done` and every env has ended an episode. Returns (Rollout, the
        observation to continue from). Data-parallel, `envs` are this worker's block of the
        `ppo_envs` environments: what they give is gathered, so every worker holds the whole
        rollout and draws every action from the one generator, as one process does."""
        gamma, n = self.o.ppo_gamma, self.o.ppo_envs
        mine = distributed.block(n)
        everyone = lambda v: distributed.gather_rows(torch.as_tensor(v).to(self.device), n, scale=False)
        columns: dict[str, list] = {k: [] for k in ("obs", "actions", "logp", "values", "rewards", "dones")}
        ended = np.zeros(n, dtype=bool)
        while len(columns["obs"]) < self.o.ppo_steps and not (until_done and ended.all()):
            x = torch.as_tensor(obs).to(self.device)
            out, value = self.model(x, task_index)
            x, out, value = everyone(x), everyone(out).cpu(), everyone(value)
            action = self.actions.sample(out, self.generator)
            obs, raw, terminated, truncated, info = envs.step(self.actions.to_env(action[mine]))
            cut = np.flatnonzero(truncated & ~terminated)   # time limit: the state still had a future
            future = torch.zeros(len(raw))
            if len(cut):
                final = torch.as_tensor(np.stack([info["final_obs"][i] for i in cut])).to(self.device)
                future[cut] = gamma * self.model(final, task_index)[1].cpu()
            raw, future = everyone(np.asarray(raw, dtype=np.float64)).cpu().numpy(), everyone(future).cpu()
            done = everyone((terminated | truncated).astype(np.uint8)).cpu().numpy().astype(bool)
            running_return += raw
            ended |= done
            for i in np.flatnonzero(done):
                self.recent_returns.append(float(running_return[i]))
                running_return[i] = 0.0
            reward = torch.as_tensor(raw, dtype=torch.float32) + future
            for key, v in (("obs", x.cpu()), ("actions", action), ("logp", self.actions.log_prob(out, action)),
                           ("values", value.cpu()), ("rewards", reward), ("dones", torch.as_tensor(done))):
                columns[key].append(v)
        self.env_steps += len(columns["obs"]) * n
        last_value = everyone(self.model(torch.as_tensor(obs).to(self.device), task_index)[1]).cpu()
        return Rollout(*(torch.stack(columns[k]) for k in columns), last_value), obs

    def _flatten(self, r: Rollout, task_index: int) -> PPOBatch:
        """GAE on the rollout, then every transition as one flat row."""
        o = self.o
        advantages = gae(r.rewards, r.values, r.dones, r.last_value, o.ppo_gamma, o.ppo_gae_lambda)
        # Episode ids: a new id after every done in an env's column, distinct across envs.
        starts = torch.cat([torch.zeros(1, r.dones.shape[1], dtype=torch.long), r.dones[:-1].long()]).cumsum(0)
        episode = starts + torch.arange(r.dones.shape[1]) * (len(r.dones) + 1)
        x, y, ep, logp, adv, ret, value = map(self._flat, (r.obs, r.actions, episode, r.logp, advantages,
                                                           advantages + r.values, r.values))
        return PPOBatch(x, y, torch.full((len(y),), task_index, dtype=torch.long), ep, logp, adv, ret, value)

    def _rows(self, flat: PPOBatch, rows: torch.Tensor, normalise: bool) -> PPOBatch:
        batch = PPOBatch(*(v[rows] for v in flat))
        if normalise and len(rows) > 1:
            a = batch.advantage
            batch = batch._replace(advantage=(a - a.mean()) / (a.std() + 1e-8))
        return PPOBatch(*(v.to(self.device) for v in batch))

    def _minibatches(self, flat: PPOBatch) -> Iterator[PPOBatch]:
        """`ppo_epochs` shuffled passes over the rollout in minibatches of --batch-size."""
        for _ in range(self.o.ppo_epochs):
            for chunk in torch.randperm(len(flat.y), generator=self.generator).split(self.batch_size):
                yield self._rows(flat, chunk, self.o.ppo_norm_adv)

    def _episode_samples(self, flat: PPOBatch, keep: torch.Tensor) -> Iterator[PPOBatch | None]:
        """Under privacy: round(1/q) Poisson samples of the kept episodes per PPO epoch."""
        o = self.o
        for _ in range(o.ppo_epochs * max(1, round(1 / o.ppo_dp_sample_rate))):
            picked = torch.rand(o.ppo_envs, generator=self.generator) < o.ppo_dp_sample_rate
            rows = torch.nonzero(keep & picked[flat.index]).squeeze(1)
            yield self._rows(flat, rows, normalise=False) if len(rows) else None

    def _keep_fisher_states(self, task_index: int, obs: torch.Tensor, actions: torch.Tensor) -> None:
        if task_index in self.fisher_states:
            old_obs, old_actions = self.fisher_states[task_index]
            obs, actions = torch.cat([old_obs, obs]), torch.cat([old_actions, actions])
        keep = self.o.ppo_fisher_states
        self.fisher_states[task_index] = (obs[-keep:], actions[-keep:])

    # -- objective
    def forward(self, batch: PPOBatch) -> tuple[torch.Tensor, torch.Tensor]:
        """Per-transition PPO loss: clipped policy term + c_v·½·(V - return)² (clipped around
        V_old when ppo_clip_value) - c_e·entropy; data-parallel, of this worker's rows, gathered."""
        return distributed.sharded_forward(self._forward_rows, batch)

    def _forward_rows(self, batch: PPOBatch) -> tuple[torch.Tensor, torch.Tensor]:
        o = self.o
        out, value = self.model(batch.x, batch.t)
        log_ratio = self.actions.log_prob(out, batch.y) - batch.old_logp
        ratio = torch.exp(log_ratio)
        policy = -torch.min(ratio * batch.advantage,
                            ratio.clamp(1 - o.ppo_clip, 1 + o.ppo_clip) * batch.advantage)
        value_loss = (value - batch.ret).pow(2)
        if o.ppo_clip_value:
            clipped = batch.old_value + (value - batch.old_value).clamp(-o.ppo_clip, o.ppo_clip)
            value_loss = torch.max(value_loss, (clipped - batch.ret).pow(2))
        with torch.no_grad():
            self._update_stats = {"approx_kl": ((ratio - 1) - log_ratio).mean(),
                                  "clip_fraction": ((ratio - 1).abs() > o.ppo_clip).float().mean()}
        return policy + o.ppo_value_coef * 0.5 * value_loss - o.ppo_entropy_coef * self.actions.entropy(out), out

    def state_dict(self) -> dict:
        """The running training figures (env steps, recent episode returns) span tasks."""
        return {"env_steps": self.env_steps, "recent_returns": list(self.recent_returns)}

    def load_state_dict(self, state: dict) -> None:
        self.env_steps = state["env_steps"]
        self.recent_returns.clear()
        self.recent_returns.extend(state["recent_returns"])

    def step_metrics(self) -> dict:
        steps, since = self._task_start
        out = {"env_steps": self.env_steps,
               "env_steps_per_sec": (self.env_steps - steps) / max(time.perf_counter() - since, 1e-9)}
        if self.recent_returns:
            out["episode_return"] = float(np.mean(self.recent_returns))
        if not self._private:   # figures of the private episodes would be unaccounted releases
            out.update({k: float(v) for k, v in self._update_stats.items()})
        return out

    # -- privacy: the unit is the episode
    kind = "rl"
    privacy_unit = "episode"
    draws_private_batches = True
    # Read from the training episodes: not logged under a privacy mechanism (see clsim/engine.py).
    training_figures = ("episode_return", "env_steps", "env_steps_per_sec")

    def privacy_plan(self, task: Task) -> PrivacyPlan:
        o = self.o
        q = o.ppo_dp_sample_rate
        return PrivacyPlan(
            units=self.n_rollouts() * o.ppo_envs, sample_rate=q,
            releases_per_epoch=o.ppo_epochs * max(1, round(1 / q)),
            expected_batch=max(1, round(q * o.ppo_envs)),
            note=f"the privacy unit is the episode; each rollout holds one episode per "
                 f"env (cut after {o.ppo_steps} steps), used only by that rollout's updates, so ε counts "
                 f"one rollout's releases (parallel composition over rollouts); advantages not normalised")

    def fisher_pool(self, task: Task) -> int:
        return len(self.fisher_states[task.index][0])

    # -- evaluation
    @torch.no_grad()
    def episode_returns(self, task: Task) -> np.ndarray:
        """Raw returns of the evaluation episodes of `task` (fixed seeds, no reward clipping)."""
        was_training = self.model.training
        self.model.eval()
        sample = self.o.ppo_eval_policy == "sample"
        gen = torch.Generator().manual_seed(task.index)   # evaluation never moves training's RNG

        def act(obs):
            out = self.model.policy(torch.as_tensor(obs).to(self.device), task.index).cpu()
            return self.actions.to_env(self.actions.sample(out, gen) if sample else self.actions.mode(out))
        try:
            return run_episodes(task.env, eval_seeds(task.index, self.o.ppo_eval_episodes), act)
        finally:
            self.model.train(was_training)

    def evaluate(self, task: Task) -> float:
        returns = self.episode_returns(task)
        self.details.setdefault("return_raw", []).append(float(returns.mean()))
        if task.env.success_above is not None:
            self.details.setdefault("success_rate", []).append(float((returns > task.env.success_above).mean()))
        return normalised(float(returns.mean()), task.env)

    def score_details(self) -> dict[str, list[float]]:
        details, self.details = self.details, {}
        return details

    # -- Fisher: states from the task's rollouts, actions sampled from the policy
    def fisher_batches(self, task: Task, n: int, empirical: bool) -> Iterator[tuple]:
        if task.index not in self.fisher_states:
            raise RuntimeError(f"no rollout states of task {task.index}: it was not trained yet")
        states, taken = self.fisher_states[task.index]
        pick = torch.randperm(len(states), generator=self.generator)[:n]
        for chunk in pick.split(self.batch_size):
            yield states[chunk].to(self.device), taken[chunk].to(self.device) if empirical else None, task.index

    def logits(self, x, t) -> torch.Tensor:
        return self.model.policy(x, t)

    def log_prob(self, out, y) -> torch.Tensor:
        return self.actions.log_prob(out, y)

    def sample_targets(self, out) -> torch.Tensor:
        return self.actions.sample(out.detach().cpu(), self.generator).to(out.device)
