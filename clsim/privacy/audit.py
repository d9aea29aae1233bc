"""Membership-inference audit: a loss-threshold attack on each task after training.

Members are training examples of a task, non-members its held-out test examples (same number
of each). An example is called a member when its loss is below a threshold. We report the
attack's ROC AUC and an empirical ε lower bound: for (ε, δ)-DP every test satisfies
TPR ≤ e^ε·FPR + δ (and the same with the roles of members and non-members swapped), so
ε ≥ log((TPR − δ)/FPR). The threshold is chosen on one half of the examples and the rates are
measured on the other half with 95% Clopper–Pearson bounds, so the bound holds with 95%
confidence rather than being an optimistic best-of-many-thresholds figure.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from clsim.config import opt


@dataclass
class AuditOptions:
    audit: str | None = opt(None, "after training, audit privacy empirically: mia (loss-threshold "
                            "membership inference, members vs held-out test examples of each task)",
                            choices=("mia",))
    audit_examples: int = opt(1000, "most members (and as many non-members) per task in the audit", low=10)


@torch.no_grad()
def example_losses(learner, task, x, y) -> torch.Tensor:
    from clsim.learners.base import Batch
    model = learner.model
    was_training = model.training
    model.eval()
    out = []
    for rows in torch.arange(len(y)).split(learner.eval_batch_size if hasattr(learner, "eval_batch_size") else 500):
        t = torch.full((len(rows),), task.index, dtype=torch.long, device=learner.device)
        batch = Batch(x[rows].to(learner.device), y[rows].to(learner.device), t, rows)
        out.append(learner.forward(batch)[0].float().cpu())
    model.train(was_training)
    return torch.cat(out)


def roc_auc(members: torch.Tensor, nonmembers: torch.Tensor) -> float:
    """P(score of a member > score of a non-member), ties counting half (Mann–Whitney)."""
    scores = torch.cat([members, nonmembers]).double()
    ranks = torch.empty_like(scores)
    order = scores.argsort()
    ranks[order] = torch.arange(1, len(scores) + 1, dtype=torch.double)
    for value in scores.unique():          # average ranks of ties
        tie = scores == value
        if int(tie.sum()) > 1:
            ranks[tie] = ranks[tie].mean()
    m, n = len(members), len(nonmembers)
    return float((ranks[:m].sum() - m * (m + 1) / 2) / (m * n))


def clopper_pearson(k: int, n: int, alpha: float) -> tuple[float, float]:
    from scipy.stats import beta
    low = 0.0 if k == 0 else float(beta.ppf(alpha / 2, k, n - k + 1))
    high = 1.0 if k == n else float(beta.ppf(1 - alpha / 2, k + 1, n - k))
    return low, high


def _bound(tp: float, fp: float, delta: float) -> float:
    if tp - delta <= 0:
        return 0.0
    if fp <= 0:
        return math.inf
    return max(0.0, math.log((tp - delta) / fp))


def empirical_epsilon(members: torch.Tensor, nonmembers: torch.Tensor, delta: float,
                      generator: torch.Generator, alpha: float = 0.05) -> float:
    """ε lower bound (confidence 1 − alpha) of the test 'score > τ means member' and its mirror."""
    pm = torch.randperm(len(members), generator=generator)
    pn = torch.randperm(len(nonmembers), generator=generator)
    m_fit, m_test = members[pm[: len(pm) // 2]], members[pm[len(pm) // 2:]]
    n_fit, n_test = nonmembers[pn[: len(pn) // 2]], nonmembers[pn[len(pn) // 2:]]
    # Every candidate threshold and both directions at once (side -1: low score means member).
    taus = torch.cat([m_fit, n_fit]).unique()
    best, best_tau, best_side = -1.0, 0.0, 1
    for side in (1, -1):
        tpr = ((side * m_fit[None, :] > side * taus[:, None]).sum(1) + 0.5) / (len(m_fit) + 1)
        fpr = ((side * n_fit[None, :] > side * taus[:, None]).sum(1) + 0.5) / (len(n_fit) + 1)
        values = torch.log((tpr - delta).clamp(min=1e-300) / fpr).clamp(min=0.0)
        i = int(values.argmax())
        if float(values[i]) > best:
            best, best_tau, best_side = float(values[i]), float(taus[i]), side
    tp = int((best_side * m_test > best_side * best_tau).sum())
    fp = int((best_side * n_test > best_side * best_tau).sum())
    tpr_low, _ = clopper_pearson(tp, len(m_test), alpha)
    _, fpr_high = clopper_pearson(fp, len(n_test), alpha)
    return _bound(tpr_low, fpr_high, delta)


def mia(learner, scenario, ledger, examples: int, seed: int) -> dict:
    """The summary.json `audit` section: per task AUC, empirical ε and the accountant's ε."""
    generator = torch.Generator().manual_seed(seed)
    tasks = {}
    for task in scenario.tasks:
        if task.train is None or task.test is None:
            continue
        n = min(examples, len(task.train), len(task.test))
        pick_m = torch.randperm(len(task.train), generator=generator)[:n]
        pick_n = torch.randperm(len(task.test), generator=generator)[:n]
        # Score: minus the loss (members tend to have lower loss).
        members = -example_losses(learner, task, task.train.x[pick_m], task.train.y[pick_m])
        nonmembers = -example_losses(learner, task, task.test.x[pick_n], task.test.y[pick_n])
        accountant = ledger.epsilon(task.dataset_id)
        tasks[task.dataset_id] = {
            "auc": roc_auc(members, nonmembers),
            "epsilon_lower_bound": empirical_epsilon(members, nonmembers, ledger.delta, generator),
            "epsilon_accountant": accountant if math.isfinite(accountant) else None,
            "members": n, "nonmembers": n}
    return {"attack": "loss threshold", "delta": ledger.delta, "confidence": 0.95,
            "auc_max": max((t["auc"] for t in tasks.values()), default=None),
            "epsilon_lower_bound_max": max((t["epsilon_lower_bound"] for t in tasks.values()), default=None),
            "tasks": tasks}
