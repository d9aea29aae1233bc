"""δ and the noise of DP-SGD and its DP-Fisher, chosen once for the whole stream before training."""
from __future__ import annotations

from dataclasses import dataclass, field

from clsim.errors import UserError
from clsim.privacy import accounting
from clsim.privacy.ledger import individual_groups

DEFAULT_DELTA = 1e-5
DEFAULT_NOISE = 1.0
DEFAULT_FISHER_NOISE = 10.0


@dataclass
class Noise:
    """What `calibrate` chose, and the notes saying so."""
    delta: float
    sigma: float
    fisher_sigma: float
    notes: list[str] = field(default_factory=list)


def calibrate(options, plans: dict, tasks, epochs: int, fisher_releases: int) -> Noise:
    """δ (given, or 1e-5, or 1/(10·N) of the largest task when smaller), then σ and σ_F: as given,
    or under --epsilon σ_F so that the DP-Fisher releases alone cost --fisher-budget-share of ε
    for the worst group of individuals (counted at sample rate 1: the Fisher's own rate is never
    higher), and σ so that each group's training steps and Fisher releases together meet ε.
    `plans`: each dataset's PrivacyPlan (sample rate, releases per epoch, units)."""
    o = options
    largest = max(plan.units for plan in plans.values())
    if o.delta is None:
        delta = min(DEFAULT_DELTA, 1.0 / (10 * largest))
        rule = "1e-5" if delta == DEFAULT_DELTA else f"1/(10·N) with N={largest}"
        notes = [f"delta={delta:g} (default: {rule})"]
    else:
        delta = o.delta
        notes = [f"delta={delta:g} (given)"]
    if delta >= 1.0 / largest:
        raise UserError(f"--delta {delta:g} must be < 1/N = {1.0 / largest:.3g} (N = {largest}, the "
                        f"largest task): δ ≥ 1/N allows releasing an example outright")
    fisher_sigma = o.fisher_noise_multiplier or DEFAULT_FISHER_NOISE
    if o.epsilon is None:
        sigma = DEFAULT_NOISE if o.noise_multiplier is None else o.noise_multiplier
        return Noise(delta, sigma, fisher_sigma, notes)
    groups = individual_groups(tasks)
    fisher = fisher_releases if o.fisher_privacy == "dp" else 0
    name = {g: f"{g.population} in {', '.join(g.tasks)}" for g in groups}
    if fisher:
        fisher_sigma = accounting.noise_for_target(
            o.fisher_budget_share * o.epsilon, delta,
            {name[g]: ([(1.0, fisher * len(g.tasks))], []) for g in groups}, o.accountant,
            f"the DP-Fisher's ε {o.fisher_budget_share * o.epsilon:g} (--fisher-budget-share "
            f"{o.fisher_budget_share:g} of --epsilon {o.epsilon:g})")
    plan = {name[g]: ([(plans[d].sample_rate, epochs * plans[d].releases_per_epoch) for d in g.tasks],
                      [accounting.gaussian(1.0, fisher_sigma, fisher * len(g.tasks))] if fisher else [])
            for g in groups}
    sigma = accounting.noise_for_target(o.epsilon, delta, plan, o.accountant)
    fisher_text = (f" and DP-Fisher noise_multiplier={fisher_sigma:.4g} ({fisher} release(s) per task, "
                   f"{o.fisher_budget_share:g} of the budget)" if fisher else "")
    notes.append(f"noise_multiplier={sigma:.4g}{fisher_text} chosen so that every individual "
                 f"meets epsilon={o.epsilon:g} over {epochs} epoch(s) of every task that holds them")
    return Noise(delta, sigma, fisher_sigma, notes)
