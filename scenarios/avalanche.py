"""Bring an Avalanche benchmark to clsim: `from_avalanche(benchmark)` materialises its streams
as tensors and returns a clsim Scenario that `clsim.engine.run` (or any strategy) can train on.

    from avalanche.benchmarks import nc_benchmark
    from clsim.scenarios.avalanche import from_avalanche
    scenario = from_avalanche(nc_benchmark(train_ds, test_ds, n_experiences=5, task_labels=False),
                              name="my_split", backbone="cnn")

The registered scenario `avalanche` builds such a benchmark with Avalanche's own generator over
local data (nothing is downloaded) and runs it through the adapter.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch
from torch.utils.data import DataLoader

from clsim.config import opt
from clsim.errors import UserError
from clsim.models import BACKBONES, make_model
from clsim.registry import register_scenario
from clsim.scenario import SETTINGS, Scenario, Source, SupervisedOptions, Task, TaskData, single_head_width


def _tensors(dataset) -> tuple[torch.Tensor, torch.Tensor]:
    """All (x, y) of an Avalanche dataset, read in large batches with its own collate function."""
    loader = DataLoader(dataset, batch_size=4096, shuffle=False,
                        collate_fn=getattr(dataset, "collate_fn", None))
    xs, ys = [], []
    for batch in loader:           # Avalanche items are (x, y, task_label)
        xs.append(torch.as_tensor(batch[0]))
        ys.append(torch.as_tensor(batch[1]).long())
    return torch.cat(xs), torch.cat(ys)


def _infer_setting(train_stream) -> str:
    if len({exp.task_label for exp in train_stream}) > 1:
        return "task_il"
    class_sets = {tuple(sorted(exp.classes_in_this_experience)) for exp in train_stream}
    return "domain_il" if len(class_sets) == 1 and len(train_stream) > 1 else "class_il"


def from_avalanche(benchmark, name: str = "avalanche", setting: str | None = None,
                   backbone: str | Callable[[list[int], int], torch.nn.Module] = "mlp",
                   defaults: dict | None = None, input_kind: str | None = None,
                   individuals: list[torch.Tensor] | None = None, **backbone_kwargs) -> Scenario:
    """A clsim Scenario with one Task per experience of `benchmark.train_stream`, tested on the
    experience of `benchmark.test_stream` at the same position.

    setting: class_il (one head over all labels), task_il (one head per experience, labels
    renumbered 0..k-1 in sorted class order) or domain_il (labels renumbered likewise, one shared
    head of the largest experience's size, no task id); None infers it (distinct task labels
    -> task_il, the same classes in every experience -> domain_il, else class_il).
    backbone: a clsim backbone name (`mlp`, `cnn`, `resnet18`, with `backbone_kwargs` of
    clsim.models.make_model such as hidden=, width= or task_heads=), or a function
    (head_sizes, n_classes) -> model whose forward is (x, t).
    defaults: epochs / lr / batch_size for the run (clsim's CLI defaults otherwise).
    input_kind: what the inputs are ("digits", "natural_images"), for defaults that depend on it
    (BLIP's F_prior); None leaves it undeclared.
    individuals: for each training experience, the ids (in one common training set) of its
    examples in the order Avalanche yields them. Without them the privacy ledger cannot know
    whether experiences share people, so it assumes they all do (sequential composition)."""
    train_stream, test_stream = list(benchmark.train_stream), list(benchmark.test_stream)
    if not train_stream:
        raise UserError("the Avalanche benchmark has an empty train_stream")
    if len(test_stream) != len(train_stream):
        raise UserError(f"the Avalanche benchmark has {len(train_stream)} training but {len(test_stream)} "
                        f"test experiences; clsim needs one test experience per training experience")
    setting = setting or _infer_setting(train_stream)
    if setting not in SETTINGS:
        raise UserError(f"setting {setting!r} is not one of: {', '.join(SETTINGS)}")
    if individuals is not None and len(individuals) != len(train_stream):
        raise UserError(f"individuals names {len(individuals)} experiences, the train_stream has {len(train_stream)}")
    tasks = []
    for i, (train_exp, test_exp) in enumerate(zip(train_stream, test_stream)):
        classes = sorted(int(c) for c in train_exp.classes_in_this_experience)
        parts = []
        for exp in (train_exp, test_exp):
            x, y = _tensors(exp.dataset)
            if setting != "class_il":       # task_il / domain_il: labels renumbered within the experience
                local = torch.full((max(classes[-1], int(y.max())) + 1,), -1, dtype=torch.long)
                local[classes] = torch.arange(len(classes))
                y = local[y]
                if bool((y < 0).any()):
                    raise UserError(f"experience {i} of the test stream holds classes outside "
                                    f"{classes}, the classes of the training experience")
            parts.append(TaskData(x, y))
        ids = None if individuals is None else torch.as_tensor(individuals[i], dtype=torch.long)
        if ids is not None and len(ids) != len(parts[0]):
            raise UserError(f"individuals[{i}] has {len(ids)} ids for {len(parts[0])} training examples")
        tasks.append(Task(i, "-".join(map(str, classes)), tuple(classes), parts[0], parts[1],
                          n_outputs=len(classes), source=Source(f"{name} training data", ids)))
    heads = [t.n_outputs for t in tasks]
    n_classes = single_head_width(tasks, setting, 1 + max(int(max(t.train.y.max(), t.test.y.max())) for t in tasks))
    shape = tuple(tasks[0].train.x.shape[1:])
    if callable(backbone):
        build = lambda: backbone(heads, n_classes)  # noqa: E731
    else:
        if backbone not in BACKBONES:
            raise UserError(f"backbone {backbone!r} is not one of: {', '.join(BACKBONES)}")
        build = lambda: make_model(backbone, shape, setting, heads, n_classes, **backbone_kwargs)  # noqa: E731
    return Scenario(name, setting, tasks, make_model=build, defaults=dict(defaults or {}), input_kind=input_kind,
                    info={"source": "avalanche", "train_size": sum(len(t.train) for t in tasks),
                          "test_size": sum(len(t.test) for t in tasks)})


# ---------------------------------------------------------------- the registered scenario

def tensor_dataset(x: torch.Tensor, y: torch.Tensor):
    """A plain TensorDataset with the `targets` Avalanche's generators read."""
    ds = torch.utils.data.TensorDataset(x, y)
    ds.targets = y.tolist()
    return ds


def local_data(name: str, run):
    """(x_train, y_train, x_test, y_test, backbone) of a local data set; nothing is downloaded."""
    if name == "split_digits":
        import numpy as np
        from sklearn.datasets import load_digits
        d = load_digits()
        x = torch.tensor(d.data, dtype=torch.float32).view(-1, 1, 8, 8) / 16.0
        y = torch.tensor(d.target, dtype=torch.long)
        test = torch.from_numpy(np.random.default_rng(12345).random(len(y)) < 0.3)
        return x[~test], y[~test], x[test], y[test], "mlp"
    from clsim.data import cached_cifar10, first_per_class
    from pathlib import Path
    x_train, y_train, x_test, y_test = cached_cifar10(str(Path(run.data_root).resolve()))
    tr, te = first_per_class(y_train, 500), first_per_class(y_test, 100)
    return x_train[tr], y_train[tr], x_test[te], y_test[te], "cnn"


def class_ids(benchmark, x_train: torch.Tensor, y_train: torch.Tensor) -> list[torch.Tensor] | None:
    """The rows of (x_train, y_train) behind each training experience of a benchmark built from
    them: every materialised example is matched to a distinct original row with the same input
    and label (equal rows are told apart by use). If one cannot be matched, None (assume overlap)."""
    rows: dict[bytes, list[int]] = {}
    for i in range(len(y_train)):
        rows.setdefault(x_train[i].numpy().tobytes() + bytes([int(y_train[i]) % 256]), []).append(i)
    out = []
    for exp in benchmark.train_stream:
        x, y = _tensors(exp.dataset)
        ids = []
        for xi, yi in zip(x, y):
            free = rows.get(xi.numpy().tobytes() + bytes([int(yi) % 256]))
            if not free:
                return None
            ids.append(free.pop())
        out.append(torch.tensor(ids, dtype=torch.long))
    return out


@dataclass
class AvalancheOptions(SupervisedOptions):
    DEFAULTS_DEPEND_ON = "avalanche_data"
    avalanche_data: str = opt("split_digits", "local data Avalanche's nc_benchmark splits: split_digits "
                              "(scikit-learn digits) or split_cifar (500/100 CIFAR-10 images per class "
                              "under --data-root)", choices=("split_digits", "split_cifar"))
    n_tasks: int = opt(5, "number of experiences (the 10 classes are split evenly)", low=1, high=10)
    class_order_seed: int = opt(-1, "seed of a random class order (-1: natural order 0..9)", low=-1)

    def run_defaults(self) -> dict:   # an MLP on digits takes more epochs than the CNN on CIFAR-10
        return {"epochs": 5 if self.avalanche_data == "split_digits" else 1, "lr": 0.05, "batch_size": 32}


@register_scenario("avalanche", AvalancheOptions)
def avalanche_scenario(o: AvalancheOptions, run) -> Scenario:
    """An Avalanche nc_benchmark over local data, run through the adapter (needs avalanche-lib)."""
    try:
        from avalanche.benchmarks import nc_benchmark
    except ImportError:
        raise UserError("the avalanche scenario needs avalanche-lib: pip install avalanche-lib==0.6.0") from None
    from clsim.data import class_order
    if 10 % o.n_tasks:
        raise UserError(f"--n-tasks {o.n_tasks} must divide the 10 classes evenly for Avalanche's nc_benchmark")
    x_train, y_train, x_test, y_test, backbone = local_data(o.avalanche_data, run)
    setting = o.setting_of(run)
    benchmark = nc_benchmark(tensor_dataset(x_train, y_train), tensor_dataset(x_test, y_test),
                             n_experiences=o.n_tasks, task_labels=setting == "task_il",
                             fixed_class_order=class_order(10, o.class_order_seed))
    kwargs = {"hidden": (100, 100)} if backbone == "mlp" else {}
    kwargs["task_heads"] = o.task_heads
    scenario = from_avalanche(benchmark, name="avalanche", setting=setting, backbone=backbone,
                              defaults=o.run_defaults(), individuals=class_ids(benchmark, x_train, y_train),
                              input_kind="digits" if o.avalanche_data == "split_digits" else "natural_images", **kwargs)
    scenario.info["avalanche_data"] = o.avalanche_data
    return scenario
