"""MkDocs hooks (mkdocs.yml `hooks:`): the pages that are generated rather than written.

A page asks for generated content with a line `<!-- generated: NAME -->`, replaced at build time:
`cli` (every option of every party, from the options dataclasses, and the subcommands' --help),
`reproduction` (the presets in clsim/presets/ beside the measured figures of docs/results.yaml) and
`strategy-capabilities` (what `--list` prints of each strategy) and `durations` (what
bench/durations.py measured, docs/durations.yaml). Pages in docs/ that mkdocs.yml's
nav does not name are added under "More", so a new page is never unreachable.
"""
from __future__ import annotations

import contextlib
import dataclasses
import io
import re
from pathlib import Path

import yaml

DOCS = Path(__file__).resolve().parent / "docs"
RESULTS = DOCS / "results.yaml"
ENTRY_KEYS = {"source", "figure", "value", "sd", "seeds", "budget", "command", "machine", "date", "note", "superseded"}
OPTIONAL_KEYS = {"note", "superseded"}   # superseded: true for a row a later entry replaces or extends
SOURCES = ("clsim", "authors_code")


# ---------------------------------------------------------------- results.yaml

def load_results(path: Path = RESULTS) -> dict[str, list[dict]]:
    """docs/results.yaml, checked: preset name -> entries, each with the keys of ENTRY_KEYS
    (OPTIONAL_KEYS optional) and a known preset name."""
    from clsim.presets import all_presets

    doc = yaml.safe_load(path.read_text()) or {}
    known = all_presets()
    for name, entries in doc.items():
        if name not in known:
            raise ValueError(f"{path.name}: {name!r} is not a preset (clsim/presets/*.yaml)")
        for i, entry in enumerate(entries):
            where = f"{path.name}: {name}[{i}]"
            missing = ENTRY_KEYS - OPTIONAL_KEYS - set(entry)
            if missing or set(entry) - ENTRY_KEYS:
                raise ValueError(f"{where}: keys {sorted(entry)}; expected {sorted(ENTRY_KEYS)}")
            if entry["source"] not in SOURCES:
                raise ValueError(f"{where}: source must be one of {SOURCES}, got {entry['source']!r}")
            if not isinstance(entry["value"], (int, float)) or not isinstance(entry["seeds"], list):
                raise ValueError(f"{where}: value must be a number and seeds a list")
            if not isinstance(entry.get("superseded", False), bool):
                raise ValueError(f"{where}: superseded must be true or false, got {entry['superseded']!r}")
            if not re.fullmatch(r"\d{4}-\d{2}-\d{2}", str(entry["date"])):
                raise ValueError(f"{where}: date must be YYYY-MM-DD, got {entry['date']!r}")
    return doc


def _figure(entry: dict) -> str:
    sd = "" if entry["sd"] is None else f" ± {entry['sd']:.2f}"
    return f"{entry['value']:.2f}{sd}"


def _seeds(seeds: list) -> str:
    if len(seeds) > 2 and seeds == list(range(seeds[0], seeds[-1] + 1)):
        return f"{seeds[0]}–{seeds[-1]}"
    return ",".join(map(str, seeds))


def _cell(text: str) -> str:
    return str(text).replace("|", "\\|").replace("\n", " ")


def _same_run(a: dict, b: dict) -> bool:
    return a["figure"] == b["figure"] and str(a["budget"]) == str(b["budget"]) and a["seeds"] == b["seeds"]


def reproduction_page() -> str:
    """Per paper: each preset's published figure beside clsim's and, where run, the authors' code's
    on the same budget and seeds, with the gap; then each measurement's command, machine and note."""
    from clsim.presets import all_presets

    results = load_results()
    out, paper = [], None
    presets = list(all_presets().values())
    for preset in presets:
        if preset.paper != paper:
            paper = preset.paper
            out += ["", f"## {paper}", "", f"Source: {preset.source}", "",
                    "| preset | figure | published | clsim | authors' code | budget | seeds | clsim − published |",
                    "|---|---|---|---|---|---|---|---|"]
        entries = [e for e in results.get(preset.name, []) if not e.get("superseded")]   # history: below
        ours = [e for e in entries if e["source"] == "clsim"]
        authors = [e for e in entries if e["source"] == "authors_code"]
        published = {"acc": preset.published, "task_aware_acc": preset.published_task_il}
        if not entries:
            shown = "not read" if preset.published is None else f"{preset.published:.2f}"
            out.append(f"| [`{preset.name}`](#{preset.name}) | acc | {shown} | not measured | | | | |")
        # a row per clsim figure, the authors' code's on the same budget and seeds beside it;
        # an authors' figure with no such clsim run gets a row of its own
        rows = [(e, next((a for a in authors if _same_run(a, e)), None)) for e in ours]
        rows += [(None, a) for a in authors if not any(_same_run(a, e) for e in ours)]
        for e, a in rows:
            figure = (e or a)["figure"]
            target = published.get(figure)
            shown = "—" if figure not in published else "not read" if target is None else f"{target:.2f}"
            gap = "" if target is None or e is None else f"{e['value'] - target:+.2f}"
            out.append(f"| [`{preset.name}`](#{preset.name}) | {figure} | {shown} | {_figure(e) if e else ''} "
                       f"| {_figure(a) if a else ''} | {_cell((e or a)['budget'])} | {_seeds((e or a)['seeds'])} "
                       f"| {gap} |")
    out += ["", "## Each preset", ""]
    for preset in presets:
        out += [f"### {preset.name} {{#{preset.name}}}", "", f"{preset.paper}: {preset.table}. Published: "
                + ("not read" if preset.published is None else f"{preset.published:g}")
                + ("" if preset.published_task_il is None else f" (Task-IL {preset.published_task_il:g})")
                + ".", ""]
        if preset.note:
            out += [f"Preset note: {preset.note.strip()}", ""]
        for e in results.get(preset.name, []):
            note = f" {e['note'].strip()}" if e.get("note") else ""
            out += [f"- {'superseded: ' if e.get('superseded') else ''}**{_figure(e)}** ({e['figure']}, "
                    f"{e['source']}, budget {e['budget']}, seeds "
                    f"{_seeds(e['seeds'])}; {e['machine']}, {e['date']}): `{e['command']}`.{note}"]
        out.append("")
    return "\n".join(out)


# ---------------------------------------------------------------- command line

def _options_table(cls, defaults: dict | None = None) -> list[str]:
    from clsim import config

    rows = ["| flag | default | description |", "|---|---|---|"]
    for f in dataclasses.fields(cls):
        default = f.default if f.default is not dataclasses.MISSING else f.default_factory()
        shown = (defaults or {}).get(f.name, "—" if default is None else repr(default) if default == "" else default)
        choices = f.metadata.get("choices")
        help_text = f.metadata.get("help", "") + (f" One of: {', '.join(map(str, choices))}." if choices else "")
        rows.append(f"| `{config.flag(f.name)}` | {_cell(shown)} | {_cell(help_text)} |")
    return rows


def _help(argv: list[str]) -> str:
    """The --help text a command prints (its parser is the source of truth)."""
    from clsim import cli

    buffer = io.StringIO()
    with contextlib.redirect_stdout(buffer), contextlib.suppress(SystemExit):
        cli.main(argv)
    return buffer.getvalue().rstrip()


def cli_page() -> str:
    """Every option of every party, generated from the options dataclasses (the same fields that
    make the flags, YAML keys and Python keyword arguments), then the subcommands' help."""
    from clsim.parties import Parties
    from clsim.registry import LOGGERS, MECHANISMS, SCENARIOS, STRATEGIES

    out = []
    groups = Parties().option_groups()
    for title in ("run options", "training protocol", "privacy audit"):
        out += ["", f"## {title.capitalize()}", "", *_options_table(groups[title])]
    for kind, registry in (("Scenario", SCENARIOS), ("Strategy", STRATEGIES),
                           ("Privacy mechanism", MECHANISMS), ("Logger", LOGGERS)):
        out += ["", f"## {kind} options"]
        for entry in registry.entries():
            out += ["", f"### {entry.name}", "", entry.description, ""]
            fields = dataclasses.fields(entry.options) if dataclasses.is_dataclass(entry.options) else ()
            out += _options_table(entry.options) if fields else ["No options of its own."]
    for sub in ("sweep", "report", "download"):
        out += ["", f"## clsim {sub}", "", "```text", _help([sub, "--help"]), "```"]
    return "\n".join(out)


def strategy_capabilities() -> str:
    from clsim.catalog import strategy_table

    return strategy_table()


def durations_table() -> str:
    """docs/durations.yaml (written by bench/durations.py) as a table: each command's wall and CPU
    time, with the machine, its load and the date."""
    measured = yaml.safe_load((DOCS / "durations.yaml").read_text()) or {}
    rows = ["| what | command | wall | CPU | load (1 min) | machine, date |", "|---|---|---|---|---|---|"]
    for r in measured.values():
        rows.append(f"| {_cell(r['what'])} | `{_cell(r['command'])}` | {r['wall_s']:.0f} s | {r['cpu_s']:.0f} s "
                    f"| {r['load_before']:g} → {r['load_after']:g} | {_cell(r['machine'])}, nice {r['niceness']}, "
                    f"{r['date']} |")
    return "\n".join(rows)


GENERATORS = {"cli": cli_page, "reproduction": reproduction_page,
              "strategy-capabilities": strategy_capabilities, "durations": durations_table}
MARKER = re.compile(r"^<!-- generated: ([a-z-]+) -->$", re.M)


def expand(markdown: str) -> str:
    """The page with every `<!-- generated: NAME -->` line replaced by its content."""
    return MARKER.sub(lambda m: GENERATORS[m.group(1)](), markdown)


# ---------------------------------------------------------------- MkDocs events

def _named(nav) -> set[str]:
    if isinstance(nav, str):
        return {nav}
    items = nav.values() if isinstance(nav, dict) else nav
    return set().union(*(_named(item) for item in items)) if items else set()


def on_config(config):
    docs = Path(config["docs_dir"])
    named = _named(config["nav"] or [])
    extra = sorted(str(p.relative_to(docs)) for p in docs.rglob("*.md") if str(p.relative_to(docs)) not in named)
    if extra and config["nav"] is not None:
        config["nav"].append({"More": extra})
    return config


def on_page_markdown(markdown, page, config, files):
    return expand(markdown)

