"""--task-heads shared: task_il's heads as row blocks of ONE output layer (van de Ven & Tolias's code,
Mammoth's Task-IL), beside the default of one Linear per task; on real digits, real Opacus."""
from __future__ import annotations

import json
import math

import pytest
import torch
import torch.nn.functional as F

from clsim import Experiment, cli, rundir
from clsim.learners.base import Batch
from test_protocol import StopInSecondTask

QUIET = {"out": None, "loggers": [], "progress": False}


def built(**options):
    return Experiment(setting="task_il", hidden=16, seed=0, **QUIET, **options).build()


def test_shared_heads_are_one_layer_whose_row_blocks_are_the_tasks_logits():
    """One (10, hidden) layer for 3 tasks of 4, 3, 3 digits; task t's logits are its rows' outputs
    (row c is digit c in the natural class order), and a batch mixing tasks gives each example its
    own task's cross-entropy and the gradient of the per-task computation."""
    shared, separate = built(task_heads="shared", n_tasks=3), built(n_tasks=3)
    heads = lambda parts: [tuple(p.shape) for n, p in parts.learner.model.named_parameters() if n.startswith("heads.")]
    assert heads(shared) == [(10, 16), (10,)]
    assert heads(separate) == [(4, 16), (4,), (3, 16), (3,), (3, 16), (3,)]

    learner, tasks = shared.learner, shared.scenario.tasks
    model = learner.model
    x = torch.cat([t.train.x[:5] for t in tasks])
    y = torch.cat([t.train.y[:5] for t in tasks])
    t = torch.arange(3).repeat_interleave(5)
    every = model.heads[0](model.backbone(x))
    for task in tasks:
        assert list(range(10))[model.columns(task.index)] == list(task.classes)
        assert torch.equal(model(x, task.index), every[:, model.columns(task.index)])

    losses, out = learner.forward(Batch(x, y, t, torch.arange(15)))
    assert out.shape == (15, 4) and torch.isinf(out[5:, 3]).all() and torch.isfinite(out[:5]).all()
    mixed = torch.autograd.grad(losses.sum(), list(model.parameters()))
    by_task = torch.cat([F.cross_entropy(model(x[t == k], k), y[t == k], reduction="none") for k in range(3)])
    torch.testing.assert_close(losses, by_task)
    for g_mixed, g_tasks in zip(mixed, torch.autograd.grad(by_task.sum(), list(model.parameters()))):
        torch.testing.assert_close(g_mixed, g_tasks)


def heads_after_each_task(**options):
    """The model and its head tensors at the end of each task of a 2-task Adam run."""
    experiment = Experiment(setting="task_il", n_tasks=2, epochs=1, hidden=16, seed=0, optimizer="adam", lr=0.003,
                            **QUIET, **options)
    parts, kept = experiment.build(), []
    parts.train(checkpoint=lambda s: kept.append({k: v.clone() for k, v in s["model"].items() if "heads" in k}),
                protocol=experiment.protocol_options)
    return parts.learner.model, kept


@pytest.mark.slow
def test_one_adam_keeps_moving_the_rows_of_earlier_tasks_of_a_shared_layer_not_their_own_heads():
    """van de Ven's code under one Adam: task 1 gives task 0's rows zero gradients but Adam's moments
    from task 0 keep stepping them. A fresh Adam has no moments there (no step), and a separate
    head of task 0 takes no step at all (its gradient is None)."""
    model, (after0, after1) = heads_after_each_task(task_heads="shared", optimizer_reset=False)
    rows0, rows1 = model.columns(0), model.columns(1)
    for name in ("heads.0.weight", "heads.0.bias"):
        assert not torch.equal(after1[name][rows0], after0[name][rows0])
    _, (fresh0, fresh1) = heads_after_each_task(task_heads="shared", optimizer_reset=True)
    assert torch.equal(fresh1["heads.0.weight"][rows0], fresh0["heads.0.weight"][rows0])
    assert not torch.equal(fresh1["heads.0.weight"][rows1], fresh0["heads.0.weight"][rows1])
    _, (own0, own1) = heads_after_each_task(task_heads="separate", optimizer_reset=False)
    assert all(torch.equal(own1[n], own0[n]) for n in ("heads.0.weight", "heads.0.bias"))
    assert not torch.equal(own1["heads.1.weight"], own0["heads.1.weight"])


@pytest.mark.slow
def test_shared_heads_resume_exactly_from_a_weights_only_checkpoint(tmp_path):
    """Stopped in task 1 and resumed: the same figures and per-step losses as the whole run."""
    run = {"task_heads": "shared", "optimizer": "adam", "optimizer_reset": False, "lr": 0.003, "setting": "task_il",
           "epochs": 2, "n_tasks": 2, "hidden": "16", "seed": 2, "progress": False, "loggers": "jsonl"}
    whole = Experiment(**run, out=str(tmp_path / "whole")).run()
    state = torch.load(whole.run_dir / "checkpoint.pt", weights_only=True)
    assert state["model"]["heads.0.weight"].shape == (10, 16)
    with pytest.raises(rundir.Interrupted) as stopped:
        Experiment(**{**run, "loggers": ["jsonl", StopInSecondTask]}, out=str(tmp_path / "cut")).run()
    resumed = Experiment(**run, out=str(tmp_path / "cut")).run(resume_dir=stopped.value.partial)
    assert resumed.summary["accuracy_matrix"] == whole.summary["accuracy_matrix"]
    losses = lambda r: [json.loads(line).get("loss") for line in (r.run_dir / "log.jsonl").read_text().splitlines()]
    assert losses(resumed) == losses(whole)


@pytest.mark.slow
def test_ewc_and_blip_protect_only_the_rows_a_task_trained():
    """A shared output layer is one shared tensor: EWC penalises it (its Fisher after task 0 sits on
    task 0's rows, none on the rows of tasks not yet trained), where separate heads are left out;
    BLIP quantises it like class_il's single head, with frozen bits in task 0's rows only."""
    def after_task_0(**options):
        parts = built(n_tasks=3, epochs=1, task_heads="shared", **options)
        parts.scenario.tasks = parts.scenario.tasks[:1]
        parts.train()
        return parts.strategy, parts.learner.model.columns(0)

    ewc, rows = after_task_0(strategy="ewc", fisher="predicted", fisher_samples=50)
    sizes = [p.numel() for p in ewc.learner.shared_parameters().values()]
    fisher = dict(zip(ewc.names, ewc.importance.split(sizes)))["heads.0.weight"].view(10, 16)
    assert fisher[rows].sum() > 0 and fisher[rows.stop:].sum() == 0
    assert not any(n.startswith("heads.") for n in built(strategy="ewc", n_tasks=3).strategy.names)

    blip, rows = after_task_0(strategy="blip")
    bits = blip.bits["heads.0.weight"]
    assert bits[rows].float().mean() > 0 and bits[rows.stop:].sum() == 0


@pytest.mark.parametrize("argv,message", [
    (["--setting", "class_il", "--task-heads", "shared"], "error: --task-heads shared lays out task_il's heads"),
    (["--strategy", "packnet", "--setting", "task_il", "--task-heads", "shared"], "error: packnet gives every shared weight to one task")])
def test_refused_combinations_are_one_line_and_write_nothing(argv, message, tmp_path, capsys):
    assert cli.main([*argv, "--epochs", "1", "--out", str(tmp_path)]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith(message) and "\n" not in err
    assert not any(tmp_path.iterdir())


@pytest.mark.slow
def test_dpsgd_with_shared_heads_spends_the_same_budget():
    """The layout changes which rows a step touches, not what is released: the same ε per task."""
    eps = {}
    for task_heads in ("separate", "shared"):
        summary = Experiment(strategy="dpsgd", setting="task_il", task_heads=task_heads, n_tasks=2, epochs=1,
                             hidden=16, **QUIET).run().summary
        eps[task_heads] = {k: d["epsilon"] for k, d in summary["privacy"]["datasets"].items()}
    assert eps["shared"] == eps["separate"] and all(0 < e < math.inf for e in eps["shared"].values())


def test_a_model_of_ones_own_refuses_the_layout_option_instead_of_ignoring_it():
    from clsim import Experiment
    from clsim.errors import UserError
    from clsim.models import make_model

    def own():
        return make_model("mlp", (64,), "task_il", [2] * 5, 10, hidden=(16,))
    with pytest.raises(UserError, match="task_heads lays out the output layer of the scenario's own model"):
        Experiment(scenario="split_digits", strategy="naive", setting="task_il", task_heads="shared", model=own)
    assert Experiment(scenario="split_digits", strategy="naive", setting="task_il", model=own).model is own
