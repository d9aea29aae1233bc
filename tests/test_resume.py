"""Every registered strategy (and PPO with EWC and BLIP, SAC with EWC and reservoir replay) stopped after its first task and resumed
from the checkpoint gives the uninterrupted run's summary and log.jsonl, record for record."""
from __future__ import annotations

import importlib.util
import json

import pytest

from clsim import Experiment, rundir
from clsim.loggers import Logger
from clsim.registry import STRATEGIES

# Wall-clock and process figures differ between any two runs; everything else must match.
CLOCK = {"wall_time", "steps_per_sec", "env_steps_per_sec", "memory", "peak_rss_bytes"}
SUPERVISED = {"scenario": "split_digits", "epochs": 1, "n_tasks": 3, "hidden": "32", "seed": 2}
CARTPOLE = {"scenario": "cartpole", "ppo_timesteps": 256, "ppo_epochs": 1, "batch_size": 128,
            "ppo_eval_episodes": 2, "cartpole_tasks": "default,swap,default", "seed": 2}
#: SparCL with a mask update (prune and regrow) at the start of every epoch, task 1's first included
OPTIONS = {"sparcl": {"epochs": 2, "sparcl_update_every": 1, "sparcl_remove_every": 1}}


class StopInSecondTask(Logger):
    """Presses Ctrl-C at the first step of the second task (after the first checkpoint)."""
    writes_files = False

    def step(self, record):
        if record["task"] == 1:
            raise KeyboardInterrupt


def without_clock(value):
    if isinstance(value, dict):
        return {k: without_clock(v) for k, v in value.items() if k not in CLOCK}
    if isinstance(value, list):
        return [without_clock(v) for v in value]
    return value


#: SAC on a two-task Meta-World sequence (Continual World), a few updates a task
SAC = {"scenario": "cw_triplets", "cw_sequence": "pair_reach", "sac_steps": 80, "sac_start_steps": 40,
       "sac_update_after": 40, "sac_update_every": 20, "sac_eval_every": 40, "sac_eval_episodes": 1,
       "sac_eval_deterministic": 0, "sac_hidden": 8, "sac_layers": 2, "seed": 2}
needs_metaworld = pytest.mark.skipif(importlib.util.find_spec("metaworld") is None,
                                     reason="Continual World needs the rl extra (Meta-World 3)")
CASES = [pytest.param({**SUPERVISED, **OPTIONS.get(name, {})}, name, id=name)
         for name in sorted(e.name for e in STRATEGIES.entries() if "supervised" in e.target.learners)] + \
        [pytest.param(CARTPOLE, name, id=f"ppo-{name}") for name in ("ewc", "blip")] + \
        [pytest.param(SAC, name, id=f"sac-{name}", marks=needs_metaworld) for name in ("ewc", "reservoir")]


pytestmark = pytest.mark.usefixtures("one_thread")   # tests/conftest.py


@pytest.mark.slow
@pytest.mark.parametrize("options,strategy", CASES)
def test_a_run_stopped_after_its_first_task_resumes_to_the_same_summary_and_log(tmp_path, options, strategy):
    run = {**options, "strategy": strategy, "progress": False, "loggers": "jsonl"}
    whole = Experiment(**run, out=str(tmp_path / "whole")).run()
    with pytest.raises(rundir.Interrupted) as stopped:
        Experiment(**{**run, "loggers": ["jsonl", StopInSecondTask]}, out=str(tmp_path / "cut")).run()
    resumed = Experiment(**run, out=str(tmp_path / "cut")).run(resume_dir=stopped.value.partial)
    assert without_clock(resumed.summary) == without_clock(whole.summary)
    log = lambda r: [without_clock(json.loads(line)) for line in (r.run_dir / "log.jsonl").read_text().splitlines()]
    assert log(resumed) == log(whole)
