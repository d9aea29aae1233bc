"""Cost of the Fisher phase after a task against one training epoch over the same examples.

    OMP_NUM_THREADS=1 python bench/fisher_cost.py --mnist-root DIR --cifar-root DIR [--n 1200]

For BLIP (Fisher + bit allocation + freeze) and EWC (Fisher + penalty update) on task 0 of
split_mnist (MLP 784-1200-1200, batch 64 as in BLIP's protocol) and split_cifar (the small CNN
and the reduced ResNet-18, batch 32), with n training examples and n Fisher samples: CPU seconds
(process_time, 1 thread) of the strategy's after_task, and of one plain training epoch over the
same n examples (forward, backward, SGD step). Rounds alternate the two; medians are printed with
their ratio (target: Fisher phase / epoch <= 1.5). A scenario whose data is missing is skipped
and said so.
"""
from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from clsim import config  # noqa: E402
from clsim import Experiment  # noqa: E402
from clsim.cli import from_argv  # noqa: E402
from clsim.errors import UserError  # noqa: E402
from clsim.learners.supervised import SupervisedLearner  # noqa: E402
from clsim.privacy.ledger import Ledger  # noqa: E402
from clsim.privacy.mechanism import Mechanism  # noqa: E402
from clsim.strategies.blip import BLIP  # noqa: E402
from clsim.strategies.ewc import EWC  # noqa: E402

STRATEGIES = {"blip": (BLIP, "blip_fisher_samples"), "ewc": (EWC, "fisher_samples")}


def scenario_of(args: list[str]):
    experiment = from_argv(["--setting", "task_il", *args])
    return experiment.parties.scenario_entry.target(experiment.scenario_options, experiment.run_options), experiment


def learner_of(scenario, batch_size: int, seed: int) -> SupervisedLearner:
    torch.manual_seed(seed)
    return SupervisedLearner(scenario.make_model(), lr=0.01, momentum=0.0, batch_size=batch_size,
                             device=torch.device("cpu"), generator=torch.Generator().manual_seed(seed))


def epoch_seconds(scenario, task, batch_size: int, seed: int) -> float:
    learner = learner_of(scenario, batch_size, seed)
    optimizer = learner.make_optimizer()
    start = time.process_time()
    for batch in learner.batches(task, 0):
        losses, _ = learner.forward(batch)
        optimizer.zero_grad(set_to_none=True)
        losses.mean().backward()
        optimizer.step()
    return time.process_time() - start


def fisher_seconds(scenario, task, batch_size: int, seed: int, strategy: str, n: int) -> float:
    cls, samples = STRATEGIES[strategy]
    learner = learner_of(scenario, batch_size, seed)
    mechanism = Mechanism()
    mechanism.setup(learner, scenario, Ledger())
    method = cls(config.build(cls.Options, {samples: n}))
    method.setup(learner, scenario, mechanism)
    start = time.process_time()
    method.after_task(task)
    return time.process_time() - start


def table(label: str, args: list[str], n: int, repeats: int) -> None:
    try:
        scenario, resolved = scenario_of(args)
    except UserError as exc:
        print(f"## {label}: skipped ({exc})\n")
        return
    task = scenario.tasks[0]
    batch_size = scenario.defaults.get("batch_size", 32)
    print(f"## {label}: task 0, {len(task.train)} examples, {n} Fisher samples, batch {batch_size} "
          f"(CPU seconds, median of {repeats})")
    print("| strategy | Fisher phase | training epoch | Fisher phase / epoch |")
    print("|---|---|---|---|")
    for strategy in STRATEGIES:
        phase, epoch = [], []
        for r in range(repeats):
            epoch.append(epoch_seconds(scenario, task, batch_size, r))
            phase.append(fisher_seconds(scenario, task, batch_size, r, strategy, n))
        p, e = statistics.median(phase), statistics.median(epoch)
        print(f"| {strategy} | {p:.2f} | {e:.2f} | {p / e:.2f} |", flush=True)
    print(flush=True)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--mnist-root", default="data", help="folder with the MNIST IDX files")
    p.add_argument("--cifar-root", default=str(Path(__file__).resolve().parent.parent / ".cache" / "cifar10"),
                   help="folder holding cifar-10-batches-py")
    p.add_argument("--n", type=int, default=1200, help="training examples of task 0 (two classes) = Fisher samples")
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--parts", default="mnist,cnn,resnet18")
    a = p.parse_args()
    torch.set_num_threads(1)
    per_class = str(a.n // 2)
    parts = a.parts.split(",")
    if "mnist" in parts:
        table("split_mnist (MLP 784-1200-1200)",
              ["--scenario", "split_mnist", "--mnist-protocol", "blip", "--mnist-hidden", "1200,1200",
               "--data-root", a.mnist_root,
               "--train-per-class", per_class, "--test-per-class", "10"], a.n, a.repeats)
    for backbone in ("cnn", "resnet18"):
        if backbone in parts:
            table(f"split_cifar ({backbone})",
                  ["--scenario", "split_cifar", "--backbone", backbone, "--data-root", a.cifar_root,
                   "--train-per-class", per_class, "--test-per-class", "10"], a.n, a.repeats)


if __name__ == "__main__":
    main()
