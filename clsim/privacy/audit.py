"""Empirical privacy audits after training: a loss-threshold heuristic and a one-run audit.

`mia` (heuristic): members are training examples of a task, non-members its held-out test
examples (same number of each); an example is called a member when its score (minus its loss)
passes a threshold. For (ε, δ)-DP every test satisfies TPR ≤ e^ε·FPR + δ and TNR ≤ e^ε·FNR + δ
when membership is decided at random, so log((TPR − δ)/FPR) and log((TNR − δ)/FNR) would bound ε
from below. The threshold is chosen on one half of the examples, the rates measured on the other
with 95% Clopper–Pearson bounds. The figure (`mia_heuristic_epsilon`) is a heuristic, never a
bound: members and non-members were not assigned at random (training and test sets may differ
in distribution), so a positive figure can come from that difference alone, and it may exceed
the accountant's ε.

`one-run` (Steinke, Nasr & Jagielski, NeurIPS 2023, "Privacy auditing with one (1) training
run"): m canaries (training examples of the last task with a wrong label, the paper's "input
space" canaries) are each kept in the training set with probability ½ and removed otherwise,
by a coin drawn before training. Afterwards the auditor guesses "in" for the k highest-scoring
canaries and "out" for the k lowest (score: minus the loss at the canary's label; k fixed in
advance) and counts the correct guesses v of r = 2k. The statement implemented (cited by its
content: the search tools here could not show the paper's numbering, so none is given) is their
main theorem for (ε, δ)-DP with m canaries each included independently with probability ½:
P[at least v of the r guesses correct] ≤ P[Binomial(r, e^ε/(1+e^ε)) ≥ v] + 2mδ·max_{i=1..v}
P[v > Binomial(r, e^ε/(1+e^ε)) ≥ v − i]/i, evaluated as in their appendix's `p_value_DP_audit`
(`p_value` below). The reported ε is the largest one rejected at level 0.05, a lower bound that
holds with 95% confidence. The theorem needs the inclusion coins independent of the mechanism:
they come from a stream of their own (clsim/privacy/streams.py). clsim differs from the paper
only in using a single fixed (k, k) split of guesses rather than reporting the best of several
(which would need a correction for the multiple tries).
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from clsim.config import opt
from clsim.errors import UserError
from clsim.privacy import streams


@dataclass
class AuditOptions:
    audit: str | None = opt(None, "after training, audit privacy empirically: mia (loss-threshold heuristic, "
                            "members vs held-out test examples of each task; its figures bound nothing) or one-run (Steinke et al. 2023: "
                            "canaries kept at random, a lower bound on ε at 95% confidence)",
                            choices=("mia", "one-run"))
    audit_examples: int = opt(1000, "mia: most members (and as many non-members) per task", low=10)
    audit_canaries: int = opt(50, "one-run: canaries m (mislabelled examples of the last task, each kept "
                              "with probability 1/2)", low=2)
    audit_guesses: int = opt(10, "one-run: guesses k on each side (k highest scores 'in', k lowest 'out'; at "
                             "most half of --audit-canaries)", low=1)


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
    """log((tp − δ)/fp), at least 0."""
    if tp - delta <= 0:
        return 0.0
    if fp <= 0:
        return math.inf
    return max(0.0, math.log((tp - delta) / fp))


def mia_heuristic_epsilon(members: torch.Tensor, nonmembers: torch.Tensor, delta: float,
                          generator: torch.Generator, alpha: float = 0.05) -> float:
    """The ε that the tests 'score > τ means member' and its mirror would imply through both
    one-sided DP inequalities, from rates bounded at level 1 − alpha (Clopper–Pearson). Not a
    bound on the mechanism's ε: members and non-members were not assigned at random."""
    pm = torch.randperm(len(members), generator=generator)
    pn = torch.randperm(len(nonmembers), generator=generator)
    m_fit, m_test = members[pm[: len(pm) // 2]], members[pm[len(pm) // 2:]]
    n_fit, n_test = nonmembers[pn[: len(pn) // 2]], nonmembers[pn[len(pn) // 2:]]
    # Every candidate threshold, both directions (side -1: low score means member) and both
    # inequalities (TPR vs FPR, TNR vs FNR) at once, on the fitting half.
    taus = torch.cat([m_fit, n_fit]).unique()
    best, choice = -1.0, None
    for side in (1, -1):
        tpr = ((side * m_fit[None, :] > side * taus[:, None]).sum(1) + 0.5) / (len(m_fit) + 1)
        fpr = ((side * n_fit[None, :] > side * taus[:, None]).sum(1) + 0.5) / (len(n_fit) + 1)
        for inequality, (hit, miss) in enumerate(((tpr, fpr), (1 - fpr, 1 - tpr))):
            values = torch.log((hit - delta).clamp(min=1e-300) / miss).clamp(min=0.0)
            i = int(values.argmax())
            if float(values[i]) > best:
                best, choice = float(values[i]), (float(taus[i]), side, inequality)
    tau, side, inequality = choice
    tp = int((side * m_test > side * tau).sum())
    fp = int((side * n_test > side * tau).sum())
    if inequality == 0:    # TPR ≤ e^ε FPR + δ
        return _bound(clopper_pearson(tp, len(m_test), alpha)[0], clopper_pearson(fp, len(n_test), alpha)[1], delta)
    tn, fn = len(n_test) - fp, len(m_test) - tp          # TNR ≤ e^ε FNR + δ
    return _bound(clopper_pearson(tn, len(n_test), alpha)[0], clopper_pearson(fn, len(m_test), alpha)[1], delta)


def mia(learner, scenario, ledger, examples: int, seed: int) -> dict:
    """The summary.json `audit` section: per task AUC, empirical ε and the accountant's ε."""
    generator = streams.generator(seed, streams.MIA)
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
            "mia_heuristic_epsilon": mia_heuristic_epsilon(members, nonmembers, ledger.delta, generator),
            "epsilon_accountant": accountant if math.isfinite(accountant) else None,
            "members": n, "nonmembers": n}
    return {"attack": "loss threshold (heuristic: no guarantee)", "delta": ledger.delta,
            "mia_heuristic_rates_level": 0.95,
            "auc_max": max((t["auc"] for t in tasks.values()), default=None),
            "mia_heuristic_epsilon_max": max((t["mia_heuristic_epsilon"] for t in tasks.values()), default=None),
            "tasks": tasks}


# ---------------------------------------------------------------- the one-run audit

@dataclass
class Canaries:
    """Planted canaries: the task, their inputs and wrong labels, and which were kept."""
    task_index: int
    x: torch.Tensor
    y: torch.Tensor
    kept: torch.Tensor        # bool, the coin of each canary (True: in the training set)


def plant_canaries(scenario, m: int, seed: int) -> Canaries:
    """Turn m training examples of the last task into mislabelled canaries, each kept in the
    training set with probability ½ (the others are removed from it). Run before training."""
    task = scenario.tasks[-1]
    if task.train is None:
        raise UserError("--audit one-run plants labelled canaries; this scenario's tasks have no training examples")
    labels = task.train.y.unique()
    if len(labels) < 2 or m > len(task.train) // 2:
        raise UserError(f"--audit-canaries {m}: the last task has {len(task.train)} examples and "
                        f"{len(labels)} label(s); use at most half its examples, and a task with two labels or more")
    g = streams.generator(seed, streams.CANARIES)     # shared with no other draw of the run
    pick = torch.randperm(len(task.train), generator=g)[:m]
    x, y = task.train.x[pick], task.train.y[pick]
    shift = torch.randint(1, len(labels), (m,), generator=g)     # another label of the task, uniformly
    position = (labels[None, :] == y[:, None]).long().argmax(1)
    y = labels[(position + shift) % len(labels)]
    kept = torch.rand(m, generator=g) < 0.5
    keep_rows = torch.ones(len(task.train), dtype=torch.bool)
    keep_rows[pick[~kept]] = False
    labels_now = task.train.y.clone()
    labels_now[pick] = y
    task.train = type(task.train)(task.train.x[keep_rows], labels_now[keep_rows])
    return Canaries(task.index, x, y, kept)


def p_value(m: int, r: int, v: int, eps: float, delta: float) -> float:
    """P[at least v of r guesses correct] bound under (ε, δ)-DP with m canaries (Steinke et al.
    2023, their main theorem, see the module docstring): P[Binomial(r, q) ≥ v] + 2mδ·max_i
    P[v > Binomial(r, q) ≥ v − i]/i, q = e^ε/(1 + e^ε)."""
    from scipy.stats import binom
    q = 1 / (1 + math.exp(-eps))
    tail = float(binom.sf(v - 1, r, q))
    alpha, below = 0.0, 0.0
    for i in range(1, v + 1):
        below += float(binom.pmf(v - i, r, q))
        alpha = max(alpha, below / i)
    return min(1.0, tail + 2 * m * delta * alpha)


def one_run_epsilon(m: int, r: int, v: int, delta: float, confidence: float = 0.95) -> float:
    """The largest ε rejected at level 1 − confidence: a lower bound on the true ε."""
    level = 1 - confidence
    if p_value(m, r, v, 0.0, delta) >= level:
        return 0.0
    low, high = 0.0, 1.0
    while p_value(m, r, v, high, delta) < level:
        low, high = high, 2 * high
    for _ in range(40):
        mid = (low + high) / 2
        low, high = (mid, high) if p_value(m, r, v, mid, delta) < level else (low, mid)
    return low


def one_run(learner, scenario, canaries: Canaries, ledger, guesses: int) -> dict:
    """The summary.json `audit` section of the one-run audit."""
    task = scenario.tasks[canaries.task_index]
    scores = -example_losses(learner, task, canaries.x, canaries.y)
    m, k = len(scores), guesses
    order = scores.argsort(descending=True)
    correct = int(canaries.kept[order[:k]].sum()) + int((~canaries.kept[order[-k:]]).sum())
    accountant = ledger.epsilon(task.dataset_id)
    return {"attack": "one-run (Steinke, Nasr & Jagielski 2023), mislabelled canaries, loss score",
            "task": task.dataset_id, "canaries": m, "kept": int(canaries.kept.sum()), "guesses": 2 * k,
            "correct": correct, "delta": ledger.delta, "confidence": 0.95,
            "epsilon_lower_bound": one_run_epsilon(m, 2 * k, correct, ledger.delta),
            "epsilon_accountant": accountant if math.isfinite(accountant) else None}
