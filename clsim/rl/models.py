"""Actor-critic networks for PPO: trunks (MLP, Nature CNN), per-slot policy and value heads, and
the action distribution behind one object (`Categorical` for Discrete, `DiagGaussian` for Box).

Initialisation, as in CleanRL's ppo.py / ppo_continuous_action.py and the BLIP authors' RL code
(`RL/rl_module/ppo_model.py`, from pytorch-a2c-ppo-acktr): orthogonal weights with gain √2 in the
trunks, 0.01 in the policy heads (a near-uniform, or near-zero-mean, initial policy) and 1 in the
value heads; every bias zero; a Gaussian policy's state-independent log-std starts at 0.
Differences from the BLIP code: its MLP policy builds a separate critic trunk but its value heads
read the actor's features (the critic trunk is computed and unused); clsim's MLP critic has its own
trunk, as CleanRL's. Its Atari trunk is 32-64-128 channels and 1024 units; clsim uses the Nature
CNN (32-64-64, 512), shared by actor and critic as in CleanRL's Atari PPO.
"""
from __future__ import annotations

import math

import gymnasium as gym
import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from clsim.errors import UserError


def _orthogonal(layer: nn.Module, gain: float) -> nn.Module:
    nn.init.orthogonal_(layer.weight, gain)
    nn.init.zeros_(layer.bias)
    return layer


def mlp_trunk(in_features: int, hidden: int) -> nn.Sequential:
    """Two tanh layers (the usual PPO MLP); `out_features` is set for the heads."""
    trunk = nn.Sequential(nn.Flatten(), nn.Linear(in_features, hidden), nn.Tanh(),
                          nn.Linear(hidden, hidden), nn.Tanh())
    trunk.out_features = hidden
    return trunk


def nature_cnn_trunk(in_channels: int = 4) -> nn.Sequential:
    """The DQN/PPO Atari CNN for 84x84 frames (uint8 scaled in `ActorCritic.features`)."""
    trunk = nn.Sequential(nn.Conv2d(in_channels, 32, 8, 4), nn.ReLU(), nn.Conv2d(32, 64, 4, 2), nn.ReLU(),
                          nn.Conv2d(64, 64, 3, 1), nn.ReLU(), nn.Flatten(), nn.Linear(3136, 512), nn.ReLU())
    trunk.out_features = 512
    return trunk


# ---------------------------------------------------------------- action distributions
# A policy head's output `out` is all a distribution needs; every method works row-wise, so the
# Fisher code can call `log_prob` under torch.func.vmap.

class Categorical:
    """Discrete(n) actions: the head gives n logits."""

    def __init__(self, n: int):
        self.n = n

    def head(self, width: int) -> nn.Module:
        return _orthogonal(nn.Linear(width, self.n), 0.01)

    def log_prob(self, out: torch.Tensor, action: torch.Tensor) -> torch.Tensor:
        return F.log_softmax(out, -1).gather(-1, action.long().unsqueeze(-1)).squeeze(-1)

    def entropy(self, out: torch.Tensor) -> torch.Tensor:
        logp = F.log_softmax(out, -1)
        return -(logp.exp() * logp).sum(-1)

    def sample(self, out: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
        return torch.multinomial(F.softmax(out, -1), 1, generator=generator).squeeze(-1)

    def mode(self, out: torch.Tensor) -> torch.Tensor:
        return out.argmax(-1)

    def to_env(self, action: torch.Tensor) -> np.ndarray:
        return action.numpy()

    def uniform(self, rng: np.random.Generator, n: int) -> np.ndarray:
        return rng.integers(0, self.n, n)


class GaussianHead(nn.Module):
    """The mean of a diagonal Gaussian policy and its state-independent log-std (CleanRL's
    `actor_logstd`); the output is [mean, log_std] so heads of mixed tasks stack like logits."""

    def __init__(self, width: int, dim: int):
        super().__init__()
        self.mean = _orthogonal(nn.Linear(width, dim), 0.01)
        self.log_std = nn.Parameter(torch.zeros(dim))

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        mean = self.mean(features)
        return torch.cat([mean, self.log_std.expand_as(mean)], -1)


class DiagGaussian:
    """Box actions (flat, bounded): a diagonal Gaussian, sampled unbounded and clipped to the box
    only when sent to the env (as CleanRL's ClipAction), so the log-probability stays exact."""

    def __init__(self, low: np.ndarray, high: np.ndarray):
        self.low, self.high = low.astype(np.float32), high.astype(np.float32)
        self.dim = len(low)

    def head(self, width: int) -> nn.Module:
        return GaussianHead(width, self.dim)

    def _split(self, out: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return out[..., :self.dim], out[..., self.dim:]

    def log_prob(self, out: torch.Tensor, action: torch.Tensor) -> torch.Tensor:
        mean, log_std = self._split(out)
        z = (action - mean) * torch.exp(-log_std)
        return (-0.5 * z.pow(2) - log_std - 0.5 * math.log(2 * math.pi)).sum(-1)

    def entropy(self, out: torch.Tensor) -> torch.Tensor:
        return (self._split(out)[1] + 0.5 + 0.5 * math.log(2 * math.pi)).sum(-1)

    def sample(self, out: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
        mean, log_std = self._split(out)
        noise = torch.randn(mean.shape, generator=generator, dtype=mean.dtype)
        return mean + log_std.exp() * noise.to(mean.device)

    def mode(self, out: torch.Tensor) -> torch.Tensor:
        return self._split(out)[0]

    def to_env(self, action: torch.Tensor) -> np.ndarray:
        return np.clip(action.numpy(), self.low, self.high)

    def uniform(self, rng: np.random.Generator, n: int) -> np.ndarray:
        return rng.uniform(self.low, self.high, (n, self.dim)).astype(np.float32)


class TanhGaussian:
    """Box actions for SAC (Continual World's MlpActor): a diagonal Gaussian over pre-squash
    actions, squashed by tanh and scaled to the box's bound (every dimension must share one
    bound, as CW assumes). `out` is [mean, log-std]; `rsample` is reparameterised (gradients flow
    to the mean and log-std) and gives the squashed action's log-probability with the tanh
    correction in its stable form 2(log 2 - u - softplus(-2u))."""

    def __init__(self, low: np.ndarray, high: np.ndarray):
        self.low, self.high = low.astype(np.float32), high.astype(np.float32)
        if not (np.all(self.high == self.high[0]) and np.all(self.low == -self.high)):
            raise UserError(f"SAC's tanh policy needs a box symmetric about 0 with one bound for every "
                            f"dimension, not [{low}, {high}]")
        self.dim, self.scale = len(low), float(self.high[0])

    def _split(self, out: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return out[..., :self.dim], out[..., self.dim:]

    @staticmethod
    def _gaussian(u, mean, log_std) -> torch.Tensor:
        z = (u - mean) * torch.exp(-log_std)
        return (-0.5 * z.pow(2) - log_std - 0.5 * math.log(2 * math.pi)).sum(-1)

    @staticmethod
    def _squash_correction(u) -> torch.Tensor:
        return (2 * (math.log(2) - u - F.softplus(-2 * u))).sum(-1)

    def rsample(self, out: torch.Tensor, generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
        mean, log_std = self._split(out)
        noise = torch.randn(mean.shape, generator=generator, dtype=mean.dtype).to(mean.device)
        u = mean + log_std.exp() * noise
        return torch.tanh(u) * self.scale, self._gaussian(u, mean, log_std) - self._squash_correction(u)

    def log_prob(self, out: torch.Tensor, action: torch.Tensor) -> torch.Tensor:
        mean, log_std = self._split(out)
        u = torch.atanh((action / self.scale).clamp(-1 + 1e-6, 1 - 1e-6))
        return self._gaussian(u, mean, log_std) - self._squash_correction(u)

    def mode(self, out: torch.Tensor) -> torch.Tensor:
        return torch.tanh(self._split(out)[0]) * self.scale

    def target_entropy(self, std: float) -> float:
        """CW's target: the entropy of a Gaussian with `std` in every dimension."""
        return self.dim * math.log(std * math.sqrt(2 * math.pi * math.e))

    def to_env(self, action: torch.Tensor) -> np.ndarray:
        return action.numpy()

    def uniform(self, rng: np.random.Generator, n: int) -> np.ndarray:
        return rng.uniform(self.low, self.high, (n, self.dim)).astype(np.float32)


def action_distribution(space: gym.Space) -> Categorical | DiagGaussian:
    """The distribution for an env's action space, or a one-line UserError."""
    if isinstance(space, gym.spaces.Discrete):
        return Categorical(int(space.n))
    if isinstance(space, gym.spaces.Box) and len(space.shape) == 1 and space.is_bounded("both"):
        return DiagGaussian(space.low, space.high)
    raise UserError(f"PPO supports Discrete and bounded 1-D Box action spaces, not {space}")


# ---------------------------------------------------------------- the network

class ActorCritic(nn.Module):
    """A policy trunk (`trunk`) and a value trunk (`critic_trunk`; None: the critic reads the
    policy trunk's features, for CNNs), and, per head slot, a policy head (`heads.k`) and a value
    head (`critics.k`): one slot per task in task_il, a single shared slot otherwise."""

    def __init__(self, trunk: nn.Module, actions: Categorical | DiagGaussian, n_slots: int,
                 input_scale: float = 1.0, critic_trunk: nn.Module | None = None):
        super().__init__()
        self.trunk, self.critic_trunk, self.input_scale, self.actions = trunk, critic_trunk, input_scale, actions
        for m in [*trunk.modules(), *(critic_trunk.modules() if critic_trunk is not None else [])]:
            if isinstance(m, (nn.Linear, nn.Conv2d)):
                _orthogonal(m, math.sqrt(2))
        self.heads = nn.ModuleList(actions.head(trunk.out_features) for _ in range(n_slots))
        width = (trunk if critic_trunk is None else critic_trunk).out_features
        self.critics = nn.ModuleList(_orthogonal(nn.Linear(width, 1), 1.0) for _ in range(n_slots))

    def _select(self, layers: nn.ModuleList, features, t):
        if len(layers) == 1:
            return layers[0](features)
        if isinstance(t, int):
            return layers[t](features)
        if bool((t == t[0]).all()):
            return layers[int(t[0])](features)
        every = torch.stack([layer(features) for layer in layers], 1)   # mixed tasks (e.g. replay)
        return every[torch.arange(len(t)), t]

    def _scaled(self, x):
        return x.float() * self.input_scale

    def policy(self, x, t=0) -> torch.Tensor:
        """The policy head's output (logits, or Gaussian mean and log-std) for `self.actions`."""
        return self._select(self.heads, self.trunk(self._scaled(x)), t)

    def forward(self, x, t=0) -> tuple[torch.Tensor, torch.Tensor]:
        """(policy head output, state value)."""
        x = self._scaled(x)
        f = self.trunk(x)
        g = f if self.critic_trunk is None else self.critic_trunk(x)
        return self._select(self.heads, f, t), self._select(self.critics, g, t).squeeze(-1)
