"""Diagonal Fisher information from per-example gradients, shared by EWC, BLIP, the DP-Fisher of
the privacy mechanisms and the RL learners.

Per-example gradients come layer by layer from one batched backward pass where every wanted
parameter sits in a layer of a known kind (Linear, Conv2d, BatchNorm with running statistics,
GroupNorm): a layer's weight gradient for example i is a product of its input and its output
gradient at row i, so one backward to the layer outputs gives them all, like Opacus's grad
samplers. Any other model goes through torch.func (vmap over single-example gradients). The
check: in every Fisher computation the layer-wise rows of the first examples must match plain
autograd's through the same batched forward, else that computation falls back to torch.func
with a warning (e.g. a weight also used outside its layer, or examples that interact).
"""
from __future__ import annotations

import warnings
from contextlib import contextmanager, nullcontext
from typing import Callable

import torch
import torch.nn.functional as F
from torch import nn
from torch.func import functional_call, grad, vmap

from clsim import distributed

CHECKED_EXAMPLES = 2   # rows of each pass recomputed by plain autograd to validate the layer-wise path


class _LogLikelihood(nn.Module):
    """Wraps `learner.log_likelihood` so functional_call can swap the model's parameters."""

    def __init__(self, learner):
        super().__init__()
        self.model = learner.model
        self._fn = learner.log_likelihood

    def forward(self, x, y, t):
        return self._fn(x, y, t)


def vmap_grads(learner, names: list[str], x, y, t) -> dict[str, torch.Tensor]:
    """Gradient of log p(y_i | x_i) w.r.t. the named parameters, one row per example, for any
    model: torch.func's gradient of each single example, vectorised with vmap."""
    wrapper = _LogLikelihood(learner)
    params = {f"model.{n}": p.detach() for n, p in learner.model.named_parameters()}
    buffers = {f"model.{n}": b for n, b in learner.model.named_buffers()}
    wanted = {f"model.{n}" for n in names}
    fixed = {k: v for k, v in params.items() if k not in wanted}

    def one(free, xi, yi):
        out = functional_call(wrapper, ({**fixed, **free, **buffers}), (xi[None], yi[None], t))
        return out.sum()

    free = {k: params[k] for k in wanted}
    grads = vmap(grad(one), in_dims=(None, 0, 0))(free, x, y)
    return {k[len("model."):]: g for k, g in grads.items()}


# ---------------------------------------------------------------- layer by layer

def _normalised(layer: nn.Module, a: torch.Tensor) -> torch.Tensor:
    """The normalisation layer's input before its affine transform (per example: eval-mode
    BatchNorm uses its running statistics, GroupNorm each example's own)."""
    if isinstance(layer, nn.GroupNorm):
        # torch's op: F.group_norm refuses one example whose groups hold one value each
        return torch.group_norm(a, layer.num_groups, None, None, layer.eps)
    shape = (1, -1) + (1,) * (a.dim() - 2)
    return (a - layer.running_mean.view(shape)) * torch.rsqrt(layer.running_var.view(shape) + layer.eps)


def layer_rows(layer: nn.Module, a: torch.Tensor, g: torch.Tensor) -> dict[str, torch.Tensor]:
    """Per-example gradients of the layer's own parameters from its input `a` and the gradient
    `g` of the summed log-likelihood w.r.t. its output (row i of `g` only depends on example i)."""
    n = len(a)
    if isinstance(layer, nn.Linear):
        rows = {"weight": torch.einsum("n...o,n...i->noi", g, a)}
        bias = g.reshape(n, -1, g.shape[-1]).sum(1)
    elif isinstance(layer, nn.Conv2d):
        rows = {"weight": _conv_rows(layer, a, g)}
        bias = g.sum((2, 3))
    else:   # BatchNorm (eval) / GroupNorm: weight scales the normalised input, per channel
        dims = tuple(range(2, g.dim()))
        rows = {"weight": (g * _normalised(layer, a)).sum(dims) if dims else g * _normalised(layer, a)}
        bias = g.sum(dims) if dims else g
    if layer.bias is not None:
        rows["bias"] = bias
    return rows


def _conv_rows(layer: nn.Conv2d, a: torch.Tensor, g: torch.Tensor) -> torch.Tensor:
    """Per-example weight gradients of a Conv2d by the cheaper of two exact ways for the layer's
    shape: `_conv_rows_grouped` when its input channels (per group) fill whole vector registers
    (a multiple of 8) and there are at least 4 output positions per input channel, else
    `_conv_rows_patches`. The rule comes from timing both on an AVX-512 CPU (oneDNN) over the
    layers of the small CNN and ResNet-18 (widths 20 and 64), where the grouped pass ran near the
    cost of the batch's own weight gradient in those cases and up to 5x slower in the others;
    other hardware may prefer the other way (results are the same)."""
    c_in = a.shape[1] // layer.groups
    if c_in % 8 == 0 and g.shape[2] * g.shape[3] >= 4 * c_in:
        return _conv_rows_grouped(layer, a, g)
    return _conv_rows_patches(layer, a, g)


def _conv_rows_grouped(layer: nn.Conv2d, a: torch.Tensor, g: torch.Tensor) -> torch.Tensor:
    """One weight-gradient pass of the same convolution with the examples as extra groups
    (1 x n·Cin input, n·groups groups): its weight gradient is the n per-example ones stacked."""
    n = len(a)
    w = torch.nn.grad.conv2d_weight(
        a.reshape(1, n * a.shape[1], *a.shape[2:]), (n * layer.out_channels, *layer.weight.shape[1:]),
        g.reshape(1, n * g.shape[1], *g.shape[2:]), layer.stride, layer.padding, layer.dilation,
        n * layer.groups)
    return w.view(n, *layer.weight.shape)


def _conv_rows_patches(layer: nn.Conv2d, a: torch.Tensor, g: torch.Tensor) -> torch.Tensor:
    """dW_i = g_i (Cout x positions) @ patches_i (positions x Cin/groups·kh·kw), per group."""
    patches = conv_patches(layer, a)
    g_flat = g.reshape(len(a), layer.groups, -1, patches.shape[-1])
    return torch.matmul(g_flat, patches.transpose(2, 3)).reshape(len(a), *layer.weight.shape)


def conv_patches(layer: nn.Conv2d, a: torch.Tensor) -> torch.Tensor:
    """The Conv2d's input patches, n x groups x (Cin/groups·kh·kw) x output positions, from a
    strided view of the padded input (one copy; faster than F.unfold)."""
    (kh, kw), (sh, sw), (ph, pw) = layer.kernel_size, layer.stride, layer.padding
    windows = F.pad(a, (pw, pw, ph, ph)).unfold(2, kh, sh).unfold(3, kw, sw)  # n, c, h', w', kh, kw
    n, _, h, w = windows.shape[:4]
    return windows.permute(0, 1, 4, 5, 2, 3).reshape(n, layer.groups, -1, h * w)


def supported_layer(layer: nn.Module) -> bool:
    """Layers whose per-example gradients `layer_rows` computes (exact types: a subclass may
    change forward)."""
    kind = type(layer)
    if kind is nn.Linear:
        return True
    if kind is nn.Conv2d:
        return (layer.padding_mode == "zeros" and not isinstance(layer.padding, str)
                and layer.dilation == (1, 1))
    if kind in (nn.BatchNorm1d, nn.BatchNorm2d):
        return not layer.training and layer.running_mean is not None
    return kind is nn.GroupNorm


def layers_of(model: nn.Module, names: list[str]) -> dict[nn.Module, list[tuple[str, str]]] | None:
    """The layers holding the named parameters, each with its (full name, own name) pairs; None
    if one of them is not in a supported layer (then only torch.func applies)."""
    owner = {}
    for prefix, module in model.named_modules():
        for own, _ in module.named_parameters(recurse=False):
            owner[f"{prefix}.{own}" if prefix else own] = (module, own)
    layers: dict[nn.Module, list[tuple[str, str]]] = {}
    for name in names:
        module, own = owner[name]
        if own not in ("weight", "bias") or not supported_layer(module):
            return None
        layers.setdefault(module, []).append((name, own))
    return layers


def sampled(learner, x, y, t) -> torch.Tensor:
    """y, or targets sampled from the model when None (true Fisher; a forward pass of its own)."""
    if y is not None:
        return y
    with torch.no_grad():
        return learner.sample_targets(learner.logits(x, t))


def _backprops(learner, layers, x, y, t, check: int = 0, scale: torch.Tensor | None = None):
    """Each call of each layer in `layers` (see `layers_of`) as its input and the gradient of the
    summed log-likelihood (each example's times `scale[i]` if given) w.r.t. its output (None if
    unused), from one batched forward and one
    backward to the layer outputs (no parameter gradients are formed); the targets (when y is
    None, sampled from that same forward's output); and, for the first `check` examples, each
    one's gradient by plain autograd through that same forward (the check's reference, else None)."""
    calls: dict[nn.Module, list[tuple[torch.Tensor, torch.Tensor]]] = {m: [] for m in layers}

    def record(module, inputs, output):
        calls[module].append((inputs[0].detach(), output))

    handles = [m.register_forward_hook(record) for m in layers]
    # wanted parameters may be frozen (requires_grad False): outputs must still carry gradients
    frozen = [p for m in layers for p in m.parameters(recurse=False) if not p.requires_grad]
    try:
        with torch.enable_grad():
            for p in frozen:
                p.requires_grad_(True)
            if y is None:
                ll, y = learner.sampled_log_likelihood(x, t)
            else:
                ll = learner.log_likelihood(x, y, t)
            if scale is not None:
                ll = ll * scale
            outputs = [out for m in layers for _, out in calls[m]]
            out_grads = iter(torch.autograd.grad(ll.sum(), outputs, allow_unused=True, retain_graph=check > 0))
            reference = _autograd_rows(layers, ll, check) if check else None
    finally:
        for h in handles:
            h.remove()
        for p in frozen:
            p.requires_grad_(False)
    return {m: [(a, next(out_grads)) for a, _ in calls[m]] for m in layers}, y, reference


def _autograd_rows(layers, ll: torch.Tensor, k: int) -> dict[str, torch.Tensor]:
    """Gradients of ll[0], ..., ll[k-1] w.r.t. the parameters in `layers`, one autograd pass each
    through the batch's own forward. Being the same forward matters: a single-example forward
    (torch.func's) may round differently (oneDNN picks its convolution algorithm by batch size),
    and a pre-activation within rounding of 0 then takes the other side of a ReLU, a different
    but equally valid gradient (a BLIP-trained ResNet-18 had one such unit, 1% of an example's
    gradient). Any use of a weight outside its layer, or one example's influence on another's
    log-likelihood, still shows here and not in the layer-wise rows."""
    params = {name: dict(m.named_parameters(recurse=False))[own] for m, pairs in layers.items() for name, own in pairs}
    rows = {name: [] for name in params}
    k = min(k, len(ll))
    for i in range(k):
        grads = torch.autograd.grad(ll[i], list(params.values()), retain_graph=i < k - 1, allow_unused=True)
        for (name, p), g in zip(params.items(), grads):
            rows[name].append(torch.zeros_like(p) if g is None else g)
    return {name: torch.stack(r) for name, r in rows.items()}


def _zeros_for_unreached(layers, rows, shape_prefix) -> None:
    for module, pairs in layers.items():
        params = dict(module.named_parameters(recurse=False))
        for name, own in pairs:         # a layer the log-likelihood never reached
            if name not in rows:
                rows[name] = params[own].new_zeros((*shape_prefix, *params[own].shape))


def layerwise_grads(learner, layers, x, y, t, check: bool = False) -> tuple[dict[str, torch.Tensor], torch.Tensor]:
    """Per-example gradients of the parameters in `layers` (see `layers_of`), one row per
    example, and the targets (see `_backprops`). `check`: the first rows must match plain
    autograd's through the same forward, else `LayerwiseMismatch`."""
    rows: dict[str, torch.Tensor] = {}
    backprops, y, reference = _backprops(learner, layers, x, y, t, CHECKED_EXAMPLES if check else 0)
    for module, calls in backprops.items():
        for a, g in calls:
            if g is None:
                continue
            per_layer = layer_rows(module, a, g)
            for name, own in layers[module]:    # a layer called several times adds up its calls
                rows[name] = rows[name] + per_layer[own] if name in rows else per_layer[own]
    _zeros_for_unreached(layers, rows, (len(x),))
    if check:
        _compare({n: r[:len(reference[n])] for n, r in rows.items()}, reference)
    return rows, y


def layerwise_squares(learner, layers, x, y, t, check: bool = False,
                      scale: torch.Tensor | None = None) -> dict[str, torch.Tensor]:
    """Σ_i of the squared per-example gradients of the parameters in `layers`. A Linear layer
    called once on (examples x features) inputs has per-example weight gradient g_i a_iᵀ, so the
    sum of its squares is (g²)ᵀ(a²): one matmul, no per-example gradients (Σ_i g_i² for its
    bias). Any other layer (Conv2d, normalisation, inputs with positions, several calls, whose
    rows add up before squaring) squares its per-example rows. `check`: the same sums over the
    first examples (from this batch's backward) must match plain autograd's (`_autograd_rows`),
    else `LayerwiseMismatch`. `scale`: example i's gradient times scale[i] (see `squared_sums`)."""
    backprops, y, reference = _backprops(learner, layers, x, y, t, CHECKED_EXAMPLES if check else 0, scale)
    if check:
        k = min(CHECKED_EXAMPLES, len(x))
        _compare(_squares(layers, backprops, k), {n: g.square().sum(0) for n, g in reference.items()})
    return _squares(layers, backprops, None)


def _squares(layers, backprops, k: int | None) -> dict[str, torch.Tensor]:
    """`layerwise_squares` over the first `k` examples (all if None)."""
    sums: dict[str, torch.Tensor] = {}
    for module, calls in backprops.items():
        used = [(a[:k], g[:k]) for a, g in calls if g is not None]
        if not used:
            continue
        if type(module) is nn.Linear and len(used) == 1 and used[0][0].dim() == 2:
            a, g = used[0]
            g2 = g.square()
            per_layer = {"weight": g2.T @ a.square(), "bias": g2.sum(0)}
        else:
            rows = [layer_rows(module, a, g) for a, g in used]
            per_layer = {own: sum(r[own] for r in rows).square_().sum(0) for _, own in layers[module]}
        for name, own in layers[module]:
            sums[name] = per_layer[own]
    _zeros_for_unreached(layers, sums, ())
    return sums


def _compare(fast: dict[str, torch.Tensor], reference: dict[str, torch.Tensor]) -> None:
    for n, ref in reference.items():
        if not torch.allclose(fast[n], ref, rtol=1e-3, atol=1e-5 * float(ref.abs().max()) + 1e-12):
            raise LayerwiseMismatch(n)


def per_example_grads(learner, names: list[str], x, y, t, check: bool = False) -> dict[str, torch.Tensor]:
    """Gradient of log p(y_i | x_i) w.r.t. the named parameters, one row per example; layer by
    layer where possible, else torch.func. `check`: compare the first rows with plain autograd's
    and raise `LayerwiseMismatch` if they differ."""
    layers = layers_of(learner.model, names)
    if layers is None:
        return vmap_grads(learner, names, x, sampled(learner, x, y, t), t)
    with full_float32() if check else nullcontext():
        rows, _ = layerwise_grads(learner, layers, x, y, t, check)
    return rows


@contextmanager
def full_float32():
    """float32 products without TF32 (cuDNN's default for convolutions on CUDA), so the check
    compares the two algorithms, not two rounding modes."""
    cudnn, matmul = torch.backends.cudnn.allow_tf32, torch.get_float32_matmul_precision()
    torch.backends.cudnn.allow_tf32 = False
    torch.set_float32_matmul_precision("highest")
    try:
        yield
    finally:
        torch.backends.cudnn.allow_tf32 = cudnn
        torch.set_float32_matmul_precision(matmul)


def _weighted(rows: torch.Tensor, weight: torch.Tensor | None) -> torch.Tensor:
    """Row i of `rows` times weight[i] (in place; unchanged without weights)."""
    return rows if weight is None else rows.mul_(weight.reshape(-1, *[1] * (rows.dim() - 1)))


class LayerwiseMismatch(RuntimeError):
    """The layer-wise per-example gradients of a parameter differ from plain autograd's."""


def squared_sums(learner, names: list[str], x, y, t, check: bool = False,
                 weight: torch.Tensor | None = None) -> dict[str, torch.Tensor]:
    """Σ_i (weight[i] ·) the squared gradients of log p(y_i | x_i) w.r.t. the named parameters;
    layer by layer where possible (see `layerwise_squares`, each gradient scaled by √weight[i]),
    else torch.func. `check` as there."""
    layers = layers_of(learner.model, names)
    if layers is None:
        rows = vmap_grads(learner, names, x, sampled(learner, x, y, t), t)
        return {n: _weighted(g.pow_(2), weight).sum(0) for n, g in rows.items()}
    with full_float32() if check else nullcontext():
        return layerwise_squares(learner, layers, x, y, t, check, None if weight is None else weight.sqrt())


def _over_classes(learner, x, t, term) -> dict[str, torch.Tensor]:
    """Σ_c term(c, labels all c, p(c|x)) over the classes the model gives some probability
    (a class outside --active-classes has weight 0)."""
    with torch.no_grad():
        probs = F.softmax(learner.logits(x, t), 1)
    total: dict[str, torch.Tensor] = {}
    for c in range(probs.shape[1]):
        if not bool(probs[:, c].any()):
            continue
        y = torch.full((len(x),), c, dtype=torch.long, device=x.device)
        for n, g in term(c, y, probs[:, c]).items():
            total[n] = total[n].add_(g) if n in total else g
    return total


def expected_squares(learner, names: list[str], x, t, check: bool = False,
                     torch_func: bool = False) -> dict[str, torch.Tensor]:
    """Per example, E_{y~p(y|x)}[g_y²] computed exactly as Σ_c p(c|x)·g_c² (one backward per
    class): van de Ven's fisher_labels='all'. A sampled label is unbiased for it, but on a
    confident model it almost never draws the rare labels whose large gradients make up nearly
    all of the expectation (after split MNIST's 2000 Adam steps, 1000 sampled labels gave 7000x
    less than this), so the sampled estimate is then orders of magnitude too small. `check` as in
    `per_example_grads`; `torch_func` skips the layer-wise path."""
    def term(c, y, p):
        rows = (vmap_grads(learner, names, x, y, t) if torch_func
                else per_example_grads(learner, names, x, y, t, check and c == 0))
        return {n: g.pow_(2).mul_(p.reshape(-1, *[1] * (g.dim() - 1))) for n, g in rows.items()}
    return _over_classes(learner, x, t, term)


def expected_sums(learner, names: list[str], x, t, check: bool = False) -> dict[str, torch.Tensor]:
    """`expected_squares` summed over the examples without holding a row per example
    (`squared_sums` per class): a wide model's rows for 100 classes took minutes."""
    return _over_classes(learner, x, t, lambda c, y, p: squared_sums(learner, names, x, y, t, check and c == 0, p))


def diagonal_fisher(learner, task, names: list[str], n_samples: int, empirical: bool | str = False,
                    reduce: Callable[[dict[str, torch.Tensor]], dict[str, torch.Tensor]] | None = None
                    ) -> dict[str, torch.Tensor]:
    """Mean over examples of squared per-example gradients of log p(y|x) on `task`.

    y is sampled from the model (true Fisher, from the forward pass that also gives the
    gradients) unless `empirical`: True takes the data's labels, "expected" the exact
    expectation over the model's labels (`expected_squares`; classifiers), "predicted" the
    model's most probable label (van de Ven & Tolias's 2019 code; on a confident model far below
    the expectation, which weights the rare labels' large gradients by their probability),
    "weighted" the data's label with its squared gradient times the model's probability of that
    label, p(y_i|x_i)·g_i² (Mammoth's ewc_on, models/ewc_on.py end_task); for a learner with
    `gaussian_fisher` (SAC) "expected" is its Gaussian policy's exact Fisher. `reduce` turns a batch's
    squared per-example gradients (one row per example) into their sum; the DP-Fisher clips
    there. Without it the sums come straight from `squared_sums` (no per-example gradients
    where the layers allow). The model is in eval mode meanwhile (frozen normalisation
    statistics)."""
    if empirical == "expected" and hasattr(learner, "gaussian_fisher"):   # SAC: the Gaussian's exact Fisher
        return learner.gaussian_fisher(task, names, n_samples)
    model = learner.model
    was_training = model.training
    model.eval()
    total = {n: torch.zeros_like(p) for n, p in model.named_parameters() if n in names}
    count = 0
    fallback = False

    expected = empirical == "expected"

    def sums(x, y, t, check):
        if expected and reduce is None and not fallback:
            return expected_sums(learner, names, x, t, check)
        if expected:
            squared = expected_squares(learner, names, x, t, check, torch_func=fallback)
            return reduce(squared) if reduce is not None else {n: s.sum(0) for n, s in squared.items()}
        weight = None
        if empirical == "weighted":
            with torch.no_grad():
                weight = learner.log_likelihood(x, y, t).exp()
        if fallback:
            rows = vmap_grads(learner, names, x, sampled(learner, x, y, t), t)
        elif reduce is None:
            return squared_sums(learner, names, x, y, t, check, weight)
        else:
            rows = per_example_grads(learner, names, x, y, t, check)
        squared = {n: _weighted(g.pow_(2), weight) for n, g in rows.items()}   # the rows are ours: in place
        return reduce(squared) if reduce is not None else {n: s.sum(0) for n, s in squared.items()}

    try:
        labelled = empirical is True or empirical == "weighted"
        for i, (x, y, t) in enumerate(learner.fisher_batches(task, n_samples, labelled)):
            if empirical == "predicted":
                with torch.no_grad():
                    y = learner.logits(x, t).argmax(1)
            if (i == 0 or distributed.splitting()) and not expected:
                # the checked batch's targets, fixed in case it falls back; data-parallel: drawn for
                # the whole batch (the draws of one process) before each worker takes its rows
                y = sampled(learner, x, y, t)
            n = len(x)
            if distributed.splitting():
                rows = distributed.block(n)
                x, y = x[rows], None if y is None else y[rows]
                t = t[rows] if isinstance(t, torch.Tensor) else t
            try:
                batch = sums(x, y, t, check=i == 0)
            except LayerwiseMismatch as exc:
                warnings.warn(f"layer-wise per-example gradients of {exc} differ from plain autograd's "
                              f"for this model; its Fisher uses torch.func (slower)")
                fallback = True
                batch = sums(x, y, t, check=False)
            for name, s in batch.items():
                total[name] += s
            count += n
    finally:
        model.train(was_training)
    total = distributed.all_reduce_sum(total)   # data-parallel: every worker's rows
    return {name: v / max(count, 1) for name, v in total.items()}
