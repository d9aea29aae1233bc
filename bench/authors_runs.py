"""Shared by the scripts that run the authors' own code beside clsim (bench/*_authors.py): the
official gzipped MNIST files in torchvision's layout, and result stores several processes share."""
from __future__ import annotations

import gzip
import json
import shutil
import statistics
from pathlib import Path

MNIST_FILES = ("train-images-idx3-ubyte", "train-labels-idx1-ubyte", "t10k-images-idx3-ubyte",
               "t10k-labels-idx1-ubyte")


def torchvision_mnist(data_root: Path, root: Path) -> Path:
    """root/MNIST/raw/<name>: the official gzipped IDX files of data_root un-gzipped, where
    torchvision's MNIST(root) reads them (with them present, its download=True never downloads)."""
    raw = root / "MNIST" / "raw"
    raw.mkdir(parents=True, exist_ok=True)
    for name in MNIST_FILES:
        if not (raw / name).exists():
            with gzip.open(data_root / f"{name}.gz") as src, open(raw / f"{name}.part", "wb") as dst:
                shutil.copyfileobj(src, dst)
            (raw / f"{name}.part").rename(raw / name)
    return root


def mean_sd(values: list[float]) -> str:
    """'mean ± sd' to two decimals ('-' for none, no sd for one)."""
    if not values:
        return "-"
    return f"{statistics.mean(values):.2f}" + (f" ± {statistics.stdev(values):.2f}" if len(values) > 1 else "")


class Results:
    """Results by key in workdir/results-<tag>.json, one file per process (several processes, e.g.
    one per seed, may share workdir); a key that any file there holds counts as done."""

    def __init__(self, workdir: Path, tag: str):
        self.workdir, self.path = workdir, workdir / f"results-{tag}.json"
        self.own = json.loads(self.path.read_text()) if self.path.exists() else {}

    def all(self) -> dict:
        merged = {}
        for f in sorted(self.workdir.glob("results-*.json")):
            merged.update(json.loads(f.read_text()))
        return {**merged, **self.own}

    def record(self, key: str, make) -> None:
        """Run make() and keep its result under key, unless some process already has."""
        if key not in self.all():
            self.own[key] = make()
            self.path.write_text(json.dumps(self.own, indent=1))
            print(key, json.dumps(self.own[key]), flush=True)
