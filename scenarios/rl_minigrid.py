"""minigrid: a sequence of MiniGrid navigation tasks sharing 7 actions, learned by PPO from
one-hot partial views (7x7 cells, flattened for an MLP)."""
from __future__ import annotations

from dataclasses import dataclass

import gymnasium as gym

from clsim.config import opt, redefaults
from clsim.errors import UserError
from clsim.rl import EnvTask, PPOOptions, mlp_trunk, rl_scenario
from clsim.registry import register_scenario

SEQUENCE = "Empty-Random-5x5,DoorKey-5x5,Unlock,LavaGapS5"
VIEW = 7 * 7 * 20   # one-hot partial view: 7x7 cells x (11 objects + 6 colours + 3 states)


# rl-baselines3-zoo's MiniGrid PPO settings (8 envs x 128 steps, batch 64, 10 epochs, lr 2.5e-4,
# γ 0.99, λ 0.95, no entropy bonus): DoorKey-5x5 is solved within 1e5 steps with them.
@dataclass
class MiniGridOptions(redefaults(PPOOptions, ppo_timesteps=100_000, ppo_steps=128, ppo_epochs=10, ppo_gamma=0.99,
                                 ppo_gae_lambda=0.95, ppo_eval_episodes=20)):
    RUN_DEFAULTS = {**PPOOptions.RUN_DEFAULTS, "lr": 2.5e-4, "batch_size": 64}
    minigrid_tasks: str = opt(SEQUENCE, "comma-separated MiniGrid env names without the 'MiniGrid-' "
                              "prefix and '-v0' suffix; all must share the 7 MiniGrid actions")


def env_id(name: str) -> str:
    return f"MiniGrid-{name}-v0"


def make_env(name: str):
    def make(train: bool) -> gym.Env:
        from minigrid.wrappers import ImgObsWrapper, OneHotPartialObsWrapper
        return gym.wrappers.FlattenObservation(ImgObsWrapper(OneHotPartialObsWrapper(gym.make(env_id(name)))))
    return make


@register_scenario("minigrid", MiniGridOptions)
def minigrid_sequence(o: MiniGridOptions, run):
    """MiniGrid Empty-Random-5x5 -> DoorKey-5x5 -> Unlock -> LavaGapS5 (one-hot views) for PPO."""
    try:
        import minigrid  # noqa: F401  (registers the MiniGrid-* environments)
    except ImportError:
        raise UserError("the minigrid scenario needs the minigrid package: pip install 'clsim[rl]'") from None
    names = [n.strip() for n in o.minigrid_tasks.split(",")]
    for name in names:
        if env_id(name) not in gym.registry:
            raise UserError(f"--minigrid-tasks: unknown MiniGrid env {name!r} ({env_id(name)} is not "
                            f"registered); e.g. {SEQUENCE}")
        space = make_env(name)(False).action_space
        if space.n != 7:
            raise UserError(f"--minigrid-tasks: {name} has {space.n} actions, not MiniGrid's 7")
    # Success = reaching the goal: MiniGrid pays 1 - 0.9·steps/max_steps there and 0 otherwise.
    env_tasks = [EnvTask(make_env(n), reference_return=1.0, success_above=0.0) for n in names]
    return rl_scenario("minigrid", o.setting_of(run), names, env_tasks, lambda: mlp_trunk(VIEW, o.ppo_hidden),
                       options=o, defaults=o.run_defaults(),
                       info={"tasks": [env_id(n) for n in names],
                             "observation": "OneHotPartialObsWrapper + ImgObsWrapper + FlattenObservation"})
