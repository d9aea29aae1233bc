"""`--audit`: the attacks run around a training run (clsim/privacy/audit.py holds the statistics).

`mia` attacks the trained model with a loss threshold; `one-run` plants mislabelled canaries in
the last task before training and guesses, after it, which were kept (Steinke et al. 2023).
"""
from __future__ import annotations

from clsim.errors import UserError
from clsim.privacy.audit import AuditOptions, mia, one_run, plant_canaries


class Audit:
    """The --audit of one run: `prepare` before training, `result` after it (None: no audit)."""

    def __init__(self, options: AuditOptions, seed: int):
        self.options, self.seed = options, seed
        self.canaries = None

    def prepare(self, scenario, learner) -> None:
        """Refuse an audit the scenario cannot take; plant the one-run audit's canaries."""
        if self.options.audit is None:
            return
        if learner.kind != "supervised":
            raise UserError(f"--audit {self.options.audit} attacks labelled examples, which scenario "
                            f"{scenario.name} ({learner.kind}) does not have: drop --audit")
        if self.options.audit == "one-run":
            m, k = self.options.audit_canaries, self.options.audit_guesses
            if k > m // 2:   # k 'in' and k 'out' guesses among m canaries (it was cut to m // 2 silently)
                raise UserError(f"--audit-guesses {k} guesses on each side of the --audit-canaries {m} ranked "
                                f"canaries: give at most {m // 2}, or more canaries")
            self.canaries = plant_canaries(scenario, m, self.seed)

    def result(self, parts) -> dict | None:
        """The summary.json `audit` section, from the trained parts."""
        if self.options.audit == "mia":
            return mia(parts.learner, parts.scenario, parts.ledger, self.options.audit_examples, self.seed)
        if self.options.audit == "one-run":
            return one_run(parts.learner, parts.scenario, self.canaries, parts.ledger, self.options.audit_guesses)
        return None
