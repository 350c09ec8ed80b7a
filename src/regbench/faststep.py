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
layer kind, the losses, penalties and dropout against autograd). A fused Adam/AdamW/SGD update then runs as one
direct call of its kernel (regbench.fastoptim). Together about 1.5× faster epochs at batch 32 than autograd +
``optimizer.step()`` (docs/benchmarks.md).

What it covers (anything else trains through autograd, and summary.json's ``step_impl`` says which ran):
- models: regbench's ``mlp`` — Flatten, Linear, BatchNorm1d, ReLU / LeakyReLU / ELU / Sigmoid / Tanh, Dropout —
  on CPU in float32 without autocast, no module or tensor hooks, no parametrizations, every parameter trainable;
- loss: torch's cross-entropy on class indices by hand (``log_softmax`` + ``nll_loss`` and their backward
  kernels); any other loss (label smoothing, soft targets of MixUp/CutMix) through autograd on the logits alone;
- penalties (L1, L2, elastic net): their gradients through autograd on the parameters alone, added to the data
  gradient as autograd's gradient buffer adds them.

A fast path of regbench.speed ("direct step"): only on the torch versions it was tested on; its first step runs
both ways (the direct step, then autograd from the same state) and it takes over only where logits, loss,
penalty, gradients, running statistics and the RNG agree bit for bit; any later exception turns it off for the
rest of the run (autograd redoes that step from the state before it). summary.json's ``step_impl`` says which ran.
"""

from __future__ import annotations

from functools import partial
from typing import Any, Callable, Optional

import torch
import torch.nn.functional as F
from torch import nn

from regbench.fastoptim import direct_optimizer
from regbench.models.common import dropout_mask
from regbench.models.mlp import MLP
from regbench.speed import FastPath, failure, gate, same_bits

aten = torch.ops.aten


def _aten(name: str) -> Callable:
    """ATen's op ``name`` (its default overload); where this torch lacks it, a stand-in that raises when called
    (the direct step's first-step check then turns it off: importing regbench never fails on it)."""
    try:
        return getattr(aten, name).default
    except Exception as e:  # noqa: BLE001 — any torch: a missing or renamed op
        why = failure(e)

        def missing(*args: Any, **kwargs: Any) -> Any:
            raise RuntimeError(f"torch has no aten.{name} ({why})")
        return missing

_LEAVES = (nn.Flatten, nn.Linear, nn.BatchNorm1d, nn.Dropout, nn.Identity, nn.ReLU, nn.LeakyReLU, nn.ELU, nn.Sigmoid,
           nn.Tanh)


def _layers(model: nn.Module) -> tuple[list[nn.Module], Optional[str]]:
    """The MLP's leaf modules in forward order, or ([], why the direct step does not apply)."""

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


def plan(model: nn.Module, loss_fn: Callable, trainer: Any, device: torch.device, not_direct: Optional[str] = None,
         ) -> tuple[Optional["DirectStep"], str]:
    """(the direct step of ``model``, "direct") where it applies, else (None, "autograd: <why>"). ``not_direct``:
    why the run's step is one the direct step does not take (a member's second pass)."""
    if not trainer.fast_step:
        return None, "autograd: trainer.fast_step=false"
    if not_direct:
        return None, f"autograd: {not_direct}"
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
    if why is not None or (why := gate("direct step")) is not None:
        return None, f"autograd: {why}"
    return DirectStep(model, layers, loss_fn), "direct"


class DirectStep:
    """``step(x, y, penalty_fn) -> (logits, loss, penalty)``: one training step's forward and backward; every
    parameter's ``.grad`` is set as ``zero_grad(set_to_none=True)`` then ``objective.backward()`` would set it.
    ``optimizer_step(optimizer)``: then ``optimizer.step()``, by one direct kernel call where it applies
    (regbench.fastoptim).

    The layers are turned into straight lists of closures once (the per-step Python work is the ops' calls:
    on the lecture MLP at batch 32 that is ~15 % of the step, measured against a hand-unrolled step)."""

    def __init__(self, model: nn.Module, layers: list[nn.Module], loss_fn: Callable):
        self.model, self.loss_fn = model, loss_fn
        self.params = list(model.parameters())
        self.plain_ce = loss_fn is F.cross_entropy  # no label smoothing, weights or other options
        first_linear = next(i for i, m in enumerate(layers) if isinstance(m, nn.Linear))
        # Backward runs from the last layer down to the first Linear: nothing below needs a gradient (the input
        # does not require one), and the first Linear's input gradient is not computed.
        self.forward_ops = [_forward_op(m) for m in layers]
        self.backward_ops = [(i, op) for i in range(len(layers) - 1, first_linear - 1, -1)
                             if (op := _backward_op(layers[i], first=i == first_linear)) is not None]
        self._opt: Optional[tuple] = None  # (the optimizer, its direct step or None)
        self.path = FastPath("direct step", "autograd", key="step_impl", impls=("direct", "autograd"), used=False)
        self.checked = False  # the first step ran both ways and agreed bit for bit
        # What a step changes before its gradients exist (restored when a direct step fails part-way)
        self._draws = any(isinstance(m, nn.Dropout) for m in layers)  # the global RNG (dropout masks)
        self._buffers = list(model.buffers())  # running statistics

    def speed_paths(self) -> list[FastPath]:
        return [self.path] + ([self._opt[1].path] if self._opt is not None and self._opt[1] is not None else [])

    def __call__(self, x: torch.Tensor, y: torch.Tensor, penalty_fn: Optional[Callable] = None,
                 ) -> tuple[torch.Tensor, torch.Tensor, Optional[torch.Tensor]]:
        if self.checked:  # (a stacked member's is never called: its summary's step_impl stays "stacked")
            rng = torch.get_rng_state() if self._draws else None
            buffers = [b.clone() for b in self._buffers] if self._buffers else None
            try:
                return self._direct(x, y, penalty_fn)
            except Exception as e:  # noqa: BLE001 — autograd redoes the step from the state before it
                self.path.off(failure(e))
                self.checked = False
                self._restore(rng, buffers)
        elif self.path.on:
            self.path.used = True
            return self._check(x, y, penalty_fn)
        return self._autograd(x, y, penalty_fn)

    def _restore(self, rng: Optional[torch.Tensor], buffers: Optional[list]) -> None:
        if rng is not None:
            torch.set_rng_state(rng)
        with torch.no_grad():
            for b, saved in zip(self._buffers, buffers or ()):
                b.copy_(saved)

    def _check(self, x: torch.Tensor, y: torch.Tensor, penalty_fn: Optional[Callable],
               ) -> tuple[torch.Tensor, torch.Tensor, Optional[torch.Tensor]]:
        """The first step: the direct step, then autograd's from the same state (its results are the step's);
        the direct step takes over where everything agreed bit for bit."""
        rng, buffers = torch.get_rng_state(), [b.clone() for b in self._buffers]
        try:
            direct = self._direct(x, y, penalty_fn)
            direct += ([p.grad for p in self.params], torch.get_rng_state(), [b.clone() for b in self._buffers])
        except Exception as e:  # noqa: BLE001
            direct = None
            self.path.off(failure(e))
        self._restore(rng, buffers)
        out = self._autograd(x, y, penalty_fn)
        if direct is not None:
            plain = out + ([p.grad for p in self.params], torch.get_rng_state(), list(self._buffers))
            names = ("logits", "loss", "penalty", "gradients", "RNG state", "running statistics")
            bad = next((name for name, a, b in zip(names, direct, plain) if not (
                all(same_bits(u, v) for u, v in zip(a, b)) and len(a) == len(b) if isinstance(a, list)
                else same_bits(a, b))), None)
            if bad is not None:
                self.path.off(f"its first step differs from autograd's in the {bad}")
            self.checked = self.path.on
        return out

    def _autograd(self, x: torch.Tensor, y: torch.Tensor, penalty_fn: Optional[Callable],
                  ) -> tuple[torch.Tensor, torch.Tensor, Optional[torch.Tensor]]:
        """The step as the training loop's autograd path takes it (no autocast: the direct step has none)."""
        for p in self.params:
            p.grad = None
        logits = self.model(x)
        loss = objective = self.loss_fn(logits, y)
        penalty = penalty_fn(self.model) if penalty_fn is not None else None
        if penalty is not None:
            objective = loss + penalty
        objective.backward()
        return logits.detach(), loss.detach(), None if penalty is None else penalty.detach()

    def _direct(self, x: torch.Tensor, y: torch.Tensor, penalty_fn: Optional[Callable],
                ) -> tuple[torch.Tensor, torch.Tensor, Optional[torch.Tensor]]:
        with torch.no_grad():
            logits, saved = self._forward(x)
        # The penalty's gradient first: autograd runs the later-recorded penalty nodes before the forward's, so
        # a parameter's gradient buffer holds (penalty terms) + (data term) in that order.
        penalty, pen_grads = None, None
        if penalty_fn is not None:
            penalty = penalty_fn(self.model)
            if penalty is not None:
                pen_grads = torch.autograd.grad(penalty, self.params, allow_unused=True)
        g, loss = self._loss_grad(logits, y)
        with torch.no_grad():
            grads = self._backward(g, saved)
        if pen_grads is None:
            for p in self.params:
                p.grad = grads.get(p)
        else:
            for p, extra in zip(self.params, pen_grads):
                data = grads.get(p)
                p.grad = data if extra is None else extra if data is None else extra + data
        return logits, loss, penalty

    def optimizer_step(self, optimizer: torch.optim.Optimizer) -> None:
        """``optimizer.step()``; a fused Adam / AdamW / SGD by one direct call of its kernel (regbench.fastoptim)."""
        if self._opt is None or self._opt[0] is not optimizer:
            self._opt = (optimizer, direct_optimizer(optimizer))
        step = self._opt[1]
        step() if step is not None else optimizer.step()

    def _forward(self, x: torch.Tensor) -> tuple[torch.Tensor, list]:
        """(logits, what each layer's backward reads), under no_grad. Each layer's own ATen op (F.linear ->
        addmm for 2-D input with a bias); dropout draws its mask exactly as torch's CPU dropout does
        (empty_like(x).bernoulli_(1 - p) / (1 - p), then x * mask), so the global RNG advances identically."""
        saved: list[Any] = []
        h = x
        for op in self.forward_ops:
            h, keep = op(h)
            saved.append(keep)
        return h, saved

    def _backward(self, g: torch.Tensor, saved: list) -> dict[nn.Parameter, torch.Tensor]:
        """The parameters' data gradients from d loss / d logits ``g``, by the kernels autograd's nodes call."""
        grads: dict[nn.Parameter, torch.Tensor] = {}
        for i, op in self.backward_ops:
            g = op(g, saved[i], grads)
        return grads

    def _loss_grad(self, logits: torch.Tensor, y: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(d loss / d logits, loss): torch's mean cross-entropy on class indices by its own kernels; any other
        loss through autograd on the logits alone (the same backward nodes autograd would run)."""
        if self.plain_ce and y.ndim == 1 and not torch.is_floating_point(y):
            with torch.no_grad():
                logp = torch._log_softmax(logits, 1, False)
                loss, total = _nll_forward(logp, y, None, 1, -100)  # reduction 1 = mean
                g = _nll_backward(torch.ones_like(loss), logp, y, None, 1, -100, total)
                return _log_softmax_backward(g, logp, 1, logits.dtype), loss
        z = logits.detach().requires_grad_()
        with torch.enable_grad():
            loss = self.loss_fn(z, y)
        g, = torch.autograd.grad(loss, z)
        return g, loss.detach()


_nll_forward = _aten("nll_loss_forward")
_nll_backward = _aten("nll_loss_backward")
_log_softmax_backward = _aten("_log_softmax_backward_data")


def _forward_op(m: nn.Module) -> Callable[[torch.Tensor], tuple[torch.Tensor, Any]]:
    """``op(h) -> (output, what the backward keeps)`` for one layer (read at call time: a layer's settings and
    mode may change between steps, e.g. ``model.eval()`` around an evaluation)."""
    if isinstance(m, nn.Linear):
        weight, bias = m.weight, m.bias  # the Parameter objects (updated in place by the optimizer)
        if bias is not None:
            return lambda h: (torch.addmm(bias, h, weight.t()), h)
        return lambda h: (h.mm(weight.t()), h)
    if isinstance(m, nn.Flatten):
        return lambda h: (h.flatten(1), None)
    if isinstance(m, nn.BatchNorm1d):
        return partial(_batch_norm, m)
    if isinstance(m, nn.Dropout):
        def dropout(h: torch.Tensor) -> tuple[torch.Tensor, Optional[torch.Tensor]]:
            if m.training and m.p > 0:
                mask = dropout_mask(h.shape, m.p, h.device, h.dtype)
                return h * mask, mask
            return h, None
        return dropout
    if isinstance(m, nn.ReLU):
        return lambda h: (out := torch.relu(h), out)
    if isinstance(m, nn.Sigmoid):
        return lambda h: (out := torch.sigmoid(h), out)
    if isinstance(m, nn.Tanh):
        return lambda h: (out := torch.tanh(h), out)
    if isinstance(m, nn.LeakyReLU):
        return lambda h: (F.leaky_relu(h, m.negative_slope), h)
    if isinstance(m, nn.ELU):
        return lambda h: (F.elu(h, m.alpha), h)
    return lambda h: (h, None)  # nn.Identity


def _batch_norm(m: nn.BatchNorm1d, h: torch.Tensor) -> tuple[torch.Tensor, tuple]:
    """BatchNorm1d.forward's own bookkeeping (num_batches_tracked, the averaging factor, which statistics), then
    the kernel F.batch_norm reaches on the CPU, ``native_batch_norm`` — which also returns the batch mean and
    inverse std its backward reads (it updates the running statistics in place, as the module's call does)."""
    factor = 0.0 if m.momentum is None else m.momentum
    if m.training and m.track_running_stats and m.num_batches_tracked is not None:
        m.num_batches_tracked.add_(1)
        factor = 1.0 / float(m.num_batches_tracked) if m.momentum is None else m.momentum
    training = m.training or (m.running_mean is None and m.running_var is None)
    mean = m.running_mean if not m.training or m.track_running_stats else None
    var = m.running_var if not m.training or m.track_running_stats else None
    if training:
        F._verify_batch_size(h.size())  # "Expected more than 1 value per channel when training", as F.batch_norm
    out, save_mean, save_invstd = torch.native_batch_norm(h, m.weight, m.bias, mean, var, training, factor, m.eps)
    return out, (h, mean, var, save_mean, save_invstd, training)


def _backward_op(m: nn.Module, first: bool) -> Optional[Callable]:
    """``op(grad_output, kept, grads) -> grad_input`` for one layer (None: the gradient passes unchanged);
    a Linear's op puts its parameters' gradients into ``grads``."""
    if isinstance(m, nn.Linear):
        weight, bias = m.weight, m.bias

        def linear(g: torch.Tensor, s: torch.Tensor, grads: dict) -> Optional[torch.Tensor]:
            # AddmmBackward0 with mat2 = weight.t() (column-major): grad.t().mm(mat1).t(), then TBackward0's
            # .t(): a contiguous [out, in] tensor, as AccumulateGrad keeps it. The bias: sum_to -> sum(0).
            grads[weight] = g.t().mm(s)
            if bias is not None:
                grads[bias] = g.sum(0)
            return None if first else g.mm(weight)
        return linear
    if isinstance(m, nn.BatchNorm1d):
        def batch_norm(g: torch.Tensor, s: tuple, grads: dict) -> torch.Tensor:
            # NativeBatchNormBackward0: every input that requires a gradient (the Linear's output always)
            x, mean, var, save_mean, save_invstd, training = s
            gx, gw, gb = _batch_norm_backward(g, x, m.weight, mean, var, save_mean, save_invstd, training, m.eps,
                                              [True, m.weight is not None, m.bias is not None])
            if m.weight is not None:
                grads[m.weight] = gw
            if m.bias is not None:
                grads[m.bias] = gb
            return gx
        return batch_norm
    if isinstance(m, nn.Dropout):
        return lambda g, s, grads: g if s is None else g * s
    if isinstance(m, nn.ReLU):
        return lambda g, s, grads: _threshold_backward(g, s, 0)
    if isinstance(m, nn.Sigmoid):
        return lambda g, s, grads: _sigmoid_backward(g, s)
    if isinstance(m, nn.Tanh):
        return lambda g, s, grads: _tanh_backward(g, s)
    if isinstance(m, nn.LeakyReLU):
        return lambda g, s, grads: _leaky_relu_backward(g, s, m.negative_slope, False)
    if isinstance(m, nn.ELU):
        return lambda g, s, grads: _elu_backward(g, m.alpha, 1, 1, False, s)
    return None  # Flatten (only the first layer, below the first Linear), Identity


_threshold_backward = _aten("threshold_backward")
_sigmoid_backward = _aten("sigmoid_backward")
_tanh_backward = _aten("tanh_backward")
_leaky_relu_backward = _aten("leaky_relu_backward")
_elu_backward = _aten("elu_backward")
_batch_norm_backward = _aten("native_batch_norm_backward")
