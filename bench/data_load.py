"""Is loading the bottleneck? For each scenario with downloaded data: the time to read and prepare
its data (files on disk -> the scenario's tasks, in-process caches cleared) beside the time of one
training epoch over the same training images with the scenario's default backbone and batch size,
and the memory its images take (held once, as uint8).

    python bench/data_load.py --data-root ~/.cache/clsim/data        # the real datasets
    python bench/data_load.py --synthetic /tmp/clsim-synth            # official formats, real sizes,
                                                                      # random pixels (no internet)
Target: read / epoch < 0.10. The epoch is timed over --steps training steps (forward, backward,
SGD step, the scenario's augmentation) and scaled to the epoch's number of steps, which is said.
Tiny-ImageNet is timed twice: the first run decodes the 110,000 JPEGs into uint8 .npy files, later
runs load those. So are the IDX scenarios (split_fmnist, rotated_mnist): their decoded arrays are
deleted first, so the first read inflates the gzip files (and keeps the arrays where the folder
can be written), the second is what later runs take.
"""
from __future__ import annotations

import argparse
import math
import shutil
import sys
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from clsim import config, data, datasets  # noqa: E402
from clsim.config import RunOptions  # noqa: E402
from clsim.registry import SCENARIOS  # noqa: E402

CASES = [("split_cifar100", {"augment": True}), ("seq_tinyimagenet", {"augment": True}),
         ("split_fmnist", {}), ("rotated_mnist", {})]
IDX_FOLDERS = {"split_fmnist": "FashionMNIST", "rotated_mnist": "MNIST"}   # decoded once (clsim/datasets.py)


def clear_caches():
    for reader in (datasets.cifar100, datasets.fashion_mnist, datasets.mnist_uint8, datasets.tiny_imagenet):
        reader.cache_clear()


def build(name: str, options: dict, root: str, device: str):
    entry = SCENARIOS.get(name)
    run = config.build(RunOptions, {"data_root": root, "device": device, "download": False})
    return entry.target(config.build(entry.options, options), run), run


def epoch_seconds(scenario, device: str, steps: int) -> tuple[float, int]:
    """Seconds of one epoch over every task's training images, from `steps` timed steps."""
    torch.manual_seed(0)
    model = scenario.make_model().to(device)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.01)
    augment = scenario.learner_kwargs.get("augment")
    x = torch.cat([t.train.x for t in scenario.tasks])
    y = torch.cat([t.train.y for t in scenario.tasks])
    batch = scenario.defaults.get("batch_size", 32)
    g = torch.Generator().manual_seed(0)
    order = torch.randperm(len(y), generator=g)
    total = math.ceil(len(y) / batch)

    def step(i):
        rows = order[(i * batch) % len(y):][:batch]
        xb = x[rows]
        if augment is not None:
            xb = augment(xb, g)
        loss = torch.nn.functional.cross_entropy(model(xb.to(device)), y[rows].to(device))
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()

    step(0)   # warm-up (allocations, cuDNN autotuning)
    if device.startswith("cuda"):
        torch.cuda.synchronize()
    start = time.perf_counter()
    for i in range(1, steps + 1):
        step(i)
    if device.startswith("cuda"):
        torch.cuda.synchronize()
    return (time.perf_counter() - start) / steps * total, total


def synthesize(root: Path) -> None:
    """Official on-disk formats at the official sizes, random pixels (what is timed is the reading)."""
    import gzip
    import pickle
    import struct
    from PIL import Image
    rng = np.random.default_rng(0)
    c100 = root / "cifar-100-python"
    if not (c100 / "test").is_file():
        c100.mkdir(parents=True, exist_ok=True)
        for split, n in (("train", 500), ("test", 100)):
            labels = [c for c in range(100) for _ in range(n)]
            batch = {b"data": rng.integers(0, 256, (len(labels), 3072), dtype=np.uint8), b"fine_labels": labels}
            # bytes as the official (Python 2) pickles hold them: one opcode, no str round trip
            (c100 / split).write_bytes(pickle.dumps(batch, protocol=4))
    fm = root / "FashionMNIST" / "raw"
    if not fm.is_dir():
        fm.mkdir(parents=True)
        for prefix, n in (("train", 6000), ("t10k", 1000)):
            labels = np.repeat(np.arange(10, dtype=np.uint8), n)
            for kind, arr in (("images-idx3-ubyte", rng.integers(0, 256, (len(labels), 28, 28), dtype=np.uint8)),
                              ("labels-idx1-ubyte", labels)):
                head = struct.pack(">HBB", 0, 8, arr.ndim) + struct.pack(f">{arr.ndim}I", *arr.shape)
                (fm / f"{prefix}-{kind}.gz").write_bytes(gzip.compress(head + arr.tobytes(), 1))
    tiny = root / "tiny-imagenet-200"
    if not tiny.is_dir():
        wnids = [f"n{i:08d}" for i in range(200)]
        (tiny / "val" / "images").mkdir(parents=True)
        (tiny / "wnids.txt").write_text("\n".join(wnids) + "\n")
        lines = []
        for c, w in enumerate(wnids):
            folder = tiny / "train" / w / "images"
            folder.mkdir(parents=True)
            for i in range(500):
                Image.fromarray(rng.integers(0, 256, (64, 64, 3), dtype=np.uint8)).save(folder / f"{w}_{i}.JPEG")
            for i in range(50):
                name = f"val_{c * 50 + i}.JPEG"
                Image.fromarray(rng.integers(0, 256, (64, 64, 3), dtype=np.uint8)).save(tiny / "val" / "images" / name)
                lines.append(f"{name}\t{w}\t0\t0\t63\t63")
        (tiny / "val" / "val_annotations.txt").write_text("\n".join(lines) + "\n")


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--data-root", default="", help="where the datasets are (nothing is downloaded)")
    p.add_argument("--synthetic", default="", help="write official-format files of the real sizes here and use them")
    p.add_argument("--mnist-root", default="", help="MNIST's IDX files for rotated_mnist (default: --data-root)")
    p.add_argument("--device", default="cpu")
    p.add_argument("--steps", type=int, default=20, help="training steps timed per scenario")
    p.add_argument("--only", default="", help="comma-separated scenario names")
    a = p.parse_args(argv)
    root = a.synthetic or a.data_root
    if not root:
        p.error("give --data-root or --synthetic")
    if a.synthetic:
        start = time.perf_counter()
        synthesize(Path(a.synthetic))
        print(f"synthetic data ready in {Path(a.synthetic)} ({time.perf_counter() - start:.0f} s)")
    cases = [c for c in CASES if not a.only or c[0] in a.only.split(",")]
    SCENARIOS.names()   # imports every scenario module now, not inside the first timing
    print(f"{'scenario':18s} {'read (s)':>9s} {'epoch (s)':>10s} {'read/epoch':>10s} {'images MB':>10s}  note")
    for name, options in cases:
        where = (a.mnist_root or a.data_root) if name == "rotated_mnist" else root
        if not where:
            print(f"{name:18s} skipped: give --mnist-root (official MNIST IDX files)")
            continue
        reads, decoded = [], None
        if name in IDX_FOLDERS:
            decoded = data.idx_paths(where, IDX_FOLDERS[name])[0].parent / datasets.DECODED
            shutil.rmtree(decoded, ignore_errors=True)
        for attempt in range(2 if name == "seq_tinyimagenet" or decoded else 1):
            clear_caches()
            start = time.perf_counter()
            scenario, _ = build(name, options, where, a.device)
            reads.append(time.perf_counter() - start)
        epoch, steps = epoch_seconds(scenario, a.device, a.steps)
        note = f"epoch = {steps} steps, from {a.steps} timed"
        if len(reads) == 2:
            note += f"; first read ({'inflating the IDX files' if decoded else 'JPEG decoding'}) {reads[0]:.2f} s"
        if decoded and not decoded.is_dir():
            note += " (folder read-only: inflated every run)"
        mb = scenario.info["image_bytes"] / 2 ** 20
        print(f"{name:18s} {reads[-1]:9.2f} {epoch:10.1f} {reads[-1] / epoch:10.3f} {mb:10.1f}  {note}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
