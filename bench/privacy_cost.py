"""Cost of one private step, side by side on the same model and the same real CIFAR-10 batch.

    plain       : forward, backward, SGD step (no privacy)
    opacus      : Opacus's own minimal loop (PrivacyEngine.make_private, then zero_grad/backward/step)
    dpsgd_ghost : clsim's DP-SGD mechanism with --dp-clipping ghost (learner.forward,
                  mechanism.backward, mechanism.step) and the per-step ε it reports, as the engine runs it
    dpsgd_hooks : the same with --dp-clipping hooks (per-example gradients stored)
    dpsgd_bk    : the same with --dp-clipping bk (book-keeping: one backward, no second one)
    dplis       : clsim's DPlis with K copies

Models: the small CIFAR CNN and the reduced ResNet-18 (its BatchNorm replaced by GroupNorm, as
the mechanism does). Rounds interleave the variants so machine load hits all alike; the median
per variant is reported. Memory (--memory, Linux): each variant runs 3 steps in a fresh process;
what they add to its resident memory at their peak (allocator-held blocks included), and the peak
of the live tensors one more step allocates (torch profiler), each over plain's. Targets: the fastest private
mode / plain <= 1.5 (time) and <= 1.3 (memory), dpsgd_hooks/opacus <= 1.05.

    python bench/privacy_cost.py [--models cnn,resnet18] [--memory]   # batch 128, 1 thread
"""
from __future__ import annotations

import argparse
import statistics
import subprocess
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
from clsim.privacy.dplis import DPlis  # noqa: E402
from clsim.privacy.dpsgd import DPSGD  # noqa: E402
from clsim.privacy.ledger import Ledger  # noqa: E402
from clsim.scenario import Scenario, Task, TaskData  # noqa: E402

DEFAULT_ROOT = Path(__file__).resolve().parent.parent / ".cache" / "cifar10"


def model(name: str, seed: int):
    from clsim.models import make_model
    from clsim.privacy.dpsgd import replace_unsupported_layers
    torch.manual_seed(seed)
    return replace_unsupported_layers(make_model(name, (3, 32, 32), "class_il", [10], 10))


def clsim_step(name, mechanism_cls, x, y, seed, **options):
    """A ready-to-call closure doing one clsim training step under `mechanism_cls`."""
    task = Task(0, "cifar10", tuple(range(10)), TaskData(x, y), TaskData(x, y), n_outputs=10)
    scenario = Scenario("bench", "class_il", [task], make_model=lambda: model(name, seed))
    learner = SupervisedLearner(model(name, seed), lr=0.05, momentum=0.0, batch_size=len(y),
                                device=torch.device("cpu"), generator=torch.Generator().manual_seed(seed))
    mechanism = mechanism_cls(config.build(mechanism_cls.Options, {"noise_multiplier": 1.0, **options}))
    mechanism.check(learner, scenario, 1)
    mechanism.attach(learner)
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


def plain_step(name, x, y, seed):
    net = model(name, seed)
    optimizer = torch.optim.SGD(net.parameters(), lr=0.05)

    def step():
        loss = F.cross_entropy(net(x), y)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
    return step


def opacus_step(name, x, y, seed):
    from opacus import PrivacyEngine
    net = model(name, seed)
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


def variants(name, x, y, dplis_k, dplis_k_chunk):
    """name -> a function building that variant's step closure."""
    return {"plain": lambda: plain_step(name, x, y, 0), "opacus": lambda: opacus_step(name, x, y, 0),
            "dpsgd_ghost": lambda: clsim_step(name, DPSGD, x, y, 0, dp_clipping="ghost"),
            "dpsgd_hooks": lambda: clsim_step(name, DPSGD, x, y, 0, dp_clipping="hooks"),
            "dpsgd_bk": lambda: clsim_step(name, DPSGD, x, y, 0, dp_clipping="bk"),
            f"dplis_k{dplis_k}": lambda: clsim_step(name, DPlis, x, y, 0, dplis_k=dplis_k,
                                                    dplis_k_chunk=dplis_k_chunk)}


def peak_memory(args, name: str, variant: str) -> tuple[float, float]:
    """MiB that 3 steps of `variant` add to the resident memory at their start, at their peak
    (a fresh process; Linux's VmHWM, reset before the steps: what the allocator holds, freed
    blocks it kept included), and the peak of the tensors one more step allocates (the torch
    profiler's memory timeline: live tensors only)."""
    out = subprocess.run([sys.executable, __file__, "--data-root", args.data_root, "--batch-size",
                          str(args.batch_size), "--dplis-k", str(args.dplis_k), "--one", f"{name}:{variant}"],
                         capture_output=True, text=True, check=True)
    resident, tensors = out.stdout.split()[-2:]
    return float(resident), float(tensors)


def tensor_peak_mib(step) -> float:
    """The peak of the tensors `step` allocates (torch profiler memory timeline, CPU)."""
    import json
    import tempfile
    from torch.profiler import ProfilerActivity, profile
    with profile(activities=[ProfilerActivity.CPU], profile_memory=True, record_shapes=True,
                 with_stack=True) as prof:
        step()
    with tempfile.TemporaryDirectory() as tmp:
        prof.export_memory_timeline(f"{tmp}/timeline.json", device="cpu")
        with open(f"{tmp}/timeline.json") as f:
            _, sizes = json.load(f)
    return max(sum(s) for s in sizes) / 2 ** 20


def resident_kib(field: str) -> int:
    return int(next(line for line in open("/proc/self/status") if line.startswith(field)).split()[1])


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data-root", default=str(DEFAULT_ROOT))
    parser.add_argument("--models", default="cnn,resnet18")
    parser.add_argument("--batch-size", type=int, default=128)
    parser.add_argument("--rounds", type=int, default=15)
    parser.add_argument("--dplis-k", type=int, default=10)
    parser.add_argument("--dplis-k-chunk", type=int, default=0, help="copies vectorised together (0: auto)")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--skip", default="", help="variants left out, e.g. dplis,opacus (the ratios "
                        "that need them are left out too)")
    parser.add_argument("--memory", action="store_true", help="also peak memory, one process per variant")
    parser.add_argument("--one", help=argparse.SUPPRESS)    # MODEL:VARIANT, for --memory's processes
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    warnings.simplefilter("ignore")
    x_train, y_train, _, _ = load_cifar10(args.data_root)
    x, y = x_train[:args.batch_size].contiguous(), y_train[:args.batch_size].contiguous()
    if args.one:
        del x_train, y_train
        name, variant = args.one.split(":")
        step = variants(name, x, y, args.dplis_k, args.dplis_k_chunk)[variant]()
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")                # resets the peak (VmHWM) to the current resident size
        start = resident_kib("VmRSS")
        for _ in range(3):
            step()
        print((resident_kib("VmHWM") - start) / 1024, tensor_peak_mib(step))
        return
    for name in args.models.split(","):
        skip = tuple(s for s in args.skip.split(",") if s)
        steps = {v: build() for v, build in variants(name, x, y, args.dplis_k, args.dplis_k_chunk).items()
                 if not v.startswith(skip)}
        times = {v: [] for v in steps}
        for step in steps.values():      # warm-up
            step()
        for _ in range(args.rounds):
            for v, step in steps.items():
                t0 = time.perf_counter()
                step()
                times[v].append(time.perf_counter() - t0)
        med = {v: statistics.median(t) for v, t in times.items()}
        print(f"{name} ({sum(p.numel() for p in model(name, 0).parameters())} parameters), real CIFAR-10 batch "
              f"of {args.batch_size}, {args.threads} thread(s), median of {args.rounds} interleaved rounds")
        for v, value in med.items():
            print(f"  {v:12s} {1000 * value:9.1f} ms/step")
        dplis = f"dplis_k{args.dplis_k}"
        ratios = [("dpsgd_ghost", "plain", "(target <= 1.5)"), ("dpsgd_hooks", "plain", ""),
                  ("dpsgd_bk", "plain", "(target <= 1.5)"), ("dpsgd_bk", "dpsgd_hooks", ""),
                  ("dpsgd_hooks", "opacus", "(target <= 1.05)"), (dplis, "dpsgd_hooks", f"(target <= {args.dplis_k})")]
        for a, b, target in ratios:
            if a in med and b in med:
                print(f"  {a} / {b} = {med[a] / med[b]:.2f}   {target}")
        if args.memory:
            private = [v for v in ("dpsgd_ghost", "dpsgd_hooks", "dpsgd_bk") if v in steps]
            above = {v: peak_memory(args, name, v) for v in ("plain", *private)}
            for k, what in enumerate(("resident memory the steps add", "tensors a step allocates")):
                print(f"  peak {what} (MiB): " + ", ".join(f"{v} {m[k]:.0f}" for v, m in above.items()))
                for v in private:
                    print(f"    {v} / plain = {above[v][k] / max(above['plain'][k], 1e-9):.2f}"
                          + ("" if v == "dpsgd_hooks" else "   (target <= 1.3)"))
        print(flush=True)


if __name__ == "__main__":
    main()
