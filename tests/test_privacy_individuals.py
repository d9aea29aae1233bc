"""ε composed by individual, the whole budget under --epsilon, nothing private logged, noise-only
steps, the DP-Fisher and the one-run audit: end to end through the real CLI, Opacus and an
independent accountant (Google's dp-accounting) recomputing ε from summary.json."""
from __future__ import annotations

import json
import math
import os
from pathlib import Path

import pytest
import torch

from clsim import cli, engine
from clsim.config import RunOptions
from clsim.learners.supervised import SupervisedLearner
from clsim.privacy import accounting
from clsim.privacy.audit import one_run_epsilon, p_value
from clsim.privacy.dpsgd import DPSGD, DPOptions
from clsim.privacy.ledger import Ledger, individual_groups
from conftest import SHARED, read_summary
from clsim.scenarios.split_digits import SplitDigitsOptions, split_digits
from clsim.strategies.blip import BLIP

QUIET = ("--progress", "false", "--checkpoint", "false")
CARTPOLE = ("--scenario", "cartpole", "--cartpole-tasks", "default,swap", "--ppo-timesteps", "128",
            "--ppo-envs", "4", "--ppo-steps", "16", "--ppo-epochs", "2", "--ppo-eval-episodes", "1")


@pytest.fixture(scope="module")
def mnist_root() -> Path:
    root = Path(os.environ.get("CLSIM_SHARED", SHARED)) / "data" / "mnist"
    if not (root / "train-images-idx3-ubyte.gz").is_file():
        pytest.skip("the real MNIST copy is expected in ../shared/data/mnist (or $CLSIM_SHARED/data/mnist)")
    return root


def run(tmp_path, *args) -> dict:
    out = tmp_path / f"run{len(list(tmp_path.iterdir())) if tmp_path.exists() else 0}"
    assert cli.main([*args, *QUIET, "--out", str(out)]) == 0
    return read_summary(out)


def dp_accounting_epsilon(accesses: list[dict], delta: float) -> float:
    """ε of one individual's accesses with Google's dp-accounting (RDP), independent of clsim."""
    from dp_accounting import dp_event, rdp
    if any(a["mechanism"] == "raw" for a in accesses):
        return math.inf
    acc = rdp.RdpAccountant()
    for a in accesses:
        if a["mechanism"] == "gaussian":
            event = dp_event.GaussianDpEvent(a["noise_multiplier"])
            if a["sample_rate"] < 1:
                event = dp_event.PoissonSampledDpEvent(a["sample_rate"], event)
        else:
            event = dp_event.LaplaceDpEvent(a["scale"])
        acc.compose(event, a["steps"])
    return acc.get_epsilon(delta)


def check_against_dp_accounting(summary: dict) -> None:
    """Every group's ε and epsilon_worst agree with dp-accounting within 1%."""
    privacy = summary["privacy"]
    worst = 0.0
    for group in privacy["individuals"]:
        expected = dp_accounting_epsilon(group["accesses"], privacy["delta"])
        worst = max(worst, expected)
        if math.isinf(expected):
            assert group["epsilon"] is None and group["epsilon_infinite"]
        else:
            assert group["epsilon"] == pytest.approx(expected, rel=0.01)
    reported = privacy["epsilon_worst"]
    assert (reported is None) if math.isinf(worst) else reported == pytest.approx(worst, rel=0.01)


# --- grouping individuals ------------------------------------------------------------------------

def test_split_tasks_are_disjoint_groups_and_permuted_tasks_one_group(mnist_root):
    split = split_digits(SplitDigitsOptions(), RunOptions())
    groups = individual_groups(split.tasks)
    assert [g.tasks for g in groups] == [(t.dataset_id,) for t in split.tasks]
    assert sum(g.count for g in groups) == sum(len(t.train) for t in split.tasks)
    from clsim.scenarios.mnist import PermutedMnistOptions, permuted_mnist
    permuted = permuted_mnist(PermutedMnistOptions(n_permutations=3, train_per_class=5, test_per_class=5),
                              RunOptions(data_root=str(mnist_root)))
    (group,) = individual_groups(permuted.tasks)
    assert group.tasks == tuple(t.dataset_id for t in permuted.tasks) and group.count == 50


def test_partly_overlapping_ids_split_into_three_groups_and_unknown_ids_overlap():
    from clsim.scenario import Source, Task
    a = Task(0, "a", source=Source("people", torch.tensor([0, 1, 2, 3])))
    b = Task(1, "b", source=Source("people", torch.tensor([2, 3, 4])))
    c = Task(2, "c", source=Source("others", None))
    d = Task(3, "d", source=Source("others", torch.tensor([0])))
    groups = {g.tasks: g.count for g in individual_groups([a, b, c, d])}
    assert groups == {("task0:a",): 2, ("task0:a", "task1:b"): 2, ("task1:b",): 1,
                      ("task2:c", "task3:d"): None}
    ledger = Ledger()
    ledger.declare([a, b, c, d])
    ledger.gaussian("task0:a", "training", 0.1, 1.0, 50)
    ledger.gaussian("task1:b", "training", 0.1, 1.0, 50)
    both = accounting.epsilon([accounting.gaussian(0.1, 1.0, 100)], ledger.delta)
    assert ledger.epsilon("task0:a") == ledger.epsilon("task1:b") == pytest.approx(both, rel=1e-9)
    assert ledger.worst_epsilon() == pytest.approx(both, rel=1e-9)


def test_a_laplace_release_is_recorded_and_accounted_like_dp_accounting():
    ledger = Ledger(delta=1e-6)
    ledger.record("d", "laplace", "a third-party count", 3, scale=4.0)
    ledger.gaussian("d", "training", 0.02, 1.2, 300)
    expected = dp_accounting_epsilon(ledger.report()["individuals"][0]["accesses"], 1e-6)
    assert ledger.epsilon("d") == pytest.approx(expected, rel=0.01)
    with pytest.raises(ValueError, match="no RDP curve"):
        ledger.record("d", "exponential", "unknown", 1, scale=1.0)


# --- recomputing ε from summary.json, per kind of stream ----------------------------------------

@pytest.mark.slow
def test_split_stream_composes_in_parallel_and_matches_dp_accounting(tmp_path):
    s = run(tmp_path, "--strategy", "dpsgd", "--epochs", "1", "--noise-multiplier", "1.2")
    groups = s["privacy"]["individuals"]
    assert len(groups) == 5 and all(len(g["tasks"]) == 1 for g in groups)
    check_against_dp_accounting(s)


@pytest.mark.slow
def test_permuted_stream_composes_sequentially_and_costs_more_than_one_task(tmp_path, mnist_root):
    common = ("--scenario", "permuted_mnist", "--data-root", str(mnist_root), "--train-per-class", "20",
              "--test-per-class", "5", "--mnist-hidden", "32", "--batch-size", "20", "--privacy", "dpsgd",
              "--noise-multiplier", "1.0")
    one = run(tmp_path, *common, "--n-permutations", "1")
    three = run(tmp_path, *common, "--n-permutations", "3")
    (group,) = three["privacy"]["individuals"]
    assert len(group["tasks"]) == 3 and group["count"] == 200
    assert three["privacy"]["epsilon_worst"] > 1.3 * one["privacy"]["epsilon_worst"]
    check_against_dp_accounting(three)


@pytest.mark.slow
@pytest.mark.parametrize("strategy", ["ewc", "blip"])
def test_dp_fisher_streams_match_dp_accounting(tmp_path, strategy):
    s = run(tmp_path, "--strategy", strategy, "--privacy", "dpsgd", "--epochs", "1", "--n-tasks", "2",
            "--noise-multiplier", "1.5", "--fisher-noise-multiplier", "20")
    for group in s["privacy"]["individuals"]:
        purposes = [a["purpose"] for a in group["accesses"]]
        assert purposes == ["dpsgd training", f"dp-fisher ({strategy} fisher)"]
        assert group["accesses"][1]["sample_rate"] <= 1.0
    check_against_dp_accounting(s)


@pytest.mark.slow
def test_replay_is_raw_and_infinite(tmp_path):
    # hooks: replay forwards the model twice a step, which Opacus's ghost clipping refuses
    s = run(tmp_path, "--strategy", "er", "--privacy", "dpsgd", "--epochs", "1", "--n-tasks", "2",
            "--noise-multiplier", "1.0", "--dp-clipping", "hooks")
    assert s["privacy"]["epsilon_worst"] is None
    check_against_dp_accounting(s)


@pytest.mark.slow
def test_ppo_episodes_are_fresh_individuals_per_task(tmp_path):
    s = run(tmp_path, *CARTPOLE, "--privacy", "dpsgd", "--noise-multiplier", "1.0")
    groups = s["privacy"]["individuals"]
    assert len(groups) == 2 and all(len(g["tasks"]) == 1 for g in groups)
    check_against_dp_accounting(s)


# --- --epsilon is the whole budget ---------------------------------------------------------------

@pytest.mark.parametrize("args", [
    ("--strategy", "dpsgd"),
    ("--strategy", "ewc", "--privacy", "dpsgd", "--fisher-samples", "100"),
    ("--strategy", "blip", "--privacy", "dpsgd", "--blip-fisher-samples", "100"),
    CARTPOLE + ("--privacy", "dpsgd"),
    CARTPOLE + ("--strategy", "ewc", "--privacy", "dpsgd"),
], ids=["naive", "ewc", "blip", "ppo", "ppo-ewc"])
@pytest.mark.slow
def test_the_final_ledger_epsilon_stays_within_the_target(tmp_path, args):
    target = 2.0
    extra = () if "cartpole" in args else ("--epochs", "2", "--n-tasks", "3")
    s = run(tmp_path, *args, *extra, "--epsilon", str(target))
    assert 0.9 * target <= s["privacy"]["epsilon_worst"] <= target
    if "ewc" in args or "blip" in args:   # the DP-Fisher's share was planned, not added on top
        assert any("DP-Fisher noise_multiplier" in note for note in s["privacy"]["notes"])
    check_against_dp_accounting(s)


@pytest.mark.slow
def test_permuted_epsilon_target_holds_for_the_individuals_in_every_task(tmp_path, mnist_root):
    s = run(tmp_path, "--scenario", "permuted_mnist", "--data-root", str(mnist_root), "--train-per-class", "20",
            "--test-per-class", "5", "--mnist-hidden", "32", "--batch-size", "20", "--n-permutations", "3",
            "--strategy", "ewc", "--privacy", "dpsgd", "--fisher-samples", "50", "--epsilon", "3")
    (group,) = s["privacy"]["individuals"]
    assert len(group["accesses"]) == 6 and 2.7 <= group["epsilon"] <= 3.0
    check_against_dp_accounting(s)


# --- nothing read from private training data is logged -------------------------------------------

def steps_of(summary_dir: Path) -> list[dict]:
    lines = (summary_dir / "log.jsonl").read_text().splitlines()
    return [r for r in map(json.loads, lines) if r["kind"] == "step"]


@pytest.mark.slow
def test_training_figures_are_not_logged_unless_asked_and_then_cost_infinity(tmp_path):
    base = ("--strategy", "dpsgd", "--epochs", "1", "--n-tasks", "2", "--noise-multiplier", "1.0", *QUIET)
    assert cli.main([*base, "--out", str(tmp_path / "quiet")]) == 0
    (quiet,) = (tmp_path / "quiet").iterdir()
    records = steps_of(quiet)
    assert records and not any(k in r for r in records for k in ("loss", "examples_seen"))
    summary = json.loads((quiet / "summary.json").read_text())
    assert "examples_seen" not in summary and summary["privacy"]["epsilon_worst"] is not None
    assert cli.main([*base, "--log-training-figures", "true", "--out", str(tmp_path / "loud")]) == 0
    (loud,) = (tmp_path / "loud").iterdir()
    assert all("loss" in r for r in steps_of(loud))
    summary = json.loads((loud / "summary.json").read_text())
    assert summary["privacy"]["epsilon_worst"] is None
    assert all(g["epsilon_infinite"] for g in summary["privacy"]["individuals"])


@pytest.mark.slow
def test_ppo_training_returns_are_not_logged_under_a_mechanism(tmp_path):
    assert cli.main([*CARTPOLE, "--privacy", "dpsgd", "--noise-multiplier", "1.0", *QUIET,
                     "--out", str(tmp_path)]) == 0
    (run_dir,) = tmp_path.iterdir()
    records = steps_of(run_dir)
    assert records and not any(k in r for r in records for k in ("episode_return", "env_steps", "loss"))


# --- noise-only steps keep BLIP in its intervals -------------------------------------------------

@pytest.mark.slow
def test_blip_under_dp_with_a_tiny_sample_rate_never_leaves_its_intervals():
    torch.manual_seed(0)
    scenario = split_digits(SplitDigitsOptions(n_tasks=2, hidden=16), RunOptions(setting="task_il"))
    learner = SupervisedLearner(scenario.make_model(), lr=0.5, momentum=0.0, batch_size=1,
                                device=torch.device("cpu"), generator=torch.Generator().manual_seed(0))
    mechanism = DPSGD(DPOptions(noise_multiplier=0.5, fisher_noise_multiplier=1.0))
    mechanism.check(learner, scenario, 1, fisher_releases=1)
    mechanism.attach(learner)
    strategy = BLIP(BLIP.Options(blip_fisher_samples=200))
    seen = {"empty": 0, "checked": 0}

    class Watch:
        def step(self, record):
            if strategy.tasks_done == 0:
                return
            seen["empty"] += mechanism._batch is None
            for n, (low, high) in strategy.limits().items():
                p = strategy.params[n]
                assert bool(((p >= low) & (p <= high)).all()), n
            seen["checked"] += 1

        def task(self, record):
            pass

    ledger = Ledger(**mechanism.ledger_options())
    engine.run(engine.Parts(scenario, learner, strategy, mechanism, ledger, [Watch()], epochs=1))
    assert seen["checked"] > 100 and seen["empty"] > 20     # q = 1/N: about a third of draws are empty


# --- the DP-Fisher ---------------------------------------------------------------------------------

def test_dp_fisher_without_noise_is_the_clipped_fisher_over_the_expected_count():
    from clsim.fisher import diagonal_fisher
    from clsim.privacy.dp_fisher import dp_fisher
    torch.manual_seed(0)
    scenario = split_digits(SplitDigitsOptions(hidden=16), RunOptions(setting="task_il"))
    learner = SupervisedLearner(scenario.make_model(), lr=0.1, momentum=0.0, batch_size=32,
                                device=torch.device("cpu"), generator=torch.Generator().manual_seed(0))
    task, names = scenario.tasks[0], list(learner.shared_parameters())
    big = 1e3    # clipping off; q = 1 takes every example, so both see the same examples
    g = torch.Generator().manual_seed(1)
    noisy, q = dp_fisher(learner, task, names, 10 ** 6, True, noise_multiplier=1e-16, max_grad_norm=big, generator=g, granularity="weight")
    exact = diagonal_fisher(learner, task, names, 10 ** 6, True)
    assert q == 1.0
    for n in names:
        torch.testing.assert_close(noisy[n], exact[n], rtol=1e-4, atol=1e-9)
    half, q = dp_fisher(learner, task, names, len(task.train) // 2, True, noise_multiplier=1e-16,
                        max_grad_norm=big, generator=g, granularity="weight")
    assert q == pytest.approx(0.5, abs=0.01)
    ratio = sum(float(half[n].sum()) for n in names) / sum(float(exact[n].sum()) for n in names)
    assert 0.6 < ratio < 1.4     # a Poisson sample over its expected size: unbiased, not exact


# --- the one-run audit -----------------------------------------------------------------------------

def test_one_run_p_value_and_bound_by_hand():
    # All 20 guesses right: P[Bin(20, q) >= 20] = q^20 (δ = 0), q = e^ε/(1+e^ε).
    assert p_value(100, 20, 20, 1.0, 0.0) == pytest.approx((math.e / (1 + math.e)) ** 20)
    eps = one_run_epsilon(100, 20, 20, 0.0)
    assert (1 / (1 + math.exp(-eps))) ** 20 == pytest.approx(0.05, rel=1e-3)
    assert one_run_epsilon(100, 20, 10, 1e-5) == 0.0                      # chance level: nothing
    assert one_run_epsilon(100, 20, 20, 1e-5) < eps                       # δ only weakens it


@pytest.mark.slow
def test_one_run_audit_is_clearly_positive_without_noise_and_below_the_accountant_under_dpsgd(tmp_path):
    common = ("--n-tasks", "1", "--audit", "one-run", "--audit-canaries", "60", "--audit-guesses", "10")
    plain = run(tmp_path, *common, "--epochs", "100")
    assert plain["audit"]["epsilon_lower_bound"] > 0.5 and plain["audit"]["epsilon_accountant"] is None
    for seed in range(3):
        s = run(tmp_path, *common, "--epochs", "10", "--privacy", "dpsgd", "--noise-multiplier", "1.0",
                "--seed", str(seed))
        audit = s["audit"]
        assert audit["kept"] + (audit["canaries"] - audit["kept"]) == 60 and audit["guesses"] == 20
        assert audit["epsilon_lower_bound"] <= audit["epsilon_accountant"] == s["privacy"]["epsilon_worst"]
