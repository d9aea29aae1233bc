"""seq_tinyimagenet: Tiny-ImageNet (200 classes of 64x64 images, downloaded on first use) in tasks of classes."""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from clsim.config import opt
from clsim.data import crop_flip
from clsim.datasets import image_class_split, tiny_imagenet, tiny_imagenet_available
from clsim.registry import register_scenario
from clsim.scenario import class_split_options

# Mammoth's seq-tinyimg normalisation (datasets/seq_tinyimagenet.py).
MEAN, STD = (0.4802, 0.4480, 0.3975), (0.2770, 0.2691, 0.2821)


@dataclass
class SeqTinyImageNetOptions(class_split_options(200, 10, "the order of wnids.txt", 500, 50, ": 10 of 20",
                                                  "test (validation-split) images per class")):
    # Mammoth's seq-tinyimg as in DER: ResNet-18 (nf 64), 100 epochs, batch 32, SGD (lr per method).
    RUN_DEFAULTS = {"epochs": 100, "lr": 0.03, "batch_size": 32}
    backbone: str = opt("resnet18_mammoth", "resnet18_mammoth (DER), resnet18_reduced, resnet18 or cnn",
                        choices=("resnet18_mammoth", "resnet18_reduced", "resnet18", "cnn"))
    backbone_width: int = opt(0, "channels of the first layer (0: the backbone's published width)", low=0)
    augment: bool = opt(False, "random 64x64 crops of the 4-pixel zero-padded image and horizontal flips "
                        "(Mammoth's seq-tinyimg transform)")


@register_scenario("seq_tinyimagenet", SeqTinyImageNetOptions)
def seq_tinyimagenet(o: SeqTinyImageNetOptions, run):
    """Tiny-ImageNet 64x64, 10 tasks x 20 classes (class_il, task_il or domain_il), downloaded on first use."""
    tiny_imagenet_available(run)
    arrays = tiny_imagenet(str(Path(run.data_root).expanduser().resolve()))
    return image_class_split("seq_tinyimagenet", o, run, arrays, 200, MEAN, STD,
                             augment=crop_flip if o.augment else None)
