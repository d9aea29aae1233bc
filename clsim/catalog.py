"""What clsim offers, from the registries: `--list`, and the table of strategies in docs/strategies.md."""
from __future__ import annotations

from clsim import presets
from clsim.registry import LOGGERS, MECHANISMS, SCENARIOS, STRATEGIES


def listing() -> str:
    lines = ["scenarios:"]
    lines += [f"  {e.name:16s} {e.description}" for e in SCENARIOS.entries()]
    lines += ["strategies (settings; learners; under a privacy mechanism):"]
    lines += [f"  {e.name:16s} {e.description}\n  {'':16s} [{'; '.join(capabilities(e.target))}]"
              for e in STRATEGIES.entries()]
    lines += ["privacy mechanisms (--privacy):"]
    lines += [f"  {e.name:16s} {e.description}" for e in MECHANISMS.entries()]
    lines += ["loggers (--loggers):"]
    lines += [f"  {e.name:16s} {e.description}" for e in LOGGERS.entries()]
    return "\n".join(lines + presets.listing())


def capabilities(strategy) -> tuple[str, str, str]:
    """What a strategy declares: its settings, its learners, and what a privacy ledger sees."""
    access = strategy.data_access
    privacy = "accounted" if access == "accounted" else f"ε = ∞ ({access.removeprefix('raw: ')})"
    if access.startswith("refused"):
        privacy = f"refused ({access.removeprefix('refused: ')})"
    if strategy.privacy:
        privacy = f"always under {strategy.privacy}, accounted"
    return ", ".join(strategy.settings), ", ".join(strategy.learners), privacy


def strategy_table() -> str:
    """The table of strategies and their capabilities (docs/strategies.md; mkdocs_hooks.py puts it
    there when the site is built)."""
    rows = ["| strategy | settings | learners | under `--privacy` |", "|---|---|---|---|"]
    rows += [f"| `{e.name}` | " + " | ".join(capabilities(e.target)) + " |" for e in STRATEGIES.entries()]
    return "\n".join(rows)
