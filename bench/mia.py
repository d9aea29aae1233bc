"""Membership-inference audit, naive vs DP-SGD, on the same data, model and schedule.

Runs the real CLI (in-process) with `--audit mia` on CIFAR-10 (split_cifar `--n-tasks 1`): a
small training set trained for many epochs, so the non-private model overfits and its losses
give members away. Prints each run's attack AUC, the heuristic's ε figure (`mia_heuristic_epsilon`:
a heuristic, not a bound; members and non-members were not assigned at random) and the
accountant's ε. Expected: AUC(DP-SGD) < AUC(naive). For a lower bound that holds, use
`--audit one-run` (bench/audit.py).

    python bench/mia.py
"""
from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from privacy_utility import DEFAULT_ROOT, run  # noqa: E402


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data-root", default=str(DEFAULT_ROOT))
    parser.add_argument("--train-per-class", type=int, default=100)
    parser.add_argument("--test-per-class", type=int, default=100)
    parser.add_argument("--width", type=int, default=32)
    parser.add_argument("--epochs", type=int, default=30)
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--lr", type=float, default=0.05)
    parser.add_argument("--momentum", type=float, default=0.9)
    parser.add_argument("--epsilon", type=float, default=8.0)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    import torch
    torch.set_num_threads(1)
    common = ["--scenario", "split_cifar", "--n-tasks", "1", "--data-root", args.data_root, "--backbone", "cnn",
              "--train-per-class", str(args.train_per_class), "--test-per-class", str(args.test_per_class),
              "--backbone-width", str(args.width), "--epochs", str(args.epochs),
              "--batch-size", str(args.batch_size), "--lr", str(args.lr), "--momentum", str(args.momentum),
              "--seed", str(args.seed), "--audit", "mia"]
    print(f"CIFAR-10, {args.train_per_class} train (members) / {args.test_per_class} test (non-members) images "
          f"per class, cnn width {args.width}, {args.epochs} epochs, batch {args.batch_size}, lr {args.lr}, "
          f"momentum {args.momentum}, seed {args.seed}; DP-SGD at target ε {args.epsilon}, δ 1e-5, C 1", flush=True)
    print(f"{'run':8} {'test acc':>8} {'AUC':>6} {'MIA heuristic ε':>15} {'ε accountant':>12} {'time s':>7}")
    for name, extra in (("naive", ["--strategy", "naive"]),
                        ("dpsgd", ["--strategy", "dpsgd", "--epsilon", str(args.epsilon), "--delta", "1e-5"])):
        t0 = time.perf_counter()
        summary = run(common + extra)
        audit = next(iter(summary["audit"]["tasks"].values()))
        acc = audit["epsilon_accountant"]
        print(f"{name:8} {summary['acc']:8.2f} {audit['auc']:6.3f} {audit['mia_heuristic_epsilon']:15.3f} "
              f"{'inf' if acc is None else f'{acc:.3f}':>12} {time.perf_counter() - t0:7.0f}", flush=True)


if __name__ == "__main__":
    main()
