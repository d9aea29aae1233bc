"""--dp-clipping ghost (Opacus's fast gradient clipping) and bk (book-keeping) give DP-SGD the same
private gradient and the same ε as --dp-clipping hooks (per-example gradients), on real digits and
real Opacus."""
from __future__ import annotations

import pytest
import torch
from torch import nn

from clsim import config
from clsim.config import RunOptions
from clsim.errors import UserError
from clsim.learners.base import Batch
from clsim.learners.supervised import SupervisedLearner
from clsim.models import MultiHeadNet, make_backbone
from clsim.privacy import bk
from clsim.privacy.dpsgd import DPSGD
from clsim.privacy.ledger import Ledger
from clsim.scenarios.split_digits import SplitDigitsOptions, split_digits


def conv_trunk():
    """Conv2d (per-layer norms), GroupNorm and Linear (ghost norms) on 1x8x8 digits."""
    body = nn.Sequential(nn.Conv2d(1, 6, 3, padding=1), nn.GroupNorm(2, 6), nn.ReLU(), nn.Flatten(),
                         nn.Linear(6 * 64, 16), nn.Tanh())
    body.out_features = 16
    return body


TRUNKS = {"conv": conv_trunk,   # clsim's own backbones, small, on 1x8x8 digits (ResNet: GroupNorm under DP)
          "cnn": lambda: make_backbone("cnn", (1, 8, 8), width=4),
          "resnet": lambda: make_backbone("resnet18", (1, 8, 8), width=4)}


def private_step(clipping, trunk, setting, sigma, penalty, mixed=False, task_heads="separate"):
    """One DP-SGD step's gradient on the first Poisson batch of task 1 (`mixed`: with task 0's
    first one appended, as joint training or GDumb mix tasks in a batch), and the ledger's ε."""
    torch.manual_seed(0)
    scenario = split_digits(SplitDigitsOptions(hidden=16, task_heads=task_heads), RunOptions(setting=setting))
    heads = [t.n_outputs for t in scenario.tasks] if setting == "task_il" else [10]
    model = MultiHeadNet(TRUNKS[trunk](), heads, shared=task_heads == "shared") if trunk in TRUNKS \
        else scenario.make_model()
    learner = SupervisedLearner(model, lr=0.1, momentum=0.0, batch_size=32, device=torch.device("cpu"),
                                generator=torch.Generator().manual_seed(0))
    mechanism = DPSGD(config.build(DPSGD.Options, {"noise_multiplier": sigma, "max_grad_norm": 0.5,
                                                   "dp_clipping": clipping}))
    mechanism.check(learner, scenario, 1)
    mechanism.attach(learner)
    ledger = Ledger(**mechanism.ledger_options())
    mechanism.setup(learner, scenario, ledger)
    assert mechanism.clipping == clipping
    task = scenario.tasks[1]
    optimizer = mechanism.before_task(task, learner.make_optimizer())
    batch = next(iter(mechanism.batches(task, 0, None)))
    if mixed:
        other = next(iter(mechanism.batches(scenario.tasks[0], 0, None)))
        batch = Batch(*(torch.cat([getattr(batch, f), getattr(other, f)]) for f in ("x", "y", "t", "index")))
        mechanism._batch = batch
    optimizer.zero_grad(set_to_none=True)
    losses, _ = learner.forward(batch)
    extra = sum(p.square().sum() for p in learner.model.backbone.parameters()) if penalty else None
    mechanism.backward(losses, extra)
    grads = {n: p.grad.clone() for n, p in learner.model.named_parameters() if p.grad is not None}
    return grads, ledger.epsilon(task.dataset_id)


@pytest.mark.parametrize("clipping,trunk,setting,penalty", [
    ("ghost", "mlp", "task_il", False), ("ghost", "conv", "task_il", True), ("ghost", "conv", "class_il", False),
    ("bk", "mlp", "task_il", False), ("bk", "mlp", "class_il", True), ("bk", "conv", "task_il", True),
    ("bk", "cnn", "task_il", True), ("bk", "cnn", "class_il", False), ("bk", "resnet", "task_il", True),
    ("bk", "resnet", "class_il", False)])
def test_fast_clipping_gives_the_hooks_gradient(clipping, trunk, setting, penalty, monkeypatch):
    monkeypatch.setattr(bk, "CHUNK", 7)     # bk forms a batch's rows and norms in several chunks
    hooks, eps_hooks = private_step("hooks", trunk, setting, 0.0, penalty)
    fast, eps_fast = private_step(clipping, trunk, setting, 0.0, penalty)
    assert set(fast) == set(hooks)
    if setting == "task_il":        # the other tasks' heads are left out of the step in both modes
        assert not any(n.startswith("heads.0.") for n in fast)
    for n in hooks:
        torch.testing.assert_close(fast[n], hooks[n], rtol=1e-5, atol=1e-5)
    assert any(h.abs().sum() > 0 for h in hooks.values())
    assert eps_fast == eps_hooks


@pytest.mark.parametrize("clipping,task_heads", [("ghost", "separate"), ("bk", "separate"),
                                                 ("ghost", "shared"), ("bk", "shared")])
def test_a_batch_mixing_tasks_is_clipped_alike(clipping, task_heads):
    """task_il heads each run on the whole batch (kept on their own task's rows), and a shared
    output layer runs once on it (--task-heads shared), so every mode sees whole-batch layer
    calls: the same clipped gradient, both tasks' heads (or rows) included."""
    hooks, _ = private_step("hooks", "conv", "task_il", 0.0, False, mixed=True, task_heads=task_heads)
    fast, _ = private_step(clipping, "conv", "task_il", 0.0, False, mixed=True, task_heads=task_heads)
    assert set(fast) == set(hooks)
    if task_heads == "shared":
        assert all(hooks["heads.0.weight"][rows].abs().sum() > 0 for rows in (slice(0, 2), slice(2, 4)))
    else:
        assert {"heads.0.weight", "heads.1.weight"} <= set(hooks)
    for n in hooks:
        torch.testing.assert_close(fast[n], hooks[n], rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("clipping,trunk", [("ghost", "mlp"), ("bk", "mlp"), ("bk", "cnn")])
def test_fast_clipping_adds_the_same_noise(clipping, trunk):
    hooks, eps_hooks = private_step("hooks", trunk, "task_il", 1.0, False)
    ghost, eps_ghost = private_step(clipping, trunk, "task_il", 1.0, False)
    clean, _ = private_step("hooks", trunk, "task_il", 0.0, False)
    for n in hooks:
        torch.testing.assert_close(ghost[n], hooks[n], rtol=1e-5, atol=1e-5)
    assert any((hooks[n] - clean[n]).abs().max() > 1e-3 for n in hooks)    # the noise is there
    assert eps_ghost == eps_hooks and eps_hooks < float("inf")


class Binned(nn.Module):
    """Pixels binned and embedded: an Embedding, which Opacus has ghost norms for and bk does not cover."""

    def __init__(self):
        super().__init__()
        self.emb = nn.Embedding(5, 2)

    def forward(self, x):
        return self.emb((x.flatten(1) * 4).clamp(0, 4).long()).flatten(1)


AUTO_TRUNKS = {"conv": conv_trunk,
               "prelu": lambda: nn.Sequential(nn.Flatten(), nn.Linear(64, 16), nn.PReLU()),
               "embedding": lambda: nn.Sequential(Binned(), nn.Linear(128, 16))}


@pytest.mark.parametrize("trunk,clipping,why", [
    ("mlp", "bk", "book-keeping covers every trained layer"), ("conv", "bk", "book-keeping covers every"),
    ("embedding", "ghost", "book-keeping does not cover backbone.0.emb (Embedding); Opacus has ghost norms"),
    ("prelu", "hooks", "book-keeping does not cover backbone.2 (PReLU) and Opacus has no ghost norms for PReLU")])
def test_auto_clipping_takes_bk_then_ghost_then_hooks_and_says_why(trunk, clipping, why, capsys):
    torch.manual_seed(0)
    scenario = split_digits(SplitDigitsOptions(hidden=16), RunOptions(setting="task_il"))
    model = None
    if trunk in AUTO_TRUNKS:
        body = AUTO_TRUNKS[trunk]()
        body.out_features = 16
        model = MultiHeadNet(body, [t.n_outputs for t in scenario.tasks])
    learner = SupervisedLearner(model or scenario.make_model(), lr=0.1, momentum=0.0, batch_size=32,
                                device=torch.device("cpu"), generator=torch.Generator().manual_seed(0))
    mechanism = DPSGD(config.build(DPSGD.Options, {}))
    mechanism.check(learner, scenario, 1)
    mechanism.attach(learner)
    assert mechanism.clipping == clipping
    assert f"--dp-clipping {clipping}: {why}" in capsys.readouterr().err
    assert any(why in note for note in mechanism.notes)         # the ledger's notes say it too


@pytest.mark.slow
def test_replay_under_dpsgd_clips_with_hooks_and_ghost_and_bk_are_refused(tmp_path):
    from conftest import run_cli
    proc = run_cli("--scenario", "split_digits", "--strategy", "er", "--privacy", "dpsgd", "--epochs", "1",
                   "--checkpoint", "false", out=tmp_path / "auto")
    assert "--dp-clipping hooks: the strategy forwards the model 2 times a step" in proc.stderr
    for clipping in ("ghost", "bk"):
        proc = run_cli("--scenario", "split_digits", "--strategy", "er", "--privacy", "dpsgd", "--dp-clipping",
                       clipping, out=tmp_path / clipping, check=False)
        assert proc.returncode == 2 and "use --dp-clipping hooks" in proc.stderr
        assert len(proc.stderr.strip().splitlines()) == 1 and not (tmp_path / clipping).exists()


@pytest.mark.slow
@pytest.mark.parametrize("strategy", ["er", "derpp", "sparcl"])
def test_replay_under_dpsgd_runs_in_task_il_and_the_ledger_marks_the_buffer_raw(strategy, tmp_path):
    """An old task's head is reached by the buffer draw alone, so it has fewer per-example rows
    than the shared layers when the current batch is larger (Opacus refused to stack them)."""
    from conftest import read_summary, run_cli
    run_cli("--scenario", "split_digits", "--strategy", strategy, "--setting", "task_il", "--privacy", "dpsgd",
            "--epochs", "1", "--n-tasks", "2", "--checkpoint", "false", out=tmp_path)
    summary = read_summary(tmp_path)
    assert len(summary["accuracy_matrix"]) == 2
    for dataset in summary["privacy"]["datasets"].values():
        purposes = {(a["mechanism"], a["purpose"]) for a in dataset["accesses"]}
        assert {("raw", "replay buffer"), ("gaussian", "dpsgd training")} <= purposes
        assert dataset["epsilon_infinite"] and dataset["epsilon"] is None


def test_several_forwards_give_each_row_the_sum_of_its_examples_gradients():
    """Rows of a step with a current batch (5, task 1) and a buffer draw (3, tasks 0 and 1): row
    i holds the gradient of current example i plus buffer example i in every layer, the head
    only the buffer reached included (padded with zero rows)."""
    import copy

    from clsim.privacy.clipping import Hooks
    torch.manual_seed(0)
    trunk = nn.Sequential(nn.Flatten(), nn.Linear(64, 8), nn.Tanh())
    trunk.out_features = 8
    model = MultiHeadNet(trunk, [3, 3])
    plain = copy.deepcopy(model)
    clipper = Hooks(model, max_grad_norm=1.0, forwards=2)
    x_now, y_now, t_now = torch.randn(5, 1, 8, 8), torch.randint(0, 3, (5,)), torch.ones(5, dtype=torch.long)
    x_old, y_old, t_old = torch.randn(3, 1, 8, 8), torch.randint(0, 3, (3,)), torch.tensor([0, 1, 0])
    ce = nn.functional.cross_entropy
    losses = torch.cat([ce(model(x_now, t_now), y_now, reduction="none"),
                        ce(model(x_old, t_old), y_old, reduction="none")])
    active = clipper.clipped_sum(losses, None, list(model.parameters()))
    assert {len(p.grad_sample) for p in active} == {5}
    for i in range(5):
        loss = ce(plain(x_now[i:i + 1], t_now[i:i + 1]), y_now[i:i + 1])
        if i < 3:
            loss = loss + ce(plain(x_old[i:i + 1], t_old[i:i + 1]), y_old[i:i + 1])
        grads = torch.autograd.grad(loss, list(plain.parameters()), allow_unused=True)
        for p, g in zip(model.parameters(), grads):
            torch.testing.assert_close(p.grad_sample[i], torch.zeros_like(p) if g is None else g)


def test_bk_refuses_a_layer_it_does_not_cover_in_one_line():
    torch.manual_seed(0)
    scenario = split_digits(SplitDigitsOptions(hidden=16), RunOptions(setting="task_il"))
    body = nn.Sequential(nn.Flatten(), nn.Linear(64, 16), nn.PReLU())
    body.out_features = 16
    learner = SupervisedLearner(MultiHeadNet(body, [t.n_outputs for t in scenario.tasks]), lr=0.1, momentum=0.0,
                                batch_size=32, device=torch.device("cpu"), generator=torch.Generator().manual_seed(0))
    mechanism = DPSGD(config.build(DPSGD.Options, {"dp_clipping": "bk"}))
    mechanism.check(learner, scenario, 1)
    with pytest.raises(UserError, match=r"not backbone.2 \(PReLU\): use --dp-clipping hooks"):
        mechanism.attach(learner)


def test_bk_leaves_torch_func_transforms_of_the_model_alone():
    """Strategies may run torch.func over the model under the mechanism (MAS's importances):
    bk's taps stay out of those forwards (a custom Function would break the transform)."""
    from torch.func import functional_call, grad, vmap
    torch.manual_seed(0)
    scenario = split_digits(SplitDigitsOptions(hidden=16), RunOptions(setting="task_il"))
    learner = SupervisedLearner(MultiHeadNet(conv_trunk(), [t.n_outputs for t in scenario.tasks]), lr=0.1,
                                momentum=0.0, batch_size=32, device=torch.device("cpu"),
                                generator=torch.Generator().manual_seed(0))
    mechanism = DPSGD(config.build(DPSGD.Options, {"dp_clipping": "bk"}))
    mechanism.check(learner, scenario, 1)
    mechanism.attach(learner)
    params = {n: p.detach() for n, p in learner.model.named_parameters()}
    norm = lambda p, x: functional_call(learner.model, p, (x[None], 0)).square().sum()  # noqa: E731
    g = vmap(grad(norm), in_dims=(None, 0))(params, scenario.tasks[0].train.x[:5])
    assert g["backbone.0.weight"].shape[0] == 5 and not mechanism.clipper.calls
