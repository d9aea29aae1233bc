"""Sweeps on a real local Ray and the report built from their runs (split_digits, tiny runs)."""
import csv
import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from conftest import REPO

pytest.importorskip("ray", reason="sweeps run on Ray: pip install 'clsim[sweep]'")
pytestmark = pytest.mark.slow

SPEC = """name: two_by_two
base: {scenario: split_digits, n_tasks: 2, epochs: 1, checkpoint: false}
grid: {strategy: [naive, ewc], seed: [0, 1]}
threads: 1
"""


def clsim(*args, cwd: Path, check=True, timeout=600, env=None) -> subprocess.CompletedProcess:
    env = env or {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO)}
    proc = subprocess.run([sys.executable, "-m", "clsim", *args], cwd=cwd, env=env,
                          capture_output=True, text=True, timeout=timeout)
    if check and proc.returncode != 0:
        raise AssertionError(f"clsim {' '.join(args)} failed ({proc.returncode}):\n{proc.stderr[-3000:]}")
    return proc


@pytest.fixture(scope="module")
def resumed_sweep(tmp_path_factory):
    """The 2 x 2 sweep, killed once its first trial has finished, then run again to the end."""
    root = tmp_path_factory.mktemp("sweep")
    (root / "spec.yaml").write_text(SPEC)
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO)}
    first = subprocess.Popen([sys.executable, str(REPO / "run_scenario.py"), "--sweep", "spec.yaml", "--out", "out",
                              "--workers", "1", "--no-report"], cwd=root, env=env,
                             stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    trials = root / "out" / "two_by_two" / "trials"
    deadline = time.time() + 400
    while not list(trials.glob("*/*/summary.json")) and time.time() < deadline and first.poll() is None:
        time.sleep(0.5)
    os.killpg(first.pid, signal.SIGKILL)   # the driver, Ray and its workers, mid-sweep
    first.wait()
    done_before = {p.parent.parent.name: p.stat().st_mtime_ns for p in trials.glob("*/*/summary.json")}
    assert 1 <= len(done_before) < 4, done_before
    second = clsim("sweep", "spec.yaml", "--out", "out", cwd=root)
    return root / "out" / "two_by_two", done_before, second


def test_a_killed_sweep_resumes_and_skips_finished_trials(resumed_sweep):
    sweep_dir, done_before, second = resumed_sweep
    assert f"{len(done_before)} already finished, {4 - len(done_before)} to run" in second.stderr
    status = json.loads((sweep_dir / "sweep.json").read_text())
    assert [s["status"] for s in status] == ["finished"] * 4
    assert {(s["options"]["strategy"], s["options"]["seed"]) for s in status} == \
        {(a, b) for a in ("naive", "ewc") for b in (0, 1)}
    for trial, mtime in done_before.items():   # not run again
        (summary,) = (sweep_dir / "trials" / trial).glob("*/summary.json")
        assert summary.stat().st_mtime_ns == mtime


def test_report_csv_figures_equal_the_runs_summaries(resumed_sweep):
    sweep_dir, _, _ = resumed_sweep
    report = sweep_dir / "report"
    rows = list(csv.DictReader(open(report / "results.csv")))
    assert len(rows) == 4
    for row in rows:
        s = json.loads((Path(row["run_dir"]) / "summary.json").read_text())
        for key in ("acc", "bwt", "fwt", "forgetting"):
            assert float(row[key]) == pytest.approx(s[key], rel=1e-12)
        assert int(row["seed"]) == s["seed"] and row["group"] == s["strategy"]
    stats = list(csv.DictReader(open(report / "summary.csv")))
    acc = {r["group"]: r for r in stats if r["figure"] == "acc"}
    assert len(acc) == 2
    for group, r in acc.items():
        values = [float(x["acc"]) for x in rows if x["group"] == group]
        assert int(r["n"]) == 2
        assert float(r["mean"]) == pytest.approx(np.mean(values))
        assert float(r["sd"]) == pytest.approx(np.std(values, ddof=1))
    table = (report / "report.md").read_text()
    for group in acc:
        assert f"| {group} | 2 |" in table


def test_report_figures_decode_to_real_pictures(resumed_sweep):
    from PIL import Image
    report = resumed_sweep[0] / "report"
    pngs = sorted(report.glob("*.png"))
    names = {p.name for p in pngs}
    assert {"matrix_0.png", "matrix_1.png", "acc_per_task.png", "forgetting_bwt.png",
            "memory_per_task.png"} <= names
    for p in pngs:
        with Image.open(p) as im:
            a = np.asarray(im.convert("L"), dtype=float)
        assert a.shape[0] > 300 and a.shape[1] > 300, p   # readable at paper size (200 dpi)
        assert a.std() > 5, f"{p} is blank"
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    acc = EventAccumulator(str(report / "tb"), size_guidance={"images": 0})
    acc.Reload()
    assert len(acc.Tags()["images"]) == len(pngs)


def test_a_failing_trial_is_reported_and_the_others_finish(tmp_path):
    (tmp_path / "bad.yaml").write_text(
        "base: {scenario: split_digits, n_tasks: 2, epochs: 1, checkpoint: false}\n"
        "grid: {lr: [0.05, -1.0]}\n")
    proc = clsim("sweep", "bad.yaml", "--out", "out", cwd=tmp_path, check=False)
    assert proc.returncode == 1
    status = {s["options"]["lr"]: s for s in json.loads((tmp_path / "out/bad/sweep.json").read_text())}
    assert status[0.05]["status"] == "finished"
    assert status[-1.0]["status"] == "failed" and status[-1.0]["error"] == "--lr must be > 0.0, got -1.0"
    assert "failed: --lr must be > 0.0, got -1.0" in proc.stderr
    assert "Traceback" not in proc.stderr


def test_relative_paths_in_a_spec_are_read_from_where_the_sweep_was_started(tmp_path):
    """Ray Tune runs each trial in a working directory of its own: a strategy file and a data root
    given relative to the directory `clsim sweep` runs in must still name the same places there."""
    (tmp_path / "mine").mkdir()
    (tmp_path / "mine" / "halved.py").write_text(
        "from clsim.registry import register_strategy\nfrom clsim.strategy import Strategy\n\n\n"
        "@register_strategy('halved')\nclass Halved(Strategy):\n    \"\"\"Half the loss.\"\"\"\n\n"
        "    def loss(self, batch, losses, outputs):\n        return losses / 2\n")
    (tmp_path / "spec.yaml").write_text(
        "name: relative\nbase: {scenario: split_digits, n_tasks: 2, epochs: 1, checkpoint: false,\n"
        "       strategy: mine/halved.py, data_root: data}\n")
    clsim("sweep", "spec.yaml", "--out", "out", "--workers", "1", "--no-report", cwd=tmp_path)
    (status,) = json.loads((tmp_path / "out/relative/sweep.json").read_text())
    assert status["status"] == "finished" and status["id"].startswith("split_digits-halved-"), status
    run_dir = tmp_path / "out/relative" / status["run_dir"]
    assert run_dir.name == "split_digits-halved-class_il-seed0"
    assert json.loads((run_dir / "config.json").read_text())["run"]["data_root"] == str(tmp_path / "data")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_a_sweep_runs_on_an_existing_ray_cluster(tmp_path):
    port = _free_port()
    # a throwaway cluster on the loopback: no token (Ray's auth is the cluster owner's business)
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO), "RAY_AUTH_MODE": "disabled"}
    ray_bin = Path(sys.executable).with_name("ray")
    head = subprocess.Popen([str(ray_bin), "start", "--head", "--block", "--node-ip-address", "127.0.0.1",
                             "--port", str(port), "--num-cpus", "1", "--include-dashboard", "false"],
                            env=env, cwd=tmp_path,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    try:
        (tmp_path / "one.yaml").write_text(
            "base: {scenario: split_digits, n_tasks: 2, epochs: 1, checkpoint: false}\n"
            "grid: {seed: [3]}\n")
        deadline = time.time() + 180   # the head takes a few seconds to listen
        while time.time() < deadline:
            with socket.socket() as s:
                if s.connect_ex(("127.0.0.1", port)) == 0:
                    break
            time.sleep(1)
        proc = clsim("sweep", "one.yaml", "--out", "out", "--address", f"127.0.0.1:{port}", "--no-report",
                     cwd=tmp_path, check=False, env=env, timeout=300)
        assert proc.returncode == 0, proc.stderr[-3000:]
        (run,) = (tmp_path / "out/one/trials").glob("*/*/summary.json")
        assert json.loads(run.read_text())["seed"] == 3
    finally:
        os.killpg(head.pid, signal.SIGTERM)
        head.wait(timeout=60)


def test_bad_specs_are_one_line_errors(tmp_path):
    for text, message in (("grid: {seed: 3}\n", "grid.seed must be a non-empty list"),
                          ("grd: {seed: [1]}\n", "unknown key(s) in sweep spec"),
                          ("threads: 0\n", "threads must be a positive integer"),
                          ("random: {samples: 2, space: {lr: {normal: [0, 1]}}}\n", "random.space.lr")):
        (tmp_path / "s.yaml").write_text(text)
        proc = clsim("sweep", "s.yaml", "--out", "out", cwd=tmp_path, check=False)
        assert proc.returncode == 2 and message in proc.stderr, proc.stderr
        assert len(proc.stderr.strip().splitlines()) == 1 and not (tmp_path / "out").exists()


def test_random_samples_are_fixed_by_the_spec_seed():
    from clsim.sweep import trials, trial_id
    spec = {"base": {"epochs": 1}, "grid": {"strategy": ["naive", "ewc"]},
            "random": {"samples": 3, "seed": 7, "space": {"lr": {"loguniform": [1e-3, 1e-1]},
                                                          "ewc_lambda": {"choice": [1, 10]}}}}
    a, b = trials(spec), trials(spec)
    assert a == b and len(a) == 6 and len({trial_id(t) for t in a}) == 6
    assert all(1e-3 <= t["lr"] <= 1e-1 and t["ewc_lambda"] in (1, 10) and t["epochs"] == 1 for t in a)
    other = trials({**spec, "random": {**spec["random"], "seed": 8}})
    assert [t["lr"] for t in other] != [t["lr"] for t in a]


def test_every_shipped_spec_resolves_to_valid_experiments():
    from clsim.experiment import Experiment
    from clsim.sweep import load_spec, trial_id, trials
    specs = sorted((REPO / "sweeps").glob("*.yaml"))
    assert len(specs) >= 3
    for path in specs:
        resolved = trials(load_spec(str(path)))
        assert len({trial_id(t) for t in resolved}) == len(resolved) > 1
        for options in resolved:
            Experiment(**options)   # every name and value is one a run accepts
