"""The one-run audit's ε lower bound beside the accountant's ε, for σ = 0, 0.5, 1, 2.

Runs the real CLI (in-process) with `--audit one-run` (Steinke, Nasr & Jagielski 2023) on
split_digits as one task of all ten digits: m mislabelled canaries, each kept with probability ½,
k guesses on each side. Without a mechanism, then DP-SGD at each σ (clipping C = 1), over a few
seeds. Expected: the bound clearly above 0 without noise, never above the accountant's ε.

    python bench/audit.py [--epochs 80] [--seeds 3]
"""
from __future__ import annotations

import argparse
import json
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from clsim import cli  # noqa: E402


def audit(args, seed: int, extra: list[str]) -> dict:
    with tempfile.TemporaryDirectory() as out:
        argv = ["--n-tasks", "1", "--epochs", str(args.epochs), "--audit", "one-run", "--audit-canaries",
                str(args.canaries), "--audit-guesses", str(args.guesses), "--seed", str(seed),
                "--progress", "false", "--checkpoint", "false", "--out", out, *extra]
        assert cli.main(argv) == 0, argv
        (run,) = Path(out).iterdir()
        summary = json.loads((run / "summary.json").read_text())
        return {**summary["audit"], "acc": summary["acc"]}


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--epochs", type=int, default=80)
    parser.add_argument("--canaries", type=int, default=60)
    parser.add_argument("--guesses", type=int, default=10)
    parser.add_argument("--seeds", type=int, default=3)
    args = parser.parse_args()
    import torch
    torch.set_num_threads(1)
    print(f"split_digits, one task, {args.epochs} epochs, m={args.canaries} canaries, "
          f"k={args.guesses} guesses each side, 95% confidence")
    print(f"{'training':22s} {'seed':>4s} {'correct':>8s} {'ε lower bound':>14s} {'accountant ε':>13s} {'ACC':>6s}")
    settings = [("no mechanism", [])] + [(f"DP-SGD σ={s:g}", ["--privacy", "dpsgd", "--noise-multiplier", str(s)])
                                         for s in (0.0, 0.5, 1.0, 2.0)]
    for label, extra in settings:
        for seed in range(args.seeds):
            a = audit(args, seed, extra)
            accountant = "∞" if a["epsilon_accountant"] is None else f"{a['epsilon_accountant']:.3g}"
            print(f"{label:22s} {seed:4d} {a['correct']:>5d}/{a['guesses']:<2d} {a['epsilon_lower_bound']:14.3f} "
                  f"{accountant:>13s} {a['acc']:6.1f}", flush=True)


if __name__ == "__main__":
    main()
