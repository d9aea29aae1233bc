"""Continual World on Meta-World 3 with SAC: the task environments, SAC's update against a
hand-written reference, CW's Gaussian Fisher, the strategies that can and cannot serve SAC, CW's
metrics, the privacy ledger, and a quick protocol end to end (slow)."""
from __future__ import annotations

import json
import math
import sys

import numpy as np
import pytest
import torch

pytest.importorskip("metaworld", reason="Continual World needs the rl extra (Meta-World 3)")

from clsim import Experiment  # noqa: E402
from clsim.cli import main  # noqa: E402
from clsim.config import build  # noqa: E402
from clsim.errors import UserError  # noqa: E402
from clsim.rl import cw_metrics  # noqa: E402
from clsim.rl.cw import make_task_env  # noqa: E402
from clsim.rl.models import TanhGaussian  # noqa: E402
from clsim.rl.sac import ReplayBuffer, SACBatch, SACLearner, SACModel, SACOptions  # noqa: E402
from clsim.scenario import Task  # noqa: E402

TINY = dict(scenario="cw_triplets", cw_sequence="pair_reach", sac_steps=120, sac_start_steps=50,
            sac_update_after=50, sac_update_every=20, sac_eval_every=60, sac_eval_episodes=1,
            sac_eval_deterministic=0, sac_hidden=16, sac_layers=2, seed=0, progress=False)


def test_task_env_gives_one_hot_identity_200_step_episodes_and_seeded_resets():
    env = make_task_env("reach-v3", 1, 3)
    obs, _ = env.reset(seed=7)
    again, _ = env.reset(seed=7)
    other, _ = env.reset(seed=8)
    assert obs.shape == (42,) and obs[-3:].tolist() == [0.0, 1.0, 0.0]
    assert np.array_equal(obs, again) and not np.array_equal(obs, other)   # positions drawn from the seed
    steps, done = 0, False
    while not done:
        obs, _, terminated, truncated, info = env.step(env.action_space.sample())
        steps, done = steps + 1, terminated or truncated
    assert steps == 200 and truncated and not terminated and "episode_success" in info


@pytest.mark.parametrize("scenario, expected", [
    ("metaworld:reach-v9", "'reach-v9' is not a task of the installed Meta-World; did you mean reach-v3"),
    ("metaworld:", "names no task"),
    ("split_digits:x", "split_digits takes no ':' argument"),
])
def test_unknown_task_is_one_line_exit_2(tmp_path, capsys, scenario, expected):
    assert main(["--scenario", scenario, "--out", str(tmp_path / "runs")]) == 2
    err = capsys.readouterr().err.strip()
    assert expected in err and "\n" not in err and not (tmp_path / "runs").exists()


def test_missing_extra_names_it(monkeypatch):
    monkeypatch.setitem(sys.modules, "metaworld.env_dict", None)   # as if Meta-World were not installed
    with pytest.raises(UserError, match=r"pip install 'clsim\[rl\]'"):
        Experiment(**{**TINY, "out": None}).build()


def tiny_learner(n_tasks=2, **options) -> SACLearner:
    o = build(SACOptions, {"sac_hidden": 8, "sac_layers": 2, **options})
    actions = TanhGaussian(-np.ones(2, np.float32), np.ones(2, np.float32))
    tasks = [Task(i, f"t{i}") for i in range(n_tasks)]
    return SACLearner(SACModel(3, n_tasks, actions, o), options=o, tasks=tasks, lr=1e-3, momentum=0.0,
                      batch_size=5, device=torch.device("cpu"), generator=torch.Generator().manual_seed(0))


def random_batch(n=5, obs=3, tasks=2) -> SACBatch:
    g = torch.Generator().manual_seed(1)
    t = torch.randint(0, tasks, (n,), generator=g)
    x = torch.cat([torch.randn(n, obs, generator=g), torch.nn.functional.one_hot(t, tasks).float()], 1)
    nx = torch.cat([torch.randn(n, obs, generator=g), torch.nn.functional.one_hot(t, tasks).float()], 1)
    return SACBatch(x, torch.rand(n, 2, generator=g) * 2 - 1, t, torch.arange(n), torch.randn(n, generator=g), nx,
                    (torch.rand(n, generator=g) < 0.3).float())


def test_sac_update_gives_each_part_exactly_its_own_losss_gradient():
    """One clsim update against SAC written out with three losses and three gradient calls (CW's
    get_gradients): the actor's from the policy loss, the critics' from the Bellman loss, α's from
    its own loss; the same noise (the learner's generator re-seeded)."""
    learner = tiny_learner()
    m, batch, o = learner.model, random_batch(), learner.o
    learner.generator.manual_seed(5)
    losses, _ = learner.forward(batch)
    losses.mean().backward()
    got = {n: p.grad.clone() for n, p in m.named_parameters() if p.grad is not None}

    learner.generator.manual_seed(5)
    a, logp = m.actions.rsample(m.policy(batch.x, batch.t), learner.generator)
    log_alpha = m.log_alpha[batch.t]
    alpha = log_alpha.detach().exp()
    x = m.inputs(batch.x)
    with torch.no_grad():
        a2, logp2 = m.actions.rsample(m.policy(batch.next_x, batch.t), learner.generator)
        nx = m.inputs(batch.next_x)
        target = torch.min(m.target1(nx, a2, batch.t), m.target2(nx, a2, batch.t))
        backup = batch.reward + o.sac_gamma * (1 - batch.done) * (target - alpha * logp2)
    pi_loss = (alpha * logp - torch.min(m.critic1(x, a, batch.t), m.critic2(x, a, batch.t))).mean()
    q_loss = (0.5 * (backup - m.critic1(x, batch.y, batch.t)) ** 2 + 0.5 * (backup - m.critic2(x, batch.y, batch.t)) ** 2).mean()
    alpha_loss = -(log_alpha * (logp + m.actions.target_entropy(o.sac_target_output_std)).detach()).mean()
    actor = [n for n, _ in m.named_parameters() if n.startswith(("trunk.", "heads."))]
    critics = [n for n, _ in m.named_parameters() if n.startswith(("critic1.", "critic2."))]
    params = dict(m.named_parameters())
    for names, loss in ((actor, pi_loss), (critics, q_loss), (["log_alpha"], alpha_loss)):
        grads = torch.autograd.grad(loss, [params[n] for n in names], retain_graph=True, allow_unused=True)
        for n, g in zip(names, grads):
            expected = torch.zeros_like(params[n]) if g is None else g
            assert torch.allclose(got.get(n, torch.zeros_like(expected)), expected, atol=1e-6), n
    assert not any(n.startswith("target") for n in got)


def test_optimizer_step_moves_targets_by_polyak():
    learner = tiny_learner(sac_polyak=0.9)
    m = learner.model
    before = [p.clone() for p in m.target1.parameters()]
    opt = learner.make_optimizer()
    learner.forward(random_batch())[0].mean().backward()
    opt.step()
    for old, target, online in zip(before, m.target1.parameters(), m.critic1.parameters()):
        assert torch.allclose(target, 0.9 * old + 0.1 * online, atol=1e-6)


def test_tanh_gaussian_log_prob_matches_torch_transformed_distribution():
    actions = TanhGaussian(-2 * np.ones(2, np.float32), 2 * np.ones(2, np.float32))
    out = torch.tensor([[0.3, -0.5, math.log(0.4), math.log(1.2)]])
    a, logp = actions.rsample(out, torch.Generator().manual_seed(0))
    base = torch.distributions.Normal(out[0, :2], out[0, 2:].exp())
    dist = torch.distributions.TransformedDistribution(
        base, [torch.distributions.TanhTransform(), torch.distributions.AffineTransform(0.0, 2.0)])
    assert logp.item() == pytest.approx((dist.log_prob(a[0]).sum() + 2 * math.log(2.0)).item(), rel=1e-4)
    assert actions.log_prob(out, a).item() == pytest.approx(logp.item(), rel=1e-3)


def test_gaussian_fisher_is_the_expectation_of_sampled_score_squares():
    """CW's analytic Fisher of the pre-tanh Gaussian equals E[(∂ log N(u; μ, σ)/∂θ)²], u ~ N(μ, σ)."""
    from torch.func import functional_call, grad, vmap
    learner = tiny_learner(n_tasks=1)
    learner.buffer = ReplayBuffer(10, False, learner.generator)
    g = torch.Generator().manual_seed(3)
    obs = torch.cat([torch.randn(3, generator=g), torch.ones(1)]).numpy()
    learner.buffer.store(obs, np.zeros(2, np.float32), 0.0, obs, 0.0, 0)   # one state
    names = [n for n in learner.shared_parameters() if n.startswith("trunk.")]
    exact = learner.gaussian_fisher(learner.scenario_tasks[0], names, 8)
    m = learner.model
    params = {n: p.detach() for n, p in m.named_parameters()}
    x = torch.from_numpy(obs)[None]
    with torch.no_grad():
        mean, log_std = m.policy(x, 0).chunk(2, -1)
    u = mean + log_std.exp() * torch.randn(4000, 2, generator=g)

    def logp(free, ui):
        out = functional_call(m, {**params, **free}, (x, 0))
        mu, ls = out.chunk(2, -1)
        return torch.distributions.Normal(mu[0], ls[0].exp()).log_prob(ui).sum()
    rows = vmap(grad(logp), in_dims=(None, 0))({n: params[n] for n in names}, u)
    for n in names:
        sampled = rows[n].pow(2).mean(0)
        big = exact[n] > 1e-3
        assert big.any() and torch.allclose(sampled[big], exact[n][big], rtol=0.15), n


def test_mas_on_sac_protects_critics_with_their_q_norm_as_cw():
    """With --sac-regularize-critic a critic weight's importance is CW's mean |∂Q²/∂θ| over stored
    (state, action) pairs; actor weights keep the policy-output norm's."""
    from clsim.privacy.ledger import Ledger
    from clsim.privacy.mechanism import Mechanism
    from clsim.scenario import Scenario
    from clsim.strategies.mas import MAS
    learner = tiny_learner(n_tasks=1, sac_regularize_critic=True)
    learner.buffer = ReplayBuffer(10, False, learner.generator)
    g = torch.Generator().manual_seed(4)
    for _ in range(3):
        obs = torch.cat([torch.randn(3, generator=g), torch.ones(1)]).numpy()
        learner.buffer.store(obs, (torch.rand(2, generator=g) * 2 - 1).numpy(), 0.0, obs, 0.0, 0)
    task = learner.scenario_tasks[0]
    scenario = Scenario("s", "task_il", [task], make_model=None)
    mechanism = Mechanism()
    mechanism.setup(learner, scenario, Ledger())
    mas = MAS(MAS.Options(mas_samples=6))
    mas.setup(learner, scenario, mechanism)
    learner.generator.manual_seed(0)
    sizes = [p.numel() for p in learner.shared_parameters().values()]
    importance = dict(zip(mas.names, mas.task_importance(task).split(sizes)))
    learner.generator.manual_seed(0)
    batch = learner.task_sample(task, 6)   # the transitions the importance pass drew
    m, w = learner.model, learner.model.critic1.trunk[0].weight
    expected = torch.zeros_like(w)
    for x, a in zip(batch.x, batch.y):
        expected += torch.autograd.grad(m.critic1(m.inputs(x[None]), a[None], 0).square().sum(), w)[0].abs() / 6
    got = importance["critic1.trunk.0.weight"].view_as(w)
    assert got.abs().sum() > 0 and torch.allclose(got, expected, atol=1e-6)
    assert importance["trunk.0.weight"].abs().sum() > 0


def test_replay_buffer_fifo_and_reservoir():
    fifo, reservoir = ReplayBuffer(3, False, torch.Generator().manual_seed(0)), \
        ReplayBuffer(3, True, torch.Generator().manual_seed(0))
    for k in range(100):
        for b in (fifo, reservoir):
            b.store(np.full(2, k, np.float32), np.zeros(1, np.float32), 0.0, np.zeros(2, np.float32), 0.0, k // 50)
    assert sorted(fifo.columns["x"][:, 0]) == [97, 98, 99]              # the latest
    assert reservoir.count == 3 and reservoir.seen == 100
    assert min(reservoir.columns["x"][:, 0]) < 97                        # older transitions kept


@pytest.mark.slow
def test_a_buffer_past_the_transitions_a_run_stores_allocates_only_those_and_one_past_memory_is_refused():
    """A FIFO buffer that is never full never drops a transition, nor a reservoir that takes every one:
    the slots past what the run stores (sac_steps a task, or the whole run where one buffer spans
    it) are not allocated; slots that cannot fit in memory are refused before the run starts."""
    tiny = {**TINY, "out": None}
    n_tasks = len(Experiment(strategy="naive", **tiny).build().scenario.tasks)
    assert Experiment(strategy="naive", sac_replay_size=2**31 - 1, **tiny).build().learner.buffer_size() == 120
    assert Experiment(strategy="reservoir", reservoir_size=2**31 - 1, **tiny).build().learner.buffer_size() == \
        120 * n_tasks
    for strategy, flag in (("naive", "sac_replay_size"), ("reservoir", "reservoir_size")):
        with pytest.raises(UserError, match=f"--{flag.replace('_', '-')} 2147483647: a buffer of 2147483647"):
            Experiment(strategy=strategy, **{**tiny, "sac_steps": 2**31 - 1, flag: 2**31 - 1}).build()


@pytest.mark.parametrize("strategy, scenario, expected", [
    ("agem", "cartpole", "learns on-policy"),
    ("reservoir", "cartpole", "PPO learns on-policy"),
    ("lwf", "cw_triplets", "works with supervised learners only"),
])
def test_a_sequence_a_strategy_cannot_serve_is_one_line(strategy, scenario, expected):
    options = {**TINY, "scenario": scenario, "out": None}
    if scenario == "cartpole":
        options = {"scenario": "cartpole", "out": None}
    with pytest.raises(UserError, match=expected):
        Experiment(strategy=strategy, **options).build()


def test_privacy_mechanism_is_refused_before_anything_runs(tmp_path):
    with pytest.raises(UserError, match="SAC re-reads raw transitions"):
        Experiment(privacy="dpsgd", noise_multiplier=1.0, **TINY, out=str(tmp_path)).run()
    assert not any(tmp_path.iterdir())


def test_cw_metrics_on_hand_made_curves():
    def run(points):
        return {"evaluation_curve": [{"task": t, "success_rate": s} for t, s in points],
                "scenario_info": {"rl_protocol": {"tasks": ["a", "b"]}}}
    # task a learned to 1.0 while trained, forgotten to 0.5; task b learned to 0.8
    points = [(0, [0.0, 0.0])] + [(0, [1.0, 0.0])] * 5 + [(1, [0.5, 0.2])] + [(1, [0.5, 0.8])] * 5
    f = cw_metrics.per_task_figures(run(points))
    assert f["end"].tolist() == [0.5, 0.8]
    assert f["forgetting"].tolist() == pytest.approx([0.5, 0.0])
    assert f["auc"].tolist() == pytest.approx([5 / 6, (0.2 + 4.0) / 6])
    refs = {"a": [0.5, 0.5], "b": [0.5]}
    table = cw_metrics.table({"m": [run(points), run(points)]}, refs)["m"]
    assert table["performance"]["mean"] == pytest.approx(0.65) and table["performance"]["ci"] == [0.65, 0.65]
    assert table["forward_transfer"]["mean"] == pytest.approx(np.mean([(5 / 6 - 0.5) / 0.5, (0.7 - 0.5) / 0.5]))
    assert table["forward_transfer"]["references_per_task"] == 1
    assert cw_metrics.table({"m": [run(points)]}, {"a": [0.5]})["m"]["forward_transfer"] == {"missing_references": ["b"]}


def test_bootstrap_interval_is_cws():
    """CW's BootstrapCI: legacy numpy generator seeded 0, 4000 resamples, 90%, midpoint quantiles."""
    x = np.array([0.1, 0.4, 0.35, 0.8])
    rng = np.random.RandomState(0)
    means = x[rng.choice(4, (4000, 4))].mean(1)
    expected = [np.quantile(means, 0.05, method="midpoint"), np.quantile(means, 0.95, method="midpoint")]
    assert cw_metrics.mean_with_ci(list(x))["ci"] == pytest.approx(expected)


@pytest.mark.slow
def test_quick_protocol_end_to_end_with_strategies_metrics_and_report(tmp_path, capsys):
    """A two-task sequence, two strategies over two seeds and a single-task reference: summary.json holds the
    success-rate matrix and the evaluation curve, TensorBoard the success matrix image, the ledger
    ε = ∞ for every task, the console the returns beside the success rates, and `clsim report`
    CW's metrics with intervals."""
    from clsim.report import write_report
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    runs = tmp_path / "runs"
    for strategy in ("naive", "reservoir"):
        for seed in (0, 1):
            Experiment(strategy=strategy, **{**TINY, "seed": seed, "progress": None}, out=str(runs)).run()
    Experiment(scenario="metaworld:reach-v3", **{k: v for k, v in TINY.items() if k not in ("scenario", "cw_sequence")},
               out=str(runs)).run()
    printed = capsys.readouterr()
    lines = [line for line in (printed.out + printed.err).splitlines() if line.startswith("task 1:")]
    assert lines and all("returns " in line and "(success " in line for line in lines)
    summaries = [json.loads(p.read_text()) for p in runs.rglob("summary.json")]
    cl = [s for s in summaries if s["scenario"] == "cw_triplets"]
    assert len(cl) == 4
    s = cl[0]
    assert len(s["evaluation_curve"]) == 4 and len(s["evaluation_curve"][0]["success_rate"]) == 2
    assert s["score_details"]["success_rate"]["matrix"] == s["accuracy_matrix"]
    assert all(d["epsilon"] is None for d in s["privacy"]["datasets"].values())
    assert s["privacy"]["epsilon_worst"] is None
    tb = next(p for p in runs.rglob("tb") if p.is_dir() and "cw_triplets" in str(p))
    acc = EventAccumulator(str(tb))
    acc.Reload()
    assert "summary/success_rate_matrix" in acc.Tags()["images"]
    assert "eval_curve/success_task_1" in acc.Tags()["scalars"]
    report = write_report([str(runs)], tmp_path / "report")
    text = report.read_text()
    assert "## Continual World metrics" in text and "no reference run of reach-wall-v3" in text
    table = json.loads((tmp_path / "report" / "cw_metrics.json").read_text())
    assert len(table) == 2 and all(row["performance"]["n"] == 2 for row in table.values())
