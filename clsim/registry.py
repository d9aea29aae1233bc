"""Name registries for scenarios, strategies, privacy mechanisms and loggers.

Built-in entries live one per file in their packages (scenarios/, strategies/, clsim/loggers/)
and register themselves on import; third-party packages register through the entry-point groups
`clsim.scenarios`, `clsim.strategies`, `clsim.mechanisms` and `clsim.loggers` (each entry point
names a module to import), so a new one is one file outside clsim/ (docs/architecture.md, "Plugins").
A mechanism subclasses clsim.privacy.mechanism.Mechanism and records its releases with
`ledger.record` (a new kind registers its RDP curve with clsim.privacy.accounting.register_rdp).
"""
from __future__ import annotations

import importlib
import pkgutil
from dataclasses import dataclass
from importlib.metadata import entry_points
from typing import Any, Callable

from clsim.errors import UserError


@dataclass
class Entry:
    name: str
    target: Any            # a Strategy subclass, or a scenario builder function
    options: type | None   # the typed options dataclass, or None
    description: str


class Registry:
    def __init__(self, kind: str, package: str | None, group: str | None):
        self.kind, self.package, self.group = kind, package, group
        self._entries: dict[str, Entry] = {}
        self._loaded = False

    def register(self, name: str, options: type | None = None) -> Callable:
        def decorate(target):
            if name in self._entries and self._entries[name].target is not target:
                raise ValueError(f"{self.kind} {name!r} is registered twice")
            doc = (target.__doc__ or "").strip().splitlines()
            self._entries[name] = Entry(name, target, options if options is not None
                                        else getattr(target, "Options", None), doc[0] if doc else "")
            return target
        return decorate

    def _load(self) -> None:
        if self._loaded:
            return
        self._loaded = True
        if self.package:
            pkg = importlib.import_module(self.package)
            for info in pkgutil.iter_modules(pkg.__path__):
                if not info.name.startswith("_"):
                    importlib.import_module(f"{self.package}.{info.name}")
        if self.group:
            for ep in entry_points(group=self.group):
                ep.load()

    def get(self, name: str) -> Entry:
        self._load()
        if name not in self._entries:
            raise UserError(f"unknown {self.kind} {name!r}; choose one of: {', '.join(self.names())}")
        return self._entries[name]

    def names(self) -> list[str]:
        self._load()
        return sorted(self._entries)

    def entries(self) -> list[Entry]:
        return [self._entries[n] for n in self.names()]


SCENARIOS = Registry("scenario", "clsim.scenarios", "clsim.scenarios")
STRATEGIES = Registry("strategy", "clsim.strategies", "clsim.strategies")
MECHANISMS = Registry("privacy mechanism", "clsim.privacy", "clsim.mechanisms")
LOGGERS = Registry("logger", "clsim.loggers", "clsim.loggers")

register_scenario = SCENARIOS.register
register_strategy = STRATEGIES.register
register_mechanism = MECHANISMS.register
register_logger = LOGGERS.register
