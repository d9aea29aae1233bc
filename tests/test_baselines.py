"""The baselines' defining properties, each on a tiny model against a hand computation."""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from clsim.config import RunOptions
from clsim.cli import from_argv
from clsim.learners import Batch
from clsim.learners.supervised import SupervisedLearner
from clsim.models import MultiHeadNet
from clsim.privacy.ledger import Ledger
from clsim.privacy.mechanism import Mechanism
from clsim.scenarios.split_digits import SplitDigitsOptions, split_digits


def digits(setting="task_il", hidden=8, n_tasks=5, lr=0.05, momentum=0.0, task_heads="separate"):
    """A real split_digits scenario, learner and plain mechanism (seeded)."""
    torch.manual_seed(0)
    scenario = split_digits(SplitDigitsOptions(hidden=hidden, n_tasks=n_tasks, task_heads=task_heads),
                            RunOptions(setting=setting))
    learner = SupervisedLearner(scenario.make_model(), lr=lr, momentum=momentum, batch_size=32,
                                device=torch.device("cpu"), generator=torch.Generator().manual_seed(0))
    mechanism = Mechanism()
    mechanism.setup(learner, scenario, Ledger())
    return scenario, learner, mechanism


def first_batch(learner, task, n=16):
    x, y = task.train.x[:n], task.train.y[:n]
    return Batch(x, y, torch.full((n,), task.index), torch.arange(n))


class Scalar(nn.Module):
    """A backbone of one weight w: features = w·x (x of one feature)."""

    def __init__(self, w: float):
        super().__init__()
        self.w = nn.Parameter(torch.tensor([w]))
        self.out_features = 1

    def forward(self, x):
        return self.w * x.reshape(len(x), 1)


# ---------------------------------------------------------------- l2

def test_l2_penalty_is_the_squared_distance_to_the_last_tasks_weights():
    from clsim.strategies.l2 import L2
    scenario, learner, mechanism = digits()
    l2 = L2(L2.Options(l2_strength=3.0))
    l2.setup(learner, scenario, mechanism)
    assert l2.penalty() is None                          # nothing to protect before a task ends
    l2.after_task(scenario.tasks[0])
    assert l2.penalty().item() == 0.0
    w = learner.model.backbone.body[1].weight
    with torch.no_grad():
        w[0, 0] += 0.5
        w[1, 2] -= 0.25
        learner.model.heads[1].weight[0, 0] += 9.0       # a task head is not anchored
    assert l2.penalty().item() == pytest.approx(3.0 * (0.5 ** 2 + 0.25 ** 2))


# ---------------------------------------------------------------- si

@pytest.mark.parametrize("variant", ["zenke", "vandeven"])
def test_si_importance_on_a_quadratic_is_the_path_integral_over_the_squared_drift(variant):
    """Gradient descent on L(w) = ½a(w − b)², from w0 = 0 with a = 2, b = 1, lr = 0.1: w − b shrinks by
    r = 1 − lr·a = 0.8 a step, so after 3 steps ω = Σ g·(lr·g) = lr·a²·(1 + r² + r⁴) = 0.81984,
    the drift is w3 = 1 − 0.8³ = 0.488, and Ω = ω / (0.488² + ξ) with ξ = 1e-3."""
    from clsim.strategies.si import SI
    scenario, _, mechanism = digits(n_tasks=2)
    learner = SupervisedLearner(MultiHeadNet(Scalar(0.0), [1, 1]), lr=0.1, momentum=0.0, batch_size=1,
                                device=torch.device("cpu"), generator=torch.Generator().manual_seed(0))
    mechanism.setup(learner, scenario, Ledger())
    si = SI(SI.Options(si_c=0.5, si_xi=1e-3, si_variant=variant))
    si.setup(learner, scenario, mechanism)
    assert si.names == ["backbone.w"]
    w = learner.model.backbone.w

    def descend(b, steps):
        optimizer = learner.make_optimizer()
        for _ in range(steps):
            optimizer.zero_grad()
            mechanism.backward((0.5 * 2.0 * (w - b) ** 2).reshape(1), si.penalty())
            si.after_backward()
            optimizer.step()
            si.after_step()

    si.before_task(scenario.tasks[0])
    descend(1.0, 3)
    si.after_task(scenario.tasks[0])
    assert float(w.detach()) == pytest.approx(0.488)
    assert float(si.importance) == pytest.approx(0.81984 / (0.488 ** 2 + 1e-3), rel=1e-5)
    # Task 2 pulls toward 0 while the penalty c·Ω(w − 0.488)² resists (its gradient non-zero from step
    # 2 on). Zenke et al.'s ω counts only the task loss's gradient g = a·w; van de Ven's the total one.
    omega1 = float(si.importance)
    si.before_task(scenario.tasks[1])
    descend(0.0, 2)
    w0, omega = 0.488, 0.0
    for _ in range(2):
        g = 2.0 * w0
        total = g + 2 * 0.5 * omega1 * (w0 - 0.488)
        step = -0.1 * total
        omega, w0 = omega - (g if variant == "zenke" else total) * step, w0 + step
    assert float(w.detach()) == pytest.approx(w0, rel=1e-5)
    assert float(si.omega) == pytest.approx(omega, rel=1e-5)
    si.after_task(scenario.tasks[1])
    assert float(si.importance) == pytest.approx(omega1 + omega / ((w0 - 0.488) ** 2 + 1e-3), rel=1e-5)
    # A task whose path integral is negative (steps against the gradient: momentum, or the penalty
    # outweighing the task loss) lowers Ω; Zenke et al. clamp Ω at 0, van de Ven's code does not.
    si.before_task(scenario.tasks[1])
    with torch.no_grad():
        w += 0.1
    si.omega.fill_(-50.0)
    si.after_task(scenario.tasks[1])
    expected = omega1 + omega / ((w0 - 0.488) ** 2 + 1e-3) - 50.0 / (0.1 ** 2 + 1e-3)
    assert expected < 0
    assert float(si.importance) == (0.0 if variant == "zenke" else pytest.approx(expected, rel=1e-5))


# ---------------------------------------------------------------- mas

def test_mas_importance_is_the_mean_absolute_gradient_of_the_output_norm():
    from clsim.strategies.mas import MAS
    scenario, learner, mechanism = digits(hidden=4)
    task = scenario.tasks[0]
    mas = MAS(MAS.Options(mas_lambda=2.0, mas_samples=10_000))   # every training example
    mas.setup(learner, scenario, mechanism)
    mas.after_task(task)
    params = learner.shared_parameters()
    reference = torch.zeros_like(mas.importance)
    for x in task.train.x:
        out = learner.model(x[None], task.index)
        grads = torch.autograd.grad(out.square().sum(), [params[n] for n in mas.names])
        reference += torch.cat([g.reshape(-1) for g in grads]).abs()
    reference /= len(task.train)
    torch.testing.assert_close(mas.importance, reference, rtol=1e-4, atol=1e-7)
    assert mechanism.ledger.epsilon(task.dataset_id) == float("inf")   # a raw pass, recorded
    w = learner.model.backbone.body[1].weight
    with torch.no_grad():
        w[0, 0] += 0.5
    assert mas.penalty().item() == pytest.approx(2.0 * float(mas.importance[0]) * 0.25, rel=1e-5)


@pytest.mark.parametrize("clipping", ["hooks", "ghost"])
def test_mas_importance_under_dpsgds_opacus_hooks_is_the_plain_ones(clipping):
    """The importance pass (torch.func) runs with the clipper's hooks lifted: it was a traceback."""
    argv = ["--strategy", "mas", "--n-tasks", "2", "--hidden", "4", "--mas-samples", "10000", "--seed", "3"]
    importances = []
    for extra in ([], ["--privacy", "dpsgd", "--dp-clipping", clipping, "--noise-multiplier", "1"]):
        parts = from_argv([*argv, *extra]).build()
        parts.strategy.after_task(parts.scenario.tasks[0])
        importances.append(parts.strategy.importance)
    torch.testing.assert_close(importances[1], importances[0], rtol=1e-5, atol=1e-8)
    assert importances[0].abs().sum() > 0


# ---------------------------------------------------------------- lwf

@pytest.mark.parametrize("setting,per_class,task_heads", [
    ("task_il", False, "separate"), ("class_il", False, "separate"), ("task_il", True, "separate"),
    ("task_il", False, "shared")])
def test_lwf_term_is_zero_for_the_old_model_and_the_tempered_kl_after_a_change(setting, per_class, task_heads):
    """(task_il with --task-heads shared: the KL over task 0's rows of the one output layer.)"""
    from clsim.strategies.lwf import LwF
    scenario, learner, mechanism = digits(setting, task_heads=task_heads)
    lwf = LwF(LwF.Options(lwf_alpha=0.5, lwf_temperature=2.0, lwf_per_class=per_class))
    lwf.setup(learner, scenario, mechanism)
    lwf.after_task(scenario.tasks[0])
    batch = first_batch(learner, scenario.tasks[1])
    losses, outputs = learner.forward(batch)
    assert torch.equal(lwf.loss(batch, losses, outputs), losses)   # the model equals its old copy
    old = learner.model(batch.x, 0).detach()
    with torch.no_grad():   # a change that moves the logits well past assert_close's tolerance
        for p in learner.model.backbone.parameters():
            p.add_(torch.randn(p.shape, generator=torch.Generator().manual_seed(1)))
    losses, outputs = learner.forward(batch)
    new = learner.model(batch.x, 0)
    if setting == "class_il":
        old, new = old[:, [0, 1]], new[:, [0, 1]]   # the classes of task 0
    p_old = F.softmax(old / 2.0, 1)
    kl = (p_old * (p_old.log() - F.log_softmax(new / 2.0, 1))).sum(1)
    kl = kl / 2 if per_class else kl   # averaged over the head's two classes
    torch.testing.assert_close(lwf.loss(batch, losses, outputs) - losses, 0.5 * kl)
    assert float(kl.detach().min()) > 0.1


@pytest.mark.parametrize("per_class", [False, True])
def test_lwf_balanced_as_van_de_ven_with_active_classes_spans_the_current_classes_too(per_class):
    """Their Class-IL LwF at t = 2: ½·CE + ½·α·Σ_{c∈{0,1}} p_old(c)·(log p_old(c) − log q(c)), q the
    student's softmax over every class seen so far ({0,1,2,3}), p_old the old model's over {0,1};
    their code of April 2019 averaged that sum over the student's 4 classes."""
    from clsim.strategies.lwf import LwF
    scenario, learner, mechanism = digits("class_il")
    lwf = LwF(LwF.Options(lwf_alpha=4.0, lwf_temperature=2.0, lwf_balance=True, lwf_per_class=per_class))
    lwf.setup(learner, scenario, mechanism)
    lwf.after_task(scenario.tasks[0])
    learner.span_classes([0, 1, 2, 3])
    batch = first_batch(learner, scenario.tasks[1])
    losses, outputs = learner.forward(batch)
    p_old = F.softmax(outputs[:, [0, 1]].detach() / 2.0, 1)   # the model is still its old copy
    log_q = F.log_softmax(outputs[:, [0, 1, 2, 3]] / 2.0, 1)[:, [0, 1]]
    kd = (p_old * (p_old.log() - log_q)).sum(1)
    assert float(kd.detach().min()) > 0            # the current classes' share is pushed down already
    kd = kd / 4 if per_class else kd
    torch.testing.assert_close(lwf.loss(batch, losses, outputs), 0.5 * losses + 0.5 * 4.0 * kd)


# ---------------------------------------------------------------- a-gem, gem

def memory_and_gradients(strategy_cls, options, n_done=1):
    """`n_done` tasks put in memory; the flat gradient of each task's memory, computed apart."""
    scenario, learner, mechanism = digits(n_tasks=5)
    strategy = strategy_cls(options)
    strategy.setup(learner, scenario, mechanism)
    for task in scenario.tasks[:n_done]:
        strategy.after_task(task)
    params = [p for p in learner.model.parameters()]
    refs = []
    for x, y, t, _ in strategy.memory:   # a batch's fields: x, y, t, index
        loss = F.cross_entropy(learner.model(x, int(t[0])), y)
        grads = torch.autograd.grad(loss, params, allow_unused=True)
        refs.append(torch.cat([(torch.zeros_like(p) if g is None else g).reshape(-1) for p, g in zip(params, grads)]))
    return scenario, learner, mechanism, strategy, params, refs


def set_grad(params, flat):
    offset = 0
    for p in params:
        p.grad = flat[offset:offset + p.numel()].view_as(p).clone()
        offset += p.numel()


def get_grad(params):
    return torch.cat([p.grad.reshape(-1) for p in params])


def test_agem_projects_a_conflicting_gradient_onto_the_reference_gradients_half_space():
    from clsim.strategies.agem import AGEM
    scenario, learner, _, agem, params, (ref,) = memory_and_gradients(AGEM, AGEM.Options(gem_memory=100, agem_batch=500))
    assert len(agem.memory[0][1]) == 20 and scenario.tasks[0].dataset_id in agem.ledger.accesses
    torch.manual_seed(1)
    conflicting = -0.7 * ref + 0.01 * torch.randn_like(ref)
    set_grad(params, conflicting)
    agem.after_backward()
    projected = get_grad(params)
    dot = torch.dot(conflicting, ref)
    torch.testing.assert_close(projected, conflicting - dot / ref.dot(ref) * ref)
    assert float(dot) < 0 and float(torch.dot(projected, ref)) >= -1e-6 * float(ref.norm() ** 2)
    agreeing = 0.3 * ref + 0.01 * torch.randn_like(ref)
    set_grad(params, agreeing)
    agem.after_backward()
    assert torch.equal(get_grad(params), agreeing) and agem.projected == 1   # left alone


@pytest.mark.slow
def test_agem_counts_projected_steps_as_integers_in_every_step_record():
    """A-GEM's count lives on the device (read one step late like the loss): the step records still
    carry it as an integer that grows by at most one a step and ends at the task record's count."""
    from clsim import Experiment

    class Watch:
        def __init__(self):
            self.steps, self.tasks = [], []

        def step(self, record):
            self.steps.append(record.get("strategy/projected_steps"))

        def task(self, record):
            self.tasks.append(record["strategy"]["projected_steps"])

    parts = from_argv(["--strategy", "agem", "--epochs", "1", "--n-tasks", "2"]).build()
    parts.loggers = [watch := Watch()]
    parts.train()
    assert all(type(n) is int for n in watch.steps), set(map(type, watch.steps))
    assert all(0 <= b - a <= 1 for a, b in zip(watch.steps, watch.steps[1:]))
    assert watch.tasks[0] == 0 < watch.tasks[-1] == watch.steps[-1]


def test_gem_solves_its_dual_qp_one_constraint_by_hand_and_two_constraints_feasible():
    from clsim.strategies.agem import GEM
    _, _, _, gem, params, (m,) = memory_and_gradients(GEM, GEM.Options(gem_memory=100, gem_margin=0.5))
    conflicting = -0.7 * m
    set_grad(params, conflicting)
    gem.after_backward()
    # one constraint: min ½(m·m + ε)v² + (g·m)v subject to v ≥ γ  →  v = max(γ, −g·m / (m·m + ε))
    v = max(0.5, float(-conflicting.dot(m) / (m.dot(m) + 1e-3)))
    torch.testing.assert_close(get_grad(params), conflicting + v * m, rtol=1e-4, atol=1e-7)
    _, _, _, gem, params, refs = memory_and_gradients(GEM, GEM.Options(gem_memory=100, gem_margin=0.0), n_done=3)
    torch.manual_seed(2)
    g = -(refs[0] + refs[2]) + 0.05 * torch.randn_like(refs[0])
    assert min(float(g.dot(r)) for r in refs) < 0
    set_grad(params, g)
    gem.after_backward()
    out = get_grad(params)
    for r in refs:   # every earlier task's loss no longer rises (up to the ε damping)
        assert float(out.dot(r)) >= -1e-2 * float(r.norm()) * float(out.norm())


# ---------------------------------------------------------------- gdumb, icarl

@pytest.mark.parametrize("setting", ["class_il", "task_il"])
def test_gdumb_memory_stays_class_balanced_and_full(setting):
    from clsim.strategies.gdumb import GDumb
    scenario, learner, mechanism = digits(setting)
    gdumb = GDumb(GDumb.Options(gdumb_memory=50))
    gdumb.setup(learner, scenario, mechanism)
    for i, task in enumerate(scenario.tasks):
        gdumb.before_task(task)
        counts = sorted(gdumb.memory.counts.values())
        assert sum(counts) == 50 and len(counts) == 2 * (i + 1)     # k slots over the classes seen
        assert counts[-1] - counts[0] <= 1                          # 25/25, 12-13, 8-9, 6-7, 5
        x, y, t = gdumb.memory.tensors()
        keys = list(zip(t.tolist(), y.tolist())) if setting == "task_il" else [(c,) for c in y.tolist()]
        assert sorted(map(keys.count, set(keys))) == counts         # the counts are the memory's
    assert mechanism.ledger.epsilon(scenario.tasks[0].dataset_id) == float("inf")


def test_icarl_herding_picks_the_example_closest_to_the_mean_first():
    from clsim.strategies.icarl import herding
    # unit vectors at angles 0, 80 and −60 degrees; their mean is closest to the 0-degree one, and then
    # the pair whose running mean (φ0 + φ)/2 is closest to the mean is (0, 80): herding, not nearest-first.
    angles = torch.tensor([80.0, 0.0, -60.0]) * torch.pi / 180
    features = torch.stack([angles.cos(), angles.sin()], 1)
    mean = features.mean(0)
    assert int((features - mean).norm(dim=1).argmin()) == 1
    assert herding(features, 3).tolist() == [1, 0, 2]
    assert herding(features, 1).tolist() == [1]


@pytest.mark.parametrize("temperature", [1.0, 2.0])
def test_icarl_loss_targets_earlier_classes_with_the_old_models_tempered_sigmoid(temperature):
    """Task 1 of class_il: BCE summed over classes {0,1,2,3}; targets sigmoid(y_old/T) on {0,1} (T = 2 in
    van de Ven & Tolias's code), the one-hot label on the current classes {2,3}."""
    from clsim.strategies.icarl import ICaRL
    scenario, learner, mechanism = digits("class_il")
    icarl = ICaRL(ICaRL.Options(icarl_memory=20, icarl_temperature=temperature))
    icarl.setup(learner, scenario, mechanism)
    icarl.before_task(scenario.tasks[0])
    icarl.after_task(scenario.tasks[0])
    with torch.no_grad():
        learner.model.backbone.body[1].weight.mul_(1.5)   # the model moves away from its old copy
    icarl.before_task(scenario.tasks[1])
    batch = first_batch(learner, scenario.tasks[1])
    _, outputs = learner.forward(batch)
    with torch.no_grad():
        learner.model.backbone.body[1].weight.div_(1.5)
        old = learner.model(batch.x, 1)
    targets = torch.cat([torch.sigmoid(old[:, [0, 1]] / temperature), F.one_hot(batch.y - 2, 2).float()], 1)
    expected = F.binary_cross_entropy_with_logits(outputs[:, [0, 1, 2, 3]], targets, reduction="none").sum(1)
    torch.testing.assert_close(icarl.loss(batch, None, outputs), expected)


@pytest.mark.parametrize("args, message", [
    (["--strategy", "icarl", "--setting", "task_il"], "icarl works in class_il only"),
    (["--strategy", "hat", "--setting", "class_il"], "hat works in task_il only"),
    (["--strategy", "hat", "--setting", "task_il", "--privacy", "dpsgd", "--epsilon", "8"], "hat cannot train under"),
    (["--strategy", "gdumb", "--scenario", "cartpole"], "gdumb works with supervised learners only")])
@pytest.mark.slow
def test_strategies_refuse_what_their_method_does_not_define_in_one_line(args, message, tmp_path, capsys):
    from clsim import cli
    assert cli.main([*args, "--out", str(tmp_path)]) == 2
    errors = [line for line in capsys.readouterr().err.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and message in errors[0]
    assert not any(tmp_path.iterdir())


# ---------------------------------------------------------------- forgetting on split_digits task_il

PROTECTIVE = {"si": {}, "mas": {"mas_lambda": 0.03}, "lwf": {}, "l2": {}, "agem": {}, "gem": {}, "gdumb": {}, "packnet": {}, "hat": {}}


def digits_bwt(name: str, **options) -> float:
    """BWT of a short task_il run on real digits: lr 0.2 and 3 epochs, where naive forgets."""
    from clsim import engine
    from clsim.registry import STRATEGIES
    scenario, learner, _ = digits("task_il", hidden=16, lr=0.2)
    cls = STRATEGIES.get(name).target
    return engine.run(engine.Parts(scenario, learner, cls(cls.Options(**options)), Mechanism(), Ledger(), [], 3))["bwt"]


@pytest.fixture(scope="module")
def naive_bwt():
    bwt = digits_bwt("naive")
    assert bwt < -5   # the comparison means something only if naive forgets
    return bwt


@pytest.mark.slow
@pytest.mark.parametrize("name", sorted(PROTECTIVE))
def test_protective_strategies_forget_less_than_naive_on_split_digits_task_il(name, naive_bwt):
    assert digits_bwt(name, **PROTECTIVE[name]) > naive_bwt


# ---------------------------------------------------------------- packnet

@pytest.mark.slow
def test_packnet_frozen_weights_never_change_and_task_scores_stay_exact():
    from clsim import engine
    from clsim.strategies.packnet import PackNet
    scenario, learner, mechanism = digits("task_il", hidden=16, n_tasks=3, lr=0.2, momentum=0.9)
    packnet = PackNet(PackNet.Options(packnet_retrain_epochs=1))
    snapshots = []

    class Snapshot:
        def step(self, record):
            pass

        def task(self, record):
            snapshots.append({n: p.detach().clone() for n, p in learner.shared_parameters().items()})

    result = engine.run(engine.Parts(scenario, learner, packnet, mechanism, Ledger(), [Snapshot()], 2))
    owner = packnet.owner
    first = snapshots[0]
    for later in snapshots[1:]:
        for n in first:
            if n in owner:   # task 0's kept weights, exactly as task 0 left them
                assert torch.equal(later[n][owner[n] == 0], first[n][owner[n] == 0])
            else:            # biases: the first task's
                assert torch.equal(later[n], first[n])
    shares = [float((torch.cat([o.reshape(-1) for o in owner.values()]) == t).float().mean()) for t in range(3)]
    assert shares == pytest.approx([1 / 3, 1 / 3, 1 / 3], abs=0.01)   # 2/3 then 1/2 of the rest released
    matrix = result["accuracy_matrix"]
    assert matrix[1][0] == matrix[2][0] == matrix[0][0] and matrix[2][1] == matrix[1][1]   # no forgetting at all


# ---------------------------------------------------------------- hat

def test_hat_masks_gate_the_gradients_of_units_earlier_tasks_use():
    """Task 0's embeddings set by hand to +6 (used) or −6 (free): σ(400·±6) is exactly 1 or 0, so on
    task 1 a weight's gradient is multiplied by 1 − min(a_out, a_in): zero between used units only."""
    from clsim.strategies.hat import HAT
    scenario, learner, mechanism = digits("task_il", hidden=6)
    hat = HAT(HAT.Options())
    hat.setup(learner, scenario, mechanism)
    used = [torch.tensor([1, 1, 0, 0, 1, 0], dtype=torch.bool), torch.tensor([0, 1, 1, 0, 0, 0], dtype=torch.bool)]
    with torch.no_grad():
        for e, u in zip(hat.embeddings, used):
            e[0] = torch.where(u, 6.0, -6.0)
            e[1] = 6.0   # task 1's gates all open, so every raw gradient flows
    hat.after_task(scenario.tasks[0])
    assert [c.tolist() for c in hat.cumulative] == [u.float().tolist() for u in used]
    hat.before_task(scenario.tasks[1])
    batch = first_batch(learner, scenario.tasks[1])
    hat.s = 50.0
    losses, _ = learner.forward(batch)
    first, second = hat.layers
    loss = losses.mean() + hat.penalty()
    raw = torch.autograd.grad(loss, [first.weight, first.bias, second.weight, second.bias], retain_graph=True)
    loss.backward()
    hat.after_backward()
    u0, u1 = (u.float() for u in used)
    torch.testing.assert_close(first.weight.grad, raw[0] * (1 - u0)[:, None])           # inputs ungated
    torch.testing.assert_close(first.bias.grad, raw[1] * (1 - u0))
    torch.testing.assert_close(second.weight.grad, raw[2] * (1 - torch.minimum(u1[:, None], u0[None, :])))
    torch.testing.assert_close(second.bias.grad, raw[3] * (1 - u1))
    blocked = used[1][:, None] & used[0][None, :]          # used unit → used unit
    assert bool((second.weight.grad[blocked] == 0).all()) and float(raw[2][blocked].abs().sum()) > 0
    assert torch.equal(second.weight.grad[~blocked], raw[2][~blocked]) and float(raw[2][~blocked].abs().sum()) > 0
    # Evaluating task 0 uses s_max: its free units are switched off entirely.
    learner.model.eval()
    learner.model(batch.x, 0)
    assert float(learner.model.backbone(batch.x).detach()[:, ~used[1]].abs().max()) == 0


# ---------------------------------------------------------------- under a privacy mechanism

@pytest.mark.slow
@pytest.mark.parametrize("strategy, finite", [("si", True), ("lwf", True), ("packnet", True), ("agem", False)])
def test_under_dpsgd_the_ledger_says_what_each_strategy_declares(strategy, finite, tmp_path):
    """Strategies reading data only through the mechanism keep a finite ε; a raw memory makes it ∞."""
    import json
    from clsim import cli
    assert cli.main(["--strategy", strategy, "--setting", "task_il", "--privacy", "dpsgd", "--epsilon", "8",
                     "--n-tasks", "2", "--epochs", "1", "--hidden", "20", "--checkpoint", "false",
                     "--progress", "false", "--out", str(tmp_path)]) == 0
    run = next(p for p in tmp_path.iterdir() if p.is_dir() and not p.name.startswith("."))
    privacy = json.loads((run / "summary.json").read_text())["privacy"]
    declared = cli.STRATEGIES.get(strategy).target.data_access
    assert (declared == "accounted") == finite
    if finite:
        assert 0 < privacy["epsilon_worst"] <= 8.0
    else:
        assert privacy["epsilon_worst"] is None and all(d["epsilon_infinite"] for d in privacy["datasets"].values())
