"""Continuous (Box) actions and the PPO objective: the Gaussian policy object, PPO learning a
continuous task, CleanRL's value loss and update statistics, the separate critic, and the
pendulum stream through EWC and BLIP."""
from __future__ import annotations

import json
import math

import gymnasium as gym
import numpy as np
import pytest
import torch

from clsim.cli import main
from clsim.config import build
from clsim.errors import UserError
from clsim.rl import (ActorCritic, Categorical, DiagGaussian, EnvTask, PPOLearner, PPOOptions, action_distribution,
                      mlp_trunk, rl_scenario)
from clsim.rl.ppo import PPOBatch
from clsim.scenario import Task
from conftest import read_summary


class TargetEnv(gym.Env):
    """One-step episodes: observe a target in [-1, 1], act a in [-2, 2], reward -(a - target)²."""

    observation_space = gym.spaces.Box(-1, 1, (1,), np.float32)
    action_space = gym.spaces.Box(-2, 2, (1,), np.float32)

    def reset(self, *, seed=None, options=None):
        super().reset(seed=seed)
        self.target = self.np_random.uniform(-1, 1)
        return np.array([self.target], np.float32), {}

    def step(self, action):
        return np.array([self.target], np.float32), -float((action[0] - self.target) ** 2), True, False, {}


def learner_for(model, **options) -> PPOLearner:
    return PPOLearner(model, options=build(PPOOptions, options), lr=3e-3, momentum=0.0, batch_size=64,
                      device=torch.device("cpu"), generator=torch.Generator().manual_seed(0))


def test_gaussian_policy_object_matches_torch_normal_and_clips_only_for_the_env():
    actions = action_distribution(gym.spaces.Box(-2, 2, (2,), np.float32))
    assert isinstance(actions, DiagGaussian)
    out = torch.tensor([[0.5, -1.0, math.log(0.3), math.log(2.0)]])   # mean | log-std
    a = torch.tensor([[3.0, -1.5]])
    normal = torch.distributions.Normal(torch.tensor([0.5, -1.0]), torch.tensor([0.3, 2.0]))
    assert actions.log_prob(out, a).item() == pytest.approx(normal.log_prob(a[0]).sum().item(), rel=1e-5)
    assert actions.entropy(out).item() == pytest.approx(normal.entropy().sum().item(), rel=1e-5)
    assert torch.equal(actions.mode(out), torch.tensor([[0.5, -1.0]]))
    samples = actions.sample(out.expand(20000, 4), torch.Generator().manual_seed(0))
    assert samples.mean(0).tolist() == pytest.approx([0.5, -1.0], abs=0.05)
    assert samples.std(0).tolist() == pytest.approx([0.3, 2.0], rel=0.05)
    assert (np.abs(actions.to_env(samples)) <= 2).all() and (samples.abs() > 2).any()   # unclipped log-probs
    assert isinstance(action_distribution(gym.spaces.Discrete(3)), Categorical)
    with pytest.raises(UserError, match="Discrete and bounded 1-D Box"):
        action_distribution(gym.spaces.MultiDiscrete([2, 2]))


@pytest.mark.slow
def test_ppo_learns_a_continuous_control_task():
    torch.manual_seed(0)
    space = TargetEnv.action_space
    model = ActorCritic(mlp_trunk(1, 16), action_distribution(space), 1, critic_trunk=mlp_trunk(1, 16))
    learner = learner_for(model, ppo_envs=8, ppo_steps=32, ppo_epochs=10, ppo_timesteps=2048)
    learner.batch_size = 128
    task = Task(0, "target", env=EnvTask(lambda train: TargetEnv(), reference_return=0.0, random_return=-1.0))
    before = learner.episode_returns(task).mean()
    optimizer = learner.make_optimizer()
    for batch in learner.batches(task, 0):
        optimizer.zero_grad()
        learner.forward(batch)[0].mean().backward()
        optimizer.step()
    after = learner.episode_returns(task).mean()
    assert before < -0.2 and after > -0.02          # the mean action tracks the target
    assert float(model.heads[0].log_std.detach()) < 0        # exploration noise shrinks as it learns


def one_transition_batch(value_old: float, ret: float, old_logp: float, advantage: float = 0.0) -> PPOBatch:
    return PPOBatch(torch.zeros(1, 1), torch.zeros(1, dtype=torch.long), torch.zeros(1, dtype=torch.long),
                    torch.zeros(1, dtype=torch.long), torch.tensor([old_logp]), torch.tensor([advantage]),
                    torch.tensor([ret]), torch.tensor([value_old]))


@pytest.mark.parametrize("clip_value", [True, False])
def test_value_loss_is_cleanrls_half_squared_error_clipped_around_the_old_value(clip_value):
    torch.manual_seed(0)
    model = ActorCritic(mlp_trunk(1, 4), Categorical(2), 1, critic_trunk=mlp_trunk(1, 4))
    learner = learner_for(model, ppo_clip=0.2, ppo_value_coef=0.5, ppo_entropy_coef=0.0, ppo_clip_value=clip_value)
    with torch.no_grad():
        v = float(model(torch.zeros(1, 1))[1])
    # The value moved 1.0 away from V_old toward the return: clipping keeps V_old + 0.2.
    batch = one_transition_batch(value_old=v - 1.0, ret=v + 2.0, old_logp=math.log(0.5))
    loss, _ = learner.forward(batch)
    expected = 0.5 * 0.5 * (max(2.0 ** 2, (v - 1.0 + 0.2 - (v + 2.0)) ** 2) if clip_value else 2.0 ** 2)
    assert loss.item() == pytest.approx(expected, rel=1e-4)
    critic_grads = torch.autograd.grad(loss.sum(), list(model.critic_trunk.parameters()))
    assert (sum(g.abs().sum() for g in critic_grads) == 0) == clip_value   # the clipped branch is constant


def test_update_statistics_are_cleanrls_approx_kl_and_clip_fraction():
    torch.manual_seed(0)
    model = ActorCritic(mlp_trunk(1, 4), Categorical(2), 1)
    learner = learner_for(model, ppo_clip=0.2)
    with torch.no_grad():
        logp = torch.log_softmax(model.policy(torch.zeros(1, 1)), 1)[0, 0].item()
    old = torch.tensor([logp, logp - 0.5, logp + 0.1, logp])        # ratios 1, e^0.5, e^-0.1, 1
    batch = PPOBatch(torch.zeros(4, 1), torch.zeros(4, dtype=torch.long), torch.zeros(4, dtype=torch.long),
                     torch.arange(4), old, torch.ones(4), torch.zeros(4), torch.zeros(4))
    learner.forward(batch)
    stats = learner.step_metrics()
    log_r = torch.tensor([0.0, 0.5, -0.1, 0.0])
    assert stats["approx_kl"] == pytest.approx(float(((log_r.exp() - 1) - log_r).mean()), rel=1e-4)
    assert stats["clip_fraction"] == pytest.approx(0.25)            # only e^0.5 leaves [0.8, 1.2]


def test_mlp_critic_has_its_own_trunk_outside_the_protected_parameters():
    torch.manual_seed(0)
    model = ActorCritic(mlp_trunk(3, 8), Categorical(2), 2, critic_trunk=mlp_trunk(3, 8))
    learner = learner_for(model)
    for name, p in model.named_parameters():                        # orthogonal weights, zero biases
        if name.endswith("bias"):
            assert not p.any(), name
    x = torch.randn(5, 3)
    policy_before = model.policy(x, 0).detach().clone()
    with torch.no_grad():
        for p in model.critic_trunk.parameters():
            p.add_(1.0)
    assert torch.equal(model.policy(x, 0), policy_before)          # the critic cannot move the policy
    assert set(learner.shared_parameters()) == {n for n, _ in model.trunk.named_parameters(prefix="trunk")}


PENDULUM_TINY = ("--scenario", "pendulum", "--ppo-timesteps", "256", "--ppo-steps", "64", "--ppo-epochs", "1",
                 "--ppo-eval-episodes", "1", "--setting", "domain_il")


@pytest.mark.slow
@pytest.mark.parametrize("strategy", ["ewc", "blip"])
def test_pendulum_stream_runs_through_ewc_and_blip(tmp_path, strategy):
    assert main([*PENDULUM_TINY, "--strategy", strategy, "--out", str(tmp_path), "--progress", "false"]) == 0
    s = read_summary(tmp_path)
    assert len(s["accuracy_matrix"]) == 2 and s["scenario_info"]["rl_protocol"]["actions"] == "DiagGaussian"
    raw = s["score_details"]["return_raw"]["matrix"]
    assert all(-200 * 16.3 <= r <= 0 for row in raw for r in row)   # Pendulum: at most 16.3 per step lost
    run_dir = next(p for p in tmp_path.iterdir() if p.is_dir())
    records = [json.loads(line) for line in (run_dir / "log.jsonl").read_text().splitlines()]
    steps = [r for r in records if r["kind"] == "step"]
    assert all("approx_kl" in r and 0 <= r["clip_fraction"] <= 1 for r in steps)
    if strategy == "ewc":
        assert max(r["strategy/ewc_penalty"] for r in steps if r["task"] == 1) > 0
        again = tmp_path / "again"                                  # Gaussian sampling follows --seed
        assert main([*PENDULUM_TINY, "--strategy", strategy, "--out", str(again), "--progress", "false"]) == 0
        assert read_summary(again)["score_details"] == s["score_details"]
    else:   # domain_il: the shared Gaussian head's mean is quantised with the policy trunk, not the critic
        task = [r for r in records if r["kind"] == "task"][-1]
        assert task["strategy"]["blip_parameters"] == (3 * 64 + 64) + (64 * 64 + 64) + (64 + 1)


def test_pendulum_neg_reverses_the_torque_and_training_rewards_are_scaled():
    from clsim.scenarios.rl_pendulum import REWARD_SCALE, make_env
    torques = [np.array([1.5], np.float32)] * 5
    runs = {}
    for name, train in (("default", False), ("neg", False), ("default", True)):
        env = make_env(name)(train)
        env.reset(seed=3)
        runs[name, train] = [env.step(a if name == "default" else -a)[:2] for a in torques]
    for (o1, r1), (o2, r2), (_, r3) in zip(runs["default", False], runs["neg", False], runs["default", True]):
        assert np.allclose(o1, o2) and r1 == pytest.approx(r2) and r3 == pytest.approx(REWARD_SCALE * r1)
    with pytest.raises(UserError, match="unknown modifier 'swap'"):
        make_env("swap")


def test_bad_pendulum_task_exits_2_with_one_line(tmp_path, capsys):
    assert main(["--scenario", "pendulum", "--pendulum-tasks", "default,g=-1", "--out", str(tmp_path / "o")]) == 2
    err = capsys.readouterr().err
    assert "g must be a positive number" in err and len(err.strip().splitlines()) == 1


def test_a_stream_mixing_action_spaces_is_refused():
    from gymnasium.envs.classic_control import CartPoleEnv
    tasks = [EnvTask(lambda train: TargetEnv(), 0.0), EnvTask(lambda train: CartPoleEnv(), 500.0)]
    with pytest.raises(UserError, match="every task of a stream must share one action space"):
        rl_scenario("mixed", "task_il", ["target", "cartpole"], tasks, lambda: mlp_trunk(1, 4),
                    build(PPOOptions, {}), {}, {})
