"""EWC's penalty equals its definition, term by term, in both modes (real digits, real Fisher)."""
import pytest
import torch

from clsim import Experiment
from clsim.config import RunOptions
from clsim.metrics import tensor_bytes
from clsim.privacy.mechanism import Mechanism
from clsim.scenarios.split_digits import SplitDigitsOptions, split_digits
from clsim.strategies.ewc import EWC


class RecordingMechanism(Mechanism):
    """No privacy; keeps a copy of every Fisher it hands out, for the reference penalty."""

    def setup(self, learner, scenario, ledger):
        super().setup(learner, scenario, ledger)
        self.fishers = []

    def fisher(self, *args, **kwargs):
        fisher = super().fisher(*args, **kwargs)
        self.fishers.append({n: f.clone() for n, f in fisher.items()})
        return fisher


def set_up(scenario, ewc, mechanism=None):
    """The learner of `scenario` with `ewc` set up on it (Experiment.build, nothing trained)."""
    return Experiment(scenario=scenario, strategy=ewc, privacy=mechanism or Mechanism(), lr=0.1, batch_size=32,
                      seed=0, progress=False, out=None).build().learner


def run_tasks(mode, gamma=1.0, lam=7.0, n_tasks=4, penalty="half"):
    """Three tasks' Fishers at three different weights, then the weights moved once more."""
    scenario = split_digits(SplitDigitsOptions(hidden=16), RunOptions(setting="task_il"))
    mechanism = RecordingMechanism()
    ewc = EWC(EWC.Options(ewc_lambda=lam, mode=mode, gamma=gamma, fisher="empirical", fisher_samples=200,
                          ewc_penalty=penalty))
    learner = set_up(scenario, ewc, mechanism)
    anchors, state_bytes = [], []
    for task in scenario.tasks[:n_tasks - 1]:
        with torch.no_grad():
            for p in learner.model.parameters():
                p.add_(0.3 * torch.randn_like(p))
        ewc.after_task(task)
        anchors.append({n: p.detach().clone() for n, p in learner.model.named_parameters()})
        state_bytes.append(tensor_bytes(ewc.state_tensors()))
    with torch.no_grad():
        for p in learner.model.parameters():
            p.add_(0.3 * torch.randn_like(p))
    return learner, ewc, mechanism.fishers, anchors, state_bytes


def value_and_grad(penalty, learner):
    params = [p for p in learner.model.parameters()]
    grads = torch.autograd.grad(penalty, params, allow_unused=True)
    return penalty.item(), [torch.zeros_like(p) if g is None else g for p, g in zip(params, grads)]


@pytest.mark.parametrize("penalty, factor", [("half", 0.5), ("full", 1.0)])
def test_separate_mode_is_the_sum_of_every_tasks_term(penalty, factor):
    """(λ/2)·Σ_t F_t (θ - θ*_t)² by default (Kirkpatrick et al., van de Ven's code); λ·Σ ... under
    --ewc-penalty full (Mammoth's ewc_on and Avalanche's EWCPlugin have no ½)."""
    learner, ewc, fishers, anchors, state_bytes = run_tasks("separate", penalty=penalty)
    assert len(fishers) == 3 and not any(n.startswith("heads.") for n in fishers[0])   # heads excluded
    params = dict(learner.model.named_parameters())
    reference = factor * 7.0 * sum((f[n] * (params[n] - a[n]).pow(2)).sum() for f, a in zip(fishers, anchors) for n in f)
    ours, ours_grad = value_and_grad(ewc.penalty(), learner)
    ref, ref_grad = value_and_grad(reference, learner)
    assert ours == pytest.approx(ref, rel=1e-5) and ref > 0
    for g, r in zip(ours_grad, ref_grad):
        torch.testing.assert_close(g, r, rtol=1e-4, atol=1e-6 * float(r.abs().max()) + 1e-12)
    # one quadratic whatever the number of tasks: two vectors of the shared weights
    shared = sum(p.numel() for n, p in learner.shared_parameters().items())
    assert state_bytes == [2 * 4 * shared] * 3


@pytest.mark.parametrize("penalty, factor", [("half", 0.5), ("full", 1.0)])
def test_online_mode_decays_the_running_fisher_and_anchors_at_the_last_task(penalty, factor):
    learner, ewc, fishers, anchors, _ = run_tasks("online", gamma=0.5, penalty=penalty)
    running = fishers[0]
    for f in fishers[1:]:
        running = {n: 0.5 * running[n] + f[n] for n in f}
    params = dict(learner.model.named_parameters())
    reference = factor * 7.0 * sum((running[n] * (params[n] - anchors[-1][n]).pow(2)).sum() for n in running)
    ours, ours_grad = value_and_grad(ewc.penalty(), learner)
    ref, ref_grad = value_and_grad(reference, learner)
    assert ours == pytest.approx(ref, rel=1e-5) and ref > 0
    for g, r in zip(ours_grad, ref_grad):
        torch.testing.assert_close(g, r, rtol=1e-4, atol=1e-6 * float(r.abs().max()) + 1e-12)


def test_no_penalty_before_the_first_fisher():
    scenario = split_digits(SplitDigitsOptions(hidden=16), RunOptions(setting="task_il"))
    ewc = EWC(EWC.Options())
    set_up(scenario, ewc)
    assert ewc.penalty() is None and ewc.state_tensors() == []


@pytest.mark.parametrize("given,recommended,used", [(None, None, 10.0), (None, 1e4, 1e4), (3.0, 1e4, 3.0)])
def test_lambda_defaults_to_the_scenarios_recommendation_and_a_given_one_wins(given, recommended, used):
    scenario = split_digits(SplitDigitsOptions(hidden=8), RunOptions(setting="task_il"))
    if recommended is not None:
        scenario.defaults["ewc_lambda"] = recommended
    ewc = EWC(EWC.Options(ewc_lambda=given, fisher_samples=50))
    learner = set_up(scenario, ewc)
    ewc.after_task(scenario.tasks[0])
    with torch.no_grad():
        for p in learner.model.parameters():
            p.add_(0.1)
    quadratic = sum((ewc.importance * (ewc._flat() - ewc.anchor).square()).tolist())
    assert ewc.penalty().item() == pytest.approx(0.5 * used * quadratic, rel=1e-4)
    assert ewc.task_metrics()["ewc_lambda"] == used
