"""`Experiment`: one typed, validated description of a run, and the one place a run is assembled.

    from clsim import Experiment
    result = Experiment(scenario="split_digits", strategy="ewc", ewc_lambda=5, epochs=1, seed=3).run()
    result.summary["acc"], result.run_dir, result.matrix
    result.task_aware_acc, result.task_aware_matrix   # class_il: the task identity given at test time

The same options come from Python keyword arguments, a YAML file (`Experiment.from_yaml`) or the
command line (`clsim.cli.from_argv`, which knows the flags; this module knows nothing of them):
every way ends in `Experiment(**values)`, so every way accepts the same names and fails with the
same one-line UserError. Option names are the dataclass fields of the run, the audit, the scenario, the
strategy and the privacy mechanism (`--ewc-lambda` is `ewc_lambda=`). Objects may stand where a
name would go: a Scenario (e.g. `clsim.scenarios.avalanche.from_avalanche(benchmark)`), a Strategy
subclass or instance, a Mechanism instance, a model (an nn.Module, or a function making one).
A model instance is copied for each run, so a run never changes it and every run of it starts
from the same weights (a second run used to continue from the first one's training); a model
passed in is tried on each task's inputs before training (`clsim.models.check_contract`). A
strategy instance is used as given (its setup resets it).

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

from clsim import config, console, distributed, engine, presets, protocol, rundir
from clsim.audits import Audit
from clsim.engine import Parts
from clsim.errors import UserError, did_you_mean
from clsim.loggers import LogContext, Logger, to_json
from clsim.loggers.progress import ProgressLogger
from clsim.models import check_contract, check_size, own_copy
from clsim.parties import Parties
from clsim.privacy.audit import AuditOptions
from clsim.privacy.ledger import Ledger
from clsim.privacy.mechanism import Mechanism
from clsim.scenario import Scenario
from clsim.strategy import Strategy


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
        self.parties = Parties(scenario, strategy, privacy, loggers)
        options = {**options, **self.parties.scenario_argument}   # e.g. metaworld:reach-v3
        self.scenario, self.strategy = self.parties.scenario, self.parties.strategy
        self.privacy, self.model, self.loggers = privacy, model, loggers
        if model is not None and not (isinstance(model, nn.Module) or callable(model)):
            raise UserError(f"model must be a torch nn.Module or a function returning one, "
                            f"got {type(model).__name__}")
        groups = self.parties.option_groups()
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
            hint = did_you_mean(unknown[0], owner, config.flag) if len(unknown) == 1 else ""
            chosen = self.strategy if isinstance(self.strategy, str) else self.strategy_name
            raise config.OptionError(unknown[0], f"unknown option(s) {flags}{where} for scenario {self.scenario_name} "
                                     f"and strategy {self.strategy_name}{hint}; see `clsim run --scenario "
                                     f"{self.scenario_name} --strategy {chosen} --help`")
        self.given = {k: v for k, v in options.items() if v is not None}
        for key in ("privacy", "loggers"):   # names are recorded with the run options
            if isinstance(getattr(self, key), str):
                self.given[key] = getattr(self, key)
        self.write = not ("out" in options and options["out"] is None)   # out=None: no files
        built = {title: config.build(cls, self.given) if cls is not None else None
                 for title, cls in groups.items()}
        self.run_options: config.RunOptions = built["run options"]
        designed = self.strategy_cls.default_setting
        self.noted_setting = None   # the strategy's own setting where it overrides the scenario's: said when built
        if self.run_options.setting is None and designed is not None and isinstance(self.scenario, str):
            self.run_options = dataclasses.replace(self.run_options, setting=designed)
            if getattr(self.parties.scenario_entry.options, "SETTING", None) != designed:
                self.noted_setting = designed
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

    @classmethod
    def from_yaml(cls, path: str | os.PathLike, **overrides) -> "Experiment":
        """The options of a YAML file; keyword arguments override them."""
        values = config.load_yaml(path)
        return cls.made({k: path for k in values if k not in overrides}, {**values, **overrides})

    @classmethod
    def made(cls, from_file: dict, values: dict) -> "Experiment":
        """`cls(**values)`; a bad value read from a file says which file (`from_file`: key -> path)."""
        try:
            return cls(**values)
        except config.OptionError as exc:
            if exc.name not in from_file:
                raise
            raise config.OptionError(exc.name, f"{exc} (in {from_file[exc.name]})") from None

    # -- what was chosen (clsim/parties.py) ---------------------------------------------------
    @property
    def strategy_cls(self) -> type:
        return self.parties.strategy_cls

    @property
    def scenario_name(self) -> str:
        return self.parties.scenario_name

    @property
    def strategy_name(self) -> str:
        return self.parties.strategy_name

    @property
    def mechanism_name(self) -> str:
        return self.parties.mechanism_name

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
        if self.noted_setting and distributed.rank() == 0:
            print(f"note: {self.strategy_name} runs in {self.noted_setting}, the setting it is designed for "
                  f"(no --setting given)", file=sys.stderr)
        device = torch_device(distributed.device(run.device))
        generator = seed_everything(run.seed, device)
        scenario = self.parties.scenario_entry.target(self.scenario_options, run) \
            if isinstance(self.scenario, str) else self.scenario
        epochs = run.epochs or scenario.defaults["epochs"]
        training = self.protocol_options
        from clsim.learners.supervised import SupervisedLearner
        learner_cls = scenario.learner_cls or SupervisedLearner
        if not isinstance(self.model, nn.Module):
            check_size(self.model or scenario.make_model, device)
        model = own_copy(self.model) if isinstance(self.model, nn.Module) else \
            (self.model or scenario.make_model)()
        learner = learner_cls(model, lr=run.lr or scenario.defaults["lr"], momentum=run.momentum,
                              batch_size=run.batch_size or scenario.defaults["batch_size"],
                              device=device, generator=generator, optimizer=training.optimizer,
                              **scenario.learner_kwargs)
        protocol.check(training, scenario, epochs, learner)
        protocol.carve_validation(scenario, training.val_fraction, run.seed)
        self.audit = Audit(self.audit_options, run.seed)
        self.audit.prepare(scenario, learner)
        strategy = self.strategy if isinstance(self.strategy, Strategy) else self.strategy_cls(self.strategy_options)
        chosen, entry = self.parties.mechanism, self.parties.mechanism_entry
        mechanism = chosen if isinstance(chosen, Mechanism) else \
            entry.target(self.mechanism_options) if entry else Mechanism()
        if self.model is not None and learner.kind == "supervised":   # the scenario's own models keep it
            check_contract(learner.model, scenario.tasks, private=type(mechanism) is not Mechanism)
        ledger = Ledger(**mechanism.ledger_options())
        distributed.check(scenario, learner, strategy, mechanism)
        speed_options(learner, run, mechanism)
        if type(mechanism) is not Mechanism and getattr(learner, "no_private_training", None):
            raise UserError(learner.no_private_training)   # e.g. SAC: its replay buffer is raw access
        mechanism.check(learner, scenario, epochs, strategy.fisher_releases, model_forwards=strategy.model_forwards,
                        data_terms=strategy.data_terms)
        mechanism.attach(learner)
        engine.setup(scenario, strategy, learner, mechanism, ledger, epochs)
        if type(mechanism) is not Mechanism:   # said before training, whatever --progress says
            for line in console.epsilon_warnings(strategy, mechanism, self.strategy_name):
                print(f"warning: {line}", file=sys.stderr)
        hparams = {"scenario": scenario.name, "strategy": self.strategy_name, "setting": scenario.setting,
                   "seed": run.seed, "epochs": epochs, "lr": learner.lr, "batch_size": learner.batch_size,
                   "privacy": mechanism.name, **dataclasses.asdict(training)}
        for options in (self.scenario_options, strategy.options, mechanism.options):
            if dataclasses.is_dataclass(options):
                hparams.update(dataclasses.asdict(options))
        return Parts(scenario, learner, strategy, mechanism, ledger, [], epochs, hparams)

    def make_loggers(self, parts: Parts, run_dir: Path | None, resume_step: int | None = None,
                     destination: Path | None = None) -> list[Logger]:
        """The --loggers, each with its options, writing into `run_dir` (without one: only those
        that write no files), and the console's lines (`destination`: where the finished run will
        be, if not `run_dir`)."""
        planned = [parts.epochs * parts.learner.privacy_plan(t).releases_per_epoch for t in parts.scenario.tasks]
        context = LogContext(run_dir, parts.hparams, parts.scenario.score_scale, self.run_options.progress,
                             resume_step, planned, self.run_options.device, destination or run_dir)
        loggers = [cls(context, config.build(cls.Options, self.given) if getattr(cls, "Options", None) else None)
                   for _, cls in self.parties.logger_classes if run_dir is not None or not cls.writes_files]
        return loggers + [ProgressLogger(context)]

    # -- running -----------------------------------------------------------------------------
    def run(self, resume_dir: Path | None = None) -> Result:
        """Build, train, and write the run directory, which appears only when the run succeeds
        (out=None: nothing is written). With `resume_dir` (an interrupted run's hidden .partial
        directory) continue that run from its last checkpoint."""
        run = self.run_options
        if (run.address is not None or run.workers > 1) and distributed.launched() == 1:   # start the workers
            summary, run_dir = distributed.launch_on_ray(self, run.workers, run.address, resume_dir) \
                if run.address is not None else distributed.launch(self, run.workers, resume_dir)
            return Result(summary, run_dir, np.asarray(summary["accuracy_matrix"], dtype=float))
        with distributed.group(run.workers, run.device, {**self.given, "scenario": self.scenario_name,
                                                          "strategy": self.strategy_name}):
            return self._run_here(resume_dir)

    def _run_here(self, resume_dir: Path | None) -> Result:
        """`run` in this process (one worker of a data-parallel run, or the only one)."""
        run = self.run_options
        if distributed.rank() > 0:   # a worker besides rank 0 trains its share and writes nothing
            parts = self._assemble()
            summary = self._train(parts, None, None)
            return Result(summary, None, np.asarray(summary["accuracy_matrix"], dtype=float))
        if not self.write:
            if self.loggers is not None and any(cls.writes_files for _, cls in self.parties.logger_classes):
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
        distributed.note_run_directory(directory.path)
        with directory.guard():
            state = directory.load_checkpoint(config) if directory.resumed else None
            with engine.checkpoint_fields():
                resume_step = None if state is None else state["progress"]["step"]
            parts.loggers = self.make_loggers(parts, directory.path, resume_step, directory.root / directory.final_name)
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
        state = distributed.broadcast(state)   # rank 0's checkpoint, on every worker
        try:
            result = parts.train(checkpoint=save, resume=state, protocol=self.protocol_options)
            audit = self.audit.result(parts)
            if audit is not None:
                result["audit"] = audit
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
