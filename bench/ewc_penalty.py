"""Cost of one EWC penalty (forward + backward) against the number of tasks behind it.

Side by side on the same weights: the textbook separate-mode penalty, one Σ F_t (θ - θ*_t)² term
per earlier task and per parameter tensor (what Avalanche 0.6 and clsim before its consolidation
evaluate every step), and clsim's EWC, which folds every task into one quadratic over the flattened
weights (strategies/ewc.py). Both values are printed to show they agree.

    python bench/ewc_penalty.py                      # reduced ResNet-18 of split_cifar, CPU
    python bench/ewc_penalty.py --device cuda        # where the per-tensor kernels add up
Reads: time per step of each, and their ratio, for 1..N earlier tasks.
"""
from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path
from types import SimpleNamespace

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from clsim.learners.supervised import SupervisedLearner  # noqa: E402
from clsim.models import make_model  # noqa: E402
from clsim.strategies.ewc import EWC  # noqa: E402


class GivenFisher:
    """Stands in for the privacy mechanism: hands EWC the Fisher this bench drew."""
    ledger = None

    def __init__(self):
        self.next = None

    def fisher(self, *args):
        return self.next


def per_task_penalty(params, terms, lam):
    return 0.5 * lam * sum((f[n] * (params[n] - a[n]).pow(2)).sum() for f, a in terms for n in f)


def seconds_per_step(penalty_fn, params, repeat, device):
    for p in params.values():
        p.grad = None

    def step():
        penalty_fn().backward()
    step()
    if device.type == "cuda":
        torch.cuda.synchronize()
    t = time.perf_counter()
    for _ in range(repeat):
        step()
    if device.type == "cuda":
        torch.cuda.synchronize()
    return (time.perf_counter() - t) / repeat


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--backbone", default="resnet18", choices=("cnn", "resnet18"))
    p.add_argument("--tasks", type=int, default=9, help="largest number of earlier tasks")
    p.add_argument("--repeat", type=int, default=20)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--threads", type=int, default=1)
    a = p.parse_args()
    torch.set_num_threads(a.threads)
    torch.manual_seed(0)
    device = torch.device(a.device)
    model = make_model(a.backbone, (3, 32, 32), "class_il", [], 10)
    learner = SupervisedLearner(model, lr=0.1, momentum=0.0, batch_size=32, device=device,
                                generator=torch.Generator())
    mechanism = GivenFisher()
    ewc = EWC(EWC.Options(ewc_lambda=1e-3))   # small: its random Fishers stay within what SGD takes
    tasks = [SimpleNamespace(index=k) for k in range(a.tasks + 1)]
    ewc.setup(learner, SimpleNamespace(tasks=tasks), mechanism)
    params = learner.shared_parameters()
    print(f"{a.backbone}: {len(params)} parameter tensors, {sum(p.numel() for p in params.values()):,} weights, "
          f"{a.device}, {a.threads} thread(s); ms per penalty forward+backward")
    print(f"{'tasks':>5} {'per-task terms':>15} {'clsim':>8} {'ratio':>6}   values (per-task / clsim)")
    terms = []
    for k in range(1, a.tasks + 1):
        with torch.no_grad():      # move the weights, then record task k's Fisher and anchor
            for q in params.values():
                q.add_(0.01 * torch.randn_like(q))
        fisher = {n: torch.rand_like(q) for n, q in params.items()}
        terms.append((fisher, {n: q.detach().clone() for n, q in params.items()}))
        mechanism.next = fisher
        ewc.after_task(tasks[k - 1])
        with torch.no_grad():
            for q in params.values():
                q.add_(0.01 * torch.randn_like(q))
        textbook = seconds_per_step(lambda: per_task_penalty(params, terms, 1e-3), params, a.repeat, device)
        ours = seconds_per_step(ewc.penalty, params, a.repeat, device)
        with torch.no_grad():
            values = f"{float(per_task_penalty(params, terms, 1e-3)):.6g} / {float(ewc.penalty()):.6g}"
        print(f"{k:5d} {1e3 * textbook:15.2f} {1e3 * ours:8.2f} {textbook / ours:6.1f}x   {values}")


if __name__ == "__main__":
    main()
