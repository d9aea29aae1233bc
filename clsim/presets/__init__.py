"""Published protocols as named presets: `run_scenario.py --preset NAME` (flags still override).

Each YAML file in this package describes one paper or repository: `paper`, `source`, the `metric`
compared (`acc`, final ACC in %), `train_per_class` (the full per-class training size, which
bench/reproduce.py scales with its --budget), `common` options and `presets`, each with the
`table` row it reproduces, the `published` figure (null where no readable copy of the table could
be found) and a `note` on known differences. A class_il preset may also give `published_task_il`:
the Task-IL column the same paper reports for the same single-head run (Mammoth's evaluation masks
the outputs outside each task's classes), compared with clsim's task-aware ACC (summary.json
`task_aware`). A preset's options are ordinary option: value pairs, validated like a --config file;
the entries themselves are checked strictly when read (unknown keys and wrong types refused).
"""
from __future__ import annotations

from dataclasses import dataclass
from functools import lru_cache
from importlib import resources

import yaml

from clsim.errors import UserError, did_you_mean


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
    published_task_il: float | None = None   # class_il only: the same run's Task-IL column


ENTRY_KEYS = {"table", "published", "published_task_il", "note", "options"}


def _figure(entry: dict, key: str, where: str) -> float | None:
    """A published percentage: a number in (0, 100], or null (not read)."""
    value = entry.get(key)
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0 < value <= 100:
        raise ValueError(f"{where}: {key} must be a percentage in (0, 100] or null, got {value!r}")
    return float(value)


def parse(doc: dict, where: str) -> list[Preset]:
    """The presets of one YAML document (`where` names it in errors)."""
    out = []
    for name, entry in doc["presets"].items():
        at = f"{where}, preset {name}"
        unknown = sorted(set(entry) - ENTRY_KEYS)
        if unknown or not {"table", "published", "options"} <= set(entry):
            raise ValueError(f"{at}: keys {sorted(entry)}; expected {sorted(ENTRY_KEYS)} "
                             f"(table, published and options required)")
        if not isinstance(entry["table"], str) or not isinstance(entry.get("note", ""), str) \
                or not isinstance(entry["options"], dict):
            raise ValueError(f"{at}: table and note must be text, options a mapping")
        options = {**doc["common"], **entry["options"]}
        task_il = _figure(entry, "published_task_il", at)
        if "published_task_il" in entry and options.get("setting") != "class_il":
            raise ValueError(f"{at}: published_task_il is the Task-IL column of a class_il run; "
                             f"this preset's setting is {options.get('setting')}")
        out.append(Preset(name, doc["paper"], doc["source"], entry["table"], doc["metric"],
                          _figure(entry, "published", at), entry.get("note", ""), int(doc["train_per_class"]),
                          options, task_il))
    return out


@lru_cache(maxsize=1)
def all_presets() -> dict[str, Preset]:
    """Every preset shipped with clsim, by name (files read in name order)."""
    out: dict[str, Preset] = {}
    for path in sorted(resources.files(__name__).iterdir(), key=lambda p: p.name):
        if not path.name.endswith(".yaml"):
            continue
        for preset in parse(yaml.safe_load(path.read_text()), path.name):
            if preset.name in out:
                raise ValueError(f"preset {preset.name} is defined twice")
            out[preset.name] = preset
    return out


def get(name: str) -> Preset:
    presets = all_presets()
    if name not in presets:
        raise UserError(f"unknown preset {name!r}{did_you_mean(name, presets)}; --list shows the presets: "
                        f"{', '.join(presets)}")
    return presets[name]


def listing() -> list[str]:
    lines = ["presets (--preset NAME; flags override; bench/reproduce.py compares them with the papers):"]
    paper = None
    for p in all_presets().values():
        if p.paper != paper:
            paper = p.paper
            lines.append(f"  {paper}")
        figure = "not read" if p.published is None else f"{p.published:g}"
        task_il = "" if p.published_task_il is None else f", Task-IL {p.published_task_il:g}"
        lines.append(f"    {p.name:32s} {p.table} (published {p.metric.upper()} {figure}{task_il})")
    return lines
