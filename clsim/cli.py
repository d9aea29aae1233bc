"""The command line, clsim's one door from argv: `clsim [run] FLAGS` (run_scenario.py takes the same
flags), `clsim sweep SPEC.yaml`, `clsim report DIR...` and `clsim download SCENARIO...`.

This module owns every parser, `--help` and the defaults it prints, and `--list`; a run's flags
become `Experiment(**values)`, which converts and checks them as it does keyword arguments. Nothing
else in clsim imports this module (docs/architecture.md, "Layers").
"""
from __future__ import annotations

import argparse
import signal
import sys
import threading
import warnings
from pathlib import Path

from clsim import config, console, distributed, presets, rundir, sweep
from clsim.errors import UserError, did_you_mean
from clsim.experiment import Experiment
from clsim.parties import DEFAULT_SCENARIO, DEFAULT_STRATEGY, NAMING_KEYS, Parties
from clsim.registry import SCENARIOS, STRATEGIES
from clsim.scenario import ScenarioOptions

COMMANDS = """commands:
  clsim run [FLAGS]           train one scenario with one strategy (the default command; run_scenario.py)
  clsim sweep SPEC.yaml       many runs on Ray Tune, resumable, then a report (clsim sweep --help)
  clsim report DIR...         tables and figures of finished runs, grouped over seeds (clsim report --help)
  clsim download SCENARIO...  fetch scenarios' datasets now, e.g. on a login node (clsim download --help)"""


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
        super().__init__(allow_abbrev=False, formatter_class=argparse.RawDescriptionHelpFormatter, **kwargs)
        self.register("action", None, _StoreOnce)
        self.register("action", "store", _StoreOnce)

    def parse_args(self, args=None, namespace=None):
        known, rest = self.parse_known_args(args, namespace)
        if rest:
            flags = [o for action in self._actions for o in action.option_strings]
            hint = did_you_mean(rest[0].split("=", 1)[0], flags) if rest[0].startswith("--") else ""
            self.error(f"unrecognized arguments: {' '.join(rest)}{hint}")
        return known

    def error(self, message):
        raise UserError(f"{message} (see --help)")


# -- clsim run ---------------------------------------------------------------------------------
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
    values = config.load_yaml(known.config) if known.config else {}
    from_file = dict.fromkeys(values, known.config)
    values.update({k: v for k, v in vars(known).items() if v is not None and k != "config"})
    preset = values.get("preset")
    named = {**(presets.get(preset).options if preset else {}), **values}   # a preset may name parties too
    parties = Parties(**{k: named[k] for k in NAMING_KEYS if k in named})
    parser = _Parser(prog="clsim [run]", usage="%(prog)s [--scenario NAME] [--strategy NAME|FILE.py] [--config FILE] "
                                               "[--preset NAME] [FLAGS below]",
                     description=f"Run a continual-learning scenario.\n\n{COMMANDS}",
                     epilog="Use --list to see every scenario, strategy, privacy mechanism, logger and preset.")
    parser.add_argument("--scenario", help=f"one of: {', '.join(SCENARIOS.names())} (default: {DEFAULT_SCENARIO})")
    parser.add_argument("--strategy", help=f"one of: {', '.join(STRATEGIES.names())}, or a .py file that "
                                           f"registers one (default: {DEFAULT_STRATEGY})")
    parser.add_argument("--config", help="YAML file of option: value pairs (flags override it)")
    parser.add_argument("--preset", help="a published protocol by name (see --list); --config and flags override it")
    parser.add_argument("--list", action="store_true", help="list scenarios, strategies, mechanisms, loggers, presets")
    defaults = help_defaults(parties, preset)
    for title, cls in parties.option_groups().items():
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


def help_defaults(parties: Parties, preset: str | None) -> dict[str, str]:
    """Option name -> the default --help prints where the field's own is not what a run uses:
    the run defaults the scenario declares (with each value of the option that changes them),
    the setting the strategy is designed for, and the values of a --preset."""
    out = {}
    cls = parties.scenario_entry.options if parties.scenario_entry else None
    scenario, strategy = parties.scenario_name, parties.strategy_cls
    if isinstance(cls, type) and issubclass(cls, ScenarioOptions):
        base, depend = cls().run_defaults(), cls.DEFAULTS_DEPEND_ON
        for key, value in base.items():
            out[key] = f"{value} for {scenario}"
            for choice in cls.__dataclass_fields__[depend].metadata["choices"] if depend else ():
                other = cls(**{depend: choice}).run_defaults().get(key)
                if other != value:
                    out[key] += f"; {other} with {config.flag(depend)} {choice}"
        out["setting"] = f"{cls.SETTING} for {scenario}"
    if strategy.default_setting is not None and parties.scenario_entry:
        out["setting"] = f"{strategy.default_setting}, the setting strategy {parties.strategy_name} is designed for"
    if preset is not None:
        out.update({k: f"{v}, from preset {preset}" for k, v in presets.get(preset).options.items()})
    return out


def from_argv(argv: list[str]) -> Experiment:
    """The experiment of a command line (`--config FILE` reads YAML; flags override it). `--help`
    prints the options of the chosen scenario, strategy and mechanism and exits."""
    values, from_file = parse(argv)
    return Experiment.made(from_file, values)


#: what `--resume` may change: where the run's processes run, not what they compute
WHERE = ("--workers", "--address")


def resume(argv: list[str]) -> tuple[Path, dict]:
    """`--resume DIR [--workers N] [--address A]`: continue an interrupted run from its last finished
    task, with its own options; only how many worker processes run it, and where, may change."""
    where = argv[1:]
    if not argv or argv[0].startswith("-") or len(where) % 2 or not set(where[::2]) <= set(WHERE) or \
            len(set(where[::2])) < len(where[::2]):
        raise UserError("--resume takes the interrupted run's .partial directory and, at most, --workers N and "
                        "--address A (the run's other options are its own)")
    partial = Path(argv[0])
    saved = rundir.RunDirectory.reopen(partial)
    try:
        argv = saved.saved_argv()
    finally:
        saved.close()   # the experiment takes the directory over again, after building everything
    pairs = [argv[i:i + 2] for i in range(0, len(argv), 2)]   # flags and values, as as_argv writes them
    argv = [x for pair in pairs if pair[0] not in where[::2] for x in pair] + where
    result = from_argv(argv).run(resume_dir=partial)
    return result.run_dir, result.summary


def run_command(argv: list[str]) -> int:
    if "--list" in argv:
        from clsim.catalog import listing
        print(listing())
        return 0
    if argv and argv[0] == "--sweep":   # run_scenario.py --sweep SPEC.yaml: `clsim sweep`
        return sweep_command(argv[1:])
    if argv and argv[0] == "--resume":
        run_dir, summary = resume(argv[1:])
    else:
        result = from_argv(argv).run()
        run_dir, summary = result.run_dir, result.summary
    if distributed.rank() > 0:   # under torchrun: rank 0 reports the run
        return 0
    print("\n".join(console.summary(summary, run_dir)))
    return 0


# -- clsim sweep, clsim report -------------------------------------------------------------------
def sweep_command(argv: list[str]) -> int:
    p = _Parser(prog="clsim sweep",
                description="Run a sweep spec's trials on Ray Tune (resumable), then write its report.")
    p.add_argument("spec", help="the sweep's YAML spec (base, grid, random, threads)")
    p.add_argument("--out", default=sweep.OUT, help="directory under which the sweep directory is made "
                                                   "(default: %(default)s)")
    p.add_argument("--address", help="an existing Ray cluster's address (default: a local Ray on this "
                                     "machine's cores)")
    p.add_argument("--workers", type=int, help="local Ray CPUs (default: all of this machine's)")
    p.add_argument("--no-report", action="store_true", help="do not write the report after the trials")
    p.add_argument("--max-trials", type=int, default=sweep.MAX_TRIALS,
                   help="refuse a spec of more trials than this, before any runs (default: %(default)s)")
    args = p.parse_args(argv)
    from clsim.report import write_report
    for name in ("workers", "max_trials"):
        value = getattr(args, name)
        if value is not None and not 1 <= value <= config.INT_HIGH:
            raise UserError(f"{config.flag(name)} must be between 1 and {config.INT_HIGH}, got {value}")
    sweep_dir, failed = sweep.sweep(args.spec, args.out, args.address, args.workers, args.max_trials)
    if not args.no_report:
        try:
            print(f"report: {write_report([str(sweep_dir / 'trials')], sweep_dir / 'report')}")
        except UserError as exc:   # no trial finished: the sweep's own lines said why
            print(f"no report: {exc}", file=sys.stderr)
    return 1 if failed else 0


def report_command(argv: list[str]) -> int:
    p = _Parser(prog="clsim report",
                description="Group runs by everything but the seed; write report.md, results.csv, "
                            "summary.csv and PNG figures.")
    p.add_argument("dirs", nargs="+", help="sweep directories or run directories")
    p.add_argument("--out", help="directory to write the report into (default: DIR/report, where clsim sweep "
                                 "writes a sweep's; needed with several directories)")
    args = p.parse_args(argv)
    from clsim.report import write_report
    print(f"report: {write_report(args.dirs, None if args.out is None else Path(args.out))}")
    return 0


def download_command(argv: list[str]) -> int:
    from clsim import datasets
    from clsim.download import OFFLINE_ENV, default_data_root
    p = _Parser(prog="clsim download",
                description="Fetch the datasets of the named scenarios into the data root now, checksum verified "
                            "(as a run does on first use), e.g. on a cluster's login node before runs with "
                            f"--no-download ({OFFLINE_ENV}=1) on compute nodes without internet. A dataset "
                            "already there is left as it is.")
    p.add_argument("scenarios", nargs="+", metavar="SCENARIO",
                   help=f"one or more of: {', '.join(datasets.SCENARIO_DATA)}")
    p.add_argument("--data-root", default=default_data_root(), help="the runs' --data-root (default: %(default)s)")
    p.add_argument("--data-mirror", help="fetch the official files from this URL (a folder holding them); still "
                                         "checked against the official checksums")
    args = p.parse_args(argv)
    run = config.build(config.RunOptions, {"data_root": args.data_root, "download": True,
                                           "data_mirror": args.data_mirror})
    print("\n".join(datasets.prefetch(args.scenarios, run)))
    return 0


# -- the entry point -----------------------------------------------------------------------------
def one_line(text) -> str:
    """`text` as one line: characters a terminal would not show as themselves (a newline, a record
    separator from a damaged file's name) written as escapes."""
    return "".join(c if c.isprintable() else c.encode("unicode_escape").decode() for c in str(text))


def _warn_in_one_line(message, category, filename, lineno, file=None, line=None):
    print(f"warning: {one_line(message)}", file=sys.stderr)


class _Terminated(KeyboardInterrupt):
    """SIGTERM, handled as Ctrl-C is: a run with a checkpoint stays resumable."""


def _terminate(signum, frame):
    raise _Terminated()


def main(argv: list[str] | None = None) -> int:
    """`clsim`, `python -m clsim` and run_scenario.py: a command (run when none is named), its
    exit status (2: a user mistake, said in one line)."""
    argv = sys.argv[1:] if argv is None else argv
    commands = {"run": run_command, "sweep": sweep_command, "report": report_command, "download": download_command}
    command = run_command
    if argv and argv[0] in commands:
        command, argv = commands[argv[0]], argv[1:]
    elif argv and not argv[0].startswith("-"):
        print(f"error: unknown command {argv[0]!r}{did_you_mean(argv[0], commands)}; use clsim "
              f"run|sweep|report|download (see --help)", file=sys.stderr)
        return 2
    in_main_thread = threading.current_thread() is threading.main_thread()
    previous = ((signal.signal(signal.SIGTERM, _terminate) if in_main_thread else None), threading.excepthook,
                warnings.showwarning)
    warnings.showwarning = _warn_in_one_line   # users read the message, not our source lines
    threading.excepthook = rundir.quiet_thread_errors
    try:
        return command(argv)
    except UserError as exc:
        print(f"error: {one_line(exc)}", file=sys.stderr)
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
        threading.excepthook, warnings.showwarning = previous[1], previous[2]
