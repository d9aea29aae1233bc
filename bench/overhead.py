"""clsim's overhead over a bare PyTorch loop doing the same arithmetic on split_cifar, eager and compiled.

Four sides, timed in one run, alternating who goes first: the bare loop, the bare loop with its
training forwards through torch.compile(model), clsim naive (the CLI path: TensorBoard, JSONL,
checkpoints), and clsim naive --compile (which compiles the same way: training forwards compiled,
evaluation eager). All train the same model (same initial weights), on the same data, in the same
batch order, with the same optimiser, and evaluate every task before training and after each
task; on CUDA the bare loop takes NHWC (channels_last) convolutions as clsim does. Matching
accuracy matrices (clsim vs bare, each eager and compiled) check that the arithmetic was the same.

The compiled sides are measured warm: a first, untimed run of each compiles the model (compile
time is a one-off a long run does not see, and the compiled code is cached for the timed runs).

    python bench/overhead.py                           # 300 training images per class, CPU
    python bench/overhead.py --device cuda --train-per-class 0    # all of CIFAR-10 on a GPU
Target: clsim / bare <= 1.05, eager and compiled.
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


def bare_loop(experiment: Experiment, compiled: bool) -> list[list[float]]:
    """What clsim's naive strategy computes, written as a plain PyTorch script."""
    run = experiment.run_options
    device = torch.device(run.device)
    generator = seed_everything(run.seed, device)
    scenario = experiment.parties.scenario_entry.target(experiment.scenario_options, run)
    model = scenario.make_model().to(device)
    nhwc = device.type == "cuda" and any(isinstance(m, torch.nn.Conv2d) for m in model.modules())
    if nhwc:
        model = model.to(memory_format=torch.channels_last)
    train_forward = torch.compile(model) if compiled else model
    epochs, lr, bs = run.epochs, run.lr, run.batch_size
    eval_chunk = 64 if device.type == "cpu" else 1000   # clsim's evaluation batch on each device
    on_device = [(t.train.x.to(device), t.train.y.to(device), t.test.x.to(device), t.test.y.to(device))
                 for t in scenario.tasks]

    @torch.no_grad()
    def evaluate(task) -> float:
        _, _, x, y = on_device[task.index]
        model.eval()
        preds = torch.cat([model(chunk, task.index).argmax(1) for chunk in x.split(eval_chunk)])
        model.train()
        return 100.0 * (preds == y).float().mean().item()

    [evaluate(t) for t in scenario.tasks]                     # clsim's initial scores (for FWT)
    matrix = []
    for task in scenario.tasks:
        x, y, _, _ = on_device[task.index]
        optimizer = torch.optim.SGD(model.parameters(), lr=lr, momentum=run.momentum)
        model.train()
        for _ in range(epochs):
            order = torch.randperm(len(x), generator=generator).to(device)
            for rows in order.split(bs):
                batch = x[rows].contiguous(memory_format=torch.channels_last) if nhwc else x[rows]
                loss = F.cross_entropy(train_forward(batch, task.index), y[rows])
                optimizer.zero_grad(set_to_none=True)
                loss.backward()
                optimizer.step()
        matrix.append([evaluate(t) for t in scenario.tasks])
    return matrix


SIDES = ("bare", "bare compiled", "clsim", "clsim --compile")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--data-root", default=str(DEFAULT_ROOT))
    p.add_argument("--device", default="cpu", choices=("cpu", "cuda"))
    p.add_argument("--train-per-class", type=int, default=300, help="0: all 5000")
    p.add_argument("--test-per-class", type=int, default=100, help="0: all 1000")
    p.add_argument("--backbone", default="cnn", choices=("cnn", "resnet18"))
    p.add_argument("--epochs", type=int, default=1)
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--repeats", type=int, default=3, help="timed runs of each side; the fastest counts")
    p.add_argument("--threads", type=int, default=1)
    a = p.parse_args()
    torch.set_num_threads(a.threads)
    with tempfile.TemporaryDirectory() as out:
        argv = ["--scenario", "split_cifar", "--strategy", "naive", "--data-root", a.data_root,
                "--train-per-class", str(a.train_per_class), "--test-per-class", str(a.test_per_class),
                "--backbone", a.backbone, "--epochs", str(a.epochs), "--batch-size", str(a.batch_size),
                "--lr", "0.05", "--seed", "0", "--device", a.device, "--out", out, "--progress", "false"]
        experiment = from_argv(argv)
        experiment.parties.scenario_entry.target(experiment.scenario_options, experiment.run_options)  # decode CIFAR once
        run = {"bare": lambda: bare_loop(experiment, compiled=False),
               "bare compiled": lambda: bare_loop(experiment, compiled=True),
               "clsim": lambda: clsim(argv),
               "clsim --compile": lambda: clsim(argv + ["--compile", "true"])}
        matrices = {side: run[side]() for side in SIDES if "compile" in side}   # untimed: compiles
        times = {side: [] for side in SIDES}
        for i in range(a.repeats):
            for side in SIDES[i % 4:] + SIDES[:i % 4]:   # who goes first rotates
                sync(a.device)
                t0 = time.perf_counter()
                matrices[side] = run[side]()
                sync(a.device)
                times[side].append(time.perf_counter() - t0)
    best = {side: min(t) for side, t in times.items()}
    print(f"split_cifar {a.backbone} on {a.device}, {a.train_per_class or 5000}/{a.test_per_class or 1000} images "
          f"per class, {a.epochs} epoch(s), batch {a.batch_size}, {a.threads} thread(s), best of {a.repeats} "
          f"(torch {torch.__version__})")
    for side in SIDES:
        print(f"{side + ':':17} {best[side]:8.2f} s   (runs: {', '.join(f'{t:.2f}' for t in times[side])})")
    for ours, theirs in (("clsim", "bare"), ("clsim", "bare compiled"), ("clsim --compile", "bare compiled")):
        print(f"ratio {ours} / {theirs}: {best[ours] / best[theirs]:6.3f}   (target <= 1.05)   identical "
              f"accuracy matrices: {matrices[ours] == matrices[theirs]}")
    final = matrices["bare"][-1]
    print(f"final ACC (bare): {sum(final) / len(final):.2f}")


def clsim(argv: list[str]) -> list[list[float]]:
    with contextlib.redirect_stdout(io.StringIO()):     # clsim's per-task lines
        return from_argv(argv).run().summary["accuracy_matrix"]


def sync(device: str) -> None:
    """Wait for queued accelerator work, so host clocks time what was computed."""
    if device == "cuda":
        torch.cuda.synchronize()


if __name__ == "__main__":
    main()
