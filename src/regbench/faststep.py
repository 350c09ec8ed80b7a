"""The direct step: a plain MLP's training step without the autograd engine, bitwise equal to autograd's.

Why by hand: on a CPU at the lecture's batch size (32) a training step of the 784-128-128-64-10 MLP is ~25 small
kernels, and the autograd engine's graph recording, node dispatch and gradient accumulation cost as much as the
matrix products themselves. torch.compile does not remove that cost here (measured on 2 cores, torch 2.14:
eager 0.084 s/epoch, compiled forward+backward 0.083–0.094 after 7–29 s of compiling, with or without inductor's
C++ wrapper; docs/benchmarks.md), and no other library runs torch modules' backward without it. The direct step
runs the forward with the layers' own ATen ops under ``no_grad``, keeps what the backward needs, and calls the very
ATen backward kernels autograd would call (``derivatives.yaml`` of torch: addmm's mat2 gradient
``grad.t().mm(mat1).t()``, the bias gradient ``grad.sum(0)``, ``threshold_backward`` for ReLU, ...), in the same
order. Gradients, and so whole runs, are bitwise equal to the autograd path (tests/test_faststep.py checks every
layer kind, the losses, penalties and dropout against autograd); about 1.25× faster steps at batch 32
(docs/benchmarks.md).

What it covers (anything else trains through autograd, and summary.json's ``step_impl`` says which ran):
- models: regbench's ``mlp`` — Flatten, Linear, ReLU / LeakyReLU / ELU / Sigmoid / Tanh, Dropout — on CPU in
  float32 without autocast, no module or tensor hooks, no parametrizations, every parameter trainable;
- loss: torch's cross-entropy on class indices by hand (``log_softmax`` + ``nll_loss`` and their backward
  kernels); any other loss (label smoothing, soft targets of MixUp/CutMix) through autograd on the logits alone;
- penalties (L1, L2, elastic net): their gradients through autograd on the parameters alone, added to the data
  gradient as autograd's gradient buffer adds them.
"""

from __future__ import annotations

from typing import Any, Callable, Optional

import torch
import torch.nn.functional as F
from torch import nn

aten = torch.ops.aten

_LEAVES = (nn.Flatten, nn.Linear, nn.Dropout, nn.Identity, nn.ReLU, nn.LeakyReLU, nn.ELU, nn.Sigmoid, nn.Tanh)


def _layers(model: nn.Module) -> tuple[list[nn.Module], Optional[str]]:
    """The MLP's leaf modules in forward order, or ([], why the direct step does not apply)."""
    from regbench.models.mlp import MLP

    if type(model) is not MLP:
        return [], f"model {type(model).__name__} (the direct step covers regbench's mlp)"
    leaves: list[nn.Module] = []

    def walk(m: nn.Module) -> Optional[str]:
        # MLP.forward is head(hidden(flatten(x))), a Sequential runs its children: both in registration order.
        if m is model or type(m) is nn.Sequential:
            return next((why for c in m.children() if (why := walk(c))), None)
        if type(m) in _LEAVES:  # exactly these classes: a subclass may compute something else
            leaves.append(m)
            return None
        return f"layer {type(m).__name__}"

    why = walk(model)
    if why is None:
        flat = [m for m in leaves if isinstance(m, nn.Flatten)]
        if len(flat) != 1 or leaves[0] is not flat[0] or flat[0].start_dim != 1 or flat[0].end_dim != -1:
            why = "a flatten other than the MLP's first layer"
        elif any(isinstance(m, nn.Dropout) and not 0 <= m.p < 1 for m in leaves):
            why = "a dropout rate of 1"
    return (leaves, None) if why is None else ([], why)


def _hooked(model: nn.Module) -> Optional[str]:
    """Why hooks make the module's forward/backward more than its layers' ops (None: no hooks)."""
    from torch.nn.modules import module as M
    from torch.nn.utils import parametrize

    if any((M._global_forward_hooks, M._global_forward_pre_hooks, M._global_backward_hooks,
            M._global_backward_pre_hooks)):
        return "global module hooks"
    for name, m in model.named_modules():
        if m._forward_hooks or m._forward_pre_hooks or m._backward_hooks or m._backward_pre_hooks or \
                parametrize.is_parametrized(m):
            return f"hooks or parametrizations on {name or 'the model'}"
    for name, p in model.named_parameters():
        if not p.requires_grad:
            return f"frozen parameter {name}"
        if p._backward_hooks or getattr(p, "_post_accumulate_grad_hooks", None):
            return f"a gradient hook on {name}"
    return None


def plan(model: nn.Module, loss_fn: Callable, trainer: Any, device: torch.device,
         ) -> tuple[Optional["DirectStep"], str]:
    """(the direct step of ``model``, "direct") where it applies, else (None, "autograd: <why>")."""
    if not trainer.fast_step:
        return None, "autograd: trainer.fast_step=false"
    if trainer.compile != "none":
        return None, f"autograd: trainer.compile={trainer.compile}"
    if trainer.amp != "none":
        return None, f"autograd: trainer.amp={trainer.amp}"
    if device.type != "cpu":
        return None, f"autograd: device {device.type} (the direct step is for CPUs; on a GPU use trainer.compile)"
    layers, why = _layers(model)
    why = why or _hooked(model)
    if why is None and any(p.dtype != torch.float32 for p in model.parameters()):
        why = "parameters that are not float32"
    if why is not None:
        return None, f"autograd: {why}"
    return DirectStep(model, layers, loss_fn), "direct"


class DirectStep:
    """``step(x, y, penalty_fn) -> (logits, loss, penalty)``: one training step's forward and backward; every
    parameter's ``.grad`` is set as ``zero_grad(set_to_none=True)`` then ``objective.backward()`` would set it."""

    def __init__(self, model: nn.Module, layers: list[nn.Module], loss_fn: Callable):
        self.model, self.layers, self.loss_fn = model, layers, loss_fn
        self.params = list(model.parameters())
        self.plain_ce = loss_fn is F.cross_entropy  # no label smoothing, weights or other options
        self.first_linear = next(i for i, m in enumerate(layers) if isinstance(m, nn.Linear))

    def __call__(self, x: torch.Tensor, y: torch.Tensor, penalty_fn: Optional[Callable] = None,
                 ) -> tuple[torch.Tensor, torch.Tensor, Optional[torch.Tensor]]:
        logits, saved = self._forward(x)
        # The penalty's gradient first: autograd runs the later-recorded penalty nodes before the forward's, so
        # a parameter's gradient buffer holds (penalty terms) + (data term) in that order.
        penalty, pen_grads = None, None
        if penalty_fn is not None:
            penalty = penalty_fn(self.model)
            if penalty is not None:
                pen_grads = torch.autograd.grad(penalty, self.params, allow_unused=True)
        g, loss = self._loss_grad(logits, y)
        grads = self._backward(g, saved)
        for j, p in enumerate(self.params):
            data = grads.get(p)
            extra = pen_grads[j] if pen_grads is not None else None
            p.grad = data if extra is None else extra if data is None else extra + data
        return logits, loss, penalty

    @torch.no_grad()
    def _forward(self, x: torch.Tensor) -> tuple[torch.Tensor, list]:
        """(logits, what each layer's backward reads). Each layer's own ATen op (F.linear -> addmm for 2-D input
        with a bias); dropout draws its mask exactly as torch's CPU dropout does (empty_like(x).bernoulli_(1 - p)
        / (1 - p), then x * mask), so the global RNG advances identically."""
        saved: list[Any] = []
        h = x
        for m in self.layers:
            keep = None
            if isinstance(m, nn.Linear):
                keep = h
                h = torch.addmm(m.bias, h, m.weight.t()) if m.bias is not None else h.mm(m.weight.t())
            elif isinstance(m, nn.Flatten):
                h = h.flatten(1)
            elif isinstance(m, nn.Dropout):
                if m.training and m.p > 0:
                    keep = torch.empty_like(h).bernoulli_(1 - m.p).div_(1 - m.p)
                    h = h * keep
            elif isinstance(m, nn.ReLU):
                h = keep = torch.relu(h)
            elif isinstance(m, nn.Sigmoid):
                h = keep = torch.sigmoid(h)
            elif isinstance(m, nn.Tanh):
                h = keep = torch.tanh(h)
            elif isinstance(m, nn.LeakyReLU):
                keep, h = h, F.leaky_relu(h, m.negative_slope)
            elif isinstance(m, nn.ELU):
                keep, h = h, F.elu(h, m.alpha)
            saved.append(keep)  # nn.Identity: nothing
        return h, saved

    @torch.no_grad()
    def _backward(self, g: torch.Tensor, saved: list) -> dict[nn.Parameter, torch.Tensor]:
        """The parameters' data gradients from d loss / d logits ``g``, by the kernels autograd's nodes call."""
        grads: dict[nn.Parameter, torch.Tensor] = {}
        for i in range(len(self.layers) - 1, -1, -1):
            m, s = self.layers[i], saved[i]
            if isinstance(m, nn.Linear):
                # AddmmBackward0 with mat2 = weight.t() (column-major): grad.t().mm(mat1).t(), then TBackward0's
                # .t(): a contiguous [out, in] tensor, as AccumulateGrad keeps it. The bias: sum_to -> sum(0).
                grads[m.weight] = g.t().mm(s)
                if m.bias is not None:
                    grads[m.bias] = g.sum(0)
                if i == self.first_linear:
                    break  # nothing below needs a gradient (the input does not require one)
                g = g.mm(m.weight)
            elif isinstance(m, nn.Dropout):
                if s is not None:
                    g = g * s
            elif isinstance(m, nn.ReLU):
                g = aten.threshold_backward(g, s, 0)
            elif isinstance(m, nn.Sigmoid):
                g = aten.sigmoid_backward(g, s)
            elif isinstance(m, nn.Tanh):
                g = aten.tanh_backward(g, s)
            elif isinstance(m, nn.LeakyReLU):
                g = aten.leaky_relu_backward(g, s, m.negative_slope, False)
            elif isinstance(m, nn.ELU):
                g = aten.elu_backward(g, m.alpha, 1, 1, False, s)
        return grads

    def _loss_grad(self, logits: torch.Tensor, y: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(d loss / d logits, loss): torch's mean cross-entropy on class indices by its own kernels; any other
        loss through autograd on the logits alone (the same backward nodes autograd would run)."""
        if self.plain_ce and y.ndim == 1 and not torch.is_floating_point(y):
            with torch.no_grad():
                logp = torch._log_softmax(logits, 1, False)
                loss, total = aten.nll_loss_forward(logp, y, None, 1, -100)  # reduction 1 = mean
                g = aten.nll_loss_backward(torch.ones_like(loss), logp, y, None, 1, -100, total)
                return aten._log_softmax_backward_data(g, logp, 1, logits.dtype), loss
        z = logits.detach().requires_grad_()
        with torch.enable_grad():
            loss = self.loss_fn(z, y)
        g, = torch.autograd.grad(loss, z)
        return g, loss.detach()
