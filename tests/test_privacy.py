"""DP-SGD, DPlis, the ledger and the audit, checked on real data (scikit-learn digits) and real
Opacus steps; ε is cross-checked with Google's dp-accounting."""
from __future__ import annotations

import json
import math

import pytest
import torch
from torch import nn

from clsim import cli, config, engine
from clsim.config import RunOptions
from clsim.errors import UserError
from clsim.learners.supervised import SupervisedLearner
from clsim.models import MLP, MultiHeadNet
from clsim.privacy import accounting
from clsim.privacy.audit import mia_heuristic_epsilon, roc_auc
from clsim.privacy.dplis import DPlis
from clsim.privacy.dpsgd import DPSGD
from clsim.privacy.ledger import Ledger
from clsim.strategy import Strategy
from clsim.scenarios.split_digits import SplitDigitsOptions, split_digits
from conftest import read_summary, run_cli


def make(mechanism_cls, setting="task_il", seed=0, batch_size=32, model=None, epochs=1, **options):
    """A split_digits learner under a mechanism that has been checked and set up."""
    torch.manual_seed(seed)
    scenario = split_digits(SplitDigitsOptions(hidden=16), RunOptions(setting=setting))
    learner = SupervisedLearner(model or scenario.make_model(), lr=0.1, momentum=0.0, batch_size=batch_size,
                                device=torch.device("cpu"), generator=torch.Generator().manual_seed(seed))
    mechanism = mechanism_cls(config.build(mechanism_cls.Options, options))
    mechanism.check(learner, scenario, epochs)
    mechanism.attach(learner)
    ledger = Ledger(**mechanism.ledger_options())
    mechanism.setup(learner, scenario, ledger)
    return scenario, learner, mechanism, ledger


def first_batch(scenario, learner, mechanism, task_index=0):
    task = scenario.tasks[task_index]
    optimizer = mechanism.before_task(task, learner.make_optimizer())
    batch = next(iter(mechanism.batches(task, 0, None)))
    optimizer.zero_grad(set_to_none=True)
    return task, optimizer, batch


# --- accounting ------------------------------------------------------------------------------

@pytest.mark.parametrize("q,sigma,steps,delta", [(0.01, 1.1, 1000, 1e-5), (0.1, 0.8, 50, 1e-5),
                                                 (0.004, 2.0, 5000, 1e-6), (0.25, 5.0, 20, 1e-5),
                                                 (1.0, 10.0, 1, 1e-5)])
def test_ledger_epsilon_matches_google_dp_accounting(q, sigma, steps, delta):
    from dp_accounting import dp_event, rdp
    ledger = Ledger(delta=delta)
    ledger.gaussian("d", "training", q, sigma, steps - 1)
    ledger.gaussian("d", "training", q, sigma, 1)          # merges into one access
    reference = rdp.RdpAccountant()
    reference.compose(dp_event.PoissonSampledDpEvent(q, dp_event.GaussianDpEvent(sigma)), steps)
    assert len(ledger.accesses["d"]) == 1
    assert ledger.epsilon("d") == pytest.approx(reference.get_epsilon(delta), rel=0.01)


def test_composed_accesses_match_dp_accounting_and_raw_is_infinite():
    from dp_accounting import dp_event, rdp
    ledger = Ledger(delta=1e-5)
    ledger.gaussian("a", "dpsgd training", 0.05, 1.0, 200)
    ledger.gaussian("a", "dp-fisher", 1.0, 10.0, 1)
    ledger.gaussian("b", "dpsgd training", 0.05, 1.0, 100)
    reference = rdp.RdpAccountant()
    reference.compose(dp_event.PoissonSampledDpEvent(0.05, dp_event.GaussianDpEvent(1.0)), 200)
    reference.compose(dp_event.GaussianDpEvent(10.0), 1)
    assert ledger.epsilon("a") == pytest.approx(reference.get_epsilon(1e-5), rel=0.01)
    assert ledger.worst_epsilon() == ledger.epsilon("a") > ledger.epsilon("b")
    ledger.raw("b", "ewc fisher")
    report = ledger.report()
    assert report["datasets"]["b"]["epsilon"] is None and report["datasets"]["b"]["epsilon_infinite"]
    assert report["epsilon_worst"] is None
    # The report is enough to recompute ε.
    a = report["datasets"]["a"]
    again = accounting.epsilon(a["accesses"], report["delta"])
    assert again == pytest.approx(a["epsilon"], rel=1e-9)


def test_target_epsilon_sets_noise_for_the_worst_dataset():
    scenario, learner, mechanism, ledger = make(DPSGD, epsilon=2.0, epochs=3)
    per_dataset = {d: accounting.epsilon([accounting.gaussian(q, mechanism.sigma, 3 * mechanism.steps_per_epoch[d])],
                                         ledger.delta)
                   for d, q in mechanism.sample_rate.items()}
    assert max(per_dataset.values()) <= 2.0
    assert max(per_dataset.values()) >= 1.95        # not needlessly noisy
    assert len(set(round(v, 6) for v in per_dataset.values())) > 1   # tasks differ in size


@pytest.mark.parametrize("accountant", ["rdp", "prv"])
def test_a_noise_multiplier_too_small_to_account_is_no_noise(accountant):
    """σ² underflowed to a division by zero in Opacus's RDP analysis (a fuzzed --noise-multiplier
    5e-324), and PRV's grid overflowed at σ = 0: such σ count as no noise, ε = ∞."""
    for sigma in (0.0, 5e-324, 1e-200):
        assert accounting.epsilon([accounting.gaussian(0.05, sigma, 10)], 1e-5, accountant) == math.inf


def test_prv_gives_way_to_rdps_bound_where_its_grid_would_not_fit():
    tiny = [accounting.gaussian(0.01, 0.001, 10)]   # PRV asked numpy for 237 GiB
    assert accounting.epsilon(tiny, 1e-5, "prv") == accounting.epsilon(tiny, 1e-5, "rdp") > accounting.PRV_MAX_EPSILON
    usual = [accounting.gaussian(1.0, 1.0, 10)]     # where it fits, PRV's tighter figure
    assert accounting.epsilon(usual, 1e-5, "prv") < accounting.epsilon(usual, 1e-5, "rdp")


# --- one real step -----------------------------------------------------------------------------

def reference_grads(learner, batch, params, perturbations=None):
    """Per-example gradients one example at a time with plain autograd (averaged over the given
    parameter perturbations, if any): slow but obviously right."""
    names = list(params)
    rows = []
    for i in range(len(batch.y)):
        one = type(batch)(batch.x[i:i + 1], batch.y[i:i + 1], batch.t[i:i + 1], batch.index[i:i + 1])
        shifts = perturbations or [{n: torch.zeros_like(p) for n, p in params.items()}]
        total = {n: torch.zeros_like(p) for n, p in params.items()}
        for shift in shifts:
            with torch.no_grad():
                for n in names:
                    params[n].add_(shift[n])
            g = torch.autograd.grad(learner.forward(one)[0].sum(), [params[n] for n in names])
            with torch.no_grad():
                for n in names:
                    params[n].sub_(shift[n])
            for n, gi in zip(names, g):
                total[n] += gi / len(shifts)
        rows.append(total)
    return {n: torch.stack([r[n] for r in rows]) for n in names}


@pytest.mark.parametrize("mechanism_cls,extra", [
    (DPSGD, {"dp_clipping": "hooks"}), (DPSGD, {"dp_clipping": "ghost"}), (DPSGD, {"dp_clipping": "bk"}),
    (DPlis, {"dplis_k": 3, "dplis_radius": 500.0}),
    (DPlis, {"dplis_k": 3, "dplis_radius": 500.0, "dplis_k_chunk": 2})])     # copies vectorised too
def test_every_per_example_gradient_reaching_the_optimizer_is_clipped(mechanism_cls, extra):
    C = 0.05
    scenario, learner, mechanism, ledger = make(mechanism_cls, noise_multiplier=1.0, max_grad_norm=C, **extra)
    task, optimizer, batch = first_batch(scenario, learner, mechanism)
    optimizer.noise_multiplier = 0.0   # σ = 1 sizes DPlis's perturbations; no noise, so sums are checkable
    used = {n: p for n, p in learner.model.named_parameters() if not n.startswith("heads.") or
            n.startswith("heads.0.")}
    perturbations = None
    if mechanism_cls is DPlis:
        state = mechanism.perturb_generator.get_state()
        g = torch.Generator().set_state(state)
        s = extra["dplis_radius"] * learner.lr * mechanism.sigma * C / learner.batch_size
        draws = {n: s * torch.randn((extra["dplis_k"], *p.shape), generator=g) for n, p in used.items()}
        perturbations = [{n: d[k] for n, d in draws.items()} for k in range(extra["dplis_k"])]
    snapshot = {n: p.detach().clone() for n, p in learner.model.named_parameters()}
    with mechanism.hooks_lifted():                             # plain autograd, no Opacus hooks
        expected = reference_grads(learner, batch, used, perturbations)
    losses, _ = learner.forward(batch)
    mechanism.backward(losses, None)
    norms = sum(e.flatten(1).pow(2).sum(1) for e in expected.values()).sqrt()
    assert (norms > C).all()                                   # so clipping really acts
    factor = (C / (norms + 1e-6)).clamp(max=1.0)
    clipped_norms = norms * factor
    assert (clipped_norms <= C * (1 + 1e-6)).all()
    for n, p in learner.model.named_parameters():
        if n in used:
            if mechanism.clipping == "hooks":                   # ghost and bk store no rows in grad_sample
                assert p.grad_sample.shape[0] == len(batch.y)   # one row per example, not K per example
                torch.testing.assert_close(p.grad_sample, expected[n], rtol=1e-4, atol=1e-6)
            summed = torch.einsum("i,i...->...", factor, expected[n])
            torch.testing.assert_close(p.grad * learner.batch_size, summed, rtol=1e-4, atol=1e-6)
        else:                       # other tasks' heads: no gradient, no noise-only update
            assert p.grad is None
    mechanism.step(optimizer)
    assert torch.equal(learner.model.heads[1].weight, snapshot["heads.1.weight"])
    assert ledger.accesses[task.dataset_id][-1]["steps"] == 1


def test_dplis_sum_form_clips_each_examples_sum_over_the_copies_as_the_authors_code_does():
    """wangwenxiao/DPlis dp_train.py, --mode smooth_loss: per example Σ_k ∇ℓ(θ + u_k; x_i), clipped
    to C, summed over the batch, plus N(0, σ²C²). The default mean form clips Σ_k/K instead."""
    C, K, radius = 1.0, 3, 20.0
    scenario, learner, mechanism, ledger = make(DPlis, noise_multiplier=1.0, max_grad_norm=C, dplis_k=K,
                                                dplis_radius=radius, dplis_aggregate="sum")
    task, optimizer, batch = first_batch(scenario, learner, mechanism)
    optimizer.noise_multiplier = 0.0
    used = {n: p for n, p in learner.model.named_parameters() if not n.startswith("heads.") or
            n.startswith("heads.0.")}
    g = torch.Generator().set_state(mechanism.perturb_generator.get_state())
    s = radius * learner.lr * mechanism.sigma * C / learner.batch_size
    draws = {n: s * torch.randn((K, *p.shape), generator=g) for n, p in used.items()}
    with mechanism.hooks_lifted():
        mean = reference_grads(learner, batch, used, [{n: d[k] for n, d in draws.items()} for k in range(K)])
    losses, _ = learner.forward(batch)
    mechanism.backward(losses, None)

    def clipped_sum(rows):
        norms = sum(r.flatten(1).pow(2).sum(1) for r in rows.values()).sqrt()
        return norms, {n: torch.einsum("i,i...->...", (C / (norms + 1e-6)).clamp(max=1.0), r) for n, r in rows.items()}
    mean_norms, mean_form = clipped_sum(mean)
    _, sum_form = clipped_sum({n: K * r for n, r in mean.items()})
    assert (mean_norms < C).any()                # so the two forms differ on this batch
    for n, p in used.items():
        torch.testing.assert_close(p.grad_sample, K * mean[n], rtol=1e-4, atol=1e-6)    # one row per example
        torch.testing.assert_close(p.grad * learner.batch_size, sum_form[n], rtol=1e-4, atol=1e-6)
    assert any(not torch.allclose(sum_form[n], mean_form[n], rtol=1e-3) for n in used)


@pytest.mark.parametrize("mechanism_cls", [DPSGD, DPlis])
def test_noise_has_std_sigma_c_over_b_on_a_zero_gradient_model(mechanism_cls):
    sigma, C, B = 2.0, 0.5, 32
    scenario, learner, mechanism, ledger = make(mechanism_cls, noise_multiplier=sigma, max_grad_norm=C,
                                                batch_size=B)
    task, optimizer, batch = first_batch(scenario, learner, mechanism)
    losses, _ = learner.forward(batch)
    mechanism.backward(losses * 0.0, None)                    # every per-example gradient is exactly 0
    noise = torch.cat([p.grad.flatten() for p in learner.model.parameters() if p.grad is not None])
    assert noise.numel() > 1000
    assert noise.std().item() == pytest.approx(sigma * C / B, rel=0.08)
    assert abs(noise.mean().item()) < 4 * sigma * C / B / math.sqrt(noise.numel())


def train_steps(mechanism_cls, steps=3, **options):
    scenario, learner, mechanism, ledger = make(mechanism_cls, seed=3, noise_multiplier=1.0,
                                                max_grad_norm=0.5, **options)
    task = scenario.tasks[0]
    optimizer = mechanism.before_task(task, learner.make_optimizer())
    batches = mechanism.batches(task, 0, None)
    for _ in range(steps):
        batch = next(batches)
        losses, _ = learner.forward(batch)
        optimizer.zero_grad(set_to_none=True)
        mechanism.backward(losses, None)
        mechanism.step(optimizer)
    return learner.model.state_dict(), ledger


def test_dplis_with_radius_zero_and_one_copy_is_dpsgd():
    a, ledger_a = train_steps(DPSGD)
    b, ledger_b = train_steps(DPlis, dplis_k=1, dplis_radius=0.0)
    for name in a:
        torch.testing.assert_close(a[name], b[name], rtol=0, atol=1e-6)
    assert ledger_a.epsilon("task0:0-1") == ledger_b.epsilon("task0:0-1") > 0
    c, _ = train_steps(DPlis, dplis_k=2, dplis_radius=200.0)    # and smoothing does change the update
    assert max((a[n] - c[n]).abs().max().item() for n in a) > 1e-4


@pytest.mark.parametrize("strategy", ["lwf", "icarl", "joint", "gdumb"])
def test_dplis_refuses_a_strategy_whose_loss_terms_it_would_leave_out(strategy, tmp_path, capsys):
    """Its smoothed gradients re-evaluate the learner's own loss on its sampled batch: LwF under dplis
    trained without its distillation (exit 0, a silently different method); iCaRL trained task 0 on
    cross-entropy; joint and GDumb, whose batches are their own, were refused only after task 0."""
    out = tmp_path / "o"
    assert cli.main(["--strategy", strategy, "--privacy", "dplis", "--noise-multiplier", "1", "--n-tasks", "2",
                     "--epochs", "1", "--progress", "false", "--out", str(out)]) == 2
    errors = [line for line in capsys.readouterr().err.splitlines() if line.startswith("error: ")]
    assert len(errors) == 1 and "dplis re-evaluates the learner's own loss" in errors[0] and not out.exists()


# --- Fisher and the ledger -------------------------------------------------------------------

def test_raw_fisher_is_infinite_and_dp_fisher_is_accounted():
    scenario, learner, mechanism, ledger = make(DPSGD, fisher_privacy="raw")
    names = list(learner.shared_parameters())
    mechanism.fisher(scenario.tasks[0], names, 100, False, "ewc fisher")
    assert math.isinf(ledger.epsilon("task0:0-1"))
    scenario, learner, mechanism, ledger = make(DPSGD, fisher_noise_multiplier=5.0, fisher_max_grad_norm=0.1)
    fisher = mechanism.fisher(scenario.tasks[0], names, 100, False, "ewc fisher")
    assert set(fisher) == set(names) and all((f >= 0).all() for f in fisher.values())
    access = ledger.accesses["task0:0-1"][-1]
    # Poisson-sampled: rate n/N of the task's examples (add/remove adjacency)
    assert (access["sample_rate"], access["noise_multiplier"], access["steps"]) == \
        (100 / len(scenario.tasks[0].train), 5.0, 1)
    assert 0 < ledger.epsilon("task0:0-1") < math.inf


class NormedBackbone(nn.Module):
    """An MLP followed by a normalisation layer (module level: the validator pickles models)."""

    def __init__(self, norm):
        super().__init__()
        self.body, self.norm, self.out_features = MLP(64, (16,)), norm, 16

    def forward(self, x):
        return self.norm(self.body(x))


class RunningScale(nn.Module):
    """Trainable and stateful: Opacus cannot give it per-example gradients."""

    def __init__(self):
        super().__init__()
        self.scale = nn.Parameter(torch.ones(16))
        self.register_buffer("seen", torch.zeros(1))

    def forward(self, x):
        return x * self.scale


def test_batchnorm_is_replaced_and_unsupported_layers_are_named():
    model = MultiHeadNet(NormedBackbone(nn.BatchNorm1d(16)), [2] * 5)
    _, learner, mechanism, ledger = make(DPSGD, model=model)
    assert not any(isinstance(m, nn.BatchNorm1d) for m in learner.model.modules())
    assert any(isinstance(m, nn.GroupNorm) for m in learner.model.modules())
    assert any("backbone.norm" in note and "GroupNorm" in note for note in ledger.notes)
    with pytest.raises(UserError, match="backbone.norm"):
        make(DPSGD, model=MultiHeadNet(NormedBackbone(RunningScale()), [2] * 5))


# --- the audit ---------------------------------------------------------------------------------

def test_auc_matches_scikit_learn_and_the_mia_heuristic_separates_apart_from_alike_scores():
    from sklearn.metrics import roc_auc_score
    g = torch.Generator().manual_seed(0)
    members, nonmembers = torch.randn(300, generator=g) + 0.7, torch.randn(300, generator=g)
    members[:20] = nonmembers[:20]                             # ties
    labels = [1] * 300 + [0] * 300
    assert roc_auc(members, nonmembers) == pytest.approx(roc_auc_score(labels, torch.cat([members, nonmembers])))
    same = mia_heuristic_epsilon(torch.randn(400, generator=g), torch.randn(400, generator=g), 1e-5, g)
    apart = mia_heuristic_epsilon(torch.randn(400, generator=g) + 6, torch.randn(400, generator=g), 1e-5, g)
    assert same < 0.5 < apart < math.inf


# --- the real CLI ------------------------------------------------------------------------------

@pytest.mark.slow
def test_ewc_under_dpsgd_through_the_cli_has_finite_epsilon_and_an_audit(tmp_path):
    run_cli("--strategy", "ewc", "--privacy", "dpsgd", "--setting", "task_il", "--epochs", "1",
            "--fisher-samples", "100", "--noise-multiplier", "1.5", "--audit", "mia",
            "--audit-examples", "100", "--seed", "1", out=tmp_path)
    summary = read_summary(tmp_path)
    privacy = summary["privacy"]
    assert summary["privacy_mechanism"] == "dpsgd"
    assert len(privacy["datasets"]) == 5
    for name, d in privacy["datasets"].items():
        purposes = [a["purpose"] for a in d["accesses"]]
        assert purposes == ["dpsgd training", "dp-fisher (ewc fisher)"], purposes
        assert 0 < d["epsilon"] < 10 and not d["epsilon_infinite"]
        audit = summary["audit"]["tasks"][name]
        assert audit["epsilon_accountant"] == d["epsilon"]
        # the heuristic promises a figure >= 0 and no bound: no key reads as one
        assert 0 <= audit["auc"] <= 1 and audit["mia_heuristic_epsilon"] >= 0
        assert not any("bound" in key for key in [*audit, *summary["audit"]])
    run = next(p for p in tmp_path.iterdir() if p.is_dir())
    steps = [json.loads(line) for line in (run / "log.jsonl").read_text().splitlines()]
    eps = [r["privacy/epsilon"] for r in steps if r["kind"] == "step"]
    assert eps == sorted(eps) and eps[-1] == pytest.approx(privacy["epsilon_worst"], rel=0.05)


@pytest.mark.parametrize("args,message", [
    (["--strategy", "dpsgd", "--epsilon", "1e-9"], "--epsilon 1e-09 cannot be met"),
    (["--strategy", "ewc", "--privacy", "dpsgd", "--epsilon", "1e-4"],   # it named the share as --epsilon
     "the DP-Fisher's ε 1e-05 (--fisher-budget-share 0.1 of --epsilon 0.0001) cannot be met"),
    (["--strategy", "dpsgd", "--delta", "0.01"], "must be < 1/N"),
    (["--strategy", "dpsgd", "--audit", "one-run", "--audit-canaries", "10", "--audit-guesses", "6"],
     "--audit-guesses 6 guesses on each side of the --audit-canaries 10"),   # was cut to 5 silently
    (["--strategy", "dpsgd", "--epsilon", "3", "--noise-multiplier", "1"], "not both"),
    (["--strategy", "dpsgd", "--batch-size", "5000"], "exceeds"),
    (["--strategy", "dplis", "--dplis-k", "0"], "--dplis-k must be >= 1"),
    (["--strategy", "dpsgd", "--max-grad-norm", "0"], "--max-grad-norm must be > 0"),
    (["--privacy", "dpsgd", "--accountant", "pld"], "--accountant 'pld' is not one of"),
    (["--privacy", "nope"], "unknown privacy mechanism"),
])
def test_bad_privacy_options_exit_2_with_one_clear_line(args, message, tmp_path, capsys):
    assert cli.main([*args, "--out", str(tmp_path)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and message in err[0], err
    assert not any(tmp_path.iterdir())


@pytest.mark.slow
def test_bad_option_exit_status_from_a_real_process(tmp_path):
    proc = run_cli("--strategy", "dpsgd", "--delta", "0.5", out=tmp_path, check=False)
    assert proc.returncode == 2 and "Traceback" not in proc.stderr and "--delta" in proc.stderr


class Counting(Strategy):
    """Counts the hooks the engine runs, with a real penalty (pull toward zero)."""

    def __init__(self):
        super().__init__()
        self.penalties = self.after_steps = 0

    def penalty(self):
        self.penalties += 1
        return 0.5 * sum(p.pow(2).sum() for p in self.learner.model.parameters())

    def after_step(self):
        self.after_steps += 1


class Steps:
    def __init__(self):
        self.records = []

    def step(self, record):
        self.records.append(record)

    def task(self, record):
        pass


@pytest.mark.slow
def test_empty_poisson_draws_are_steps_with_the_penalty_and_after_step():
    scenario, learner, mechanism, ledger = make(DPSGD, batch_size=1, noise_multiplier=1.0)
    scenario.tasks[:] = scenario.tasks[:1]
    strategy, steps = Counting(), Steps()
    engine.run(engine.Parts(scenario, learner, strategy, mechanism, ledger, [steps], epochs=1))
    releases = mechanism.steps_per_epoch[scenario.tasks[0].dataset_id]    # q = 1/N: ~1/e of draws empty
    assert ledger.accesses[scenario.tasks[0].dataset_id][-1]["steps"] == releases
    assert strategy.penalties == strategy.after_steps == len(steps.records) == releases
    # Under the mechanism no record carries the batch's loss or size, empty draw or not.
    assert not any("loss" in r or "examples_seen" in r for r in steps.records)


def test_joint_under_dpsgd_marks_every_dataset_it_trains_on_in_its_own_batches_raw():
    from clsim.strategies.joint import Joint
    scenario, learner, mechanism, ledger = make(DPSGD, noise_multiplier=1.0)
    strategy = Joint()
    strategy.setup(learner, scenario, mechanism)
    first, second = scenario.tasks[:2]
    strategy.before_task(first)                 # alone: the mechanism's Poisson batches, accounted
    assert ledger.epsilon(first.dataset_id) == 0.0
    strategy.before_task(second)                # from now on joint's own shuffled batches
    assert math.isinf(ledger.epsilon(first.dataset_id)) and math.isinf(ledger.epsilon(second.dataset_id))
