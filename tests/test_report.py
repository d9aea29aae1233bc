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


def test_a_foreign_or_malformed_summary_is_skipped_with_a_warning(report, tmp_path, capsys):
    """One bad summary.json no longer refuses the whole directory (nor is it a numpy traceback)."""
    import shutil
    runs = tmp_path / "runs"
    shutil.copytree(report.parent, runs, ignore=shutil.ignore_patterns("report"))
    good = sorted(p.parent for p in runs.glob("*/summary.json"))
    bad = {"ragged": {"accuracy_matrix": [[1, 2], [3]]}, "foreign": {"loss": 0.1, "model": "resnet"},
           "a_list": [1, 2], "text_acc": None, "not_json": None, "infinite_acc": None, "huge_score": None}
    for name, content in bad.items():
        (runs / name).mkdir()
        summary = json.loads((good[0] / "summary.json").read_text())
        if name == "text_acc":
            content = {**summary, "acc": "97"}
        if name == "infinite_acc":   # JSON's Infinity: clsim writes a non-finite figure as null
            content = {**summary, "acc": math.inf}
        if name == "huge_score":     # a whole number past a float's range
            content = {**summary, "accuracy_matrix": [[10 ** 400, *row[1:]] if i == 0 else row
                                                      for i, row in enumerate(summary["accuracy_matrix"])]}
        (runs / name / "summary.json").write_text("{" if name == "not_json" else json.dumps(content))
    capsys.readouterr()
    write_report([str(runs)], tmp_path / "report")
    warnings = [line for line in capsys.readouterr().err.splitlines() if line.startswith("warning: ")]
    assert len(warnings) == len(bad) and all("skipped" in w for w in warnings)
    said = "\n".join(warnings)
    assert "ragged/summary.json: accuracy_matrix is not a square matrix of scores" in said
    assert "foreign/summary.json: it is not a clsim summary (no accuracy_matrix)" in said
    assert "a_list/summary.json: it is not a clsim summary (a list, not a mapping)" in said
    assert "text_acc/summary.json: acc is not a finite number ('97')" in said
    assert "not_json/summary.json: it is not JSON" in said
    assert "infinite_acc/summary.json: acc is not a finite number (inf)" in said
    assert "huge_score/summary.json: accuracy_matrix is not a square matrix of scores" in said
    rows = list(csv.DictReader(open(tmp_path / "report" / "results.csv")))
    assert sorted(r["run_dir"] for r in rows) == [str(p) for p in good]


def test_a_torn_log_keeps_the_run_without_its_per_task_curve(report, tmp_path, capsys):
    import shutil
    run = tmp_path / "run"
    shutil.copytree(next(report.parent.glob("*/summary.json")).parent, run)
    with open(run / "log.jsonl", "a") as f:
        f.write('{"kind": "task", "acc": ')
    write_report([str(run)], tmp_path / "report")
    err = capsys.readouterr().err
    assert f"warning: {run}/log.jsonl line" in err and "per-task figures left out" in err
    assert len(list(csv.DictReader(open(tmp_path / "report" / "results.csv")))) == 1


def test_a_group_of_one_run_has_no_spread(report):
    """n = 1: a mean with no '± 0.00' and an empty sd, never a spread of zero."""
    table = (report / "report.md").read_text()
    sparcl = next(line for line in table.splitlines() if line.startswith("| sparcl"))
    assert "±" not in sparcl and "| 1 |" in sparcl
    dpsgd = next(line for line in table.splitlines() if line.startswith("| dpsgd"))
    assert "±" in dpsgd
    rows = [r for r in csv.DictReader(open(report / "summary.csv")) if r["group"].startswith("sparcl")]
    assert rows and all(r["sd"] == "" and r["n"] == "1" for r in rows)


def test_bands_are_clipped_to_the_metrics_range():
    """A mean near 100 % with a wide spread drew its band above 100 % (the README's figure)."""
    import matplotlib
    matplotlib.use("Agg")
    import numpy as np
    from clsim import report as rep
    curves = {"a": np.array([[100.0, 99.0], [60.0, 100.0], [100.0, 20.0]])}
    fig = rep._line_figure(curves, "ACC", "t", limits=(0.0, 100.0))
    band = fig.axes[0].collections[0].get_paths()[0].vertices[:, 1]
    assert band.max() <= 100.0 and band.min() >= 0.0
    assert band.max() == 100.0   # the clip is where it bites, not a rescaled band
    rep._pyplot().close(fig)



def test_groups_that_differ_only_by_an_option_one_lacks_stay_apart(report, tmp_path):
    """A run whose hparams lack an option others have (an older clsim's) was labelled as theirs, and
    one group silently replaced the other in every table."""
    import shutil
    runs = tmp_path / "runs"
    source = next(p.parent for p in report.parent.glob("*/summary.json") if "sparcl" in p.parent.name)
    for name in ("new", "old"):
        shutil.copytree(source, runs / name)
    old = json.loads((runs / "old" / "summary.json").read_text())
    del old["hparams"]["sparcl_sparsity"]
    (runs / "old" / "summary.json").write_text(json.dumps(old))
    write_report([str(runs)], tmp_path / "report")
    groups = sorted(r["group"] for r in csv.DictReader(open(tmp_path / "report" / "results.csv")))
    assert len(groups) == 2 and groups[0] != groups[1]


def test_clsim_report_writes_where_the_sweep_does(report, tmp_path, capsys, monkeypatch):
    """`clsim report DIR` writes DIR/report, the place `clsim sweep` writes its own report (and the
    sweep specs say); several directories need --out."""
    import shutil
    from clsim import cli
    runs = tmp_path / "runs"
    shutil.copytree(report.parent, runs, ignore=shutil.ignore_patterns("report"))
    monkeypatch.chdir(tmp_path)
    assert cli.main(["report", str(runs)]) == 0
    assert capsys.readouterr().out.strip() == f"report: {runs / 'report' / 'report.md'}"
    assert not (tmp_path / "report").exists()
    assert cli.main(["report", str(runs), str(runs)]) == 2
    assert capsys.readouterr().err.strip() == ("error: several directories have no one report place: "
                                               "give --out DIR")
    assert cli.main(["report", str(runs), str(runs), "--out", "both"]) == 0
    assert (tmp_path / "both" / "report.md").is_file()
