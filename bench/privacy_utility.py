"""Utility at equal ε: DP-SGD vs DPlis on real CIFAR-10, everything else equal.

Each configuration runs the real CLI (in-process) on split_cifar: `--n-tasks 1` is plain
CIFAR-10 (one task, ten classes); `--n-tasks 5` is the continual stream (task_il). σ is chosen by
the mechanism for the target ε over the whole stream (δ fixed), so both mechanisms spend the
same budget; the table shows the ε the ledger reports. Budgets are reduced to fit a CPU: a
per-class subset, a narrow CNN, few epochs (all printed). `dplis` is DPlis in its authors' form
(`--dplis-aggregate sum`: each example's gradient summed over the K copies, then clipped, as
their dp_train.py does); `dplis_mean` is clsim's default (the mean over the copies).

    python bench/privacy_utility.py                       # ε 3 and 8, one task and split
    python bench/privacy_utility.py --epsilons 8 --scenarios 1
"""
from __future__ import annotations

import argparse
import contextlib
import io
import json
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from clsim import Experiment  # noqa: E402
from clsim.cli import from_argv  # noqa: E402

DEFAULT_ROOT = Path(__file__).resolve().parent.parent / ".cache" / "cifar10"


def run(argv: list[str]) -> dict:
    with tempfile.TemporaryDirectory() as out, contextlib.redirect_stdout(io.StringIO()):
        summary = from_argv([*argv, "--out", out, "--progress", "false",
                                        "--checkpoint", "false"]).run().summary
    return summary


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data-root", default=str(DEFAULT_ROOT))
    parser.add_argument("--epsilons", default="3,8")
    parser.add_argument("--scenarios", default="1,5", help="n-tasks values: 1 = CIFAR-10, 5 = split_cifar")
    parser.add_argument("--mechanisms", default="dpsgd,dplis", help="of dpsgd, dplis (authors' sum form), dplis_mean")
    parser.add_argument("--train-per-class", type=int, default=250)
    parser.add_argument("--test-per-class", type=int, default=200)
    parser.add_argument("--width", type=int, default=16)
    parser.add_argument("--epochs", type=int, default=4)
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--lr", type=float, default=0.1)
    parser.add_argument("--momentum", type=float, default=0.9)
    parser.add_argument("--max-grad-norm", type=float, default=1.0)
    parser.add_argument("--dplis-k", type=int, default=10)
    parser.add_argument("--dplis-radius", type=float, default=20.0)
    parser.add_argument("--delta", type=float, default=1e-5)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--json", help="also write the rows here")
    args = parser.parse_args()
    import torch
    torch.set_num_threads(1)
    rows = []
    print(f"split_cifar, {args.train_per_class} train / {args.test_per_class} test images per class, cnn "
          f"width {args.width}, {args.epochs} epochs per task, batch {args.batch_size}, lr {args.lr}, momentum "
          f"{args.momentum}, C {args.max_grad_norm}, δ {args.delta:g}, DPlis K {args.dplis_k} radius "
          f"{args.dplis_radius}, seed {args.seed}", flush=True)
    print(f"{'tasks':>5} {'setting':8} {'ε target':>8} {'mechanism':10} {'ACC':>6} {'ε ledger':>8} {'σ':>6} {'time s':>7}")
    for n_tasks in map(int, args.scenarios.split(",")):
        setting = "class_il" if n_tasks == 1 else "task_il"
        for eps in map(float, args.epsilons.split(",")):
            for mechanism in args.mechanisms.split(","):
                argv = ["--scenario", "split_cifar", "--strategy", mechanism.split("_")[0], "--n-tasks", str(n_tasks),
                        "--setting", setting, "--data-root", args.data_root, "--backbone", "cnn",
                        "--train-per-class", str(args.train_per_class), "--test-per-class", str(args.test_per_class),
                        "--backbone-width", str(args.width), "--epochs", str(args.epochs),
                        "--batch-size", str(args.batch_size), "--lr", str(args.lr), "--momentum", str(args.momentum),
                        "--max-grad-norm", str(args.max_grad_norm), "--epsilon", str(eps),
                        "--delta", str(args.delta), "--seed", str(args.seed)]
                if mechanism.startswith("dplis"):
                    argv += ["--dplis-k", str(args.dplis_k), "--dplis-radius", str(args.dplis_radius),
                             "--dplis-aggregate", "mean" if mechanism == "dplis_mean" else "sum"]
                t0 = time.perf_counter()
                summary = run(argv)
                seconds = time.perf_counter() - t0
                privacy = summary["privacy"]
                sigma = next(iter(privacy["datasets"].values()))["accesses"][0]["noise_multiplier"]
                row = {"n_tasks": n_tasks, "setting": setting, "epsilon_target": eps, "mechanism": mechanism,
                       "acc": summary["acc"], "epsilon": privacy["epsilon_worst"], "noise_multiplier": sigma,
                       "seconds": seconds, "accuracy_matrix": summary["accuracy_matrix"]}
                rows.append(row)
                print(f"{n_tasks:5d} {setting:8} {eps:8g} {mechanism:10} {row['acc']:6.2f} {row['epsilon']:8.3f} "
                      f"{sigma:6.3f} {seconds:7.0f}", flush=True)
    if args.json:
        Path(args.json).write_text(json.dumps({"args": vars(args), "rows": rows}, indent=2))


if __name__ == "__main__":
    main()
