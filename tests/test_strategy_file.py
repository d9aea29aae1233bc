"""`--strategy path/to/file.py`: a one-file strategy without packaging, from the command line, YAML
and Python (the documented example as printed); a file that cannot be one is a one-line error,
exit status 2."""
from __future__ import annotations

import json
import re
import subprocess
import sys

import pytest

from clsim import Experiment
from clsim.cli import main
from clsim.errors import UserError
from conftest import REPO

pytestmark = pytest.mark.usefixtures("own_strategy_registry")

STRATEGY = '''
from dataclasses import dataclass

from clsim.config import opt
from clsim.registry import register_strategy
from clsim.strategy import Strategy


@register_strategy("{name}")
class Scaled(Strategy):
    """Scale the loss (a strategy that changes nothing but its figures)."""

    @dataclass
    class Options:
        loss_scale: float = opt(1.0, "factor on the loss", low=0.0, low_open=True)

    def loss(self, batch, losses, outputs):
        return losses * self.options.loss_scale
'''


def test_a_strategy_file_is_chosen_by_its_path_with_its_own_options(tmp_path, capsys):
    path = tmp_path / "scaled.py"
    path.write_text(STRATEGY.format(name="scaled_from_file"))
    e = Experiment(strategy=str(path), loss_scale=2)
    assert e.strategy_name == "scaled_from_file" and e.strategy_options.loss_scale == 2.0
    cfg = tmp_path / "run.yaml"
    cfg.write_text(f"strategy: {path}\nloss-scale: 3\n")
    assert Experiment.from_yaml(cfg).strategy_options.loss_scale == 3.0   # the same file, imported once
    with pytest.raises(SystemExit):   # --help lists the file's options
        main(["--strategy", str(path), "--help"])
    assert "--loss-scale LOSS_SCALE factor on the loss" in " ".join(capsys.readouterr().out.split())


@pytest.mark.slow
def test_the_documented_strategy_file_runs_as_printed_from_the_command_line_and_from_python(tmp_path):
    """The block of docs/extending.md (where the README points), saved as a newcomer would: outside
    the package, under the name its first line gives."""
    page = (REPO / "docs" / "extending.md").read_text()
    (code, name), = re.findall(r"```python\n(# (\S+\.py)\n.*?)```", page, re.S)
    (tmp_path / name).write_text(code)
    cli = subprocess.run([sys.executable, "-m", "clsim", "run", "--strategy", name, "--l2-strength", "5",
                          "--epochs", "1", "--n-tasks", "2", "--checkpoint", "false", "--out", "cli"],
                         cwd=tmp_path, capture_output=True, text=True)
    assert cli.returncode == 0, cli.stderr
    assert "ACC" in cli.stdout and "Traceback" not in cli.stderr
    (run_dir,) = (tmp_path / "cli").iterdir()
    assert run_dir.name == "split_digits-my_l2-class_il-seed0"
    saved = json.loads((run_dir / "summary.json").read_text())
    assert saved["strategy"] == "my_l2" and saved["hparams"]["l2_strength"] == 5.0
    # from Python: the same figures (one seed fixes everything)
    result = Experiment(strategy=str(tmp_path / name), l2_strength=5, epochs=1, n_tasks=2, checkpoint=False,
                        progress=False, out=None).run()
    assert result.summary["strategy"] == "my_l2"
    assert result.summary["accuracy_matrix"] == saved["accuracy_matrix"]


@pytest.mark.parametrize("content,expected", [
    (None, "strategy file {path} does not exist"),
    ("def broken(:\n", "{path}, line 1: invalid syntax; a strategy file is Python"),
    ("x = 1\n", "{path} registers no strategy entries; a strategy file registers exactly one"),
    (STRATEGY.format(name="ewc"), "{path}: strategy 'ewc' is registered twice (already by clsim.strategies.ewc); "
                                  "give yours a name of its own"),
    (STRATEGY.format(name="one_of_two") + '\n\n@register_strategy("two_of_two")\nclass Other(Strategy):\n    pass\n',
     "{path} registers 2 strategy entries: one_of_two, two_of_two"),
])
def test_a_file_that_is_not_one_strategy_is_one_line_exit_2(tmp_path, capsys, content, expected):
    path = tmp_path / "mine.py"
    if content is not None:
        path.write_text(content)
    out = tmp_path / "out"
    assert main(["--strategy", str(path), "--out", str(out)]) == 2
    lines = capsys.readouterr().err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith(f"error: {expected.format(path=path)}"), lines
    assert not out.exists()
    with pytest.raises(UserError):   # nothing stays registered: the same mistake again, the same line
        Experiment(strategy=str(path))
