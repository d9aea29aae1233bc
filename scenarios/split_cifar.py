"""split_cifar: real CIFAR-10 (official python pickle layout) split into groups of classes."""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F

from clsim.config import opt
from clsim.data import cached_cifar10, class_order, crop_flip, first_per_class
from clsim.datasets import cifar10_available
from clsim.models import make_model
from clsim.registry import register_scenario
from clsim.scenario import Scenario, class_split, class_split_options, single_head_width


@dataclass
class SplitCifarOptions(class_split_options(10, 5, "natural order 0..9", 5000, 1000)):
    # Per backbone. 1 epoch (13 SGD steps at 200 images per class) left tasks at chance for every
    # strategy. Mammoth trains 50 epochs at batch 32 (lr 0.03 for online EWC and DER++ on
    # seq-cifar10), BLIP's AlexNet up to 200; these keep a full-data run short on a GPU and the
    # README's 200-per-class run a few minutes on a CPU. The plain convnet at lr 0.05 sometimes ended
    # a task on an unlucky last SGD step (naive: 50% on a task whose training loss had fallen).
    BACKBONE_DEFAULTS = {"cnn": {"epochs": 20, "lr": 0.03, "batch_size": 32},
                         "resnet18": {"epochs": 10, "lr": 0.05, "batch_size": 32}}
    DEFAULTS_DEPEND_ON = "backbone"
    backbone: str = opt("cnn", "cnn: four 3x3 convolutions and ReLUs, no normalisation (a plain convnet as in "
                        "the task-IL papers: HAT's and BLIP's AlexNet); resnet18: reduced ResNet-18 with batch "
                        "norm (Mammoth's family; BLIP keeps task 0's batch-norm statistics, which hurt later tasks)",
                        choices=("cnn", "resnet18"))
    backbone_width: int = opt(0, "channels of the first layer (0: 32 for cnn, 20 for resnet18)", low=0)
    augment: bool = opt(False, "random 32x32 crops of the 4-pixel zero-padded image and horizontal flips")

    def run_defaults(self) -> dict:
        return dict(self.BACKBONE_DEFAULTS[self.backbone])


@register_scenario("split_cifar", SplitCifarOptions)
def split_cifar(o: SplitCifarOptions, run) -> Scenario:
    """Real CIFAR-10 from --data-root/cifar-10-batches-py (downloaded on first use), 5 tasks x 2 classes (class_il, task_il or domain_il)."""
    cifar10_available(run)
    x_train, y_train, x_test, y_test = cached_cifar10(str(Path(run.data_root).expanduser().resolve()))
    keep_train, keep_test = first_per_class(y_train, o.train_per_class), first_per_class(y_test, o.test_per_class)
    setting = o.setting_of(run)
    tasks = class_split(x_train[keep_train], y_train[keep_train], x_test[keep_test], y_test[keep_test],
                        class_order(10, o.class_order_seed), o.n_tasks, setting)
    heads = [t.n_outputs for t in tasks]
    return Scenario("split_cifar", setting, tasks, input_kind="natural_images",
                    make_model=lambda: make_model(o.backbone, (3, 32, 32), setting, heads,
                                                  single_head_width(tasks, setting, 10),
                                                  task_heads=o.task_heads, width=o.backbone_width or None),
                    defaults=o.run_defaults(),
                    learner_kwargs={"augment": crop_flip} if o.augment else {},
                    info={"train_size": len(keep_train), "test_size": len(keep_test),
                          "class_order": [c for t in tasks for c in t.classes]})
