"""DPlis's own training script beside clsim's DPlis (preset dplis-mnist-smallcnn): the same small
CNN, MNIST images, σ, C, K, radius and steps; test accuracy and ε side by side.

    python bench/dplis_authors.py PATH_TO_DPLIS_CHECKOUT --data-root ../shared/data/mnist

PATH is a checkout of github.com/wangwenxiao/DPlis (Wang et al., PETS 2021); nothing of it is
copied into this repository. Its dp_train.py (`--mode smooth_loss --model SmallCNN`) runs in a
temporary copy with only the changes in PATCHES, each saying why (a CUDA-only script on a CPU,
a seed); on today's torch (2.x) and numpy it needs no other change. Their get_data reads
torchvision's MNIST from ~/data: HOME points at a temporary directory whose IDX files hold the
preset's own training and test images, so both sides train and test on the very same images.

The same algorithm on both sides, hyper-parameters mapped:
- their update is θ -= lr·(Σ_i clip_C(Σ_k ∇ℓ(θ + u_k; x_i)) + N(0, σ²C²)); clsim's (Opacus's)
  divides the noisy sum by the expected batch B, so clsim's lr is theirs times B, and its
  perturbation std radius·lr·σ·C/B equals their radius·lr·σ·C;
- their K-sum is clsim's `--dplis-aggregate sum` (clsim's default mean is also shown);
- both Poisson-sample with q = B/N (theirs: Binomial(N, q) examples, drawn uniformly), N//B steps
  an epoch for them, round(N/B) for clsim (equal at the preset's sizes);
- the model is their SmallCNN (model/model_dptrain.py), clsim's `dplis_cnn` backbone with its head;
- ε at the same δ: theirs from their autodp RDP accountant, clsim's from its ledger (Opacus RDP);
  the table also gives clsim's accountant on each run's (q, σ, steps).
"""
from __future__ import annotations

import argparse
import os
import re
import shutil
import struct
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

PRESET = "dplis-mnist-smallcnn"     # clsim's side, and the settings both sides run with

# (file, old, new, why): the only edits made to the authors' code, in a temporary copy.
PATCHES = [
    ("dp_train.py", "device = 'cuda'",
     "device = 'cuda' if torch.cuda.is_available() else 'cpu'\n"
     "FloatTensor = torch.cuda.FloatTensor if device == 'cuda' else torch.FloatTensor",
     "the script assumes a GPU: on a machine without one it trains on the CPU"),
    ("dp_train.py", "torch.cuda.FloatTensor(", "FloatTensor(",
     "its noise and perturbations (torch.cuda.FloatTensor(size).normal_(0, s)) then come from the CPU's "
     "FloatTensor, the same draw"),
    ("dp_train.py", "args = parser.parse_args()\n",
     "args = parser.parse_args()\ntorch.manual_seed(int(os.environ['DPLIS_SEED']))\n",
     "their script draws from torch's unseeded global generator: seeded here so a run can be repeated"),
]


def patched_copy(checkout: Path, into: Path) -> Path:
    code = into / "DPlis"
    shutil.copytree(checkout, code, ignore=shutil.ignore_patterns(".git"))
    for name, old, new, _ in PATCHES:
        path = code / name
        text = path.read_text()
        if old not in text:
            raise SystemExit(f"{checkout} is not the DPlis code this bench knows: {name} has no {old!r}")
        path.write_text(text.replace(old, new))
    return code


def write_idx(path: Path, array: np.ndarray) -> None:
    with open(path, "wb") as f:
        f.write(struct.pack(">HBB", 0, 0x08, array.ndim) + struct.pack(f">{array.ndim}I", *array.shape))
        f.write(np.ascontiguousarray(array, dtype=np.uint8).tobytes())


def preset_run(args, seed: int, aggregate: str, **more):
    """clsim's experiment: the preset, with this bench's flags over it."""
    from clsim import Experiment
    return Experiment(preset=PRESET, data_root=args.data_root, seed=seed, train_per_class=args.train_per_class,
                      test_per_class=args.test_per_class, epochs=args.epochs, batch_size=args.batch_size,
                      lr=args.lr * args.batch_size, noise_multiplier=args.sigma, max_grad_norm=args.clip,
                      delta=args.delta, dplis_k=args.k, dplis_radius=args.radius, dplis_aggregate=aggregate,
                      progress=False, **more)


def write_their_mnist(args, home: Path) -> int:
    """The preset's training and test images (pixels in [0, 1] back to bytes, exactly) as the IDX
    files torchvision's MNIST reads from ~/data/MNIST/raw; returns the number of training images."""
    task = preset_run(args, 0, "sum", out=None).build().scenario.tasks[0]
    raw = home / "data" / "MNIST" / "raw"
    raw.mkdir(parents=True)
    for prefix, data in (("train", task.train), ("t10k", task.test)):
        pixels = (data.x[:, 0] * 255).round().numpy()
        write_idx(raw / f"{prefix}-images-idx3-ubyte", pixels)
        write_idx(raw / f"{prefix}-labels-idx1-ubyte", data.y.numpy())
    return len(task.train)


def run_authors(code: Path, home: Path, args, seed: int, n_train: int) -> dict:
    runname = f"bench_seed{seed}"
    argv = [sys.executable, "dp_train.py", "--data", "MNIST", "--model", "SmallCNN", "--mode", "smooth_loss",
            "--batch_size", str(args.batch_size), "--max_epoch", str(args.epochs), "--lr", str(args.lr),
            "--noise_multiplier", str(args.sigma), "--g_clip", str(args.clip), "--delta", str(args.delta),
            "--smooth_loss_samples", str(args.k), "--smooth_loss_radius", str(args.radius), "--n_worker", "0",
            "--runname", runname]
    env = {**os.environ, "HOME": str(home), "DPLIS_SEED": str(seed), "OMP_NUM_THREADS": "1"}
    subprocess.run(argv, cwd=code, env=env, check=True, stdout=subprocess.DEVNULL)
    last = (code / "log" / f"log_{runname}.txt").read_text().strip().splitlines()[-1]
    match = re.search(r"\[eps: ([\d.]+)\]\[Loss_test: [\d.]+\]\[Acc_test: ([\d.]+)\]", last)
    return {"acc": 100 * float(match.group(2)), "epsilon": float(match.group(1)),
            "steps": args.epochs * (n_train // args.batch_size), "q": args.batch_size / n_train}


def run_clsim(args, seed: int, aggregate: str) -> dict:
    summary = preset_run(args, seed, aggregate, out=None).run().summary
    (access,) = next(iter(summary["privacy"]["datasets"].values()))["accesses"]
    return {"acc": summary["acc"], "epsilon": summary["privacy"]["epsilon_worst"], "steps": access["steps"],
            "q": access["sample_rate"]}


def main():
    from clsim import presets
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("checkout", help="a checkout of github.com/wangwenxiao/DPlis")
    parser.add_argument("--data-root", default=str(Path(__file__).resolve().parent.parent.parent / "shared" / "data" / "mnist"))
    o = presets.get(PRESET).options
    parser.add_argument("--train-per-class", type=int, default=o["train_per_class"])
    parser.add_argument("--test-per-class", type=int, default=o["test_per_class"])
    parser.add_argument("--batch-size", type=int, default=o["batch_size"])
    parser.add_argument("--epochs", type=int, default=o["epochs"])
    parser.add_argument("--lr", type=float, default=o["lr"] / o["batch_size"],
                        help="theirs (on the noisy sum); clsim's is lr x batch")
    parser.add_argument("--sigma", type=float, default=o["noise_multiplier"])
    parser.add_argument("--clip", type=float, default=o["max_grad_norm"])
    parser.add_argument("--k", type=int, default=o["dplis_k"])
    parser.add_argument("--radius", type=float, default=o["dplis_radius"])
    parser.add_argument("--delta", type=float, default=o["delta"])
    parser.add_argument("--seeds", default="0,1")
    args = parser.parse_args()
    import torch
    torch.set_num_threads(1)
    print(f"preset {PRESET}: MNIST, first {args.train_per_class} train / {args.test_per_class} test images per class, "
          f"SmallCNN, batch {args.batch_size}, "
          f"{args.epochs} epochs, lr {args.lr} (theirs; clsim {args.lr * args.batch_size:g}), σ {args.sigma}, "
          f"C {args.clip}, K {args.k}, radius {args.radius}, δ {args.delta:g}")
    print("changes made to the authors' code:")
    for name, old, _, why in PATCHES:
        print(f"  {name}: {old.strip()[:60]!r}: {why}")
    from clsim.privacy import accounting
    print("ε: each side's own accountant; ε clsim: clsim's accountant on that run's (q, σ, steps)")
    print(f"{'run':34} {'seed':>4} {'test acc %':>10} {'steps':>5} {'ε':>7} {'ε clsim':>7} {'time s':>7}", flush=True)
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        code = patched_copy(Path(args.checkout), tmp)
        n_train = write_their_mnist(args, tmp / "home")
        for seed in map(int, args.seeds.split(",")):
            for name, run in (("authors' dp_train.py (smooth_loss)", lambda: run_authors(code, tmp / "home", args, seed, n_train)),
                              ("clsim dplis --dplis-aggregate sum", lambda: run_clsim(args, seed, "sum")),
                              ("clsim dplis (mean, default)", lambda: run_clsim(args, seed, "mean"))):
                t0 = time.perf_counter()
                row = run()
                ours = accounting.epsilon([accounting.gaussian(row["q"], args.sigma, row["steps"])], args.delta)
                print(f"{name:34} {seed:4d} {row['acc']:10.2f} {row['steps']:5d} {row['epsilon']:7.3f} {ours:7.3f} "
                      f"{time.perf_counter() - t0:7.0f}", flush=True)


if __name__ == "__main__":
    main()
