"""Normalisation layers between each dense/conv layer and its activation (the lectures' placement).

Batch norm: ŷ = γ·(x − μ_B)/√(σ²_B + ε) + β in training, running statistics at evaluation.
Momentum conventions differ: torch updates running ← (1 − m)·running + m·batch with m = 0.1, ε = 1e-5;
Keras updates moving ← m·moving + (1 − m)·batch with m = 0.99, ε = 1e-3. ``convention: keras`` takes the
Keras numbers and converts them (torch m = 1 − Keras m). The lecture CNN keeps its conv biases under BN
(its parameter count says so) although β makes them redundant.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Optional

from regbench.errors import ConfigError
from regbench.models.slots import LayerSlots, NormSpec
from regbench.regularizers.base import Context, Regularizer, register


@dataclass
class BatchNormConfig:
    convention: str = "torch"  # torch | keras: how momentum (and the eps default) are meant
    momentum: Optional[float] = None  # null = the convention's default (torch 0.1, keras 0.99)
    eps: Optional[float] = None  # null = the convention's default (torch 1e-5, keras 1e-3)


@dataclass
class GroupNormConfig:
    groups: int = 8  # channels are split into this many groups (must divide every layer's width)
    eps: float = 1e-5


@dataclass
class LayerNormConfig:
    eps: float = 1e-5


class _Norm(Regularizer):
    def check(self, ctx: Context) -> None:
        norms = [k for k in ctx.cfg.regularizer if k in ("batchnorm", "group_norm", "layer_norm")]
        if len(norms) > 1:
            raise ConfigError("regularizer", norms, "at most one normalisation (batchnorm, group_norm, layer_norm)")
        if not self.eps() > 0:
            raise ConfigError(f"{self.key}.eps", self.cfg.eps, "a number > 0")

    def eps(self) -> float:
        return self.cfg.eps


@register
class BatchNorm(_Norm):
    name, schema = "batchnorm", BatchNormConfig
    DEFAULTS = {"torch": (0.1, 1e-5), "keras": (0.99, 1e-3)}

    def check(self, ctx: Context) -> None:
        if self.cfg.convention not in self.DEFAULTS:
            raise ConfigError(f"{self.key}.convention", self.cfg.convention, "torch or keras")
        super().check(ctx)
        m = self.cfg.momentum
        if m is not None and not 0 <= m <= 1:
            raise ConfigError(f"{self.key}.momentum", m, "a number in [0, 1]")
        if ctx.cfg.data.batch_size < 2:
            raise ConfigError("data.batch_size", ctx.cfg.data.batch_size, "at least 2 with batchnorm (batch "
                              "statistics of one sample are undefined)", "raise data.batch_size or use "
                              "regularizer=[layer_norm]")

    def eps(self) -> float:
        return self.DEFAULTS[self.cfg.convention][1] if self.cfg.eps is None else self.cfg.eps

    def torch_momentum(self) -> float:
        m = self.DEFAULTS[self.cfg.convention][0] if self.cfg.momentum is None else self.cfg.momentum
        return m if self.cfg.convention == "torch" else 1.0 - m

    def info(self) -> dict[str, Any]:
        return {"convention": self.cfg.convention, "torch_momentum": self.torch_momentum(), "eps": self.eps()}

    def fill_slots(self, slots: LayerSlots, ctx: Context) -> None:
        slots.set("norm", NormSpec("batchnorm", momentum=self.torch_momentum(), eps=self.eps()), self.key)


@register
class GroupNorm(_Norm):
    name, schema = "group_norm", GroupNormConfig

    def check(self, ctx: Context) -> None:
        super().check(ctx)
        if self.cfg.groups < 1:
            raise ConfigError(f"{self.key}.groups", self.cfg.groups, "an integer >= 1")

    def fill_slots(self, slots: LayerSlots, ctx: Context) -> None:
        slots.set("norm", NormSpec("group_norm", eps=self.cfg.eps, groups=self.cfg.groups), self.key)


@register
class LayerNorm(_Norm):
    name, schema = "layer_norm", LayerNormConfig

    def fill_slots(self, slots: LayerSlots, ctx: Context) -> None:
        slots.set("norm", NormSpec("layer_norm", eps=self.cfg.eps), self.key)
