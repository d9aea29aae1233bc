"""`Experiment`: one typed, validated description of a run, and the one place a run is assembled.

    from clsim import Experiment
    result = Experiment(scenario="split_digits", strategy="ewc", ewc_lambda=5, epochs=1, seed=3).run()
    result.summary["acc"], result.run_dir, result.matrix
    result.task_aware_acc, result.task_aware_matrix   # class_il: the task identity given at test time

The same options come from Python keyword arguments, a YAML file (`Experiment.from_yaml`) or the
command line (`Experiment.from_argv`, what run_scenario.py does): every way ends in
`Experiment(**values)`, so every way accepts the same names and fails with the same one-line
UserError. Option names are the dataclass fields of the run, the audit, the scenario, the
strategy and the privacy mechanism (`--ewc-lambda` is `ewc_lambda=`). Objects may stand where a
name would go: a Scenario (e.g. `clsim.scenarios.avalanche.from_avalanche(benchmark)`), a Strategy
subclass or instance, a Mechanism instance, a model (an nn.Module, or a function making one).
Objects are used as given: a model or strategy instance run twice continues from its trained
state; pass a model factory and a Strategy subclass for fresh ones per run.

`build()` assembles the parts in the fixed order documented in docs/architecture.md; `run()`
builds, trains through clsim.engine and writes the run directory.
"""
from __future__ import annotations

import dataclasses
import functools
import hashlib
import os
import platform
import random
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import numpy as np
import torch
from torch import nn

from clsim import config, engine, presets, protocol, rundir
from clsim.engine import Parts
from clsim.errors import UserError
from clsim.loggers import LogContext, Logger, to_json
from clsim.loggers.progress import ProgressLogger
from clsim.models import check_size
from clsim.privacy.audit import AuditOptions, one_run, plant_canaries
from clsim.privacy.ledger import Ledger
from clsim.privacy.mechanism import Mechanism
from clsim.registry import LOGGERS, MECHANISMS, SCENARIOS, STRATEGIES
from clsim.scenario import Scenario, ScenarioOptions
from clsim.strategy import Strategy

DEFAULT_SCENARIO, DEFAULT_STRATEGY = "split_digits", "naive"
#: the keys that choose the parties (their options depend on them)
NAMING_KEYS = ("scenario", "strategy", "privacy", "loggers")


@dataclass
class Result:
    """What `Experiment.run()` returns."""
    summary: dict                  # what summary.json holds
    run_dir: Path | None           # None when the experiment was given out=None
    matrix: np.ndarray             # accuracy_matrix: row i = scores on every task after task i

    @property
    def acc(self) -> float:
        return self.summary["acc"]

    @property
    def task_aware_acc(self) -> float | None:
        """class_il: final ACC of the same model with the task identity given at test time
        (Mammoth's Task-IL column); None in task_il and domain_il runs."""
        return self.summary["task_aware"]["acc"] if "task_aware" in self.summary else None

    @property
    def task_aware_matrix(self) -> np.ndarray | None:
        """class_il: the task-aware accuracy matrix, laid out as `matrix`; None otherwise."""
        aware = self.summary.get("task_aware")
        return None if aware is None else np.asarray(aware["accuracy_matrix"], dtype=float)


def load_yaml(path: str | os.PathLike) -> dict:
    """A YAML file of option: value pairs (keys are option or flag names). Parsed with safe_load:
    loading never runs code."""
    import yaml
    try:
        with open(path, encoding="utf-8") as f:
            data = yaml.safe_load(f)
    except OSError as exc:
        raise UserError(f"cannot read config file {path}: {exc.strerror}") from None
    except UnicodeDecodeError:
        raise UserError(f"config file {path} is not UTF-8 text; write option: value lines") from None
    except yaml.YAMLError as exc:
        raise UserError(f"config file {path} is not valid YAML ({type(exc).__name__})") from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise UserError(f"config file {path} must be a mapping of option names to values")
    empty = [str(k) for k, v in data.items() if v is None]
    if empty:   # `epochs:` with nothing after it: a slip, not a request for the default
        raise UserError(f"config file {path} gives {empty[0]} no value; give one or remove the line")
    return {str(k).replace("-", "_"): v for k, v in data.items()}


def _name_of(registry, obj) -> str:
    """The registered name of a party given as an object (its class's name when unregistered)."""
    cls = obj if isinstance(obj, type) else type(obj)
    for entry in registry.entries():
        if entry.target is cls:
            return entry.name
    return getattr(obj, "name", None) if isinstance(getattr(obj, "name", None), str) else cls.__name__.lower()


class Experiment:
    """A run's full description, validated when made (see the module docstring)."""

    def __init__(self, scenario: str | Scenario | None = None, strategy: str | type | Strategy | None = None, *,
                 privacy: str | Mechanism | None = None,
                 model: nn.Module | Callable[[], nn.Module] | None = None,
                 loggers: str | list | None = None, preset: str | None = None, **options):
        self.preset = preset
        preset_keys = set()
        if preset is not None:   # a published protocol's options (clsim/presets); the others override them
            named = {"scenario": scenario, "strategy": strategy, "privacy": privacy, "loggers": loggers}
            preset_keys = set(presets.get(preset).options)
            values = {**presets.get(preset).options, **{k: v for k, v in named.items() if v is not None}, **options}
            scenario, strategy, privacy, loggers = (values.pop(k, None) for k in named)
            options = values
        self.scenario = scenario if scenario is not None else DEFAULT_SCENARIO
        self.strategy = strategy if strategy is not None else DEFAULT_STRATEGY
        self.privacy, self.model, self.loggers = privacy, model, loggers
        self._check_objects()
        groups = self.option_groups()
        owner: dict[str, str] = {}
        for title, cls in groups.items():
            for name in config.fields(cls):
                if name in owner:
                    raise UserError(f"option {config.flag(name)} is defined by both {owner[name]} and {title}")
                owner[name] = title
        unknown = sorted(set(options) - set(owner))
        if unknown:
            where = f" (set by preset {preset})" if preset_keys & set(unknown) else ""
            flags = ", ".join(config.flag(k) for k in unknown)
            raise config.OptionError(unknown[0], f"unknown option(s) {flags}{where} for scenario {self.scenario_name} "
                                     f"and strategy {self.strategy_name}; see `python run_scenario.py --scenario "
                                     f"{self.scenario_name} --strategy {self.strategy_name} --help`")
        self.given = {k: v for k, v in options.items() if v is not None}
        for key in ("privacy", "loggers"):   # names are recorded with the run options
            if isinstance(getattr(self, key), str):
                self.given[key] = getattr(self, key)
        self.write = not ("out" in options and options["out"] is None)   # out=None: no files
        built = {title: config.build(cls, self.given) if cls is not None else None
                 for title, cls in groups.items()}
        self.run_options: config.RunOptions = built["run options"]
        designed = self.strategy_cls.default_setting
        if self.run_options.setting is None and designed is not None and isinstance(self.scenario, str):
            self.run_options = dataclasses.replace(self.run_options, setting=designed)
            if getattr(self.scenario_entry.options, "SETTING", None) != designed:
                self.noted_setting = designed   # said once, when the run is built, where it overrides
        self.protocol_options: config.ProtocolOptions = built["training protocol"]
        self.audit_options: AuditOptions = built["privacy audit"]
        self.scenario_options = built[f"scenario {self.scenario_name}"]
        if self.model is not None and getattr(self.scenario_options, "task_heads", "separate") != "separate":
            raise UserError("task_heads lays out the output layer of the scenario's own model; a model you pass "
                            "brings its own heads: drop task_heads, or build the layout into your model")
        self.strategy_options = built[f"strategy {self.strategy_name}"]
        self.mechanism_options = built.get(f"privacy {self.mechanism_name}")
        if getattr(self.mechanism_options, "noise_multiplier", None) == 0:
            print(f"warning: --noise-multiplier 0 adds no noise: this {self.mechanism_name} run has no privacy "
                  f"(ε = ∞); give a positive --noise-multiplier or --epsilon", file=sys.stderr)

    # -- the three doors ----------------------------------------------------------------------
    @classmethod
    def from_yaml(cls, path: str | os.PathLike, **overrides) -> "Experiment":
        """The options of a YAML file; keyword arguments override them."""
        values = load_yaml(path)
        return cls._made({k: path for k in values if k not in overrides}, {**values, **overrides})

    @classmethod
    def from_argv(cls, argv: list[str]) -> "Experiment":
        """The command line of run_scenario.py (`--config FILE` reads YAML; flags override it).
        `--help` prints the options of the chosen scenario, strategy and mechanism and exits."""
        from clsim import cli
        values, from_file = cli.parse(argv)
        return cls._made(from_file, values)

    @classmethod
    def _made(cls, from_file: dict, values: dict) -> "Experiment":
        """`cls(**values)`; a bad value read from a file says which file (`from_file`: key -> path)."""
        try:
            return cls(**values)
        except config.OptionError as exc:
            if exc.name not in from_file:
                raise
            raise config.OptionError(exc.name, f"{exc} (in {from_file[exc.name]})") from None

    # -- what was chosen ----------------------------------------------------------------------
    def _check_objects(self) -> None:
        for key in ("scenario", "strategy", "privacy", "loggers"):
            if isinstance(getattr(self, key), str) and not getattr(self, key).strip():
                raise UserError(f"--{key} is empty; give it a value or leave it out")
        if isinstance(self.scenario, str):
            self.scenario_entry = SCENARIOS.get(self.scenario)
        elif not isinstance(self.scenario, Scenario):
            raise UserError(f"scenario must be a name or a clsim Scenario, got {type(self.scenario).__name__}")
        if isinstance(self.strategy, str):
            self.strategy_cls = STRATEGIES.get(self.strategy).target
        elif isinstance(self.strategy, type) and issubclass(self.strategy, Strategy):
            self.strategy_cls = self.strategy
        elif isinstance(self.strategy, Strategy):
            self.strategy_cls = type(self.strategy)
        else:
            raise UserError(f"strategy must be a name, a Strategy subclass or instance, "
                            f"got {type(self.strategy).__name__}")
        privacy = self.privacy if self.privacy is not None else self.strategy_cls.privacy
        self.mechanism_entry = MECHANISMS.get(privacy) if isinstance(privacy, str) else None
        if privacy is not None and not isinstance(privacy, (str, Mechanism)):
            raise UserError(f"privacy must be a mechanism name or a Mechanism, got {type(privacy).__name__}")
        names = self.loggers if self.loggers is not None else config.RunOptions.loggers
        if isinstance(names, str):
            names = [n.strip() for n in names.split(",") if n.strip()]
        if not isinstance(names, (list, tuple)):
            raise UserError(f"loggers must be comma-separated names or a list, got {type(names).__name__}")
        self.logger_classes = []
        for item in names:
            if isinstance(item, str):
                self.logger_classes.append((item, LOGGERS.get(item).target))
            elif isinstance(item, type) and issubclass(item, Logger):
                self.logger_classes.append((_name_of(LOGGERS, item), item))
            else:
                raise UserError(f"a logger must be a name or a clsim Logger subclass, got {item!r}")
        if self.model is not None and not (isinstance(self.model, nn.Module) or callable(self.model)):
            raise UserError(f"model must be a torch nn.Module or a function returning one, "
                            f"got {type(self.model).__name__}")

    @property
    def scenario_name(self) -> str:
        return self.scenario if isinstance(self.scenario, str) else self.scenario.name

    @property
    def strategy_name(self) -> str:
        return self.strategy if isinstance(self.strategy, str) else _name_of(STRATEGIES, self.strategy)

    @property
    def mechanism_name(self) -> str:
        privacy = self.privacy if self.privacy is not None else self.strategy_cls.privacy
        if privacy is None:
            return Mechanism.name
        return privacy if isinstance(privacy, str) else privacy.name

    def option_groups(self) -> dict[str, type | None]:
        """Title -> options dataclass of every party whose options come from names (a party
        given as an object brings its own), in the order `--help` lists them."""
        groups = {"run options": config.RunOptions, "training protocol": config.ProtocolOptions,
                  "privacy audit": AuditOptions,
                  f"scenario {self.scenario_name}": self.scenario_entry.options
                  if isinstance(self.scenario, str) else None,
                  f"strategy {self.strategy_name}": None if isinstance(self.strategy, Strategy)
                  else self.strategy_cls.Options}
        if self.mechanism_entry is not None:
            groups[f"privacy {self.mechanism_name}"] = self.mechanism_entry.options
        for name, cls in self.logger_classes:
            groups[f"logger {name}"] = getattr(cls, "Options", None)
        return groups

    def help_defaults(self) -> dict[str, str]:
        """Option name -> the default --help prints where the field's own is not what a run uses:
        the run defaults the scenario declares (with each value of the option that changes them),
        the setting the strategy is designed for, and the values of a --preset."""
        out = {}
        cls = self.scenario_entry.options if isinstance(self.scenario, str) else None
        if isinstance(cls, type) and issubclass(cls, ScenarioOptions):
            base, depend = cls().run_defaults(), cls.DEFAULTS_DEPEND_ON
            for key, value in base.items():
                out[key] = f"{value} for {self.scenario_name}"
                for choice in cls.__dataclass_fields__[depend].metadata["choices"] if depend else ():
                    other = cls(**{depend: choice}).run_defaults().get(key)
                    if other != value:
                        out[key] += f"; {other} with {config.flag(depend)} {choice}"
            out["setting"] = f"{cls.SETTING} for {self.scenario_name}"
        if self.strategy_cls.default_setting is not None and isinstance(self.scenario, str):
            out["setting"] = f"{self.strategy_cls.default_setting}, the setting strategy {self.strategy_name} is designed for"
        if self.preset is not None:
            out.update({k: f"{v}, from preset {self.preset}" for k, v in presets.get(self.preset).options.items()})
        return out

    def as_argv(self) -> list[str]:
        """The given options as flags, so a resumed run rebuilds the same experiment."""
        if not all(isinstance(x, str) for x in (self.scenario, self.strategy)) or \
                not all(x is None or isinstance(x, str) for x in (self.privacy, self.loggers)) or \
                self.model is not None:
            return []   # objects have no flags: such an experiment is rebuilt in Python only
        out = ["--scenario", self.scenario, "--strategy", self.strategy]
        for key, value in self.given.items():
            out += [config.flag(key), str(value)]
        return out

    # -- assembly ----------------------------------------------------------------------------
    def build(self, run_dir: Path | None = None, resume_step: int | None = None) -> Parts:
        """Assemble the run, in this order (docs/architecture.md, "build() order"):

        1. device and seed: one --seed fixes every random stream
        2. scenario: the named builder, or the Scenario given
        3. model and learner: the scenario's make_model (or the given model) is the first of the
           three steps that may change the model; the learner owns it from here on. The training
           protocol is checked against both and carves the validation sets (clsim/protocol.py)
        4. strategy, mechanism, ledger
        5. mechanism.check: validates the settings and attaches the mechanism (a private one may
           replace layers, e.g. BatchNorm -> GroupNorm): the second model step
        6. engine.setup: mechanism.setup, then strategy.setup, which refuses a setting or learner
           kind the strategy does not declare, and may re-initialise the weights it works on
           (BLIP): the third and last model step
        7. loggers: those of --loggers writing into `run_dir` (without one, only those that write
           no files), and the progress lines
        """
        parts = self._assemble()
        parts.loggers = self.make_loggers(parts, run_dir, resume_step)
        return parts

    def _assemble(self) -> Parts:
        """Steps 1-6 of `build`."""
        run = self.run_options
        if getattr(self, "noted_setting", None):
            print(f"note: {self.strategy_name} runs in {self.noted_setting}, the setting it is designed for "
                  f"(no --setting given)", file=sys.stderr)
        device = torch_device(run.device)
        generator = seed_everything(run.seed, device)
        scenario = self.scenario_entry.target(self.scenario_options, run) \
            if isinstance(self.scenario, str) else self.scenario
        epochs = run.epochs or scenario.defaults.get("epochs", 1)
        training = self.protocol_options
        from clsim.learners.supervised import SupervisedLearner
        learner_cls = scenario.learner_cls or SupervisedLearner
        if not isinstance(self.model, nn.Module):
            check_size(self.model or scenario.make_model, device)
        model = self.model if isinstance(self.model, nn.Module) else \
            (self.model or scenario.make_model)()
        learner = learner_cls(model, lr=run.lr or scenario.defaults.get("lr", 0.01), momentum=run.momentum,
                              batch_size=run.batch_size or scenario.defaults.get("batch_size", 32),
                              device=device, generator=generator, optimizer=training.optimizer,
                              **scenario.learner_kwargs)
        protocol.check(training, scenario, epochs, learner)
        if self.audit_options.audit is not None and learner.kind != "supervised":
            raise UserError(f"--audit {self.audit_options.audit} attacks labelled examples, which scenario "
                            f"{scenario.name} ({learner.kind}) does not have: drop --audit")
        protocol.carve_validation(scenario, training.val_fraction, run.seed)
        audit = self.audit_options
        self.canaries = plant_canaries(scenario, audit.audit_canaries, run.seed) if audit.audit == "one-run" else None
        strategy = self.strategy if isinstance(self.strategy, Strategy) else self.strategy_cls(self.strategy_options)
        privacy = self.privacy if self.privacy is not None else self.strategy_cls.privacy
        mechanism = privacy if isinstance(privacy, Mechanism) else \
            self.mechanism_entry.target(self.mechanism_options) if self.mechanism_entry else Mechanism()
        ledger = Ledger(**mechanism.ledger_options())
        speed_options(learner, run, mechanism)
        mechanism.check(learner, scenario, epochs, strategy.fisher_releases, model_forwards=strategy.model_forwards)
        mechanism.attach(learner)
        engine.setup(scenario, strategy, learner, mechanism, ledger, epochs)
        hparams = {"scenario": scenario.name, "strategy": self.strategy_name, "setting": scenario.setting,
                   "seed": run.seed, "epochs": epochs, "lr": learner.lr, "batch_size": learner.batch_size,
                   "privacy": mechanism.name, **dataclasses.asdict(training)}
        for options in (self.scenario_options, strategy.options, mechanism.options):
            if dataclasses.is_dataclass(options):
                hparams.update(dataclasses.asdict(options))
        return Parts(scenario, learner, strategy, mechanism, ledger, [], epochs, hparams)

    def make_loggers(self, parts: Parts, run_dir: Path | None, resume_step: int | None = None) -> list[Logger]:
        """The --loggers, each with its options, writing into `run_dir` (without one: only those
        that write no files), and the progress lines."""
        planned = [parts.epochs * parts.learner.privacy_plan(t).releases_per_epoch for t in parts.scenario.tasks]
        context = LogContext(run_dir, parts.hparams, parts.scenario.score_scale, self.run_options.progress,
                             resume_step, planned)
        loggers = [cls(context, config.build(cls.Options, self.given) if getattr(cls, "Options", None) else None)
                   for _, cls in self.logger_classes if run_dir is not None or not cls.writes_files]
        return loggers + [ProgressLogger(context)]

    # -- running -----------------------------------------------------------------------------
    def run(self, resume_dir: Path | None = None) -> Result:
        """Build, train, and write the run directory, which appears only when the run succeeds
        (out=None: nothing is written). With `resume_dir` (an interrupted run's hidden .partial
        directory) continue that run from its last checkpoint."""
        run = self.run_options
        if not self.write:
            if self.loggers is not None and any(cls.writes_files for _, cls in self.logger_classes):
                raise UserError("out=None writes no files, so it takes no file-writing loggers; "
                                "give out= a directory or drop loggers=")
            parts = self.build()
            summary = self._train(parts, None, None)
            return Result(summary, None, np.asarray(summary["accuracy_matrix"], dtype=float))
        if resume_dir is None:
            rundir.check_out(run.out)   # refuse a bad --out before any work
        parts = self._assemble()   # user mistakes surface here, before a directory is claimed
        if resume_dir is None:
            directory = rundir.RunDirectory.claim(
                run.out, f"{self.scenario_name}-{self.strategy_name}-{parts.scenario.setting}-seed{run.seed}")
        else:
            directory = rundir.RunDirectory.reopen(resume_dir)
        config = to_json({**parts.hparams, "argv": self.as_argv(), "run": dataclasses.asdict(run),
                          "audit": dataclasses.asdict(self.audit_options), "versions": versions(),
                          "scenario_info": parts.scenario.info})
        with directory.guard():
            state = directory.load_checkpoint(config) if directory.resumed else None
            with engine.checkpoint_fields():
                resume_step = None if state is None else state["progress"]["step"]
            parts.loggers = self.make_loggers(parts, directory.path, resume_step)
            if state is None:
                directory.write_config(config)
            summary = self._train(parts, directory, state)
            final = directory.finish(to_json(summary))
        return Result(summary, final, np.asarray(summary["accuracy_matrix"], dtype=float))

    def _train(self, parts: Parts, directory: rundir.RunDirectory | None, state: dict | None) -> dict:
        run = self.run_options
        save = None
        if directory is not None:
            def save(state):   # with the loggers' file sizes, to which a resumed run cuts them back
                files = {k: v for logger in parts.loggers for k, v in logger.file_sizes().items()}
                directory.task_finished(state if run.checkpoint else None, files)
        try:
            result = parts.train(checkpoint=save, resume=state, protocol=self.protocol_options)
            if self.audit_options.audit == "mia":
                from clsim.privacy.audit import mia
                result["audit"] = mia(parts.learner, parts.scenario, parts.ledger,
                                      self.audit_options.audit_examples, run.seed)
            if self.audit_options.audit == "one-run":
                result["audit"] = one_run(parts.learner, parts.scenario, self.canaries, parts.ledger,
                                          self.audit_options.audit_guesses)
            summary = {"scenario": parts.scenario.name, "strategy": self.strategy_name,
                       "setting": parts.scenario.setting, "seed": run.seed,
                       "privacy_mechanism": parts.mechanism.name, "hparams": parts.hparams,
                       "scenario_info": parts.scenario.info, **result}
            for logger in parts.loggers:
                logger.close(summary)
        except BaseException:   # before the directory is removed or kept: no writer thread outlives it
            for logger in parts.loggers:
                logger.abort()
            raise
        return summary


def seed_everything(seed: int, device: torch.device = torch.device("cpu")) -> torch.Generator:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)
    if device.type == "cuda":   # same seed, same figures: no atomics-based or autotuned kernels
        os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
        torch.use_deterministic_algorithms(True, warn_only=True)
        torch.backends.cudnn.benchmark = False
    return torch.Generator().manual_seed(seed)


def speed_options(learner, run, mechanism: Mechanism) -> None:
    """--compile and --precision (refused or said before the mechanism's own log lines)."""
    if not run.compile and run.precision == "32":
        return
    if not hasattr(learner, "speed_options"):
        raise UserError("--compile and --precision apply to supervised scenarios; drop them here")
    private = type(mechanism) is not Mechanism
    if private and run.precision != "32":
        raise UserError("--precision bf16-mixed cannot train under --privacy: clipping and noise are "
                        "calibrated in float32; drop one of them")
    blocker = f"--privacy {mechanism.name} computes per-example gradients on the eager model" if private else None
    learner.speed_options(run.compile, run.precision, blocker)


def torch_device(name: str) -> torch.device:
    """The --device as a torch device, refused when torch cannot use it here."""
    try:
        device = torch.device(name)
    except RuntimeError:
        raise UserError(f"--device {name!r} is not a torch device; use cpu, cuda or cuda:N") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise UserError(f"--device {name}: torch sees no CUDA device on this machine; use --device cpu")
    if device.type == "cuda" and device.index is not None and device.index >= torch.cuda.device_count():
        raise UserError(f"--device {name}: this machine has {torch.cuda.device_count()} CUDA device(s)")
    if device.type not in ("cpu", "cuda"):
        raise UserError(f"--device {name}: clsim runs on cpu or cuda")
    return device


def versions() -> dict:
    """What the figures depend on besides the options: library versions and a digest of clsim's
    own source (its version string does not change with every edit of a clone)."""
    import clsim
    out = {"python": platform.python_version(), "torch": torch.__version__, "numpy": np.__version__,
           "clsim": clsim.__version__, "clsim_source": source_digest()}
    for pkg in ("opacus", "gymnasium", "avalanche-lib"):
        try:
            from importlib.metadata import version
            out[pkg] = version(pkg)
        except Exception:
            pass
    return out


@functools.lru_cache(maxsize=1)
def source_digest() -> str:
    """sha256 (first 16 hex digits) of the .py files of clsim and its scenarios and strategies."""
    import clsim
    import clsim.scenarios
    import clsim.strategies
    digest = hashlib.sha256()
    for package in (clsim, clsim.scenarios, clsim.strategies):
        root = Path(package.__path__[0])
        for path in sorted(root.rglob("*.py")):
            if package is clsim and path.relative_to(root).parts[0] in ("scenarios", "strategies"):
                continue   # a checkout may link them inside clsim/; each file is read once
            digest.update(f"{package.__name__}/{path.relative_to(root)}\n".encode())
            digest.update(path.read_bytes())
    return digest.hexdigest()[:16]
