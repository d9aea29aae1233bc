"""Book-keeping clipping (BK) for DP-SGD: Bu, Wang, Zha & Karypis, "Differentially Private
Optimization on Large Model at Small Cost", ICML 2023 (their code: awslabs/fast-differential-privacy).

One forward, and one backward that stops at the trainable layers' outputs (their "ghost
differentiation": autograd forms no parameter gradient). Each layer keeps its input a from the
forward and takes its output gradient g as the backward passes it (the "book-keeping"); from
them, per example, its squared gradient norm by the cheaper of (their mixed rule: ghost when
2T² <= the weight's size, T output positions per example)
- the ghost norm, Σ (a_i a_iᵀ) ∘ (g_i g_iᵀ) over a Conv2d's T x T positions (‖a_i‖²‖g_i‖² for a
  Linear on examples x features, T = 1): a and g are kept;
- the per-example gradient (clsim/fisher.py's `layer_rows`, shared with the Fisher): only the
  rows are kept.
Then c_i = min(1, C/(‖∇_i‖ + 1e-6)) over example i's whole gradient ∇_i, Opacus DPOptimizer's rule, and each parameter's clipped sum
Σ_i c_i ∇_i straight from what was kept: one weight-gradient product of a and c·g for a ghost
layer, Σ_i c_i·row_i for the others. There is no second backward (ghost clipping's) and no
per-example gradient of a layer whose ghost norm is cheaper (hooks'). Noise, scaling and the
ledger stay Opacus's DPOptimizerFastGradientClipping's and the mechanism's, as for ghost.

Where clsim differs from theirs: it covers Linear, Conv2d and GroupNorm (what clsim's models
train privately; `--dp-clipping bk` is refused for any other trainable layer, and `auto` then
takes ghost or hooks); normalisation layers keep rows, like theirs; the rows and norms are formed
CHUNK examples at a time (smaller copies on the way); a layer called several times in one forward
adds its rows before the norm (theirs keeps one call); the clip factor is Opacus's (theirs has
other clipping functions too). Like Opacus's hooks, a gradient is read only from the layers'
own inputs and outputs: a parameter also used outside its layer would lose that use from the
step (still private: every clipped row depends on its example only), and a layer's output must
not be modified in place (the same rule as Opacus's backward hooks).
"""
from __future__ import annotations

from contextlib import contextmanager

import torch
from torch import nn

from clsim.errors import UserError
from clsim.fisher import conv_patches, layer_rows, supported_layer
from clsim.privacy.clipper import Clipper

COVERED = (nn.Linear, nn.Conv2d, nn.GroupNorm)
CHUNK = 32      # examples whose per-layer norms or rows are formed together
WEIGHT_NORM2 = "weight norm²"   # a ghost call's squared per-example weight norms, kept beside its bias rows


def bk_layers(model: nn.Module) -> tuple[dict[nn.Module, list[tuple[str, nn.Parameter]]] | None, str]:
    """Each layer holding trainable parameters, with its (own name, parameter) pairs; or None and
    the first layer BK does not cover."""
    layers, seen = {}, set()
    for name, module in model.named_modules():
        own = [(n, p) for n, p in module.named_parameters(recurse=False) if p.requires_grad]
        if not own:
            continue
        if (type(module) not in COVERED or not supported_layer(module)
                or any(n not in ("weight", "bias") for n, _ in own)):
            return None, f"{name} ({type(module).__name__})"
        if any(p in seen for _, p in own):       # one parameter in two layers
            return None, f"{name} ({type(module).__name__}, sharing parameters with another layer)"
        seen.update(p for _, p in own)
        layers[module] = own
    return layers, ""


class _Tap(torch.autograd.Function):
    """Identity on a layer's output; its backward hands the output's gradient to `take`. The
    probe (a scalar leaf) links every tap to one target, so one autograd.grad to it reaches
    all of them without forming parameter gradients."""

    @staticmethod
    def forward(ctx, output, probe, take):
        ctx.take = take
        return output

    @staticmethod
    def backward(ctx, g):
        ctx.take(g)
        return g, g.new_zeros(()), None


class _Call:
    """One call of a layer in the forward: its input, then what the backward leaves (its
    per-example rows, or for a ghost call its output gradient and its weight's squared norms)."""

    def __init__(self, layer: nn.Module, a: torch.Tensor):
        self.layer, self.a = layer, a
        self.ghost = self.taken = False
        self.g = self.norm2 = None
        self.rows: dict[str, torch.Tensor] = {}

    def take(self, g: torch.Tensor) -> None:
        if self.a is None:      # not this mechanism's backward (a forward it did not clip)
            return
        n = self.examples = len(g)
        self.taken = True
        # in chunks of examples, each written into its place: the copies made on the way
        # (patches, reordered inputs, a chunk's rows) stay small
        for lo in range(0, n, CHUNK):
            a, g_part = self.a[lo:lo + CHUNK], g[lo:lo + CHUNK]
            part = (_ghost_norms if self.ghost else layer_rows)(self.layer, a, g_part)
            for own, r in part.items():
                if own not in self.rows:
                    self.rows[own] = r.new_empty((n, *r.shape[1:]))
                self.rows[own][lo:lo + len(r)] = r
        if self.ghost:
            self.g, self.norm2 = g, self.rows.pop(WEIGHT_NORM2)
        else:
            self.a = None


def _ghost_norms(layer, a, g) -> dict[str, torch.Tensor]:
    """The weight's squared per-example norms (under WEIGHT_NORM2) without its per-example
    gradients, and the bias's rows (cheap: one number per output channel)."""
    if isinstance(layer, nn.Linear):
        norm2 = a.square().sum(1) * g.square().sum(1)
        bias = g
    else:
        patches = conv_patches(layer, a)[:, 0]                  # n, Cin·kh·kw, T (groups == 1)
        gram_a = torch.bmm(patches.transpose(1, 2), patches)    # n, T, T
        g_flat = g.flatten(2)                                   # n, Cout, T
        gram_g = torch.bmm(g_flat.transpose(1, 2), g_flat)
        norm2 = (gram_a * gram_g).sum((1, 2))
        bias = g.sum((2, 3))
    return {WEIGHT_NORM2: norm2, **({"bias": bias} if layer.bias is not None else {})}


def _ghost_cheaper(layer: nn.Module, a: torch.Tensor, calls: int) -> bool:
    """Bu et al.'s rule, 2T² <= weight size, for a layer called once (a Linear on examples x
    features always: T = 1; a Conv2d without groups); rows otherwise."""
    if calls != 1:
        return False
    if type(layer) is nn.Linear:
        return a.dim() == 2
    if type(layer) is nn.Conv2d and layer.groups == 1:
        (kh, kw), (sh, sw), (ph, pw) = layer.kernel_size, layer.stride, layer.padding
        positions = ((a.shape[2] + 2 * ph - kh) // sh + 1) * ((a.shape[3] + 2 * pw - kw) // sw + 1)
        return 2 * positions ** 2 <= layer.weight.numel()
    return False


class BookKeeping(Clipper):
    """The trainable layers' taps on a model, and the clipped sum of one batch's gradients."""

    name = "bk"

    def __init__(self, layers: dict[nn.Module, list[tuple[str, nn.Parameter]]], max_grad_norm: float):
        super().__init__(max_grad_norm)
        self.layers = layers
        self.calls: list[_Call] = []
        self.probe = None
        self.handles = []
        self.attach()

    def attach(self) -> None:
        self.handles = [m.register_forward_hook(self._record) for m in self.layers]

    def forget(self) -> None:
        """Drop the taps of forwards no clipped sum will use (a step without a batch)."""
        self.calls = []

    def detach(self) -> None:
        for h in self.handles:
            h.remove()
        self.handles, self.calls = [], []

    @contextmanager
    def lifted(self):
        """Taps off meanwhile (they would keep, say, the DP-Fisher's forwards for a step)."""
        self.detach()
        try:
            yield
        finally:
            self.attach()

    def _record(self, module, inputs, output):
        """Tap a training forward's layer output (forwards without gradients, and torch.func's,
        e.g. MAS's importances, are left alone)."""
        if (not (torch.is_grad_enabled() and output.requires_grad)
                or torch._C._functorch.is_functorch_wrapped_tensor(output)):
            return None
        if self.probe is None or self.probe.device != output.device:
            self.probe = torch.zeros((), device=output.device, requires_grad=True)
        call = _Call(module, inputs[0].detach())
        self.calls.append(call)
        return _Tap.apply(output, self.probe, call.take)

    def clipped_sum(self, losses: torch.Tensor, batch=None, params=None) -> set[nn.Parameter]:
        """Leave Σ_i c_i ∇loss_i in p.grad of every parameter the batch reached and return
        those; the taps of this batch's forward are used up."""
        calls, self.calls = self.calls, []
        n = len(losses)
        count: dict[nn.Module, int] = {}
        for call in calls:
            count[call.layer] = count.get(call.layer, 0) + 1
        for call in calls:
            call.ghost = _ghost_cheaper(call.layer, call.a, count[call.layer])
        if calls:
            torch.autograd.grad(losses.sum(), [self.probe], allow_unused=True)
        reached = [c for c in calls if c.taken]
        if any(c.examples != n for c in reached):
            raise UserError("--dp-clipping bk needs every layer called on the whole batch (this strategy "
                            "or model calls one on part of it): use --dp-clipping hooks")
        rows: dict[nn.Parameter, torch.Tensor] = {}
        ghosts: dict[nn.Parameter, _Call] = {}
        norm2 = torch.zeros(n, device=losses.device)
        for call in reached:
            trainable = {own: p for own, p in self.layers[call.layer] if p.requires_grad}   # frozen since: none
            for own, r in call.rows.items():
                if own in trainable:
                    p = trainable[own]
                    rows[p] = rows[p] + r if p in rows else r
            if call.ghost and "weight" in trainable:
                ghosts[trainable["weight"]] = call
                norm2 += call.norm2
        for r in rows.values():
            norm2 += torch.linalg.vector_norm(r.reshape(n, -1), dim=1).square()
        coef = (self.max_grad_norm / (norm2.sqrt() + 1e-6)).clamp(max=1.0)
        for p, r in rows.items():
            p.grad = torch.tensordot(coef, r, 1)
        for p, call in ghosts.items():
            p.grad = _clipped_weight(call.layer, call.a, call.g, coef)
        return set(rows) | set(ghosts)


def _clipped_weight(layer, a, g, coef) -> torch.Tensor:
    """Σ_i c_i ∇W_i as one weight gradient of the layer with the backprops scaled by c."""
    g = g * coef.view(-1, *[1] * (g.dim() - 1))
    if isinstance(layer, nn.Linear):
        return g.T @ a
    return torch.nn.grad.conv2d_weight(a, layer.weight.shape, g, layer.stride, layer.padding,
                                       layer.dilation, layer.groups)
