"""Assembly of an RL scenario: tasks, the actor-critic model and the PPO learner."""
from __future__ import annotations

import math
from typing import Callable

from torch import nn

from clsim.errors import UserError
from clsim.rl.envs import EVAL_SEED_BASE, EnvTask, eval_seeds, random_policy_return
from clsim.rl.models import ActorCritic, Categorical, action_distribution
from clsim.rl.ppo import PPOLearner, PPOOptions
from clsim.scenario import Scenario, Task


def rl_scenario(name: str, setting: str, names: list[str], env_tasks: list[EnvTask],
                make_trunk: Callable[[], nn.Module], options: PPOOptions, defaults: dict, info: dict,
                input_scale: float = 1.0, separate_critic: bool = True) -> Scenario:
    """A Scenario of RL tasks learned by PPOLearner, with the random-policy returns measured on
    the evaluation seeds and the evaluation protocol recorded in `info`. Every task must have the
    same action space (the policy's distribution follows it); `separate_critic`: the value
    function has its own trunk (MLPs) instead of reading the policy's features (CNNs)."""
    episodes = options.ppo_eval_episodes
    spaces = [e.make(False).action_space for e in env_tasks]
    for i, space in enumerate(spaces):
        if space != spaces[0]:
            raise UserError(f"task {names[i]} has action space {space}, task {names[0]} {spaces[0]}: "
                            f"every task of a stream must share one action space")
    actions = action_distribution(spaces[0])
    n_outputs = actions.n if isinstance(actions, Categorical) else actions.dim
    for i, env_task in enumerate(env_tasks):
        if math.isnan(env_task.random_return):
            env_task.random_return = random_policy_return(env_task, eval_seeds(i, episodes))
        if env_task.reference_return <= env_task.random_return:
            raise UserError(f"task {names[i]}: the reference return {env_task.reference_return} is not "
                            f"above the random policy's {env_task.random_return:.3g}")
    tasks = [Task(i, n, env=e, n_outputs=n_outputs) for i, (n, e) in enumerate(zip(names, env_tasks))]
    slots = len(tasks) if setting == "task_il" else 1
    protocol = {"evaluation_episodes": episodes, "evaluation_policy": options.ppo_eval_policy,
                "evaluation_seeds": f"{EVAL_SEED_BASE} + 10000*task + k, k < {episodes} "
                                    f"(training seeds < {EVAL_SEED_BASE})",
                "reward_clipping_in_evaluation": False,
                "score": "(return - random_return) / (reference_return - random_return); raw returns "
                         "in score_details.return_raw",
                "random_return": [e.random_return for e in env_tasks],
                "reference_return": [e.reference_return for e in env_tasks],
                "timesteps_per_task": options.ppo_timesteps,
                "actions": type(actions).__name__}
    return Scenario(name, setting, tasks,
                    make_model=lambda: ActorCritic(make_trunk(), actions, slots, input_scale,
                                                   make_trunk() if separate_critic else None),
                    defaults=dict(defaults), learner_cls=PPOLearner,
                    learner_kwargs={"options": options}, info={**info, "rl_protocol": protocol},
                    score_scale=1.0)
