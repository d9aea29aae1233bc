"""The privacy ledger: every access to every task's dataset, and the ε it costs.

A raw access (training without a mechanism, a Fisher pass on raw samples, a replay buffer of
raw examples) makes that dataset's ε infinite; Gaussian-mechanism accesses are accounted.
The report lists each access with its sample rate, noise multiplier and step count, so anyone
can recompute ε with their own accountant.
"""
from __future__ import annotations

import math
from collections import defaultdict


class Ledger:
    def __init__(self, delta: float = 1e-5, accountant: str = "rdp"):
        self.delta, self.accountant = delta, accountant
        self.accesses: dict[str, list[dict]] = defaultdict(list)
        self.notes: list[str] = []          # e.g. how δ was chosen, which layers were replaced
        self._cache: dict[str, tuple[tuple, float]] = {}

    def raw(self, dataset: str, purpose: str) -> None:
        """Record a non-private touch of `dataset` (once per purpose)."""
        entry = {"mechanism": "raw", "purpose": purpose}
        if entry not in self.accesses[dataset]:
            self.accesses[dataset].append(entry)

    def gaussian(self, dataset: str, purpose: str, sample_rate: float, noise_multiplier: float,
                 steps: int = 1) -> None:
        """Record `steps` subsampled-Gaussian releases on `dataset`; consecutive identical ones merge."""
        log = self.accesses[dataset]
        last = log[-1] if log else None
        if last and last["mechanism"] == "gaussian" and last["purpose"] == purpose and \
                last["sample_rate"] == sample_rate and last["noise_multiplier"] == noise_multiplier:
            last["steps"] += steps
        else:
            log.append({"mechanism": "gaussian", "purpose": purpose, "sample_rate": sample_rate,
                        "noise_multiplier": noise_multiplier, "steps": steps})

    def epsilon(self, dataset: str) -> float:
        log = self.accesses.get(dataset, [])
        if any(a["mechanism"] == "raw" for a in log):
            return math.inf
        mechanisms = [(a["noise_multiplier"], a["sample_rate"], a["steps"]) for a in log]
        if not mechanisms:
            return 0.0
        # Called after every step: recompute only when this dataset's accesses changed.
        key = (tuple(mechanisms), self.delta, self.accountant)
        cached = self._cache.get(dataset)
        if cached is not None and cached[0] == key:
            return cached[1]
        from clsim.privacy.accounting import epsilon
        value = epsilon(mechanisms, self.delta, self.accountant)
        self._cache[dataset] = (key, value)
        return value

    def state_dict(self) -> dict:
        return {"accesses": {d: [dict(a) for a in log] for d, log in self.accesses.items()},
                "notes": list(self.notes)}

    def load_state_dict(self, state: dict) -> None:
        self.accesses.clear()
        self.accesses.update({d: [dict(a) for a in log] for d, log in state["accesses"].items()})
        self.notes[:] = state["notes"]
        self._cache.clear()

    def worst_epsilon(self) -> float:
        return max((self.epsilon(d) for d in self.accesses), default=0.0)

    def report(self) -> dict:
        """The summary.json `privacy` section: accesses and ε per dataset (null means ∞)."""
        def num(x):
            return x if math.isfinite(x) else None
        return {"delta": self.delta, "accountant": self.accountant,
                "epsilon_worst": num(self.worst_epsilon()), "notes": list(self.notes),
                "datasets": {d: {"accesses": [dict(a) for a in log], "epsilon": num(self.epsilon(d)),
                                 "epsilon_infinite": not math.isfinite(self.epsilon(d))}
                             for d, log in self.accesses.items()}}
