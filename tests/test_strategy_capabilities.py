"""Declared capabilities: --list shows them (the docs' table is generated from the same registry,
tests/test_docs.py), and undeclared settings are refused."""
import re

import pytest

from clsim import cli


def test_list_shows_every_strategys_settings_learners_and_privacy(capsys):
    assert cli.main(["--list"]) == 0
    out = capsys.readouterr().out
    assert "er " in out and "supervised; ε = ∞ (keeps examples in a buffer)]" in out
    assert re.search(r"ewc .*\n\s+\[class_il, task_il, domain_il; supervised, rl; accounted\]", out)


def test_a_strategy_defined_for_one_setting_runs_in_it_when_none_is_given():
    from clsim.experiment import Experiment
    from clsim.strategy import Strategy

    for name, setting in (("hat", "task_il"), ("packnet", "task_il"), ("icarl", "class_il")):
        assert Experiment(strategy=name).run_options.setting == setting, name
    assert Experiment(strategy="naive").run_options.setting is None   # the scenario's default

    class OnlyDomain(Strategy):
        settings = ("domain_il",)

    class Designed(Strategy):
        default_setting = "task_il"

    assert OnlyDomain.default_setting == "domain_il" and Designed.default_setting == "task_il"
    assert Strategy.default_setting is None
