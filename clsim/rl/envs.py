"""Environments of RL tasks: what a task carries (`EnvTask`), vectorised envs, evaluation
episodes on fixed seeds, and the random-policy normaliser."""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable

import gymnasium as gym
import numpy as np
from gymnasium.vector import AutoresetMode, SyncVectorEnv

from clsim.errors import UserError
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


def parse_variant(text: str, flags: tuple[str, ...], physics: tuple[str, ...], option: str
                  ) -> tuple[set[str], dict[str, float]]:
    """One task of a variant stream, modifiers joined by '+': 'swap+length=1.0' -> ({'swap'},
    {'length': 1.0}), each flag among `flags`, each physics key among `physics` with a positive
    value; anything else is a UserError naming the `option`."""
    found, values = set(), {}
    for part in text.strip().split("+"):
        key, _, value = part.strip().partition("=")
        if not value and key in flags:
            found.add(key)
        elif key in physics and value:
            try:
                number = float(value)
            except ValueError:
                number = float("nan")
            if not np.isfinite(number) or number <= 0:
                raise UserError(f"{option}: {key} must be a positive number, got {value!r}")
            values[key] = number
        else:
            raise UserError(f"{option}: unknown modifier {part!r} in {text!r}; use "
                            f"{', '.join(flags)} or {'/'.join(physics)}=value")
    return found, values


def variant_names(spec: str, presets: dict[str, str], option: str) -> list[str]:
    """The task names of a preset or of a comma-separated stream."""
    names = [part.strip() for part in presets.get(spec, spec).split(",")]
    if not all(names):
        raise UserError(f"{option} {spec!r} has an empty task; separate tasks with ','")
    return names
