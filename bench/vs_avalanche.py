"""Avalanche 0.6's EWC against clsim's EWC on the identical Split CIFAR-10 stream.

Same tensors and class order (5 tasks x 2 classes, class_il), same model and initial weights,
SGD with the same lr, momentum, batch size, epochs and λ, and for both an *empirical* Fisher over every
training example of the task. Timed: training plus the Fisher pass (no evaluation). Both final
models are scored by the same evaluation code.

Differences that remain (and are printed as figures below):
- Avalanche's importance is the squared gradient of each *mini-batch mean* loss, averaged over
  batches; clsim's is the mean squared *per-example* gradient (clsim/fisher.py: layer by layer
  from one batched backward, torch.func for other layers), the diagonal Fisher proper. The
  batch version is smaller: up to batch-size times when per-example gradients are uncorrelated
  (a line below prints the ratio per task). Per-example gradients cost at least what one
  batched forward and backward cost, so on a CPU clsim's Fisher pass cannot be much faster than
  Avalanche's, and neither can its training loop (same model, same steps): the ratio is bounded
  near 1 there. On a GPU the step is launch-bound, and Avalanche's penalty launches a few kernels
  per parameter tensor and earlier task where clsim's launches a few in all (bench/ewc_penalty.py).
  The larger Fisher also makes the same λ stiffer for clsim: the last line prints lr times the
  stiffest curvature, past 2 plain SGD diverges (λ 10 does from 1000 images per class, so the
  default is λ 1).
- Avalanche's penalty is λ·Σ F (θ - θ*)², clsim's (λ/2)·Σ F (θ - θ*)², both over every weight here
  (clsim excludes task_il's per-task heads; class_il's one head is shared).
- Avalanche shuffles with its DataLoader, clsim with its seeded generator: different batch orders.
- Both start each task with a fresh optimiser (Avalanche: reset_optimizer_state=True).

    python bench/vs_avalanche.py                     # 200/100 images per class, reduced ResNet-18
    python bench/vs_avalanche.py --full                                   # all of CIFAR-10
    python bench/vs_avalanche.py --full --device cuda                     # on a GPU (bench/gpu_suite.sh)
    python bench/vs_avalanche.py --seeds 3                                # mean ± sd over seeds
Targets: clsim >= 2x faster on a CPU, >= 4x on a GPU (all of CIFAR-10), final ACC within 1 point.
"""
from __future__ import annotations

import argparse
import copy
import sys
import time
import warnings
from pathlib import Path
from types import SimpleNamespace

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from clsim import Experiment  # noqa: E402
from clsim.config import RunOptions  # noqa: E402
from clsim.learners.supervised import SupervisedLearner  # noqa: E402
from clsim.scenarios.avalanche import tensor_dataset  # noqa: E402
from clsim.scenarios.split_cifar import SplitCifarOptions, split_cifar  # noqa: E402
from clsim.strategies.ewc import EWC  # noqa: E402

DEFAULT_ROOT = Path(__file__).resolve().parent.parent / ".cache" / "cifar10"


def run_clsim(scenario, model, a):
    # 0: every training example of the task, as Avalanche does
    fisher_samples = a.clsim_fisher_samples or max(len(t.train) for t in scenario.tasks)
    strategy = EWC(EWC.Options(ewc_lambda=a.ewc_lambda, fisher="empirical", fisher_samples=fisher_samples))
    result = Experiment(scenario=scenario, strategy=strategy, model=model, lr=a.lr, momentum=a.momentum,
                        batch_size=a.batch_size, epochs=a.epochs, device=a.device, seed=a.seed,
                        progress=False, out=None).run().summary
    phases = {"train": result["wall_time"]["train"], "fisher": result["wall_time"]["strategy"]}
    return sum(phases.values()), phases, result["accuracy_matrix"][-1], strategy


def run_avalanche(scenario, model, a):
    from avalanche.benchmarks import nc_benchmark
    from avalanche.training import EWC as AvalancheEWC
    from avalanche.training.plugins import EvaluationPlugin
    tasks = scenario.tasks
    cat = lambda split, part: torch.cat([getattr(getattr(t, split), part) for t in tasks])  # noqa: E731
    benchmark = nc_benchmark(tensor_dataset(cat("train", "x"), cat("train", "y")),
                             tensor_dataset(cat("test", "x"), cat("test", "y")),
                             n_experiences=len(tasks), task_labels=False,
                             fixed_class_order=[c for t in tasks for c in t.classes])
    torch.manual_seed(a.seed)
    strategy = AvalancheEWC(model=model, optimizer=torch.optim.SGD(model.parameters(), lr=a.lr, momentum=a.momentum),
                            criterion=torch.nn.CrossEntropyLoss(), ewc_lambda=a.ewc_lambda,
                            mode="separate", train_mb_size=a.batch_size, train_epochs=a.epochs,
                            eval_mb_size=1000, device=a.device, evaluator=EvaluationPlugin(loggers=[]))
    plugin = next(p for p in strategy.plugins if type(p).__name__ == "EWCPlugin")
    fisher_seconds = [0.0]
    compute = plugin.compute_importances

    def timed(*args, **kwargs):          # only measures the Fisher pass; changes nothing
        t = time.perf_counter()
        out = compute(*args, **kwargs)
        sync(a.device)
        fisher_seconds[0] += time.perf_counter() - t
        return out

    plugin.compute_importances = timed
    t0 = time.perf_counter()
    for experience in benchmark.train_stream:
        strategy.train(experience, eval_streams=[], reset_optimizer_state=True,  # as clsim: fresh SGD per task
                       num_workers=a.avalanche_workers)
    sync(a.device)
    seconds = time.perf_counter() - t0
    phases = {"train": seconds - fisher_seconds[0], "fisher": fisher_seconds[0]}
    # Score with clsim's evaluation code on the same tasks, so only training differs.
    scorer = SupervisedLearner(model, lr=a.lr, momentum=0.0, batch_size=a.batch_size,
                               device=torch.device(a.device), generator=torch.Generator())
    return seconds, phases, [scorer.evaluate(t) for t in tasks], plugin


def sync(device: str) -> None:
    """Wait for queued accelerator work, so host clocks time what was computed."""
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--data-root", default=str(DEFAULT_ROOT))
    p.add_argument("--train-per-class", type=int, default=200, help="0: all 5000")
    p.add_argument("--test-per-class", type=int, default=100, help="0: all 1000")
    p.add_argument("--full", action="store_true", help="all of CIFAR-10: 5000/1000 images per class (as 0 and 0)")
    p.add_argument("--backbone", default="resnet18", choices=("cnn", "resnet18"))
    p.add_argument("--epochs", type=int, default=1)
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--lr", type=float, default=0.05)
    p.add_argument("--momentum", type=float, default=0.0, help="SGD momentum (both optimisers start afresh per task)")
    p.add_argument("--ewc-lambda", type=float, default=1.0,
                   help="the same λ for both (see the docstring for why 1)")
    p.add_argument("--clsim-fisher-samples", type=int, default=0,
                   help="clsim's Fisher examples per task (0: all, as Avalanche; clsim's default is 1000)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--seeds", type=int, default=1, help="run seeds --seed, --seed+1, ...: single-run class-IL ACC is noisy")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--avalanche-workers", type=int, default=0, help="DataLoader worker processes for Avalanche")
    a = p.parse_args()
    if a.full:
        a.train_per_class = a.test_per_class = 0
    torch.set_num_threads(a.threads)
    warnings.filterwarnings("ignore")
    run = RunOptions(data_root=a.data_root, setting="class_il")
    scenario = split_cifar(SplitCifarOptions(train_per_class=a.train_per_class, test_per_class=a.test_per_class,
                                             backbone=a.backbone), run)
    # Warm-up on a few images: lazy imports and first-call kernel set-up are not what we compare.
    tiny = split_cifar(SplitCifarOptions(n_tasks=2, train_per_class=8, test_per_class=2, backbone=a.backbone), run)
    model = tiny.make_model()
    run_clsim(tiny, copy.deepcopy(model), a)
    run_avalanche(tiny, copy.deepcopy(model), a)
    print(f"Split CIFAR-10 class_il, {a.backbone}, {a.train_per_class or 5000}/{a.test_per_class or 1000} "
          f"images per class, {a.epochs} epoch(s), SGD lr {a.lr} momentum {a.momentum}, batch {a.batch_size}, λ {a.ewc_lambda}, "
          f"{a.threads} thread(s), {a.device}, Avalanche workers {a.avalanche_workers}, "
          f"clsim Fisher examples per task: {a.clsim_fisher_samples or 'all'}")
    runs = [compare(scenario, a, seed) for seed in range(a.seed, a.seed + a.seeds)]
    if len(runs) > 1:
        t_av, t_c = sum(r.t_av for r in runs), sum(r.t_clsim for r in runs)
        acc_a, acc_c = [r.acc_av for r in runs], [r.acc_clsim for r in runs]
        diff = [c - v for c, v in zip(acc_c, acc_a)]
        print(f"over {len(runs)} seeds: wall time avalanche {t_av:8.2f} s   clsim {t_c:8.2f} s   "
              f"speed-up {t_av / t_c:.2f}x (target >= {speed_target(a)})")
        print(f"  mean final ACC: avalanche {mean_sd(acc_a)}   clsim {mean_sd(acc_c)}   "
              f"difference {mean_sd(diff, '+.2f')} (target within 1)")


def compare(scenario, a, seed: int) -> SimpleNamespace:
    """Both implementations from the same initial weights drawn with `seed`; prints one block."""
    a = SimpleNamespace(**{**vars(a), "seed": seed})
    torch.manual_seed(seed)
    model = scenario.make_model()
    t_clsim, p_clsim, row_clsim, clsim_ewc = run_clsim(scenario, copy.deepcopy(model), a)
    t_av, p_av, row_av, av_ewc = run_avalanche(scenario, copy.deepcopy(model), a)
    acc_c, acc_a = sum(row_clsim) / len(row_clsim), sum(row_av) / len(row_av)
    ratios = [f / sum(float(av_ewc.importances[t][n].data.sum()) for n in clsim_ewc.names)
              for t, f in enumerate(clsim_ewc.fishers)]
    print(f"seed {seed}")
    print(f"wall time (train + Fisher): avalanche {t_av:8.2f} s   clsim {t_clsim:8.2f} s   "
          f"speed-up {t_av / t_clsim:.2f}x (target >= {speed_target(a)})")
    print(f"  of which Fisher:          avalanche {p_av['fisher']:8.2f} s   clsim {p_clsim['fisher']:8.2f} s")
    print(f"final ACC:                  avalanche {acc_a:8.2f}     clsim {acc_c:8.2f}     "
          f"difference {acc_c - acc_a:+.2f} (target within 1)")
    print(f"final row: avalanche {[round(x, 1) for x in row_av]}  clsim {[round(x, 1) for x in row_clsim]}")
    print(f"each task's Fisher summed over the weights, clsim / avalanche: {[round(r, 2) for r in ratios]}")
    # Plain SGD on a quadratic of curvature k diverges once lr·k > 2: the stiffest weight's figure.
    # clsim's penalty (λ/2)·Σ A(θ-μ)² has curvature λ·A; Avalanche's λ·Σ_t F_t(θ-θ_t)² has 2λ·Σ_t F_t.
    k_clsim = a.ewc_lambda * float(clsim_ewc.importance.max())
    k_av = 2 * a.ewc_lambda * float(max(sum(imp[n].data for imp in av_ewc.importances.values()).max()
                                        for n in clsim_ewc.names))
    print(f"lr x stiffest penalty curvature after the last task (SGD diverges past 2): "
          f"avalanche {a.lr * k_av:.3g}  clsim {a.lr * k_clsim:.3g}", flush=True)
    return SimpleNamespace(t_av=t_av, t_clsim=t_clsim, acc_av=acc_a, acc_clsim=acc_c)


def speed_target(a) -> int:
    return 4 if a.device.startswith("cuda") else 2


def mean_sd(xs: list[float], fmt: str = ".2f") -> str:
    t = torch.tensor(xs, dtype=torch.float64)
    return f"{float(t.mean()):{fmt}} ± {float(t.std()):.2f}"


if __name__ == "__main__":
    main()
