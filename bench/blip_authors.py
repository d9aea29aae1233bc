"""BLIP (Shi et al., CVPR 2021) on MNIST-5: the authors' own code beside clsim's blip-mnist5.

    python bench/blip_authors.py --repo CLONE --data-root ../shared/data/mnist --budget 0.2 \\
        --seeds 0,1,2 --workdir DIR [--only authors|clsim]

CLONE is a git clone (bare or not) of github.com/Yujun-Shi/BLIP; nothing of it is copied into
clsim. Its ImageClassification/src at COMMIT is extracted into DIR and run as run_blip.py with the
flags the preset follows (--experiment mnist5 --lr 0.01 --sbatch 64 --F-prior 1e-15, --nepochs
the budget's), one thread, through a small driver that changes only this, nothing in their files:
  1. --device cpu (their default is cuda:0) and --data_path DIR/data, where the official gzipped
     IDX files of --data-root are un-gzipped into torchvision's MNIST layout (MNIST/raw/<name>;
     with the files present their download=True never downloads).
  2. The budget, as bench/reproduce.py scales the preset (budget 1: nothing): their mnist5 loader's
     output keeps the first round(b·6000) training and max(100, round(b·1000)) test images of each
     digit in file order (the validation set stays a copy of the training set, as in their loader),
     and --nepochs is max(1, round(b·200)), the most their plateau rule lets a task train.
  3. Their estimate_fisher asserts 80 batches of 100 examples (8,000) per task; a budget task has
     fewer, so it gets min(80, N // 100) batches (clsim: min(8000, N) examples). At budget 1 (about
     12,000 images a task) nothing changes.
The final accuracy matrix is read from the file their run saves (CHECKPOINT/mnist5_blip_SEED.txt);
ACC is its last row's mean, BWT as their print_log_acc_bwt computes it. clsim's side is
`run_scenario.py --preset blip-mnist5 --seed S` with the same budget flags (bench/reproduce.py).
Results go to DIR/results-*.json as they come (a rerun skips what any of them holds, so one
process per seed may share DIR).
"""
from __future__ import annotations

import argparse
import io
import os
import subprocess
import sys
import tarfile
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "bench"))
from clsim import presets  # noqa: E402
from authors_runs import Results, mean_sd, torchvision_mnist  # noqa: E402
from reproduce import budget_flags, run_preset  # noqa: E402

COMMIT = "c09814d"   # the repository's head when this was written ("fix quant layer bugs" is 572d0c1)
PRESET = "blip-mnist5"

DRIVER = """
import sys
import torch
torch.set_num_threads(1)
train_per_class, test_per_class = int(sys.argv[1]), int(sys.argv[2])
import dataloaders.mnist5 as loader
import approaches.blip_utils as blip_utils
their_get, their_fisher = loader.get, blip_utils.estimate_fisher

def first_per_class(part, k):
    if k == 0:
        return part
    keep = torch.cat([torch.nonzero(part['y'] == c).squeeze(1)[:k] for c in part['y'].unique()]).sort().values
    return {'x': part['x'][keep], 'y': part['y'][keep]}

def get(data_path, seed, **kwargs):
    data, taskcla, size = their_get(data_path, seed, **kwargs)
    for t, _ in taskcla:
        data[t]['train'] = first_per_class(data[t]['train'], train_per_class)
        data[t]['test'] = first_per_class(data[t]['test'], test_per_class)
        data[t]['valid'] = {k: v.clone() for k, v in data[t]['train'].items()}
    return data, taskcla, size

def estimate_fisher(task, device, net, x, y, batch_size=100, num_batch=80, num_round=1):
    return their_fisher(task, device, net, x, y, batch_size, min(num_batch, x.size(0) // batch_size), num_round)

loader.get, blip_utils.estimate_fisher = get, estimate_fisher
import run_blip
sys.argv = ['run_blip.py', *sys.argv[3:]]
run_blip.main()
"""


def extract(clone: Path, workdir: Path) -> Path:
    src = workdir / "code" / "ImageClassification" / "src"
    if not (src / "run_blip.py").exists():
        archive = subprocess.run(["git", "-C", str(clone), "archive", COMMIT, "ImageClassification"], check=True,
                                 capture_output=True).stdout
        tarfile.open(fileobj=io.BytesIO(archive)).extractall(workdir / "code", filter="data")
    return src


def flag(flags: list[str], name: str, default: int) -> int:
    return int(flags[flags.index(name) + 1]) if name in flags else default


def run_theirs(src: Path, data: Path, seed: int, budget: float, workdir: Path) -> dict:
    preset = presets.all_presets()[PRESET]
    flags = budget_flags(preset, budget)
    epochs = flag(flags, "--epochs", int(preset.options["epochs"]))
    checkpoints = workdir / f"checkpoints-budget{budget:g}-seed{seed}"
    args = ["--experiment", "mnist5", "--lr", "0.01", "--sbatch", "64", "--F-prior", "1e-15", "--nepochs", str(epochs),
            "--seed", str(seed), "--device", "cpu", "--data_path", str(data), "--checkpoint_dir", str(checkpoints)]
    cmd = [sys.executable, "-c", DRIVER, str(flag(flags, "--train-per-class", 0)),
           str(flag(flags, "--test-per-class", 0)), *args]
    log = workdir / f"authors-budget{budget:g}-seed{seed}.log"
    with open(log, "w") as f:
        subprocess.run(cmd, cwd=src, check=True, stdout=f, stderr=subprocess.STDOUT,
                       env={**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"})
    acc = np.loadtxt(checkpoints / "mnist5_blip" / f"mnist5_blip_{seed}.txt")
    return {"acc": 100 * float(acc[-1].mean()), "bwt": 100 * float((acc[-1] - np.diag(acc)).mean()),
            "matrix": (100 * acc).round(2).tolist(), "command": "run_blip.py " + " ".join(args[:-4])}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--repo", required=True, type=Path, help="a git clone of Yujun-Shi/BLIP")
    p.add_argument("--data-root", required=True, type=Path, help="official gzipped MNIST IDX files")
    p.add_argument("--budget", type=float, default=0.2)
    p.add_argument("--seeds", default="0,1,2")
    p.add_argument("--workdir", required=True, type=Path)
    p.add_argument("--only", choices=("authors", "clsim", "table"), default=None,
                   help="run one side only (two processes can share DIR), or just print the table")
    a = p.parse_args(argv)
    if not 0 < a.budget <= 1:
        p.error("--budget must be in (0, 1]")
    seeds = [int(s) for s in a.seeds.split(",")]
    a.workdir.mkdir(parents=True, exist_ok=True)
    results = Results(a.workdir, f"{a.only or 'both'}-{a.budget:g}-{a.seeds}")
    record = results.record
    import torch
    torch.set_num_threads(1)

    for seed in seeds:
        if a.only in (None, "authors"):
            src, data = extract(a.repo, a.workdir), torchvision_mnist(a.data_root, a.workdir / "data")
            record(f"authors/{a.budget:g}/{seed}", lambda: run_theirs(src, data, seed, a.budget, a.workdir))
        if a.only in (None, "clsim"):
            def clsim_run():
                r = run_preset(presets.all_presets()[PRESET], seed, a.budget, ["--data-root", str(a.data_root)],
                               a.workdir / "clsim-runs")
                return {"acc": r["acc"], "bwt": r["bwt"], "command": " ".join(r["argv"])}
            record(f"clsim/{a.budget:g}/{seed}", clsim_run)
    done = results.all()
    print(f"\nMNIST-5 (task_il, a head per task), BLIP, budget {a.budget:g} "
          f"({' '.join(budget_flags(presets.all_presets()[PRESET], a.budget)) or 'the full protocol'})")
    print(f"{'seed':>4s} {'authors ACC':>11s} {'BWT':>6s} {'clsim ACC':>10s} {'BWT':>6s}")
    cols = {"authors": [], "clsim": []}
    for seed in seeds:
        cells = []
        for side in cols:
            r = done.get(f"{side}/{a.budget:g}/{seed}")
            if r:
                cols[side].append(r["acc"])
            cells += ["-", "-"] if r is None else [f"{r['acc']:.2f}", f"{r['bwt']:+.2f}"]
        print(f"{seed:4d} {cells[0]:>11s} {cells[1]:>6s} {cells[2]:>10s} {cells[3]:>6s}")
    print(f"{'mean':>4s} {mean_sd(cols['authors']):>18s} {mean_sd(cols['clsim']):>17s}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
