"""Backbones and the multi-head wrapper every supervised scenario uses."""
from __future__ import annotations

import random
from typing import Callable

import numpy as np
import torch
from torch import nn
import torch.nn.functional as F

from clsim.errors import UserError


class MLP(nn.Module):
    def __init__(self, in_features: int, hidden: tuple[int, ...] = (400, 400)):
        super().__init__()
        layers, width = [nn.Flatten()], in_features
        for h in hidden:
            layers += [nn.Linear(width, h), nn.ReLU()]
            width = h
        self.body = nn.Sequential(*layers)
        self.out_features = width

    def forward(self, x):
        return self.body(x)


class SmallCNN(nn.Module):
    """Four 3x3 convolutions with pooling, for 32x32 colour images (no normalisation layers)."""

    def __init__(self, in_channels: int = 3, width: int = 32):
        super().__init__()
        w = width
        self.body = nn.Sequential(
            nn.Conv2d(in_channels, w, 3, padding=1), nn.ReLU(), nn.Conv2d(w, w, 3, padding=1), nn.ReLU(),
            nn.MaxPool2d(2),
            nn.Conv2d(w, 2 * w, 3, padding=1), nn.ReLU(), nn.Conv2d(2 * w, 2 * w, 3, padding=1), nn.ReLU(),
            nn.MaxPool2d(2), nn.AdaptiveAvgPool2d(2), nn.Flatten())
        self.out_features = 2 * w * 4

    def forward(self, x):
        return self.body(x)


class DPlisCNN(nn.Module):
    """The small CNN of DPlis's code (wangwenxiao/DPlis, model/model_dptrain.py: SmallCNN on 28x28,
    SmallCNN_CIFAR on 32x32): 16 8x8 filters (stride 2, padding 2) and 32 4x4 filters (stride 2),
    each followed by ReLU and a 2x2 max-pool of stride 1, then 32 ReLU units; the head follows."""

    def __init__(self, in_channels: int = 1, side: int = 28):
        super().__init__()
        side = (side + 4 - 8) // 2 + 1 - 1
        side = (side - 4) // 2 + 1 - 1
        self.body = nn.Sequential(
            nn.Conv2d(in_channels, 16, 8, 2, padding=2), nn.ReLU(), nn.MaxPool2d(2, 1),
            nn.Conv2d(16, 32, 4, 2), nn.ReLU(), nn.MaxPool2d(2, 1), nn.Flatten(),
            nn.Linear(32 * side * side, 32), nn.ReLU())
        self.out_features = 32

    def forward(self, x):
        return self.body(x)


class BasicBlock(nn.Module):
    def __init__(self, cin: int, cout: int, stride: int):
        super().__init__()
        self.conv1 = nn.Conv2d(cin, cout, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(cout)
        self.conv2 = nn.Conv2d(cout, cout, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(cout)
        self.shortcut = nn.Sequential()
        if stride != 1 or cin != cout:
            self.shortcut = nn.Sequential(nn.Conv2d(cin, cout, 1, stride, bias=False), nn.BatchNorm2d(cout))

    def forward(self, x):
        out = F.relu(self.bn1(self.conv1(x)))
        return F.relu(self.bn2(self.conv2(out)) + self.shortcut(x))


class ResNet18(nn.Module):
    """ResNet-18 for 32x32 inputs (3x3 stem, no max-pool). `width`=20 is the reduced variant
    common in continual learning (Lopez-Paz & Ranzato 2017); 64 is the full one."""

    def __init__(self, in_channels: int = 3, width: int = 20):
        super().__init__()
        self.conv1 = nn.Conv2d(in_channels, width, 3, 1, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(width)
        blocks, cin = [], width
        for i, stride in enumerate((1, 2, 2, 2)):
            cout = width * 2 ** i
            blocks += [BasicBlock(cin, cout, stride), BasicBlock(cout, cout, 1)]
            cin = cout
        self.layers = nn.Sequential(*blocks)
        self.out_features = cin

    def forward(self, x):
        out = self.layers(F.relu(self.bn1(self.conv1(x))))
        return F.adaptive_avg_pool2d(out, 1).flatten(1)


class VdvConvNet(nn.Module):
    """van de Ven, Tuytelaars & Tolias (2022)'s network for CIFAR (their code: models/conv/nets.py
    ConvLayers and models/classifier.py with the defaults of params/param_values.py for CIFAR-100):
    five 3x3 convolutions of 16, 32, 64, 128, 256 channels (bias, stride 1 then 2, padding 1), each
    but the last followed by batch norm and a ReLU (their no_fnl: the last is a plain convolution),
    flattened (256 x 2 x 2 on 32x32 inputs) into two fully connected ReLU layers of 2000 units.
    `conv` is the part their --pre-convE pre-trains on CIFAR-10 (clsim/pretrain.py)."""

    def __init__(self, in_channels: int = 3, width: int = 16, image_size: int = 32, fc_units: int = 2000):
        super().__init__()
        layers, cin = [], in_channels
        for i in range(5):
            cout = width * 2 ** i   # 16, 32, 64, 128, 256: doubled in every reducing (stride-2) layer
            layers.append(nn.Conv2d(cin, cout, 3, stride=1 if i == 0 else 2, padding=1))
            if i < 4:
                layers += [nn.BatchNorm2d(cout), nn.ReLU()]
            cin = cout
        self.conv = nn.Sequential(*layers, nn.Flatten())
        side = image_size
        for _ in range(4):
            side = (side + 1) // 2
        self.conv_out_features = cin * side * side
        self.fc = nn.Sequential(nn.Linear(self.conv_out_features, fc_units), nn.ReLU(),
                                nn.Linear(fc_units, fc_units), nn.ReLU())
        self.out_features = fc_units

    def forward(self, x):
        return self.fc(self.conv(x))


class FromUint8(nn.Module):
    """Images held as uint8 (each once, in memory) enter the network here: scaled to [0, 1] and
    standardised per channel, batch by batch."""

    def __init__(self, backbone: nn.Module, mean: tuple[float, ...], std: tuple[float, ...]):
        super().__init__()
        self.backbone = backbone
        self.out_features = getattr(backbone, "out_features", None)
        self.register_buffer("mean", torch.tensor(mean).view(1, -1, 1, 1), persistent=False)
        self.register_buffer("std", torch.tensor(std).view(1, -1, 1, 1), persistent=False)

    def forward(self, x):
        return self.backbone((x.float() / 255 - self.mean) / self.std)


#: task_il output layouts (--task-heads): one Linear per task, or one Linear whose row blocks are the tasks' heads
TASK_HEADS = ("separate", "shared")


class MultiHeadNet(nn.Module):
    """A backbone and one linear head per task (task_il) or one shared head (class_il/domain_il).

    `forward(x, t)`: `t` is the task index of the batch (an int) or of each example (a tensor);
    with a single head it is ignored. Mixed-task batches are padded with -inf logits to the
    widest head so a cross-entropy over them is exact; each of their heads runs on the whole
    batch and is kept on its own task's rows, so every layer call covers every example (what
    per-example gradients under a privacy mechanism need; a head is one small matmul).

    `shared=True` (task_il, --task-heads shared) lays the tasks' heads out as consecutive row
    blocks of ONE Linear (task t's logits are rows sum(sizes[:t]) .. +sizes[t]), as van de Ven &
    Tolias's Task-IL code does (one output unit per class, a task's "active classes"; Mammoth
    scores Task-IL likewise, on a class-IL-trained head's logits masked to the task's classes).
    The layer is then one parameter tensor: it is not a task head (`Learner.is_head`), so
    penalties cover all of it, and an optimiser with state (Adam) keeps moving earlier tasks' rows
    on their decaying moments while later tasks train. Per-task heads, by contrast, take no step
    while their task is not trained (their gradient is None). Every forward calls the one layer
    once, on every example."""

    def __init__(self, backbone: nn.Module, head_sizes: list[int], shared: bool = False):
        super().__init__()
        self.backbone = backbone
        self.shared = shared and len(head_sizes) > 1
        widths = [sum(head_sizes)] if self.shared else head_sizes
        self.heads = nn.ModuleList(nn.Linear(backbone.out_features, k) for k in widths)
        self.sizes = list(head_sizes)
        self.starts = [sum(head_sizes[:t]) for t in range(len(head_sizes))]
        # the same as tensors that follow the model to its device, for mixed-task batches: no
        # host-to-device copy in the training step (not saved: they follow from head_sizes)
        self.register_buffer("_starts", torch.tensor(self.starts), persistent=False)
        self.register_buffer("_sizes", torch.tensor(self.sizes), persistent=False)

    def columns(self, t: int) -> slice:
        """The rows of the shared layer (columns of its output) that are task t's head."""
        return slice(self.starts[t], self.starts[t] + self.sizes[t])

    def forward(self, x, t=0):
        features = self.backbone(x)
        if self.shared:
            return self._shared_forward(self.heads[0](features), t)
        if len(self.heads) == 1:
            return self.heads[0](features)
        if isinstance(t, int):
            return self.heads[t](features)
        if bool((t == t[0]).all()):
            return self.heads[int(t[0])](features)
        width = max(h.out_features for h in self.heads)
        out = features.new_full((len(x), width), float("-inf"))
        for task in t.unique().tolist():
            head = self.heads[task]
            mine = (t == task)[:, None]
            out[:, :head.out_features] = torch.where(mine, head(features), out[:, :head.out_features])
        return out

    def _shared_forward(self, every: torch.Tensor, t) -> torch.Tensor:
        """Each example's task columns of the one layer's output, padded with -inf to the widest task."""
        if isinstance(t, int):
            return every[:, self.columns(t)]
        if bool((t == t[0]).all()):
            return every[:, self.columns(int(t[0]))]
        t = t.to(every.device)
        starts, sizes = self._starts[t][:, None], self._sizes[t][:, None]
        offsets = torch.arange(max(self.sizes), device=every.device)
        picked = every.gather(1, (starts + offsets).clamp(max=every.shape[1] - 1))
        return picked.masked_fill(offsets >= sizes, float("-inf"))


#: name -> (what it is, where it comes from); make_backbone builds them (widths as published)
BACKBONES = {
    "mlp": "fully connected ReLU layers (hidden sizes given by the scenario)",
    "cnn": "four 3x3 convolutions and ReLUs, no normalisation (SmallCNN)",
    "resnet18": "ResNet-18 for 32x32 inputs, first layer 20 channels unless --backbone-width says otherwise",
    "resnet18_mammoth": "Mammoth's ResNet-18 (backbone/ResNet18.py, nf 64): 11.2M parameters with a 10-way head",
    "resnet18_reduced": "the reduced ResNet-18 of GEM and A-GEM (model/common.py ResNet18(nf=20))",
    "vdv_conv": "van de Ven et al. 2022's 5-layer convnet (16-256 channels) and two 2000-unit layers",
    "dplis_cnn": "DPlis's small CNN (model/model_dptrain.py): two convolutions (16 8x8, 32 4x4) and 32 units",
}
_WIDTHS = {"cnn": 32, "resnet18": 20, "resnet18_mammoth": 64, "resnet18_reduced": 20, "vdv_conv": 16}


def make_backbone(name: str, input_shape: tuple[int, ...], hidden: tuple[int, ...] = (400, 400),
                  width: int | None = None) -> nn.Module:
    channels = input_shape[0]
    width = width or _WIDTHS.get(name)
    if name == "mlp":
        numel = 1
        for d in input_shape:
            numel *= d
        return MLP(numel, hidden)
    if name == "cnn":
        return SmallCNN(channels, width)
    if name.startswith("resnet18"):
        return ResNet18(channels, width)
    if name == "vdv_conv":
        return VdvConvNet(channels, width, input_shape[-1])
    if name == "dplis_cnn":
        return DPlisCNN(channels, input_shape[-1])
    raise ValueError(f"unknown backbone {name}")


def glorot_uniform(module: nn.Module) -> None:
    """Mammoth's backbone/__init__.py xavier(), applied with model.apply: every Linear's weights
    uniform in ±√(6/(fan_in+fan_out)) (std √(2/(fan_in+fan_out))), its biases 0."""
    if isinstance(module, nn.Linear):
        nn.init.xavier_uniform_(module.weight)
        if module.bias is not None:
            nn.init.zeros_(module.bias)


def make_model(backbone: str, input_shape, setting: str, head_sizes_task_il: list[int],
               n_classes: int, task_heads: str = "separate", standardise: tuple | None = None,
               **kwargs) -> MultiHeadNet:
    """The backbone and the setting's head(s); `task_heads` lays out task_il's heads (TASK_HEADS).
    `standardise` (mean, std per channel): the inputs are uint8 images (FromUint8)."""
    if task_heads not in TASK_HEADS:
        raise UserError(f"--task-heads {task_heads!r} is not one of: {', '.join(TASK_HEADS)}")
    if task_heads == "shared" and setting != "task_il":
        raise UserError(f"--task-heads shared lays out task_il's heads; {setting} always has one head: "
                        f"drop --task-heads or use --setting task_il")
    heads = head_sizes_task_il if setting == "task_il" else [n_classes]
    body = make_backbone(backbone, tuple(input_shape), **kwargs)
    if standardise is not None:
        body = FromUint8(body, *standardise)
    return MultiHeadNet(body, heads, shared=task_heads == "shared")



def check_size(make: Callable[[], nn.Module], device: torch.device) -> None:
    """Refuse, before anything is allocated, a model whose weights and their gradients alone exceed
    the memory `device` has free (`--hidden 100000000` asked for 25 GB, then died). The model is
    made once on torch's meta device (shapes, no storage), random states kept as they were; one
    that cannot be made there is left to be made for real."""
    state = random.getstate(), np.random.get_state()
    try:
        with torch.random.fork_rng(devices=[]), torch.device("meta"):
            probe = make()
        need = sum(2 * p.numel() * p.element_size() for p in probe.parameters()) + \
            sum(b.numel() * b.element_size() for b in probe.buffers())
    except Exception as exc:
        if "overflow" in str(exc):   # torch: a weight's byte count past int64 (`--hidden 2147483647`)
            raise UserError("the model is too large for any machine: a weight's size overflows a 64-bit count; "
                            "choose a smaller model (its width or depth options)") from None
        return
    finally:
        random.setstate(state[0])
        np.random.set_state(state[1])
    free = free_memory(device)
    if free is not None and need > free:
        raise UserError(f"the model needs {need / 2**30:.1f} GiB for its weights and their gradients alone, "
                        f"more than the {free / 2**30:.1f} GiB free on {device}; choose a smaller model "
                        f"(its width or depth options)")


def free_memory(device: torch.device) -> int | None:
    """Bytes free on `device` (CUDA: the driver's figure; CPU: MemAvailable); None where unknown."""
    if device.type == "cuda":
        return torch.cuda.mem_get_info(device)[0]
    try:
        with open("/proc/meminfo") as f:
            fields = dict(line.split(":", 1) for line in f)
        return int(fields["MemAvailable"].split()[0]) * 1024
    except (OSError, KeyError, ValueError):
        return None


def buffer_slots(flag: str, asked: int, fills: int, slot_bytes: int, device: torch.device) -> int:
    """The slots to allocate for a buffer of `asked` slots (option `flag`) that the run offers at most
    `fills` items: a larger one would never fill, so it gets `fills` (the same run, as the slots
    past `fills` are never written). Refused in one line, before anything is allocated, when those
    slots of `slot_bytes` each exceed the memory free on `device` (`--replay-size 2147483647`
    asked torch for 550 GB, then died)."""
    slots = min(asked, fills)
    free = free_memory(device)
    if free is not None and slots * slot_bytes > free:
        raise UserError(f"{flag} {asked}: a buffer of {slots} (as many as this run fills) needs "
                        f"{slots * slot_bytes / 2**30:.1f} GiB, more than the {free / 2**30:.1f} GiB free on "
                        f"{device}; give a smaller {flag}")
    return slots


def own_copy(model: nn.Module) -> nn.Module:
    """A copy of a model passed to an Experiment, for one run to train. The caller's object is never
    changed (a private run may swap its layers), so every run of it starts from the same weights:
    trained in place, a second Experiment with the same seed continued from the first one's."""
    import copy
    try:
        return copy.deepcopy(model)
    except Exception as exc:   # noqa: BLE001 - whatever stops a copy, the remedy is the same
        raise UserError(f"unsupported model: it cannot be copied for the run ({type(exc).__name__}: {exc}); "
                        f"pass a function that makes it, e.g. model=lambda: MyNet()") from None


def check_contract(model: nn.Module, tasks, private: bool) -> None:
    """What the supervised learner asks of a model passed in, tried on two training inputs of each
    task before anything trains: `model(x, task)` (the task's index) returns one row of logits per
    input, with an output for every label of the task; under a privacy mechanism, no layer of its
    own parameters that Opacus has no per-example rule for may be called with anything but tensors
    (Opacus's functorch fallback takes tensors only: a bare nn.Parameter used in a forward that
    also takes the task index failed deep inside Opacus). Evaluated in eval mode under no_grad:
    nothing (BatchNorm statistics included) changes."""
    from opacus.grad_sample import GradSampleModule
    untensored = []

    def note(module, args):
        if any(not isinstance(a, torch.Tensor) for a in args):
            untensored.append(module)
    hooks = [m.register_forward_pre_hook(note) for m in model.modules()
             if private and type(m) not in GradSampleModule.GRAD_SAMPLERS
             and any(p.requires_grad for p in m.parameters(recurse=False))]
    trained = [p for p in model.parameters() if p.requires_grad]
    if not trained:
        raise UserError("unsupported model: it has no trainable parameters")
    training, device = model.training, trained[0].device
    model.eval()
    try:
        for task in tasks:
            x = task.train.x[:2].to(device)
            try:
                with torch.no_grad():
                    out = model(x, task.index)
            except Exception as exc:   # noqa: BLE001 - the user's forward: said, whatever it raised
                raise UserError(f"unsupported model: model(x, task) failed on task {task.index}'s inputs "
                                f"({x.dtype} {tuple(x.shape)}) with {type(exc).__name__}: "
                                f"{' '.join(str(exc).split())[:200]}; a clsim model's forward(x, task) takes a "
                                f"batch and the task's index and returns logits") from None
            if not isinstance(out, torch.Tensor) or out.dim() != 2 or len(out) != len(x):
                shape = tuple(out.shape) if isinstance(out, torch.Tensor) else type(out).__name__
                raise UserError(f"unsupported model: model(x, task) returned {shape} for {len(x)} inputs; it must "
                                f"return logits, one row per input")
            labels = int(max(task.train.y.max(), task.test.y.max())) + 1
            if out.shape[1] < labels:
                raise UserError(f"unsupported model: it gives {out.shape[1]} logits for task {task.index}, whose "
                                f"labels run to {labels - 1}; it needs at least {labels} outputs")
    finally:
        model.train(training)
        for hook in hooks:
            hook.remove()
    if untensored:
        name = next(n for n, m in model.named_modules() if m is untensored[0]) or "the model itself"
        own = [n for n, p in untensored[0].named_parameters(recurse=False) if p.requires_grad]
        raise UserError(f"unsupported model: under a privacy mechanism, {name} ({type(untensored[0]).__name__}) "
                        f"holds parameters of its own ({', '.join(own)}) and is called with more than tensors; "
                        f"per-example gradients need them in layers Opacus knows (nn.Linear, nn.Conv2d, "
                        f"nn.Embedding, nn.LayerNorm, nn.GroupNorm, ...): move them into such a layer")
