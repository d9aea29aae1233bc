"""Reinforcement learning: continual streams of gymnasium tasks learned by PPO.

  envs.py      what an RL task carries (EnvTask), vector envs, seeded evaluation episodes
  models.py    actor-critic networks (MLP / Nature-CNN trunks, per-slot heads)
  ppo.py       PPOOptions and PPOLearner (rollout, GAE, minibatches, the clipped objective)
  scenario.py  rl_scenario: tasks + model + learner assembled into a Scenario
"""
from clsim.rl.envs import EnvTask  # noqa: F401
from clsim.rl.models import ActorCritic, mlp_trunk, nature_cnn_trunk  # noqa: F401
from clsim.rl.ppo import PPOLearner, PPOOptions  # noqa: F401
from clsim.rl.scenario import rl_scenario  # noqa: F401
