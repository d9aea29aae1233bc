"""Loggers as plugins: --loggers picks them, CSV files read back, and a resumed run leaves every
logger's files as an uninterrupted run does (resume handled once, by the run directory)."""
from __future__ import annotations

import csv
import json

import pytest

from clsim import Experiment, rundir
from clsim.errors import UserError
from clsim.loggers import Logger

RUN = {"strategy": "ewc", "setting": "task_il", "epochs": 2, "n_tasks": 3, "seed": 2, "progress": False}
ALL = "tensorboard,jsonl,csv"


def read_csv(path):
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


def tb_steps(run_dir, tag="train/loss"):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    acc = EventAccumulator(str(run_dir / "tb"), size_guidance={"scalars": 0})
    acc.Reload()
    return [e.step for e in acc.Scalars(tag)]


class CtrlC(Logger):
    """Presses Ctrl-C in the middle of the second task (after the first checkpoint)."""
    writes_files = False

    def step(self, record):
        if record["task"] == 1 and record["epoch"] == 1:
            raise KeyboardInterrupt


@pytest.fixture(scope="module")
def whole(tmp_path_factory):
    return Experiment(**RUN, loggers=ALL, out=str(tmp_path_factory.mktemp("whole"))).run()


def test_csv_logger_writes_steps_tasks_and_the_matrix(whole):
    run_dir, summary = whole.run_dir, whole.summary
    matrix = read_csv(run_dir / "matrix.csv")
    assert [[float(row[f"task_{j}"]) for j in range(3)] for row in matrix] == summary["accuracy_matrix"]
    steps = read_csv(run_dir / "steps.csv")
    losses = [float(r["value"]) for r in steps if r["name"] == "loss"]
    assert len(losses) == summary["steps"]
    jsonl = [json.loads(line) for line in (run_dir / "log.jsonl").read_text().splitlines()]
    assert losses == pytest.approx([r["loss"] for r in jsonl if r["kind"] == "step"])
    assert any(r["name"] == "strategy/ewc_penalty" for r in steps)
    tasks = read_csv(run_dir / "tasks.csv")
    acc = [float(r["value"]) for r in tasks if r["name"] == "acc"]
    assert acc[-1] == pytest.approx(summary["acc"]) and len(acc) == 3
    assert any(r["name"] == "memory/strategy_state_bytes" for r in tasks)
    assert not [r["name"] for r in tasks if r["name"].startswith("privacy/")]   # no mechanism: no δ, no ε


def test_csv_logs_the_privacy_figures_of_a_private_run(tmp_path):
    result = Experiment(strategy="dpsgd", noise_multiplier=1.0, epochs=1, n_tasks=2, progress=False, loggers="csv",
                        out=str(tmp_path)).run()
    tasks = read_csv(result.run_dir / "tasks.csv")
    delta = [float(r["value"]) for r in tasks if r["name"] == "privacy/delta"]
    eps = [float(r["value"]) for r in tasks if r["name"] == "privacy/epsilon_worst"]
    assert delta == [result.summary["privacy"]["delta"]] * 2
    assert len(eps) == 2 and eps[-1] == pytest.approx(result.summary["privacy"]["epsilon_worst"])


@pytest.mark.slow
def test_loggers_option_chooses_the_files(tmp_path):
    result = Experiment(strategy="naive", epochs=1, n_tasks=2, progress=False, loggers="csv",
                        out=str(tmp_path)).run()
    names = {p.name for p in result.run_dir.iterdir()}
    assert {"steps.csv", "tasks.csv", "matrix.csv", "summary.json", "config.json"} <= names
    assert not {"log.jsonl", "tb"} & names
    with pytest.raises(UserError, match="unknown logger 'excel'; choose one of: csv, jsonl, mlflow, tensorboard, wandb"):
        Experiment(loggers="csv,excel")
    with pytest.raises(UserError, match="out=None writes no files"):
        Experiment(loggers="csv", out=None).run()


@pytest.mark.slow
def test_a_resumed_run_leaves_every_loggers_files_as_a_whole_run_does(whole, tmp_path):
    with pytest.raises(rundir.Interrupted) as stopped:
        Experiment(**RUN, loggers=[*ALL.split(","), CtrlC], out=str(tmp_path)).run()
    partial = stopped.value.partial
    assert (partial / "checkpoint.pt").is_file()
    resumed = Experiment(**RUN, loggers=ALL, out=str(tmp_path)).run(resume_dir=partial)
    assert resumed.summary["accuracy_matrix"] == whole.summary["accuracy_matrix"]
    n = whole.summary["steps"]
    jsonl = [json.loads(line) for line in (resumed.run_dir / "log.jsonl").read_text().splitlines()]
    assert [r["step"] for r in jsonl if r["kind"] == "step"] == list(range(1, n + 1))
    for name in ("steps.csv", "tasks.csv", "matrix.csv"):
        cut, full = read_csv(resumed.run_dir / name), read_csv(whole.run_dir / name)
        drop = {"value"} if name != "matrix.csv" else set()
        keys = lambda rows: [{k: v for k, v in r.items() if k not in drop} for r in rows if r.get("name") != "wall_time"]
        assert keys(cut) == keys(full), name
    assert sorted(tb_steps(resumed.run_dir)) == list(range(1, n + 1))   # no step twice, none lost


def test_rl_task_lines_print_returns_with_the_scores_beside_them():
    from clsim.loggers.progress import row_text
    ppo = {"row": [1.0, 0.25], "details": {"return_raw": [500.0, 130.5], "success_rate": [1.0, 0.0]}}
    sac = {"row": [0.9, 0.1], "details": {"return_raw": [4012.3, 88.0], "success_rate": [0.9, 0.1]}}
    assert row_text(ppo) == "returns 500.0 130.5 (normalised 1.00 0.25)"
    assert row_text(sac) == "returns 4012.3 88.0 (success 0.90 0.10)"
    assert row_text({"row": [97.5, 12.0], "details": {}}) == "row 97.5 12.0"
