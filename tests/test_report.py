"""The report on real runs made in-process: private runs give the privacy–utility figure, SparCL
the FLOPs figure, and the tables agree with the runs' own summaries."""
import csv
import json
import math

import pytest

from clsim import Experiment
from clsim.errors import UserError
from clsim.report import write_report

TINY = dict(scenario="split_digits", n_tasks=2, epochs=1, loggers="jsonl")


@pytest.fixture(scope="module")
def report(tmp_path_factory):
    out = tmp_path_factory.mktemp("runs")
    for seed in (0, 1):
        Experiment(strategy="dpsgd", epsilon=4.0, seed=seed, out=str(out), **TINY).run()
    Experiment(strategy="sparcl", seed=0, out=str(out), **TINY).run()
    return write_report([str(out)], out / "report").parent


def test_private_runs_give_the_privacy_utility_figure(report):
    assert (report / "privacy_utility.png").is_file() and (report / "flops_acc.png").is_file()
    stats = {(r["group"].split()[0], r["figure"]): r for r in csv.DictReader(open(report / "summary.csv"))}
    eps = stats[("dpsgd", "epsilon_worst")]
    assert int(eps["n"]) == 2 and 0 < float(eps["mean"]) <= 4.0
    assert math.isinf(float(stats[("sparcl", "epsilon_worst")]["mean"]))   # trained without a mechanism
    table = (report / "report.md").read_text()
    assert "| dpsgd privacy=dpsgd | 2 |" in table and "| sparcl privacy=none | 1 |" in table


def test_results_csv_holds_every_runs_figures(report):
    rows = list(csv.DictReader(open(report / "results.csv")))
    assert sorted(r["group"].split()[0] for r in rows) == ["dpsgd", "dpsgd", "sparcl"]
    for row in rows:
        s = json.loads(open(f"{row['run_dir']}/summary.json").read())
        assert float(row["acc"]) == pytest.approx(s["acc"], rel=1e-12)
        assert float(row["parameter_bytes"]) == s["memory"]["parameter_bytes"]
    sparcl = next(r for r in rows if r["group"].startswith("sparcl"))
    assert float(sparcl["strategy_train_flops"]) > 0


def test_class_il_runs_carry_the_task_aware_acc_column(report, tmp_path):
    rows = list(csv.DictReader(open(report / "results.csv")))
    for row in rows:   # split_digits runs class_il: every run has the figure
        s = json.loads(open(f"{row['run_dir']}/summary.json").read())
        assert float(row["task_aware_acc"]) == pytest.approx(s["task_aware"]["acc"], rel=1e-12)
    table = (report / "report.md").read_text().splitlines()
    header = next(line for line in table if line.startswith("| group |"))
    assert header.startswith("| group | n | ACC | task-aware ACC | BWT |")
    task_il = Experiment(strategy="naive", setting="task_il", seed=0, out=str(tmp_path / "runs"), **TINY).run()
    alone = write_report([str(task_il.run_dir)], tmp_path / "report").read_text()
    assert "| group | n | ACC | BWT |" in alone and "task-aware" not in alone   # no column without the figure


def test_nothing_to_report_is_one_line(tmp_path):
    with pytest.raises(UserError, match="no finished run"):
        write_report([str(tmp_path)], tmp_path / "report")
    with pytest.raises(UserError, match="does not exist"):
        write_report([str(tmp_path / "nope")], tmp_path / "report")
