"""The README's one-file strategy example is strategies/l2.py as shipped, and it runs."""
import re
from pathlib import Path

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
