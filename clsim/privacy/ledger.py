"""The privacy ledger: every access to every task's training data, and the ε it costs each
individual in it.

Accesses are recorded per task (its `dataset_id`). What an individual pays is the composition
of every access to every task that holds them: the ledger groups the individuals of the
scenario by the set of tasks they appear in (from each task's declared `individuals`), and a
group's ε composes all those tasks' accesses sequentially. Groups are disjoint, so they compose
in parallel: the run's ε is the worst group's (`epsilon_worst`).

An access is {"mechanism": kind, "purpose": why, "steps": k, ...parameters}: "raw" (no
mechanism: training without one, an exact Fisher, a buffer of raw examples) makes ε infinite;
"gaussian" (sample_rate, noise_multiplier) and "laplace" (scale) are accounted, and any kind
with an RDP curve registered in clsim/privacy/accounting.py can be recorded with `record`.
The report lists every access, so anyone can recompute ε with their own accountant.
"""
from __future__ import annotations

import math
from collections import defaultdict
from dataclasses import dataclass

import torch

from clsim.privacy import accounting


@dataclass(frozen=True)
class Group:
    """Individuals of one population who appear in exactly the tasks `tasks` (dataset ids)."""
    population: str
    tasks: tuple[str, ...]
    count: int | None      # None: the ids are unknown, so every individual may be in every task


def individual_groups(tasks) -> list[Group]:
    """Partition each population's individuals by the set of tasks they appear in."""
    by_population = defaultdict(list)
    for task in tasks:
        by_population[task.individuals.population].append(task)
    groups = []
    for population, members in by_population.items():
        names = [t.dataset_id for t in members]
        ids = [t.individuals.ids for t in members]
        if any(i is None for i in ids):
            groups.append(Group(population, tuple(names), None))
            continue
        size = max((int(i.max()) + 1 for i in ids if len(i)), default=0)
        membership = torch.zeros((size, len(members)), dtype=torch.bool)
        for j, i in enumerate(ids):
            membership[i.long(), j] = True
        rows, counts = torch.unique(membership, dim=0, return_counts=True)
        found = sorted((tuple(row.nonzero().flatten().tolist()), count) for row, count in zip(rows, counts.tolist()))
        groups += [Group(population, tuple(names[j] for j in where), count) for where, count in found if where]
    return groups


class Ledger:
    def __init__(self, delta: float = 1e-5, accountant: str = "rdp"):
        self.delta, self.accountant = delta, accountant
        self.accesses: dict[str, list[dict]] = defaultdict(list)
        self.groups: list[Group] = []
        self.notes: list[str] = []          # e.g. how δ was chosen, which layers were replaced
        self._cache: dict[Group, tuple[tuple, float]] = {}

    def declare(self, tasks) -> None:
        """Learn who is in which task (before any access), so ε composes by individual."""
        self.groups = individual_groups(tasks)
        shared = [g for g in self.groups if len(g.tasks) > 1]
        if shared:
            worst = max(shared, key=lambda g: len(g.tasks))
            self.notes.append(f"individuals shared across tasks: e.g. {worst.count or 'all'} of "
                              f"{worst.population} are in {len(worst.tasks)} tasks, whose accesses "
                              f"compose sequentially for them")

    # --- recording --------------------------------------------------------------------------
    def raw(self, dataset: str, purpose: str) -> None:
        """Record a non-private touch of `dataset` (once per purpose): ε = ∞ for its individuals."""
        entry = {"mechanism": "raw", "purpose": purpose}
        if entry not in self.accesses[dataset]:
            self.accesses[dataset].append(entry)

    def gaussian(self, dataset: str, purpose: str, sample_rate: float, noise_multiplier: float,
                 steps: int = 1) -> None:
        """Record `steps` Poisson-subsampled Gaussian releases on `dataset`."""
        self.record(dataset, "gaussian", purpose, steps, sample_rate=sample_rate,
                    noise_multiplier=noise_multiplier)

    def record(self, dataset: str, mechanism: str, purpose: str, steps: int = 1, **parameters) -> None:
        """Record `steps` releases of any mechanism with an RDP curve in accounting.py;
        consecutive identical ones merge."""
        entry = {"mechanism": mechanism, "purpose": purpose, **parameters}
        if not accounting.accountable(entry):
            raise ValueError(f"mechanism {mechanism!r} has no RDP curve: register one with "
                             f"clsim.privacy.accounting.register_rdp, or record it as raw")
        log = self.accesses[dataset]
        last = log[-1] if log else None
        if last is not None and {k: v for k, v in last.items() if k != "steps"} == entry:
            last["steps"] += steps
        else:
            log.append({**entry, "steps": steps})

    # --- ε ------------------------------------------------------------------------------------
    def _all_groups(self) -> list[Group]:
        """The declared groups, plus one of its own for any dataset no declared group holds."""
        covered = {d for g in self.groups for d in g.tasks}
        return self.groups + [Group(d, (d,), None) for d in self.accesses if d not in covered]

    def group_accesses(self, group: Group) -> list[dict]:
        return [{"task": d, **a} for d in group.tasks for a in self.accesses.get(d, [])]

    def group_epsilon(self, group: Group) -> float:
        accesses = self.group_accesses(group)
        key = tuple(tuple(sorted(a.items())) for a in accesses) + (self.delta, self.accountant)
        cached = self._cache.get(group)
        if cached is not None and cached[0] == key:   # asked after every step: recompute on change
            return cached[1]
        value = accounting.epsilon(accesses, self.delta, self.accountant)
        self._cache[group] = (key, value)
        return value

    def epsilon(self, dataset: str) -> float:
        """What the worst-off individual of task `dataset` has paid so far, over all tasks."""
        return max((self.group_epsilon(g) for g in self._all_groups() if dataset in g.tasks), default=0.0)

    def worst_epsilon(self) -> float:
        return max((self.group_epsilon(g) for g in self._all_groups()), default=0.0)

    # --- state and report -------------------------------------------------------------------
    def state_dict(self) -> dict:
        return {"accesses": {d: [dict(a) for a in log] for d, log in self.accesses.items()},
                "notes": list(self.notes)}

    def load_state_dict(self, state: dict) -> None:
        self.accesses.clear()
        self.accesses.update({d: [dict(a) for a in log] for d, log in state["accesses"].items()})
        self.notes[:] = state["notes"]
        self._cache.clear()

    def report(self) -> dict:
        """The summary.json `privacy` section (null ε means ∞): per task its accesses, per group
        of individuals every access they took part in and their ε, and the worst ε."""
        def num(x):
            return x if math.isfinite(x) else None
        groups = [{"population": g.population, "tasks": list(g.tasks), "count": g.count,
                   "accesses": self.group_accesses(g), "epsilon": num(self.group_epsilon(g)),
                   "epsilon_infinite": not math.isfinite(self.group_epsilon(g))}
                  for g in self._all_groups()]
        return {"delta": self.delta, "accountant": self.accountant,
                "epsilon_worst": num(self.worst_epsilon()), "notes": list(self.notes),
                "individuals": groups,
                "datasets": {d: {"accesses": [dict(a) for a in log], "epsilon": num(self.epsilon(d)),
                                 "epsilon_infinite": not math.isfinite(self.epsilon(d))}
                             for d, log in self.accesses.items()}}
