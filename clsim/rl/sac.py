"""SAC as Continual World runs it (Wołczyk et al. 2021; github.com/awarelab/continual_world,
continualworld/sac/sac.py and sac/models.py), as a clsim learner beside PPO.

One environment steps per task for `sac_steps` steps: uniform random actions for the first
`sac_start_steps` steps of every task, then the policy's samples; every `sac_update_every` steps
from `sac_update_after` on, that many updates on batches of --batch-size from a replay buffer
(1e6 transitions, emptied when a task starts). Each update is one engine step, so a strategy's
loss, penalty, gradient hooks and after_step run per update, as CW's `get_auxiliary_loss` and
`adjust_gradients` do. Time-limit ends are not stored as terminal (CW's done_to_store).

Networks (CW's defaults): actor and two critics, each an MLP of 4 x 256 units with LayerNorm and
tanh after the first layer and leaky ReLU (slope 0.2, TF's default) after the others, Glorot-uniform
weights and zero biases as Keras; one output head per task (task_il), selected by the task
identity, which the trunks do not see (`sac_hide_task_id`, CW's hide_task_id). The actor gives a
Gaussian mean and log-std (clipped to [-20, 2]) squashed by tanh (`TanhGaussian`, clsim/rl/models.py).
Entropy: one log α per task, starting at 1, tuned toward CW's target entropy
dim·log(σ·sqrt(2πe)) with σ = 0.089 (`sac_target_output_std`). Targets: Polyak averaging 0.995.
Clipped double Q; γ = 0.99; Adam lr 1e-3 for actor, critics and α, reset at every task (CW's
reset_optimizer_on_task_change, the engine's fresh optimizer per task).

Evaluation every `sac_eval_every` steps of training, on every task of the sequence:
`sac_eval_episodes` stochastic episodes (CW's test/stochastic success, the figure its metrics use)
and `sac_eval_deterministic` deterministic ones, on fixed seeds disjoint from training. These
evaluations are the run's evaluation curve (summary.json `evaluation_curve`, clsim/rl/cw_metrics.py
turns it into CW's metrics); the engine's evaluation after each task gives the success-rate matrix.

Where clsim differs from CW's code:
- PyTorch instead of TensorFlow; one backward of actor + critic + α losses summed, the actor's
  term reading the critics through detached weights (so each part gets exactly CW's gradient); a
  strategy's penalty is added once (CW adds it to both actor and critic losses, which have disjoint
  variables: the same gradients).
- CW's single Keras Adam is applied three times per update (actor, critics, α), so its step count,
  and with it the bias correction, advances 3 per update; torch's Adam advances once.
- Evaluation happens every `sac_eval_every` steps of the task (CW: every log_every global steps,
  the same points when steps per task is a multiple of it) and seeds its episodes.
- The replay buffer lives on the host (numpy), batches move to the learner's device.
- Privacy: the replay buffer re-reads raw transitions, so every task's ε is ∞ (the ledger records
  it); no DP mechanism is defined for SAC, and --privacy is refused with one line.
"""
from __future__ import annotations

import math
import time
from dataclasses import dataclass
from typing import Iterator, NamedTuple

import numpy as np
import torch
from torch import nn
from torch.func import functional_call

from clsim.config import opt
from clsim.errors import UserError
from clsim.learners.base import Learner, PrivacyPlan
from clsim.models import buffer_slots
from clsim.rl.envs import EVAL_SEED_BASE, eval_seeds
from clsim.rl.models import TanhGaussian
from clsim.scenario import ScenarioOptions, Task


@dataclass
class SACOptions(ScenarioOptions):
    """SAC hyper-parameters (Continual World's defaults); --lr (Adam) and --batch-size apply too."""
    RUN_DEFAULTS = {"epochs": 1, "lr": 1e-3, "batch_size": 128}
    SETTING = "task_il"
    sac_steps: int = opt(1_000_000, "environment steps per task (CW: 1e6)", low=1)
    sac_replay_size: int = opt(1_000_000, "transitions the replay buffer holds (one larger than the transitions "
                               "a run stores in it holds them all: only that many are allocated; one that "
                               "does not fit in free memory is refused)", low=1)
    sac_reset_buffer: bool = opt(True, "empty the replay buffer when a task starts (CW's default)")
    sac_start_steps: int = opt(10_000, "uniform random actions for this many steps of each task", low=0)
    sac_update_after: int = opt(1000, "steps of a task before its first update", low=0)
    sac_update_every: int = opt(50, "steps between update rounds; each round makes as many updates", low=1)
    sac_gamma: float = opt(0.99, "discount factor γ", low=0.0, high=1.0)
    sac_polyak: float = opt(0.995, "target networks ← polyak·target + (1 - polyak)·online", low=0.0, high=1.0)
    sac_alpha: float = opt(0.0, "fixed entropy coefficient α; 0: tuned per task toward the target entropy", low=0.0)
    sac_target_output_std: float = opt(0.089, "target entropy: that of a Gaussian with this std per action "
                                       "dimension (CW's target_output_std)", low=0.0, low_open=True)
    sac_hidden: int = opt(256, "units of each hidden layer", low=1)
    sac_layers: int = opt(4, "hidden layers of the actor and of each critic", low=1)
    sac_hide_task_id: bool = opt(True, "the trunks do not see the one-hot task identity (heads still "
                                 "select by it), as CW's hide_task_id")
    sac_clipnorm: float = opt(0.0, "clip the actor's and the critics' gradient norms to this (0: off)", low=0.0)
    sac_regularize_critic: bool = opt(False, "strategies protect the critics' shared weights too "
                                      "(CW's regularize_critic); else only the actor's")
    sac_reset_critic: bool = opt(False, "re-initialise the critics when a task starts")
    sac_policy_exploration: bool = opt(False, "after the first task explore with the policy instead of "
                                       "uniform actions (CW's agent_policy_exploration)")
    sac_eval_every: int = opt(20_000, "evaluate every task after this many steps of training (CW's log_every)",
                              low=1)
    sac_eval_episodes: int = opt(10, "stochastic evaluation episodes per task (CW's success figure)", low=1)
    sac_eval_deterministic: int = opt(1, "deterministic evaluation episodes per task", low=0)


# ---------------------------------------------------------------- networks

def _dense(n_in: int, n_out: int) -> nn.Linear:
    layer = nn.Linear(n_in, n_out)
    nn.init.xavier_uniform_(layer.weight)   # Keras Dense: Glorot uniform, zero bias
    nn.init.zeros_(layer.bias)
    return layer


def cw_mlp(n_in: int, hidden: int, layers: int) -> nn.Sequential:
    """CW's mlp(): Dense, LayerNorm, tanh, then (Dense, leaky ReLU 0.2) x (layers - 1)."""
    modules: list[nn.Module] = [_dense(n_in, hidden), nn.LayerNorm(hidden), nn.Tanh()]
    for _ in range(layers - 1):
        modules += [_dense(hidden, hidden), nn.LeakyReLU(0.2)]
    return nn.Sequential(*modules)


class Heads(nn.Module):
    """One linear head per slot (task); `forward(features, t)` picks each row's head."""

    def __init__(self, width: int, n_out: int, n_slots: int):
        super().__init__()
        self.heads = nn.ModuleList(_dense(width, n_out) for _ in range(n_slots))

    def __len__(self) -> int:
        return len(self.heads)

    def forward(self, f: torch.Tensor, t) -> torch.Tensor:
        if len(self.heads) == 1:
            return self.heads[0](f)
        if isinstance(t, int):
            return self.heads[t](f)
        every = torch.stack([h(f) for h in self.heads], 1)
        return every[torch.arange(len(f), device=f.device), t]


class Critic(nn.Module):
    def __init__(self, n_in: int, o: SACOptions, n_slots: int):
        super().__init__()
        self.trunk = cw_mlp(n_in, o.sac_hidden, o.sac_layers)
        self.heads = Heads(o.sac_hidden, 1, n_slots)

    def forward(self, x, a, t) -> torch.Tensor:
        return self.heads(self.trunk(torch.cat([x, a], -1)), t).squeeze(-1)


class SACModel(nn.Module):
    """Actor (`trunk`, `heads`: task slots of [mean, log-std]), two critics, their targets and one
    log α per task. `obs_dim` counts the observation without the one-hot task identity."""

    def __init__(self, obs_dim: int, n_tasks: int, actions: TanhGaussian, o: SACOptions):
        super().__init__()
        self.actions, self.obs_dim, self.hide = actions, obs_dim, o.sac_hide_task_id
        n_in = obs_dim if o.sac_hide_task_id else obs_dim + n_tasks
        self.trunk = cw_mlp(n_in, o.sac_hidden, o.sac_layers)
        self.heads = Heads(o.sac_hidden, 2 * actions.dim, n_tasks)
        self.critic1, self.critic2 = (Critic(n_in + actions.dim, o, n_tasks) for _ in range(2))
        self.target1, self.target2 = (Critic(n_in + actions.dim, o, n_tasks) for _ in range(2))
        self.sync_targets()
        for p in [*self.target1.parameters(), *self.target2.parameters()]:
            p.requires_grad_(False)
        self.log_alpha = nn.Parameter(torch.ones(n_tasks))   # CW: all_log_alpha starts at 1

    def sync_targets(self) -> None:
        self.target1.load_state_dict(self.critic1.state_dict())
        self.target2.load_state_dict(self.critic2.state_dict())

    def inputs(self, x: torch.Tensor) -> torch.Tensor:
        return x[..., :self.obs_dim] if self.hide else x

    def policy(self, x, t=0) -> torch.Tensor:
        """[mean, log-std] of the pre-tanh Gaussian, log-std clipped as CW's."""
        out = self.heads(self.trunk(self.inputs(x)), t)
        mean, log_std = out.chunk(2, -1)
        return torch.cat([mean, log_std.clamp(-20.0, 2.0)], -1)

    def forward(self, x, t=0) -> torch.Tensor:
        return self.policy(x, t)


# ---------------------------------------------------------------- replay buffer

class SACBatch(NamedTuple):
    x: torch.Tensor        # observations (with the one-hot task identity)
    y: torch.Tensor        # actions taken
    t: torch.Tensor        # task index of each transition
    index: torch.Tensor    # slot in the buffer (-1: not from it)
    reward: torch.Tensor
    next_x: torch.Tensor
    done: torch.Tensor     # terminal (never a time limit)


class ReplayBuffer:
    """Transitions in numpy arrays allocated on the first store: FIFO, or reservoir sampling
    (Vitter's R with the learner's generator: the n-th transition enters with probability size/n),
    CW's two buffer types."""

    def __init__(self, size: int, reservoir: bool, generator: torch.Generator):
        self.size, self.reservoir, self.generator = size, reservoir, generator
        self.count = self.seen = 0
        self.columns: dict[str, np.ndarray] | None = None

    def store(self, obs, action, reward, next_obs, done, task: int) -> None:
        if self.columns is None:
            self.columns = {"x": np.empty((self.size, len(obs)), np.float32),
                            "y": np.empty((self.size, len(action)), np.float32),
                            "t": np.empty(self.size, np.int64), "reward": np.empty(self.size, np.float32),
                            "next_x": np.empty((self.size, len(obs)), np.float32),
                            "done": np.empty(self.size, np.float32)}
        if not self.reservoir:
            slot = self.seen % self.size
        elif self.seen < self.size:
            slot = self.seen
        else:
            slot = int(torch.randint(0, self.seen + 1, (), generator=self.generator))
        self.seen += 1
        if slot < self.size:
            for key, value in (("x", obs), ("y", action), ("t", task), ("reward", reward),
                               ("next_x", next_obs), ("done", done)):
                self.columns[key][slot] = value
            self.count = min(self.count + 1, self.size)

    def sample(self, k: int, device: torch.device) -> SACBatch:
        index = torch.randint(0, self.count, (k,), generator=self.generator)
        rows = index.numpy()
        c = self.columns
        return SACBatch(*(torch.from_numpy(c[key][rows]).to(device) for key in ("x", "y", "t")), index.to(device),
                        *(torch.from_numpy(c[key][rows]).to(device) for key in ("reward", "next_x", "done")))

    def nbytes(self) -> int:
        return 0 if self.columns is None else sum(a[:self.count].nbytes for a in self.columns.values())


class _SACAdam(torch.optim.Adam):
    """Adam over actor, critics and α that clips the actor's and the critics' gradient norms
    apart (CW's clipnorm) and then moves the target critics toward the online ones (Polyak)."""

    def __init__(self, model: SACModel, lr: float, clipnorm: float, polyak: float):
        super().__init__([p for p in model.parameters() if p.requires_grad], lr=lr)
        self.model, self.clipnorm, self.polyak = model, clipnorm, polyak
        m = model
        self.groups = [list(m.trunk.parameters()) + list(m.heads.parameters()),
                       list(m.critic1.parameters()) + list(m.critic2.parameters())]
        self.online = list(m.critic1.parameters()) + list(m.critic2.parameters())
        self.target = list(m.target1.parameters()) + list(m.target2.parameters())

    def step(self, closure=None):
        if self.clipnorm > 0:
            for group in self.groups:
                nn.utils.clip_grad_norm_(group, self.clipnorm)
        out = super().step(closure)
        with torch.no_grad():
            torch._foreach_lerp_(self.target, self.online, 1.0 - self.polyak)
        return out


# ---------------------------------------------------------------- the learner

class SACLearner(Learner):
    """SAC on one environment per task; see the module docstring."""

    kind = "rl"
    algorithm = "sac"
    privacy_unit = "transition"
    draws_private_batches = False
    training_figures = ("episode_return", "train_success", "env_steps", "env_steps_per_sec")

    def __init__(self, model: SACModel, *, options: SACOptions, tasks: list[Task], **kwargs):
        super().__init__(model, **kwargs)
        self.o = options
        self.scenario_tasks = tasks
        self.actions: TanhGaussian = model.actions
        self.buffer: ReplayBuffer | None = None
        self.reservoir_size: int | None = None   # set by the reservoir strategy: one buffer for the run
        self.details: dict[str, list[float]] = {}
        self.curve: list[dict] = []               # evaluations made while training (see evaluation_curve)
        self._curve_point: dict | None = None
        self.env_steps = 0
        self.recent: dict[str, list[float]] = {"episode_return": [], "train_success": []}
        self._stats: dict[str, torch.Tensor] = {}
        self._task_start = (0, time.perf_counter())
        self._eval_envs: dict[int, object] = {}
        self.buffer_size()   # a buffer too large for memory is refused before the run starts

    def is_head(self, name: str) -> bool:
        """Per-task heads, the target critics and α are never shared weights; the critics are
        shared (protected by strategies) only with `sac_regularize_critic`, as CW's regularize_critic."""
        if name.startswith(("target1.", "target2.")) or name == "log_alpha":
            return True
        if name.startswith(("critic1.", "critic2.")):
            return not self.o.sac_regularize_critic or (".heads." in name and self.per_task_heads)
        return name.startswith("heads.") and self.per_task_heads

    def max_stable_curvature(self) -> None:
        return None   # Adam rescales every step: no fixed bound

    def make_optimizer(self) -> torch.optim.Optimizer:
        return _SACAdam(self.model, self.lr, self.o.sac_clipnorm, self.o.sac_polyak)

    #: why no privacy mechanism may run this learner (clsim.experiment refuses --privacy with it)
    no_private_training = ("SAC re-reads raw transitions from its replay buffer, so no DP mechanism bounds what it "
                           "releases (the ledger records ε = ∞ for every task); run SAC without --privacy, or a PPO "
                           "scenario for episode-level DP")

    def n_updates(self) -> int:
        o = self.o
        rounds = len(range(o.sac_update_after, o.sac_steps, o.sac_update_every))
        return rounds * o.sac_update_every

    def privacy_plan(self, task: Task) -> PrivacyPlan:
        """The update count (the progress bar's plan); never used to account: see no_private_training."""
        return PrivacyPlan(units=self.o.sac_steps, sample_rate=min(1.0, self.batch_size / self.o.sac_steps),
                           releases_per_epoch=max(1, self.n_updates()), expected_batch=self.batch_size,
                           note="SAC: raw replay buffer, ε = ∞")

    # -- training: act, store, update
    def batches(self, task: Task, epoch: int, subset: torch.Tensor | None = None) -> Iterator[SACBatch]:
        if subset is not None:
            raise UserError("this strategy selects training examples, which RL tasks do not have; "
                            "use it with a supervised scenario")
        return self._train(task)

    def buffer_size(self) -> int:
        """The replay buffer's slots: --sac-replay-size (the reservoir strategy's size, where it keeps one),
        or the transitions one buffer stores in the run where fewer: a buffer that large never drops
        one, so the run is the same. Refused in one line when they do not fit in free memory."""
        fills = self.o.sac_steps * (len(self.scenario_tasks) if self._buffer_spans_tasks() else 1)
        flag, asked = ("--sac-replay-size", self.o.sac_replay_size) if self.reservoir_size is None else \
            ("--reservoir-size", self.reservoir_size)
        obs = self.model.obs_dim + len(self.scenario_tasks)   # with the one-hot task identity
        slot_bytes = 4 * (2 * obs + self.actions.dim + 3) + 8   # x, next x, action, reward, done; t
        return buffer_slots(flag, asked, fills, slot_bytes, torch.device("cpu"))   # numpy, on the host

    def _new_buffer(self) -> ReplayBuffer:
        return ReplayBuffer(self.buffer_size(), self.reservoir_size is not None, self.generator)

    def _train(self, task: Task) -> Iterator[SACBatch]:
        o, m = self.o, self.model
        if self.ledger is not None:
            self.ledger.raw(task.dataset_id, "SAC replay buffer (raw transitions re-read by every update)")
        if self.buffer is None or not self._buffer_spans_tasks():
            self.buffer = self._new_buffer()
        if o.sac_reset_critic and task.index > 0:
            for critic in (m.critic1, m.critic2):
                for module in critic.modules():
                    if isinstance(module, nn.Linear):
                        nn.init.xavier_uniform_(module.weight)
                        nn.init.zeros_(module.bias)
                    elif isinstance(module, nn.LayerNorm):
                        module.reset_parameters()
            m.sync_targets()
        env = task.env.make(True)
        rng = np.random.default_rng(int(torch.randint(0, 2**31, (), generator=self.generator)))
        self._task_start = (self.env_steps, time.perf_counter())
        explore_with_policy = o.sac_policy_exploration and task.index > 0
        try:
            obs, _ = env.reset(seed=self._fresh_seed())
            episode_return = 0.0
            for step in range(o.sac_steps):
                if step > o.sac_start_steps or explore_with_policy:
                    action = self.act(obs, task.index, deterministic=False)
                else:
                    action = rng.uniform(self.actions.low, self.actions.high).astype(np.float32)
                next_obs, reward, terminated, truncated, info = env.step(action)
                episode_return += reward
                self.env_steps += 1
                self.buffer.store(obs, action, reward, next_obs, float(terminated), task.index)
                obs = next_obs
                if terminated or truncated:
                    self._remember(episode_return, info.get("episode_success", False))
                    episode_return = 0.0
                    obs, _ = env.reset(seed=self._fresh_seed())
                if step >= o.sac_update_after and step % o.sac_update_every == 0:
                    for _ in range(o.sac_update_every):
                        yield self.buffer.sample(self.batch_size, self.device)
                if (step + 1) % o.sac_eval_every == 0 or step + 1 == o.sac_steps:
                    self._evaluate_all(task, step + 1)
        finally:
            env.close()

    def _fresh_seed(self) -> int:
        return int(torch.randint(0, EVAL_SEED_BASE, (), generator=self.generator))

    def _remember(self, episode_return: float, success: bool) -> None:
        for key, value in (("episode_return", episode_return), ("train_success", float(success))):
            self.recent[key] = (self.recent[key] + [value])[-20:]

    @torch.no_grad()
    def act(self, obs: np.ndarray, task_index: int, deterministic: bool, generator=None) -> np.ndarray:
        out = self.model.policy(torch.as_tensor(obs, device=self.device)[None], task_index).cpu()
        action = self.actions.mode(out) if deterministic else self.actions.rsample(out, generator or self.generator)[0]
        return action[0].numpy()

    # -- objective
    def forward(self, batch: SACBatch) -> tuple[torch.Tensor, torch.Tensor]:
        """Per-transition actor + critic + α losses (their mean is CW's update objective)."""
        o, m = self.o, self.model
        out = m.policy(batch.x, batch.t)
        action, logp = self.actions.rsample(out, self.generator)
        log_alpha = m.log_alpha[batch.t] if o.sac_alpha == 0 else torch.full_like(logp, math.log(o.sac_alpha))
        alpha = log_alpha.detach().exp()
        x = m.inputs(batch.x)
        q1, q2 = m.critic1(x, batch.y, batch.t), m.critic2(x, batch.y, batch.t)
        with torch.no_grad():
            next_action, next_logp = self.actions.rsample(m.policy(batch.next_x, batch.t), self.generator)
            nx = m.inputs(batch.next_x)
            target = torch.min(m.target1(nx, next_action, batch.t), m.target2(nx, next_action, batch.t))
            backup = batch.reward + o.sac_gamma * (1 - batch.done) * (target - alpha * next_logp)
        frozen = [{n: p.detach() for n, p in c.named_parameters()} for c in (m.critic1, m.critic2)]
        q_pi = torch.min(functional_call(m.critic1, frozen[0], (x, action, batch.t)),
                         functional_call(m.critic2, frozen[1], (x, action, batch.t)))
        pi_loss = alpha * logp - q_pi
        q_loss = 0.5 * (backup - q1).pow(2) + 0.5 * (backup - q2).pow(2)
        losses = pi_loss + q_loss
        if o.sac_alpha == 0:
            losses = losses - log_alpha * (logp + self.actions.target_entropy(o.sac_target_output_std)).detach()
        self._stats = {"pi_loss": pi_loss.detach().mean(), "q_loss": q_loss.detach().mean(),
                       "log_pi": logp.detach().mean(), "alpha": alpha.mean()}
        return losses, out

    def step_metrics(self) -> dict:
        steps, since = self._task_start
        out = {"env_steps": self.env_steps,
               "env_steps_per_sec": (self.env_steps - steps) / max(time.perf_counter() - since, 1e-9),
               **self._stats}
        out.update({k: float(np.mean(v)) for k, v in self.recent.items() if v})
        if self.curve:   # the latest evaluation while training (every task's stochastic success, mean)
            out["eval_success"] = float(np.mean(self.curve[-1]["success_rate"]))
        return out

    def _buffer_spans_tasks(self) -> bool:
        return self.reservoir_size is not None or not self.o.sac_reset_buffer

    def state_dict(self) -> dict:
        """Running figures, and the replay buffer where it spans tasks (reservoir, or never reset):
        a resumed run then draws from the same transitions."""
        state = {"env_steps": self.env_steps, "recent": {k: list(v) for k, v in self.recent.items()}}
        b = self.buffer
        if self._buffer_spans_tasks() and b is not None and b.columns is not None:
            state["buffer"] = {"seen": b.seen, "count": b.count,
                               "columns": {k: torch.from_numpy(v[:b.count].copy()) for k, v in b.columns.items()}}
        return state

    def load_state_dict(self, state: dict) -> None:
        self.env_steps, self.recent = state["env_steps"], {k: list(v) for k, v in state["recent"].items()}
        if "buffer" in state:
            saved = state["buffer"]
            self.buffer = self._new_buffer()
            for k, v in saved["columns"].items():
                if self.buffer.columns is None:
                    self.buffer.columns = {}
                column = np.empty((self.buffer.size, *v.shape[1:]), v.numpy().dtype)
                column[:saved["count"]] = v.numpy()
                self.buffer.columns[k] = column
            self.buffer.seen, self.buffer.count = saved["seen"], saved["count"]

    # -- evaluation
    def _eval_env(self, task: Task):
        if task.index not in self._eval_envs:
            self._eval_envs[task.index] = task.env.make(False)
        return self._eval_envs[task.index]

    @torch.no_grad()
    def episodes(self, task: Task, n: int, deterministic: bool, offset: int = 0) -> tuple[np.ndarray, np.ndarray]:
        """Returns and successes of n evaluation episodes of `task` on fixed seeds."""
        env = self._eval_env(task)
        gen = torch.Generator().manual_seed(task.index)   # evaluation never moves training's RNG
        returns, successes = np.zeros(n), np.zeros(n)
        for k, seed in enumerate(eval_seeds(task.index, offset + n)[offset:]):
            obs, _ = env.reset(seed=seed)
            done, info = False, {}
            while not done:
                obs, reward, terminated, truncated, info = env.step(self.act(obs, task.index, deterministic, gen))
                returns[k] += reward
                done = terminated or truncated
            successes[k] = float(info.get("episode_success", False))
        return returns, successes

    def evaluate(self, task: Task) -> float:
        """The stochastic policy's success rate (CW's test/stochastic success); returns and the
        deterministic episodes' figures go to `score_details` (or to the evaluation curve)."""
        o = self.o
        returns, successes = self.episodes(task, o.sac_eval_episodes, deterministic=False)
        figures = {"success_rate": float(successes.mean()), "return_raw": float(returns.mean())}
        if o.sac_eval_deterministic:
            r, s = self.episodes(task, o.sac_eval_deterministic, True, offset=o.sac_eval_episodes)
            figures.update(success_deterministic=float(s.mean()), return_deterministic=float(r.mean()))
        target = self.details if self._curve_point is None else self._curve_point
        for key, value in figures.items():
            target.setdefault(key, []).append(value)
        return figures["success_rate"]

    def _evaluate_all(self, task: Task, step: int) -> None:
        """One point of the evaluation curve: every task evaluated through `self.evaluate`, which a
        strategy may have replaced (PackNet's task views), as CW's on_test_start does."""
        tasks = self.scenario_tasks
        was_training = self.model.training
        self.model.eval()
        self._curve_point = {}
        try:
            for t in tasks:
                self.evaluate(t)
        finally:
            point, self._curve_point = self._curve_point, None
            self.model.train(was_training)
        self.curve.append({"task": task.index, "task_step": step, "env_steps": self.env_steps, **point})

    def evaluation_curve(self) -> list[dict]:
        """The evaluations made while training since the last call, then forgets them."""
        curve, self.curve = self.curve, []
        return curve

    def score_details(self) -> dict[str, list[float]]:
        details, self.details = self.details, {}
        return details

    # -- what strategies need
    def fisher_pool(self, task: Task) -> int:
        return self.buffer.count if self.buffer is not None else 0

    def task_sample(self, task: Task, n: int) -> SACBatch:
        """n transitions of `task` drawn from the replay buffer (the reservoir's hold every task)."""
        if self.buffer is None or not self.buffer.count:
            raise RuntimeError(f"no transitions of task {task.index}: it was not trained yet")
        rows = np.flatnonzero(self.buffer.columns["t"][:self.buffer.count] == task.index)
        pick = torch.from_numpy(rows)[torch.randint(0, len(rows), (n,), generator=self.generator)].numpy()
        c = self.buffer.columns
        return SACBatch(*(torch.from_numpy(c[key][pick]) for key in ("x", "y", "t")), torch.from_numpy(pick),
                        *(torch.from_numpy(c[key][pick]) for key in ("reward", "next_x", "done")))

    def fisher_pool(self, task: Task) -> int:
        return self.buffer.count if self.buffer is not None else 0

    def fisher_batches(self, task: Task, n: int, empirical: bool) -> Iterator[tuple]:
        """States (and the actions taken) of the task from the replay buffer, as CW's importance
        weights use (10 batches of 256 drawn from the buffer at the task's end)."""
        batch = self.task_sample(task, n)
        for chunk in torch.arange(n).split(self.batch_size):
            yield batch.x[chunk].to(self.device), batch.y[chunk].to(self.device) if empirical else None, task.index

    #: the batches `forward` takes (A-GEM rebuilds its memory's batches with it)
    batch_type = SACBatch

    def memory_sample(self, task: Task, k: int) -> SACBatch:
        """k transitions of the task just trained, from the replay buffer (A-GEM's episodic memory)."""
        return self.task_sample(task, k)

    def logits(self, x, t) -> torch.Tensor:
        return self.model.policy(x, t)

    def log_prob(self, out, y) -> torch.Tensor:
        return self.actions.log_prob(out, y)

    def sample_targets(self, out) -> torch.Tensor:
        return self.actions.rsample(out.detach(), self.generator)[0]

    def mas_squared_norm(self, weights: dict, x: torch.Tensor, a: torch.Tensor, t) -> torch.Tensor:
        """CW's MAS output norm of one state (methods/mas.py): ‖μ‖² + ‖log σ‖² of the actor plus
        Q1² + Q2² at the stored action; each network's weights get only their own term's gradient."""
        m = self.model
        total = functional_call(m, weights, (x[None], t)).square().sum()
        for critic in ("critic1", "critic2"):
            own = {k.split(".", 1)[1]: v for k, v in weights.items() if k.startswith(critic + ".")}
            total = total + functional_call(getattr(m, critic), own, (m.inputs(x[None]), a[None], t)).square().sum()
        return total

    def gaussian_fisher(self, task: Task, names: list[str], n: int) -> dict[str, torch.Tensor]:
        """CW's EWC Fisher (methods/ewc.py): for actor weights, per state
        Σ_j [(∂μ_j/∂θ)² + 2(∂σ_j/∂θ)²] / (σ_j² + 1e-6), the exact Fisher of the pre-tanh Gaussian
        in (μ, σ), clipped below at 1e-5 and averaged over states; for critic weights (with
        sac_regularize_critic) (∂Q/∂θ)² of each critic at the stored action. States from the
        task's transitions in the replay buffer; per-state Jacobians by torch.func."""
        from torch.func import jacrev, vmap
        m = self.model
        params = {k: v.detach() for k, v in m.named_parameters()}
        buffers = dict(m.named_buffers())
        actor = [k for k in names if k.startswith(("trunk.", "heads."))]
        critics = {c: [k for k in names if k.startswith(c + ".")] for c in ("critic1", "critic2")}
        total = {k: torch.zeros_like(params[k]) for k in names}
        count, t = 0, task.index

        def mean_std(free, x):
            out = functional_call(m, {**params, **free, **buffers}, (x[None], t))[0]
            mean, log_std = out.chunk(2, -1)
            return torch.cat([mean, log_std.exp()])

        def q_value(free, critic, x, a):
            sub = {k.split(".", 1)[1]: v for k, v in {**params, **free}.items() if k.startswith(critic + ".")}
            return functional_call(getattr(m, critic), sub, (m.inputs(x[None]), a[None], t))[0]

        was_training = m.training
        m.eval()
        try:
            for x, a, _ in self.fisher_batches(task, n, True):
                for chunk in torch.arange(len(x)).split(32):
                    xs, acts = x[chunk], a[chunk]
                    if actor:
                        jac = vmap(jacrev(mean_std), in_dims=(None, 0))({k: params[k] for k in actor}, xs)
                        with torch.no_grad():
                            std = m.policy(xs, t).chunk(2, -1)[1].exp()   # [B, d]
                        d = std.shape[1]
                        for k in actor:
                            j = jac[k]                                        # [B, 2d, *shape]
                            inv = 1.0 / (std.reshape(len(xs), d, *[1] * (j.dim() - 2)) ** 2 + 1e-6)
                            total[k] += (inv * (j[:, :d] ** 2 + 2 * j[:, d:] ** 2)).sum(1).clamp_min(1e-5).sum(0)
                    for critic, keys in critics.items():
                        if keys:
                            g = vmap(jacrev(lambda f, x_, a_: q_value(f, critic, x_, a_)), in_dims=(None, 0, 0))(
                                {k: params[k] for k in keys}, xs, acts)
                            for k in keys:
                                total[k] += g[k].pow(2).sum(0)
                    count += len(xs)
        finally:
            m.train(was_training)
        return {k: v / max(count, 1) for k, v in total.items()}
