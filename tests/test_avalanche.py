"""The Avalanche adapter on real Avalanche 0.6 benchmarks built from local tensors (real digits)."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from clsim import Experiment, cli
from clsim.errors import UserError
from conftest import read_summary
from clsim.scenarios.avalanche import from_avalanche, tensor_dataset
from clsim.strategies.naive import Naive

nc_benchmark = pytest.importorskip("avalanche.benchmarks").nc_benchmark

ORDER = [3, 7, 0, 9, 1, 5, 2, 8, 4, 6]


@pytest.fixture(scope="module")
def digits():
    from sklearn.datasets import load_digits
    d = load_digits()
    x = torch.tensor(d.data, dtype=torch.float32).view(-1, 1, 8, 8) / 16.0
    y = torch.tensor(d.target, dtype=torch.long)
    return x[:1300], y[:1300], x[1300:], y[1300:]


def benchmark(digits, **kwargs):
    x_tr, y_tr, x_te, y_te = digits
    return nc_benchmark(tensor_dataset(x_tr, y_tr), tensor_dataset(x_te, y_te), n_experiences=5,
                        fixed_class_order=ORDER, **kwargs)


def rows_of(x):
    """The images of `x` as a sorted list of byte strings (a multiset, order-free)."""
    return sorted(r.numpy().tobytes() for r in x)


def test_round_trip_keeps_every_experience_class_il(digits):
    bm = benchmark(digits, task_labels=False)
    sc = from_avalanche(bm, name="digits_nc", backbone="mlp", hidden=(32,))
    x_tr, y_tr, x_te, y_te = digits
    assert sc.name == "digits_nc" and sc.setting == "class_il" and len(sc) == 5
    for task, train_exp, test_exp in zip(sc.tasks, bm.train_stream, bm.test_stream):
        classes = sorted(train_exp.classes_in_this_experience)
        assert list(task.classes) == classes and set(classes) == set(ORDER[2 * task.index:2 * task.index + 2])
        # Exactly the original images of those classes, with their original labels.
        for part, x, y in ((task.train, x_tr, y_tr), (task.test, x_te, y_te)):
            keep = torch.isin(y, torch.tensor(classes))
            assert rows_of(part.x) == rows_of(x[keep])
            assert sorted(part.y.tolist()) == sorted(y[keep].tolist())
            assert part.x.shape[1:] == (1, 8, 8)
    model = sc.make_model()
    assert [h.out_features for h in model.heads] == [10]


def test_task_labels_become_task_il_with_one_head_per_experience(digits):
    sc = from_avalanche(benchmark(digits, task_labels=True), backbone="mlp", hidden=(32,))
    y_tr = digits[1]
    assert sc.setting == "task_il"
    for task in sc.tasks:
        assert set(task.train.y.tolist()) == {0, 1} and set(task.test.y.tolist()) == {0, 1}
        low, high = task.classes                       # local label 1 is the larger original class
        assert int((task.train.y == 1).sum()) == int((y_tr == high).sum()) and low < high
        assert task.n_outputs == 2
    assert [h.out_features for h in sc.make_model().heads] == [2] * 5


@pytest.mark.slow
def test_clsim_engine_trains_on_an_avalanche_benchmark(digits):
    sc = from_avalanche(benchmark(digits, task_labels=True), backbone="mlp", hidden=(64, 64))
    result = Experiment(scenario=sc, strategy=Naive(), lr=0.1, batch_size=32, epochs=10, progress=False,
                        out=None).run().summary
    R = np.array(result["accuracy_matrix"])
    assert R.shape == (5, 5)
    assert np.diag(R).mean() > 85                      # each pair of digits is learned (chance 50%)
    assert result["examples_seen"] == 10 * 1300


def test_a_custom_model_builder_is_used(digits):
    calls = []
    sc = from_avalanche(benchmark(digits, task_labels=False),
                        backbone=lambda heads, n: calls.append((heads, n)) or torch.nn.Identity())
    assert isinstance(sc.make_model(), torch.nn.Identity) and calls == [([2] * 5, 10)]


def test_bad_inputs_raise_user_errors(digits):
    bm = benchmark(digits, task_labels=False)

    class Uneven:
        train_stream = list(bm.train_stream)
        test_stream = list(bm.test_stream)[:1]

    with pytest.raises(UserError, match="1 test experiences"):
        from_avalanche(Uneven())
    with pytest.raises(UserError, match="backbone"):
        from_avalanche(bm, backbone="vgg")
    with pytest.raises(UserError, match="setting"):
        from_avalanche(bm, setting="online")


@pytest.mark.slow
def test_avalanche_scenario_through_the_cli(tmp_path, capsys):
    # cli.main in this process: Avalanche is imported already (its import takes many seconds).
    assert cli.main(["--scenario", "avalanche", "--setting", "task_il", "--out", str(tmp_path)]) == 0
    s = read_summary(tmp_path)
    assert s["scenario"] == "avalanche" and s["setting"] == "task_il"
    assert s["scenario_info"]["source"] == "avalanche" and s["scenario_info"]["avalanche_data"] == "split_digits"
    R = np.array(s["accuracy_matrix"])
    assert R.shape == (5, 5) and np.diag(R).mean() > 80
