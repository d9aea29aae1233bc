"""The scripts in examples/ run as a researcher would run them (shortened by their own options) and
print what they promise."""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent


def run_example(name: str, *args: str, cwd: Path) -> str:
    proc = subprocess.run([sys.executable, str(REPO / "examples" / name), *args], cwd=cwd, capture_output=True,
                          text=True, env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert proc.returncode == 0, proc.stderr[-3000:]
    return proc.stdout


@pytest.mark.slow
def test_private_continual_learning_reports_epsilon_within_the_budget(tmp_path):
    out = run_example("private_continual_learning.py", "--epochs", "1", "--epsilon", "3", "--out", "runs", cwd=tmp_path)
    worst = float(out.split("worst-off individual: ε = ")[1].split()[0])
    assert 0 < worst <= 3.0
    assert out.count("individuals of") == 5   # one group per task: the split is disjoint
    assert len(list((tmp_path / "runs").glob("split_digits-ewc-task_il-seed0*/summary.json"))) == 2


@pytest.mark.slow
def test_custom_strategy_keeps_its_average_as_state(tmp_path):
    out = run_example("custom_strategy.py", "--epochs", "1", "--out", "runs", cwd=tmp_path)
    memory = {line.split(":")[0].strip(): int(line.split("strategy memory ")[1].split()[0])
              for line in out.splitlines() if "strategy memory" in line}
    assert memory["naive"] == 0 and memory["average anchor"] > 0


@pytest.mark.slow
def test_sweep_and_figures_writes_the_report_and_its_own_figure(tmp_path):
    pytest.importorskip("ray", reason="the sweep extra (pip install 'clsim[sweep]')")
    out = run_example("sweep_and_figures.py", "--epochs", "1", "--seeds", "0", "--out", "sweeps", cwd=tmp_path)
    assert out.startswith("0 failed trials")
    sweep_dir = tmp_path / "sweeps" / "example_digits"
    assert (sweep_dir / "report" / "report.md").is_file() and (sweep_dir / "final_acc.png").stat().st_size > 0
    assert len(list((sweep_dir / "trials").glob("*/*/summary.json"))) == 3
