"""Keras' kernel constraints: max_norm, unit_norm, non_neg, min_max_norm, each a projection of the kernels after
every optimizer step.

Keras 3 (keras-team/keras) writes each as a function of the kernel in keras/src/constraints/constraints.py
(``MaxNorm.__call__``, ``UnitNorm.__call__``, ``NonNeg.__call__``, ``MinMaxNorm.__call__``) and applies it in
keras/src/optimizers/base_optimizer.py ``BaseOptimizer.apply``: after ``_backend_apply_gradients`` (the update, the
weight decay included), ``for variable in trainable_variables: if variable.constraint is not None:
variable.assign(variable.constraint(variable))``. Here: ``after_step``, after every ``optimizer.step()``, on the
trainable kernels.

Per output unit, in Keras' axis convention translated to torch's layout: the norms are taken over the weights
incident to each output unit — Keras' Dense kernel [in, out] with ``axis=0`` is torch's Linear weight [out, in]
over dim 1; Keras' Conv2D kernel [h, w, in, out] with ``axis=[0, 1, 2]`` is torch's Conv2d weight [out, in, h, w]
over dims (1, 2, 3): every dim of a torch kernel but the first. With n = sqrt(Σ w²) per unit, ε = 1e-7 (Keras'
``backend.epsilon()``), exactly where Keras puts it:

    max_norm:      w · clip(n, 0, max_value) / (ε + n)
    unit_norm:     w / (ε + n)
    non_neg:       max(w, 0)
    min_max_norm:  w · (rate · clip(n, min_value, max_value) + (1 − rate) · n) / (ε + n)

Kernels only (the weights of Linear and Conv layers: not biases, not normalisation parameters), all of them by
default; ``layers`` narrows them with glob patterns on parameter names, as the penalties' ``layers`` does (its
patterns, checked by regbench.regularizers.penalties.select_params). Each step projects the chosen kernels that
are trainable then (Keras' ``trainable_variables``): frozen ones are left alone until fine_tune unfreezes them.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Optional

import torch
from torch import nn

from regbench.errors import ConfigError
from regbench.regularizers.base import Context, Regularizer, Stacking, register
from regbench.regularizers.penalties import _list, _match, select_params

log = logging.getLogger(__name__)

EPSILON = 1e-7  # keras.backend.epsilon() (keras/src/backend/config.py: _EPSILON = 1e-7)
CONSTRAINTS = ("max_norm", "unit_norm", "non_neg", "min_max_norm")  # the members of this module
KERNEL_LAYERS = (nn.Linear, nn.Conv1d, nn.Conv2d, nn.Conv3d)  # weight [out, in(/groups), *kernel]: unit = dim 0


# --- Keras' formulas, on one kernel in torch's layout (the tests check them against hand-computed numbers) -----
def unit_norms(w: torch.Tensor) -> torch.Tensor:
    """Keras' ``ops.sqrt(ops.sum(ops.square(w), axis=axis, keepdims=True))`` per output unit (dim 0 in torch)."""
    return w.square().sum(dim=tuple(range(1, w.ndim)), keepdim=True).sqrt()


def max_norm(w: torch.Tensor, max_value: float) -> torch.Tensor:
    norms = unit_norms(w)
    desired = norms.clamp(0, max_value)  # ops.clip(norms, 0, self.max_value)
    return w * (desired / (EPSILON + norms))


def unit_norm(w: torch.Tensor) -> torch.Tensor:
    return w / (EPSILON + unit_norms(w))


def non_neg(w: torch.Tensor) -> torch.Tensor:
    return w.clamp(min=0)  # ops.maximum(w, 0)


def min_max_norm(w: torch.Tensor, min_value: float, max_value: float, rate: float) -> torch.Tensor:
    norms = unit_norms(w)
    desired = rate * norms.clamp(min_value, max_value) + (1 - rate) * norms
    return w * (desired / (EPSILON + norms))


@dataclass
class ConstraintConfig:
    layers: Optional[list[str]] = None  # glob patterns on parameter names, e.g. ["hidden.*"]; null = every kernel


@dataclass
class MaxNormConfig(ConstraintConfig):
    max_value: float = 2.0  # Keras' MaxNorm default


@dataclass
class MinMaxNormConfig(ConstraintConfig):
    min_value: float = 0.0  # Keras' MinMaxNorm defaults
    max_value: float = 1.0
    rate: float = 1.0  # 1: strict; < 1: each step moves the norms that share of the way into [min_value, max_value]


def kernels(model: nn.Module, layers: Optional[list[str]], key: str) -> list[tuple[str, nn.Parameter]]:
    """The kernels (Linear / Conv weights) a constraint may project, narrowed by ``layers``; frozen ones included
    (a step projects those trainable then, as Keras constrains its ``trainable_variables``: fine_tune unfreezes)."""
    owners = {f"{name}.weight" if name else "weight": m for name, m in model.named_modules()}
    chosen = [(n, p) for n, p in model.named_parameters() if isinstance(owners.get(n), KERNEL_LAYERS)]
    if layers is not None:
        select_params(model, "all", layers, key)  # the penalties' check: a pattern matching no parameter is refused
        chosen = [(n, p) for n, p in chosen if any(_match(n, pattern) for pattern in layers)]
    return chosen


class _Constraint(Regularizer):
    """Shared by the four constraints; each subclass defines ``project(w)``, its Keras formula."""

    # setup only chooses the kernels; the projection itself (after_step) has no stacked form: refused in a stack
    # with the after_step clause (base.UNSTACKED_HOOKS).
    stacking = Stacking(before_training=("setup",))

    def project(self, w: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def check(self, ctx: Context) -> None:
        chosen = [n for n in CONSTRAINTS if n in ctx.cfg.regularizer]
        if len(chosen) > 1:  # two projections in turn are neither constraint (Keras gives a kernel one constraint)
            raise ConfigError("regularizer", f"[{','.join(chosen)}]", f"at most one of {', '.join(CONSTRAINTS)} "
                              "(Keras gives a kernel one kernel_constraint)", "keep one of them")

    def setup(self, model: nn.Module, ctx: Context) -> None:
        chosen = kernels(model, self.cfg.layers, self.key)
        if not any(p.requires_grad for _, p in chosen):
            raise self.nothing(f"{self.key}.layers={_list(self.cfg.layers)} selects no trainable kernel (the weights of dense and "
                               "conv layers; biases, normalisation parameters and frozen weights are left out)",
                               f"widen {self.key}.layers, or set it to null for every kernel")
        self.names = [n for n, _ in chosen]
        self.kernels = [p for _, p in chosen]

    @torch.no_grad()
    def after_step(self, model: nn.Module, optimizer: torch.optim.Optimizer) -> None:
        for w in self.kernels:
            if w.requires_grad:  # Keras: the trainable variables of this step
                w.copy_(self.project(w))  # variable.assign(variable.constraint(variable))

    def info(self) -> dict:
        """The kernels it projects now (trainable)."""
        trainable = [p for p in self.kernels if p.requires_grad]
        return {"tensors": len(trainable), "elements": sum(p.numel() for p in trainable)}

    def log_info(self, model: nn.Module) -> None:
        frozen = [n for n, p in zip(self.names, self.kernels) if not p.requires_grad]
        log.info("%s constraint: %d kernels (%s parameters) projected after every optimizer step: %s%s", self.name,
                 self.info()["tensors"], f"{self.info()['elements']:,}",
                 ", ".join(n for n in self.names if n not in frozen),
                 f" (frozen, projected once trainable: {', '.join(frozen)})" if frozen else "")


def _check_max(key: str, value: float) -> None:
    if not value >= 0:
        raise ConfigError(key, value, "a norm >= 0")


@register
class MaxNorm(_Constraint):
    name, schema = "max_norm", MaxNormConfig

    def check(self, ctx: Context) -> None:
        super().check(ctx)
        _check_max(f"{self.key}.max_value", self.cfg.max_value)

    def project(self, w):
        return max_norm(w, self.cfg.max_value)


@register
class UnitNorm(_Constraint):
    name, schema = "unit_norm", ConstraintConfig

    def project(self, w):
        return unit_norm(w)


@register
class NonNeg(_Constraint):
    name, schema = "non_neg", ConstraintConfig

    def project(self, w):
        return non_neg(w)


@register
class MinMaxNorm(_Constraint):
    name, schema = "min_max_norm", MinMaxNormConfig

    def check(self, ctx: Context) -> None:
        super().check(ctx)
        c = self.cfg
        _check_max(f"{self.key}.min_value", c.min_value)
        if not c.max_value >= c.min_value:
            raise ConfigError(f"{self.key}.max_value", c.max_value, f"a norm >= min_value ({c.min_value})")
        if not 0 <= c.rate <= 1:
            raise ConfigError(f"{self.key}.rate", c.rate, "a number in [0, 1] (1: strict enforcement)")

    def project(self, w):
        c = self.cfg
        return min_max_norm(w, c.min_value, c.max_value, c.rate)
