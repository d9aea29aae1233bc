"""Sweep scaling on Ray: the same 8 short runs with 1 local worker and with 2, and Ray's overhead
per trial against the same runs as bare `run_scenario.py` processes, measured side by side.

    python bench/sweep_scaling.py [--epochs 2] [--keep DIR]

Prints the wall times, the 2-worker speed-up (target >= 1.7x on a 2-core machine), Ray's start-up
(a fixed cost per sweep, which short runs do not amortise) and the overhead per trial of the
1-worker sweep over the bare sequential runs.
"""
from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
STRATEGIES, SEEDS = ("naive", "ewc", "er", "derpp"), (0, 1)


def spec(epochs: int, strategies) -> str:
    return (f"base: {{scenario: split_digits, epochs: {epochs}, checkpoint: false}}\n"
            f"grid: {{strategy: [{', '.join(strategies)}], seed: [{', '.join(map(str, SEEDS))}]}}\n"
            "threads: 1\n")


def timed(cmd: list[str], cwd: Path) -> float:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO)}
    t0 = time.perf_counter()
    subprocess.run(cmd, cwd=cwd, env=env, check=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    return time.perf_counter() - t0


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--epochs", type=int, default=2)
    p.add_argument("--keep", help="keep the sweeps here (default: a temporary directory)")
    args = p.parse_args()
    root = Path(args.keep or tempfile.mkdtemp(prefix="sweep_scaling_"))
    root.mkdir(parents=True, exist_ok=True)
    (root / "spec.yaml").write_text(spec(args.epochs, STRATEGIES))
    n = len(STRATEGIES) * len(SEEDS)
    bare = 0.0
    for s in STRATEGIES:
        for seed in SEEDS:
            bare += timed([sys.executable, str(REPO / "run_scenario.py"), "--strategy", s, "--seed", str(seed),
                           "--epochs", str(args.epochs), "--checkpoint", "false", "--out", "bare"], root)
    one = timed([sys.executable, "-m", "clsim", "sweep", "spec.yaml", "--out", "w1", "--workers", "1",
                 "--no-report"], root)
    two = timed([sys.executable, "-m", "clsim", "sweep", "spec.yaml", "--out", "w2", "--workers", "2",
                 "--no-report"], root)
    start = timed([sys.executable, "-c", "import ray; ray.init(address='local', num_cpus=1, "
                   "include_dashboard=False, log_to_driver=False); ray.shutdown()"], root)
    print(f"{n} runs of split_digits, {args.epochs} epochs, one thread each (CPU, {os.cpu_count()} cores)")
    print(f"bare sequential processes : {bare:7.1f} s")
    print(f"Ray sweep, 1 worker       : {one:7.1f} s")
    print(f"Ray sweep, 2 workers      : {two:7.1f} s")
    print(f"speed-up 2 workers / 1    : {one / two:7.2f}x  (target >= 1.7x)")
    print(f"Ray start + shutdown      : {start:7.1f} s  (once per sweep; speed-up without it: "
          f"{(one - start) / (two - start):.2f}x)")
    print(f"Ray overhead per trial    : {(one - bare) / n:7.2f} s  (1-worker sweep minus bare runs, "
          f"Ray's start included)")


if __name__ == "__main__":
    main()
