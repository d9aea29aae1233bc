"""Published protocols as named presets: `run_scenario.py --preset NAME` (flags still override).

Each YAML file in this package describes one paper or repository: `paper`, `source`, the `metric`
compared (`acc`, final ACC in %), `train_per_class` (the full per-class training size, which
bench/reproduce.py scales with its --budget), `common` options and `presets`, each with the
`table` row it reproduces, the `published` figure (null where no readable copy of the table could
be found) and a `note` on known differences. A preset's options are ordinary option: value pairs,
validated like a --config file.
"""
from __future__ import annotations

from dataclasses import dataclass
from functools import lru_cache
from importlib import resources

import yaml

from clsim.errors import UserError


@dataclass(frozen=True)
class Preset:
    name: str
    paper: str
    source: str
    table: str
    metric: str
    published: float | None
    note: str
    train_per_class: int
    options: dict


@lru_cache(maxsize=1)
def all_presets() -> dict[str, Preset]:
    """Every preset shipped with clsim, by name (files read in name order)."""
    out: dict[str, Preset] = {}
    for path in sorted(resources.files(__name__).iterdir(), key=lambda p: p.name):
        if not path.name.endswith(".yaml"):
            continue
        doc = yaml.safe_load(path.read_text())
        for name, entry in doc["presets"].items():
            if name in out:
                raise ValueError(f"preset {name} is defined twice")
            published = entry["published"]
            out[name] = Preset(name, doc["paper"], doc["source"], entry["table"], doc["metric"],
                               None if published is None else float(published), entry.get("note", ""),
                               int(doc["train_per_class"]),
                               {**doc["common"], **entry["options"]})
    return out


def get(name: str) -> Preset:
    presets = all_presets()
    if name not in presets:
        raise UserError(f"unknown preset {name!r}; --list shows the presets: {', '.join(presets)}")
    return presets[name]


def listing() -> list[str]:
    lines = ["presets (--preset NAME; flags override; bench/reproduce.py compares them with the papers):"]
    paper = None
    for p in all_presets().values():
        if p.paper != paper:
            paper = p.paper
            lines.append(f"  {paper}")
        figure = "not read" if p.published is None else f"{p.published:g}"
        lines.append(f"    {p.name:32s} {p.table} (published {p.metric.upper()} {figure})")
    return lines
