"""Continual World on Meta-World 3, learned by SAC (clsim/rl/cw.py, clsim/rl/sac.py).

  cw10, cw20          CW's sequences (CW20 is CW10 twice), 1M steps per task by default
  cw_triplets         short sequences for quick work (--cw-sequence picks one)
  metaworld:<name>    one task (e.g. metaworld:reach-v3): the single-task reference runs that
                      forward transfer is measured against
"""
from __future__ import annotations

from dataclasses import dataclass

from clsim.config import opt
from clsim.registry import register_scenario
from clsim.rl.cw import SEQUENCES, check_names, make_task_env
from clsim.rl.envs import EnvTask
from clsim.rl.models import TanhGaussian
from clsim.rl.sac import SACLearner, SACModel, SACOptions
from clsim.scenario import Scenario, Task

SHORT = {k: v for k, v in SEQUENCES.items() if k not in ("cw10", "cw20")}
# EWC as CW runs it: the Gaussian policy's exact Fisher, and CW's coefficient 1e4 of Σ F (θ - θ*)²,
# which is clsim's (λ/2)·Σ F (θ - θ*)² with λ = 2e4.
STRATEGY_DEFAULTS = {"fisher": "expected", "ewc_lambda": 2e4}


@dataclass
class CWOptions(SACOptions):
    pass


@dataclass
class TripletOptions(SACOptions):
    cw_sequence: str = opt("triplet_easy", "the short sequence: " + "; ".join(f"{k}: {', '.join(v)}"
                                                                           for k, v in SHORT.items()),
                           choices=tuple(SHORT))


@dataclass
class MetaWorldOptions(SACOptions):
    #: `--scenario metaworld:NAME` sets this option to NAME
    ARGUMENT = "metaworld_tasks"
    metaworld_tasks: str = opt("reach-v3", "comma-separated Meta-World 3 task names, learned in this order "
                               "(one task: a single-task reference run)")


def cw_scenario(name: str, names: list[str], o: SACOptions, run) -> Scenario:
    """Tasks of Meta-World environments with the one-hot identity over the sequence, SAC's model."""
    check_names(names, f"scenario {name}")
    n = len(names)
    envs = [EnvTask(make=lambda train, k=k, task=task: make_task_env(task, k, n), reference_return=1.0)
            for k, task in enumerate(names)]
    probe = envs[0].make(False)
    actions = TanhGaussian(probe.action_space.low, probe.action_space.high)
    obs_dim = probe.observation_space.shape[0] - n
    probe.close()
    tasks = [Task(i, task, env=e, n_outputs=actions.dim) for i, (task, e) in enumerate(zip(names, envs))]
    protocol = {"tasks": names, "episode_steps": 200, "task_identity": f"one-hot of {n} appended to the observation",
                "score": "stochastic policy's success rate (CW's test/stochastic success)",
                "evaluation": {"every_steps": o.sac_eval_every, "stochastic_episodes": o.sac_eval_episodes,
                               "deterministic_episodes": o.sac_eval_deterministic},
                "steps_per_task": o.sac_steps, "metaworld": "v3 (not directly comparable with CW's v1 figures)"}
    return Scenario(name, o.setting_of(run), tasks,
                    make_model=lambda: SACModel(obs_dim, n, actions, o),
                    defaults={**o.run_defaults(), **STRATEGY_DEFAULTS},
                    learner_cls=SACLearner, learner_kwargs={"options": o, "tasks": tasks},
                    info={"rl_protocol": protocol}, score_scale=1.0)


@register_scenario("cw10", CWOptions)
def cw10(o: CWOptions, run) -> Scenario:
    """Continual World's CW10 on Meta-World 3 (SAC, success rate)."""
    return cw_scenario("cw10", SEQUENCES["cw10"], o, run)


@register_scenario("cw20", CWOptions)
def cw20(o: CWOptions, run) -> Scenario:
    """Continual World's CW20 (CW10 twice) on Meta-World 3 (SAC, success rate)."""
    return cw_scenario("cw20", SEQUENCES["cw20"], o, run)


@register_scenario("cw_triplets", TripletOptions)
def cw_triplets(o: TripletOptions, run) -> Scenario:
    """Short Meta-World 3 sequences (2-3 tasks) for quick Continual World work (SAC)."""
    return cw_scenario("cw_triplets", SEQUENCES[o.cw_sequence], o, run)


@register_scenario("metaworld", MetaWorldOptions)
def metaworld(o: MetaWorldOptions, run) -> Scenario:
    """Meta-World 3 tasks by name (metaworld:reach-v3 is one): single-task references for CW (SAC)."""
    names = [part.strip() for part in o.metaworld_tasks.split(",")]
    return cw_scenario("metaworld", names, o, run)
