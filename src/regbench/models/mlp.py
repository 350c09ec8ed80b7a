"""The multilayer perceptron: Flatten -> [Linear -> (norm) -> activation -> (dropout)] per hidden layer -> head."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Optional, Sequence

import torch
from torch import nn

from regbench.errors import ConfigError
from regbench.models.common import Rates, check_activation, check_init, expect, init_weights, make_activation, \
    make_norm, norm_kwargs, rates
from regbench.models.slots import LayerSlots, applies_to_nothing, refuse_unapplied
from regbench.registry import MODELS


@dataclass
class MLPConfig:
    name: str = "mlp"
    hidden: list[int] = field(default_factory=lambda: [256, 128])  # widths of the hidden layers
    activation: str = "relu"  # relu | leaky_relu | elu | sigmoid | tanh
    negative_slope: float = 0.01  # slope of leaky_relu for x < 0 (used only by leaky_relu)
    init: str = "default"  # default (torch's) | xavier_uniform | xavier_normal | kaiming_uniform | kaiming_normal
    #                        | glorot_uniform (Keras' default) | he_normal (Keras': truncated normal)
    bias_init: Optional[str] = None  # zeros | torch (uniform ±1/√fan_in); null = torch's with init=default, else zeros


def check(m: Any, cfg: Any) -> None:
    check_activation(m)
    check_init(m)
    expect(all(h >= 1 for h in m.hidden), "model.hidden", list(m.hidden), "a list of widths >= 1")


@MODELS.register("mlp", schema=MLPConfig, check=check)
class MLP(nn.Module):
    """Flatten -> [Linear -> (norm) -> activation -> (dropout)] per hidden layer -> Linear head.

    ``dropout_placement='before_activation'`` puts dropout between the norm and the activation instead.
    Slots: dropout (one rate or one per hidden layer), its placement, a norm; no spatial dropout, no drop-path.
    """

    def __init__(self, in_features: int, num_classes: int, hidden: Sequence[int], activation: str = "relu",
                 negative_slope: float = 0.01, init: str = "default", bias_init: Optional[str] = None,
                 dropout: Rates = 0.0,
                 dropout_placement: str = "after_activation", norm: Optional[str] = None,
                 norm_momentum: float = 0.1, norm_eps: float = 1e-5, norm_groups: int = 8):
        super().__init__()
        ps = rates(dropout, len(hidden), "regularizer.dropout.rate")
        self.flatten = nn.Flatten()
        blocks = []
        width = in_features
        for h, p in zip(hidden, ps):
            block = nn.Sequential()
            block.add_module("linear", nn.Linear(width, h))
            n = make_norm(norm, h, 1, norm_momentum, norm_eps, norm_groups)
            if n is not None:
                block.add_module("norm", n)
            if p > 0 and dropout_placement == "before_activation":
                block.add_module("dropout", nn.Dropout(p))
            block.add_module("act", make_activation(activation, negative_slope))
            if p > 0 and dropout_placement == "after_activation":
                block.add_module("dropout", nn.Dropout(p))
            blocks.append(block)
            width = h
        self.hidden = nn.Sequential(*blocks)
        self.head = nn.Linear(width, num_classes)
        init_weights(self, init, activation, negative_slope, bias_init)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.hidden(self.flatten(x)))

    @staticmethod
    def check_slots(m: Any, slots: LayerSlots) -> None:
        """Refuse what the MLP has no place for (before anything is built)."""
        no_hidden = "model.hidden=[] has no hidden layer to {}"
        fix = "give the MLP hidden layers (e.g. model.hidden=[256]) or drop {} from the stack"
        if slots.filled("dropout") and not m.hidden:
            member = slots.member("dropout")
            raise applies_to_nothing(member, no_hidden.format("drop units in"), fix.format(member))
        if slots.norm is not None and not m.hidden:
            member = slots.member("norm")
            raise applies_to_nothing(member, no_hidden.format("normalise (the head is never normalised)"),
                                     fix.format(member))
        refuse_unapplied(slots, "mlp", {"dropout", "dropout_placement", "norm"},
                         why={"spatial_dropout": "the MLP has none"})
        ps = slots.rate_list()
        if len(ps) > 1 and len(ps) != len(m.hidden):
            raise ConfigError(slots.key("dropout"), ps, f"one rate or {len(m.hidden)} (one per hidden layer of "
                              "model.hidden)")

    @classmethod
    def from_config(cls, m: Any, input_shape: Sequence[int], num_classes: int, slots: LayerSlots) -> "MLP":
        c, h, w = input_shape
        return cls(c * h * w, num_classes, list(m.hidden), m.activation, m.negative_slope, m.init, m.bias_init,
                   dropout=0.0 if slots.dropout is None else slots.dropout,
                   dropout_placement=slots.dropout_placement, **norm_kwargs(slots.norm))

    @staticmethod
    def weight_layers(m: Any) -> int:
        """Dense layers, from the config alone (what transfer's freeze_layers counts)."""
        return len(m.hidden) + 1
