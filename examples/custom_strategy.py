"""A strategy of your own, in one script: a running average of the weights each task ends with, and
a quadratic pull towards it (a cheap cousin of EWC with uniform importance). It is compared with
plain fine-tuning on the same stream.

    python examples/custom_strategy.py [--epochs 2] [--strength 0.5] [--out runs]

A strategy is a `Strategy` subclass: its `Options` dataclass becomes keyword arguments (and, once
registered with `clsim.registry.register_strategy` in a file of `strategies/` or a plugin package,
command-line flags); its hooks are listed, in call order, in clsim/strategy.py. Here the class is
passed to `Experiment` directly, so nothing is registered.
"""
import argparse
from dataclasses import dataclass

from clsim import Experiment
from clsim.config import opt
from clsim.strategy import Strategy


class AverageAnchor(Strategy):
    """Pull the shared weights towards the mean of the weights every earlier task ended with."""

    @dataclass
    class Options:
        strength: float = opt(0.5, "weight of the squared distance to the average", low=0.0)

    def setup(self, learner, scenario, mechanism):
        super().setup(learner, scenario, mechanism)
        self.average, self.tasks_seen = None, 0

    def after_task(self, task):
        weights = {n: p.detach().clone() for n, p in self.learner.shared_parameters().items()}
        self.tasks_seen += 1
        if self.average is None:
            self.average = weights
        else:   # running mean over the tasks so far
            for n, w in weights.items():
                self.average[n] += (w - self.average[n]) / self.tasks_seen

    def penalty(self):
        if self.average is None:
            return None
        params = self.learner.shared_parameters()
        return self.options.strength * sum(((params[n] - a) ** 2).sum() for n, a in self.average.items())

    def state_tensors(self):   # counted as the strategy's memory in summary.json
        return list((self.average or {}).values())

    def state_dict(self):      # saved in every checkpoint, so a resumed run is exact
        return {"average": self.average, "tasks_seen": self.tasks_seen}

    def load_state_dict(self, state):
        self.average, self.tasks_seen = state["average"], state["tasks_seen"]


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--epochs", type=int, default=2)
    p.add_argument("--strength", type=float, default=0.5)
    p.add_argument("--out", default="runs")
    args = p.parse_args()
    common = dict(scenario="split_digits", setting="task_il", epochs=args.epochs, seed=0, out=args.out)
    naive = Experiment(strategy="naive", **common).run()
    mine = Experiment(strategy=AverageAnchor, strength=args.strength, **common).run()
    for name, result in (("naive", naive), ("average anchor", mine)):
        print(f"{name:>14}: ACC {result.acc:5.1f}  BWT {result.summary['bwt']:6.1f}  "
              f"strategy memory {result.summary['memory']['strategy_state_bytes']} bytes")


if __name__ == "__main__":
    main()
