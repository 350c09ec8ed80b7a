"""One step protocol and one epoch loop: Keras' ``train_step`` / ``fit`` split.

A *training step* is an object with ``train()`` (the model(s) in training mode) and ``step(*batch) -> (logits,
loss, penalty)`` that takes one optimizer step on one batch and returns what the epoch's sums need, as device
tensors (``penalty`` None when no member adds one). Three steps implement it, interchangeably:

- :class:`AutogradStep` (here): forward, loss (+ the members' penalties), backward, the members' gradient hooks,
  the optimizer — torch's autograd engine, autocast and a GradScaler where the run has them;
- :class:`DirectStep` (here, around :class:`regbench.faststep.DirectStep`): the same step by ATen's kernels
  without the autograd engine (bitwise equal), then the optimizer by one direct kernel call;
- ``regbench.stacked.engine.StackedStep``: K members' steps at once; its logits are [K, B, C], its loss and
  penalty [K].

:func:`train_one_epoch` drives any of them over an epoch's batches and sums what they return
(:class:`regbench.metrics.EpochSums`: one place for a single run's and a stack's sums). Nothing here reads a
value back to the host, so CUDA steps queue up without stalls.
"""

from __future__ import annotations

from contextlib import nullcontext
from typing import Any, Callable, ContextManager, Iterable, Optional, Protocol, Union

import torch
import torch.nn.functional as F
from torch import nn

from regbench.metrics import EpochSums

Batch = tuple  # (x, y) for a single run; (x [K, B, ...], y [K, B, ...], noise) for a stack


class TrainStep(Protocol):
    """What :func:`train_one_epoch` needs of a step."""

    members: Optional[int]  # None: one run (scalar loss); K: a stack of K members ([K] losses)
    fresh_logits: bool  # its logits are new tensors each step (their argmax may wait; a compiled step's may not)
    device: torch.device

    def train(self) -> None: ...

    def step(self, *batch: Any) -> tuple[torch.Tensor, torch.Tensor, Optional[torch.Tensor]]: ...


class AutogradStep:
    """One step by torch's autograd engine: the objective loss_fn(model(x), y) + penalty_fn(model) (the two parts
    reported apart), backward (scaled under a GradScaler), ``before_step`` (the members' gradient hooks: clipping,
    regbench's weight decay), ``optimizer.step()``, ``after_step`` (constraints, weight averaging).

    ``second_pass`` (SAM): after the first backward it moves the weights and returns the undo; the objective and
    its gradients are then recomputed on the same batch at the moved weights, the weights moved back, and the step
    goes on with those gradients (the logits, loss and penalty reported are the first pass's: the weights the
    step started from). The members refuse a GradScaler with a second pass."""

    members = None
    fresh_logits = False  # a compiled model's outputs may be overwritten by its next call (CUDA graphs)

    def __init__(self, model: nn.Module, optimizer: torch.optim.Optimizer, *,
                 loss_fn: Callable[[torch.Tensor, torch.Tensor], torch.Tensor] = F.cross_entropy,
                 penalty_fn: Optional[Callable[[nn.Module], Optional[torch.Tensor]]] = None,
                 before_step: Optional[Callable] = None, autocast: Callable[[], ContextManager] = nullcontext,
                 scaler: Optional[torch.amp.GradScaler] = None, after_step: Optional[Callable] = None,
                 second_pass: Optional[Callable] = None):
        self.model, self.optimizer, self.loss_fn, self.penalty_fn = model, optimizer, loss_fn, penalty_fn
        self.before_step, self.autocast, self.scaler = before_step, autocast, scaler
        self.after_step, self.second_pass = after_step, second_pass
        self.device = next(model.parameters()).device

    def train(self) -> None:
        self.model.train()

    def _objective(self, xb: torch.Tensor, yb: torch.Tensor):
        with self.autocast():
            logits = self.model(xb)
            loss = self.loss_fn(logits, yb)
        objective, penalty = loss, None
        if self.penalty_fn is not None:
            penalty = self.penalty_fn(self.model)  # outside autocast: summed in the parameters' own precision
            if penalty is not None:
                objective = loss + penalty
        return logits, loss, penalty, objective

    def step(self, xb: torch.Tensor, yb: torch.Tensor):
        model, optimizer, scaler, before_step = self.model, self.optimizer, self.scaler, self.before_step
        logits, loss, penalty, objective = self._objective(xb, yb)
        optimizer.zero_grad(set_to_none=True)
        if scaler is None:
            objective.backward()
            if self.second_pass is not None:
                undo = self.second_pass(model, optimizer)
                if undo is not None:  # (the first pass's logits are kept: a compiled model may reuse its output)
                    logits = logits.detach().clone()
                    optimizer.zero_grad(set_to_none=True)
                    self._objective(xb, yb)[3].backward()
                    undo()
            if before_step is not None:
                before_step(model, optimizer, None)
            optimizer.step()
        else:
            if self.second_pass is not None:  # the members refuse amp with a second pass (a scaler checks one backward)
                raise RuntimeError("a second pass under a GradScaler")
            scaler.scale(objective).backward()
            if before_step is not None:
                before_step(model, optimizer, scaler)
            scaler.step(optimizer)
            scaler.update()
        if self.after_step is not None:
            self.after_step(model, optimizer)
        return logits, loss, penalty


class DirectStep:
    """One step without the autograd engine: ``direct`` (a :class:`regbench.faststep.DirectStep` of ``model``, whose
    loss function is its own) computes logits, loss, penalty and the gradients, bitwise as autograd would; then
    ``before_step``, the optimizer by one direct kernel call (``direct.optimizer_step``) and ``after_step``."""

    members = None
    fresh_logits = True

    def __init__(self, direct: Any, model: nn.Module, optimizer: torch.optim.Optimizer, *,
                 penalty_fn: Optional[Callable] = None, before_step: Optional[Callable] = None,
                 after_step: Optional[Callable] = None):
        self.direct, self.model, self.optimizer = direct, model, optimizer
        self.penalty_fn, self.before_step, self.after_step = penalty_fn, before_step, after_step
        self.device = next(model.parameters()).device

    def train(self) -> None:
        self.model.train()

    def step(self, xb: torch.Tensor, yb: torch.Tensor):
        logits, loss, penalty = self.direct(xb, yb, self.penalty_fn)
        if self.before_step is not None:
            self.before_step(self.model, self.optimizer, None)
        self.direct.optimizer_step(self.optimizer)  # optimizer.step(); fused Adam/SGD by one direct kernel call
        if self.after_step is not None:
            self.after_step(self.model, self.optimizer)
        return logits, loss, penalty


def train_one_epoch(step: TrainStep, batches: Iterable[Batch], *, schedule: Optional[Callable[[], None]] = None,
                    on_step: Optional[Callable[[], None]] = None) -> Union[dict[str, Any], list[dict[str, Any]]]:
    """One pass of ``step`` over ``batches`` (as trained on: augmented and mixed by ``Policy.train_batches``);
    ``schedule`` after every optimizer step (the lr schedule), ``on_step`` after it (the progress bar).

    Returns the epoch's sums (:meth:`EpochSums.result`): summed data loss, summed penalty (or None), number
    correct (device tensors) and the number of samples seen — one dict for a single run, one per member for a
    stack. With soft (mixed) targets, accuracy is counted against each sample's dominant label.
    """
    step.train()
    sums = EpochSums(step.device, step.members, step.fresh_logits)
    for batch in batches:
        logits, loss, penalty = step.step(*batch)
        if schedule is not None:
            schedule()
        sums.add(logits, loss, penalty, batch[1])
        if on_step is not None:
            on_step()
    return sums.result()
