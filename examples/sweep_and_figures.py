"""A sweep and its figures from Python: naive, EWC and ER over three seeds on class-IL split digits,
run on a local Ray, then the report (tables and paper-size figures) and a figure of your own from
the report's results.csv.

    python examples/sweep_and_figures.py [--epochs 2] [--seeds 0,1,2] [--out sweeps]

The same as `clsim sweep SPEC.yaml`; running it again skips every finished trial.
"""
import argparse
import csv
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import yaml  # noqa: E402

from clsim.report import write_report  # noqa: E402
from clsim.sweep import sweep  # noqa: E402


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--epochs", type=int, default=2)
    p.add_argument("--seeds", default="0,1,2")
    p.add_argument("--out", default="sweeps")
    args = p.parse_args()

    spec = {"name": "example_digits",
            "base": {"scenario": "split_digits", "setting": "class_il", "epochs": args.epochs},
            "grid": {"strategy": ["naive", "ewc", "er"], "seed": [int(s) for s in args.seeds.split(",")]},
            "threads": 1}
    Path(args.out).mkdir(parents=True, exist_ok=True)
    spec_path = Path(args.out) / "example_digits.yaml"
    spec_path.write_text(yaml.safe_dump(spec, sort_keys=False))
    sweep_dir, failed = sweep(str(spec_path), args.out)
    report = write_report([str(sweep_dir / "trials")], sweep_dir / "report")
    print(f"{failed} failed trials; report: {report}")
    for figure in sorted(report.parent.glob("*.png")):
        print(f"  figure: {figure}")

    # A figure of your own: final ACC of every run, one column per strategy.
    with open(report.parent / "results.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    groups = sorted({r["group"] for r in rows})   # here the strategy names
    fig, ax = plt.subplots(figsize=(3.5, 2.5))
    for i, name in enumerate(groups):
        accs = [float(r["acc"]) for r in rows if r["group"] == name]
        ax.scatter([i] * len(accs), accs)
    ax.set_xticks(range(len(groups)), groups)
    ax.set_ylabel("final ACC (%)")
    fig.tight_layout()
    fig.savefig(sweep_dir / "final_acc.png", dpi=200)
    print(f"  figure: {sweep_dir / 'final_acc.png'}")


if __name__ == "__main__":
    main()
