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
from clsim.learners.supervised import SupervisedLearner
from clsim.models import MultiHeadNet, make_backbone
from clsim.privacy.dpsgd import DPSGD
from clsim.privacy.ledger import Ledger
from scenarios.split_digits import SplitDigitsOptions, split_digits


def conv_trunk():
    """Conv2d (per-layer norms), GroupNorm and Linear (ghost norms) on 1x8x8 digits."""
    body = nn.Sequential(nn.Conv2d(1, 6, 3, padding=1), nn.GroupNorm(2, 6), nn.ReLU(), nn.Flatten(),
                         nn.Linear(6 * 64, 16), nn.Tanh())
    body.out_features = 16
    return body


TRUNKS = {"conv": conv_trunk,   # clsim's own backbones, small, on 1x8x8 digits (ResNet: GroupNorm under DP)
          "cnn": lambda: make_backbone("cnn", (1, 8, 8), width=4),
          "resnet": lambda: make_backbone("resnet18", (1, 8, 8), width=4)}


def private_step(clipping, trunk, setting, sigma, penalty):
    """One DP-SGD step's gradient on the first Poisson batch of task 1, and the ledger's ε."""
    torch.manual_seed(0)
    scenario = split_digits(SplitDigitsOptions(hidden=16), RunOptions(setting=setting))
    heads = [t.n_outputs for t in scenario.tasks] if setting == "task_il" else [10]
    model = MultiHeadNet(TRUNKS[trunk](), heads) if trunk in TRUNKS else scenario.make_model()
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
def test_fast_clipping_gives_the_hooks_gradient(clipping, trunk, setting, penalty):
    hooks, eps_hooks = private_step("hooks", trunk, setting, 0.0, penalty)
    fast, eps_fast = private_step(clipping, trunk, setting, 0.0, penalty)
    assert set(fast) == set(hooks)
    if setting == "task_il":        # the other tasks' heads are left out of the step in both modes
        assert not any(n.startswith("heads.0.") for n in fast)
    for n in hooks:
        torch.testing.assert_close(fast[n], hooks[n], rtol=1e-5, atol=1e-5)
    assert any(h.abs().sum() > 0 for h in hooks.values())
    assert eps_fast == eps_hooks


@pytest.mark.parametrize("clipping,trunk", [("ghost", "mlp"), ("bk", "mlp"), ("bk", "cnn")])
def test_fast_clipping_adds_the_same_noise(clipping, trunk):
    hooks, eps_hooks = private_step("hooks", trunk, "task_il", 1.0, False)
    ghost, eps_ghost = private_step(clipping, trunk, "task_il", 1.0, False)
    clean, _ = private_step("hooks", trunk, "task_il", 0.0, False)
    for n in hooks:
        torch.testing.assert_close(ghost[n], hooks[n], rtol=1e-5, atol=1e-5)
    assert any((hooks[n] - clean[n]).abs().max() > 1e-3 for n in hooks)    # the noise is there
    assert eps_ghost == eps_hooks and eps_hooks < float("inf")


@pytest.mark.parametrize("trunk,ghost", [("mlp", True), ("conv", False)])
def test_auto_clipping_is_ghost_only_where_every_layer_has_ghost_norms(trunk, ghost, capsys):
    torch.manual_seed(0)
    scenario = split_digits(SplitDigitsOptions(hidden=16), RunOptions(setting="task_il"))
    model = MultiHeadNet(conv_trunk(), [t.n_outputs for t in scenario.tasks]) if trunk == "conv" else None
    learner = SupervisedLearner(model or scenario.make_model(), lr=0.1, momentum=0.0, batch_size=32,
                                device=torch.device("cpu"), generator=torch.Generator().manual_seed(0))
    mechanism = DPSGD(config.build(DPSGD.Options, {}))
    mechanism.check(learner, scenario, 1)
    mechanism.attach(learner)
    assert mechanism.clipping == ("ghost" if ghost else "hooks")
    said = capsys.readouterr().err
    assert f"--dp-clipping {'ghost' if ghost else 'hooks'}" in said
    assert ("Conv2d" in said) == (not ghost)


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
