"""clsim.Experiment: one description of a run from keyword arguments, YAML or flags (same code,
same errors), objects where names go, build()'s parts and run()'s result, on real digits."""
from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from clsim import Experiment
from clsim.cli import from_argv
from clsim.errors import UserError
from clsim.models import make_model

FAST = {"epochs": 1, "n_tasks": 2, "checkpoint": False, "progress": False}


def test_kwargs_yaml_and_flags_describe_the_same_run(tmp_path):
    cfg = tmp_path / "run.yaml"
    cfg.write_text("strategy: ewc\newc-lambda: 5\nepochs: 2\nlr: 0.03\n")
    from_kwargs = Experiment(strategy="ewc", ewc_lambda=5, epochs=2, lr=0.03, seed=4)
    from_yaml = Experiment.from_yaml(cfg, seed=4)
    from_flags = from_argv(["--config", str(cfg), "--seed", "4"])
    for e in (from_yaml, from_flags):
        assert e.run_options == from_kwargs.run_options
        assert e.strategy_options == from_kwargs.strategy_options
        assert e.scenario_options == from_kwargs.scenario_options
    assert from_flags.strategy_options.ewc_lambda == 5.0 and from_flags.run_options.epochs == 2


@pytest.mark.parametrize("key,value,message", [
    ("epochs", "three", "--epochs must be a whole number, got 'three'"),
    ("epochs", 0, "--epochs must be >= 1, got 0"),
    ("lr", "nan", "--lr must be a finite number"),
    ("ewc_lambda", True, "--ewc-lambda must be a number, got True"),
    ("setting", "other", "--setting 'other' is not one of: class_il, task_il, domain_il"),
    ("learning_rate", 0.1, "unknown option(s) --learning-rate for scenario split_digits and strategy ewc"),
])
def test_a_bad_value_fails_with_one_message_whichever_the_door(tmp_path, key, value, message):
    cfg = tmp_path / "bad.yaml"
    cfg.write_text(f"strategy: ewc\n{key}: {json.dumps(value)}\n")
    flag = "--" + key.replace("_", "-")
    text = str(value).lower() if isinstance(value, bool) else str(value)
    errors = []
    for make in (lambda: Experiment(strategy="ewc", **{key: value}),
                 lambda: Experiment.from_yaml(cfg),
                 lambda: from_argv(["--strategy", "ewc", flag, text])):
        with pytest.raises(UserError) as caught:
            make()
        errors.append(str(caught.value).replace("'true'", "True"))
    assert all(message in e for e in errors), errors
    assert errors[1] == f"{errors[0]} (in {cfg})", errors   # the same line; a file's value names the file


@pytest.mark.slow
def test_run_returns_summary_matrix_and_run_directory(tmp_path):
    result = Experiment(strategy="ewc", out=str(tmp_path), **FAST).run()
    summary = json.loads((result.run_dir / "summary.json").read_text())
    assert result.run_dir.parent == tmp_path and result.run_dir.name == "split_digits-ewc-class_il-seed0"
    assert isinstance(result.matrix, np.ndarray) and result.matrix.shape == (2, 2)
    assert result.matrix.tolist() == summary["accuracy_matrix"] == result.summary["accuracy_matrix"]
    assert result.acc == pytest.approx(summary["acc"])
    config = json.loads((result.run_dir / "config.json").read_text())
    assert "--strategy" in config["argv"] and config["argv"][config["argv"].index("--strategy") + 1] == "ewc"


@pytest.mark.slow
def test_out_none_writes_nothing_and_gives_the_same_figures(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    memory = Experiment(strategy="ewc", out=None, **FAST).run()
    assert memory.run_dir is None and list(tmp_path.iterdir()) == []
    on_disk = Experiment(strategy="ewc", out=str(tmp_path / "runs"), **FAST).run()
    assert np.array_equal(memory.matrix, on_disk.matrix)


def test_objects_stand_where_names_go():
    from clsim.scenarios.split_digits import SplitDigitsOptions, split_digits
    from clsim.config import RunOptions
    from clsim.strategies.ewc import EWC
    scenario = split_digits(SplitDigitsOptions(n_tasks=2, hidden=8), RunOptions(setting="task_il"))
    model = make_model("mlp", (1, 8, 8), "task_il", [5, 5], 10, hidden=(12,))
    strategy = EWC(EWC.Options(ewc_lambda=3.0))
    experiment = Experiment(scenario=scenario, strategy=strategy, model=model, epochs=1, out=None)
    parts = experiment.build()
    assert parts.scenario is scenario and parts.strategy is strategy
    assert parts.learner.model is not model and parts.learner.model.state_dict().keys() == model.state_dict().keys()
    assert parts.hparams["strategy"] == "ewc" and parts.hparams["ewc_lambda"] == 3.0
    assert parts.strategy.learner is parts.learner   # set up by build()
    summary = parts.train()
    assert np.asarray(summary["accuracy_matrix"]).shape == (2, 2)
    # A Strategy subclass takes its options from keyword arguments; an instance brings its own.
    assert Experiment(strategy=EWC, ewc_lambda=2.0).strategy_options.ewc_lambda == 2.0
    with pytest.raises(UserError, match="unknown option"):
        Experiment(strategy=strategy, ewc_lambda=2.0)
    with pytest.raises(UserError, match="unknown option"):
        Experiment(scenario=scenario, n_tasks=3)     # a Scenario object is already built
    with pytest.raises(UserError, match="scenario must be a name or a clsim Scenario"):
        Experiment(scenario=42)


def test_build_order_each_model_step_is_named():
    """make_model, then the mechanism's check (DP-SGD swaps BatchNorm), then strategy.setup (BLIP
    re-initialises the weights it quantises): the parts come out fully set up."""
    from clsim.strategies.blip import BLIP
    parts = Experiment(strategy="blip", setting="task_il", privacy="dpsgd", noise_multiplier=1.0, **FAST,
                       out=None).build()
    assert isinstance(parts.strategy, BLIP) and parts.mechanism.name == "dpsgd"
    assert parts.ledger is parts.mechanism.ledger is parts.strategy.ledger
    for name, p in parts.strategy.params.items():    # BLIP's initialisation: within ±bound
        assert float(p.detach().abs().max()) <= parts.strategy.bound[name]
    assert parts.learner.model is parts.strategy.learner.model
    assert all(isinstance(p, torch.nn.Parameter) for p in parts.learner.model.parameters())


def test_capabilities_are_declared_and_checked_before_training():
    """Replay declares supervised learners only: on an RL scenario that is one line at build(), not a crash
    mid-run; BLIP's F_prior default comes from the scenario's declared input kind."""
    with pytest.raises(UserError, match="strategy er works with supervised learners only, and scenario cartpole is rl"):
        Experiment(scenario="cartpole", strategy="er", ppo_eval_episodes=1, out=None).build()
    with pytest.raises(UserError, match="--lr-schedule apply to supervised scenarios; cartpole trains with PPO"):
        Experiment(scenario="cartpole", lr_schedule="cosine", ppo_eval_episodes=1, out=None).build()
    with pytest.raises(UserError, match=r"--audit mia attacks labelled examples, which scenario cartpole \(rl\) does not have"):
        Experiment(scenario="cartpole", audit="mia", ppo_eval_episodes=1, out=None).build()
    import dataclasses
    from clsim.scenarios.split_digits import SplitDigitsOptions, split_digits
    from clsim.config import RunOptions
    from clsim.strategies.blip import F_PRIOR_DEFAULTS
    digits = split_digits(SplitDigitsOptions(n_tasks=2, hidden=8), RunOptions(setting="task_il"))
    assert Experiment(scenario=digits, strategy="blip", out=None).build().strategy.f_prior == \
        F_PRIOR_DEFAULTS["digits"]
    undeclared = dataclasses.replace(digits, input_kind=None)
    with pytest.raises(UserError, match="give --blip-f-prior"):
        Experiment(scenario=undeclared, strategy="blip", out=None).build()
    assert Experiment(scenario=undeclared, strategy="blip", blip_f_prior=1e-12, out=None).build().strategy.f_prior == 1e-12
