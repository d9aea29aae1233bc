"""Training protocols: the validation split, the HAT/BLIP plateau rule, cosine/step schedules, Adam,
and the ledger's record of validation reads."""
import copy
import json
import math

import pytest
import torch

from clsim import Experiment, cli, rundir
from clsim.config import ProtocolOptions
from clsim.loggers import Logger
from clsim.privacy.ledger import Ledger
from clsim.protocol import TaskSchedule
from clsim.scenario import Task, TaskData


def run(tmp_path, *args):
    result = cli.from_argv([*args, "--out", str(tmp_path), "--checkpoint", "false"]).run()
    run_dir, summary = result.run_dir, result.summary
    tasks = [json.loads(line) for line in (run_dir / "log.jsonl").read_text().splitlines()]
    return summary, [r for r in tasks if r["kind"] == "task"]


class ScriptedValidation:
    """A real model whose validation losses follow a script, and whose weights mark the epoch."""

    def __init__(self, losses):
        self.model = torch.nn.Linear(1, 1)
        self.losses = list(losses)

    def mean_loss(self, task, data):
        return self.losses.pop(0)


def hat_rule(losses, lr, patience=5, factor=3.0, lr_min=1e-4):
    """The HAT/BLIP `train` loop's rule, written out: lrs after each epoch, epochs run, best epoch."""
    best, wait, lrs, best_epoch = float("inf"), patience, [], None
    for e, loss in enumerate(losses):
        if loss < best:
            best, wait, best_epoch = loss, patience, e
        else:
            wait -= 1
            if wait <= 0:
                lr /= factor
                if lr < lr_min:
                    lrs.append(lr)
                    return lrs, e + 1, best_epoch
                wait = patience
        lrs.append(lr)
    return lrs, len(losses), best_epoch


@pytest.mark.parametrize("losses", [
    [1.0, 0.9, 0.95, 0.96, 0.97, 0.98, 0.99, 0.85] + [0.9] * 40,   # improve, plateau, improve, stall
    [1.0] + [2.0] * 60,                                             # never improves again: stops at the floor
])
def test_plateau_follows_the_hat_blip_rule_and_restores_the_best_weights(losses):
    learner = ScriptedValidation(losses)
    optimizer = torch.optim.SGD(learner.model.parameters(), lr=0.01)
    task = Task(0, "t", train=TaskData(torch.zeros(4, 1), torch.zeros(4, dtype=torch.long)))
    ledger = Ledger()
    schedule = TaskSchedule(ProtocolOptions(lr_schedule="plateau"), optimizer, learner, task, 200, ledger)
    lrs, states = [], []
    for epoch in range(len(losses)):
        with torch.no_grad():
            learner.model.weight.fill_(epoch)   # the weights this epoch ended with
        stop = schedule.end_epoch()
        lrs.append(optimizer.param_groups[0]["lr"])
        if stop:
            break
    expected_lrs, expected_epochs, best_epoch = hat_rule(losses, 0.01)
    assert lrs == pytest.approx(expected_lrs) and len(lrs) == expected_epochs
    figures = schedule.finish()
    assert figures["epochs_run"] == expected_epochs
    assert learner.model.weight.item() == best_epoch   # best weights restored
    # validating read the task's (private) training data: a raw access in the ledger
    assert ledger.report()["datasets"][task.dataset_id]["epsilon_infinite"]


def test_cosine_and_step_schedules_with_warmup_per_epoch():
    def trace(**kw):
        model = torch.nn.Linear(1, 1)
        opt = torch.optim.SGD(model.parameters(), lr=0.1)
        schedule = TaskSchedule(ProtocolOptions(**kw), opt, None, None, 10, Ledger())
        out = [opt.param_groups[0]["lr"]]
        for _ in range(9):
            opt.step()   # (no gradients: nothing moves) torch expects a step before each schedule step
            schedule.end_epoch()
            out.append(opt.param_groups[0]["lr"])
        return out
    cosine = trace(lr_schedule="cosine", warmup_epochs=2)
    assert cosine[:3] == pytest.approx([0.1 / 3, 0.2 / 3, 0.1])
    assert cosine[2:] == pytest.approx([0.05 * (1 + math.cos(math.pi * k / 8)) for k in range(8)])
    step = trace(lr_schedule="step", lr_milestones="4,7", lr_factor=10.0)
    assert step == pytest.approx([0.1] * 4 + [0.01] * 3 + [0.001] * 3)


@pytest.mark.slow
def test_val_fraction_carves_a_seeded_disjoint_split_and_plateau_trains_on_the_rest(tmp_path):
    from clsim.protocol import carve_validation
    from clsim.registry import SCENARIOS
    experiment = Experiment(val_fraction=0.2)
    full = SCENARIOS.get("split_digits").target(experiment.scenario_options, experiment.run_options)
    carved = copy.deepcopy(full)
    carve_validation(carved, 0.2, seed=0)
    again = copy.deepcopy(full)
    carve_validation(again, 0.2, seed=0)
    for t_full, t, t2 in zip(full.tasks, carved.tasks, again.tasks):
        n = len(t_full.train)
        assert len(t.val) == round(0.2 * n) and len(t.train) + len(t.val) == n
        rows = {tuple(r.flatten().tolist()) for r in t_full.train.x}
        assert {tuple(r.flatten().tolist()) for r in torch.cat([t.train.x, t.val.x])} == rows
        assert torch.equal(t.val.x, t2.val.x)                      # seeded
    summary, tasks = run(tmp_path, "--lr-schedule", "plateau", "--val-fraction", "0.2", "--epochs", "40",
                         "--lr-patience", "2", "--n-tasks", "2")
    assert all(r["schedule"]["epochs_run"] <= 40 for r in tasks)
    assert min(r["schedule"]["final_lr"] for r in tasks) < 0.05     # the lr was divided
    assert all(r["row"][r["task"]] > 90 for r in tasks)


@pytest.mark.slow
def test_validation_under_dpsgd_is_a_raw_access_in_the_ledger(tmp_path):
    summary, _ = run(tmp_path, "--strategy", "dpsgd", "--lr-schedule", "plateau", "--val-fraction", "0.2",
                     "--epochs", "2", "--n-tasks", "2")
    privacy = summary["privacy"]
    for dataset in privacy["datasets"].values():
        purposes = [a["purpose"] for a in dataset["accesses"]]
        assert any(p.startswith("validation") for p in purposes)
        assert dataset["epsilon_infinite"]
    assert privacy["epsilon_worst"] is None


@pytest.mark.slow
def test_adam_and_bad_protocol_options(tmp_path, capsys):
    assert cli.from_argv(["--optimizer", "adam"]).protocol_options.optimizer == "adam"
    summary, _ = run(tmp_path, "--optimizer", "adam", "--lr", "0.001", "--epochs", "1", "--n-tasks", "2")
    assert summary["hparams"]["optimizer"] == "adam"
    for bad in (["--lr-schedule", "step"], ["--lr-schedule", "step", "--lr-milestones", "5,x"],
                ["--val-fraction", "0.95"], ["--lr-schedule", "cosine", "--warmup-epochs", "3", "--epochs", "3"]):
        assert cli.main([*bad, "--out", str(tmp_path / "bad")]) == 2
        err = capsys.readouterr().err.strip()
        assert err.startswith("error: ") and "\n" not in err
    bad = tmp_path / "bad"
    assert not bad.exists() or not any(bad.iterdir())   # no run directory


class StopInSecondTask(Logger):
    """Presses Ctrl-C in the middle of the second task (after the first checkpoint)."""
    writes_files = False

    def step(self, record):
        if record["task"] == 1 and record["epoch"] == 1:
            raise KeyboardInterrupt


@pytest.mark.slow
def test_one_optimizer_across_tasks_carries_adams_state_and_resumes_exactly(tmp_path):
    """--optimizer-reset false: one Adam for the run (van de Ven's default). Its step count spans
    every task, its state is in the checkpoint (weights_only), and a run stopped in its second
    task and resumed gives the uninterrupted figures and losses, which differ from a fresh Adam
    per task's (so a resume that dropped the state would show)."""
    kept = {"optimizer": "adam", "optimizer_reset": False, "lr": 0.003, "setting": "task_il", "epochs": 2,
            "n_tasks": 3, "hidden": "32", "seed": 4, "progress": False, "loggers": "jsonl"}
    whole = Experiment(**kept, out=str(tmp_path / "whole")).run()
    state = torch.load(whole.run_dir / "checkpoint.pt", weights_only=True)["optimizer"]
    assert {int(s["step"]) for s in state["state"].values()} >= {whole.summary["steps"]}   # the trunk's
    assert state["param_groups"][0]["lr"] == 0.003

    fresh = Experiment(**{**kept, "optimizer_reset": True, "loggers": []}, out=None).run()
    assert fresh.summary["accuracy_matrix"][0] == whole.summary["accuracy_matrix"][0]   # task 0: same start
    assert fresh.summary["accuracy_matrix"][1:] != whole.summary["accuracy_matrix"][1:]

    with pytest.raises(rundir.Interrupted) as stopped:
        Experiment(**{**kept, "loggers": ["jsonl", StopInSecondTask]}, out=str(tmp_path / "cut")).run()
    resumed = Experiment(**kept, out=str(tmp_path / "cut")).run(resume_dir=stopped.value.partial)
    for key in ("accuracy_matrix", "acc", "bwt", "steps"):
        assert resumed.summary[key] == whole.summary[key], key
    losses = lambda r: [json.loads(line).get("loss") for line in (r.run_dir / "log.jsonl").read_text().splitlines()]
    assert losses(resumed) == losses(whole)


@pytest.mark.slow
def test_one_optimizer_across_tasks_under_dpsgd_keeps_its_state_and_spends_the_same_budget(tmp_path):
    """Under DP-SGD the kept Adam is stepped through Opacus's wrapper each task (its state moves
    later tasks), and carrying it costs nothing: its moments are made of noised gradients only, so
    the ledger's ε is the fresh-optimizer run's."""
    options = {"strategy": "dpsgd", "optimizer": "adam", "lr": 0.003, "epochs": 1, "n_tasks": 2,
               "seed": 1, "progress": False, "loggers": [], "out": None}
    kept = Experiment(**options, optimizer_reset=False).run().summary
    fresh = Experiment(**options, optimizer_reset=True).run().summary
    assert kept["accuracy_matrix"][0] == fresh["accuracy_matrix"][0]
    assert kept["accuracy_matrix"][1] != fresh["accuracy_matrix"][1]
    eps = lambda s: {k: d["epsilon"] for k, d in s["privacy"]["datasets"].items()}
    assert eps(kept) == eps(fresh) and all(0 < e < math.inf for e in eps(kept).values())


def first_task_of(experiment):
    """The parts of `experiment`, trained on its first task only."""
    parts = experiment.build()
    parts.scenario.tasks = parts.scenario.tasks[:1]
    parts.train(protocol=experiment.protocol_options)
    return parts


@pytest.mark.slow
def test_active_classes_spans_the_softmax_of_training_and_of_the_fisher_over_the_seen_classes(tmp_path, capsys):
    """--active-classes (van de Ven's Class-IL): after task 0 (digits 0, 1) of class_il split_digits,
    the head rows of the unseen classes are untouched (all units: pushed down), and the exact
    Fisher equals a hand-written one whose softmax spans classes 0 and 1 only (zero on the other
    rows). Outside class_il the option is one line."""
    from clsim.fisher import diagonal_fisher
    run = {"strategy": "naive", "setting": "class_il", "epochs": 1, "hidden": "16", "seed": 3, "out": None,
           "loggers": [], "progress": False}
    initial = Experiment(**run).build().learner.model.heads[0].weight.detach().clone()
    active = first_task_of(Experiment(**run, active_classes=True))
    every = first_task_of(Experiment(**run))
    seen = list(active.scenario.tasks[0].classes)
    assert seen == [0, 1]
    for parts, unseen_untouched in ((active, True), (every, False)):
        head = parts.learner.model.heads[0].weight.detach()
        assert torch.equal(head[2:], initial[2:]) is unseen_untouched
        assert not torch.equal(head[:2], initial[:2])

    learner, task, model = active.learner, active.scenario.tasks[0], active.learner.model
    names = ["heads.0.weight", "heads.0.bias"]
    drawn = learner.generator.get_state()
    fisher = diagonal_fisher(learner, task, names, 20, "expected")
    learner.generator.set_state(drawn)   # the same 20 examples, by hand
    examples = torch.cat([x for x, _, _ in learner.fisher_batches(task, 20, False)])
    hand = {n: torch.zeros_like(p) for n, p in model.named_parameters() if n in names}
    model.eval()
    for xi in examples:
        log_probs = torch.log_softmax(model(xi[None], 0)[0, seen], 0)
        for k in range(len(seen)):
            model.zero_grad()
            log_probs[k].backward(retain_graph=True)
            for n, p in model.named_parameters():
                if n in names:
                    hand[n] += log_probs[k].exp().detach() * p.grad ** 2
    for n in names:
        torch.testing.assert_close(fisher[n], hand[n] / len(examples), rtol=1e-4, atol=1e-10)
        assert fisher[n][2:].abs().sum() == 0 and fisher[n][:2].abs().sum() > 0

    assert cli.main(["--setting", "task_il", "--active-classes", "true", "--out", str(tmp_path)]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: --active-classes applies to class_il") and "\n" not in err
    assert not any(tmp_path.iterdir())
