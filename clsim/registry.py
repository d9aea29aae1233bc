"""Name registries for scenarios, strategies, privacy mechanisms and loggers.

Built-in entries live one per file in their packages (scenarios/, strategies/, clsim/loggers/)
and register themselves on import; third-party packages register through the entry-point groups
`clsim.scenarios`, `clsim.strategies`, `clsim.mechanisms` and `clsim.loggers` (each entry point
names a module to import), so a new one is one file outside clsim/ (docs/architecture.md, "Plugins").
A mechanism subclasses clsim.privacy.mechanism.Mechanism and records its releases with
`ledger.record` (a new kind registers its RDP curve with clsim.privacy.accounting.register_rdp).
A one-file plugin needs no packaging: a name ending in `.py` is the path of a file that registers
exactly one new entry (`--strategy my_method.py`), imported once per process.
"""
from __future__ import annotations

import hashlib
import importlib
import importlib.util
import pkgutil
import sys
from dataclasses import dataclass
from pathlib import Path
from importlib.metadata import entry_points
from typing import Any, Callable

from clsim.errors import UserError, did_you_mean


class DuplicateName(ValueError):
    """Two parties registered under one name."""


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
        self._files: dict[Path, str] = {}   # a one-file plugin's resolved path -> the name it registered

    def register(self, name: str, options: type | None = None) -> Callable:
        def decorate(target):
            if name in self._entries and self._entries[name].target is not target:
                raise DuplicateName(f"{self.kind} {name!r} is registered twice "
                                    f"(already by {self._entries[name].target.__module__})")
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
        if self.is_file(name):
            return self._entries[self._load_file(name)]
        self._load()
        if name not in self._entries:
            raise UserError(f"unknown {self.kind} {name!r}{did_you_mean(name, self.names())}; "
                            f"choose one of: {', '.join(self.names())}")
        return self._entries[name]

    @staticmethod
    def is_file(name: str) -> bool:
        return name.endswith(".py")

    def _load_file(self, name: str) -> str:
        """Import the one-file plugin at path `name` (once per process) and return the one name it
        registered; a missing file, or one that registers nothing, more than one entry or a name
        already taken, or that is not Python, is a UserError (a bug inside the file raises as it
        is, with its traceback)."""
        path = Path(name).expanduser().resolve()
        if path in self._files:
            return self._files[path]
        if not path.is_file():
            raise UserError(f"{self.kind} file {name} does not exist; give the path of a .py file "
                            f"that registers one {self.kind}")
        self._load()
        before = dict(self._entries)
        module = f"clsim_plugin_{path.stem}_{hashlib.sha256(str(path).encode()).hexdigest()[:8]}"
        spec = importlib.util.spec_from_file_location(module, path)
        sys.modules[module] = importlib.util.module_from_spec(spec)   # dataclasses look their module up
        try:
            spec.loader.exec_module(sys.modules[module])
        except BaseException as exc:
            self._forget(before, module)
            if isinstance(exc, DuplicateName):
                raise UserError(f"{name}: {exc}; give yours a name of its own") from None
            if isinstance(exc, SyntaxError):   # the file is not Python: where, in one line
                raise UserError(f"{name}, line {exc.lineno}: {exc.msg}; a {self.kind} file is Python") from None
            raise
        added = sorted(set(self._entries) - set(before))
        if len(added) != 1:
            self._forget(before, module)
            raise UserError(f"{name} registers {len(added) or 'no'} {self.kind} entries{': ' if added else ''}"
                            f"{', '.join(added)}; a {self.kind} file registers exactly one, with "
                            f"@register_{self.kind.split()[-1]}('a_name')")
        self._files[path] = added[0]
        return added[0]

    def _forget(self, entries: dict, module: str) -> None:
        """Undo a plugin file's import: the registry as it was before, its module gone."""
        self._entries = entries
        sys.modules.pop(module, None)

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
