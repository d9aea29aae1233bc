"""Reinforcement learning: continual streams of gymnasium tasks learned by PPO or SAC.

  envs.py      what an RL task carries (EnvTask), vector envs, seeded evaluation episodes
  models.py    actor-critic networks (MLP / Nature-CNN trunks, per-slot heads) and the action
               distributions (Categorical for Discrete, DiagGaussian for Box, TanhGaussian for SAC)
  ppo.py       PPOOptions and PPOLearner (rollout, GAE, minibatches, the clipped objective)
  scenario.py  rl_scenario: tasks + model + learner assembled into a Scenario
  sac.py       SACOptions and SACLearner (Continual World's SAC: replay buffer, evaluation curve)
  cw.py        Continual World's task sequences and Meta-World 3 task environments
  cw_metrics.py  Continual World's metrics (performance, forgetting, forward transfer, bootstrap CIs)
"""
from clsim.rl.envs import EnvTask  # noqa: F401
from clsim.rl.models import (ActorCritic, Categorical, DiagGaussian, action_distribution, mlp_trunk,  # noqa: F401
                              nature_cnn_trunk)
from clsim.rl.ppo import PPOLearner, PPOOptions  # noqa: F401
from clsim.rl.scenario import rl_scenario  # noqa: F401
