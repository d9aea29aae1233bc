"""BLIP side by side with naive fine-tuning and EWC, through the real CLI (one process).

    OMP_NUM_THREADS=1 python bench/blip.py [--parts accuracy,mnist,memory] [--data-root DIR]

accuracy: split_cifar task_il (5 tasks x 2 classes, real CIFAR-10, a per-class subset): final ACC,
          BWT and forgetting of BLIP, naive and EWC with the same epochs/lr/batch (wall times from
          the engine's timers: noisy on a shared machine).
cost:     CPU time of one CIFAR task: training with and without BLIP's clamp, and BLIP's Fisher +
          freeze step as a share of the task's training time.
mnist:    split_mnist task_il with the paper's MNIST-5 network and flags (MLP 784-1200, SGD lr 0.01,
          batch 64). Needs the MNIST IDX files under --data-root; skipped (and said so) without them.
memory:   strategy state bytes after 5 and after 20 tasks: BLIP, EWC-separate, online EWC, on
          permuted digits (20 fixed pixel permutations of scikit-learn's 8x8 digits, defined here)
          and on permuted_mnist with 20 permutations when MNIST is under --data-root.
CIFAR-10 is read from --data-root, else from the tests' cache (.cache/cifar10, built by the tests).
"""
from __future__ import annotations

import argparse
import contextlib
import io
import json
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))
from clsim import Experiment  # noqa: E402
from clsim.cli import from_argv  # noqa: E402
from clsim.errors import UserError  # noqa: E402
from clsim.models import make_model  # noqa: E402
from clsim.registry import SCENARIOS, register_scenario  # noqa: E402
from clsim.scenario import Scenario, Task, TaskData  # noqa: E402


def run(*args: str) -> tuple[dict, list[dict]]:
    """One CLI run; returns its summary and its task-end records (from log.jsonl)."""
    with tempfile.TemporaryDirectory() as out, contextlib.redirect_stdout(io.StringIO()):
        result = from_argv(["--out", out, "--checkpoint", "false", "--progress", "false", *args]).run()
        run_dir, summary = result.run_dir, result.summary
        tasks = [r for r in map(json.loads, (run_dir / "log.jsonl").open()) if r["kind"] == "task"]
    return json.loads(json.dumps(summary, default=float)), tasks


@dataclass
class NoOptions:
    pass


# A scenario defined only inside this benchmark: many cheap tasks for the memory table.
@register_scenario("bench_permuted_digits", NoOptions)
def permuted_digits(o, run_options) -> Scenario:
    """8x8 digits under 20 fixed pixel permutations (benchmark only; domain_il, one shared head)."""
    digits = SCENARIOS.get("split_digits")
    base = digits.target(digits.options(n_tasks=1), run_options)
    train, test = base.tasks[0].train, base.tasks[0].test
    g = torch.Generator().manual_seed(0)
    tasks = []
    for i in range(20):
        perm = torch.randperm(64, generator=g)
        parts = [TaskData(d.x.flatten(1)[:, perm].view(-1, 1, 8, 8), d.y) for d in (train, test)]
        tasks.append(Task(i, f"perm{i}", tuple(range(10)), *parts, n_outputs=10))
    return Scenario("bench_permuted_digits", "domain_il", tasks,
                    make_model=lambda: make_model("mlp", (1, 8, 8), "domain_il", [10] * 20, 10, hidden=(100, 100)),
                    defaults={"epochs": 1, "lr": 0.05, "batch_size": 32}, input_kind="digits")


def cifar_root(data_root: str) -> str:
    for root in (Path(data_root), REPO / ".cache" / "cifar10"):
        if (root / "cifar-10-batches-py" / "test_batch").is_file():
            return str(root)
    raise SystemExit(f"no CIFAR-10 under {data_root} or {REPO / '.cache/cifar10'}: pass --data-root "
                     f"(a folder holding cifar-10-batches-py) or run the tests once to build the cache")


def accuracy_table(name: str, common: list[str], strategies: list[str], extra: dict[str, list[str]]) -> None:
    print(f"## {name}: {' '.join(common)}")
    print("| strategy | ACC | BWT | forgetting | train s | after_task s (BLIP: Fisher+freeze, EWC: Fisher) | after_task / train | "
          "state bytes |")
    print("|---|---|---|---|---|---|---|---|")
    train_time = {}
    for strategy in strategies:
        s, tasks = run(*common, "--strategy", strategy, *extra.get(strategy, []))
        wt = s["wall_time"]
        train_time[strategy] = wt["train"]
        print(f"| {strategy} | {s['acc']:.2f} | {s['bwt']:.2f} | {s['forgetting']:.2f} | {wt['train']:.1f} | "
              f"{wt['strategy']:.1f} | {wt['strategy'] / wt['train']:.3f} | "
              f"{s['memory']['strategy_state_bytes']} |", flush=True)
        if strategy == "blip":
            caps = " ".join(f"{r['strategy']['blip_capacity']:.3f}" for r in tasks)
            bits = " ".join(f"{r['strategy']['blip_bits_mean']:.2f}" for r in tasks)
            blip_rows = s["accuracy_matrix"]
    if "blip" in train_time:
        print(f"\nBLIP capacity used after each task: {caps}; mean bits frozen: {bits}")
        print("BLIP accuracy matrix (row i: after task i):")
        for row in blip_rows:
            print("  " + " ".join(f"{x:5.1f}" for x in row))
    if "blip" in train_time and "naive" in train_time:
        print(f"clamp overhead: BLIP training time / naive training time = "
              f"{train_time['blip'] / train_time['naive']:.2f}")
    print(flush=True)


def memory_table(scenario_args: list[str], label: str) -> None:
    print(f"## strategy state bytes, {label}")
    print("| strategy | after 5 tasks | after 20 tasks | ratio 20/5 |")
    print("|---|---|---|---|")
    ewc = ["--strategy", "ewc", "--fisher-samples", "500"]
    variants = {"blip": ["--strategy", "blip", "--blip-fisher-samples", "500"],
                "ewc (separate)": [*ewc, "--mode", "separate"], "ewc (online)": [*ewc, "--mode", "online"]}
    for label_, args in variants.items():
        _, tasks = run(*scenario_args, *args)
        b5, b20 = (tasks[i]["memory"]["strategy_state_bytes"] for i in (4, 19))
        print(f"| {label_} | {b5:,} | {b20:,} | {b20 / b5:.2f} |", flush=True)
    print(flush=True)


def cost(data_root: str, backbone: str, per_class: str, epochs: int, repeats: int = 2) -> None:
    """CPU time (process_time: robust to other processes on the machine) of one task's training
    under BLIP, of the clamps inside it, and of the Fisher + freeze step after it."""
    from clsim import config
    from clsim.learners.supervised import SupervisedLearner
    from clsim.privacy.ledger import Ledger
    from clsim.privacy.mechanism import Mechanism
    from clsim.strategies.blip import BLIP
    experiment = from_argv(["--scenario", "split_cifar", "--setting", "task_il", "--data-root", data_root,
                                       "--backbone", backbone, "--train-per-class", per_class, "--test-per-class", "10"])
    scenario = experiment.parties.scenario_entry.target(experiment.scenario_options, experiment.run_options)
    task = scenario.tasks[0]
    print(f"## cost of BLIP on split_cifar task 0 ({len(task.train)} images, {epochs} epochs, batch 32, "
          f"backbone {backbone}, {len(task.train)} Fisher samples; CPU seconds, 1 thread)")
    print("| repeat | task training (incl. clamps) | clamps (after_step) | clamps / training | "
          "Fisher + freeze | Fisher + freeze / training |")
    print("|---|---|---|---|---|---|")
    for r in range(repeats):
        torch.manual_seed(r)
        learner = SupervisedLearner(scenario.make_model(), lr=0.05, momentum=0.0, batch_size=32,
                                    device=torch.device("cpu"), generator=torch.Generator().manual_seed(r))
        mechanism = Mechanism()
        mechanism.setup(learner, scenario, Ledger())
        blip = BLIP(config.build(BLIP.Options, {}))
        blip.setup(learner, scenario, mechanism)
        optimizer = learner.make_optimizer()
        clamp, start = 0.0, time.process_time()
        for epoch in range(epochs):
            for batch in learner.batches(task, epoch):
                losses, _ = learner.forward(batch)
                optimizer.zero_grad(set_to_none=True)
                losses.mean().backward()
                optimizer.step()
                t = time.process_time()
                blip.after_step()
                clamp += time.process_time() - t
        train = time.process_time() - start
        start = time.process_time()
        blip.after_task(task)
        freeze = time.process_time() - start
        print(f"| {r} | {train:.1f} | {clamp:.2f} | {clamp / train:.2%} | {freeze:.1f} | {freeze / train:.2f} |",
              flush=True)
    print(flush=True)


def have_mnist(data_root: str) -> bool:
    from clsim.data import load_mnist
    try:
        load_mnist(data_root)
        return True
    except UserError as exc:
        print(f"(MNIST parts skipped: {exc})\n")
        return False


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--parts", default="accuracy,cost,mnist,memory")
    p.add_argument("--data-root", default="data", help="folder with cifar-10-batches-py and/or the MNIST IDX files")
    p.add_argument("--strategies", default="blip,naive,ewc")
    p.add_argument("--seed", default="0")
    p.add_argument("--cifar-train-per-class", default="500")
    p.add_argument("--cifar-test-per-class", default="500")
    p.add_argument("--cifar-epochs", default="5")
    p.add_argument("--cifar-backbone", default="cnn", help="cnn (SmallCNN) or resnet18 (reduced ResNet-18)")
    p.add_argument("--cifar-lr", default="0.05")
    p.add_argument("--ewc-lambda", default="10")
    p.add_argument("--mnist-epochs", default="5")
    a = p.parse_args()
    parts, strategies = a.parts.split(","), a.strategies.split(",")
    torch.set_num_threads(1)
    extra = {"ewc": ["--ewc-lambda", a.ewc_lambda]}
    if "accuracy" in parts:
        accuracy_table("split_cifar task_il, 5 tasks x 2 classes",
                       ["--scenario", "split_cifar", "--setting", "task_il", "--data-root", cifar_root(a.data_root),
                        "--backbone", a.cifar_backbone, "--train-per-class", a.cifar_train_per_class,
                        "--test-per-class", a.cifar_test_per_class,
                        "--epochs", a.cifar_epochs, "--lr", a.cifar_lr, "--batch-size", "32", "--seed", a.seed],
                       strategies, extra)
    if "cost" in parts:
        cost(cifar_root(a.data_root), a.cifar_backbone, a.cifar_train_per_class, int(a.cifar_epochs))
    mnist = ("mnist" in parts or "memory" in parts) and have_mnist(a.data_root)
    if "mnist" in parts and mnist:
        accuracy_table("split_mnist task_il, BLIP's MNIST-5 network and flags (MLP 784-1200, SGD lr 0.01, batch 64)",
                       ["--scenario", "split_mnist", "--setting", "task_il", "--mnist-protocol", "blip",
                        "--data-root", a.data_root, "--epochs", a.mnist_epochs, "--seed", a.seed],
                       strategies, extra)
    if "memory" in parts:
        memory_table(["--scenario", "bench_permuted_digits", "--seed", a.seed],
                     "permuted digits (20 permutations of 8x8 digits, MLP 64-100-100, domain_il, 1 epoch)")
        if mnist:
            memory_table(["--scenario", "permuted_mnist", "--n-permutations", "20", "--train-per-class", "50",
                          "--test-per-class", "20", "--data-root", a.data_root, "--epochs", "1", "--seed", a.seed],
                         "permuted_mnist (20 permutations, MLP 784-400-400, 50 images per class per task, 1 epoch)")


if __name__ == "__main__":
    main()
