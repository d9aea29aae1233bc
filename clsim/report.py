"""`clsim report DIR...`: many runs, one table, the figures a paper needs.

A run is a directory holding `summary.json` (and `log.jsonl`, whose task records give the
figures after every task). Runs are grouped by everything in their hparams but the seed; each
group gives one row of mean ± sd over its seeds. Written: `results.csv` (one row per run, every
summary figure), `summary.csv` (mean, sd, n per group and figure; no sd for one run),
`report.md` and PNG figures (also added to TensorBoard's images under `tb/`), by default into
`<DIR>/report`. A summary.json that is not a clsim run's is skipped with a warning.
"""
from __future__ import annotations

import csv
import itertools
import json
import math
import reprlib
import statistics
import sys
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from clsim.errors import UserError
from clsim.metrics import finite_number

#: figures of a whole run, in table order: (column, title in the markdown table); task-aware ACC
#: (class_il runs: the task identity given at test time) only where some run has it
HEADLINE = (("acc", "ACC"), ("task_aware_acc", "task-aware ACC"), ("bwt", "BWT"), ("forgetting", "forgetting"),
            ("fwt", "FWT"),
            ("epsilon_worst", "ε"), ("strategy_state_bytes", "strategy memory (bytes)"),
            ("wall_time_total", "time (s)"))
#: hparams that do not define a group: the runs of one group differ only in these
NOT_A_GROUP_KEY = {"seed"}


@dataclass
class Run:
    path: Path
    summary: dict
    tasks: list[dict] = field(default_factory=list)   # log.jsonl task records, in order

    @property
    def group(self) -> tuple:
        hp = self.summary.get("hparams", {})
        return tuple(sorted((k, json.dumps(v)) for k, v in hp.items() if k not in NOT_A_GROUP_KEY))

    def figures(self) -> dict[str, float]:
        """Every number summary.json holds about the run, flattened (`memory_*`, `wall_time_*`)."""
        s = self.summary
        out = {k: s[k] for k in ("acc", "bwt", "fwt", "forgetting", "steps", "examples_seen") if k in s}
        for k, v in s.get("task_aware", {}).items():   # class_il runs: task_aware_acc, _bwt, ...
            if k in ("acc", "bwt", "fwt", "forgetting"):
                out[f"task_aware_{k}"] = math.nan if v is None else v   # None: not finite (to_json)
        eps = s.get("privacy", {}).get("epsilon_worst")
        out["epsilon_worst"] = math.inf if eps is None else eps
        for section in ("memory", "wall_time"):
            for k, v in s.get(section, {}).items():
                key = k if section == "memory" else f"wall_time_{k}"
                out[key] = math.nan if v is None else v
        if self.tasks:
            for k, v in self.tasks[-1].get("strategy", {}).items():
                if isinstance(v, (int, float)) and not isinstance(v, bool):
                    out[f"strategy_{k}"] = v
        return out

    def per_task(self, key: str) -> list[float]:
        """A figure after every task: 'acc', 'epsilon' (worst ε), 'strategy_state_bytes', or a
        strategy figure such as 'blip_capacity' (NaN where a task record lacks it)."""
        out = []
        for t in self.tasks:
            if key == "acc":
                out.append(t["acc"])
            elif key == "epsilon":
                eps = t.get("privacy", {}).get("epsilon_worst")
                out.append(math.inf if eps is None else eps)
            elif key in t.get("memory", {}):
                out.append(t["memory"][key])
            else:
                v = t.get("strategy", {}).get(key)
                out.append(float(v) if isinstance(v, (int, float)) else math.nan)
        return out


def find_runs(paths: list[str]) -> list[Run]:
    """Every finished run under `paths` (a run directory, or a tree of them); hidden (partial or
    failed) directories are skipped, and so is, with a warning, a summary.json that is not a
    clsim run's (another tool's, or damaged): one such file does not refuse the others."""
    runs = []
    for p in map(Path, paths):
        if not p.exists():
            raise UserError(f"{p} does not exist; pass run directories or sweep directories")
        candidates = [p] if (p / "summary.json").is_file() else sorted(p.rglob("summary.json"))
        for c in candidates:
            run_dir = c if c.is_dir() else c.parent
            if any(part.startswith(".") for part in run_dir.relative_to(p).parts):
                continue
            run = load_run(run_dir.resolve())
            if run is not None:
                runs.append(run)
    if not runs:
        raise UserError(f"no finished run (a directory with a clsim summary.json) under {', '.join(paths)}")
    return runs


def load_run(run_dir: Path) -> Run | None:
    """The run in `run_dir`; None (said on stderr) when its summary.json is not a clsim summary.
    A log.jsonl that is not one leaves the run without its per-task figures (also said)."""
    path = run_dir / "summary.json"
    try:
        summary = json.loads(path.read_text())
        problem = summary_problem(summary)
    except OSError as exc:
        problem = f"it cannot be read ({exc.strerror})"
    except ValueError:
        problem = "it is not JSON"
    if problem:
        print(f"warning: skipped {path}: {problem}", file=sys.stderr)
        return None
    tasks, log = [], run_dir / "log.jsonl"
    if log.is_file():
        try:
            lines = log.read_text().splitlines()
        except (OSError, ValueError) as exc:
            lines, problem = [], (0, f"it cannot be read ({exc})")
        for n, line in enumerate(lines, 1):
            try:
                record = json.loads(line)
            except ValueError:
                problem = (n, "not JSON")
                break
            if isinstance(record, dict) and record.get("kind") == "task":
                why = _task_problem(record)
                if why:
                    problem = (n, why)
                    break
                tasks.append(record)
        if not problem and len(tasks) != len(summary["accuracy_matrix"]):
            problem = (len(lines), f"{len(tasks)} task records for {len(summary['accuracy_matrix'])} tasks")
        if problem:
            print(f"warning: {log} line {problem[0]}: {problem[1]}; per-task figures left out for this run",
                  file=sys.stderr)
            tasks = []
    return Run(run_dir, summary, tasks)


def _square(R) -> bool:
    return isinstance(R, list) and len(R) > 0 and \
        all(isinstance(r, list) and len(r) == len(R) and all(map(finite_number, r)) for r in R)


def _numbers_in(section, where: str, keys=None) -> str | None:
    """What is wrong with a summary's mapping of figures (None: nothing)."""
    if not isinstance(section, dict):
        return f"{where} is not a mapping"
    bad = next((k for k, v in section.items() if (keys is None or k in keys) and not (finite_number(v) or v is None)), None)
    return None if bad is None else f"{where}.{bad} is not a finite number ({reprlib.repr(section[bad])})"


def summary_problem(s) -> str | None:
    """Why `s` is not a summary.json of a finished clsim run, as far as the report reads it (None: it is)."""
    if not isinstance(s, dict):
        return f"it is not a clsim summary (a {type(s).__name__}, not a mapping)"
    if "accuracy_matrix" not in s:
        return "it is not a clsim summary (no accuracy_matrix)"
    if not _square(s["accuracy_matrix"]):
        return "accuracy_matrix is not a square matrix of scores (one row of every task's score per task)"
    for key in ("acc", "bwt", "fwt", "forgetting"):
        if not finite_number(s.get(key)):
            return f"{key} is not a finite number ({reprlib.repr(s.get(key))})"
    for key in ("scenario", "strategy", "setting"):
        if not isinstance(s.get(key), str):
            return f"{key} is not a name ({reprlib.repr(s.get(key))})"
    if not (isinstance(s.get("seed"), int) and not isinstance(s["seed"], bool)):
        return f"seed is not a whole number ({reprlib.repr(s.get('seed'))})"
    if not isinstance(s.get("hparams"), dict):
        return "hparams is not a mapping"
    for key in ("steps", "examples_seen"):
        if key in s and not finite_number(s[key]):
            return f"{key} is not a finite number ({reprlib.repr(s[key])})"
    if "task_aware" in s:
        aware = s["task_aware"]
        problem = _numbers_in(aware, "task_aware", ("acc", "bwt", "fwt", "forgetting"))
        if problem or not _square(aware.get("accuracy_matrix")):
            return problem or "task_aware.accuracy_matrix is not a square matrix of scores"
    for key in ("memory", "wall_time", "privacy"):
        problem = _numbers_in(s[key], key, ("epsilon_worst",) if key == "privacy" else None) if key in s else None
        if problem:
            return problem
    return None


def _task_problem(t: dict) -> str | None:
    """Why a log.jsonl task record cannot give per-task figures (None: it can)."""
    if not finite_number(t.get("acc")):
        return f"the task record's acc is not a finite number ({reprlib.repr(t.get('acc'))})"
    if "strategy" in t and not isinstance(t["strategy"], dict):
        return "the task record's strategy is not a mapping"
    for key in ("privacy", "memory"):
        problem = _numbers_in(t[key], key, ("epsilon_worst",) if key == "privacy" else None) if key in t else None
        if problem:
            return f"the task record's {problem}"
    return None


def group_runs(runs: list[Run]) -> dict[str, list[Run]]:
    """Runs keyed by a readable label: the strategy (with the scenario and setting where they
    differ between runs) plus every hparam that differs between groups (the seed never does)."""
    by_key: dict[tuple, list[Run]] = {}
    for r in runs:
        by_key.setdefault(r.group, []).append(r)
    varying = set()
    keys = [dict(k) for k in by_key]
    for name in set().union(*keys):
        if len({k[name] for k in keys if name in k}) > 1:
            varying.add(name)
    named = [n for n in ("scenario", "strategy", "setting")   # the strategy always; the rest if they vary
             if n == "strategy" or len({r.summary[n] for r in runs}) > 1]
    labels = {}
    for key, members in by_key.items():
        s, hp = members[0].summary, dict(key)
        base = "/".join(str(s[n]) for n in named)
        extra = [f"{n}={json.loads(hp[n])}" for n in sorted(varying - {"scenario", "strategy", "setting"})
                 if n in hp]
        label = " ".join([base, *extra])
        for n in itertools.count(2):   # groups may still read alike (one lacks an option, 1 and "1"): never merged
            if label not in labels:
                break
            label = f"{' '.join([base, *extra])} [{n}]"
        labels[label] = sorted(members, key=lambda r: r.summary.get("seed", 0))
    return dict(sorted(labels.items()))


def mean_sd(values: list[float]) -> tuple[float, float]:
    values = [v for v in values if not math.isnan(v)]
    if not values:
        return math.nan, math.nan
    if any(math.isinf(v) for v in values):
        return math.inf, math.nan
    return statistics.fmean(values), statistics.stdev(values) if len(values) > 1 else math.nan   # n = 1: no spread


def write_report(paths: list[str], out: Path | None = None) -> Path:
    """Group the runs under `paths` and write the tables and figures into `out`: by default
    `<DIR>/report` for one directory, where `clsim sweep` writes a sweep's report (several
    directories have no one place, so they need `out`)."""
    if out is None:
        if len(paths) != 1:
            raise UserError("several directories have no one report place: give --out DIR")
        out = Path(paths[0]) / "report"
    groups = group_runs(find_runs(paths))
    out.mkdir(parents=True, exist_ok=True)
    _write_results_csv(groups, out / "results.csv")
    stats = _write_summary_csv(groups, out / "summary.csv")
    figures = plot_all(groups, out)
    _write_markdown(groups, stats, figures, out / "report.md")
    _continual_world_section(groups, out)
    _figures_to_tensorboard(figures, out / "tb")
    return out / "report.md"


def _write_results_csv(groups, path: Path) -> None:
    rows = [{"group": label, "seed": r.summary.get("seed"), "run_dir": str(r.path), **r.figures()}
            for label, runs in groups.items() for r in runs]
    columns = list(dict.fromkeys(k for row in rows for k in row))
    with open(path, "w", newline="") as f:
        w = csv.DictWriter(f, columns)
        w.writeheader()
        w.writerows(rows)


def _write_summary_csv(groups, path: Path) -> dict:
    stats = {}
    for label, runs in groups.items():
        figs = [r.figures() for r in runs]
        names = list(dict.fromkeys(k for f in figs for k in f))
        stats[label] = {k: (*mean_sd([f.get(k, math.nan) for f in figs]), len(runs)) for k in names}
    with open(path, "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["group", "figure", "mean", "sd", "n"])
        for label, by_fig in stats.items():
            for name, (m, sd, n) in by_fig.items():
                w.writerow([label, name, m, "" if math.isnan(sd) else sd, n])
    return stats


def _cell(stat) -> str:
    m, sd, _ = stat
    if math.isinf(m):
        return "∞"
    if math.isnan(m):
        return "–"
    if math.isnan(sd):   # one run: a mean, not a spread of zero
        return f"{m:.2f}" if abs(m) < 1e4 else f"{m:.3g}"
    return f"{m:.2f} ± {sd:.2f}" if abs(m) < 1e4 else f"{m:.3g} ± {sd:.2g}"


def _write_markdown(groups, stats, figures: dict[str, Path], path: Path) -> None:
    runs = [r for g in groups.values() for r in g]
    common = [f"{n} {runs[0].summary[n]}" for n in ("scenario", "setting")
              if len({r.summary[n] for r in runs}) == 1]
    aware = any("task_aware_acc" in by_fig for by_fig in stats.values())
    headline = [(k, title) for k, title in HEADLINE if k != "task_aware_acc" or aware]
    lines = ["# clsim report", "",
             (f"All runs: {', '.join(common)}. " if common else "") +
             f"{len(runs)} runs in {len(groups)} groups "
             "(grouped by every option but the seed; mean ± sd over seeds, n runs).", "",
             "| group | n | " + " | ".join(title for _, title in headline) + " |",
             "|---|---|" + "---|" * len(headline)]
    for label, by_fig in stats.items():
        cells = [_cell(by_fig[k]) if k in by_fig else "–" for k, _ in headline]
        lines.append(f"| {label} | {len(groups[label])} | " + " | ".join(cells) + " |")
    lines += ["", "ε is the worst individual's ε at the run's δ (∞: some data was used without a "
              "privacy mechanism). Per-run figures: results.csv; every figure's mean, sd and n: summary.csv.",
              *(["Task-aware ACC: the same class_il model with the task identity given at test time "
                 "(outputs outside the task's classes masked; Mammoth's Task-IL column)."]
                if aware else []),
              "", "## Figures", ""]
    lines += [f"![{name}]({p.name})" for name, p in figures.items()]
    path.write_text("\n".join(lines) + "\n")


def _continual_world_section(groups, out: Path) -> None:
    """Continual World's metrics with its bootstrap CIs (clsim/rl/cw_metrics.py) for the runs that
    recorded SAC evaluation curves: appended to report.md and written to cw_metrics.json. Single-task
    `metaworld` runs are the forward-transfer references (pooled by task name), not rows."""
    from clsim.rl import cw_metrics
    references: dict[str, list[float]] = {}
    methods: dict[str, list[dict]] = {}
    for label, runs in groups.items():
        curves = [r.summary for r in runs if "evaluation_curve" in r.summary]
        if not curves:
            continue
        tasks = curves[0]["scenario_info"]["rl_protocol"]["tasks"]
        if curves[0]["scenario"] == "metaworld" and len(tasks) == 1:
            references.setdefault(tasks[0], []).extend(cw_metrics.reference_auc(s) for s in curves)
        else:
            methods[label] = curves
    if not methods:
        return
    table = cw_metrics.table(methods, references)
    (out / "cw_metrics.json").write_text(json.dumps(table, indent=1) + "\n")

    def cell(figure: dict) -> str:
        if "missing_references" in figure:
            return "no reference run of " + ", ".join(figure["missing_references"])
        lo, hi = figure["ci"]
        return f"{figure['mean']:.2f} [{lo:.2f}, {hi:.2f}]"
    lines = ["", "## Continual World metrics", "",
             "Success rates of the stochastic policy; mean over runs [90% bootstrap interval, 4000 resamples], as "
             "Continual World's results_processing computes them (clsim/rl/cw_metrics.py). Forward transfer is "
             "against single-task `metaworld:<task>` reference runs given to the same report. Meta-World 3 "
             "figures are not directly comparable with CW's published Meta-World v1 ones.", "",
             "| group | n | average performance | forgetting | forward transfer |", "|---|---|---|---|---|"]
    for label, row in table.items():
        lines.append(f"| {label} | {row['performance']['n']} | {cell(row['performance'])} | "
                     f"{cell(row['forgetting'])} | {cell(row['forward_transfer'])} |")
    with open(out / "report.md", "a") as f:
        f.write("\n".join(lines) + "\n")


# ---------------------------------------------------------------- figures

def _pyplot():
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    plt.rcParams.update({"font.size": 8, "axes.titlesize": 9, "axes.labelsize": 8, "legend.fontsize": 7,
                         "figure.dpi": 100, "savefig.dpi": 200, "savefig.bbox": "tight"})
    return plt


def heatmap_figure(R, score_scale: float = 100.0, title: str = "accuracy matrix"):
    """The score matrix as a labelled heat map: the score in every cell, trained-on task down,
    evaluated-on task across, a colour scale from 0 to a perfect score."""
    plt = _pyplot()
    a = np.asarray(R, dtype=float)
    n_rows, n_cols = a.shape
    fig, ax = plt.subplots(figsize=(1.0 + 0.55 * n_cols, 0.8 + 0.5 * n_rows))
    im = ax.imshow(a, cmap="Blues", vmin=0, vmax=score_scale)
    for i in range(n_rows):
        for j in range(n_cols):
            ax.text(j, i, f"{a[i, j]:.0f}" if score_scale > 1 else f"{a[i, j]:.2f}", ha="center",
                    va="center", fontsize=7, color="white" if a[i, j] > 0.6 * score_scale else "black")
    ax.set_xticks(range(n_cols))
    ax.set_yticks(range(n_rows))
    ax.set_xlabel("evaluated on task")
    ax.set_ylabel("after training task")
    ax.set_title(title)
    fig.colorbar(im, ax=ax, fraction=0.046, pad=0.04,
                 label="accuracy (%)" if score_scale == 100.0 else "score")
    return fig


def figure_rgb(fig) -> np.ndarray:
    """A matplotlib figure as an HxWx3 uint8 array (for TensorBoard), closing the figure."""
    plt = _pyplot()
    fig.canvas.draw()
    rgb = np.asarray(fig.canvas.buffer_rgba())[..., :3].copy()
    plt.close(fig)
    return rgb


def _score_scale(runs: list[Run]) -> float:
    return 100.0 if max(max(row) for r in runs for row in r.summary["accuracy_matrix"]) > 1.5 else 1.0


def _save(fig, path: Path) -> Path:
    fig.savefig(path)
    _pyplot().close(fig)
    return path


def _curves(groups, key: str) -> dict[str, np.ndarray]:
    """Per group, a (seeds x tasks) array of a per-task figure, where every run has it."""
    out = {}
    for label, runs in groups.items():
        rows = [r.per_task(key) for r in runs]
        if rows and all(rows) and len({len(x) for x in rows}) == 1 and not np.isnan(rows).all():
            out[label] = np.asarray(rows, dtype=float)
    return out


def _spread(m, sd, limits: tuple[float, float]) -> np.ndarray:
    """The lengths below and above means `m` of ± `sd` bars clipped to the metric's range `limits`
    (an ACC band never above 100 %), as matplotlib's asymmetric errors; no bar where sd is NaN."""
    m, sd = np.atleast_1d(np.asarray(m, dtype=float)), np.nan_to_num(np.atleast_1d(np.asarray(sd, dtype=float)))
    return np.stack([m - np.clip(m - sd, *limits), np.clip(m + sd, *limits) - m])


def _line_figure(curves: dict[str, np.ndarray], ylabel: str, title: str, limits: tuple[float, float]):
    """Mean over seeds per group, with a ± sd band clipped to `limits` (none for one seed)."""
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(4.2, 2.8))
    for label, a in curves.items():
        x = np.arange(1, a.shape[1] + 1)
        m = a.mean(0)
        ax.plot(x, m, marker="o", ms=3, label=f"{label} (n={len(a)})")
        if len(a) > 1:
            below, above = _spread(m, a.std(0, ddof=1), limits)
            ax.fill_between(x, m - below, m + above, alpha=0.2)
    ax.set_xlabel("tasks trained")
    ax.set_ylabel(ylabel)
    ax.set_xticks(np.arange(1, max(a.shape[1] for a in curves.values()) + 1))
    ax.set_title(title)
    ax.grid(alpha=0.3)
    ax.legend(loc="best", frameon=False)
    return fig


def _line_plot(curves: dict[str, np.ndarray], ylabel: str, title: str, path: Path,
               limits: tuple[float, float] = (0.0, math.inf)) -> Path:
    return _save(_line_figure(curves, ylabel, title, limits), path)


def plot_all(groups, out: Path) -> dict[str, Path]:
    """Every figure the runs have data for; returns name -> PNG path."""
    figures = {}
    score_scale = _score_scale([r for g in groups.values() for r in g])
    for k, (label, runs) in enumerate(groups.items()):
        mean_R = np.mean([r.summary["accuracy_matrix"] for r in runs], axis=0)
        fig = heatmap_figure(mean_R, _score_scale(runs), f"{label}\n(mean of {len(runs)})")
        figures[f"accuracy matrix: {label}"] = _save(fig, out / f"matrix_{k}.png")
    acc = _curves(groups, "acc")
    if acc:
        scale = "accuracy (%)" if score_scale == 100 else "score"
        figures["ACC after each task"] = _line_plot(acc, f"ACC, {scale}", "ACC after each task (mean ± sd)",
                                                    out / "acc_per_task.png", (0.0, score_scale))
    figures["forgetting and BWT"] = _bars(groups, out / "forgetting_bwt.png", score_scale)
    mem = _curves(groups, "strategy_state_bytes")
    if mem:
        figures["strategy memory"] = _line_plot({k: v / 2**20 for k, v in mem.items()},
                                                "strategy state (MiB)", "memory kept between tasks",
                                                out / "memory_per_task.png")
    eps = {k: v for k, v in _curves(groups, "epsilon").items() if np.isfinite(v).all() and k in acc}
    if eps:
        points = {k: (e.mean(0), acc[k].mean(0), None, _sd(acc[k])) for k, e in eps.items()}
        figures["privacy–utility"] = _points_plot(points, "ε spent (worst individual)", "ACC after the task",
                                                  "privacy–utility, one point per task",
                                                  out / "privacy_utility.png", (0.0, score_scale))
    flops = {label: runs for label, runs in groups.items()
             if all("strategy_train_flops" in r.figures() for r in runs)}
    if flops:
        points = {}
        for label, runs in flops.items():
            x = np.array([r.figures()["strategy_train_flops"] for r in runs], dtype=float)
            y = np.array([r.summary["acc"] for r in runs], dtype=float)
            points[label] = (x.mean(), y.mean(), _sd(x), _sd(y))
        figures["FLOPs against ACC"] = _points_plot(points, "training FLOPs (counted, whole stream)",
                                                    "final ACC", "compute against accuracy",
                                                    out / "flops_acc.png", (0.0, score_scale), log_x=True)
    capacity = _curves(groups, "blip_capacity")
    if capacity:
        figures["BLIP capacity"] = _line_plot({k: 100 * v for k, v in capacity.items()},
                                              "capacity used (%)", "BLIP: bits frozen over tasks",
                                              out / "blip_capacity.png", (0.0, 100.0))
    return figures


def _sd(a: np.ndarray):
    """The sd over seeds (axis 0); NaN for one seed, which has no spread."""
    return a.std(0, ddof=1) if len(a) > 1 else np.full(np.shape(a)[1:], math.nan)


def _points_plot(points: dict, xlabel: str, ylabel: str, title: str, path: Path,
                 y_limits: tuple[float, float], log_x=False) -> Path:
    """One marker series per group: label -> (x, y, x sd or None, y sd); bars clipped to the
    figures' ranges (x is a count or ε: never below 0)."""
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(4.2, 2.8))
    for label, (x, y, x_sd, y_sd) in points.items():
        xerr = None if x_sd is None else _spread(x, x_sd, (0.0, math.inf))
        ax.errorbar(x, y, xerr=xerr, yerr=_spread(y, y_sd, y_limits), marker="o", ms=3, capsize=2, label=label)
    if log_x:
        ax.set_xscale("log")
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    ax.set_title(title)
    ax.grid(alpha=0.3)
    ax.legend(frameon=False)
    return _save(fig, path)


def _bars(groups, path: Path, score_scale: float) -> Path:
    plt = _pyplot()
    labels = list(groups)
    fig, ax = plt.subplots(figsize=(max(3.5, 0.9 * len(labels) + 1.5), 2.8))
    x, width = np.arange(len(labels)), 0.38
    for k, (key, name) in enumerate((("forgetting", "forgetting"), ("bwt", "BWT"))):
        m, sd = np.array([mean_sd([r.summary[key] for r in groups[label]]) for label in labels]).T
        ax.bar(x + (k - 0.5) * width, m, width, yerr=_spread(m, sd, (-score_scale, score_scale)),
               capsize=2, label=name)
    ax.axhline(0, color="black", lw=0.6)
    ax.set_xticks(x)
    ax.set_xticklabels(labels, rotation=20, ha="right")
    ax.set_ylabel("points (mean ± sd over seeds)")
    ax.set_title("forgetting and backward transfer")
    ax.legend(frameon=False)
    return _save(fig, path)


def _figures_to_tensorboard(figures: dict[str, Path], log_dir: Path) -> None:
    from PIL import Image
    from torch.utils.tensorboard import SummaryWriter
    with SummaryWriter(str(log_dir)) as w:
        for name, path in figures.items():
            with Image.open(path) as im:
                w.add_image(f"report/{name}", np.asarray(im.convert("RGB")), 0, dataformats="HWC")
