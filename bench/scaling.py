"""Data-parallel scaling: steps/s and images/s of one run on 1, 2, 4 workers, side by side.

Every run is the same (same seed, same global batch, so the same steps); only --workers changes.
Speed-up is the 1-worker training time over the N-worker one, efficiency that divided by N. The
training phase is timed (summary wall_time.train: no process start, no evaluation); memory is the
peak RSS of rank 0 (the workers are symmetric) and, on a GPU, its peak allocated device memory.

    python bench/scaling.py                                        # split_digits on CPU (gloo)
    python bench/scaling.py --scenario split_cifar --model resnet18 --device cuda --workers 1,2,4
    python bench/scaling.py --privacy dpsgd                        # private: one noise draw a step
On a machine with fewer free cores than workers the CPU figures show contention, not scaling.
"""
from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from clsim import Experiment  # noqa: E402


def measure(options: dict, workers: int) -> dict:
    start = time.perf_counter()
    summary = Experiment(**options, workers=workers).run().summary
    train = summary["wall_time"]["train"]
    images = summary.get("examples_seen")   # left out under a privacy mechanism
    return {"workers": workers, "steps": summary["steps"], "train_s": train,
            "steps_per_s": summary["steps"] / train,
            "images_per_s": None if images is None else images / train,
            "total_s": time.perf_counter() - start, "acc": summary["acc"],
            "rss_mb": summary["memory"]["peak_rss_bytes"] / 2 ** 20,
            "gpu_mb": summary["memory"].get("peak_device_bytes", 0) / 2 ** 20}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--scenario", default="split_digits")
    p.add_argument("--strategy", default="naive")
    p.add_argument("--privacy", default=None)
    p.add_argument("--workers", default="1,2,4")
    p.add_argument("--device", default="cpu")
    p.add_argument("--epochs", type=int, default=2)
    p.add_argument("--batch-size", type=int, default=256)
    p.add_argument("--data-root", default=None)
    p.add_argument("--model", default=None, help="split_cifar: --backbone of the scenario (e.g. resnet18)")
    p.add_argument("--train-per-class", type=int, default=None, help="split_cifar: training images per class")
    p.add_argument("--test-per-class", type=int, default=None, help="split_cifar: test images per class")
    p.add_argument("--warmup", action="store_true",
                   help="an untimed 1-worker run first: the 1-worker rows then exclude first-call set-up (device "
                        "context, kernels), as the processes of an N-worker run cannot")
    p.add_argument("--compile", action="store_true",
                   help="train through torch.compile (implies --warmup, which compiles; the processes of an "
                        "N-worker run compile again, from inductor's disk cache, and that counts in their time)")
    p.add_argument("--precision", default="32", choices=("32", "bf16-mixed"))
    p.add_argument("--seed", type=int, default=0)
    a = p.parse_args()
    options = {"scenario": a.scenario, "strategy": a.strategy, "epochs": a.epochs, "batch_size": a.batch_size,
               "device": a.device, "seed": a.seed, "progress": False, "loggers": [], "out": None,
               "compile": a.compile, "precision": a.precision,
               **({"privacy": a.privacy} if a.privacy else {}),
               **({"data_root": a.data_root} if a.data_root else {}),
               **({"backbone": a.model} if a.model else {}),
               **{k: getattr(a, k) for k in ("train_per_class", "test_per_class") if getattr(a, k) is not None}}
    if a.warmup or a.compile:
        measure(options, 1)
    rows = [measure(options, int(n)) for n in a.workers.split(",")]
    base = rows[0]
    print(f"{a.scenario} {a.strategy}{' under ' + a.privacy if a.privacy else ''} on {a.device} "
          f"{'compiled ' if a.compile else ''}{a.precision} "
          f"(torch {torch.__version__}, {torch.get_num_threads()} threads a process), global batch {a.batch_size}")
    print(f"{'workers':>7} {'steps':>6} {'train s':>8} {'steps/s':>8} {'images/s':>9} {'speed-up':>8} "
          f"{'efficiency':>10} {'ACC':>6} {'RSS MB':>7} {'GPU MB':>7}")
    for r in rows:
        speedup = base["train_s"] / r["train_s"]
        images = "-" if r["images_per_s"] is None else f"{r['images_per_s']:.0f}"
        print(f"{r['workers']:>7} {r['steps']:>6} {r['train_s']:>8.2f} {r['steps_per_s']:>8.1f} {images:>9} "
              f"{speedup:>8.2f} {speedup / (r['workers'] / base['workers']):>10.2f} {r['acc']:>6.2f} "
              f"{r['rss_mb']:>7.0f} {r['gpu_mb']:>7.0f}")


if __name__ == "__main__":
    main()
