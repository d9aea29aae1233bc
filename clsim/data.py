"""Readers for the datasets clsim ships scenarios for. Nothing is ever downloaded.

Every failure a user can cause (missing or corrupt file) becomes a UserError naming the file
and what to put where.
"""
from __future__ import annotations

import gzip
import pickle
import struct
from pathlib import Path

import numpy as np
import torch

from clsim.errors import UserError

CIFAR_DIR = "cifar-10-batches-py"
CIFAR_MEAN = (0.4914, 0.4822, 0.4465)
CIFAR_STD = (0.2470, 0.2435, 0.2615)
CIFAR_HINT = ("put the official CIFAR-10 python version (data_batch_1..5, test_batch) in "
              "DATA_ROOT/cifar-10-batches-py and pass --data-root DATA_ROOT")


def _read_cifar_batch(path: Path) -> tuple[np.ndarray, np.ndarray]:
    if not path.is_file():
        raise UserError(f"missing CIFAR-10 file {path}: {CIFAR_HINT}")
    try:
        with open(path, "rb") as f:
            batch = pickle.load(f, encoding="bytes")
        data = np.asarray(batch[b"data"], dtype=np.uint8)
        labels = np.asarray(batch[b"labels"], dtype=np.int64)
    except Exception as exc:  # any unpickling problem means the file is not a CIFAR batch
        raise UserError(f"corrupt CIFAR-10 file {path} ({type(exc).__name__}): {CIFAR_HINT}") from None
    if data.ndim != 2 or data.shape[1] != 3072 or len(labels) != len(data) or \
            labels.min(initial=0) < 0 or labels.max(initial=0) > 9:
        raise UserError(f"corrupt CIFAR-10 file {path} (expected N x 3072 uint8 and labels 0..9): {CIFAR_HINT}")
    return data, labels


def load_cifar10(root: str | Path) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """CIFAR-10 from the official python pickle layout, normalised float32 NCHW."""
    folder = Path(root) / CIFAR_DIR
    parts = [_read_cifar_batch(folder / f"data_batch_{i}") for i in range(1, 6)]
    test = _read_cifar_batch(folder / "test_batch")
    mean = torch.tensor(CIFAR_MEAN).view(1, 3, 1, 1)
    std = torch.tensor(CIFAR_STD).view(1, 3, 1, 1)

    def to_tensor(data):
        return (torch.from_numpy(data).view(-1, 3, 32, 32).float().div_(255) - mean) / std

    x_train = to_tensor(np.concatenate([d for d, _ in parts]))
    y_train = torch.from_numpy(np.concatenate([l for _, l in parts]))
    return x_train, y_train, to_tensor(test[0]), torch.from_numpy(test[1])


IDX_TYPES = {0x08: np.uint8, 0x09: np.int8, 0x0B: ">i2", 0x0C: ">i4", 0x0D: ">f4", 0x0E: ">f8"}
MNIST_HINT = ("put the official MNIST IDX files (train-images-idx3-ubyte, train-labels-idx1-ubyte, "
              "t10k-images-idx3-ubyte, t10k-labels-idx1-ubyte, optionally .gz) in DATA_ROOT/MNIST "
              "or DATA_ROOT and pass --data-root DATA_ROOT")


def read_idx(path: str | Path) -> np.ndarray:
    """Read one IDX file (gzipped or not) into an array of its declared type and shape."""
    path = Path(path)
    opener = gzip.open if path.suffix == ".gz" else open
    try:
        with opener(path, "rb") as f:
            raw = f.read()
        zero, dtype_code, ndim = struct.unpack(">HBB", raw[:4])
        if zero != 0 or dtype_code not in IDX_TYPES:
            raise ValueError("bad magic number")
        shape = struct.unpack(f">{ndim}I", raw[4:4 + 4 * ndim])
        body = np.frombuffer(raw, dtype=IDX_TYPES[dtype_code], offset=4 + 4 * ndim)
        if body.size != int(np.prod(shape)):
            raise ValueError(f"{body.size} values for shape {shape}")
        return body.reshape(shape)
    except (OSError, EOFError, struct.error, ValueError) as exc:
        raise UserError(f"corrupt IDX file {path} ({exc}): {MNIST_HINT}") from None


def _find_idx(root: Path, stem: str) -> Path:
    for folder in (root / "MNIST" / "raw", root / "MNIST", root):
        for name in (stem, stem + ".gz"):
            if (folder / name).is_file():
                return folder / name
    raise UserError(f"missing MNIST file {stem}[.gz] under {root}: {MNIST_HINT}")


def load_mnist(root: str | Path) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """MNIST from the official IDX files: images as float32 N x 1 x 28 x 28 in [0, 1]."""
    root = Path(root)
    out = []
    for prefix in ("train", "t10k"):
        images = read_idx(_find_idx(root, f"{prefix}-images-idx3-ubyte"))
        labels = read_idx(_find_idx(root, f"{prefix}-labels-idx1-ubyte"))
        if images.ndim != 3 or labels.ndim != 1 or len(images) != len(labels):
            raise UserError(f"MNIST {prefix} images {images.shape} and labels {labels.shape} do not match: {MNIST_HINT}")
        out += [torch.from_numpy(images.astype(np.float32) / 255).unsqueeze(1),
                torch.from_numpy(labels.astype(np.int64))]
    return tuple(out)
