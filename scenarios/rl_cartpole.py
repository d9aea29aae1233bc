"""cartpole: CartPole-v1 variants that interfere (swapped actions, negated or permuted
observations, changed physics), learned one after the other by PPO."""
from __future__ import annotations

from dataclasses import dataclass

import gymnasium as gym
import numpy as np
from gymnasium.wrappers import TransformAction, TransformObservation

from clsim.config import opt, redefault
from clsim.errors import UserError
from clsim.rl import EnvTask, PPOOptions, mlp_trunk, rl_scenario
from clsim.registry import register_scenario

PRESETS = {
    # Same physics, opposite action meaning: a shared head must unlearn task 0 to learn task 1.
    "conflict": "default,swap",
    # Every kind of change, each task a new combination.
    "mixed": "default,swap+perm,neg+length=1.0,masspole=0.5+swap",
}
PHYSICS = ("gravity", "masscart", "masspole", "length", "force_mag")
FLAGS = ("default", "swap", "neg", "perm")
HELP = ("a preset (" + ", ".join(f"{k}: {v}" for k, v in PRESETS.items()) + ") or comma-separated "
        "tasks, each modifiers joined by '+': default, swap (actions), neg (observations negated), "
        "perm (observation order reversed), and physics " + "/".join(PHYSICS) + "=value")


@dataclass
class CartPoleOptions(PPOOptions):
    cartpole_tasks: str = opt("conflict", HELP)
    ppo_timesteps: int = redefault(PPOOptions, "ppo_timesteps", 50_000)


def parse_task(text: str) -> tuple[set[str], dict[str, float]]:
    """'swap+length=1.0' -> ({'swap'}, {'length': 1.0}); raises UserError on anything else."""
    flags, physics = set(), {}
    for part in text.strip().split("+"):
        key, _, value = part.strip().partition("=")
        if not value and key in FLAGS:
            flags.add(key)
        elif key in PHYSICS and value:
            try:
                number = float(value)
            except ValueError:
                number = float("nan")
            if not np.isfinite(number) or number <= 0:
                raise UserError(f"--cartpole-tasks: {key} must be a positive number, got {value!r}")
            physics[key] = number
        else:
            raise UserError(f"--cartpole-tasks: unknown modifier {part!r} in {text!r}; use "
                            f"{', '.join(FLAGS)} or {'/'.join(PHYSICS)}=value")
    return flags, physics


def make_env(flags: set[str], physics: dict[str, float]):
    def make(train: bool) -> gym.Env:
        env = gym.make("CartPole-v1")
        pole = env.unwrapped
        for key, value in physics.items():
            setattr(pole, key, value)
        pole.total_mass = pole.masspole + pole.masscart          # derived in __init__ only
        pole.polemass_length = pole.masspole * pole.length
        space = env.observation_space
        if "perm" in flags:
            order = np.arange(space.shape[0])[::-1].copy()
            space = gym.spaces.Box(space.low[order], space.high[order], dtype=space.dtype)
            env = TransformObservation(env, lambda o, order=order: o[order], space)
        if "neg" in flags:
            space = gym.spaces.Box(-space.high, -space.low, dtype=space.dtype)
            env = TransformObservation(env, lambda o: -o, space)
        if "swap" in flags:
            env = TransformAction(env, lambda a: 1 - a, env.action_space)
        return env
    return make


@register_scenario("cartpole", CartPoleOptions)
def cartpole(o: CartPoleOptions, run) -> "Scenario":  # noqa: F821
    """CartPole-v1 variants (actions swapped, observations negated/permuted, physics) for PPO."""
    spec = PRESETS.get(o.cartpole_tasks, o.cartpole_tasks)
    names = [part.strip() for part in spec.split(",")]
    if not all(names):
        raise UserError(f"--cartpole-tasks {o.cartpole_tasks!r} has an empty task; separate tasks with ','")
    env_tasks = [EnvTask(make_env(*parse_task(n)), reference_return=500.0) for n in names]
    setting = run.setting or "domain_il"
    return rl_scenario("cartpole", setting, names, env_tasks, lambda: mlp_trunk(4, o.ppo_hidden),
                       options=o, defaults={"lr": 1e-3, "batch_size": 256},
                       info={"tasks": names, "env": "CartPole-v1"})
