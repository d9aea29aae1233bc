"""What a run says on the console: a header, plain progress lines off a terminal, ε where (and only
where) there is a mechanism, warnings when a requested ε cannot hold, the subcommands in --help,
and "did you mean" for mistyped names, options and commands. Real runs on the embedded digits."""
from __future__ import annotations

import json
import re

import pytest

from clsim import Experiment
from clsim.cli import main
from clsim.loggers.progress import ProgressLogger

SHORT = ("--n-tasks", "2", "--epochs", "1", "--checkpoint", "false")


@pytest.mark.slow
def test_a_run_starts_with_a_header_and_prints_plain_progress_off_a_terminal(tmp_path, capsys, monkeypatch):
    monkeypatch.setattr(ProgressLogger, "plain_every", 0.0)   # a line at every step (default: every 30 s)
    out = tmp_path / "out"
    assert main(["--strategy", "ewc", "--seed", "2", *SHORT, "--out", str(out)]) == 0
    lines = capsys.readouterr().out.splitlines()   # captured: not a terminal, so no bar
    (run_dir,) = out.iterdir()
    assert lines[0] == (f"clsim: scenario split_digits (class_il, 2 tasks) | strategy ewc | privacy none | seed 2 | "
                        f"device cpu | run directory {run_dir}")
    progress = [line for line in lines if line.startswith("step ")]
    steps = json.loads((run_dir / "summary.json").read_text())["steps"]
    assert len(progress) == steps
    assert progress[0] == f"step 1/{steps} ({100 / steps:.0f}%) | task 1/2 epoch 1"   # no rate before a step is timed
    assert re.fullmatch(rf"step 2/{steps} \(\d+%\) \| task 1/2 epoch 1 \| \S+ steps/s \| about \d+ (s|min) left",
                        progress[1]), progress[1]
    assert progress[-1].startswith(f"step {steps}/{steps} (100%) | task 2/2 epoch 1")
    assert [line.split(":")[0] for line in lines if line.startswith("task ")] == ["task 0", "task 1"]
    assert not any("ε" in line for line in lines)   # no mechanism, no ε


@pytest.mark.slow
def test_progress_false_prints_nothing_but_the_result(tmp_path, capsys):
    assert main([*SHORT, "--progress", "false", "--out", str(tmp_path)]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert [line.split()[0] for line in lines] == ["ACC", "task-aware", "run"]   # class_il: both figures


@pytest.mark.slow
def test_a_private_run_prints_its_epsilon_after_every_task_and_at_the_end(tmp_path, capsys):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    out = tmp_path / "dp"
    assert main(["--privacy", "dpsgd", "--epsilon", "4", "--lr", "0.1", *SHORT, "--out", str(out)]) == 0
    lines = capsys.readouterr().out.splitlines()
    (run_dir,) = out.iterdir()
    summary = json.loads((run_dir / "summary.json").read_text())
    privacy = summary["privacy"]
    assert "| privacy dpsgd |" in lines[0]
    task_lines = [line for line in lines if line.startswith("task ")]
    assert len(task_lines) == 2 and all("(worst individual, δ" in line for line in task_lines)
    final = f"privacy: ε {privacy['epsilon_worst']:.3g} (worst individual, δ {privacy['delta']:g})"
    assert final in lines and task_lines[-1].endswith(final.removeprefix("privacy: "))
    assert 0 < privacy["epsilon_worst"] <= 4
    tb = EventAccumulator(str(run_dir / "tb"))
    tb.Reload()
    epsilons = [e.value for e in tb.Scalars("privacy/epsilon")]
    assert epsilons and epsilons[-1] == pytest.approx(privacy["epsilon_worst"], rel=1e-5)


@pytest.mark.slow
def test_a_run_without_a_mechanism_writes_no_epsilon_to_tensorboard(tmp_path):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    result = Experiment(**{k.lstrip("-").replace("-", "_"): v for k, v in zip(SHORT[::2], SHORT[1::2])},
                        progress=False, out=str(tmp_path)).run()
    assert result.summary["privacy"]["epsilon_worst"] is None   # raw access: ε = ∞, in summary.json
    tb = EventAccumulator(str(result.run_dir / "tb"))
    tb.Reload()
    scalars = tb.Tags()["scalars"]
    assert "summary/ACC" in scalars and not [t for t in scalars if t.startswith("privacy/")]


@pytest.mark.parametrize("options,reason", [
    ({"strategy": "er"}, "strategy er keeps examples in a buffer"),
    ({"strategy": "ewc", "fisher_privacy": "raw"}, "--fisher-privacy raw reads each task's Fisher exactly"),
    ({"log_training_figures": True}, "--log-training-figures logs figures read from the training data"),
])
def test_a_private_run_warns_before_training_when_its_epsilon_cannot_hold(capsys, options, reason):
    Experiment(privacy="dpsgd", epsilon=8, n_tasks=2, out=None, **options).build()
    warnings = [line for line in capsys.readouterr().err.splitlines() if line.startswith("warning:")]
    assert warnings == [f"warning: this dpsgd run reads training data outside the mechanism, so the requested "
                        f"ε 8 cannot hold for the individuals of those tasks: {reason}"]


def test_an_accounted_private_run_warns_of_nothing(capsys):
    Experiment(strategy="ewc", privacy="dpsgd", epsilon=8, n_tasks=2, out=None).build()
    assert "warning" not in capsys.readouterr().err


def test_help_lists_the_subcommands(capsys):
    for argv in (["--help"], ["run", "--help"]):
        with pytest.raises(SystemExit):
            main(argv)
        text = capsys.readouterr().out
        assert "usage: clsim [run]" in text
        for command in ("clsim run [FLAGS]", "clsim sweep SPEC.yaml", "clsim report DIR...", "clsim download SCENARIO..."):
            assert command in text, command


@pytest.mark.parametrize("argv,expected", [
    (["--scenario", "split_digit"], "unknown scenario 'split_digit' (did you mean split_digits?)"),
    (["--strategy", "ewcc"], "unknown strategy 'ewcc' (did you mean ewc?)"),
    (["--privacy", "dpsdg"], "unknown privacy mechanism 'dpsdg' (did you mean dpsgd?)"),
    (["--loggers", "jsnl"], "unknown logger 'jsnl' (did you mean jsonl?)"),
    (["--preset", "blip-mnsit5"], "unknown preset 'blip-mnsit5' (did you mean blip-mnist5?)"),
    (["--strategy", "ewc", "--ewc-lamda", "5"], "unknown option(s) --ewc-lamda for scenario split_digits and "
                                                "strategy ewc (did you mean --ewc-lambda?)"),
    (["sweeep", "spec.yaml"], "unknown command 'sweeep' (did you mean sweep?)"),
    (["report", "runs", "--outt", "x"], "unrecognized arguments: --outt x (did you mean --out?)"),
])
def test_a_mistyped_name_says_what_was_meant_in_one_line(tmp_path, capsys, argv, expected):
    assert main([*argv, *(["--out", str(tmp_path)] if argv[0].startswith("--") else [])]) == 2
    lines = capsys.readouterr().err.strip().splitlines()
    assert len(lines) == 1 and expected in lines[0], lines
