"""RL scenarios: the cartpole variants really change the task; minigrid and atari build their envs."""
from __future__ import annotations

import numpy as np
import pytest

from clsim.cli import main
from clsim.config import RunOptions, build
from clsim.scenarios.rl_cartpole import make_env, parse_task


def rollout(env, actions, seed=5):
    obs, _ = env.reset(seed=seed)
    seen = [obs]
    for a in actions:
        obs, *_ = env.step(a)
        seen.append(obs)
    return np.stack(seen)


def test_cartpole_variants_transform_observations_actions_and_physics():
    actions = [0, 0, 1, 0, 1, 1, 1]
    base = rollout(make_env(*parse_task("default"))(True), actions)
    assert np.allclose(rollout(make_env(*parse_task("neg"))(True), actions), -base)
    assert np.allclose(rollout(make_env(*parse_task("perm"))(True), actions), base[:, ::-1])
    assert np.allclose(rollout(make_env(*parse_task("swap"))(True), [1 - a for a in actions]), base)
    assert not np.allclose(rollout(make_env(*parse_task("swap"))(True), actions), base)
    heavy = make_env(*parse_task("masspole=0.5+length=1.0"))(True)
    pole = heavy.unwrapped
    assert pole.total_mass == pytest.approx(1.5) and pole.polemass_length == pytest.approx(0.5)
    moved = rollout(heavy, actions)
    assert np.allclose(moved[0], base[0]) and not np.allclose(moved[1:], base[1:])


@pytest.mark.parametrize("argv,message", [
    (["--scenario", "minigrid", "--minigrid-tasks", "Empty-Random-5x5,Maze"], "unknown MiniGrid env 'Maze'"),
    (["--scenario", "atari", "--atari-games", "Boxing,Tetris"], "no reference score for 'Tetris'"),
    (["--scenario", "cartpole", "--ppo-eval-policy", "greedy"], "is not one of: argmax, sample"),
])
def test_bad_rl_options_exit_2(argv, message, tmp_path, capsys):
    assert main([*argv, "--out", str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err
    assert message in err and len(err.strip().splitlines()) == 1
    assert not (tmp_path / "out").exists()


def test_minigrid_scenario_one_hot_views_and_success_figures():
    pytest.importorskip("minigrid")
    from clsim.rl.ppo import PPOLearner
    from clsim.scenarios.rl_minigrid import MiniGridOptions, minigrid_sequence
    import torch
    o = build(MiniGridOptions, {"minigrid_tasks": "Empty-Random-5x5,LavaGapS5", "ppo_eval_episodes": 4})
    sc = minigrid_sequence(o, build(RunOptions, {}))
    assert sc.setting == "task_il" and len(sc.tasks) == 2
    env = sc.tasks[0].env.make(False)
    obs, _ = env.reset(seed=0)
    assert obs.shape == (980,) and set(np.unique(obs)) <= {0, 1}
    random = sc.info["rl_protocol"]["random_return"]
    assert all(0.0 <= r < 1.0 for r in random)
    learner = PPOLearner(sc.make_model(), options=o, lr=1e-3, momentum=0.0, batch_size=64,
                         device=torch.device("cpu"), generator=torch.Generator().manual_seed(0))
    assert len(learner.model.heads) == 2
    score = learner.evaluate(sc.tasks[0])
    details = learner.score_details()
    raw, success = details["return_raw"][0], details["success_rate"][0]
    assert 0.0 <= success <= 1.0 and (raw > 0) == (success > 0)
    assert score == pytest.approx((raw - random[0]) / (1.0 - random[0]))
    assert learner.score_details() == {}         # details are handed out once


def test_atari_env_is_preprocessed_capped_and_rewards_clipped_for_training():
    pytest.importorskip("ale_py")
    pytest.importorskip("cv2")
    import ale_py
    import gymnasium as gym
    from clsim.scenarios.rl_atari import make_env as make_atari
    gym.register_envs(ale_py)
    for train in (True, False):
        env = make_atari("Boxing", 300)(train)
        obs, _ = env.reset(seed=0)
        assert obs.shape == (4, 84, 84) and obs.dtype == np.uint8 and env.action_space.n == 18
        rewards, steps, done = [], 0, False
        rng = np.random.default_rng(0)
        while not done:
            obs, r, terminated, truncated, _ = env.step(int(rng.integers(18)))
            rewards.append(r)
            steps, done = steps + 1, terminated or truncated
        assert steps == 300                      # the cap counts agent steps, not frames
        if train:
            assert set(np.unique(rewards)) <= {-1.0, 0.0, 1.0}
        env.close()
