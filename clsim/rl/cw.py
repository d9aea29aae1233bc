"""Continual World (Wołczyk et al., NeurIPS 2021) on Meta-World 3: task sequences and environments.

Continual World's code (github.com/awarelab/continual_world: continualworld/envs.py, tasks.py,
utils/wrappers.py) builds each task from Meta-World v1's MT50 with random initial object and goal
positions on every reset (`random_init_all`), appends a one-hot task identity to the observation
(`OneHotAdder`), limits episodes to 200 steps (`TimeLimit`) and counts an episode a success if
`info["success"]` was ever true in it (`SuccessCounter`). clsim does the same on Meta-World 3's
`-v3` environments, goal observable as MT50's tasks are, with gymnasium's API. Differences:

- Meta-World 3 (MuJoCo 3, reward function v2, 39-dimensional observations) is not Meta-World v1
  (mujoco-py, 12-dimensional observations in CW's models): figures are not directly comparable
  with CW's published ones (its authors report v2 already gives "really different results").
- Randomness: CW draws the positions from numpy's global generator; clsim seeds each episode
  (training seeds from --seed, evaluation seeds fixed and disjoint), so runs repeat exactly.
- The one-hot has one entry per task of the sequence, as CW's; CW20 repeats CW10, so task k and
  task k+10 are the same environment with different identities (as in CW).
"""
from __future__ import annotations

from typing import Any

import gymnasium as gym
import numpy as np

from clsim.errors import UserError

EPISODE_STEPS = 200   # CW's META_WORLD_TIME_HORIZON

# CW's CW10 order (continualworld/tasks.py), on the v3 environments.
CW10 = ["hammer-v3", "push-wall-v3", "faucet-close-v3", "push-back-v3", "stick-pull-v3",
        "handle-press-side-v3", "push-v3", "shelf-place-v3", "window-close-v3", "peg-unplug-side-v3"]
SEQUENCES = {
    "cw10": CW10,
    "cw20": CW10 + CW10,
    # Short sequences for quick work, in the spirit of CW's transfer "triplets" (pairs and triplets
    # of tasks): easy tasks first, so a few thousand steps show learning and forgetting.
    "triplet_easy": ["reach-v3", "window-close-v3", "button-press-topdown-v3"],
    "triplet_push": ["push-v3", "window-close-v3", "push-wall-v3"],
    "pair_reach": ["reach-v3", "reach-wall-v3"],
}


def metaworld_names() -> list[str]:
    """The environment names the installed Meta-World offers, or a one-line UserError naming the extra."""
    try:
        from metaworld.env_dict import ALL_V3_ENVIRONMENTS
    except ImportError as exc:
        raise UserError(f"Continual World needs Meta-World 3 and MuJoCo ({exc.name} is missing): "
                        f"pip install 'clsim[rl]'") from None
    return list(ALL_V3_ENVIRONMENTS)


def check_names(names: list[str], option: str) -> None:
    known = metaworld_names()
    for name in names:
        if name not in known:
            close = [k for k in known if k.split("-v")[0] == name.split("-v")[0]]
            hint = f"; did you mean {close[0]}?" if close else "; see metaworld.env_dict.ALL_V3_ENVIRONMENTS"
            raise UserError(f"{option}: {name!r} is not a task of the installed Meta-World{hint}")


class MetaWorldTask(gym.Wrapper):
    """One CW task: random positions on every reset (seeded by reset's seed), the one-hot task
    identity appended to the observation, `info["success"]` kept per episode as
    `info["episode_success"]` (CW's SuccessCounter: ever successful in the episode)."""

    def __init__(self, name: str, one_hot_index: int, one_hot_len: int):
        from metaworld.env_dict import ALL_V3_ENVIRONMENTS_GOAL_OBSERVABLE
        env = ALL_V3_ENVIRONMENTS_GOAL_OBSERVABLE[f"{name}-goal-observable"](seed=0)
        env._freeze_rand_vec = False   # CW's random_init_all
        env.seeded_rand_vec = True     # positions from env.np_random, which reset(seed=) seeds
        super().__init__(env)
        self.one_hot = np.zeros(one_hot_len, dtype=np.float32)
        self.one_hot[one_hot_index] = 1.0
        low = env.observation_space.low.astype(np.float32)
        high = env.observation_space.high.astype(np.float32)
        self.observation_space = gym.spaces.Box(np.concatenate([low, np.zeros(one_hot_len, np.float32)]),
                                                np.concatenate([high, np.ones(one_hot_len, np.float32)]),
                                                dtype=np.float32)
        self.success = False

    def _obs(self, obs: np.ndarray) -> np.ndarray:
        return np.concatenate([obs.astype(np.float32), self.one_hot])

    def reset(self, *, seed: int | None = None, options: dict | None = None) -> tuple[np.ndarray, dict[str, Any]]:
        if seed is not None:
            self.env.unwrapped.seed(seed)   # Meta-World's reset ignores its seed argument
        self.success = False
        obs, info = self.env.reset()
        return self._obs(obs), info

    def step(self, action):
        obs, reward, terminated, truncated, info = self.env.step(action)
        self.success = self.success or bool(info.get("success", 0.0))
        info["episode_success"] = self.success
        return self._obs(obs), float(reward), terminated, truncated, info


def make_task_env(name: str, one_hot_index: int, one_hot_len: int) -> gym.Env:
    """The environment of one CW task: MetaWorldTask under a 200-step TimeLimit."""
    return gym.wrappers.TimeLimit(MetaWorldTask(name, one_hot_index, one_hot_len), EPISODE_STEPS)
