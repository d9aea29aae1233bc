"""The datasets clsim can download, and their readers into uint8 arrays held once in memory.

Official locations and checksums come from torchvision's dataset classes where they cover the
set (CIFAR-10/100, MNIST, Fashion-MNIST; imported only when a download is needed, as importing
torchvision takes seconds). Their loaders are not used: torchvision reads CIFAR with plain
pickle.load and extracts archives without a filter, while clsim reads users' files without
running code (clsim/data.py's restricted unpickler, clsim/download.py's checked extraction).
Tiny-ImageNet is no torchvision dataset: its archive layout (wnids.txt, train/<wnid>/images/*.JPEG,
val/images + val/val_annotations.txt; the test split has no labels, so its validation split is the
test set, as in Mammoth) is read here and kept as uint8 .npy files beside it, which later runs
load with allow_pickle=False.
"""
from __future__ import annotations

import hashlib
import os
import re
import stat
import tempfile
from functools import lru_cache
from pathlib import Path

import numpy as np

from clsim.data import CIFAR_DIR, CIFAR_HINT, MNIST_HINT, _read_cifar_batch, idx_arrays, idx_found, idx_paths
from clsim.download import Dataset, Remote, ensure
from clsim.errors import UserError, did_you_mean


def _torchvision(cls_name: str):
    try:
        import torchvision.datasets as tv
    except ImportError:
        raise UserError(f"downloading needs torchvision's table of official files: pip install torchvision "
                        f"(or clsim[datasets]), or put the files under --data-root yourself") from None
    return getattr(tv, cls_name)


def _cifar(cls_name: str, tv=None):
    tv = tv or _torchvision(cls_name)
    files = tv.train_list + tv.test_list + [[tv.meta["filename"], tv.meta["md5"]]]
    return (Remote(tv.filename, tv.tgz_md5, (tv.url,)),), dict(files)


def _idx(cls_name: str):
    tv = _torchvision(cls_name)
    return tuple(Remote(name, md5, tuple(m + name for m in tv.mirrors), extract=False)
                 for name, md5 in tv.resources), {}


CIFAR10 = Dataset("CIFAR-10", CIFAR_DIR, lambda: _cifar("CIFAR10"))
CIFAR100 = Dataset("CIFAR-100", "cifar-100-python", lambda: _cifar("CIFAR100"))
MNIST = Dataset("MNIST", "MNIST/raw", lambda: _idx("MNIST"))
FASHION_MNIST = Dataset("Fashion-MNIST", "FashionMNIST/raw", lambda: _idx("FashionMNIST"))
# The Stanford CS231n archive; its MD5 as every loader of it checks (no per-file checksums are published).
TINY_IMAGENET = Dataset("Tiny-ImageNet", "tiny-imagenet-200", lambda: ((Remote(
    "tiny-imagenet-200.zip", "90528d7ca1a48142e341f4ef8d21d0de", ("http://cs231n.stanford.edu/tiny-imagenet-200.zip",)),), {}))

CIFAR100_HINT = ("put the official CIFAR-100 python version (train, test) in DATA_ROOT/cifar-100-python "
                 "and pass --data-root DATA_ROOT")
FMNIST_HINT = ("put the official Fashion-MNIST IDX files (train-images-idx3-ubyte.gz, ...) in "
               "DATA_ROOT/FashionMNIST/raw and pass --data-root DATA_ROOT")
TINY_HINT = ("put the official tiny-imagenet-200 folder (unzipped tiny-imagenet-200.zip) in DATA_ROOT "
             "and pass --data-root DATA_ROOT")


def fetch(run, dataset: Dataset, hint: str) -> Path:
    """`ensure` with a run's --data-root, --download and --data-mirror."""
    return ensure(dataset, run.data_root, download=run.download, mirror=run.data_mirror or "", hint=hint)


def cifar10_available(run) -> None:
    """Download CIFAR-10 into --data-root unless it is there (clsim/data.py reads it)."""
    fetch(run, CIFAR10, CIFAR_HINT)


def mnist_available(run) -> None:
    """Download MNIST unless clsim/data.py finds IDX files in one of the layouts it reads."""
    if not idx_found(Path(run.data_root).expanduser()):
        fetch(run, MNIST, "put the official MNIST IDX files in DATA_ROOT/MNIST and pass --data-root DATA_ROOT")


def fashion_mnist_available(run) -> None:
    if not idx_found(Path(run.data_root).expanduser(), "FashionMNIST"):
        fetch(run, FASHION_MNIST, FMNIST_HINT)


def cifar100_available(run) -> None:
    fetch(run, CIFAR100, CIFAR100_HINT)


def tiny_imagenet_available(run) -> None:
    fetch(run, TINY_IMAGENET, TINY_HINT)


def _tiny_imagenet_prepared(run) -> None:
    """Downloaded, and its JPEGs decoded into the uint8 arrays runs load (once, about a minute)."""
    tiny_imagenet_available(run)
    tiny_imagenet(str(Path(run.data_root).expanduser().resolve()))


#: What `clsim download SCENARIO...` fetches (the scenarios fetch the same on first use): dataset ->
#: its fetcher, and scenario -> its datasets. split_cifar100's CIFAR-10 is for --pretrain cifar10
#: (van de Ven et al. 2022's presets); avalanche's split_cifar benchmark reads CIFAR-10.
FETCHERS = {"CIFAR-10": cifar10_available, "CIFAR-100": cifar100_available, "MNIST": mnist_available,
            "Fashion-MNIST": fashion_mnist_available, "Tiny-ImageNet": _tiny_imagenet_prepared}
SCENARIO_DATA = {"split_cifar": ("CIFAR-10",), "split_cifar100": ("CIFAR-100", "CIFAR-10"),
                 "seq_tinyimagenet": ("Tiny-ImageNet",), "split_fmnist": ("Fashion-MNIST",),
                 "split_mnist": ("MNIST",), "permuted_mnist": ("MNIST",), "rotated_mnist": ("MNIST",),
                 "avalanche": ("CIFAR-10",)}


def prefetch(scenarios: list[str], run) -> list[str]:
    """Fetch the datasets of `scenarios` into run.data_root (each once); a line per dataset. Every
    name is checked before anything is fetched."""
    for name in scenarios:
        if name not in SCENARIO_DATA:
            raise UserError(f"no dataset to download for scenario {name!r}{did_you_mean(name, SCENARIO_DATA)}; "
                            f"clsim download takes: {', '.join(SCENARIO_DATA)}")
    lines = []
    for label in dict.fromkeys(d for name in scenarios for d in SCENARIO_DATA[name]):
        FETCHERS[label](run)
        lines.append(f"{label}: ready in {Path(run.data_root).expanduser()}")
    return lines


Arrays = tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]


@lru_cache(maxsize=2)
def cifar100(root: str) -> Arrays:
    """CIFAR-100 (fine labels): images N x 3 x 32 x 32 uint8, labels 0..99; train then test."""
    folder = Path(root) / CIFAR100.folder
    out = []
    for split in ("train", "test"):
        x, y = _read_cifar_batch(folder / split, b"fine_labels", 100, "CIFAR-100", CIFAR100_HINT)
        out += [x.reshape(-1, 3, 32, 32), y]
    return tuple(out)


@lru_cache(maxsize=2)
def fashion_mnist(root: str) -> Arrays:
    """Fashion-MNIST: images N x 1 x 28 x 28 uint8, labels 0..9; train then test (decoded once)."""
    return _idx_decoded_once(root, "FashionMNIST", "Fashion-MNIST", FMNIST_HINT)


@lru_cache(maxsize=2)
def mnist_uint8(root: str) -> Arrays:
    """MNIST: images N x 1 x 28 x 28 uint8, labels 0..9; train then test (decoded once)."""
    return _idx_decoded_once(root, "MNIST", "MNIST", MNIST_HINT)


DECODED = "clsim-uint8"               # decoded arrays, in the dataset's folder
ARRAY_NAMES = ("train_x", "train_y", "test_x", "test_y")


def _idx_decoded_once(root: str, folder: str, name: str, hint: str) -> Arrays:
    """An MNIST-format dataset from its IDX files, decoded once: inflating the gzip files is most
    of a read (0.2 of 0.25 s for Fashion-MNIST), so the arrays are kept as .npy files beside them
    with the SHA-256 of the files they came from, and loaded from there while it matches (a folder
    that cannot be written, or is marked read-only, is decoded every run: the cache only saves time)."""
    sources = idx_paths(root, folder, name, hint)
    digest = hashlib.sha256()
    for path in sources:
        digest.update(path.read_bytes())
    cache, digest = sources[0].parent / DECODED, digest.hexdigest()
    key = cache / "sources.sha256"
    if _describes(key, digest):
        x_train, y_train, x_test, y_test = _load_arrays(cache, f"delete {cache} to decode the IDX files again")
        for x, y in ((x_train, y_train), (x_test, y_test)):
            if x.dtype != np.uint8 or x.ndim != 3 or y.dtype != np.int64 or y.shape != (len(x),) \
                    or (len(y) and (y.min() < 0 or y.max() > 9)):
                raise UserError(f"corrupt {name} arrays in {cache} (images {x.dtype} {x.shape}, labels {y.dtype} "
                                f"{y.shape}; expected uint8 N x H x W and labels 0..9): delete {cache} to decode "
                                f"the IDX files again")
    else:
        x_train, y_train, x_test, y_test = idx_arrays(root, folder, name, hint)
        if sources[0].parent.stat().st_mode & stat.S_IWUSR:   # one marked read-only is left so, even by root
            try:
                key.unlink(missing_ok=True)   # never a key beside arrays it does not describe
                _write_files(cache, {f"{n}.npy": a for n, a in zip(ARRAY_NAMES, (x_train, y_train, x_test, y_test))})
                _write_files(cache, {key.name: digest})
            except OSError:
                pass   # a folder that cannot be written: decoded again next run
    return x_train[:, None], y_train, x_test[:, None], y_test


def _describes(key: Path, digest: str) -> bool:
    try:
        return key.read_bytes() == digest.encode()
    except OSError:   # absent, or another user's that this one cannot read: decode
        return False


def _load_arrays(cache: Path, again: str) -> list[np.ndarray]:
    """ARRAY_NAMES from cache/NAME.npy, memory-mapped copy-on-write, never unpickled."""
    arrays = []
    for n in ARRAY_NAMES:
        path = cache / f"{n}.npy"
        try:
            arrays.append(np.load(path, mmap_mode="c", allow_pickle=False))   # read as the tasks take them
        except ValueError as exc:   # object arrays (a pickle where an array belongs) land here
            raise UserError(f"refused {path}: {exc} ({again})") from None
        except OSError as exc:
            raise UserError(f"corrupt {path} ({exc}); {again}") from None
    return arrays


# -- Tiny-ImageNet ------------------------------------------------------------------------------

TINY_SIZES = {"train": 500, "val": 50}   # images per class in the official archive
_WNID = re.compile(r"n\d{8}")


@lru_cache(maxsize=2)
def tiny_imagenet(root: str) -> Arrays:
    """Tiny-ImageNet: images N x 3 x 64 x 64 uint8, labels 0..199 in wnids.txt order; the train
    split, then the validation split as test set. Prepared once from the JPEGs (a minute), then
    loaded from uint8 .npy files without pickle."""
    folder = Path(root) / TINY_IMAGENET.folder
    cache = folder / DECODED
    if not all((cache / f"{n}.npy").is_file() for n in ARRAY_NAMES):
        _write_files(cache, {f"{n}.npy": a for n, a in zip(ARRAY_NAMES, _decode_tiny(folder))})
    x_train, y_train, x_test, y_test = _load_arrays(cache, f"delete {cache} to prepare it again from the JPEGs")
    for x, y, split in ((x_train, y_train, "train"), (x_test, y_test, "test")):
        if x.dtype != np.uint8 or x.shape[1:] != (3, 64, 64) or y.dtype != np.int64 or y.shape != (len(x),) \
                or (len(y) and (y.min() < 0 or y.max() > 199)):
            raise UserError(f"corrupt Tiny-ImageNet arrays in {cache} ({split}: {x.dtype} {x.shape}, labels "
                            f"{y.dtype} {y.shape}; expected uint8 N x 3 x 64 x 64 and labels 0..199): "
                            f"delete {cache} to prepare them again")
    return x_train, y_train, x_test, y_test


def _write_files(folder: Path, contents: dict) -> None:
    """Each array (as .npy) or text to folder/NAME, atomically (two runs preparing at once write the
    same bytes), readable as the user's other new files are (mkstemp's are the owner's alone, which
    other users of a shared dataset folder could not load)."""
    folder.mkdir(exist_ok=True)
    umask = os.umask(0)
    os.umask(umask)
    for name, value in contents.items():
        fd, tmp = tempfile.mkstemp(prefix=f".{name}-", dir=folder)
        try:
            os.fchmod(fd, 0o666 & ~umask)
            with os.fdopen(fd, "wb") as f:
                if isinstance(value, str):
                    f.write(value.encode())
                else:
                    np.save(f, value, allow_pickle=False)
            os.replace(tmp, folder / name)
        except BaseException:
            Path(tmp).unlink(missing_ok=True)
            raise


def _decode_tiny(folder: Path) -> Arrays:
    from PIL import Image
    wnids_file = folder / "wnids.txt"
    wnids = wnids_file.read_text().split() if wnids_file.is_file() else []
    if len(wnids) != 200 or len(set(wnids)) != 200 or not all(_WNID.fullmatch(w) for w in wnids):
        raise UserError(f"corrupt {wnids_file}: expected 200 distinct WordNet ids (n########): {TINY_HINT}")
    label = {w: i for i, w in enumerate(wnids)}
    train = [(p, label[w]) for w in wnids for p in sorted((folder / "train" / w / "images").glob("*.JPEG"))]
    val = []
    annotations = folder / "val" / "val_annotations.txt"
    for n, line in enumerate(annotations.read_text().splitlines()):
        parts = line.split("\t")
        if len(parts) < 2 or parts[1] not in label or "/" in parts[0] or parts[0].startswith("."):
            raise UserError(f"corrupt {annotations}, line {n + 1}: expected FILE<tab>WNID with a WNID of "
                            f"wnids.txt: {TINY_HINT}")
        val.append((folder / "val" / "images" / parts[0], label[parts[1]]))

    def decode(items):
        x = np.empty((len(items), 3, 64, 64), dtype=np.uint8)
        for i, (path, _) in enumerate(items):
            try:
                with Image.open(path, formats=["JPEG"]) as img:
                    if img.size != (64, 64):
                        raise ValueError(f"{img.size[0]}x{img.size[1]} pixels, not 64x64")
                    x[i] = np.asarray(img.convert("RGB")).transpose(2, 0, 1)
            except (OSError, ValueError) as exc:
                raise UserError(f"corrupt Tiny-ImageNet image {path} ({exc}): {TINY_HINT}") from None
        return x, np.array([y for _, y in items], dtype=np.int64)

    return (*decode(train), *decode(val))


# -- what the image scenarios share -------------------------------------------------------------

def image_class_split(name: str, o, run, arrays: Arrays, n_classes: int, mean: tuple, std: tuple,
                      input_kind: str = "natural_images", augment=None, info: dict | None = None,
                      model_for=None, order: list[int] | None = None):
    """A class-split scenario over uint8 images (held once; the model standardises each batch with
    `mean`/`std`): `o` gives n_tasks, class_order_seed, train_per_class, test_per_class, backbone,
    backbone_width and task_heads; `order` the classes in task order instead of class_order_seed.
    `model_for(setting, heads, n_outputs)` replaces the default model."""
    import torch

    from clsim.data import class_order, first_per_class
    from clsim.models import make_model
    from clsim.scenario import Scenario, class_split, single_head_width
    x_train, y_train, x_test, y_test = (torch.from_numpy(np.ascontiguousarray(a)) for a in arrays)
    if o.train_per_class:   # (no copy of all the images when all are kept)
        keep = first_per_class(y_train, o.train_per_class)
        x_train, y_train = x_train[keep], y_train[keep]
    if o.test_per_class:
        keep = first_per_class(y_test, o.test_per_class)
        x_test, y_test = x_test[keep], y_test[keep]
    setting = o.setting_of(run)
    tasks = class_split(x_train, y_train, x_test, y_test,
                        order or class_order(n_classes, o.class_order_seed), o.n_tasks, setting,
                        population=f"{name} training images")
    heads, width = [t.n_outputs for t in tasks], single_head_width(tasks, setting, n_classes)
    shape = tuple(x_train.shape[1:])
    make = (lambda: model_for(setting, heads, width)) if model_for else (
        lambda: make_model(o.backbone, shape, setting, heads, width, task_heads=o.task_heads,
                           width=o.backbone_width or None, standardise=(mean, std)))
    held = sum(t.train.x.numel() * t.train.x.element_size() + t.test.x.numel() * t.test.x.element_size()
               for t in tasks)
    return Scenario(name, setting, tasks, input_kind=input_kind, make_model=make, defaults=o.run_defaults(),
                    learner_kwargs={"augment": augment} if augment else {},
                    info={"train_size": len(y_train), "test_size": len(y_test),
                          "class_order": [c for t in tasks for c in t.classes], "image_bytes": held,
                          **(info or {})})
