"""The real CLI on the embedded default scenario: figures, outputs, determinism, bad input."""
import json
import math

import pytest

from clsim.cli import main
from conftest import read_summary, run_cli

FAST = ("--epochs", "2", "--checkpoint", "false")


@pytest.fixture(scope="module")
def ewc_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("ewc")
    run_cli("--strategy", "ewc", "--setting", "task_il", *FAST, out=out)
    run_dir = next(p for p in out.iterdir() if p.is_dir())
    return run_dir, json.loads((run_dir / "summary.json").read_text())


def test_summary_holds_the_matrix_and_every_figure(ewc_run):
    _, s = ewc_run
    assert (s["scenario"], s["strategy"], s["setting"], s["seed"]) == ("split_digits", "ewc", "task_il", 0)
    R = s["accuracy_matrix"]
    assert len(R) == 5 and all(len(row) == 5 for row in R)
    assert all(0.0 <= x <= 100.0 for row in R for x in row)
    assert s["acc"] == pytest.approx(sum(R[4]) / 5)
    assert s["bwt"] == pytest.approx(sum(R[4][j] - R[j][j] for j in range(4)) / 4)
    for key in ("fwt", "forgetting"):
        assert math.isfinite(s[key])
    mem = s["memory"]
    assert mem["parameter_bytes"] > 0 and mem["peak_rss_bytes"] > mem["parameter_bytes"]
    # EWC keeps one quadratic: its importance and anchor, two copies of the shared weights
    assert mem["strategy_state_bytes"] > 0
    assert set(s["wall_time"]) >= {"train", "strategy", "eval", "total"}
    assert s["privacy"]["epsilon_worst"] is None  # no mechanism: raw access, ε = ∞


def test_jsonl_has_a_record_per_step_and_per_task(ewc_run):
    run_dir, s = ewc_run
    records = [json.loads(line) for line in (run_dir / "log.jsonl").read_text().splitlines()]
    steps = [r for r in records if r["kind"] == "step"]
    tasks = [r for r in records if r["kind"] == "task"]
    assert len(steps) == s["steps"] and len(tasks) == 5
    assert [r["step"] for r in steps] == list(range(1, len(steps) + 1))
    # every step is logged before its task's record (on a GPU its figures are read a step late)
    for i, r in enumerate(records):
        if r["kind"] == "task":
            assert records[i - 1] == next(st for st in steps if st["step"] == r["step"])
    assert all(math.isfinite(r["loss"]) for r in steps)
    assert any("strategy/ewc_penalty" in r for r in steps)
    assert [t["row"] for t in tasks] == s["accuracy_matrix"]


def test_tensorboard_events_read_back_with_their_tags(ewc_run):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    run_dir, s = ewc_run
    acc = EventAccumulator(str(run_dir / "tb"), size_guidance={"scalars": 0, "images": 0})
    acc.Reload()
    tags = acc.Tags()
    for tag in ("train/loss", "train/lr", "train/steps_per_sec", "eval/acc_task_0", "eval/acc_task_4",
                "summary/ACC", "summary/BWT", "summary/FWT", "summary/forgetting",
                "memory/strategy_state_bytes", "memory/parameter_bytes", "time/train",
                "strategy/ewc_penalty"):
        assert tag in tags["scalars"], tag
    assert "summary/accuracy_matrix" in tags["images"]
    assert len(acc.Scalars("train/loss")) == s["steps"]
    final_acc = acc.Scalars("summary/ACC")[-1].value
    assert final_acc == pytest.approx(s["acc"], rel=1e-5)
    last_row = [acc.Scalars(f"eval/acc_task_{j}")[-1].value for j in range(5)]
    assert last_row == pytest.approx(s["accuracy_matrix"][-1], rel=1e-5)


@pytest.mark.slow
def test_ewc_forgets_less_than_naive_and_joint_beats_both(tmp_path):
    figures = {}
    for strategy in ("naive", "ewc", "joint"):
        out = tmp_path / strategy
        run_cli("--strategy", strategy, "--setting", "task_il", "--epochs", "10", "--lr", "0.1",
                "--checkpoint", "false", *(["--ewc-lambda", "100"] if strategy == "ewc" else []), out=out)
        figures[strategy] = read_summary(out)
    naive, ewc, joint = figures["naive"], figures["ewc"], figures["joint"]
    assert naive["forgetting"] > 2 * ewc["forgetting"]
    assert ewc["bwt"] > naive["bwt"]
    assert joint["acc"] > max(naive["acc"], ewc["acc"])


@pytest.mark.slow
def test_ewc_warns_when_its_penalty_is_too_stiff_for_sgd(tmp_path):
    """The default λ runs the default scenario; a λ whose curvature SGD cannot take is named with
    the largest one that it can, before the loss turns NaN."""
    ok = run_cli("--strategy", "ewc", "--epochs", "1", "--checkpoint", "false", out=tmp_path / "ok")
    assert "warning" not in ok.stderr
    stiff = run_cli("--strategy", "ewc", "--ewc-lambda", "1e4", "--epochs", "1", "--checkpoint", "false",
                    out=tmp_path / "stiff", check=False)
    warning = next(line for line in stiff.stderr.splitlines() if line.startswith("warning: EWC after task 0"))
    bound = float(warning.split("use --ewc-lambda below ")[1].split()[0])
    assert 0 < bound < 1e4 and "Traceback" not in stiff.stderr


@pytest.mark.slow
def test_same_seed_same_figures(tmp_path):
    a, b = tmp_path / "a", tmp_path / "b"
    for out in (a, b):
        run_cli("--strategy", "ewc", "--mode", "online", "--seed", "3", *FAST, out=out)
    sa, sb = read_summary(a), read_summary(b)
    for key in ("accuracy_matrix", "initial_scores", "acc", "bwt", "fwt", "forgetting", "steps"):
        assert sa[key] == sb[key], key
    assert sa["memory"]["strategy_state_bytes"] == sb["memory"]["strategy_state_bytes"]
    c = tmp_path / "c"
    run_cli("--strategy", "ewc", "--mode", "online", "--seed", "4", *FAST, out=c)
    assert read_summary(c)["accuracy_matrix"] != sa["accuracy_matrix"]


@pytest.mark.slow
def test_yaml_config_sets_options_and_flags_override_it(tmp_path):
    cfg = tmp_path / "run.yaml"
    cfg.write_text("strategy: ewc\nmode: online\nepochs: 1\nlr: 0.02\nn-tasks: 2\ncheckpoint: false\n")
    run_cli("--config", str(cfg), "--lr", "0.03", out=tmp_path / "out")
    s = read_summary(tmp_path / "out")
    assert s["strategy"] == "ewc" and len(s["accuracy_matrix"]) == 2
    assert s["hparams"]["lr"] == 0.03 and s["hparams"]["mode"] == "online"


@pytest.mark.slow
def test_listing_names_every_scenario_and_strategy(tmp_path):
    proc = run_cli("--list", out=tmp_path)
    for name in ("split_digits", "naive", "joint", "ewc"):
        assert f"  {name} " in proc.stdout


@pytest.mark.parametrize("args,expected", [
    (("--scenario", "nope"), "unknown scenario 'nope'; choose one of:"),
    (("--strategy", "nope"), "unknown strategy 'nope'; choose one of:"),
    (("--lr", "-0.1"), "--lr must be > 0.0"),
    (("--epochs", "0"), "--epochs must be >= 1"),
    (("--lr", "fast"), "--lr must be a number, got 'fast'"),
    (("--lr", "nan"), "--lr must be a finite number"),
    (("--setting", "other"), "--setting 'other' is not one of: class_il"),
    (("--strategy", "ewc", "--mode", "sometimes"), "--mode 'sometimes' is not one of: separate, online"),
    (("--n-tasks", "11"), "--n-tasks must be <= 10"),
    (("--no-such-flag",), "unknown option(s) --no-such-flag for scenario split_digits"),
    (("--config", "missing.yaml"), "cannot read config file missing.yaml"),
])
def test_bad_input_is_one_line_exit_2_and_no_run_directory(tmp_path, capsys, args, expected):
    """In this process (cli.main, what run_scenario.py calls); one real process below."""
    out = tmp_path / "out"
    assert main([*args, "--out", str(out)]) == 2
    lines = capsys.readouterr().err.strip().splitlines()
    assert len(lines) == 1 and expected in lines[0], lines
    assert not out.exists() or not any(out.iterdir())


@pytest.mark.slow
def test_bad_input_from_a_real_process_is_one_line_exit_2(tmp_path):
    proc = run_cli("--lr", "fast", out=tmp_path / "out", check=False)
    assert proc.returncode == 2 and "Traceback" not in proc.stderr
    assert proc.stderr.strip() == "error: --lr must be a number, got 'fast'"
    assert not (tmp_path / "out").exists() or not any((tmp_path / "out").iterdir())


def test_unknown_config_key_is_rejected(tmp_path, capsys):
    cfg = tmp_path / "bad.yaml"
    cfg.write_text("epochs: 1\nlearning_rate: 0.1\n")
    assert main(["--config", str(cfg), "--out", str(tmp_path / "out")]) == 2
    assert "unknown option(s) --learning-rate" in capsys.readouterr().err
    assert not (tmp_path / "out").exists() or not any((tmp_path / "out").iterdir())


@pytest.mark.slow
def test_nan_loss_stops_the_run_with_a_clear_message(tmp_path):
    proc = run_cli("--lr", "1e6", "--epochs", "1", out=tmp_path / "out", check=False)
    assert proc.returncode == 2
    assert "the loss became nan" in proc.stderr and "lower --lr" in proc.stderr
    assert not any(p for p in (tmp_path / "out").iterdir() if not p.name.startswith(".")) \
        if (tmp_path / "out").exists() else True


@pytest.mark.slow
@pytest.mark.parametrize("strategy", ["ewc", "joint", "derpp"])
def test_interrupted_run_resumes_to_the_same_figures(tmp_path, strategy):
    import signal
    import subprocess
    import sys
    import time

    from conftest import REPO

    args = ("--strategy", strategy, "--setting", "task_il", "--epochs", "15", "--lr", "0.1", "--seed", "5")
    run_cli(*args, out=tmp_path / "whole")
    out = tmp_path / "cut"
    # A shell that runs pytest in the background ignores SIGINT, and children inherit that: restore
    # the default so the interrupt reaches the run as a user's Ctrl-C would.
    proc = subprocess.Popen([sys.executable, str(REPO / "run_scenario.py"), "--out", str(out), *args],
                            cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    partial = out / f".split_digits-{strategy}-task_il-seed5.partial"
    while proc.poll() is None and not (partial / "checkpoint.pt").exists():
        time.sleep(0.02)
    proc.send_signal(signal.SIGINT)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 130, err
    assert f"--resume {partial}" in err
    done = subprocess.run([sys.executable, str(REPO / "run_scenario.py"), "--resume", str(partial)],
                          cwd=REPO, capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    assert not partial.exists()
    whole, resumed = read_summary(tmp_path / "whole"), read_summary(out)
    for key in ("accuracy_matrix", "initial_scores", "acc", "bwt", "fwt", "forgetting", "steps"):
        assert resumed[key] == whole[key], key
    lines = (next(out.iterdir()) / "log.jsonl").read_text().splitlines()
    steps = [json.loads(line)["step"] for line in lines if '"kind": "step"' in line]
    assert steps == list(range(1, whole["steps"] + 1))
