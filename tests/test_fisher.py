"""The vectorised Fisher (torch.func) equals a slow one-example-at-a-time reference."""
import pytest
import torch

from clsim.config import RunOptions
from clsim.fisher import diagonal_fisher
from clsim.learners.supervised import SupervisedLearner
from scenarios.split_digits import SplitDigitsOptions, split_digits


def make_learner(setting, seed=0):
    torch.manual_seed(seed)
    scenario = split_digits(SplitDigitsOptions(hidden=16), RunOptions(setting=setting))
    learner = SupervisedLearner(scenario.make_model(), lr=0.1, momentum=0.0, batch_size=32,
                                device=torch.device("cpu"), generator=torch.Generator().manual_seed(seed))
    return scenario, learner


def reference_fisher(learner, task, names, n, empirical):
    """Loop over examples with plain autograd: slow but obviously right."""
    params = dict(learner.model.named_parameters())
    total = {n_: torch.zeros_like(params[n_]) for n_ in names}
    count = 0
    for x, y, t in learner.fisher_batches(task, n, empirical):
        for i in range(len(x)):
            ll = learner.log_likelihood(x[i:i + 1], y[i:i + 1], t).sum()
            grads = torch.autograd.grad(ll, [params[n_] for n_ in names])
            for n_, g in zip(names, grads):
                total[n_] += g.pow(2)
            count += 1
    return {n_: v / count for n_, v in total.items()}


@pytest.mark.parametrize("setting,empirical", [("task_il", False), ("task_il", True), ("class_il", False)])
def test_fisher_matches_per_example_loop(setting, empirical):
    scenario, learner = make_learner(setting)
    task = scenario.tasks[1]
    names = list(learner.shared_parameters())
    learner.model.eval()
    learner.generator.manual_seed(7)
    fast = diagonal_fisher(learner, task, names, 150, empirical)
    learner.generator.manual_seed(7)
    slow = reference_fisher(learner, task, names, 150, empirical)
    assert set(fast) == set(names)
    for n in names:
        torch.testing.assert_close(fast[n], slow[n], rtol=1e-4, atol=1e-9)
        assert slow[n].abs().sum() > 0


def test_heads_are_not_shared_parameters():
    _, learner = make_learner("task_il")
    names = list(learner.shared_parameters())
    assert names and not any(n.startswith("heads.") for n in names)
    assert any(n.startswith("heads.") for n, _ in learner.model.named_parameters())
