"""The multilayer perceptron: Flatten -> (input noise) -> [Linear -> (norm) -> activation -> (noise layers)] per hidden
layer -> head."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Optional, Sequence

import torch
from torch import nn

from regbench.errors import ConfigError
from regbench.models.common import Rates, check_activation, check_alpha_dropout, check_init, expect, \
    init_weights, make_activation, make_gaussian_noise, make_norm, noise_dropouts, noise_kwargs, norm_kwargs, rates
from regbench.models.slots import LayerSlots, applies_to_nothing, refuse_unapplied
from regbench.registry import MODELS


@dataclass
class MLPConfig:
    name: str = "mlp"
    hidden: list[int] = field(default_factory=lambda: [256, 128])  # widths of the hidden layers
    activation: str = "relu"  # relu | leaky_relu | elu | sigmoid | tanh | selu
    negative_slope: float = 0.01  # slope of leaky_relu for x < 0 (used only by leaky_relu)
    init: str = "default"  # default (torch's) | xavier_uniform | xavier_normal | kaiming_uniform | kaiming_normal
    #                        | glorot_uniform (Keras' default) | he_normal, lecun_normal (Keras': truncated normal)
    bias_init: Optional[str] = None  # zeros | torch (uniform ±1/√fan_in); null = torch's with init=default, else zeros


def check(m: Any, cfg: Any) -> None:
    check_activation(m)
    check_init(m)
    expect(all(h >= 1 for h in m.hidden), "model.hidden", list(m.hidden), "a list of widths >= 1")


@MODELS.register("mlp", schema=MLPConfig, check=check)
class MLP(nn.Module):
    """Flatten -> (GaussianNoise) -> [Linear -> (norm) -> activation -> (dropout)] per hidden layer -> Linear head.

    ``dropout_placement='before_activation'`` puts dropout between the norm and the activation instead.
    Slots: dropout (one rate or one per hidden layer), its placement, a norm; Keras' noise layers: GaussianNoise on
    the input (after the flatten) or after every hidden activation, GaussianDropout and AlphaDropout after every
    hidden activation (after the noise, then dropout, in that order: ``noise``, ``dropout``, ``gaussian_dropout``,
    ``alpha_dropout``); no spatial dropout, no drop-path, no DropBlock.
    """

    def __init__(self, in_features: int, num_classes: int, hidden: Sequence[int], activation: str = "relu",
                 negative_slope: float = 0.01, init: str = "default", bias_init: Optional[str] = None,
                 dropout: Rates = 0.0,
                 dropout_placement: str = "after_activation", norm: Optional[str] = None,
                 norm_momentum: float = 0.1, norm_eps: float = 1e-5, norm_groups: int = 8,
                 gaussian_noise: float = 0.0, noise_placement: str = "input", gaussian_dropout: float = 0.0,
                 alpha_dropout: float = 0.0):
        super().__init__()
        ps = rates(dropout, len(hidden), "regularizer.dropout.rate")
        self.flatten = nn.Flatten()
        # None: no module (the modules' order is the forward's: flatten, input_noise, hidden, head)
        self.input_noise = make_gaussian_noise(gaussian_noise, noise_placement, "input")
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
            noise = make_gaussian_noise(gaussian_noise, noise_placement, "hidden")
            if noise is not None:
                block.add_module("noise", noise)
            if p > 0 and dropout_placement == "after_activation":
                block.add_module("dropout", nn.Dropout(p))
            for name, layer in noise_dropouts(gaussian_dropout, alpha_dropout):
                block.add_module(name, layer)
            blocks.append(block)
            width = h
        self.hidden = nn.Sequential(*blocks)
        self.head = nn.Linear(width, num_classes)
        init_weights(self, init, activation, negative_slope, bias_init)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.flatten(x)
        if self.input_noise is not None:
            x = self.input_noise(x)
        return self.head(self.hidden(x))

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
        for slot, what in (("gaussian_dropout", "apply Gaussian dropout to"), ("alpha_dropout", "drop units in")):
            if slots.filled(slot) and not m.hidden:
                raise applies_to_nothing(slots.member(slot), no_hidden.format(what), fix.format(slots.member(slot)))
        if slots.filled("gaussian_noise") and slots.gaussian_noise_placement == "hidden" and not m.hidden:
            member = slots.member("gaussian_noise")
            raise applies_to_nothing(member, no_hidden.format("add noise to"),
                                     f"{slots.key('gaussian_noise_placement')}=input, or give the MLP hidden layers "
                                     "(e.g. model.hidden=[256])")
        refuse_unapplied(slots, "mlp", {"dropout", "dropout_placement", "norm", "gaussian_noise",
                                        "gaussian_noise_placement", "gaussian_dropout", "alpha_dropout"},
                         why={"spatial_dropout": "the MLP has none", "drop_block": "the MLP has no conv feature maps"})
        check_alpha_dropout(m, slots)
        ps = slots.rate_list()
        if len(ps) > 1 and len(ps) != len(m.hidden):
            raise ConfigError(slots.key("dropout"), ps, f"one rate or {len(m.hidden)} (one per hidden layer of "
                              "model.hidden)")

    @classmethod
    def from_config(cls, m: Any, input_shape: Sequence[int], num_classes: int, slots: LayerSlots) -> "MLP":
        c, h, w = input_shape
        return cls(c * h * w, num_classes, list(m.hidden), m.activation, m.negative_slope, m.init, m.bias_init,
                   dropout=0.0 if slots.dropout is None else slots.dropout,
                   dropout_placement=slots.dropout_placement, **norm_kwargs(slots.norm), **noise_kwargs(slots))

    @staticmethod
    def weight_layers(m: Any) -> int:
        """Dense layers, from the config alone (what transfer's freeze_layers counts)."""
        return len(m.hidden) + 1
