"""Reproduce published table rows: run presets over several seeds and print the measured figure
beside the published one and its source.

    python bench/reproduce.py --preset blip-mnist5 --preset vdv-splitmnist-task-ewc \\
        --budget 0.1 --seeds 0,1,2 --data-root ../shared/data/mnist
    python bench/reproduce.py --match vdv-splitmnist-task --budget 1 --device cuda   # full protocol

--budget b scales a preset for a small machine: epochs per task become max(1, round(b * epochs))
(for a plateau schedule that is the most a task may take) and, below 1, the training set keeps
round(b * N) images per class of the N a class has (the first ones in file order) and the test
set max(100, round(b * 1000)) per class. A memory counted in examples (replay buffer, GEM/A-GEM,
iCaRL and GDumb memories) becomes max(1, round(b * size)), so it holds the same share of the
training stream as published: an unscaled buffer of 500 would hold a third of a budget-0.03 split
CIFAR-10 stream (published: 1%), a regime closer to joint training than to the paper's. b = 1 runs
the published protocol unchanged. Every run is an ordinary clsim run (--preset NAME --seed S plus
the budget's flags); the table says which. Schedules counted in epochs that cannot act at the
scaled epochs (SparCL's mask updates and data removal) are named on a `budget:` line and in
OUT/reproduce.json ("budget_notes"), where all results also go. A class_il preset's runs also
record their task-aware ACC (the same model with the task identity given at test time), printed on
a `task-aware:` line beside the paper's Task-IL column where the preset gives it
(`published_task_il`).
"""
from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from clsim import Experiment, presets  # noqa: E402
from clsim.cli import from_argv  # noqa: E402
from clsim.download import default_data_root  # noqa: E402
from clsim.errors import UserError  # noqa: E402


MEMORY_OPTIONS = ("replay_size", "gem_memory", "icarl_memory", "gdumb_memory")   # sizes in examples


def scaled_epochs(preset: presets.Preset, budget: float) -> int:
    epochs = int(preset.options.get("epochs", 1))
    return epochs if budget >= 1 else max(1, round(budget * epochs))


def budget_flags(preset: presets.Preset, budget: float) -> list[str]:
    """The flags that scale `preset` to `budget` (none at 1)."""
    if budget >= 1:
        return []
    flags = ["--epochs", str(scaled_epochs(preset, budget))]
    flags += ["--train-per-class", str(max(1, round(budget * preset.train_per_class))),
              "--test-per-class", str(max(100, round(budget * 1000)))]
    if "pretrain_epochs" in preset.options:   # van de Ven's CIFAR-10 pre-training, scaled alike
        flags += ["--pretrain-epochs", str(max(1, round(budget * int(preset.options["pretrain_epochs"])))),
                  "--pretrain-per-class", str(max(1, round(budget * 5000)))]
    for name in MEMORY_OPTIONS:
        if name in preset.options:
            flags += ["--" + name.replace("_", "-"), str(max(1, round(budget * int(preset.options[name]))))]
    return flags


def budget_notes(preset: presets.Preset, budget: float) -> list[str]:
    """What of the preset's epoch-counted schedules cannot act at the budget's epochs per task."""
    o, epochs, notes = preset.options, scaled_epochs(preset, budget), []
    if o.get("strategy") == "sparcl":
        every = int(o.get("sparcl_update_every", 5))
        if epochs <= every:
            notes.append(f"SparCL masks: one update per task, at its start, without regrowth "
                         f"(every {every} epochs, {epochs} a task)")
        remove_every, rounds = int(o.get("sparcl_remove_every", 5)), int(o.get("sparcl_remove_rounds", 4))
        acted = min(rounds, (epochs - 1) // remove_every)
        if float(o.get("sparcl_remove", 0)) > 0 and acted < rounds:
            notes.append(f"SparCL data removal: {acted} of {rounds} rounds "
                         f"(every {remove_every} epochs, {epochs} a task)")
    return notes


def run_preset(preset: presets.Preset, seed: int, budget: float, common: list[str], out: Path) -> dict:
    argv = ["--preset", preset.name, "--seed", str(seed), *budget_flags(preset, budget), *common,
            "--out", str(out), "--checkpoint", "false", "--progress", "false"]
    start = time.perf_counter()
    summary = from_argv(argv).run().summary
    aware = summary.get("task_aware")   # class_il runs only
    return {"seed": seed, preset.metric: summary[preset.metric], "bwt": summary["bwt"],
            **({} if aware is None else {"task_aware_acc": aware["acc"]}),
            "seconds": time.perf_counter() - start, "argv": argv[:-6]}


def mean_sd(values: list[float]) -> str:
    if len(values) == 1:
        return f"{values[0]:.2f}"
    return f"{statistics.mean(values):.2f} ± {statistics.stdev(values):.2f}"


def comparison(values: list[float], published: float | None) -> dict:
    """Mean and sd of the measured values, and their gap to the published figure (None: not read)."""
    mean = statistics.mean(values)
    return {"published": published, "mean": mean, "sd": statistics.stdev(values) if len(values) > 1 else 0.0,
            "gap": None if published is None else mean - published}


def task_aware_line(values: list[float], figures: dict) -> str:
    """The task-aware ACC measured beside the paper's Task-IL figure (`figures`: its `comparison`)."""
    published = figures["published"]
    paper = "not given" if published is None else f"{published:.2f}"
    gap = "" if published is None else f", gap {figures['gap']:+.2f}"
    return f"  task-aware: measured {mean_sd(values)}, published Task-IL {paper}{gap}"


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--preset", action="append", default=[], help="a preset name (repeatable)")
    p.add_argument("--match", default="", help="every preset whose name starts with this")
    p.add_argument("--budget", type=float, default=0.1, help="share of the epochs and data (1: the full protocol)")
    p.add_argument("--seeds", default="0,1,2")
    p.add_argument("--data-root", default=default_data_root(), help="where datasets are, or are downloaded to")
    p.add_argument("--device", default="cpu")
    p.add_argument("--out", default="", help="directory for the runs and reproduce.json (default: a temporary one)")
    a = p.parse_args(argv)
    if not 0 < a.budget <= 1:
        p.error("--budget must be in (0, 1]")
    shipped = presets.all_presets()
    names = a.preset + [n for n in shipped if a.match and n.startswith(a.match) and n not in a.preset]
    unknown = [n for n in names if n not in shipped]
    if not names or unknown:
        p.error(f"name presets with --preset or --match (unknown: {unknown}); see run_scenario.py --list")
    seeds = [int(s) for s in a.seeds.split(",")]
    out = Path(a.out or tempfile.mkdtemp(prefix="clsim-reproduce-"))
    common = ["--data-root", a.data_root, "--device", a.device]
    results = []
    print(f"budget {a.budget:g} (epochs and training data scaled; see --help), seeds {seeds}, device {a.device}")
    print(f"{'preset':34s} {'published':>9s} {'measured':>16s} {'gap':>7s}  s/run  source")
    for name in names:
        preset = shipped[name]
        try:
            runs = [run_preset(preset, seed, a.budget, common, out / name) for seed in seeds]
        except UserError as exc:
            print(f"error: {name}: {exc}", file=sys.stderr)
            return 2
        values = [r[preset.metric] for r in runs]
        figures = comparison(values, preset.published)
        published = "not read" if preset.published is None else f"{preset.published:.2f}"
        gap = "" if preset.published is None else f"{figures['gap']:+.2f}"
        seconds = statistics.mean(r["seconds"] for r in runs)
        print(f"{name:34s} {published:>9s} {mean_sd(values):>16s} {gap:>7s} {seconds:6.0f}  "
              f"{preset.paper.split(',')[0]}, {preset.table}", flush=True)
        aware = [r["task_aware_acc"] for r in runs if "task_aware_acc" in r]   # class_il runs only
        task_il = comparison(aware, preset.published_task_il) if aware else None
        if task_il is not None:
            print(task_aware_line(aware, task_il), flush=True)
        for note in budget_notes(preset, a.budget):
            print(f"  budget: {note}", flush=True)
        results.append({"preset": name, "paper": preset.paper, "table": preset.table, "metric": preset.metric,
                        "published": preset.published, "budget": a.budget, "seeds": seeds,
                        "budget_flags": budget_flags(preset, a.budget),
                        "budget_notes": budget_notes(preset, a.budget), "runs": runs,
                        "mean": figures["mean"], "sd": figures["sd"],
                        **({} if task_il is None else {"task_aware": task_il})})
    (out / "reproduce.json").write_text(json.dumps(results, indent=2))
    print(f"results: {out / 'reproduce.json'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
