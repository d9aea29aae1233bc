"""clsim's overhead over a bare PyTorch loop doing the same arithmetic on split_cifar.

Both sides train the same model (same initial weights), on the same data, in the same batch
order, with the same optimiser, and evaluate every task before training and after each task;
clsim additionally writes TensorBoard, JSONL and checkpoints (the full CLI path). The final
accuracy matrices must agree exactly, which checks that the arithmetic was the same.

    python bench/overhead.py                       # 300 training images per class, ~2 minutes
    python bench/overhead.py --train-per-class 0   # all of CIFAR-10
Target: clsim / bare <= 1.05.
"""
from __future__ import annotations

import argparse
import contextlib
import io
import sys
import tempfile
import time
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from clsim import Experiment  # noqa: E402
from clsim.cli import from_argv  # noqa: E402
from clsim.experiment import seed_everything  # noqa: E402

DEFAULT_ROOT = Path(__file__).resolve().parent.parent / ".cache" / "cifar10"


def bare_loop(experiment: Experiment) -> list[list[float]]:
    """What clsim's naive strategy computes, written as a plain PyTorch script."""
    run = experiment.run_options
    generator = seed_everything(run.seed)
    scenario = experiment.parties.scenario_entry.target(experiment.scenario_options, run)
    model = scenario.make_model()
    epochs, lr, bs = run.epochs, run.lr, run.batch_size

    @torch.no_grad()
    def evaluate(task) -> float:
        model.eval()
        preds = torch.cat([model(x, task.index).argmax(1) for x in task.test.x.split(1000)])
        model.train()
        return 100.0 * (preds == task.test.y).float().mean().item()

    [evaluate(t) for t in scenario.tasks]                     # clsim's initial scores (for FWT)
    matrix = []
    for task in scenario.tasks:
        optimizer = torch.optim.SGD(model.parameters(), lr=lr, momentum=run.momentum)
        model.train()
        for _ in range(epochs):
            order = torch.randperm(len(task.train), generator=generator)
            for chunk in order.split(bs):
                loss = F.cross_entropy(model(task.train.x[chunk], task.index), task.train.y[chunk])
                optimizer.zero_grad(set_to_none=True)
                loss.backward()
                optimizer.step()
        matrix.append([evaluate(t) for t in scenario.tasks])
    return matrix


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--data-root", default=str(DEFAULT_ROOT))
    p.add_argument("--train-per-class", type=int, default=300)
    p.add_argument("--test-per-class", type=int, default=100)
    p.add_argument("--backbone", default="cnn", choices=("cnn", "resnet18"))
    p.add_argument("--epochs", type=int, default=1)
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--repeats", type=int, default=3, help="alternating runs of each; the fastest counts")
    p.add_argument("--threads", type=int, default=1)
    a = p.parse_args()
    torch.set_num_threads(a.threads)
    with tempfile.TemporaryDirectory() as out:
        argv = ["--scenario", "split_cifar", "--strategy", "naive", "--data-root", a.data_root,
                "--train-per-class", str(a.train_per_class), "--test-per-class", str(a.test_per_class),
                "--backbone", a.backbone, "--epochs", str(a.epochs), "--batch-size", str(a.batch_size),
                "--lr", "0.05", "--seed", "0", "--out", out, "--progress", "false"]
        experiment = from_argv(argv)
        experiment.parties.scenario_entry.target(experiment.scenario_options, experiment.run_options)  # decode CIFAR once
        times = {"bare": [], "clsim": []}
        for i in range(a.repeats):
            for side in ("bare", "clsim") if i % 2 == 0 else ("clsim", "bare"):  # alternate who goes first
                t0 = time.perf_counter()
                if side == "bare":
                    bare = bare_loop(experiment)
                else:
                    with contextlib.redirect_stdout(io.StringIO()):     # clsim's per-task lines
                        summary = from_argv(argv).run().summary
                times[side].append(time.perf_counter() - t0)
        same = summary["accuracy_matrix"] == bare
    b, c = min(times["bare"]), min(times["clsim"])
    print(f"split_cifar {a.backbone}, {a.train_per_class or 5000}/{a.test_per_class or 1000} images per class, "
          f"{a.epochs} epoch(s), batch {a.batch_size}, {a.threads} thread(s), best of {a.repeats}")
    print(f"bare PyTorch loop: {b:8.2f} s   (runs: {', '.join(f'{t:.2f}' for t in times['bare'])})")
    print(f"clsim naive (CLI): {c:8.2f} s   (runs: {', '.join(f'{t:.2f}' for t in times['clsim'])})")
    print(f"ratio clsim/bare:  {c / b:8.3f}   (target <= 1.05)")
    print(f"identical accuracy matrices: {same}   final ACC {sum(bare[-1]) / len(bare[-1]):.2f}")


if __name__ == "__main__":
    main()
