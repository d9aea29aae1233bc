"""Acceptance: a strategy, a scenario, a logger and a privacy mechanism, each one file in a package
outside clsim/, installed (pip --target, a temporary directory) and found through entry points,
run with no edit to clsim/."""
from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap

import pytest

from conftest import REPO

FILES = {
    "strategy.py": '''
        from dataclasses import dataclass

        import torch

        from clsim.config import opt
        from clsim.registry import register_strategy
        from clsim.strategy import Strategy


        @register_strategy("shrink")
        class Shrink(Strategy):
            """Pull every shared weight toward zero (a throwaway plugin)."""

            @dataclass
            class Options:
                shrink: float = opt(0.01, "strength of the pull", low=0.0)

            def penalty(self):
                self.calls = getattr(self, "calls", 0) + 1
                return self.options.shrink * sum((p ** 2).sum() for p in self.learner.shared_parameters().values())

            def task_metrics(self):
                return {"shrink_calls": self.calls}
    ''',
    "scenario.py": '''
        from dataclasses import dataclass

        import torch
        from sklearn.datasets import load_digits

        from clsim.config import opt
        from clsim.models import make_model
        from clsim.registry import register_scenario
        from clsim.scenario import Scenario, class_split


        @dataclass
        class PairsOptions:
            pairs: int = opt(2, "tasks of two digits each", low=1, high=5)


        @register_scenario("digit_pairs", PairsOptions)
        def digit_pairs(o, run):
            """Pairs of digits from scikit-learn's 8x8 set, even rows to train, odd to test."""
            d = load_digits()
            x = torch.tensor(d.data, dtype=torch.float32).view(-1, 1, 8, 8) / 16
            y = torch.tensor(d.target)
            keep = y < 2 * o.pairs
            x, y = x[keep], y[keep]
            setting = run.setting or "task_il"
            tasks = class_split(x[::2], y[::2], x[1::2], y[1::2], list(range(2 * o.pairs)), o.pairs, setting)
            return Scenario("digit_pairs", setting, tasks, input_kind="digits",
                            make_model=lambda: make_model("mlp", (1, 8, 8), setting, [2] * o.pairs,
                                                          2 * o.pairs, hidden=(16,)),
                            defaults={"epochs": 2, "lr": 0.1, "batch_size": 32})
    ''',
    "logger.py": '''
        from clsim.loggers import Logger
        from clsim.registry import register_logger


        @register_logger("lines")
        class Lines(Logger):
            """One text line per finished task."""

            def __init__(self, context, options=None):
                super().__init__(context, options)
                self.file = open(self.path("lines.txt"), "a")

            def task(self, record):
                self.file.write(f"task {record['task']} acc {record['acc']:.2f}\\n")
                self.file.flush()

            def close(self, summary):
                self.file.close()
    ''',
    "mechanism.py": '''
        from dataclasses import dataclass

        import torch

        from clsim.config import opt
        from clsim.privacy.mechanism import Mechanism
        from clsim.registry import register_mechanism


        @dataclass
        class ClipOptions:
            clip_norm: float = opt(1.0, "clip the whole gradient to this norm", low=0.0, low_open=True)


        @register_mechanism("clipped")
        class Clipped(Mechanism):
            """Clip the batch gradient's norm (no privacy: a throwaway plugin)."""
            name = "clipped"
            Options = ClipOptions

            def step(self, optimizer):
                params = [p for p in self.learner.model.parameters() if p.grad is not None]
                torch.nn.utils.clip_grad_norm_(params, self.options.clip_norm)
                self.norm = float(torch.linalg.vector_norm(torch.stack([p.grad.norm() for p in params])))
                optimizer.step()

            def step_metrics(self):
                return {"clipped_norm": self.norm}
    ''',
}


@pytest.fixture(scope="module")
def plugin_path(tmp_path_factory):
    """The throwaway package, installed into a directory of its own (never into the environment)."""
    root = tmp_path_factory.mktemp("plugin")
    package = root / "src" / "clsim_demo_plugin"
    package.mkdir(parents=True)
    (package / "__init__.py").write_text("")
    for name, code in FILES.items():
        (package / name).write_text(textwrap.dedent(code).lstrip())
    (root / "src" / "pyproject.toml").write_text(textwrap.dedent('''
        [build-system]
        requires = ["setuptools>=61"]
        build-backend = "setuptools.build_meta"

        [project]
        name = "clsim-demo-plugin"
        version = "0.0.1"

        [tool.setuptools]
        packages = ["clsim_demo_plugin"]

        [project.entry-points."clsim.strategies"]
        shrink = "clsim_demo_plugin.strategy"
        [project.entry-points."clsim.scenarios"]
        digit_pairs = "clsim_demo_plugin.scenario"
        [project.entry-points."clsim.loggers"]
        lines = "clsim_demo_plugin.logger"
        [project.entry-points."clsim.mechanisms"]
        clipped = "clsim_demo_plugin.mechanism"
    '''))
    site = root / "site"
    subprocess.run([sys.executable, "-m", "pip", "install", "--quiet", "--no-deps", "--no-build-isolation",
                    "--no-index", "--target", str(site), str(root / "src")], check=True, capture_output=True)
    return site


def run(plugin_path, *args, check=True):
    env = {**os.environ, "PYTHONPATH": str(plugin_path), "OMP_NUM_THREADS": "1"}
    proc = subprocess.run([sys.executable, str(REPO / "run_scenario.py"), *args], cwd=REPO, env=env,
                          capture_output=True, text=True)
    assert not check or proc.returncode == 0, proc.stderr
    return proc


@pytest.mark.slow
def test_four_plugins_from_one_installed_package_run_with_clsim_unchanged(plugin_path, tmp_path):
    listing = run(plugin_path, "--list").stdout
    for name in ("digit_pairs", "shrink", "clipped", "lines"):
        assert f"  {name} " in listing, name
    run(plugin_path, "--scenario", "digit_pairs", "--pairs", "3", "--strategy", "shrink", "--shrink", "0.001",
        "--privacy", "clipped", "--clip-norm", "0.5", "--loggers", "lines,jsonl", "--progress", "false",
        "--out", str(tmp_path))
    run_dir = next(tmp_path.iterdir())
    summary = json.loads((run_dir / "summary.json").read_text())
    assert (summary["scenario"], summary["strategy"], summary["privacy_mechanism"]) == \
        ("digit_pairs", "shrink", "clipped")
    assert summary["hparams"]["clip_norm"] == 0.5 and summary["hparams"]["shrink"] == 0.001
    assert len(summary["accuracy_matrix"]) == 3 and summary["acc"] > 60        # 2-way heads learned
    lines = (run_dir / "lines.txt").read_text().splitlines()
    assert lines == [f"task {i} acc {a:.2f}" for i, a in enumerate(
        [sum(row[:i + 1]) / (i + 1) for i, row in enumerate(summary["accuracy_matrix"])])]
    steps = [json.loads(line) for line in (run_dir / "log.jsonl").read_text().splitlines()]
    norms = [r["clipped_norm"] for r in steps if r["kind"] == "step"]
    assert len(norms) == summary["steps"] and max(norms) <= 0.5 + 1e-5           # the mechanism ran
    tasks = [r for r in steps if r["kind"] == "task"]
    assert tasks[-1]["strategy"]["shrink_calls"] == summary["steps"]             # the strategy ran
    bad = run(plugin_path, "--scenario", "digit_pairs", "--pairs", "9", "--out", str(tmp_path / "bad"), check=False)
    assert bad.returncode == 2 and bad.stderr.strip() == "error: --pairs must be <= 5, got 9"


@pytest.mark.slow
def test_a_users_own_strategies_and_scenarios_folders_do_not_shadow_clsims(tmp_path):
    """clsim's plugin folders install as clsim.scenarios / clsim.strategies: a user's working
    directory with folders of the same names (which would fail on import) changes nothing."""
    for name in ("strategies", "scenarios"):
        (tmp_path / name).mkdir()
        (tmp_path / name / "__init__.py").write_text(f"raise ImportError('the user\\'s own {name} was imported')\n")
        (tmp_path / name / "ewc.py").write_text("raise ImportError('the user\\'s own module was imported')\n")
    code = ("import sys; sys.path.insert(0, '.')\n"
            "from clsim import Experiment\n"
            "r = Experiment(strategy='ewc', epochs=1, n_tasks=2, out=None).run()\n"
            "print('ACC', r.acc)\n")
    done = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, capture_output=True, text=True,
                          env={**os.environ, "PYTHONPATH": str(tmp_path)})
    assert done.returncode == 0, done.stderr
    assert done.stdout.splitlines()[-1].startswith("ACC ")
    cli = subprocess.run([sys.executable, "-m", "clsim", "--strategy", "ewc", "--epochs", "1", "--n-tasks", "2",
                          "--out", str(tmp_path / "runs")], cwd=tmp_path, capture_output=True, text=True)
    assert cli.returncode == 0, cli.stderr
    assert json.loads(next((tmp_path / "runs").glob("*/summary.json")).read_text())["strategy"] == "ewc"


def test_setup_cfg_lists_every_package_directory():
    """setup.cfg names the packages explicitly (the plugin folders are mapped under clsim), so a new
    sub-package must be added there or the wheel would ship without it."""
    import configparser
    cfg = configparser.ConfigParser()
    cfg.read(REPO / "setup.cfg")
    listed = set(cfg["options"]["packages"].split())
    mapped = {line.split("=")[0].strip(): line.split("=")[1].strip()
              for line in cfg["options"]["package_dir"].strip().splitlines()}
    on_disk = {".".join(p.parent.relative_to(REPO).parts) for p in (REPO / "clsim").rglob("__init__.py")}
    on_disk |= {pkg for pkg, folder in mapped.items() if (REPO / folder / "__init__.py").exists()}
    assert listed == on_disk
