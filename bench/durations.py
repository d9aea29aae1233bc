"""How long the commands the documentation quotes take: wall time and CPU time of each, with the
machine and its load, written to docs/durations.yaml (the contributing page shows that file).

    python bench/durations.py [--only NAME,...] [--data-root DIR] [--out docs/durations.yaml]

Each command runs as a user would type it, from a scratch directory (its runs/ and sweeps/ land
there), one after another. CPU time is the user + system time of the command's processes (Ray's
workers are not its children: for the sweep only wall time is meaningful); on a loaded machine
the wall time grows with the load, CPU time far less, so both are recorded with the load average
before and after. Commands that need data are skipped, saying so, without --data-root. The test
tiers are timed the same way (`quick-tests`, `full-tests`: the whole suite, hours on a loaded
2-core machine), only when named with --only.
"""
from __future__ import annotations

import argparse
import datetime
import os
import platform
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import yaml

REPO = Path(__file__).resolve().parent.parent
PY = sys.executable

# name -> (command, needs data, what the docs say it is)
COMMANDS = {
    "default-run": ([PY, "run_scenario.py"], False, "README set-up: the default scenario"),
    "tour-ewc": ([PY, "run_scenario.py", "--strategy", "ewc", "--ewc-lambda", "5", "--epochs", "1", "--seed", "3"],
                 False, "README tour: one EWC run"),
    "tour-dpsgd": ([PY, "run_scenario.py", "--strategy", "ewc", "--privacy", "dpsgd", "--epsilon", "3", "--epochs", "1"],
                   False, "README tour: EWC under DP-SGD"),
    "digits-sweep": ([str(Path(PY).with_name("clsim")), "sweep", "sweeps/digits_quick.yaml"], False,
                     "README tour: the digits_quick sweep and its report (12 runs on a local Ray)"),
    "cartpole-ewc": ([PY, "run_scenario.py", "--scenario", "cartpole", "--strategy", "ewc"], False,
                     "Continual RL: the CartPole demo with EWC"),
    "blip-cifar": ([PY, "run_scenario.py", "--scenario", "split_cifar", "--strategy", "blip", "--train-per-class",
                    "200", "--test-per-class", "100"], True, "Strategies: the BLIP headline run on CIFAR-10"),
    "quick-tests": ([PY, "-m", "pytest", "-m", "not slow", "-q", "-p", "no:cacheprovider", str(REPO / "tests")],
                    False, "Contributing: the quick tier"),
    "full-tests": ([PY, "-m", "pytest", "-q", "-p", "no:cacheprovider", str(REPO / "tests")], False,
                   "Contributing: the whole suite (CI)"),
}
ON_REQUEST = {"quick-tests", "full-tests"}


def machine() -> str:
    model = next((line.split(":", 1)[1].strip() for line in Path("/proc/cpuinfo").read_text().splitlines()
                  if line.startswith("model name")), platform.processor()) if Path("/proc/cpuinfo").exists() \
        else platform.processor()
    return f"{os.cpu_count()} CPU cores ({model}), {platform.system()}, Python {platform.python_version()}"


def measure(name: str, command: list[str], data_root: str | None, cwd: Path) -> dict:
    if COMMANDS[name][1]:
        command = [*command, "--data-root", data_root]
    if not (cwd / "sweeps").exists():   # the specs, but the sweeps' output stays in the scratch directory
        (cwd / "run_scenario.py").symlink_to(REPO / "run_scenario.py")
        (cwd / "sweeps").mkdir()
        for spec in (REPO / "sweeps").glob("*.yaml"):
            (cwd / "sweeps" / spec.name).symlink_to(spec)
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    load = os.getloadavg()[0]
    start = time.perf_counter()
    proc = subprocess.run(command, cwd=cwd if "pytest" not in command else REPO, capture_output=True, text=True)
    wall = time.perf_counter() - start
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    if proc.returncode != 0:
        raise SystemExit(f"{name} failed ({proc.returncode}):\n{proc.stdout[-6000:]}\n{proc.stderr[-2000:]}")
    cpu = (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime)
    shown = " ".join("python" if c == PY else "clsim" if c.endswith("/clsim") else "tests" if c == str(REPO / "tests")
                     else "DATA_ROOT" if c == data_root
                     else c for c in command)
    return {"what": COMMANDS[name][2], "command": shown, "wall_s": round(wall, 1), "cpu_s": round(cpu, 1),
            "load_before": round(load, 1), "load_after": round(os.getloadavg()[0], 1),
            "niceness": os.nice(0), "machine": machine(), "date": datetime.date.today().isoformat()}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--only", help=f"comma-separated names (default: all but {', '.join(sorted(ON_REQUEST))}): "
                                  f"{', '.join(COMMANDS)}")
    p.add_argument("--data-root", help="directory holding cifar-10-batches-py (for blip-cifar)")
    p.add_argument("--out", default=str(REPO / "docs" / "durations.yaml"), help="YAML file to update")
    args = p.parse_args()
    names = args.only.split(",") if args.only else [n for n in COMMANDS if n not in ON_REQUEST]
    unknown = [n for n in names if n not in COMMANDS]
    if unknown:
        raise SystemExit(f"unknown command name(s) {unknown}; choose from {', '.join(COMMANDS)}")
    out = Path(args.out)
    results = (yaml.safe_load(out.read_text()) if out.exists() else None) or {}
    with tempfile.TemporaryDirectory() as scratch:
        for name in names:
            if COMMANDS[name][1] and not args.data_root:
                print(f"{name}: skipped (needs --data-root)", file=sys.stderr)
                continue
            results[name] = measure(name, COMMANDS[name][0], args.data_root, Path(scratch))
            r = results[name]
            print(f"{name}: {r['wall_s']} s wall, {r['cpu_s']} s CPU (load {r['load_before']} -> {r['load_after']})")
            out.write_text(yaml.safe_dump(results, sort_keys=False, allow_unicode=True, width=110))


if __name__ == "__main__":
    main()
