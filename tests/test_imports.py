"""The layers import one way: no cycle among clsim's modules (imports inside functions count too),
and the Experiment never reaches the command line."""
from __future__ import annotations

import ast
import importlib.util
from pathlib import Path


def modules() -> dict[str, Path]:
    """Every module of the installed clsim, by dotted name (clsim.scenarios and clsim.strategies
    live at the top of the repository: found where the package says they are, not by folder)."""
    out: dict[str, Path] = {}

    def walk(package: str, folder: Path) -> None:
        for path in sorted(folder.glob("*.py")):
            out[package if path.stem == "__init__" else f"{package}.{path.stem}"] = path
        for sub in sorted(p for p in folder.iterdir() if (p / "__init__.py").is_file()):
            name = f"{package}.{sub.name}"
            walk(name, Path(importlib.util.find_spec(name).submodule_search_locations[0]))

    walk("clsim", Path(importlib.util.find_spec("clsim").submodule_search_locations[0]))
    for name in ("clsim.scenarios", "clsim.strategies"):   # mapped from the repository's top folders
        walk(name, Path(importlib.util.find_spec(name).submodule_search_locations[0]))
    return out


def imports(name: str, path: Path, known: set[str]) -> set[str]:
    """The clsim modules `name` imports anywhere in its file. A module's own parent packages are
    left out: Python imports them before the module itself, whatever the module says."""
    package = name if path.stem == "__init__" else name.rpartition(".")[0]
    found = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            found |= {alias.name for alias in node.names}
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:   # relative: from . import x, from .y import z
                base = ".".join(package.split(".")[:len(package.split(".")) - node.level + 1] + ([base] if base else []))
            for alias in node.names:   # `from clsim import config` imports the module clsim.config
                found.add(f"{base}.{alias.name}" if f"{base}.{alias.name}" in known else base)
    ancestors = {".".join(name.split(".")[:i]) for i in range(1, name.count(".") + 1)}
    return {m for m in found if m in known and m != name and m not in ancestors}


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """One cycle through each strongly connected group of more than one module (Tarjan)."""
    index, low, stack, on, groups = {}, {}, [], set(), []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on.add(v)
        for w in sorted(graph[v]):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            group = []
            while True:
                w = stack.pop()
                on.discard(w)
                group.append(w)
                if w == v:
                    break
            if len(group) > 1:
                groups.append(sorted(group))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return groups


def import_graph() -> dict[str, set[str]]:
    found = modules()
    return {name: imports(name, path, set(found)) for name, path in found.items()}


def test_the_walk_sees_every_layer_and_plugin():
    graph = import_graph()
    for name in ("clsim.cli", "clsim.experiment", "clsim.engine", "clsim.privacy.dpsgd",
                 "clsim.scenarios.split_digits", "clsim.strategies.ewc", "clsim.loggers.progress"):
        assert name in graph, name
    assert "clsim.experiment" in graph["clsim.cli"] and "clsim.engine" in graph["clsim.experiment"]


def test_no_import_cycle_among_clsim_modules():
    assert cycles(import_graph()) == []


def test_the_cycle_finder_finds_a_cycle():
    assert cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]


def test_nothing_below_the_command_line_imports_it():
    graph = import_graph()
    assert [name for name, deps in graph.items() if "clsim.cli" in deps and name != "clsim.__main__"] == []
