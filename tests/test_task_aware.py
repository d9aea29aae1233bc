"""The task-aware figures of class_il runs (Mammoth's Task-IL column): the same model's outputs with
the columns outside each task's classes masked, recomputed here from the model after every task;
logged per task, read back from TensorBoard; absent in task_il and domain_il."""
from __future__ import annotations

import json

import pytest
import torch

from clsim import Experiment

TINY = dict(scenario="split_digits", n_tasks=3, epochs=1, seed=4, progress=False)


def by_hand(model, tasks, masked: bool) -> list[float]:
    """Accuracy (%) on every task's test set of the argmax of the model's outputs, over every
    column or (masked) over the task's own classes only."""
    model.eval()
    row = []
    with torch.no_grad():
        for task in tasks:
            out = model(task.test.x, task.index)
            if masked:
                keep = torch.zeros(out.shape[1], dtype=torch.bool)
                keep[list(task.classes)] = True
                out = out.masked_fill(~keep, float("-inf"))
            row.append(100.0 * (out.argmax(1) == task.test.y).float().mean().item())
    model.train()
    return row


@pytest.mark.slow
def test_task_aware_matrix_is_the_models_outputs_masked_to_each_tasks_classes():
    parts = Experiment(strategy="naive", out=None, **TINY).build()
    tasks, model = parts.scenario.tasks, parts.learner.model
    expected, plain = [], []

    def after_task(state):   # called after each task's evaluation, with the model as evaluated
        expected.append(by_hand(model, tasks, masked=True))
        plain.append(by_hand(model, tasks, masked=False))

    summary = parts.train(checkpoint=after_task)
    aware, R = summary["task_aware"], summary["accuracy_matrix"]
    assert aware["accuracy_matrix"] == expected and R == plain   # same arithmetic: equal, not close
    for row_aware, row in zip(aware["accuracy_matrix"], R):   # the task's identity only helps
        assert all(a >= r for a, r in zip(row_aware, row))
    assert aware["acc"] > summary["acc"] + 20   # 2-way choices in a 6-way head after naive forgetting
    assert aware["acc"] == pytest.approx(sum(expected[-1]) / len(tasks))
    assert aware["bwt"] == pytest.approx(sum(expected[-1][j] - expected[j][j] for j in range(2)) / 2)
    assert len(aware["initial_scores"]) == len(tasks)


def test_icarl_nearest_mean_scores_give_task_aware_figures_too():
    result = Experiment(strategy="icarl", icarl_memory=60, out=None, **TINY).run()
    M, R = result.task_aware_matrix, result.matrix
    assert M.shape == R.shape == (3, 3) and (M >= R).all()
    assert result.task_aware_acc == pytest.approx(M[-1].mean())


@pytest.mark.slow
def test_task_aware_figures_are_logged_per_task_and_absent_outside_class_il(tmp_path):
    run = Experiment(strategy="naive", loggers="jsonl,tensorboard", out=str(tmp_path), **TINY).run()
    tasks = [json.loads(line) for line in (run.run_dir / "log.jsonl").read_text().splitlines()]
    tasks = [r for r in tasks if r["kind"] == "task"]
    M = run.summary["task_aware"]["accuracy_matrix"]
    assert [r["task_aware"]["row"] for r in tasks] == M
    assert tasks[-1]["task_aware"]["acc"] == run.task_aware_acc
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    tb = EventAccumulator(str(run.run_dir / "tb"), size_guidance={"scalars": 0})
    tb.Reload()
    assert [e.value for e in tb.Scalars("eval_task_aware/acc_task_1")] == pytest.approx([row[1] for row in M])
    assert [e.value for e in tb.Scalars("summary_task_aware/ACC")] == pytest.approx([r["task_aware"]["acc"] for r in tasks])
    for setting in ("task_il", "domain_il"):   # a head per task already; one shared output set
        other = Experiment(strategy="naive", setting=setting, out=None, **TINY).run()
        assert "task_aware" not in other.summary and other.task_aware_acc is None and other.task_aware_matrix is None
