"""Pre-training van de Ven et al. (2022)'s convolutional layers on CIFAR-10, as their Split CIFAR-100
protocol does before the continual run (--pre-convE --freeze-convE).

Their main_pretrain.py trains the whole classifier (the five convolutions and the two 2000-unit
layers, a 10-way output) on CIFAR-10 for 100 epochs with Adam (lr 1e-4, betas 0.9/0.999), batch
256, random crops and flips, inputs standardised with CIFAR-10's statistics, and keeps the
convolutional part. The continual run then freezes it in evaluation mode, and, as frozen layers
give every image the same output, passes each image through them once (their main.py
"feature extractor"): the tasks hold those 1024 features and the trained network is the fully
connected part. clsim does the same. The weights are cached under the data root
(clsim-pretrained/, one file per seed, width, epochs and data size; loaded with
torch.load(weights_only=True)); pass the same --seed to reuse them. Differences: their repository
kept eleven pre-trained copies (seeds 1-11) and gave seed s of the comparison copy s; clsim
pre-trains with the run's seed. CIFAR-10 is another population than the tasks' CIFAR-100 images:
a privacy ledger does not count it (it is treated as public data).
"""
from __future__ import annotations

import os
import sys
import tempfile
from pathlib import Path

import numpy as np
import torch
from torch import nn

from clsim.data import CIFAR_HINT, CIFAR_MEAN, CIFAR_STD, crop_flip
from clsim.errors import UserError
from clsim.models import FromUint8, VdvConvNet, make_model

FOLDER = "clsim-pretrained"


def cifar10_uint8(root: Path):
    from clsim.data import CIFAR_DIR, _read_cifar_batch
    parts = [_read_cifar_batch(root / CIFAR_DIR / f"data_batch_{i}") for i in range(1, 6)]
    return (np.concatenate([d for d, _ in parts]).reshape(-1, 3, 32, 32), np.concatenate([l for _, l in parts]))


def pretrained_conv(o, run) -> VdvConvNet:
    """vdv_conv with its convolutional layers pre-trained on CIFAR-10 (cached per seed and budget)."""
    from clsim.datasets import CIFAR10, fetch
    width = o.backbone_width or 16
    root = Path(run.data_root).expanduser()
    path = root / FOLDER / f"vdv_conv-w{width}-e{o.pretrain_epochs}-n{o.pretrain_per_class}-seed{run.seed}.pt"
    net = VdvConvNet(3, width)
    if path.is_file():
        try:
            net.conv.load_state_dict(torch.load(path, map_location="cpu", weights_only=True))
        except Exception as exc:   # a pickle with code is refused by weights_only; wrong shapes by strict loading
            raise UserError(f"refused pre-trained weights {path} ({type(exc).__name__}: {str(exc)[:200]}); "
                            f"delete it to pre-train again") from None
        return net
    fetch(run, CIFAR10, CIFAR_HINT)
    x, y = cifar10_uint8(root)
    if o.pretrain_per_class:
        from clsim.data import first_per_class
        keep = first_per_class(torch.from_numpy(y), o.pretrain_per_class).numpy()
        x, y = x[keep], y[keep]
    device = torch.device(run.device)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(run.seed)
        model = nn.Sequential(FromUint8(net, CIFAR_MEAN, CIFAR_STD), nn.Linear(net.out_features, 10)).to(device)
    generator = torch.Generator().manual_seed(run.seed)
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-4, betas=(0.9, 0.999))
    x, y = torch.from_numpy(x), torch.from_numpy(y)
    model.train()
    for epoch in range(o.pretrain_epochs):
        order, total = torch.randperm(len(y), generator=generator), 0.0
        for rows in order.split(256):
            xb = crop_flip(x[rows], generator).to(device)
            loss = nn.functional.cross_entropy(model(xb), y[rows].to(device))
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
            total += loss.item() * len(rows)
        print(f"pre-training vdv_conv on CIFAR-10: epoch {epoch + 1}/{o.pretrain_epochs}, "
              f"loss {total / len(y):.3f}", file=sys.stderr)
    net = net.cpu()
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=".vdv-", dir=path.parent)
    with os.fdopen(fd, "wb") as f:
        torch.save(net.conv.state_dict(), f)
    os.replace(tmp, path)   # two runs pre-training at once: the last finished wins, whole
    return net


def pretrained_features(o, run, arrays, mean, std):
    """(the images' features through the frozen pre-trained layers, train then test; a model builder
    for the fully connected part; what to record in summary.json)."""
    if o.backbone != "vdv_conv":
        raise UserError(f"--pretrain cifar10 pre-trains vdv_conv's convolutional layers (van de Ven et al. "
                        f"2022); it has no meaning for --backbone {o.backbone}: use --backbone vdv_conv")
    if getattr(o, "augment", False):
        raise UserError("--augment acts on images; with --pretrain cifar10 the tasks hold the frozen layers' "
                        "features (as van de Ven et al.'s code does): drop --augment")
    net = pretrained_conv(o, run)
    conv = FromUint8(net.conv, mean, std).to(run.device).eval()
    x_train, y_train, x_test, y_test = arrays

    @torch.no_grad()
    def features(x):
        return torch.cat([conv(torch.from_numpy(np.ascontiguousarray(x[i:i + 1000])).to(run.device)).cpu()
                          for i in range(0, len(x), 1000)]).numpy()

    def model_for(setting, heads, width):   # the fully connected part: 1024 -> 2000 -> 2000 -> head(s)
        return make_model("mlp", (net.conv_out_features,), setting, heads, width, task_heads=o.task_heads,
                          hidden=(net.out_features, net.out_features))

    return (features(x_train), y_train, features(x_test), y_test), model_for, \
        {"pretrained": "vdv_conv convolutional layers on CIFAR-10", "pretrain_epochs": o.pretrain_epochs}
