"""pendulum: Pendulum-v1 variants that interfere (torque reversed, changed physics), learned one
after the other by PPO with a diagonal-Gaussian policy: the continuous-control (Box) stream."""
from __future__ import annotations

from dataclasses import dataclass

import gymnasium as gym
from gymnasium.wrappers import TransformAction, TransformReward

from clsim.config import opt, redefaults
from clsim.rl import EnvTask, PPOOptions, mlp_trunk, rl_scenario
from clsim.rl.envs import parse_variant, variant_names
from clsim.registry import register_scenario

PRESETS = {
    # Same observations, opposite torque: a shared policy must unlearn task 0 to learn task 1.
    "conflict": "default,neg",
    # Reversed torque and changed physics.
    "mixed": "default,neg+m=0.5,l=1.5",
}
PHYSICS = ("g", "m", "l")
FLAGS = ("default", "neg")
HELP = ("a preset (" + ", ".join(f"{k}: {v}" for k, v in PRESETS.items()) + ") or comma-separated "
        "tasks, each modifiers joined by '+': default, neg (torque reversed), and physics "
        "g (gravity)/m (mass)/l (length)=value")
# Training rewards are scaled by this so that discounted returns (at most 16.3/(1-γ) in magnitude)
# are of order 1, where the clipped value loss (steps of ±ppo_clip) can follow them. CleanRL gets
# the same from NormalizeReward, whose running statistics would mix episodes (breaking the
# per-episode privacy unit) and tasks; a fixed, public scale does neither. Evaluation is unscaled.
REWARD_SCALE = 0.01


# rl-baselines3-zoo's Pendulum-v1 PPO settings (4 envs x 1024 steps, batch 64, 10 epochs,
# lr 1e-3, γ 0.9, GAE λ 0.95, 1e5 steps), without gSDE and with a fixed reward scale
# (REWARD_SCALE) in place of VecNormalize.
@dataclass
class PendulumOptions(redefaults(PPOOptions, ppo_timesteps=100_000, ppo_envs=4, ppo_steps=1024, ppo_epochs=10,
                                 ppo_gamma=0.9, ppo_gae_lambda=0.95)):
    RUN_DEFAULTS = {**PPOOptions.RUN_DEFAULTS, "lr": 1e-3, "batch_size": 64}
    pendulum_tasks: str = opt("conflict", HELP)


def make_env(task: str):
    """The env factory of one task of --pendulum-tasks (e.g. 'neg+m=0.5'); UserError if malformed."""
    flags, physics = parse_variant(task, FLAGS, PHYSICS, "--pendulum-tasks")

    def make(train: bool) -> gym.Env:
        env = gym.make("Pendulum-v1")
        for key, value in physics.items():
            setattr(env.unwrapped, key, value)
        if "neg" in flags:
            env = TransformAction(env, lambda a: -a, env.action_space)
        return TransformReward(env, lambda r: REWARD_SCALE * r) if train else env
    return make


@register_scenario("pendulum", PendulumOptions)
def pendulum(o: PendulumOptions, run) -> "Scenario":  # noqa: F821
    """Pendulum-v1 variants (torque reversed, physics) for PPO with a Gaussian policy."""
    names = variant_names(o.pendulum_tasks, PRESETS, "--pendulum-tasks")
    # Reference 0: the ceiling (every step costs >= 0); a swung-up, balanced pole scores about -150.
    env_tasks = [EnvTask(make_env(n), reference_return=0.0) for n in names]
    return rl_scenario("pendulum", o.setting_of(run), names, env_tasks, lambda: mlp_trunk(3, o.ppo_hidden),
                       options=o, defaults=o.run_defaults(),
                       info={"tasks": names, "env": "Pendulum-v1", "training_reward_scale": REWARD_SCALE})
