"""How useful is the DP-Fisher? Rank correlation with the exact Fisher, and the BLIP bits both give.

Trains an MLP on the first task of split_mnist (real MNIST under --data-root, else split_digits)
for one epoch, then computes the exact diagonal Fisher (every example, true Fisher) and the
DP-Fisher (clsim/privacy/dp_fisher.py: Poisson sample of n examples, gradients clipped to C_F,
Gaussian noise σ_F·C_F²) for several σ_F: the ones --fisher-budget-share (default 0.1) gives at
a few ε targets and some fixed ones. Prints for each: Spearman rank correlation over all
weights, the share of the exact Fisher's top-10% weights that stay in the DP top 10%, and
BLIP's bit allocation after the task (mean bits, share of weights given the same bits, and the
share of weights the exact Fisher freezes ≥ 1 bit that DP also freezes).

    python bench/dp_fisher.py [--data-root ../shared/data/mnist] [--samples 8000] [--clip 1]
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import torch  # noqa: E402
from scipy.stats import spearmanr  # noqa: E402

from clsim.config import RunOptions  # noqa: E402
from clsim.fisher import diagonal_fisher, per_example_grads  # noqa: E402
from clsim.learners.supervised import SupervisedLearner  # noqa: E402
from clsim.privacy import accounting  # noqa: E402
from clsim.privacy.dp_fisher import dp_fisher  # noqa: E402
from clsim.privacy.ledger import Ledger  # noqa: E402
from clsim.privacy.mechanism import Mechanism  # noqa: E402
from clsim.strategies.blip import BLIP, information_gain  # noqa: E402

DEFAULT_ROOT = Path(__file__).resolve().parent.parent.parent / "shared" / "data" / "mnist"


def scenario_and_learner(root: str, seed: int):
    torch.manual_seed(seed)
    if (Path(root) / "train-images-idx3-ubyte.gz").is_file():
        from clsim.scenarios.mnist import SplitMnistOptions, split_mnist
        scenario = split_mnist(SplitMnistOptions(), RunOptions(data_root=root, setting="task_il"))
        lr, name = 0.1, "split_mnist task 0 (MLP 784-400-400)"
    else:
        from clsim.scenarios.split_digits import SplitDigitsOptions, split_digits
        scenario = split_digits(SplitDigitsOptions(), RunOptions(setting="task_il"))
        lr, name = 0.05, "split_digits task 0 (MLP 64-100-100)"
    learner = SupervisedLearner(scenario.make_model(), lr=lr, momentum=0.0, batch_size=32,
                                device=torch.device("cpu"), generator=torch.Generator().manual_seed(seed))
    return scenario, learner, name


def train_one_epoch(learner, task) -> None:
    optimizer = learner.make_optimizer()
    for batch in learner.batches(task, 0):
        optimizer.zero_grad(set_to_none=True)
        learner.forward(batch)[0].mean().backward()
        optimizer.step()


def bits(strategy, fisher) -> torch.Tensor:
    out = [information_gain(fisher[n].double(), strategy.f_old[n].double(), 0).nan_to_num(nan=0.0)
           .ceil().clamp(0, strategy.options.blip_max_bits).flatten() for n in strategy.params]
    return torch.cat(out)


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data-root", default=str(DEFAULT_ROOT))
    parser.add_argument("--samples", type=int, default=8000, help="n: expected DP-Fisher sample (BLIP's default)")
    parser.add_argument("--clip", type=float, nargs="+", default=[1.0, 0.01, 0.001], help="C_F values")
    parser.add_argument("--granularity", nargs="+", default=["unit", "weight"])
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    torch.set_num_threads(1)
    scenario, learner, name = scenario_and_learner(args.data_root, args.seed)
    task = scenario.tasks[0]
    strategy = BLIP()
    strategy.setup(learner, scenario, _setup(Mechanism(), learner, scenario))
    train_one_epoch(learner, task)
    names = list(strategy.params)
    exact = diagonal_fisher(learner, task, names, len(task.train), empirical=False)
    flat_exact = torch.cat([exact[n].flatten() for n in names])
    x, y = task.train.x[:500], task.train.y[:500]
    norms = sum(g.flatten(1).pow(2).sum(1) for g in per_example_grads(
        learner, names, x, y, task.index, check=False).values()).sqrt()
    exact_bits = bits(strategy, exact)
    top = flat_exact >= flat_exact.quantile(0.9)
    n_train, q = len(task.train), min(1.0, args.samples / len(task.train))
    print(f"{name}: N={n_train}, n={args.samples} (q={q:.3g}), "
          f"median per-example gradient norm {norms.median():.3g}; exact Fisher: BLIP mean bits "
          f"{exact_bits.mean():.2f}, share frozen ≥1 bit {(exact_bits > 0).float().mean():.3f}")
    share = 0.1
    sigmas = []
    for eps in (1.0, 3.0, 8.0):
        s = accounting.noise_for_target(share * eps, 1e-5, {"one release": ([(1.0, 1)], [])})
        sigmas.append((f"ε={eps:g} (share {share})", s))
    sigmas += [(f"fixed σ_F={s:g}", s) for s in (1.0, 10.0)]
    print(f"{'DP-Fisher noise':28s} {'unit':>6s} {'C_F':>6s} {'σ_F':>7s} {'Spearman':>9s} {'top10% kept':>12s} {'BLIP bits':>10s} "
          f"{'same bits':>10s} {'frozen kept':>12s}")
    for (label, sigma), clip, grain in ((s, c, k) for k in args.granularity for c in args.clip for s in sigmas):
        g = torch.Generator().manual_seed(args.seed + 1)
        noisy, _ = dp_fisher(learner, task, names, args.samples, False, noise_multiplier=sigma,
                             max_grad_norm=clip, generator=g, granularity=grain)
        flat = torch.cat([noisy[n].flatten() for n in names])
        rho = spearmanr(flat.numpy(), flat_exact.numpy()).statistic
        kept = (top & (flat >= flat.quantile(0.9))).float().sum() / top.float().sum()
        dp_bits = bits(strategy, noisy)
        same = (dp_bits == exact_bits).float().mean()
        frozen = ((dp_bits > 0) & (exact_bits > 0)).float().sum() / (exact_bits > 0).float().sum().clamp(min=1)
        print(f"{label:28s} {grain:>6s} {clip:6g} {sigma:7.3g} {rho:9.3f} {float(kept):12.3f} {float(dp_bits.mean()):10.2f} "
              f"{float(same):10.3f} {float(frozen):12.3f}")


def _setup(mechanism, learner, scenario):
    mechanism.setup(learner, scenario, Ledger())
    return mechanism


if __name__ == "__main__":
    main()
