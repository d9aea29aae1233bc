"""The documentation runs as printed: every code block of README.md and docs/*.md, each in a scratch
directory (python blocks executed, bash blocks run by bash, yaml blocks parsed), unless preceded by
`<!-- skip: reason -->`. The blocks train models, so they run in the slow tier (CI); blocks marked
`text`, or with no language, are listings, not code. The quick tier checks the rest: the skip
markers, the generated pages, docs/results.yaml is well-formed (the worked strategy example runs in
tests/test_strategy_file.py); and (slow) the site builds with warnings as errors."""
from __future__ import annotations

import importlib.util
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

REPO = Path(__file__).resolve().parent.parent
PAGES = [REPO / "README.md", *sorted((REPO / "docs").rglob("*.md"))]
BLOCK = re.compile(r"(?:^<!-- (skip): ([^\n]*?) -->\n)?^```([\w-]*)[^\n]*\n(.*?)^```$", re.M | re.S)
RUN = {"python", "bash", "sh", "shell", "yaml"}
BASH = {"bash", "sh", "shell"}


def hooks():
    spec = importlib.util.spec_from_file_location("mkdocs_hooks", REPO / "mkdocs_hooks.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def blocks():
    """(page, line, language, code, marker, reason) for every fenced block of every page."""
    for page in PAGES:
        text = page.read_text()
        for m in BLOCK.finditer(text):
            line = text.count("\n", 0, m.start(3) if m.group(1) is None else m.start()) + 1
            yield page, line, m.group(3), m.group(4), m.group(1), m.group(2)


def runnable():
    params = []
    for page, line, language, code, marker, reason in blocks():
        if language not in RUN or marker == "skip":
            continue
        params.append(pytest.param(page, language, code, id=f"{page.relative_to(REPO)}:{line}"))
    return params


def test_every_skip_says_why_and_precedes_a_block():
    for page in PAGES:
        for m in re.finditer(r"^<!-- skip:(.*?)-->\n(.?.?.?)", page.read_text(), re.M):
            assert m.group(1).strip(), f"{page.name}: a skip marker without a reason"
            assert m.group(2) == "```", f"{page.name}: '<!-- skip: ... -->' must be right above a code block"


@pytest.fixture
def scratch(tmp_path, monkeypatch):
    """A directory like a clone's top (run_scenario.py, the sweep specs, examples/) where what the
    blocks write (runs/, sweeps/NAME/) stays."""
    for name in ("run_scenario.py", "examples", "bench", "strategies"):
        if (REPO / name).exists():
            (tmp_path / name).symlink_to(REPO / name)
    (tmp_path / "sweeps").mkdir()
    for spec in (REPO / "sweeps").glob("*.yaml"):
        (tmp_path / "sweeps" / spec.name).symlink_to(spec)
    monkeypatch.chdir(tmp_path)
    return tmp_path


@pytest.mark.slow
@pytest.mark.parametrize("page,language,code", runnable())
def test_code_block_runs_as_printed(page, language, code, scratch):
    if language == "yaml":
        assert yaml.safe_load(code) is not None
    elif language == "python":
        exec(compile(code, str(page), "exec"), {"__name__": "__docs__"})
    else:
        bindir = str(Path(sys.executable).parent)   # `python` and `clsim` of this environment
        env = {**os.environ, "PATH": bindir + os.pathsep + os.environ["PATH"], "OMP_NUM_THREADS": "1"}
        proc = subprocess.run(["bash", "-euo", "pipefail", "-c", code], cwd=scratch, env=env,
                              capture_output=True, text=True)
        assert proc.returncode == 0, f"{page.name} block failed ({proc.returncode}):\n{code}\n{proc.stderr[-3000:]}"
        assert "Traceback" not in proc.stderr, proc.stderr[-3000:]


def test_readme_is_short_and_keeps_the_set_up_commands_ci_runs():
    readme = (REPO / "README.md").read_text()
    assert len(readme.splitlines()) <= 250
    ci = (REPO / ".ci" / "run").read_text()
    test_command = re.search(r'^pip install .*"\.\[dev\]".*$', readme, re.M).group(0)
    assert test_command in ci, "the README's test command must be what .ci/run runs"


def test_results_are_well_formed_and_name_shipped_presets():
    results = hooks().load_results()
    assert results, "docs/results.yaml holds no measurement"
    for name, entries in results.items():
        for e in entries:
            assert e["seeds"] and all(isinstance(s, int) for s in e["seeds"]), name


def test_generated_pages_hold_every_preset_option_and_measurement():
    from clsim.presets import all_presets
    from clsim.registry import STRATEGIES

    h = hooks()
    page = h.reproduction_page()
    for name in all_presets():
        assert f"### {name} {{#{name}}}" in page
    first = next(iter(h.load_results().values()))[0]
    assert first["command"] in page
    cli = h.cli_page()
    for flag in ("--seed", "--epsilon", "--ewc-lambda", "--lr-schedule", "--audit"):
        assert f"`{flag}`" in cli, flag
    assert "usage: clsim sweep" in cli and "usage: clsim report" in cli
    assert all(f"### {name}" in cli for name in STRATEGIES.names())
    assert h.expand("a\n<!-- generated: strategy-capabilities -->\nb").count("| `ewc` |") == 1


def test_a_superseded_row_leaves_the_main_table_and_stays_in_the_presets_history():
    h = hooks()
    page = h.reproduction_page()
    main, history = page.split("## Each preset")
    superseded = [(name, e) for name, entries in h.load_results().items() for e in entries if e.get("superseded")]
    assert superseded, "docs/results.yaml marks no row superseded"
    for name, e in superseded:
        row = f"| [`{name}`](#{name}) | {e['figure']} | "
        others = [o for o in h.load_results()[name] if o is not e and not o.get("superseded")
                  and o["figure"] == e["figure"] and h._figure(o) == h._figure(e)]
        if not others:   # a current row of the same figure and value would print the same cells
            assert not any(line.startswith(row) and f"| {h._figure(e)} |" in line for line in main.splitlines())
        assert f"superseded: **{h._figure(e)}**" in history


def test_the_authors_codes_figure_stands_beside_clsims_of_the_same_budget_and_seeds():
    h = hooks()
    main = h.reproduction_page().split("## Each preset")[0].splitlines()
    paired = 0
    for name, entries in h.load_results().items():
        current = [e for e in entries if not e.get("superseded")]
        for a in (e for e in current if e["source"] == "authors_code"):
            rows = [line for line in main if line.startswith(f"| [`{name}`](#{name}) | {a['figure']} |")
                    and f"| {h._figure(a)} | {h._cell(a['budget'])} |" in line]
            assert len(rows) == 1, (name, a["value"])
            ours = [e for e in current if e["source"] == "clsim" and h._same_run(a, e)]
            if ours:
                assert f"| {h._figure(ours[0])} | {h._figure(a)} |" in rows[0]
                paired += 1
    assert paired >= 3, "docs/results.yaml pairs fewer authors' runs with clsim's than it did"


def test_a_page_the_nav_does_not_name_is_added_under_more(tmp_path):
    for name in ("index.md", "new_guide.md"):
        (tmp_path / name).write_text("# page\n")
    config = hooks().on_config({"docs_dir": str(tmp_path), "nav": [{"Home": "index.md"}]})
    assert config["nav"] == [{"Home": "index.md"}, {"More": ["new_guide.md"]}]


@pytest.mark.slow
def test_site_builds_with_warnings_as_errors(tmp_path):
    proc = subprocess.run([sys.executable, "-m", "mkdocs", "build", "--strict", "--site-dir", str(tmp_path / "site")],
                          cwd=REPO, capture_output=True, text=True, env={**os.environ, "NO_MKDOCS_2_WARNING": "1"})
    problems = [line for line in proc.stderr.splitlines() if line.startswith(("WARNING", "ERROR", "Aborted"))]
    assert proc.returncode == 0, "\n".join(problems) or proc.stderr[-5000:]
    assert (tmp_path / "site" / "reproducing" / "index.html").is_file()
    assert "vdv-splitmnist-task-ewc" in (tmp_path / "site" / "reproducing" / "index.html").read_text()
