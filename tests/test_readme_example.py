"""The README's one-file strategy example works as printed."""
import re
import types
from pathlib import Path

from clsim import cli
from clsim.registry import STRATEGIES

README = Path(__file__).resolve().parent.parent / "README.md"


def test_readme_strategy_example_registers_and_runs(tmp_path, capsys):
    code = re.search(r"```python\n(# strategies/l2\.py\n.*?)```", README.read_text(), re.S).group(1)
    module = types.ModuleType("strategies.l2")
    exec(compile(code, "strategies/l2.py", "exec"), module.__dict__)
    assert "l2" in STRATEGIES.names()
    status = cli.main(["--strategy", "l2", "--l2-strength", "5", "--epochs", "1", "--n-tasks", "2",
                       "--checkpoint", "false", "--out", str(tmp_path)])
    assert status == 0
    assert "ACC" in capsys.readouterr().out
    run_dir = next(tmp_path.iterdir())
    assert (run_dir / "summary.json").is_file()
