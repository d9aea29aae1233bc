"""Backbones and the multi-head wrapper every supervised scenario uses."""
from __future__ import annotations

import torch
from torch import nn
import torch.nn.functional as F


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


class MultiHeadNet(nn.Module):
    """A backbone and one linear head per task (task_il) or one shared head (class_il/domain_il).

    `forward(x, t)`: `t` is the task index of the batch (an int) or of each example (a tensor);
    with a shared head it is ignored. Mixed-task batches are padded with -inf logits to the
    widest head so a cross-entropy over them is exact; each of their heads runs on the whole
    batch and is kept on its own task's rows, so every layer call covers every example (what
    per-example gradients under a privacy mechanism need; a head is one small matmul)."""

    def __init__(self, backbone: nn.Module, head_sizes: list[int]):
        super().__init__()
        self.backbone = backbone
        self.heads = nn.ModuleList(nn.Linear(backbone.out_features, k) for k in head_sizes)

    def forward(self, x, t=0):
        features = self.backbone(x)
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


BACKBONES = ("mlp", "cnn", "resnet18")


def make_backbone(name: str, input_shape: tuple[int, ...], hidden: tuple[int, ...] = (400, 400),
                  width: int | None = None) -> nn.Module:
    channels = input_shape[0]
    if name == "mlp":
        numel = 1
        for d in input_shape:
            numel *= d
        return MLP(numel, hidden)
    if name == "cnn":
        return SmallCNN(channels, width or 32)
    if name == "resnet18":
        return ResNet18(channels, width or 20)
    raise ValueError(f"unknown backbone {name}")


def make_model(backbone: str, input_shape, setting: str, head_sizes_task_il: list[int],
               n_classes: int, **kwargs) -> MultiHeadNet:
    heads = head_sizes_task_il if setting == "task_il" else [n_classes]
    return MultiHeadNet(make_backbone(backbone, tuple(input_shape), **kwargs), heads)
