"""L1, L2 and elastic-net penalties added to the training loss (lecture notation: λ, r).

    l1:          λ·Σ|w|
    l2:          λ·Σw²        (half: true gives ½·λ·Σw²; Keras' L2(λ) is the form without ½)
    elastic_net: λ·(r·Σ|w| + (1−r)/2·Σw²)

By default only weights (dense and conv kernels, the parameters with ≥ 2 dimensions) are penalised, not
biases or normalisation parameters; ``layers`` narrows it to parameters whose names match glob patterns.
"""

from __future__ import annotations

import fnmatch
import logging
from dataclasses import dataclass
from typing import Optional

import torch
from torch import nn

from regbench.errors import ConfigError
from regbench.regularizers.base import Context, Regularizer, Stacking, register

log = logging.getLogger(__name__)


@dataclass
class PenaltyConfig:
    lam: float = 1e-4  # λ, the penalty's strength
    params: str = "weights"  # weights (kernels only) | all (also biases and normalisation parameters)
    layers: Optional[list[str]] = None  # glob patterns on parameter names, e.g. ["hidden.0.*"]; null = every layer


@dataclass
class L2Config(PenaltyConfig):
    half: bool = False  # true: ½·λ·Σw² (gradient λ·w); false: λ·Σw² (gradient 2λ·w, Keras' convention)


@dataclass
class ElasticNetConfig(PenaltyConfig):
    ratio: float = 0.5  # r: share of the L1 term


def select_params(model: nn.Module, params: str, layers: Optional[list[str]], key: str) -> list[tuple[str, nn.Parameter]]:
    """Trainable parameters a penalty applies to, by kind (weights/all) and optional name patterns."""
    chosen = [(n, p) for n, p in model.named_parameters() if p.requires_grad and (params == "all" or p.ndim >= 2)]
    if layers:
        for pattern in layers:
            if not any(_match(n, pattern) for n, _ in model.named_parameters()):
                names = sorted({n.rsplit(".", 1)[0] for n, _ in model.named_parameters()})
                raise ConfigError(f"{key}.layers", pattern, f"a pattern matching parameter names of this model "
                                  f"(layers: {', '.join(names)})")
        chosen = [(n, p) for n, p in chosen if any(_match(n, pat) for pat in layers)]
    return chosen


def _list(value) -> str:
    return "null" if value is None else "[" + ",".join(str(v) for v in value) + "]"


def _match(name: str, pattern: str) -> bool:
    return fnmatch.fnmatchcase(name, pattern) or fnmatch.fnmatchcase(name, pattern.rstrip(".*") + ".*")


class _Penalty(Regularizer):
    """Shared by l1 / l2 / elastic_net; each subclass defines ``value(params)``, the penalty without λ."""

    # λ, r, half and which parameters may differ per member of a stack (a run without the member has λ = 0); setup
    # only chooses the member's own parameters, and penalty_on takes them or their rows of the stacked leaves.
    stacking = Stacking(shared=(), before_training=("setup",))

    def check(self, ctx: Context) -> None:
        if not self.cfg.lam >= 0:
            raise ConfigError(f"{self.key}.lam", self.cfg.lam, "a number >= 0")
        if self.cfg.params not in ("weights", "all"):
            raise ConfigError(f"{self.key}.params", self.cfg.params, "weights or all")

    def setup(self, model: nn.Module, ctx: Context) -> None:
        self.params = [p for _, p in select_params(model, self.cfg.params, self.cfg.layers, self.key)]
        if not self.params:
            raise self.nothing(f"{self.key}.params={self.cfg.params} with layers={_list(self.cfg.layers)} selects no "
                               "trainable parameter (weights = the kernels; frozen ones are left out)",
                               f"widen {self.key}.layers, or set {self.key}.params=all to include biases")

    def info(self) -> dict:
        return {"tensors": len(self.params), "elements": sum(p.numel() for p in self.params)}

    def log_info(self, model: nn.Module) -> None:
        """How many trainable parameters it penalises and how many it leaves alone."""
        tensors = sum(1 for p in model.parameters() if p.requires_grad)
        elements = sum(p.numel() for p in model.parameters() if p.requires_grad)
        mine = self.info()
        log.info("%s penalty: %s parameters in %d tensors penalised, %s in %d tensors not penalised",
                 self.name, f"{mine['elements']:,}", mine["tensors"], f"{elements - mine['elements']:,}",
                 tensors - mine["tensors"])

    def penalty_params(self) -> list[nn.Parameter]:
        return self.params if self.cfg.lam != 0 else []  # λ = 0 adds no term (a sweep's baseline point)

    def penalty_on(self, params: list[torch.Tensor]) -> torch.Tensor:
        return self.cfg.lam * self.value(params)


def l1(params: list[torch.Tensor]) -> torch.Tensor:
    return torch.stack([p.abs().sum() for p in params]).sum()


def sq(params: list[torch.Tensor]) -> torch.Tensor:
    return torch.stack([p.pow(2).sum() for p in params]).sum()


@register
class L1(_Penalty):
    name, schema = "l1", PenaltyConfig

    def value(self, params):
        return l1(params)


@register
class L2(_Penalty):
    name, schema = "l2", L2Config

    def value(self, params):
        return 0.5 * sq(params) if self.cfg.half else sq(params)


@register
class ElasticNet(_Penalty):
    name, schema = "elastic_net", ElasticNetConfig

    def check(self, ctx: Context) -> None:
        super().check(ctx)
        if not 0 <= self.cfg.ratio <= 1:
            raise ConfigError(f"{self.key}.ratio", self.cfg.ratio, "a number in [0, 1]")

    def value(self, params):
        r = self.cfg.ratio
        return r * l1(params) + (1 - r) / 2 * sq(params)
