"""Environments of RL tasks: what a task carries (`EnvTask`), vectorised envs, evaluation
episodes on fixed seeds, and the random-policy normaliser."""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable

import gymnasium as gym
import numpy as np
from gymnasium.vector import AutoresetMode, SyncVectorEnv

from clsim.rl.models import action_distribution

# Training envs are seeded below this from --seed; evaluation seeds are fixed at and above it,
# so evaluation episodes never coincide with training ones.
EVAL_SEED_BASE = 10**9



@dataclass
class EnvTask:
    """What an RL Task carries in `task.env`."""
    make: Callable[[bool], gym.Env]   # make(train) -> one wrapped env (train=False: evaluation)
    reference_return: float           # the known ceiling (or a human score) for normalisation
    random_return: float = math.nan   # mean return of uniform random actions on the eval seeds
    success_above: float | None = None  # an episode with a larger return counts as a success


def make_vector_env(env_task: EnvTask, n: int, train: bool) -> SyncVectorEnv:
    return SyncVectorEnv([lambda: env_task.make(train) for _ in range(n)],
                         autoreset_mode=AutoresetMode.SAME_STEP)


def run_episodes(env_task: EnvTask, seeds: list[int], act: Callable[[np.ndarray], np.ndarray]
                 ) -> np.ndarray:
    """Return of one episode per seed, all run side by side; `act(obs batch) -> actions`."""
    envs = make_vector_env(env_task, len(seeds), train=False)
    try:
        obs, _ = envs.reset(seed=list(seeds))
        returns = np.zeros(len(seeds))
        running = np.ones(len(seeds), dtype=bool)
        while running.any():
            obs, reward, terminated, truncated, _ = envs.step(act(obs))
            returns += reward * running
            running &= ~(terminated | truncated)
        return returns
    finally:
        envs.close()


def eval_seeds(task_index: int, episodes: int) -> list[int]:
    return [EVAL_SEED_BASE + 10_000 * task_index + k for k in range(episodes)]


def random_policy_return(env_task: EnvTask, seeds: list[int]) -> float:
    """Mean return of uniformly random actions (seeded, so the normaliser is reproducible)."""
    rng = np.random.default_rng(0)
    actions = action_distribution(env_task.make(False).action_space)
    return float(run_episodes(env_task, seeds, lambda obs: actions.uniform(rng, len(obs))).mean())


def normalised(raw: float, env_task: EnvTask) -> float:
    return (raw - env_task.random_return) / (env_task.reference_return - env_task.random_return)
