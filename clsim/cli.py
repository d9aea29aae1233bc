"""The command line: a thin shell over clsim.Experiment (flags -> Experiment(**values).run())."""
from __future__ import annotations

import argparse
import signal
import sys
import threading
import warnings
from pathlib import Path

from clsim import config, presets, rundir
from clsim.errors import UserError
from clsim.experiment import DEFAULT_SCENARIO, DEFAULT_STRATEGY, NAMING_KEYS, Experiment, load_yaml
from clsim.registry import LOGGERS, MECHANISMS, SCENARIOS, STRATEGIES


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


def listing() -> str:
    lines = ["scenarios:"]
    lines += [f"  {e.name:16s} {e.description}" for e in SCENARIOS.entries()]
    lines += ["strategies (settings; learners; under a privacy mechanism):"]
    lines += [f"  {e.name:16s} {e.description}\n  {'':16s} [{'; '.join(capabilities(e.target))}]"
              for e in STRATEGIES.entries()]
    lines += ["privacy mechanisms (--privacy):"]
    lines += [f"  {e.name:16s} {e.description}" for e in MECHANISMS.entries()]
    lines += ["loggers (--loggers):"]
    lines += [f"  {e.name:16s} {e.description}" for e in LOGGERS.entries()]
    return "\n".join(lines + presets.listing())


def capabilities(strategy) -> tuple[str, str, str]:
    """What a strategy declares: its settings, its learners, and what a privacy ledger sees."""
    access = strategy.data_access
    privacy = "accounted" if access == "accounted" else f"ε = ∞ ({access.removeprefix('raw: ')})"
    if access.startswith("refused"):
        privacy = f"refused ({access.removeprefix('refused: ')})"
    if strategy.privacy:
        privacy = f"always under {strategy.privacy}, accounted"
    return ", ".join(strategy.settings), ", ".join(strategy.learners), privacy


def strategy_table() -> str:
    """The README's table of strategies, generated from the registry (a test keeps it current)."""
    rows = ["| strategy | settings | learners | under `--privacy` |", "|---|---|---|---|"]
    rows += [f"| `{e.name}` | " + " | ".join(capabilities(e.target)) + " |" for e in STRATEGIES.entries()]
    return "\n".join(rows)


def parse(argv: list[str]) -> tuple[dict, dict]:
    """The option values of a `--config FILE`, then the flags (each overriding the one before; both
    override a `--preset`): a dict for `Experiment(**values)`, which converts and checks them (flags
    are read as text), so a flag fails as the same key in YAML or Python would; and which of them
    the file gave (key -> path, so that an error can name it). The parser knows the chosen
    scenario's, strategy's, mechanism's and loggers' flags, for --help and for spelling."""
    argv = [a for arg in argv for a in (("--download", "false") if arg == "--no-download" else (arg,))]
    pre = _Parser(add_help=False)
    for name in (*NAMING_KEYS, "config", "preset"):
        pre.add_argument(config.flag(name))
    known, _ = pre.parse_known_args(argv)
    values = load_yaml(known.config) if known.config else {}
    from_file = dict.fromkeys(values, known.config)
    values.update({k: v for k, v in vars(known).items() if v is not None and k != "config"})
    # The names only (a preset may name them too): the parties whose flags the parser knows.
    shape = Experiment(**{k: values[k] for k in (*NAMING_KEYS, "preset") if k in values})
    parser = _Parser(prog="run_scenario.py", description="Run a continual-learning scenario.",
                     epilog="Use --list to see every scenario, strategy, privacy mechanism, logger and preset.")
    parser.add_argument("--scenario", help=f"one of: {', '.join(SCENARIOS.names())} (default: {DEFAULT_SCENARIO})")
    parser.add_argument("--strategy", help=f"one of: {', '.join(STRATEGIES.names())} (default: {DEFAULT_STRATEGY})")
    parser.add_argument("--config", help="YAML file of option: value pairs (flags override it)")
    parser.add_argument("--preset", help="a published protocol by name (see --list); --config and flags override it")
    parser.add_argument("--list", action="store_true", help="list scenarios, strategies, mechanisms, loggers, presets")
    defaults = shape.help_defaults()
    for title, cls in shape.option_groups().items():
        if cls is not None:
            config.add_arguments(parser, cls, title, defaults)
    args, rest = parser.parse_known_args(argv)
    flags = {k: v for k, v in vars(args).items() if v is not None and k not in ("config", "list")}
    values.update(flags)
    from_file = {k: path for k, path in from_file.items() if k not in flags}
    # Unknown flags stay in: Experiment refuses them with the message a YAML key would get.
    unknown = {a.split("=", 1)[0][2:].replace("-", "_"): "?" for a in rest if a.startswith("--")}
    if rest and not unknown:
        raise UserError(f"unexpected argument(s): {' '.join(rest)} (see --help)")
    return {**values, **unknown}, from_file


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
        saved.close()   # the experiment takes the directory over again, after building everything
    result = Experiment.from_argv(argv).run(resume_dir=partial)
    return result.run_dir, result.summary


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
        if argv and argv[0] == "--sweep":   # run_scenario.py --sweep SPEC.yaml: `clsim sweep`
            from clsim.commands import sweep_main
            return sweep_main(argv[1:])
        if argv and argv[0] == "--resume":
            run_dir, summary = resume(argv[1:])
        else:
            result = Experiment.from_argv(argv).run()
            run_dir, summary = result.run_dir, result.summary
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
    if "task_aware" in summary:   # class_il: the same model with the task identity given at test time
        aware = summary["task_aware"]
        print(f"task-aware ACC {aware['acc']:.2f}  BWT {aware['bwt']:.2f}  forgetting {aware['forgetting']:.2f}")
    print(f"run directory: {run_dir}  (tensorboard --logdir {run_dir.parent})")
    return 0
