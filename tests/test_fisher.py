"""The vectorised Fisher (torch.func) equals a slow one-example-at-a-time reference."""
import pytest
import torch

from clsim.config import RunOptions
from clsim.fisher import diagonal_fisher, expected_squares
from clsim.learners.supervised import SupervisedLearner
from clsim.scenarios.split_digits import SplitDigitsOptions, split_digits


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
        if y is None:                                   # true Fisher: targets from the model
            with torch.no_grad():
                y = learner.sample_targets(learner.logits(x, t))
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


def test_weighted_fisher_is_mammoths_probability_weighted_empirical_fisher():
    """--fisher weighted, as Mammoth's ewc_on end_task: one example at a time with its own label,
    fish += p(y|x)·(∇ log p(y|x))², over every example, divided by their number."""
    scenario, learner = make_learner("class_il")
    task = scenario.tasks[1]
    names = list(learner.shared_parameters())
    learner.model.eval()
    params = dict(learner.model.named_parameters())
    data = learner.resident(task.train)
    reference = {n: torch.zeros_like(params[n]) for n in names}
    for i in range(len(data.y)):
        ll = learner.log_likelihood(data.x[i:i + 1], data.y[i:i + 1], task.index).sum()
        for n, g in zip(names, torch.autograd.grad(ll, [params[n] for n in names])):
            reference[n] += ll.exp().detach() * g.square()
    weighted = diagonal_fisher(learner, task, names, len(data.y), "weighted")
    empirical = diagonal_fisher(learner, task, names, len(data.y), True)
    for n in names:
        torch.testing.assert_close(weighted[n], reference[n] / len(data.y), rtol=1e-4, atol=1e-9)
        assert reference[n].abs().sum() > 0 and (weighted[n] <= empirical[n] * (1 + 1e-4) + 1e-12).all()
    assert sum(float(weighted[n].sum()) for n in names) < 0.99 * sum(float(empirical[n].sum()) for n in names)


def test_heads_are_not_shared_parameters():
    _, learner = make_learner("task_il")
    names = list(learner.shared_parameters())
    assert names and not any(n.startswith("heads.") for n in names)
    assert any(n.startswith("heads.") for n, _ in learner.model.named_parameters())


# ------------------------------------------------------------ layer-wise path and its fallbacks

import warnings  # noqa: E402

from torch import nn  # noqa: E402
import torch.nn.functional as F  # noqa: E402

from clsim.fisher import _conv_rows_grouped, _conv_rows_patches, layers_of, per_example_grads  # noqa: E402
from clsim.models import MultiHeadNet  # noqa: E402


class LastDim(nn.Module):
    """A Linear over the last axis of a 4-d activation (several positions per example)."""

    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(2, 4)

    def forward(self, x):
        return self.fc(x)


class Tied(nn.Module):
    """Uses its layer's weight a second time outside the layer: the layer-wise rows miss that."""

    def __init__(self, width):
        super().__init__()
        self.fc = nn.Linear(width, width)

    def forward(self, x):
        return torch.tanh(self.fc(x) + F.linear(x.flip(1), self.fc.weight))


def conv_backbone(kind="layerwise"):
    """Every layer kind of the layer-wise path on 1x8x8 digits: strides, groups, no-bias and
    rectangular convolutions (both ways of `_conv_rows`: the 8->8 one takes the grouped pass),
    eval-mode BatchNorm, GroupNorm, Linear on 2-d and 4-d inputs."""
    layers = [nn.Conv2d(1, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(), nn.Conv2d(8, 8, 3, padding=1),
              nn.Conv2d(8, 8, 3, stride=2, padding=1, groups=2, bias=False), nn.GroupNorm(2, 8), nn.ReLU(),
              nn.Conv2d(8, 6, (2, 3), stride=(1, 2), padding=(0, 1)), LastDim(), nn.Flatten(),
              nn.Linear(6 * 3 * 4, 16), nn.BatchNorm1d(16), nn.Tanh()]
    if kind == "unsupported":
        layers.append(nn.PReLU())       # a parameter outside the supported layers: torch.func only
    if kind == "tied":
        layers.append(Tied(16))
    body = nn.Sequential(*layers)
    body.out_features = 16
    return body


def conv_learner(kind, setting="task_il"):
    torch.manual_seed(0)
    scenario = split_digits(SplitDigitsOptions(), RunOptions(setting=setting))
    heads = [t.n_outputs for t in scenario.tasks] if setting == "task_il" else [10]
    model = MultiHeadNet(conv_backbone(kind), heads)
    with torch.no_grad():               # running statistics away from their initial 0/1
        for task in scenario.tasks:
            model(task.train.x[:64])
    learner = SupervisedLearner(model, lr=0.1, momentum=0.0, batch_size=32, device=torch.device("cpu"),
                                generator=torch.Generator().manual_seed(0), fisher_batch_size=40)
    return scenario, learner


def reference_rows(learner, names, x, y, t):
    params = dict(learner.model.named_parameters())
    rows = {n: [] for n in names}
    for i in range(len(x)):
        ll = learner.log_likelihood(x[i:i + 1], y[i:i + 1], t).sum()
        for n, g in zip(names, torch.autograd.grad(ll, [params[n] for n in names])):
            rows[n].append(g)
    return {n: torch.stack(r) for n, r in rows.items()}


@pytest.mark.parametrize("way", [_conv_rows_grouped, _conv_rows_patches])
@pytest.mark.parametrize("conv", [dict(in_channels=16, out_channels=8, kernel_size=3, padding=1),
                                  dict(in_channels=16, out_channels=6, kernel_size=(2, 3), stride=(2, 1),
                                       padding=(1, 0), groups=2, bias=False),
                                  dict(in_channels=3, out_channels=4, kernel_size=1, stride=2)])
def test_both_ways_of_conv_rows_give_each_examples_weight_gradient(way, conv):
    torch.manual_seed(0)
    layer = nn.Conv2d(**conv)
    a = torch.randn(5, conv["in_channels"], 9, 7)
    g = torch.randn_like(layer(a))
    rows = way(layer, a, g)
    for i in range(len(a)):
        ref, = torch.autograd.grad(layer(a[i:i + 1]), layer.weight, g[i:i + 1])
        torch.testing.assert_close(rows[i], ref, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("setting", ["task_il", "class_il"])
def test_layerwise_rows_match_per_example_autograd(setting):
    scenario, learner = conv_learner("layerwise", setting)
    task = scenario.tasks[2]
    model = learner.model.eval()
    names = list(learner.shared_parameters())
    assert layers_of(model, names) is not None          # the layer-wise path, not torch.func
    frozen = model.backbone[0].weight
    frozen.requires_grad_(False)                        # BLIP-style frozen weights still get rows
    x, y = task.train.x[:24], task.train.y[:24]
    fast = per_example_grads(learner, names, x, y, task.index, check=True)
    assert not frozen.requires_grad
    frozen.requires_grad_(True)
    slow = reference_rows(learner, names, x, y, task.index)
    for n in names:
        torch.testing.assert_close(fast[n], slow[n], rtol=1e-4, atol=1e-6)
        assert slow[n].abs().sum() > 0, n


@pytest.mark.slow
@pytest.mark.parametrize("kind", ["layerwise", "unsupported", "tied"])
def test_fisher_of_conv_models_matches_reference(kind):
    """Layer-wise, torch.func for an unsupported layer, and the fall back to torch.func when the
    layer-wise rows disagree with it (a weight used outside its layer) all give the exact Fisher."""
    scenario, learner = conv_learner(kind)
    task = scenario.tasks[1]
    names = list(learner.shared_parameters())
    learner.model.eval()
    assert (layers_of(learner.model, names) is None) == (kind == "unsupported")
    learner.generator.manual_seed(3)
    with warnings.catch_warnings():
        warnings.simplefilter("error", UserWarning)     # supported models must not fall back
        if kind == "tied":
            with pytest.warns(UserWarning, match="torch.func"):
                fast = diagonal_fisher(learner, task, names, 100, empirical=False)
        else:
            fast = diagonal_fisher(learner, task, names, 100, empirical=False)
    learner.generator.manual_seed(3)
    slow = reference_fisher(learner, task, names, 100, empirical=False)
    for n in names:
        torch.testing.assert_close(fast[n], slow[n], rtol=1e-4, atol=1e-9)
        assert slow[n].abs().sum() > 0, n



class RoundsByBatchSize(nn.Module):
    """A ReLU whose unit 0 sits exactly at its kink in a batched forward and 1e-6 above it in a
    one-example forward: the way a pre-activation within rounding of 0 can fall on either side
    when oneDNN rounds a convolution differently by batch size (a BLIP-trained ResNet-18 had one)."""

    def forward(self, x):
        return torch.relu(x + torch.tensor([1e-6 if len(x) == 1 else 0.0] + [0.0] * (x.shape[1] - 1)))


def test_the_check_compares_with_the_batchs_own_forward():
    """The layer-wise rows are checked against plain autograd through the same batched forward,
    not torch.func's one-example forwards, whose gradient here takes the kink's other side: no
    fallback, and the Fisher is that of the batched forward, example by example."""
    torch.manual_seed(0)
    scenario = split_digits(SplitDigitsOptions(), RunOptions(setting="task_il"))
    body = nn.Sequential(nn.Flatten(), nn.Linear(64, 8), RoundsByBatchSize(), nn.Linear(8, 8), nn.Tanh())
    body.out_features = 8
    with torch.no_grad():                       # unit 0's pre-activation: exactly 0 for every input
        body[1].weight[0] = 0.0
        body[1].bias[0] = 0.0
    learner = SupervisedLearner(MultiHeadNet(body, [t.n_outputs for t in scenario.tasks]), lr=0.1, momentum=0.0,
                                batch_size=32, device=torch.device("cpu"), generator=torch.Generator().manual_seed(0),
                                fisher_batch_size=40)
    task, names = scenario.tasks[1], list(learner.shared_parameters())
    learner.model.eval()
    learner.generator.manual_seed(5)
    with warnings.catch_warnings():
        warnings.simplefilter("error", UserWarning)
        fast = diagonal_fisher(learner, task, names, 40, empirical=True)
    learner.generator.manual_seed(5)
    (x, y, _), = learner.fisher_batches(task, 40, True)         # the same 40 examples, one chunk
    ll = learner.log_likelihood(x, y, task.index)                  # one batched forward
    params = dict(learner.model.named_parameters())
    slow = {n: 0 for n in names}
    for i in range(len(x)):
        for n, g in zip(names, torch.autograd.grad(ll[i], [params[n] for n in names], retain_graph=True)):
            slow[n] = slow[n] + g.square() / len(x)
    learner.generator.manual_seed(5)
    single = reference_fisher(learner, task, names, 40, empirical=True)    # one-example forwards
    for n in names:
        torch.testing.assert_close(fast[n], slow[n], rtol=1e-4, atol=1e-9)
    assert slow["backbone.1.weight"][0].abs().max() == 0           # the kink's flat side
    assert single["backbone.1.weight"][0].abs().max() > 1e-4       # the other side

# ------------------------------------------------------------ scale: what a published λ multiplies

def label_weighted_and_argmax_fishers(learner, x, t, names, classes):
    """The two Fishers of van de Ven's code, over the examples x: E_{y~p}[g_y²] computed exactly
    (fisher_labels='all', its default since 2022) and g²(argmax label) (its 2019 code)."""
    with torch.no_grad():
        probs = learner.logits(x, t).softmax(1)
    exact = {n: 0 for n in names}
    for c in range(classes):
        rows = per_example_grads(learner, names, x, torch.full((len(x),), c), t)
        for n, g in rows.items():
            exact[n] = exact[n] + (probs[:, c].view(-1, *[1] * (g.dim() - 1)) * g.square()).mean(0)
    argmax = {n: g.square().mean(0) for n, g in per_example_grads(learner, names, x, probs.argmax(1), t).items()}
    return exact, argmax


@pytest.mark.slow
def test_sampled_fisher_has_the_scale_of_van_de_vens_label_weighted_fisher():
    """clsim's true Fisher (a label drawn from the model per example, mean over examples) is an
    unbiased estimate of E_{y~p}[g_y²], the Fisher van de Ven's code computes by weighting all
    labels: a λ from that code means the same stiffness here (the vdv presets rely on it). Its
    2019 code used the argmax label instead, (1 - p̂)/p̂ times smaller on a 2-way head. The
    "expected" Fisher computes van de Ven's sum exactly, the "predicted" one the 2019 argmax Fisher."""
    scenario, learner = make_learner("task_il")
    task = scenario.tasks[0]
    data = learner.resident(task.train)
    opt = torch.optim.SGD(learner.model.parameters(), lr=0.5)
    for _ in range(30):                     # a confident model: there the two 2019/2022 scales part
        opt.zero_grad()
        F.cross_entropy(learner.logits(data.x, task.index), data.y).backward()
        opt.step()
    learner.model.eval()
    names = list(learner.shared_parameters())
    exact, argmax = label_weighted_and_argmax_fishers(learner, data.x, task.index, names, 2)
    draws = 40
    sampled = {n: 0 for n in names}
    for r in range(draws):                  # every example, labels redrawn each time
        learner.generator.manual_seed(r)
        for n, f in diagonal_fisher(learner, task, names, len(data.x), empirical=False).items():
            sampled[n] = sampled[n] + f / draws
    total = lambda d: float(sum(v.sum() for v in d.values()))    # noqa: E731
    assert total(sampled) == pytest.approx(total(exact), rel=0.05)
    for n in names:                         # per weight too, where the Fisher is not negligible
        big = exact[n] > exact[n].max() * 0.1
        assert torch.corrcoef(torch.stack([sampled[n][big], exact[n][big]]))[0, 1] > 0.95
        assert (argmax[n] <= exact[n] * (1 + 1e-4) + 1e-12).all()
    assert total(argmax) < 0.5 * total(exact)
    computed = diagonal_fisher(learner, task, names, len(data.x), empirical="expected")   # --fisher expected
    predicted = diagonal_fisher(learner, task, names, len(data.x), empirical="predicted")   # --fisher predicted
    for n in names:
        torch.testing.assert_close(computed[n], exact[n], rtol=1e-4, atol=1e-12)
        torch.testing.assert_close(predicted[n], argmax[n], rtol=1e-4, atol=1e-12)
    rows = expected_squares(learner, names, data.x, task.index)   # one row per example (the DP-Fisher's path)
    for n in names:
        torch.testing.assert_close(rows[n].sum(0) / len(data.x), exact[n], rtol=1e-4, atol=1e-12)
