"""The `clsim` command: `clsim run ...` (run_scenario.py's flags), `clsim sweep SPEC.yaml`,
`clsim report DIR...`."""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

from clsim.errors import UserError


class _Parser(argparse.ArgumentParser):
    def error(self, message):
        raise UserError(f"{message} (see --help)")


def sweep_main(argv: list[str]) -> int:
    p = _Parser(prog="clsim sweep", allow_abbrev=False,
                description="Run a sweep spec's trials on Ray Tune (resumable), then write its report.")
    p.add_argument("spec", help="the sweep's YAML spec (base, grid, random, threads)")
    p.add_argument("--out", default="sweeps", help="directory under which the sweep directory is made")
    p.add_argument("--address", help="an existing Ray cluster's address (default: a local Ray on this "
                                     "machine's cores)")
    p.add_argument("--workers", type=int, help="local Ray CPUs (default: all of this machine's)")
    p.add_argument("--no-report", action="store_true", help="do not write the report after the trials")
    args = p.parse_args(argv)
    from clsim.report import write_report
    from clsim.sweep import sweep
    if args.workers is not None and args.workers < 1:
        raise UserError(f"--workers must be >= 1, got {args.workers}")
    sweep_dir, failed = sweep(args.spec, args.out, args.address, args.workers)
    if not args.no_report:
        try:
            print(f"report: {write_report([str(sweep_dir / 'trials')], sweep_dir / 'report')}")
        except UserError as exc:   # no trial finished: the sweep's own lines said why
            print(f"no report: {exc}", file=sys.stderr)
    return 1 if failed else 0


def report_main(argv: list[str]) -> int:
    p = _Parser(prog="clsim report", allow_abbrev=False,
                description="Group runs by everything but the seed; write report.md, results.csv, "
                            "summary.csv and PNG figures.")
    p.add_argument("dirs", nargs="+", help="sweep directories or run directories")
    p.add_argument("--out", default="report", help="directory to write the report into")
    args = p.parse_args(argv)
    from clsim.report import write_report
    print(f"report: {write_report(args.dirs, Path(args.out))}")
    return 0


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    commands = {"sweep": sweep_main, "report": report_main}
    if argv and argv[0] in commands:
        try:
            return commands[argv[0]](argv[1:])
        except UserError as exc:
            print(f"error: {exc}", file=sys.stderr)
            return 2
    if argv and argv[0] == "run":
        argv = argv[1:]
    elif argv and not argv[0].startswith("-"):
        print(f"error: unknown command {argv[0]!r}; use clsim run|sweep|report (see --help)", file=sys.stderr)
        return 2
    from clsim import cli
    return cli.main(argv)


if __name__ == "__main__":
    sys.exit(main())
