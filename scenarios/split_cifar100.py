"""split_cifar100: CIFAR-100 (official python version, downloaded on first use) split into tasks of classes."""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from clsim.config import opt
from clsim.data import crop_flip, vandeven_order
from clsim.datasets import cifar100, cifar100_available, image_class_split
from clsim.errors import UserError
from clsim.pretrain import pretrained_features
from clsim.registry import register_scenario
from clsim.scenario import class_split_options

# Mammoth's seq-cifar100 normalisation (datasets/seq_cifar100.py), also van de Ven et al.'s (data/available.py).
MEAN, STD = (0.5071, 0.4865, 0.4409), (0.2673, 0.2564, 0.2761)


@dataclass
class SplitCifar100Options(class_split_options(100, 10, "natural order 0..99", 500, 100,
                                                 ": 10 of 10, or 20 of 5")):
    # Mammoth's seq-cifar100 (X-DER): 50 epochs, batch 32, SGD lr 0.03 for ResNet-18; van de Ven et al.
    # 2022: Adam lr 1e-4, batch 256, 5000 iterations a task (256 epochs of a task's 5000 images).
    BACKBONE_DEFAULTS = {"resnet18_mammoth": {"epochs": 50, "lr": 0.03, "batch_size": 32},
                         "resnet18_reduced": {"epochs": 1, "lr": 0.03, "batch_size": 10},
                         "vdv_conv": {"epochs": 256, "lr": 0.0001, "batch_size": 256},   # with --optimizer adam
                         "resnet18": {"epochs": 10, "lr": 0.05, "batch_size": 32},
                         "cnn": {"epochs": 20, "lr": 0.03, "batch_size": 32}}
    DEFAULTS_DEPEND_ON = "backbone"
    backbone: str = opt("resnet18_mammoth", "resnet18_mammoth (DER/X-DER), resnet18_reduced (GEM/A-GEM), "
                        "vdv_conv (van de Ven et al. 2022), resnet18 or cnn (see clsim.models.BACKBONES)",
                        choices=tuple(BACKBONE_DEFAULTS))
    backbone_width: int = opt(0, "channels of the first layer (0: the backbone's published width)", low=0)
    augment: bool = opt(False, "random 32x32 crops of the 4-pixel zero-padded image and horizontal flips "
                        "(Mammoth's seq-cifar100 transform)")
    pretrain: str = opt("none", "cifar10: pre-train vdv_conv's convolutional layers on CIFAR-10 and freeze "
                        "them, the tasks holding their features (van de Ven et al. 2022's --pre-convE "
                        "--freeze-convE; clsim/pretrain.py)", choices=("none", "cifar10"))
    pretrain_epochs: int = opt(100, "pretrain: epochs on CIFAR-10 (theirs: 100, Adam lr 1e-4, batch 256, "
                               "crops and flips)", low=1)
    pretrain_per_class: int = opt(0, "pretrain: CIFAR-10 training images per class (0: all 5000)", low=0)
    class_order: str = opt("", "vandeven: the class order van de Ven et al.'s code draws from --seed (seed 0 "
                           "natural, any other a numpy permutation; their Table 3 averages seeds 2-11); "
                           "empty: --class-order-seed's", choices=("", "vandeven"))

    def run_defaults(self) -> dict:
        return dict(self.BACKBONE_DEFAULTS[self.backbone])


@register_scenario("split_cifar100", SplitCifar100Options)
def split_cifar100(o: SplitCifar100Options, run):
    """CIFAR-100, 10 tasks x 10 classes (or 20 x 5; class_il, task_il or domain_il), downloaded on first use."""
    cifar100_available(run)
    arrays = cifar100(str(Path(run.data_root).expanduser().resolve()))
    if o.class_order and o.class_order_seed >= 0:
        raise UserError(f"--class-order {o.class_order} and --class-order-seed both set the class order; give one")
    order = vandeven_order(run.seed, 100) if o.class_order == "vandeven" else None
    if o.pretrain == "none":
        return image_class_split("split_cifar100", o, run, arrays, 100, MEAN, STD,
                                 augment=crop_flip if o.augment else None, order=order)
    features, model_for, info = pretrained_features(o, run, arrays, MEAN, STD)
    return image_class_split("split_cifar100", o, run, features, 100, MEAN, STD, model_for=model_for,
                             info=info, input_kind=None, order=order)
