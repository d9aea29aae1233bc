"""Readers for the datasets clsim ships scenarios for, and the helpers the scenarios share.
Downloads are clsim/download.py's and clsim/datasets.py's; these read what is on disk.

Every failure a user can cause (missing or corrupt file) becomes a UserError naming the file
and what to put where.
"""
from __future__ import annotations

import gzip
import pickle
import struct
import zlib
from functools import lru_cache
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from clsim.errors import UserError

CIFAR_DIR = "cifar-10-batches-py"
CIFAR_MEAN = (0.4914, 0.4822, 0.4465)
CIFAR_STD = (0.2470, 0.2435, 0.2615)
CIFAR_HINT = ("put the official CIFAR-10 python version (data_batch_1..5, test_batch) in "
              "DATA_ROOT/cifar-10-batches-py and pass --data-root DATA_ROOT")


try:
    from numpy._core import multiarray as _multiarray
except ImportError:   # numpy < 2
    from numpy.core import multiarray as _multiarray


def _latin1(text: str, encoding: str) -> bytes:
    """`_codecs.encode` as protocol-2 pickles use it for bytes, and for nothing else."""
    if encoding not in ("latin1", "latin-1") or not isinstance(text, str):
        raise pickle.UnpicklingError(f"_codecs.encode with {encoding!r}")
    return text.encode("latin1")


class _CifarUnpickler(pickle.Unpickler):
    """Unpickles only what the official CIFAR-10 batches hold: dicts, lists, bytes, str, ints and
    numpy arrays (their reconstructor, ndarray, dtype, scalar). Any other global (os.system, eval,
    a class with a payload in its __reduce__) is refused before it is looked up, so a hostile file
    cannot run code."""

    ALLOWED = {"_reconstruct": _multiarray._reconstruct, "scalar": _multiarray.scalar,
               "ndarray": np.ndarray, "dtype": np.dtype}

    def find_class(self, module, name):
        if (module, name) == ("_codecs", "encode"):
            return _latin1
        if module in ("numpy", "numpy.core.multiarray", "numpy._core.multiarray") and name in self.ALLOWED \
                and (module == "numpy") == (name in ("ndarray", "dtype")):
            return self.ALLOWED[name]
        raise _Refused(f"{module}.{name}")


class _Refused(Exception):
    """A global that the CIFAR-10 format never holds."""


def _read_cifar_batch(path: Path, labels_key: bytes = b"labels", n_classes: int = 10,
                      name: str = "CIFAR-10", hint: str = CIFAR_HINT) -> tuple[np.ndarray, np.ndarray]:
    """One batch of the official CIFAR python version (CIFAR-100's: `labels_key` b"fine_labels",
    100 classes): images N x 3072 uint8 and labels, read with the restricted unpickler."""
    if not path.is_file():
        raise UserError(f"missing {name} file {path}: {hint}")
    try:
        with open(path, "rb") as f:
            batch = _CifarUnpickler(f, encoding="bytes").load()
        data, labels = batch[b"data"], batch[labels_key]
    except _Refused as exc:
        raise UserError(f"refused {name} file {path}: it asks to load {exc}, which the official format "
                        f"never holds (a pickle can run code; this one was not loaded): {hint}") from None
    except Exception as exc:  # any unpickling problem means the file is not a CIFAR batch
        raise UserError(f"corrupt {name} file {path} ({type(exc).__name__}): {hint}") from None
    # checked before any conversion: a cast would wrap pixels mod 256, truncate labels, or turn
    # images saved as floats in [0, 1] into black ones
    data = whole_numbers(data, 0, 255, f"{name} file {path}", "pixel", hint)
    labels = whole_numbers(labels, 0, n_classes - 1, f"{name} file {path}", "label", hint)
    if data.ndim != 2 or data.shape[1] != 3072 or labels.ndim != 1 or len(labels) != len(data):
        raise UserError(f"corrupt {name} file {path} (pixels {data.shape}, labels {labels.shape}; expected "
                        f"N x 3072 and N): {hint}")
    return data.astype(np.uint8), labels.astype(np.int64)


def whole_numbers(values, low: int, high: int, where: str, noun: str, hint: str) -> np.ndarray:
    """`values` (an array, or a list as CIFAR's labels are) as an integer array, refused unless
    every value is a whole number of an integer type within `low`..`high`: nothing is cast before
    it is checked. `where` names the file, `noun` one value ("label", "pixel")."""
    if isinstance(values, list):
        odd = next((v for v in values if type(v) is not int), None)
        if odd is not None:
            raise UserError(f"{where} holds a {noun} of type {type(odd).__name__} ({odd!r}), not a whole number "
                            f"{low}..{high}: {hint}")
        bad = next((i for i, v in enumerate(values) if not low <= v <= high), None)
        if bad is not None:
            raise UserError(f"{where} holds {noun} {values[bad]} at index {bad}; {noun}s are {low}..{high}: {hint}")
        return np.array(values, dtype=np.int64)
    if not isinstance(values, np.ndarray) or values.dtype.kind not in "iu":
        kind = values.dtype if isinstance(values, np.ndarray) else type(values).__name__
        raise UserError(f"{where} holds {noun}s of type {kind}, not whole numbers {low}..{high} "
                        f"(saved as floats, or rescaled?): {hint}")
    if np.iinfo(values.dtype).min >= low and np.iinfo(values.dtype).max <= high:
        return values   # the type holds nothing else (uint8 pixels): no need to look at each
    bad = np.flatnonzero((values < low) | (values > high))
    if len(bad):
        i = int(bad[0])
        raise UserError(f"{where} holds {noun} {values.flat[i]} at index {i}; {noun}s are {low}..{high}: {hint}")
    return values


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


def gunzip(raw: bytes) -> bytes:
    """A gzip file's content: one zlib call into a buffer of the size its trailer states (GzipFile
    inflates 8 KiB at a time and joins the pieces, about 1.5x slower on Fashion-MNIST). The trailer
    states the last member's size, so a file of several members goes gzip's general way."""
    size = int.from_bytes(raw[-4:], "little")
    body = zlib.decompress(raw, 31, max(1, min(size, 1032 * len(raw))))   # deflate's ratio is 1032:1 at most
    return body if len(body) % 2 ** 32 == size else gzip.decompress(raw)


def read_idx(path: str | Path) -> np.ndarray:
    """Read one IDX file (gzipped or not) into an array of its declared type and shape."""
    path = Path(path)
    try:
        raw = path.read_bytes()
        if path.suffix == ".gz":
            raw = gunzip(raw)
        zero, dtype_code, ndim = struct.unpack(">HBB", raw[:4])
        if zero != 0 or dtype_code not in IDX_TYPES:
            raise ValueError("bad magic number")
        shape = struct.unpack(f">{ndim}I", raw[4:4 + 4 * ndim])
        body = np.frombuffer(raw, dtype=IDX_TYPES[dtype_code], offset=4 + 4 * ndim)
        if body.size != int(np.prod(shape)):
            raise ValueError(f"{body.size} values for shape {shape}")
        return body.reshape(shape)
    except (OSError, EOFError, struct.error, ValueError, zlib.error) as exc:
        raise UserError(f"corrupt IDX file {path} ({exc}): {MNIST_HINT}") from None


def _find_idx(root: Path, stem: str, folder: str = "MNIST") -> Path | None:
    for where in (root / folder / "raw", root / folder, root):
        for name in (stem, stem + ".gz"):
            if (where / name).is_file():
                return where / name
    return None


IDX_STEMS = ("train-images-idx3-ubyte", "train-labels-idx1-ubyte", "t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte")


def idx_found(root: str | Path, folder: str = "MNIST") -> bool:
    """Whether any IDX file of an MNIST-format dataset is under `root` (in a layout read): then the
    user put it there, nothing is downloaded, and `idx_arrays` names any file missing."""
    return any(_find_idx(Path(root), stem, folder) is not None for stem in IDX_STEMS)


def idx_paths(root: str | Path, folder: str = "MNIST", name: str = "MNIST", hint: str = MNIST_HINT) -> list[Path]:
    """The IDX files of an MNIST-format dataset, in IDX_STEMS order (train images and labels, test
    images and labels), found as `idx_arrays` reads them; a missing one is named."""
    root, paths = Path(root), []
    for stem in IDX_STEMS:
        paths.append(_find_idx(root, stem, folder))
        if paths[-1] is None:
            raise UserError(f"missing {name} file {stem}[.gz] under {root}: {hint}")
    return paths


def idx_arrays(root: str | Path, folder: str = "MNIST", name: str = "MNIST",
               hint: str = MNIST_HINT) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """An MNIST-format dataset (MNIST, Fashion-MNIST) from its official IDX files under `root`,
    `root/folder` or `root/folder/raw`: images N x 28 x 28 uint8 and labels 0..9, train then test."""
    files = idx_paths(root, folder, name, hint)
    out = []
    for prefix, paths in (("train", files[:2]), ("t10k", files[2:])):
        images, labels = read_idx(paths[0]), read_idx(paths[1])
        if images.ndim != 3 or labels.ndim != 1 or len(images) != len(labels):
            raise UserError(f"{name} {prefix} images {images.shape} and labels {labels.shape} do not match: {hint}")
        labels = whole_numbers(labels, 0, 9, f"{name} label file {paths[1]}", "label", hint)
        images = whole_numbers(images, 0, 255, f"{name} image file {paths[0]}", "pixel", hint)
        out += [images.astype(np.uint8), labels.astype(np.int64)]
    return tuple(out)


def load_mnist(root: str | Path) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """MNIST from the official IDX files: images as float32 N x 1 x 28 x 28 in [0, 1]."""
    x_train, y_train, x_test, y_test = idx_arrays(root)
    return (torch.from_numpy(x_train.astype(np.float32) / 255).unsqueeze(1), torch.from_numpy(y_train),
            torch.from_numpy(x_test.astype(np.float32) / 255).unsqueeze(1), torch.from_numpy(y_test))


@lru_cache(maxsize=2)
def cached_cifar10(root: str):
    """`load_cifar10`, kept per process (decoding the pickles takes seconds); `root` resolved."""
    return load_cifar10(root)


@lru_cache(maxsize=2)
def cached_mnist(root: str):
    """`load_mnist`, kept per process; `root` resolved."""
    return load_mnist(root)


# -- shared by the scenarios ----------------------------------------------------------------

def class_order(n_classes: int, seed: int) -> list[int]:
    """The order in which classes are split into tasks: natural (seed < 0) or a seeded permutation."""
    if seed < 0:
        return list(range(n_classes))
    return torch.randperm(n_classes, generator=torch.Generator().manual_seed(seed)).tolist()


def vandeven_order(seed: int, n_classes: int) -> list[int]:
    """The classes in task order of van de Ven et al.'s code at `seed` (github.com/GMvandeVen/
    continual-learning: data.py in 2019, data/load.py at the 2022 article tag): seed 0 keeps 0..n-1;
    any other seed labels class c perm[c], perm = np.random.permutation(n) right after main.py's
    np.random.seed(seed), and task k holds the next labels in turn (split MNIST's pair: the first is
    Domain-IL's label 0). numpy's legacy generator keeps that stream fixed across releases, so the
    same seed gives their very order."""
    if seed == 0:
        return list(range(n_classes))
    return [int(c) for c in np.argsort(np.random.RandomState(seed).permutation(n_classes))]


def first_per_class(y: torch.Tensor, k: int) -> torch.Tensor:
    """Indices of the first `k` examples of every class, in file order (all when k == 0)."""
    if k == 0:
        return torch.arange(len(y))
    rank = torch.zeros_like(y)
    for c in y.unique().tolist():
        rows = y == c
        rank[rows] = torch.arange(int(rows.sum()))
    return torch.nonzero(rank < k).squeeze(1)


def crop_flip(x: torch.Tensor, generator: torch.Generator, pad: int = 4) -> torch.Tensor:
    """Random crops of the zero-padded images and random horizontal flips, one gather for the
    whole batch (no loop over images)."""
    n, c, h, w = x.shape
    padded = F.pad(x, (pad, pad, pad, pad))
    dy = torch.randint(0, 2 * pad + 1, (n, 1), generator=generator)
    dx = torch.randint(0, 2 * pad + 1, (n, 1), generator=generator)
    flip = torch.rand(n, 1, generator=generator) < 0.5
    cols = torch.arange(w).expand(n, w)
    cols = torch.where(flip, w - 1 - cols, cols) + dx            # flipped columns read right to left
    rows = torch.arange(h).expand(n, h) + dy
    return padded[torch.arange(n)[:, None, None, None], torch.arange(c)[None, :, None, None],
                  rows[:, None, :, None], cols[:, None, None, :]]
