"""The command line: flags from typed options, validation up front, one run directory out."""
from __future__ import annotations

import argparse
import dataclasses
import os
import platform
import random
import signal
import sys
import threading
import warnings
from pathlib import Path

import numpy as np
import torch
import yaml

from clsim import config, engine, presets, protocol, rundir
from clsim.errors import UserError
from clsim.loggers import JsonlLogger, ProgressLogger, TensorBoardLogger, to_json
from clsim.privacy.audit import AuditOptions, mia
from clsim.privacy.ledger import Ledger
from clsim.privacy.mechanism import Mechanism
from clsim.registry import MECHANISMS, SCENARIOS, STRATEGIES

DEFAULT_SCENARIO, DEFAULT_STRATEGY = "split_digits", "naive"


class _StoreOnce(argparse.Action):
    """argparse's store, refusing an empty value and an option given twice with different values
    (argparse would keep the last silently while --privacy's first picked the options)."""

    def __call__(self, parser, namespace, values, option_string=None):
        if isinstance(values, str) and not values.strip():
            parser.error(f"{option_string} is empty; give it a value or leave it out")
        seen = getattr(self, "seen", None)
        if seen is not None and seen != values:
            parser.error(f"{option_string} is given twice ({seen} and {values}); give it once")
        self.seen = values
        setattr(namespace, self.dest, values)


class _Parser(argparse.ArgumentParser):
    """No abbreviations (`--priv` must not mean --privacy), one value per option, one-line errors."""

    def __init__(self, **kwargs):
        super().__init__(allow_abbrev=False, **kwargs)
        self.register("action", None, _StoreOnce)
        self.register("action", "store", _StoreOnce)

    def error(self, message):
        raise UserError(f"{message} (see --help)")


def _load_yaml(path: str) -> dict:
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
    return {str(k).replace("-", "_"): v for k, v in data.items()}


_YAML_TYPES = {int: "an integer", float: "a number", str: "a non-empty string", bool: "true or false"}


def _check_yaml_types(path: str, values: dict, parser: argparse.ArgumentParser) -> None:
    """Every YAML value has its option's type (bools are not numbers, 1.5 is not an integer).
    A float option also takes YAML 1.1's string form of exponents (`1e-3`), converted here."""
    kinds = {a.dest: bool if a.type is config.parse_bool or isinstance(a.const, bool) else (a.type or str)
             for a in parser._actions}
    for key, value in values.items():
        kind = kinds[key]
        if kind is float and isinstance(value, str):
            try:
                values[key] = value = float(value)
            except ValueError:
                pass
        ok = (isinstance(value, bool) if kind is bool else
              isinstance(value, int) and not isinstance(value, bool) if kind is int else
              isinstance(value, (int, float)) and not isinstance(value, bool) if kind is float else
              isinstance(value, str) and value.strip() != "")
        if not ok:
            shown = repr(value) if len(repr(value)) <= 40 else repr(value)[:37] + "..."
            raise UserError(f"{key.replace('_', '-')} in {path} must be {_YAML_TYPES[kind]}, got {shown}")


def listing() -> str:
    lines = ["scenarios:"]
    lines += [f"  {e.name:16s} {e.description}" for e in SCENARIOS.entries()]
    lines += ["strategies (settings; learners; under a privacy mechanism):"]
    lines += [f"  {e.name:16s} {e.description}\n  {'':16s} [{'; '.join(capabilities(e.target))}]"
              for e in STRATEGIES.entries()]
    lines += ["privacy mechanisms (--privacy):"]
    lines += [f"  {e.name:16s} {e.description}" for e in MECHANISMS.entries()]
    return "\n".join(lines + presets.listing())


def capabilities(strategy) -> tuple[str, str, str]:
    """What a strategy declares: its settings, its learners, and what a privacy ledger sees."""
    access = strategy.data_access
    privacy = "accounted" if access == "accounted" else f"ε = ∞ ({access.removeprefix('raw: ')})"
    if strategy.privacy:
        privacy = f"always under {strategy.privacy}, accounted"
    return ", ".join(strategy.settings), ", ".join(strategy.learners), privacy


def strategy_table() -> str:
    """The README's table of strategies, generated from the registry (a test keeps it current)."""
    rows = ["| strategy | settings | learners | under `--privacy` |", "|---|---|---|---|"]
    rows += [f"| `{e.name}` | " + " | ".join(capabilities(e.target)) + " |" for e in STRATEGIES.entries()]
    return "\n".join(rows)


def parse(argv: list[str]) -> dict:
    """Resolve every option from the CLI and the optional YAML file; raise UserError on bad input."""
    pre = _Parser(add_help=False)
    pre.add_argument("--scenario")
    pre.add_argument("--strategy")
    pre.add_argument("--config")
    pre.add_argument("--preset")
    pre.add_argument("--list", action="store_true")
    known, _ = pre.parse_known_args(argv)
    # a preset's options, then a config file's, then flags: each overrides the one before
    yaml_values = {**(presets.get(known.preset).options if known.preset else {}),
                   **(_load_yaml(known.config) if known.config else {})}
    where = " and ".join(w for w in (known.config, known.preset and f"preset {known.preset}") if w)
    for key in ("scenario", "strategy", "privacy"):
        if key in yaml_values and not (isinstance(yaml_values[key], str) and yaml_values[key].strip()):
            raise UserError(f"{key} in {where} must be a non-empty string, got {yaml_values[key]!r}")
    scenario_name = known.scenario or yaml_values.get("scenario") or DEFAULT_SCENARIO
    strategy_name = known.strategy or yaml_values.get("strategy") or DEFAULT_STRATEGY
    scenario, strategy = SCENARIOS.get(scenario_name), STRATEGIES.get(strategy_name)

    parser = _Parser(prog="run_scenario.py", description="Run a continual-learning scenario.",
                     epilog="Use --list to see every scenario, strategy and privacy mechanism.")
    parser.add_argument("--scenario", default=scenario_name, help=f"one of: {', '.join(SCENARIOS.names())}")
    parser.add_argument("--strategy", default=strategy_name, help=f"one of: {', '.join(STRATEGIES.names())}")
    parser.add_argument("--config", help="YAML file of option: value pairs (flags override it)")
    parser.add_argument("--preset", help="a published protocol by name (see --list); --config and flags override it")
    parser.add_argument("--list", action="store_true", help="list scenarios, strategies and mechanisms")
    taken: dict[str, str] = {}
    config.add_arguments(parser, config.RunOptions, "run options", taken)
    config.add_arguments(parser, config.ProtocolOptions, "training protocol", taken)
    config.add_arguments(parser, AuditOptions, "privacy audit", taken)
    config.add_arguments(parser, scenario.options, f"scenario {scenario.name}", taken)
    config.add_arguments(parser, strategy.target.Options, f"strategy {strategy.name}", taken)
    privacy_name = (_peek(argv, "--privacy") or yaml_values.get("privacy") or strategy.target.privacy)
    mechanism = MECHANISMS.get(privacy_name) if privacy_name else None
    if mechanism is not None and mechanism.options is not None:
        config.add_arguments(parser, mechanism.options, f"privacy {mechanism.name}", taken)
    unknown = set(yaml_values) - {a.dest for a in parser._actions}
    if unknown:
        raise UserError(f"unknown key(s) in {where}: {', '.join(sorted(unknown))}; "
                        f"see --help for the options of this scenario and strategy")
    _check_yaml_types(where, yaml_values, parser)
    parser.set_defaults(**yaml_values)
    args = vars(parser.parse_args(argv))
    if mechanism is not None and args.get("noise_multiplier") == 0:
        print(f"warning: --noise-multiplier 0 adds no noise: this {mechanism.name} run has no privacy "
              f"(ε = ∞); give a positive --noise-multiplier or --epsilon", file=sys.stderr)
    return {"args": args, "scenario": scenario, "strategy": strategy, "mechanism": mechanism,
            "argv": _as_argv(args), "run": config.build(config.RunOptions, args),
            "protocol": config.build(config.ProtocolOptions, args),
            "audit": config.build(AuditOptions, args),
            "scenario_options": config.build(scenario.options, args),
            "strategy_options": config.build(strategy.target.Options, args),
            "mechanism_options": config.build(mechanism.options, args)
            if mechanism is not None and mechanism.options is not None else None}


def _as_argv(args: dict) -> list[str]:
    """The resolved options as flags (YAML folded in), so a resumed run rebuilds the same run."""
    out = []
    for key, value in args.items():
        if value is not None and key not in ("config", "preset", "list"):
            out += [config.flag(key), str(value)]
    return out


def _peek(argv: list[str], name: str) -> str | None:
    for i, a in enumerate(argv):
        if a == name and i + 1 < len(argv):
            return argv[i + 1]
        if a.startswith(name + "="):
            return a.split("=", 1)[1]
    return None


def seed_everything(seed: int, device: torch.device = torch.device("cpu")) -> torch.Generator:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)
    if device.type == "cuda":   # same seed, same figures: no atomics-based or autotuned kernels
        os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
        torch.use_deterministic_algorithms(True, warn_only=True)
        torch.backends.cudnn.benchmark = False
    return torch.Generator().manual_seed(seed)


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


def execute(resolved: dict, resume_dir: Path | None = None) -> tuple[Path, dict]:
    """Build everything, then run in a run directory that appears under its name only when the run
    succeeds. With `resume_dir` (an interrupted run's hidden .partial directory) continue that run."""
    run, sc_entry, st_entry = resolved["run"], resolved["scenario"], resolved["strategy"]
    designed = st_entry.target.default_setting
    if run.setting is None and designed is not None:
        run = dataclasses.replace(run, setting=designed)
        print(f"note: {st_entry.name} runs in {designed}, the setting it is designed for "
              f"(no --setting given)", file=sys.stderr)
    device = torch_device(run.device)
    if resume_dir is None:
        rundir.check_out(run.out)   # refuse a bad --out before any work
    generator = seed_everything(run.seed, device)
    scenario = sc_entry.target(resolved["scenario_options"], run)
    strategy = st_entry.target(resolved["strategy_options"])
    epochs = run.epochs or scenario.defaults.get("epochs", 1)
    training = resolved["protocol"]
    protocol.check(training, scenario, epochs)
    protocol.carve_validation(scenario, training.val_fraction, run.seed)
    from clsim.learners.supervised import SupervisedLearner
    learner_cls = scenario.learner_cls or SupervisedLearner
    learner = learner_cls(scenario.make_model(), lr=run.lr or scenario.defaults.get("lr", 0.01),
                          momentum=run.momentum,
                          batch_size=run.batch_size or scenario.defaults.get("batch_size", 32),
                          device=device, generator=generator, optimizer=training.optimizer,
                          **scenario.learner_kwargs)
    mechanism_entry, mech_opts = resolved["mechanism"], resolved["mechanism_options"]
    mechanism = mechanism_entry.target(mech_opts) if mechanism_entry else Mechanism()
    ledger = Ledger(**mechanism.ledger_options())
    mechanism.check(learner, scenario, epochs)

    if resume_dir is None:
        directory = rundir.RunDirectory.claim(
            run.out, f"{sc_entry.name}-{st_entry.name}-{scenario.setting}-seed{run.seed}")
    else:
        directory = rundir.RunDirectory.reopen(resume_dir)
    with directory.guard():
        state = directory.load_checkpoint() if directory.resumed else None
        resume_step = None if state is None else state["step"]
        partial = directory.path
        hparams = {"scenario": sc_entry.name, "strategy": st_entry.name, "setting": scenario.setting,
                   "seed": run.seed, "epochs": epochs, "lr": learner.lr, "batch_size": learner.batch_size,
                   "privacy": mechanism.name, **dataclasses.asdict(training),
                   **dataclasses.asdict(resolved["scenario_options"]),
                   **dataclasses.asdict(resolved["strategy_options"])}
        if mech_opts is not None:
            hparams.update(dataclasses.asdict(mech_opts))
        if state is None:
            directory.write_config(to_json({
                **hparams, "argv": resolved["argv"], "run": dataclasses.asdict(run), "versions": versions(),
                "scenario_info": scenario.info}))
        planned = [epochs * learner.privacy_plan(t).releases_per_epoch for t in scenario.tasks]
        loggers = [TensorBoardLogger(partial / "tb", hparams, resume_step, scenario.score_scale),
                   JsonlLogger(partial / rundir.LOG, resume_step),
                   ProgressLogger(planned, run.progress, resume_step)]
        result = engine.run(scenario, strategy, learner, mechanism, ledger, loggers, epochs,
                            checkpoint=lambda s: directory.task_finished(s if run.checkpoint else None),
                            resume=state, protocol=training)
        audit = resolved.get("audit")
        if audit is not None and audit.audit == "mia":
            result["audit"] = mia(learner, scenario, ledger, audit.audit_examples, run.seed)
        summary = {"scenario": sc_entry.name, "strategy": st_entry.name, "setting": scenario.setting,
                   "seed": run.seed, "privacy_mechanism": mechanism.name, "hparams": hparams,
                   "scenario_info": scenario.info, **result}
        for logger in loggers:
            logger.close(summary)
        final = directory.finish(to_json(summary))
    return final, summary


def resume(argv: list[str]) -> tuple[Path, dict]:
    """`--resume DIR`: continue an interrupted run from its last finished task, with its own options."""
    if len(argv) != 1:
        raise UserError("--resume takes exactly one argument, the interrupted run's .partial directory, "
                        "and no other options")
    partial = Path(argv[0])
    saved = rundir.RunDirectory.reopen(partial)
    try:
        argv = saved.saved_argv()
    finally:
        saved.close()   # execute takes the directory over again, after building everything
    return execute(parse(argv), resume_dir=partial)


def versions() -> dict:
    import clsim
    out = {"python": platform.python_version(), "torch": torch.__version__, "numpy": np.__version__,
           "clsim": clsim.__version__}
    for pkg in ("opacus", "gymnasium", "avalanche-lib"):
        try:
            from importlib.metadata import version
            out[pkg] = version(pkg)
        except Exception:
            pass
    return out


def _warn_in_one_line(message, category, filename, lineno, file=None, line=None):
    print(f"warning: {message}", file=sys.stderr)


class _Terminated(KeyboardInterrupt):
    """SIGTERM, handled as Ctrl-C is: a run with a checkpoint stays resumable."""


def _terminate(signum, frame):
    raise _Terminated()


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    warnings.showwarning = _warn_in_one_line   # users read the message, not our source lines
    in_main_thread = threading.current_thread() is threading.main_thread()
    previous = (signal.signal(signal.SIGTERM, _terminate) if in_main_thread else None), threading.excepthook
    threading.excepthook = rundir.quiet_thread_errors
    try:
        if "--list" in argv:
            print(listing())
            return 0
        if argv and argv[0] == "--resume":
            run_dir, summary = resume(argv[1:])
        else:
            run_dir, summary = execute(parse(argv))
    except UserError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    except rundir.Interrupted as exc:
        print(f"interrupted; continue with: {rundir.RESUME} {exc.partial}", file=sys.stderr)
        return 143 if isinstance(exc.__context__, _Terminated) else 130
    except KeyboardInterrupt as exc:
        print("interrupted; no run directory written", file=sys.stderr)
        return 143 if isinstance(exc, _Terminated) else 130
    finally:   # main may be called in-process (tests, notebooks): leave the hooks as they were
        if in_main_thread:
            signal.signal(signal.SIGTERM, signal.SIG_DFL if previous[0] is None else previous[0])
        threading.excepthook = previous[1]
    print(f"ACC {summary['acc']:.2f}  BWT {summary['bwt']:.2f}  FWT {summary['fwt']:.2f}  "
          f"forgetting {summary['forgetting']:.2f}")
    print(f"run directory: {run_dir}  (tensorboard --logdir {run_dir.parent})")
    return 0
