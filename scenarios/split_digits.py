"""split_digits: scikit-learn's bundled 8x8 handwritten digits, split into class groups."""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from clsim.config import opt
from clsim.models import make_model
from clsim.registry import register_scenario
from clsim.data import class_order
from clsim.scenario import Scenario, SupervisedOptions, class_split, single_head_width


@dataclass
class SplitDigitsOptions(SupervisedOptions):
    RUN_DEFAULTS = {"epochs": 5, "lr": 0.05, "batch_size": 32}
    n_tasks: int = opt(5, "number of tasks (the 10 classes are split evenly)", low=1, high=10)
    class_order_seed: int = opt(-1, "seed of a random class order (-1: natural order 0..9)", low=-1)
    test_fraction: float = opt(0.3, "share of each class held out for testing", low=0.05, high=0.9)
    hidden: int = opt(100, "width of the MLP's two hidden layers", low=1)



@register_scenario("split_digits", SplitDigitsOptions)
def split_digits(o: SplitDigitsOptions, run) -> Scenario:
    """Real 8x8 digits bundled with scikit-learn, 5 tasks x 2 classes (no download; the default)."""
    from sklearn.datasets import load_digits
    digits = load_digits()
    x = torch.tensor(digits.data, dtype=torch.float32).view(-1, 1, 8, 8) / 16.0
    y = torch.tensor(digits.target, dtype=torch.long)
    # A stratified split fixed by its own seed, so the data never depends on --seed.
    rng = np.random.default_rng(12345)
    test = np.zeros(len(y), dtype=bool)
    for c in range(10):
        idx = np.flatnonzero(digits.target == c)
        test[rng.choice(idx, int(round(len(idx) * o.test_fraction)), replace=False)] = True
    test = torch.from_numpy(test)
    setting = o.setting_of(run)
    tasks = class_split(x[~test], y[~test], x[test], y[test], class_order(10, o.class_order_seed),
                        o.n_tasks, setting)
    return Scenario("split_digits", setting, tasks,
                    make_model=lambda: make_model("mlp", (1, 8, 8), setting, [t.n_outputs for t in tasks],
                                                  single_head_width(tasks, setting, 10),
                                                  task_heads=o.task_heads, hidden=(o.hidden, o.hidden)),
                    defaults=o.run_defaults(), input_kind="digits",
                    info={"train_size": int((~test).sum()), "test_size": int(test.sum())})
