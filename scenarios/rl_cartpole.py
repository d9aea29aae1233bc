"""cartpole: CartPole-v1 variants that interfere (swapped actions, negated or permuted
observations, changed physics), learned one after the other by PPO.

Defaults (the README's demo): the `perm` stream in task_il, 1e5 env steps per task (rl-zoo's
CartPole budget: PPO reaches 500 with it), EWC at λ 1e4. Reordered observations cannot be undone by
a task's own head, so fine-tuning the shared trunk for task 1 forgets task 0 (naive: 500 -> 50),
while a protected trunk still serves task 1 through its head. The `conflict` stream (swapped
actions) only conflicts with one shared head (--setting domain_il), where no single policy can
solve both tasks: it shows forgetting, not protection."""
from __future__ import annotations

from dataclasses import dataclass

import gymnasium as gym
import numpy as np
from gymnasium.wrappers import TransformAction, TransformObservation

from clsim.config import opt, redefaults
from clsim.rl import EnvTask, PPOOptions, mlp_trunk, rl_scenario
from clsim.rl.envs import parse_variant, variant_names
from clsim.registry import register_scenario

PRESETS = {
    # Observations reordered: the shared trunk must change, per-task heads cannot undo it.
    "perm": "default,perm",
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
class CartPoleOptions(redefaults(PPOOptions, ppo_timesteps=100_000)):
    RUN_DEFAULTS = {**PPOOptions.RUN_DEFAULTS, "lr": 1e-3, "batch_size": 256, "ewc_lambda": 1e4}
    cartpole_tasks: str = opt("perm", HELP)


def parse_task(text: str) -> tuple[set[str], dict[str, float]]:
    """'swap+length=1.0' -> ({'swap'}, {'length': 1.0}); raises UserError on anything else."""
    return parse_variant(text, FLAGS, PHYSICS, "--cartpole-tasks")


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
    names = variant_names(o.cartpole_tasks, PRESETS, "--cartpole-tasks")
    env_tasks = [EnvTask(make_env(*parse_task(n)), reference_return=500.0) for n in names]
    return rl_scenario("cartpole", o.setting_of(run), names, env_tasks, lambda: mlp_trunk(4, o.ppo_hidden),
                       options=o, defaults=o.run_defaults(),
                       info={"tasks": names, "env": "CartPole-v1"})
