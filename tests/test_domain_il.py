"""Domain-IL on the split scenarios (van de Ven et al. 2020, "Three types of incremental
learning"): each task's labels renumbered within the task, one shared head of that size, no task
id at test time; class_il keeps global labels, task_il one head per task."""
from __future__ import annotations


import numpy as np
import pytest
import torch

from clsim.config import RunOptions
from clsim import config
from clsim.registry import SCENARIOS
from clsim.data import class_order
from conftest import read_summary
from test_scenarios import digits_as_mnist, main_in_process


def build(name: str, setting: str, data_root: str = "", **values):
    entry = SCENARIOS.get(name)
    run = RunOptions(data_root=data_root, setting=setting, download=False)
    return entry.target(config.build(entry.options, values), run)


@pytest.fixture(scope="module")
def roots(tmp_path_factory):
    return {"split_digits": "", "split_mnist": str(digits_as_mnist(tmp_path_factory.mktemp("mnist")))}


def scenario_args(name, roots, request):
    if name == "split_cifar":
        return request.getfixturevalue("cifar_root"), {"train_per_class": 5, "test_per_class": 3,
                                                        "backbone": "cnn", "backbone_width": 4}
    return roots[name], {}


@pytest.mark.parametrize("name", ["split_digits", "split_mnist", "split_cifar"])
def test_labels_and_head_follow_the_setting(name, roots, request):
    root, extra = scenario_args(name, roots, request)
    order = class_order(10, 3)
    sc = {s: build(name, s, str(root), class_order_seed=3, **extra) for s in ("class_il", "task_il", "domain_il")}
    heads = {s: [h.out_features for h in sc[s].make_model().heads] for s in sc}
    assert heads == {"class_il": [10], "task_il": [2] * 5, "domain_il": [2]}
    for i in range(5):
        first, second = order[2 * i], order[2 * i + 1]
        glob = sc["class_il"].tasks[i]
        assert glob.classes == (first, second) and set(glob.train.y.tolist()) == {first, second}
        for s in ("task_il", "domain_il"):
            task = sc[s].tasks[i]
            assert task.classes == (first, second)
            for part, ref in ((task.train, glob.train), (task.test, glob.test)):
                assert torch.equal(part.x, ref.x)
                assert torch.equal(part.y, (ref.y == second).long())   # 0: first digit, 1: second


def test_uneven_split_shares_a_head_as_wide_as_the_largest_task():
    sc = build("split_digits", "domain_il", n_tasks=3)
    assert [t.n_outputs for t in sc.tasks] == [4, 3, 3]
    assert [h.out_features for h in sc.make_model().heads] == [4]
    assert [sorted(set(t.train.y.tolist())) for t in sc.tasks] == [[0, 1, 2, 3], [0, 1, 2], [0, 1, 2]]


def test_avalanche_adapter_domain_il_renumbers_within_each_experience():
    sc = build("avalanche", "domain_il")
    assert [h.out_features for h in sc.make_model().heads] == [2]
    assert all(set(t.train.y.tolist()) == {0, 1} for t in sc.tasks)


@pytest.mark.slow
def test_naive_domain_il_keeps_old_tasks_above_the_class_il_collapse(tmp_path, capsys):
    """Run as a user would: naive fine-tuning in class_il scores 0 on old tasks (their classes
    lose the shared softmax); in domain_il the same binary head answers every task without its id."""
    rows = {}
    for setting in ("class_il", "domain_il"):
        proc = main_in_process(capsys, tmp_path / setting, "--setting", setting, "--seed", "0")
        assert proc.returncode == 0, proc.stderr
        s = read_summary(tmp_path / setting)
        assert s["setting"] == setting
        rows[setting] = np.array(s["accuracy_matrix"])
    assert rows["class_il"][-1, :4].max() < 5
    assert np.diag(rows["domain_il"]).min() > 90
    assert rows["domain_il"][-1, :4].mean() > 30
