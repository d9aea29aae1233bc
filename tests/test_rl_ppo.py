"""PPO learner: autoreset/truncation, GAE, the policy Fisher, and cartpole through the real CLI."""
from __future__ import annotations

import json

import gymnasium as gym
import numpy as np
import pytest
import torch

from clsim.cli import main
from clsim.config import build
from clsim.fisher import diagonal_fisher
from clsim.rl import ActorCritic, Categorical, EnvTask, PPOLearner, PPOOptions, mlp_trunk
from clsim.rl.envs import make_vector_env
from clsim.rl.ppo import gae
from clsim.scenario import Task
from conftest import read_summary, run_cli


class CountEnv(gym.Env):
    """Observation = steps taken in the episode; reward 1 per step; terminates after `length`
    steps (wrap in a TimeLimit to truncate earlier)."""

    observation_space = gym.spaces.Box(0, 1000, (1,), np.float32)
    action_space = gym.spaces.Discrete(2)

    def __init__(self, length: int):
        self.length = length

    def reset(self, *, seed=None, options=None):
        super().reset(seed=seed)
        self.n = 0
        return np.array([0.0], np.float32), {}

    def step(self, action):
        self.n += 1
        return np.array([self.n], np.float32), 1.0, self.n >= self.length, False, {}


def count_task(length: int, time_limit: int | None) -> Task:
    def make(train):
        env = CountEnv(length)
        return gym.wrappers.TimeLimit(env, time_limit) if time_limit else env
    return Task(0, "count", env=EnvTask(make, reference_return=10.0, random_return=0.0))


def learner_for(model, **options) -> PPOLearner:
    o = build(PPOOptions, options)
    return PPOLearner(model, options=o, lr=1e-3, momentum=0.0, batch_size=64,
                      device=torch.device("cpu"), generator=torch.Generator().manual_seed(0))


@pytest.mark.parametrize("length,limit", [(3, None), (100, 4)])
def test_rollout_has_one_transition_per_env_step_and_bootstraps_only_truncation(length, limit):
    torch.manual_seed(0)
    learner = learner_for(ActorCritic(mlp_trunk(1, 8), Categorical(2), 1), ppo_envs=2, ppo_steps=10, ppo_gamma=0.9)
    task = count_task(length, limit)
    episode = min(length, limit or length)
    envs = make_vector_env(task.env, 2, train=True)
    obs, _ = envs.reset(seed=[1, 2])
    rollout, _ = learner.collect(envs, obs, 0, np.zeros(2))
    envs.close()
    steps = torch.arange(10)
    # Every stored transition is a real step: the counter restarts right after an episode ends.
    assert torch.equal(rollout.obs[:, :, 0], (steps % episode).float()[:, None].expand(10, 2))
    assert torch.equal(rollout.dones, (steps % episode == episode - 1)[:, None].expand(10, 2))
    with torch.no_grad():
        v_final = learner.model(torch.tensor([[float(episode)]]))[1].item()
    ends = rollout.dones[:, 0]
    if limit is None:     # terminated: the reward is the env's, nothing bootstrapped
        assert torch.all(rollout.rewards == 1.0)
    else:                 # truncated: r + γ·V(true final observation), not V(reset observation)
        assert torch.allclose(rollout.rewards[ends], torch.full((int(ends.sum()), 2), 1 + 0.9 * v_final))
        assert torch.all(rollout.rewards[~ends] == 1.0)
    assert set(learner.recent_returns) == {float(episode)}
    assert len(learner.recent_returns) == 2 * (10 // episode)
    # Evaluation plays exactly one whole episode per seed.
    assert learner.episode_returns(task).tolist() == [float(episode)] * 10


def test_gae_matches_hand_computation():
    rewards = torch.tensor([[1.0, 1.0], [2.0, 0.0], [3.0, 1.0]])
    values = torch.tensor([[0.5, 0.1], [0.4, 0.2], [0.3, 0.3]])
    dones = torch.tensor([[False, False], [True, False], [False, False]])
    last = torch.tensor([0.2, 0.6])
    adv = gae(rewards, values, dones, last, gamma=0.9, lam=0.8)
    # column 0, backwards: 3 + .9*.2 - .3 = 2.88; episode ends at t=1: 2 - .4 = 1.6;
    # t=0: (1 + .9*.4 - .5) + .9*.8*1.6 = 0.86 + 1.152
    # column 1: t=2: 1 + .9*.6 - .3 = 1.24; t=1: (0 + .9*.3 - .2) + .72*1.24 = 0.07 + 0.8928;
    # t=0: (1 + .9*.2 - .1) + .72*0.9628
    expected = torch.tensor([[2.012, 1.08 + 0.72 * 0.9628], [1.6, 0.9628], [2.88, 1.24]])
    assert torch.allclose(adv, expected, atol=1e-5)


@pytest.mark.slow
@pytest.mark.parametrize("setting_slots", [1, 2])
def test_policy_fisher_matches_exact_expectation_over_actions(setting_slots):
    torch.manual_seed(0)
    model = ActorCritic(mlp_trunk(3, 6), Categorical(3), n_slots=setting_slots)
    with torch.no_grad():                       # a policy far from uniform
        for head in model.heads:
            head.weight.mul_(200)
    learner = learner_for(model)
    names = list(learner.shared_parameters())
    assert not any(n.startswith("critics.") for n in names)
    assert any(n.startswith("heads.") for n in names) == (setting_slots == 1)   # shared head protected
    states = torch.randn(4, 3)
    repeats = 4000
    learner.fisher_states[0] = (states.repeat(repeats, 1), torch.zeros(4 * repeats, dtype=torch.long))
    task = Task(0, "t", env=None)
    estimate = diagonal_fisher(learner, task, names, n_samples=4 * repeats)

    params = dict(model.named_parameters())
    exact = {n: torch.zeros_like(params[n]) for n in names}
    for s in states:
        probs = torch.softmax(model.policy(s[None], 0), 1)[0].detach()
        for a in range(3):
            grads = torch.autograd.grad(learner.log_likelihood(s[None], torch.tensor([a]), 0).sum(),
                                        [params[n] for n in names])
            for n, g in zip(names, grads):
                exact[n] += probs[a] * g.pow(2) / len(states)
    flat_est = torch.cat([estimate[n].flatten() for n in names])
    flat_exact = torch.cat([exact[n].flatten() for n in names])
    assert flat_exact.sum() > 0
    assert (flat_est - flat_exact).abs().sum() / flat_exact.abs().sum() < 0.05
    # The empirical Fisher (the always-0 stored actions) is a different quantity: the test can tell.
    empirical = diagonal_fisher(learner, task, names, n_samples=4 * repeats, empirical=True)
    flat_emp = torch.cat([empirical[n].flatten() for n in names])
    assert (flat_emp - flat_exact).abs().sum() / flat_exact.abs().sum() > 0.2


CLI_TINY = ("--scenario", "cartpole", "--ppo-timesteps", "512", "--ppo-epochs", "2", "--batch-size", "128",
            "--ppo-eval-episodes", "3")


@pytest.mark.slow
def test_cartpole_stream_through_cli_records_return_matrices_and_is_deterministic(tmp_path):
    first, second = tmp_path / "a", tmp_path / "b"
    run_cli(*CLI_TINY, "--strategy", "ewc", "--seed", "3", out=first)
    run_cli(*CLI_TINY, "--strategy", "ewc", "--seed", "3", out=second)
    s = read_summary(first)
    R, raw = s["accuracy_matrix"], s["score_details"]["return_raw"]
    assert len(R) == 2 and all(len(row) == 2 for row in R)
    assert len(raw["matrix"]) == 2 and len(raw["initial"]) == 2
    protocol = s["scenario_info"]["rl_protocol"]
    assert protocol["evaluation_episodes"] == 3 and protocol["reference_return"] == [500.0, 500.0]
    for i in range(2):
        for j in range(2):
            assert 1.0 <= raw["matrix"][i][j] <= 500.0           # CartPole returns: steps survived
            rnd = protocol["random_return"][j]
            assert R[i][j] == pytest.approx((raw["matrix"][i][j] - rnd) / (500.0 - rnd))
    assert s["forgetting"] == pytest.approx(max(R[0][0] - R[1][0], 0.0))
    # Per-step figures: env steps (512 per task, rounded up to whole rollouts) and episode return.
    run_dir = next(p for p in first.iterdir() if p.is_dir())
    records = [json.loads(line) for line in (run_dir / "log.jsonl").read_text().splitlines()]
    steps = [r for r in records if r["kind"] == "step"]
    assert steps[-1]["env_steps"] == 2 * 512 and steps[-1]["env_steps_per_sec"] > 0
    assert "episode_return" in steps[-1] and steps[-1]["episode_return"] >= 8
    assert len(steps) == 2 * 2 * 2 * 2       # tasks x rollouts x ppo epochs x minibatches
    tasks = [r for r in records if r["kind"] == "task"]
    assert s["setting"] == "task_il" and tasks[-1]["strategy"]["ewc_lambda"] == 1e4   # the scenario's λ
    other = read_summary(second)
    assert other["accuracy_matrix"] == R and other["score_details"] == s["score_details"]


@pytest.mark.parametrize("flags,message", [
    (("--cartpole-tasks", "default,flip"), "unknown modifier 'flip'"),
    (("--cartpole-tasks", "default,length=-1"), "length must be a positive number"),
    (("--cartpole-tasks", "default,,swap"), "empty task"),
    (("--ppo-envs", "0"), "--ppo-envs must be >= 1"),
    (("--privacy", "dplis"), "use --privacy dpsgd"),
])
def test_bad_env_options_exit_2_with_one_line(tmp_path, capsys, flags, message):
    assert main(["--scenario", "cartpole", *flags, "--out", str(tmp_path / "out")]) == 2   # the CLI's entry
    err = capsys.readouterr().err
    assert message in err and len(err.strip().splitlines()) == 1
    assert not (tmp_path / "out").exists()
