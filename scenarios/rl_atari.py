"""atari: a sequence of Atari 2600 games (ale-py's bundled ROMs) with gymnasium's standard
preprocessing, learned by PPO with the Nature CNN trunk."""
from __future__ import annotations

from dataclasses import dataclass

import gymnasium as gym
import numpy as np

from clsim.config import opt, redefaults
from clsim.errors import UserError
from clsim.rl import EnvTask, PPOOptions, nature_cnn_trunk, rl_scenario
from clsim.registry import register_scenario

# Human scores used as the normalisation reference (as tabulated in the Atari literature, e.g.
# Wang et al. 2016); the random-policy returns are measured on this run's evaluation seeds.
HUMAN = {"Boxing": 12.1, "Breakout": 30.5, "Jamesbond": 302.8, "Krull": 2665.5,
         "KungFuMaster": 22736.3, "Pong": 14.6, "Riverraid": 17118.0, "SpaceInvaders": 1668.7}
PRESETS = {
    # BLIP's six games (Shi et al. 2021: 10M steps each, per-task heads): for bigger machines.
    "blip": "KungFuMaster,Boxing,Jamesbond,Krull,Riverraid,SpaceInvaders",
    # Runs on a laptop in minutes: it exercises the pipeline, its figures are not comparable to papers.
    "reduced": "Boxing,SpaceInvaders",
}


@dataclass
class AtariOptions(redefaults(PPOOptions, ppo_steps=128, ppo_epochs=4, ppo_gamma=0.99, ppo_gae_lambda=0.95,
                              ppo_clip=0.1, ppo_entropy_coef=0.01)):
    RUN_DEFAULTS = {**PPOOptions.RUN_DEFAULTS, "lr": 2.5e-4, "batch_size": 256}
    atari_games: str = opt("reduced", "a preset (" + ", ".join(f"{k}: {v}" for k, v in PRESETS.items())
                           + ") or comma-separated games among " + ", ".join(HUMAN))
    atari_max_steps: int = opt(2_000, "cap on an episode's agent steps (4 frames each; 27000 = the "
                               "usual 30 minutes)", low=1)
    ppo_timesteps: int = opt(4_096, "environment steps of training per task (blip preset: 10_000_000)", low=1)
    ppo_eval_episodes: int = opt(3, "evaluation episodes per task (blip preset: use >= 10)", low=1)


def make_env(game: str, max_steps: int):
    def make(train: bool) -> gym.Env:
        from gymnasium.wrappers import AtariPreprocessing, FrameStackObservation, TransformReward
        env = gym.make(f"ALE/{game}-v5", frameskip=1, full_action_space=True)   # 18 actions for every game
        env = AtariPreprocessing(env, frame_skip=4, noop_max=30, screen_size=84, terminal_on_life_loss=False)
        env = FrameStackObservation(gym.wrappers.TimeLimit(env, max_steps), 4)   # counts agent steps
        return TransformReward(env, np.sign) if train else env   # clipped rewards for training only
    return make


@register_scenario("atari", AtariOptions)
def atari(o: AtariOptions, run):
    """Atari games in sequence (ale-py ROMs; reduced preset here, BLIP's six-game preset for big machines)."""
    try:
        import ale_py
        import cv2  # noqa: F401  (AtariPreprocessing resizes with OpenCV)
    except ImportError as exc:
        raise UserError(f"the atari scenario needs {exc.name}: pip install 'clsim[rl]'") from None
    gym.register_envs(ale_py)
    games = [g.strip() for g in PRESETS.get(o.atari_games, o.atari_games).split(",")]
    unknown = [g for g in games if g not in HUMAN]
    if unknown:
        raise UserError(f"--atari-games: no reference score for {', '.join(map(repr, unknown))}; "
                        f"choose among {', '.join(HUMAN)}")
    env_tasks = [EnvTask(make_env(g, o.atari_max_steps), reference_return=HUMAN[g]) for g in games]
    comparable = o.atari_games == "blip" and o.ppo_timesteps >= 10_000_000
    return rl_scenario("atari", o.setting_of(run), games, env_tasks, nature_cnn_trunk,
                       options=o, defaults=o.run_defaults(), input_scale=1 / 255,
                       separate_critic=False,
                       info={"games": games, "reference": "human scores",
                             "comparable_to_papers": comparable,
                             "note": "" if comparable else "reduced budget: NOT comparable to published results",
                             "preprocessing": "AtariPreprocessing(frame_skip=4, noop_max=30, 84x84 grey) + "
                                              "FrameStackObservation(4), sticky actions 0.25, full action space; "
                                              "training rewards clipped to their sign"})
