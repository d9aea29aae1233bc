"""Cost of one private step, side by side on the same model and the same real CIFAR-10 batch.

    plain    : forward, backward, SGD step (no privacy)
    opacus   : Opacus's own minimal loop (PrivacyEngine.make_private, then zero_grad/backward/step)
    dpsgd    : clsim's DP-SGD mechanism (learner.forward, mechanism.backward, mechanism.step) and
               the per-step ε it reports (step_metrics), as the engine runs it
    dplis    : clsim's DPlis with K copies

Rounds interleave the variants so machine load hits all alike; the median per variant is
reported. Targets: dpsgd/plain <= 3, dpsgd/opacus <= 1.05, dplis(K=10)/dpsgd <= 10.

    python bench/privacy_cost.py                 # batch 128, small CNN, 1 thread
"""
from __future__ import annotations

import argparse
import statistics
import sys
import time
import warnings
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from clsim import config  # noqa: E402
from clsim.data import load_cifar10  # noqa: E402
from clsim.learners.base import Batch  # noqa: E402
from clsim.learners.supervised import SupervisedLearner  # noqa: E402
from clsim.models import MultiHeadNet, SmallCNN  # noqa: E402
from clsim.privacy.dplis import DPlis  # noqa: E402
from clsim.privacy.dpsgd import DPSGD  # noqa: E402
from clsim.privacy.ledger import Ledger  # noqa: E402
from clsim.scenario import Scenario, Task, TaskData  # noqa: E402

DEFAULT_ROOT = Path(__file__).resolve().parent.parent / ".cache" / "cifar10"


def model(seed: int):
    torch.manual_seed(seed)
    return MultiHeadNet(SmallCNN(3, 32), [10])


def clsim_step(mechanism_cls, x, y, seed, **options):
    """A ready-to-call closure doing one clsim training step under `mechanism_cls`."""
    task = Task(0, "cifar10", tuple(range(10)), TaskData(x, y), TaskData(x, y), n_outputs=10)
    scenario = Scenario("bench", "class_il", [task], make_model=lambda: model(seed))
    learner = SupervisedLearner(model(seed), lr=0.05, momentum=0.0, batch_size=len(y),
                                device=torch.device("cpu"), generator=torch.Generator().manual_seed(seed))
    mechanism = mechanism_cls(config.build(mechanism_cls.Options, {"noise_multiplier": 1.0, **options}))
    mechanism.check(learner, scenario, 1)
    ledger = Ledger(**mechanism.ledger_options())
    mechanism.setup(learner, scenario, ledger)
    optimizer = mechanism.before_task(task, learner.make_optimizer())
    batch = Batch(x, y, torch.zeros(len(y), dtype=torch.long), torch.arange(len(y)))
    mechanism._batch = batch            # the fixed batch stands in for a Poisson draw

    def step():
        losses, _ = learner.forward(batch)
        optimizer.zero_grad(set_to_none=True)
        mechanism.backward(losses, None)
        mechanism.step(optimizer)
        mechanism.step_metrics()
    return step


def plain_step(x, y, seed):
    net = model(seed)
    optimizer = torch.optim.SGD(net.parameters(), lr=0.05)

    def step():
        loss = F.cross_entropy(net(x), y)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
    return step


def opacus_step(x, y, seed):
    from opacus import PrivacyEngine
    torch.manual_seed(seed)
    net = torch.nn.Sequential(SmallCNN(3, 32), torch.nn.Linear(256, 10))
    optimizer = torch.optim.SGD(net.parameters(), lr=0.05)
    loader = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(x, y), batch_size=len(y))
    net, optimizer, _ = PrivacyEngine(accountant="rdp").make_private(
        module=net, optimizer=optimizer, data_loader=loader, noise_multiplier=1.0, max_grad_norm=1.0,
        poisson_sampling=False)

    def step():
        optimizer.zero_grad(set_to_none=True)
        F.cross_entropy(net(x), y).backward()
        optimizer.step()
    return step


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data-root", default=str(DEFAULT_ROOT))
    parser.add_argument("--batch-size", type=int, default=128)
    parser.add_argument("--rounds", type=int, default=15)
    parser.add_argument("--dplis-k", type=int, default=10)
    parser.add_argument("--dplis-k-chunk", type=int, default=0, help="copies vectorised together (0: auto)")
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    warnings.simplefilter("ignore")
    x_train, y_train, _, _ = load_cifar10(args.data_root)
    x, y = x_train[:args.batch_size].contiguous(), y_train[:args.batch_size].contiguous()
    variants = {"plain": plain_step(x, y, 0), "opacus": opacus_step(x, y, 0),
                "dpsgd": clsim_step(DPSGD, x, y, 0),
                f"dplis_k{args.dplis_k}": clsim_step(DPlis, x, y, 0, dplis_k=args.dplis_k,
                                                              dplis_k_chunk=args.dplis_k_chunk)}
    times = {name: [] for name in variants}
    for name, step in variants.items():      # warm-up
        step()
    for _ in range(args.rounds):
        for name, step in variants.items():
            t0 = time.perf_counter()
            step()
            times[name].append(time.perf_counter() - t0)
    med = {name: statistics.median(t) for name, t in times.items()}
    print(f"small CNN (SmallCNN width 32, {sum(p.numel() for p in model(0).parameters())} parameters), "
          f"real CIFAR-10 batch of {args.batch_size}, {args.threads} thread(s), median of {args.rounds} "
          f"interleaved rounds")
    for name, value in med.items():
        print(f"  {name:10s} {1000 * value:9.1f} ms/step")
    dplis = f"dplis_k{args.dplis_k}"
    print(f"dpsgd / plain  = {med['dpsgd'] / med['plain']:.2f}   (target <= 3)")
    print(f"dpsgd / opacus = {med['dpsgd'] / med['opacus']:.3f}  (target <= 1.05)")
    print(f"{dplis} / dpsgd = {med[dplis] / med['dpsgd']:.2f}   (target <= {args.dplis_k})")


if __name__ == "__main__":
    main()
