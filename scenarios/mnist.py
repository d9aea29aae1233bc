"""split_mnist, permuted_mnist and rotated_mnist: MNIST from the official IDX files under --data-root
(downloaded on first use)."""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import math

import numpy as np
import torch
import torch.nn.functional as F

from clsim.config import opt
from clsim.data import cached_mnist, class_order, first_per_class, vandeven_order
from clsim.datasets import mnist_available, mnist_uint8
from clsim.errors import UserError
from clsim.models import glorot_uniform, make_model
from clsim.registry import register_scenario
from clsim.scenario import Scenario, Source, SupervisedOptions, Task, TaskData, class_split, single_head_width

# Protocols: MLP hidden sizes and the defaults of --epochs/--lr/--batch-size (flags still win).
# "blip" is BLIP's MNIST network and flags (Shi et al. 2021; networks/q_mlp.py, run_mnist.sh): ONE
# hidden layer of 1200 (quantised by the blip strategy), a head per task in task_il, SGD lr 0.01,
# batch 64 (the presets blip-mnist5 / blip-pmnist add its 200-epoch plateau schedule).
MNIST_MEAN, MNIST_STD = 0.1307, 0.3081   # torchvision's usual figures for MNIST's training pixels
PROTOCOLS = {
    "standard": {"hidden": (400, 400), "defaults": {"epochs": 1, "lr": 0.1, "batch_size": 128}},
    "blip": {"hidden": (1200,), "defaults": {"epochs": 1, "lr": 0.01, "batch_size": 64}},
}


@dataclass
class MnistOptions(SupervisedOptions):
    DEFAULTS_DEPEND_ON = "mnist_protocol"
    mnist_protocol: str = opt("standard", "standard: MLP 784-400-400, lr 0.1, batch 128; blip: BLIP's "
                              "MLP 784-1200 (one hidden layer), lr 0.01, batch 64", choices=tuple(PROTOCOLS))
    mnist_hidden: str = opt("", "MLP hidden sizes, comma-separated, e.g. 256,256 (empty: the protocol's)")
    mnist_backbone: str = opt("mlp", "mlp (the protocol's hidden sizes) or dplis_cnn (DPlis's small CNN, "
                              "model/model_dptrain.py in its authors' code)", choices=("mlp", "dplis_cnn"))
    train_per_class: int = opt(0, "training images per class, the first ones in file order (0: all)", low=0)
    test_per_class: int = opt(0, "test images per class, the first ones in file order (0: all)", low=0)
    mnist_init: str = opt("pytorch", "initial weights: pytorch (PyTorch's defaults) or glorot (Glorot uniform "
                          "weights and zero biases in every linear layer: Mammoth's xavier())",
                          choices=("pytorch", "glorot"))
    mnist_standardise: bool = opt(False, "standardise pixels with MNIST's mean 0.1307 and std 0.3081, as "
                                  "BLIP's and Avalanche's loaders do (default: pixels in [0, 1])")

    def run_defaults(self) -> dict:
        return dict(PROTOCOLS[self.mnist_protocol]["defaults"])


@dataclass
class SplitMnistOptions(MnistOptions):
    n_tasks: int = opt(5, "number of tasks (the 10 digits are split evenly)", low=1, high=10)
    class_order_seed: int = opt(-1, "seed of a random class order (-1: natural order 0..9)", low=-1)
    class_order: str = opt("", "the ten digits in task order, comma-separated, e.g. 7,2,0,... (empty: "
                           "--class-order-seed's), or vandeven: the pairing van de Ven's code draws at --seed "
                           "(seed 0: 0/1, 2/3, ...; other seeds: a random pairing)")


def _digit_order(o: SplitMnistOptions, seed: int) -> list[int]:
    if not o.class_order:
        return class_order(10, o.class_order_seed)
    if o.class_order == "vandeven":
        return vandeven_order(seed, 10)
    try:
        order = [int(d) for d in o.class_order.split(",")]
    except ValueError:
        order = []
    if sorted(order) != list(range(10)):
        raise UserError(f"--class-order {o.class_order!r} must list each digit 0-9 once, comma-separated, "
                        "e.g. 0,1,2,3,4,5,6,7,8,9, or be vandeven")
    return order


@dataclass
class PermutedMnistOptions(MnistOptions):
    SETTING = "domain_il"
    n_permutations: int = opt(10, "number of tasks, each a fixed pixel permutation of all of MNIST", low=1)
    permutation_seed: int = opt(0, "seed of the pixel permutations (independent of --seed)", low=0)


def _subset(o: MnistOptions, run):
    mnist_available(run)
    x_train, y_train, x_test, y_test = cached_mnist(str(Path(run.data_root).expanduser().resolve()))
    tr, te = first_per_class(y_train, o.train_per_class), first_per_class(y_test, o.test_per_class)
    x_train, x_test = x_train[tr], x_test[te]
    if o.mnist_standardise:
        x_train, x_test = (x_train - MNIST_MEAN) / MNIST_STD, (x_test - MNIST_MEAN) / MNIST_STD
    return x_train, y_train[tr], x_test, y_test[te]


def _hidden(o: MnistOptions) -> tuple[int, ...]:
    if not o.mnist_hidden:
        return PROTOCOLS[o.mnist_protocol]["hidden"]
    try:
        sizes = tuple(int(s) for s in o.mnist_hidden.split(","))
    except ValueError:
        sizes = ()
    if not sizes or min(sizes) < 1:
        raise UserError(f"--mnist-hidden {o.mnist_hidden!r} must be positive integers separated by commas, e.g. 400,400")
    return sizes


def _initialised(o: MnistOptions, model: torch.nn.Module) -> torch.nn.Module:
    if o.mnist_init == "glorot":
        model.apply(glorot_uniform)
    return model


def _scenario(name, o, setting, tasks, n_classes, shape, info, standardise=None) -> Scenario:
    hidden, heads = _hidden(o), [t.n_outputs for t in tasks]
    return Scenario(name, setting, tasks, input_kind="digits",
                    make_model=lambda: _initialised(o, make_model(o.mnist_backbone, shape, setting, heads, n_classes,
                                                                  task_heads=o.task_heads, hidden=hidden,
                                                                  standardise=standardise)),
                    defaults=o.run_defaults(),
                    info={**info, "hidden": list(hidden), "protocol": o.mnist_protocol})


@register_scenario("split_mnist", SplitMnistOptions)
def split_mnist(o: SplitMnistOptions, run) -> Scenario:
    """MNIST from the IDX files under --data-root, 5 tasks x 2 digits (class_il, task_il or domain_il)."""
    x_train, y_train, x_test, y_test = _subset(o, run)
    setting = o.setting_of(run)
    tasks = class_split(x_train, y_train, x_test, y_test, _digit_order(o, run.seed), o.n_tasks, setting,
                        population="MNIST training images")
    return _scenario("split_mnist", o, setting, tasks, single_head_width(tasks, setting, 10), tuple(x_train.shape[1:]),
                     {"train_size": len(y_train), "test_size": len(y_test)})


@register_scenario("permuted_mnist", PermutedMnistOptions)
def permuted_mnist(o: PermutedMnistOptions, run) -> Scenario:
    """MNIST under 10 fixed pixel permutations, one task each (domain_il: one shared 10-way head)."""
    x_train, y_train, x_test, y_test = _subset(o, run)
    setting = o.setting_of(run)
    shape, pixels = tuple(x_train.shape[1:]), x_train[0].numel()
    g = torch.Generator().manual_seed(o.permutation_seed)
    everyone = Source("MNIST training images", torch.arange(len(y_train)))   # the same people in every task
    tasks = []
    for i in range(o.n_permutations):
        perm = torch.randperm(pixels, generator=g)
        # class_il tells the permutations apart by label: task i owns labels 10i..10i+9.
        offset = 10 * i if setting == "class_il" else 0
        parts = [TaskData(x.flatten(1)[:, perm].view(-1, *shape), y + offset)
                 for x, y in ((x_train, y_train), (x_test, y_test))]
        tasks.append(Task(i, f"perm{i}", tuple(range(offset, offset + 10)), parts[0], parts[1], n_outputs=10,
                          source=everyone))
    n_classes = 10 * o.n_permutations if setting == "class_il" else 10
    return _scenario("permuted_mnist", o, setting, tasks, n_classes, shape,
                     {"train_size": len(y_train), "test_size": len(y_test), "permutation_seed": o.permutation_seed})


@dataclass
class RotatedMnistOptions(MnistOptions):
    SETTING = "domain_il"
    n_rotations: int = opt(10, "number of tasks, each all of MNIST rotated by one fixed angle", low=1)
    rotation_seed: int = opt(0, "seed of the angles, drawn as --rotation-draw says (independent of --seed; "
                             "-1: the run's --seed, so each seed has its own angles, as Mammoth's rot-mnist)", low=-1)
    rotation_draw: str = opt("stratified", "stratified: task t's angle uniform in [180t/n, 180(t+1)/n) degrees "
                             "(GEM's mnist_rotations.py); uniform: each in [0, 180) (Mammoth's rot-mnist)",
                             choices=("stratified", "uniform"))
    rotation_angles: str = opt("", "the angles in degrees, comma-separated, one per task (empty: drawn "
                               "by --rotation-seed; overrides --n-rotations)")
    rotation_interpolation: str = opt("nearest", "nearest: GEM's and Mammoth's rotation (PIL's Image.rotate); "
                                      "bilinear: smoother, clsim's before 2026-12-07", choices=("nearest", "bilinear"))


def _angles(o: RotatedMnistOptions, seed: int) -> list[float]:
    """The angles in degrees, one per task (`seed`: the run's, used when --rotation-seed is -1)."""
    if o.rotation_angles:
        try:
            return [float(a) for a in o.rotation_angles.split(",")]
        except ValueError:
            raise UserError(f"--rotation-angles {o.rotation_angles!r} must be numbers separated by commas, "
                            f"e.g. 0,45,90") from None
    seed = seed if o.rotation_seed == -1 else o.rotation_seed
    u = torch.rand(o.n_rotations, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)
    if o.rotation_draw == "uniform":
        return [180.0 * float(a) for a in u]
    return [180.0 * (t + float(u[t])) / o.n_rotations for t in range(o.n_rotations)]


def rotate(x: torch.Tensor, degrees: float, interpolation: str = "nearest") -> torch.Tensor:
    """uint8 images N x C x H x W rotated anticlockwise about their centre, corners black.

    nearest is GEM's rotation (data/mnist_rotations.py: PIL's Image.rotate with its default
    resampling), which Mammoth's rot-mnist also uses (torchvision's rotate on PIL images, nearest by
    default). PIL itself says where each output pixel comes from: it rotates an image of pixel
    numbers once, and every image is then one gather with that map, so each equals PIL's rotation of
    it exactly (PIL image by image takes about a minute for rotated MNIST's ten angles). bilinear is
    grid_sample's (align_corners False, zeros outside), rounded to uint8: clsim's rotation before
    2026-12-07."""
    n, c, h, w = x.shape
    if interpolation == "bilinear":
        a = math.radians(degrees)
        theta = torch.tensor([[math.cos(a), -math.sin(a), 0.0], [math.sin(a), math.cos(a), 0.0]])   # output -> input
        grid = F.affine_grid(theta.expand(1, 2, 3), [1, 1, h, w], align_corners=False)
        out = torch.empty_like(x)
        for i in range(0, n, 10000):   # float copies of a chunk only
            part = x[i:i + 10000].float()
            part = F.grid_sample(part, grid.expand(len(part), h, w, 2), align_corners=False)
            out[i:i + 10000] = part.round_().clamp_(0, 255).to(torch.uint8)
        return out
    from PIL import Image
    numbers = Image.fromarray(np.arange(1, h * w + 1, dtype=np.int32).reshape(h, w))
    source = np.asarray(numbers.rotate(degrees)).reshape(-1)   # NEAREST; 0: from outside the image
    out = np.take(x.reshape(n * c, h * w).numpy(), np.maximum(source - 1, 0), axis=1)   # numpy's take: 7x torch's
    out *= (source > 0).astype(np.uint8)   # black outside, as PIL fills
    return torch.from_numpy(out).view(n, c, h, w)


@register_scenario("rotated_mnist", RotatedMnistOptions)
def rotated_mnist(o: RotatedMnistOptions, run) -> Scenario:
    """MNIST rotated by a fixed angle per task (domain_il: one shared 10-way head; class_il, task_il too)."""
    mnist_available(run)
    arrays = mnist_uint8(str(Path(run.data_root).expanduser().resolve()))
    x_train, y_train, x_test, y_test = (torch.from_numpy(a) for a in arrays)
    tr, te = first_per_class(y_train, o.train_per_class), first_per_class(y_test, o.test_per_class)
    x_train, y_train, x_test, y_test = x_train[tr], y_train[tr], x_test[te], y_test[te]
    setting, angles = o.setting_of(run), _angles(o, run.seed)
    everyone = Source("MNIST training images", torch.arange(len(y_train)))   # the same people in every task
    tasks = []
    for i, angle in enumerate(angles):
        offset = 10 * i if setting == "class_il" else 0   # class_il tells the rotations apart by label
        parts = [TaskData(rotate(x, angle, o.rotation_interpolation), y + offset)
                 for x, y in ((x_train, y_train), (x_test, y_test))]
        tasks.append(Task(i, f"rot{angle:.0f}", tuple(range(offset, offset + 10)), parts[0], parts[1],
                          n_outputs=10, source=everyone))
    standardise = ((MNIST_MEAN,), (MNIST_STD,)) if o.mnist_standardise else ((0.0,), (1.0,))
    held = sum(t.train.x.numel() + t.test.x.numel() for t in tasks)
    return _scenario("rotated_mnist", o, setting, tasks, 10 * len(tasks) if setting == "class_il" else 10,
                     tuple(x_train.shape[1:]), {"train_size": len(y_train), "test_size": len(y_test),
                                                "angles": angles, "image_bytes": held}, standardise)
