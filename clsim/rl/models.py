"""Actor-critic networks for PPO: trunks (MLP, Nature CNN) and per-slot policy and value heads."""
from __future__ import annotations

import math

import torch
from torch import nn


def mlp_trunk(in_features: int, hidden: int) -> nn.Sequential:
    """Two tanh layers (the usual PPO MLP); `out_features` is set for the heads."""
    trunk = nn.Sequential(nn.Flatten(), nn.Linear(in_features, hidden), nn.Tanh(),
                          nn.Linear(hidden, hidden), nn.Tanh())
    trunk.out_features = hidden
    return trunk


def nature_cnn_trunk(in_channels: int = 4) -> nn.Sequential:
    """The DQN/PPO Atari CNN for 84x84 frames (uint8 scaled in `ActorCritic.forward`)."""
    trunk = nn.Sequential(nn.Conv2d(in_channels, 32, 8, 4), nn.ReLU(), nn.Conv2d(32, 64, 4, 2), nn.ReLU(),
                          nn.Conv2d(64, 64, 3, 1), nn.ReLU(), nn.Flatten(), nn.Linear(3136, 512), nn.ReLU())
    trunk.out_features = 512
    return trunk


class ActorCritic(nn.Module):
    """A shared trunk and, per head slot, a policy head (`heads.k`) and a value head
    (`critics.k`): one slot per task in task_il, a single shared slot otherwise."""

    def __init__(self, trunk: nn.Module, n_actions: int, n_slots: int, input_scale: float = 1.0):
        super().__init__()
        self.trunk, self.input_scale = trunk, input_scale
        width = trunk.out_features
        self.heads = nn.ModuleList(nn.Linear(width, n_actions) for _ in range(n_slots))
        self.critics = nn.ModuleList(nn.Linear(width, 1) for _ in range(n_slots))
        # Orthogonal init, small policy outputs: a near-uniform initial policy (standard PPO).
        for m in self.trunk.modules():
            if isinstance(m, (nn.Linear, nn.Conv2d)):
                nn.init.orthogonal_(m.weight, math.sqrt(2))
                nn.init.zeros_(m.bias)
        for layer, gain in [(h, 0.01) for h in self.heads] + [(c, 1.0) for c in self.critics]:
            nn.init.orthogonal_(layer.weight, gain)
            nn.init.zeros_(layer.bias)

    def _select(self, layers: nn.ModuleList, features, t):
        if len(layers) == 1:
            return layers[0](features)
        if isinstance(t, int):
            return layers[t](features)
        if bool((t == t[0]).all()):
            return layers[int(t[0])](features)
        every = torch.stack([layer(features) for layer in layers], 1)   # mixed tasks (e.g. replay)
        return every[torch.arange(len(t)), t]

    def features(self, x):
        return self.trunk(x.float() * self.input_scale)

    def policy(self, x, t=0) -> torch.Tensor:
        return self._select(self.heads, self.features(x), t)

    def forward(self, x, t=0) -> tuple[torch.Tensor, torch.Tensor]:
        """(action logits, state value)."""
        f = self.features(x)
        return self._select(self.heads, f, t), self._select(self.critics, f, t).squeeze(-1)
