"""Continual World's metrics, computed as its results_processing/tables.py does, from the
evaluation curves SAC runs record (summary.json `evaluation_curve`: one point per evaluation, the
task being trained, and every task's stochastic success rate).

- Average performance: each task's success averaged over the run's last 5 evaluations
  (`calculate_data_at_the_end`: tail(5)), then over tasks.
- Forgetting of task i: its success averaged over the last 5 evaluations while task i was being
  trained, minus the same at the end of the run (`calculate_forgetting_individual`); averaged over
  tasks (the last task's is ~0 by construction, as in CW).
- Forward transfer of task i: with AUC_i the mean of task i's success over the evaluations made
  while it was trained (`current_success`), and AUC_ref_i the same over the single-task reference
  runs of that task (mean over their curves), FT_i = (AUC_i − AUC_ref_i)/(1 − AUC_ref_i), CW's
  `normalized_ft`; averaged over tasks. As CW's BootstrapCI, the statistic is computed from means
  over seeds (runs), not per seed.
- Confidence intervals: CW's vanilla bootstrap — 4000 resamples of the runs with replacement (the
  reference runs resampled apart for FT), confidence 0.9, quantiles with midpoint interpolation,
  numpy's legacy generator seeded 0.

Where clsim differs: CW's task name in a curve column comes from the run's own logs; here from
summary.json's `rl_protocol.tasks`. A reference run is a `metaworld` scenario run of one task.
"""
from __future__ import annotations

import numpy as np

BOOTSTRAP_SAMPLES = 4000
CONFIDENCE = 0.9
TAIL = 5   # CW: the last 5 evaluations


def success_curve(summary: dict) -> tuple[np.ndarray, np.ndarray]:
    """(trained task of each evaluation point [P], success of every task at each point [P, T])."""
    curve = summary["evaluation_curve"]
    return (np.array([p["task"] for p in curve]), np.array([p["success_rate"] for p in curve], dtype=float))


def per_task_figures(summary: dict) -> dict[str, np.ndarray]:
    """Per task: success at the end, forgetting, and AUC while trained (CW's columns)."""
    trained, success = success_curve(summary)
    end = success[-TAIL:].mean(0)
    tasks = success.shape[1]
    while_trained = np.array([success[trained == i][-TAIL:, i].mean() for i in range(tasks)])
    auc = np.array([success[trained == i, i].mean() for i in range(tasks)])
    return {"end": end, "forgetting": while_trained - end, "auc": auc}


def reference_auc(summary: dict) -> float:
    """A single-task reference run's AUC: the mean of its success curve."""
    return float(success_curve(summary)[1][:, 0].mean())


def bootstrap_ci(values: np.ndarray, statistic, seed: int = 0) -> tuple[float, float]:
    """CW's BootstrapCI for one sample: resample the rows (runs) with replacement."""
    rng = np.random.RandomState(seed)
    picks = rng.choice(len(values), (BOOTSTRAP_SAMPLES, len(values)))
    stats = np.array([statistic(values[p]) for p in picks])
    tail = (1 - CONFIDENCE) / 2
    return (float(np.quantile(stats, tail, method="midpoint")), float(np.quantile(stats, 1 - tail, method="midpoint")))


def mean_with_ci(per_run: list[float]) -> dict:
    """CW's compute_mean_and_ci: the mean over runs and its bootstrap interval."""
    x = np.asarray(per_run, dtype=float)
    lo, hi = bootstrap_ci(x, np.mean)
    return {"mean": float(x.mean()), "ci": [lo, hi], "n": len(x)}


def forward_transfer(runs: list[dict], references: dict[str, list[float]]) -> dict:
    """CW's normalized FT over the sequence with its bootstrap interval: `runs` are the summaries
    of one method (same sequence), `references[task name]` the reference AUCs of each task."""
    names = runs[0]["scenario_info"]["rl_protocol"]["tasks"]
    missing = sorted({n for n in names if not references.get(n)})
    if missing:
        return {"missing_references": missing}
    X = np.array([per_task_figures(s)["auc"] for s in runs])                      # [runs, T]
    k = min(len(references[n]) for n in names)                                    # CW: balanced
    Y = np.array([[references[n][j] for n in names] for j in range(k)])           # [refs, T]

    def statistic(x, y):
        mx, my = x.mean(0), y.mean(0)
        return float(np.mean((mx - my) / (1 - my)))

    rng = np.random.RandomState(0)
    xi = rng.choice(len(X), (BOOTSTRAP_SAMPLES, len(X)))
    yi = rng.choice(len(Y), (BOOTSTRAP_SAMPLES, len(Y)))
    stats = np.array([statistic(X[a], Y[b]) for a, b in zip(xi, yi)])
    tail = (1 - CONFIDENCE) / 2
    ci = [float(np.quantile(stats, tail, method="midpoint")), float(np.quantile(stats, 1 - tail, method="midpoint"))]
    return {"mean": statistic(X, Y), "ci": ci, "n": len(X), "references_per_task": k}


def table(methods: dict[str, list[dict]], references: dict[str, list[float]]) -> dict[str, dict]:
    """Per method label: average performance, forgetting and forward transfer, each with CIs."""
    out = {}
    for label, runs in methods.items():
        figures = [per_task_figures(s) for s in runs]
        out[label] = {"performance": mean_with_ci([f["end"].mean() for f in figures]),
                      "forgetting": mean_with_ci([f["forgetting"].mean() for f in figures]),
                      "forward_transfer": forward_transfer(runs, references)}
    return out
