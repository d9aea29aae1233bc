"""van de Ven & Tolias (2019), split MNIST Domain-IL: the authors' own code beside clsim's presets.

    python bench/vdv_authors.py --repo CLONE --data-root ../shared/data/mnist --seeds 0,1,2 \\
        --methods none,lwf --workdir DIR [--only authors|clsim]

CLONE is a git clone (bare or not) of github.com/GMvandeVen/continual-learning; nothing of it is
copied into clsim. The script extracts with `git archive` into DIR:
  apr2019  d326f96 (25 Apr 2019): the code of the paper's table (arXiv v1, 15 Apr 2019; this
           commit only fixes iCaRL's exemplars over the 17 Apr upload). LwF's distillation is a
           mean over classes and batch.
  dec2019  9945f84 (19 Dec 2019): commit f0b1461 ("default (hyper)parameter-values") and its fix,
           whose settings the presets follow; the distillation is summed over classes (26f00db).
and applies only what old code needs on today's torch/torchvision, nothing else:
  1. `visdom` (a plotting server, used only with --visdom) is replaced by a stand-in module that
     raises if it is ever constructed.
  2. apr2019: reduction='elementwise_mean' -> 'mean' in encoder.py (the name torch 1.0 gave it;
     later releases refuse the old one).
  3. Data: torchvision's MNIST reads DIR/data/mnist/MNIST/raw/<name> (un-gzipped IDX), so the
     official gzipped files of --data-root are un-gzipped there (with the files present it never
     downloads).
Their runs: `main.py --experiment splitMNIST --scenario domain --seed S --no-gpus` (their defaults:
2000 iterations a task, Adam lr 0.001 for the whole run, batch 128, MLP 784-400-400), LwF adding
`--replay current --distill` (T 2). The final average precision over the 5 tasks is read from
their printout.

Their split: seed 0 keeps digits in order (0/1, 2/3, ...); every other seed pairs digits at
random (np.random.permutation(10) right after np.random.seed(seed)), and the paper's _compare.py
starts at seed 1, so all 20 runs behind the table had random pairings. The presets draw the same
pairing from --seed (class_order vandeven); before each seed the script checks with their own
data code that it is the one their run uses.

Results go to DIR/results-*.json as they come (a rerun skips what any of them holds, so one
process per seed may share DIR); the table is printed from all of them at the end.
"""
from __future__ import annotations

import argparse
import io
import os
import re
import subprocess
import sys
import tarfile
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "bench"))
from clsim import presets  # noqa: E402
from clsim.data import vandeven_order  # noqa: E402
from authors_runs import Results, mean_sd, torchvision_mnist  # noqa: E402
from reproduce import run_preset  # noqa: E402

COMMITS = {"apr2019": "d326f96", "dec2019": "9945f84"}
# method -> (their code, their flags, clsim preset, clsim overrides)
METHODS = {
    "none": ("apr2019", [], "vdv-splitmnist-domain-none", []),
    "lwf": ("apr2019", ["--replay", "current", "--distill"], "vdv-splitmnist-domain-lwf", []),
    "lwf-summed": ("dec2019", ["--replay", "current", "--distill"], "vdv-splitmnist-domain-lwf",
                   ["--lwf-per-class", "false"]),
}
VISDOM_STAND_IN = ('class Visdom:\n    def __init__(self, *args, **kwargs):\n'
                   '        raise RuntimeError("visdom stand-in: no plotting server in this comparison")\n')


def extract(clone: Path, name: str, workdir: Path) -> Path:
    """Their code at commit COMMITS[name] under workdir/name, with the listed compatibility changes."""
    code = workdir / name
    if not (code / "main.py").exists():
        archive = subprocess.run(["git", "-C", str(clone), "archive", COMMITS[name]], check=True,
                                 capture_output=True).stdout
        code.mkdir(parents=True, exist_ok=True)
        tarfile.open(fileobj=io.BytesIO(archive)).extractall(code, filter="data")
        (code / "visdom.py").write_text(VISDOM_STAND_IN)
        encoder = code / "encoder.py"
        encoder.write_text(encoder.read_text().replace("reduction='elementwise_mean'", "reduction='mean'"))
    return code


CHECK_ORDER = """
import sys, numpy as np, torch
from data import get_multitask_experiment
seed = int(sys.argv[2]); np.random.seed(seed); torch.manual_seed(seed)
(train, test), _, _ = get_multitask_experiment('splitMNIST', 'domain', 5, data_dir=sys.argv[1],
                                                exception=seed == 0)
digits = []
for t in train:   # a task's digits ordered by the label their target_transform gives them
    ds = t.dataset
    here = sorted(set(ds.targets[t.sub_indeces].tolist()))
    digits += sorted(here, key=lambda d: ds.target_transform(d))
print(','.join(map(str, digits)))
"""


def check_order(code: Path, data: Path, seed: int) -> None:
    """Their own data code at `seed` must put the digits in the preset's order (0/1 within a task)."""
    out = subprocess.run([sys.executable, "-c", CHECK_ORDER, str(data), str(seed)], cwd=code, check=True,
                         capture_output=True, text=True, env={**os.environ, "OMP_NUM_THREADS": "1"}).stdout
    got = [int(d) for d in out.strip().splitlines()[-1].split(",")]
    if got != vandeven_order(seed, 10):
        raise SystemExit(f"seed {seed}: their code pairs digits {got}, clsim's preset {vandeven_order(seed, 10)}")


def run_theirs(code: Path, data: Path, seed: int, flags: list[str], log: Path) -> dict:
    cmd = [sys.executable, "main.py", "--experiment", "splitMNIST", "--scenario", "domain", "--seed", str(seed),
           "--no-gpus", "--data-dir", str(data), "--results-dir", str(log.parent / "results"), *flags]
    with open(log, "w") as f:
        subprocess.run(cmd, cwd=code, check=True, stdout=f, stderr=subprocess.DEVNULL,
                       env={**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"})
    text = log.read_text()
    tasks = [100 * float(v) for v in re.findall(r" - Task \d+: ([0-9.]+)", text)]
    acc = 100 * float(re.search(r"average precision over all \d+ tasks: ([0-9.]+)", text).group(1))
    return {"acc": acc, "tasks": tasks, "command": " ".join(cmd[1:])}


def run_clsim(preset: str, seed: int, data_root: Path, extra: list[str], workdir: Path) -> dict:
    r = run_preset(presets.all_presets()[preset], seed, 1.0, ["--data-root", str(data_root), *extra],
                   workdir / "clsim-runs")
    return {"acc": r["acc"], "bwt": r["bwt"], "command": " ".join(r["argv"])}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--repo", required=True, type=Path, help="a git clone of GMvandeVen/continual-learning")
    p.add_argument("--data-root", required=True, type=Path, help="official gzipped MNIST IDX files")
    p.add_argument("--seeds", default="0,1,2")
    p.add_argument("--methods", default="none,lwf", help=f"comma-separated, of {', '.join(METHODS)}")
    p.add_argument("--workdir", required=True, type=Path)
    p.add_argument("--only", choices=("authors", "clsim", "table"), default=None,
                   help="run one side only (two processes can share DIR), or just print the table")
    a = p.parse_args(argv)
    seeds, methods = [int(s) for s in a.seeds.split(",")], a.methods.split(",")
    if unknown := [m for m in methods if m not in METHODS]:
        p.error(f"unknown methods {unknown}; choose from {list(METHODS)}")
    a.workdir.mkdir(parents=True, exist_ok=True)
    results = Results(a.workdir, f"{a.only or 'both'}-{a.methods}-{a.seeds}")
    record = results.record
    torch_threads_one()
    data = torchvision_mnist(a.data_root, a.workdir / "data" / "mnist").parent
    for method in methods:
        version, flags, preset, overrides = METHODS[method]
        for seed in seeds:
            if a.only in (None, "authors"):
                code = extract(a.repo, version, a.workdir)
                check_order(code, data, seed)
                log = a.workdir / "logs" / f"{method}-seed{seed}.txt"
                log.parent.mkdir(exist_ok=True)
                record(f"authors/{method}/{seed}", lambda: run_theirs(code, data, seed, flags, log))
            if a.only in (None, "clsim"):
                record(f"clsim/{method}/{seed}", lambda: run_clsim(preset, seed, a.data_root, overrides, a.workdir))
    print_table(results.all(), methods, seeds)
    return 0


def torch_threads_one() -> None:
    import torch
    torch.set_num_threads(1)


def print_table(merged: dict, methods: list[str], seeds: list[int]) -> None:
    print(f"\nsplit MNIST Domain-IL, full budget; ACC (%) per seed; digit pairs: their code's for that seed")
    print(f"{'method':11s} {'seed':>4s} {'digits in task order':21s} {'authors':>13s} {'clsim preset':>13s}")
    for method in methods:
        cols = {k: [] for k in ("authors", "clsim")}
        for seed in seeds:
            row = {k: merged.get(f"{k}/{method}/{seed}", {}).get("acc") for k in cols}
            for k, v in row.items():
                if v is not None:
                    cols[k].append(v)
            cells = ["-" if v is None else f"{v:.2f}" for v in row.values()]
            print(f"{method:11s} {seed:4d} {''.join(map(str, vandeven_order(seed, 10))):21s} {cells[0]:>13s} "
                  f"{cells[1]:>13s}")
        print(f"{method:11s} {'mean':>4s} {'':21s} {mean_sd(cols['authors']):>13s} {mean_sd(cols['clsim']):>13s}")


if __name__ == "__main__":
    sys.exit(main())
