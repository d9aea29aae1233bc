"""DP-SGD on PPO with the episode as the privacy unit: whole-episode rollouts, one clipped
gradient per episode (real Opacus, real CartPole), and accounting per rollout."""
from __future__ import annotations

import pytest
import torch

from clsim import config
from clsim.config import RunOptions
from clsim.rl import ActorCritic, Categorical, PPOLearner, mlp_trunk
from clsim.privacy import accounting
from clsim.privacy.dpsgd import DPSGD
from clsim.privacy.ledger import Ledger
from clsim.registry import SCENARIOS
from clsim.cli import main
from conftest import read_summary
from test_rl_ppo import count_task, learner_for


def private_batches(length: int, limit: int | None, **options):
    torch.manual_seed(0)
    learner = learner_for(ActorCritic(mlp_trunk(1, 8), Categorical(2), 1), **options)
    task = count_task(length, limit)
    return learner, list(learner.private_batches(task, 0))


def test_each_rollout_keeps_one_whole_episode_per_env_and_poisson_samples_them():
    # CountEnv observes the step count: an episode of length 3 is exactly the observations 0, 1, 2.
    learner, draws = private_batches(3, None, ppo_envs=3, ppo_steps=8, ppo_epochs=2, ppo_timesteps=48,
                                     ppo_dp_sample_rate=0.5)
    updates = 2 * 2                                            # epochs x round(1/q), per rollout
    assert len(draws) == 2 * updates                           # 48 / (3 envs x 8 steps) = 2 rollouts
    assert any(d is None for d in draws)                       # empty Poisson draws are kept as None
    batches = [b for b in draws if b is not None]
    sizes = []
    for b in batches:
        for e in b.index.unique().tolist():
            assert 0 <= e < 3
            assert b.x[b.index == e, 0].tolist() == [0.0, 1.0, 2.0]    # the whole episode, nothing after
        sizes.append(len(b.index.unique()))
    assert 0.25 < sum(sizes) / (3 * len(draws)) < 0.75        # about q of the episodes per update
    # Rollouts stop once every env ended its episode: 3 steps, not 8.
    assert learner.env_steps == 2 * 3 * 3


def test_an_episode_cut_at_ppo_steps_bootstraps_its_value():
    learner, draws = private_batches(100, None, ppo_envs=2, ppo_steps=5, ppo_epochs=1, ppo_timesteps=10,
                                     ppo_gamma=0.9, ppo_gae_lambda=0.5)
    (batch,) = draws                                           # q = 1: every episode, one update
    assert batch.x[batch.index == 0, 0].tolist() == [0.0, 1.0, 2.0, 3.0, 4.0]
    with torch.no_grad():
        v_next = learner.model(torch.tensor([[5.0]]))[1].item()
    last = batch.ret[batch.index == 0][-1].item()              # the return target of the last step
    assert last == pytest.approx(1.0 + 0.9 * v_next, rel=1e-5)


def cartpole_under_dpsgd(**dp_options):
    """The real cartpole scenario and PPO learner under DP-SGD, checked and set up."""
    entry = SCENARIOS.get("cartpole")
    options = config.build(entry.options, {"cartpole_tasks": "default", "ppo_timesteps": 64, "ppo_envs": 4,
                                           "ppo_steps": 16, "ppo_eval_episodes": 1})
    torch.manual_seed(0)
    scenario = entry.target(options, RunOptions())
    learner = PPOLearner(scenario.make_model(), options=options, lr=1e-3, momentum=0.0, batch_size=64,
                         device=torch.device("cpu"), generator=torch.Generator().manual_seed(0))
    mechanism = DPSGD(config.build(DPSGD.Options, dp_options))
    mechanism.check(learner, scenario, 1)
    mechanism.attach(learner)
    ledger = Ledger(**mechanism.ledger_options())
    mechanism.setup(learner, scenario, ledger)
    return scenario.tasks[0], learner, mechanism, ledger


def test_each_episode_contributes_one_clipped_gradient_the_sum_of_its_transitions():
    C = 0.01
    task, learner, mechanism, ledger = cartpole_under_dpsgd(noise_multiplier=1.0, max_grad_norm=C)
    optimizer = mechanism.before_task(task, learner.make_optimizer())
    optimizer.noise_multiplier = 0.0                           # no noise, so the sum is checkable
    batch = next(iter(mechanism.batches(task, 0, None)))
    episodes = batch.index.unique()
    assert len(episodes) == 4 and len(batch.index) > 4        # several transitions per episode
    params = dict(learner.model.named_parameters())
    used = {n: p for n, p in params.items() if not n.startswith(("heads.1", "critics.1"))}
    with mechanism.hooks_lifted():                             # reference: plain autograd per episode
        losses, _ = learner.forward(batch)
        expected = {n: [] for n in used}
        for e in episodes:
            grads = torch.autograd.grad(losses[batch.index == e].sum(), list(used.values()), retain_graph=True)
            for n, g in zip(used, grads):
                expected[n].append(g)
    expected = {n: torch.stack(g) for n, g in expected.items()}
    optimizer.zero_grad(set_to_none=True)
    losses, _ = learner.forward(batch)
    mechanism.backward(losses, None)
    norms = sum(g.flatten(1).pow(2).sum(1) for g in expected.values()).sqrt()
    assert (norms > C).all()                                   # clipping acts on every episode
    factor = (C / (norms + 1e-6)).clamp(max=1.0)
    expected_batch = mechanism.plans[task.dataset_id].expected_batch
    for n, p in used.items():
        torch.testing.assert_close(p.grad_sample, expected[n], rtol=1e-4, atol=1e-7)   # one row per episode
        summed = torch.einsum("i,i...->...", factor, expected[n])
        torch.testing.assert_close(p.grad * expected_batch, summed, rtol=1e-4, atol=1e-7)
    assert ledger.accesses[task.dataset_id][-1]["steps"] == 1


@pytest.mark.slow
def test_epsilon_counts_one_rollout_of_releases_however_many_rollouts_run(tmp_path):
    sigma, epochs = 1.5, 3
    figures = []
    for timesteps in (64, 192):                                # 1 and 3 rollouts of 4 envs x 16 steps
        out = tmp_path / str(timesteps)
        assert main(["--scenario", "cartpole", "--cartpole-tasks", "default", "--ppo-envs", "4", "--ppo-steps", "16",
                     "--ppo-timesteps", str(timesteps), "--ppo-epochs", str(epochs), "--ppo-dp-sample-rate", "0.5",
                     "--ppo-eval-episodes", "2", "--privacy", "dpsgd", "--noise-multiplier", str(sigma),
                     "--progress", "false", "--out", str(out)]) == 0
        s = read_summary(out)
        (access,) = s["privacy"]["datasets"]["task0:default"]["accesses"]
        figures.append((access["steps"], s["privacy"]["epsilon_worst"]))
    assert figures[0] == figures[1]
    steps, epsilon = figures[0]
    assert steps == epochs * 2                                 # ppo_epochs x round(1/q)
    assert epsilon == pytest.approx(accounting.epsilon([accounting.gaussian(0.5, sigma, steps)], 1e-5), rel=1e-9)


@pytest.mark.slow
def test_an_epsilon_target_sets_sigma_for_the_episode_accounting(tmp_path):
    assert main(["--scenario", "cartpole", "--cartpole-tasks", "default,swap", "--ppo-timesteps", "256",
                 "--ppo-eval-episodes", "2", "--ppo-epochs", "4", "--privacy", "dpsgd", "--epsilon", "2",
                 "--progress", "false", "--out", str(tmp_path)]) == 0
    s = read_summary(tmp_path)
    assert 1.9 <= s["privacy"]["epsilon_worst"] <= 2.0
    assert all(d["accesses"][0]["steps"] == 4 for d in s["privacy"]["datasets"].values())
    assert any("privacy unit is the episode" in note for note in s["privacy"]["notes"])
