"""Dense DER++ vs SparCL-DER++ on real Split CIFAR-10, side by side in one run.

For each setting, trains dense DER++ and SparCL-DER++ at each sparsity with the same seed,
epochs, batches and loss (including the current-task logit mask in class_il, as SparCL's script
uses), and prints final ACC, BWT, counted training FLOPs (clsim.flops: dense shapes scaled by the
measured densities and the examples actually forwarded), the FLOPs ratio to dense, and wall time.
Target (issue 7): >= 5x fewer counted FLOPs at 0.90 with task_il ACC within 2 points of dense.

    OMP_NUM_THREADS=1 python bench/sparcl.py --data-root DATA_ROOT [--settings task_il]

Defaults are a CPU-sized budget: reduced ResNet-18 (width 8; the 16 block 3x3 convs masked),
200 train / 200 test images per class, 5 epochs per task, buffer 500, SGD lr 0.03 batch 32.
Mask updates and data-removal rounds run every `--every` epochs (SparCL's script: 5 of 50).
Wall time is measured, but masked weights are still multiplied as dense zeros, so it shrinks only
by the data removed and the cheaper bookkeeping, not by the sparsity.
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from clsim import Experiment  # noqa: E402
from clsim.cli import from_argv  # noqa: E402


def run_one(argv: list[str]) -> dict:
    parts = from_argv(argv).build()
    strategy = parts.strategy
    start = time.perf_counter()
    result = parts.train()
    extra = strategy.task_metrics()
    return {"acc": result["acc"], "bwt": result["bwt"], "flops": strategy.flops.total,
            "wall_s": time.perf_counter() - start, "steps": result["steps"],
            "examples": result["examples_seen"],
            "weight_density": extra.get("sparcl_weight_density", 1.0),
            "model_density": extra.get("sparcl_model_density", 1.0),
            "grad_density": extra.get("sparcl_grad_density", 1.0)}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--data-root", required=True)
    p.add_argument("--settings", default="task_il,class_il")
    p.add_argument("--sparsities", default="0.75,0.90")
    p.add_argument("--train-per-class", type=int, default=200)
    p.add_argument("--test-per-class", type=int, default=200)
    p.add_argument("--epochs", type=int, default=5)
    p.add_argument("--every", type=int, default=1, help="epochs between mask updates and DDR rounds")
    p.add_argument("--backbone", default="resnet18")
    p.add_argument("--width", type=int, default=8)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--lr", type=float, default=0.03)
    p.add_argument("--json", help="also write the rows to this file")
    a = p.parse_args()
    torch.set_num_threads(1)
    common = ["--scenario", "split_cifar", "--data-root", a.data_root, "--seed", str(a.seed),
              "--epochs", str(a.epochs), "--lr", str(a.lr), "--batch-size", "32",
              "--train-per-class", str(a.train_per_class), "--test-per-class", str(a.test_per_class),
              "--backbone", a.backbone, "--backbone-width", str(a.width), "--augment", "true",
              "--replay-size", "500", "--replay-batch", "32", "--derpp-alpha", "0.1", "--derpp-beta", "0.5"]
    sparse = ["--sparcl-update-every", str(a.every), "--sparcl-remove-every", str(a.every),
              "--sparcl-remove", "0.3", "--sparcl-remove-rounds", "4", "--sparcl-grad-sparsity", "0.8",
              "--sparcl-grad-refresh", "30"]
    print(f"# {vars(a)}", flush=True)
    rows = []
    for setting in a.settings.split(","):
        mask = ["--replay-mask-current", "true"] if setting == "class_il" else []
        runs = [("DER++ dense", ["--strategy", "derpp"])]
        runs += [(f"SparCL-DER++ {s}", ["--strategy", "sparcl", "--sparcl-sparsity", s, *sparse])
                 for s in a.sparsities.split(",")]
        dense = None
        for name, args in runs:
            r = run_one(common + ["--setting", setting, *mask, *args])
            dense = dense or r
            r.update(setting=setting, method=name, flops_ratio=dense["flops"] / r["flops"],
                     acc_minus_dense=r["acc"] - dense["acc"])
            rows.append(r)
            print(f"{setting:9s} {name:18s} ACC {r['acc']:6.2f} (vs dense {r['acc_minus_dense']:+6.2f})  "
                  f"BWT {r['bwt']:7.2f}  FLOPs {r['flops']:.3e} ({r['flops_ratio']:5.2f}x fewer)  "
                  f"wall {r['wall_s']:7.1f}s  examples {r['examples']}  masked density "
                  f"{r['weight_density']:.3f}  model density {r['model_density']:.3f}", flush=True)
    if a.json:
        Path(a.json).write_text(json.dumps(rows, indent=2))


if __name__ == "__main__":
    main()
