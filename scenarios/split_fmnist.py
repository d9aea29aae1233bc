"""split_fmnist: Fashion-MNIST (official IDX files, downloaded on first use) split into tasks of classes."""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from clsim.config import opt
from clsim.datasets import fashion_mnist, fashion_mnist_available, image_class_split
from clsim.registry import register_scenario
from clsim.scenario import class_split_options

# Fashion-MNIST's training pixels (the figures torchvision users standardise with).
MEAN, STD = (0.2860,), (0.3530,)


@dataclass
class SplitFmnistOptions(class_split_options(10, 5, "natural order 0..9", 6000, 1000)):
    # Avalanche's SplitFMNIST baselines and Mammoth's seq-fmnist-style MLPs: a few epochs of SGD.
    RUN_DEFAULTS = {"epochs": 1, "lr": 0.1, "batch_size": 128}
    backbone: str = opt("mlp", "mlp (784-400-400) or cnn", choices=("mlp", "cnn"))
    backbone_width: int = opt(0, "cnn: channels of the first layer (0: 32)", low=0)


@register_scenario("split_fmnist", SplitFmnistOptions)
def split_fmnist(o: SplitFmnistOptions, run):
    """Fashion-MNIST, 5 tasks x 2 classes (class_il, task_il or domain_il), downloaded on first use."""
    fashion_mnist_available(run)
    arrays = fashion_mnist(str(Path(run.data_root).expanduser().resolve()))
    return image_class_split("split_fmnist", o, run, arrays, 10, MEAN, STD)
