"""The README's examples run as printed: the one-file strategy is strategies/l2.py as shipped, and
every Python example runs in a scratch directory."""
import re
from pathlib import Path

import pytest

from clsim import cli

REPO = Path(__file__).resolve().parent.parent


def test_readme_strategy_example_is_the_shipped_file_and_runs(tmp_path, capsys):
    code = re.search(r"```python\n(# strategies/l2\.py\n.*?)```", (REPO / "README.md").read_text(), re.S).group(1)
    assert code == (REPO / "strategies" / "l2.py").read_text()
    status = cli.main(["--strategy", "l2", "--l2-strength", "5", "--epochs", "1", "--n-tasks", "2",
                       "--checkpoint", "false", "--out", str(tmp_path)])
    assert status == 0
    assert "ACC" in capsys.readouterr().out
    run_dir = next(tmp_path.iterdir())
    assert (run_dir / "summary.json").is_file()


def python_examples() -> list:
    """Every ```python block of the README except the shipped strategy file (tested above); the
    ones that import Avalanche (slow to import) are marked slow."""
    blocks = re.findall(r"```python\n(.*?)```", (REPO / "README.md").read_text(), re.S)
    return [pytest.param(code, id=f"block{i}", marks=[pytest.mark.slow] if "avalanche" in code else [])
            for i, code in enumerate(blocks) if not code.startswith("# strategies/")]


@pytest.mark.parametrize("code", python_examples())
def test_readme_python_examples_run_as_printed(code, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)      # what an example writes (runs/) goes to a scratch directory
    namespace = {"__name__": "__readme__"}
    exec(compile(code, "README.md", "exec"), namespace)
    for name in ("result", "summary", "parts"):
        if name in namespace:
            value = namespace[name]
            summary = value.summary if hasattr(value, "summary") else value if isinstance(value, dict) else None
            if summary is not None:
                assert len(summary["accuracy_matrix"]) == len(summary["initial_scores"]) > 0
    if "result" in namespace:
        assert (namespace["result"].run_dir / "summary.json").is_file()
