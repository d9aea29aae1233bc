"""The parties of a run, from names or objects: its scenario, strategy, privacy mechanism and
loggers, and the options dataclass each brings. `Experiment` validates its options against them;
the command line lists their flags in `--help` without making an Experiment.

A strategy may also be named by the path of a one-file strategy (`--strategy my_method.py`): the
file is imported once and must register exactly one new strategy (clsim/registry.py).
"""
from __future__ import annotations

from pathlib import Path

from clsim import config
from clsim.errors import UserError
from clsim.loggers import Logger
from clsim.privacy.audit import AuditOptions
from clsim.privacy.mechanism import Mechanism
from clsim.registry import LOGGERS, MECHANISMS, SCENARIOS, STRATEGIES
from clsim.scenario import Scenario
from clsim.strategy import Strategy

DEFAULT_SCENARIO, DEFAULT_STRATEGY = "split_digits", "naive"
#: the keys that choose the parties (their options depend on them)
NAMING_KEYS = ("scenario", "strategy", "privacy", "loggers")


def name_of(registry, obj) -> str:
    """The registered name of a party given as an object (its class's name when unregistered)."""
    cls = obj if isinstance(obj, type) else type(obj)
    for entry in registry.entries():
        if entry.target is cls:
            return entry.name
    return getattr(obj, "name", None) if isinstance(getattr(obj, "name", None), str) else cls.__name__.lower()


def split_scenario_argument(name: str) -> tuple[str, dict]:
    """`family:argument` -> (family, {the family's ARGUMENT option: argument})."""
    family, _, argument = name.partition(":")
    key = getattr(SCENARIOS.get(family).options, "ARGUMENT", None)
    if key is None:
        raise UserError(f"scenario {name!r}: {family} takes no ':' argument; use --scenario {family}")
    if not argument:
        raise UserError(f"scenario {name!r} names no task; e.g. --scenario {family}:reach-v3")
    return family, {key: argument}


class Parties:
    """Who takes part in a run, checked when made (a bad name or object is a one-line UserError)."""

    def __init__(self, scenario=None, strategy=None, privacy=None, loggers=None):
        self.scenario = scenario if scenario is not None else DEFAULT_SCENARIO
        self.strategy = strategy if strategy is not None else DEFAULT_STRATEGY
        self.privacy, self.loggers = privacy, loggers
        for key in NAMING_KEYS:
            if isinstance(getattr(self, key), str) and not getattr(self, key).strip():
                raise UserError(f"--{key} is empty; give it a value or leave it out")
        self.scenario_entry = None
        self.scenario_argument: dict = {}   # `family:argument` names (metaworld:reach-v3): the option it sets
        if isinstance(self.scenario, str) and ":" in self.scenario:
            self.scenario, self.scenario_argument = split_scenario_argument(self.scenario)
        if isinstance(self.scenario, str):
            self.scenario_entry = SCENARIOS.get(self.scenario)
        elif not isinstance(self.scenario, Scenario):
            raise UserError(f"scenario must be a name or a clsim Scenario, got {type(self.scenario).__name__}")
        self.strategy_entry = None   # a name's or a strategy file's (the name it registered)
        if isinstance(self.strategy, str):
            self.strategy_entry = STRATEGIES.get(self.strategy)
            self.strategy_cls = self.strategy_entry.target
            if STRATEGIES.is_file(self.strategy):   # kept absolute: a resumed run finds it from anywhere
                self.strategy = str(Path(self.strategy).expanduser().resolve())
        elif isinstance(self.strategy, type) and issubclass(self.strategy, Strategy):
            self.strategy_cls = self.strategy
        elif isinstance(self.strategy, Strategy):
            self.strategy_cls = type(self.strategy)
        else:
            raise UserError(f"strategy must be a name, a path to a .py file, a Strategy subclass or instance, "
                            f"got {type(self.strategy).__name__}")
        own = self.privacy if self.privacy is not None else self.strategy_cls.privacy
        if own is not None and not isinstance(own, (str, Mechanism)):
            raise UserError(f"privacy must be a mechanism name or a Mechanism, got {type(own).__name__}")
        self.mechanism = own   # what the run is trained under: given, or the strategy's own (None: no privacy)
        self.mechanism_entry = MECHANISMS.get(own) if isinstance(own, str) else None
        self.logger_classes = self._logger_classes()

    def _logger_classes(self) -> list[tuple[str, type]]:
        names = self.loggers if self.loggers is not None else config.RunOptions.loggers
        if isinstance(names, str):
            names = [n.strip() for n in names.split(",") if n.strip()]
        if not isinstance(names, (list, tuple)):
            raise UserError(f"loggers must be comma-separated names or a list, got {type(names).__name__}")
        out = []
        for item in names:
            if isinstance(item, str):
                out.append((item, LOGGERS.get(item).target))
            elif isinstance(item, type) and issubclass(item, Logger):
                out.append((name_of(LOGGERS, item), item))
            else:
                raise UserError(f"a logger must be a name or a clsim Logger subclass, got {item!r}")
        return out

    @property
    def scenario_name(self) -> str:
        return self.scenario if isinstance(self.scenario, str) else self.scenario.name

    @property
    def strategy_name(self) -> str:
        return self.strategy_entry.name if self.strategy_entry is not None else name_of(STRATEGIES, self.strategy)

    @property
    def mechanism_name(self) -> str:
        if self.mechanism is None:
            return Mechanism.name
        return self.mechanism if isinstance(self.mechanism, str) else self.mechanism.name

    def option_groups(self) -> dict[str, type | None]:
        """Title -> options dataclass of every party whose options come from names (a party
        given as an object brings its own), in the order `--help` lists them."""
        groups = {"run options": config.RunOptions, "training protocol": config.ProtocolOptions,
                  "privacy audit": AuditOptions,
                  f"scenario {self.scenario_name}": self.scenario_entry.options if self.scenario_entry else None,
                  f"strategy {self.strategy_name}": None if isinstance(self.strategy, Strategy)
                  else self.strategy_cls.Options}
        if self.mechanism_entry is not None:
            groups[f"privacy {self.mechanism_name}"] = self.mechanism_entry.options
        for name, cls in self.logger_classes:
            groups[f"logger {name}"] = getattr(cls, "Options", None)
        return groups
