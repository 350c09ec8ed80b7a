"""The lectures' CIFAR-10 CNN: conv blocks with pooling, global pooling, a dense head."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Optional, Sequence

import torch
from torch import nn

from regbench.errors import ConfigError
from regbench.models.common import DropBlock2d, Rates, check_activation, check_alpha_dropout, \
    check_drop_block_places, check_init, expect, expect_choice, init_weights, make_activation, make_gaussian_noise, \
    make_norm, noise_dropouts, noise_kwargs, norm_kwargs, rates
from regbench.models.slots import DropBlockSpec, LayerSlots, refuse_unapplied
from regbench.registry import MODELS

POOLINGS = ("max", "avg", "none")
DROP_BLOCK_BLOCKS = 2  # DropBlock in the last two conv blocks (32x32 input: the 16x16 and 8x8 maps, as the ResNet's)


@dataclass
class LectureCNNConfig:
    name: str = "lecture_cnn"
    widths: list[int] = field(default_factory=lambda: [32, 64, 128])  # channels of each conv block
    convs_per_block: int = 2  # 3x3 'same' convs per block
    dense: int = 64  # width of the hidden dense layer of the head
    pooling: str = "max"  # after each block: max | avg | none (max pooling is one of the lecture's regularizers)
    global_pool: str = "max"  # before the head: max | avg
    activation: str = "relu"
    negative_slope: float = 0.01
    init: str = "default"
    bias_init: Optional[str] = None


def check(m: Any, cfg: Any) -> None:
    check_activation(m)
    check_init(m)
    expect(len(m.widths) >= 1 and all(w >= 1 for w in m.widths), "model.widths", list(m.widths),
           "a non-empty list of channel counts >= 1")
    expect(m.convs_per_block >= 1, "model.convs_per_block", m.convs_per_block, "an integer >= 1")
    expect(m.dense >= 1, "model.dense", m.dense, "an integer >= 1")
    expect_choice(m, "model.pooling", POOLINGS)
    expect_choice(m, "model.global_pool", ("max", "avg"))


@MODELS.register("lecture_cnn", schema=LectureCNNConfig, check=check)
class LectureCNN(nn.Module):
    """The lectures' CIFAR-10 network.

    Blocks of ``convs_per_block`` 3x3 'same' convs with bias (-> norm) -> activation (-> Dropout2d), each block
    followed by 2x2 pooling; global pooling; Dense(dense) -> activation (-> dropout) -> Dense(classes).
    With the defaults on 32x32x3 input: 295,914 parameters (296,810 with BatchNorm after every conv).
    Slots: dropout (one rate, the dense head), its placement, spatial dropout, a norm; Keras' noise layers
    (GaussianNoise on the input image or after the head's activation, GaussianDropout and AlphaDropout after the
    head's activation, after its dropout: where Keras' CNNs put Dropout); DropBlock at the end of each of the last
    two blocks (after the last activation and its Dropout2d, before the pooling: one per block, as timm puts one per
    residual block); no drop-path.
    """

    def __init__(self, in_channels: int, image_size: int, num_classes: int, widths: Sequence[int] = (32, 64, 128),
                 convs_per_block: int = 2, dense: int = 64, pooling: str = "max", global_pool: str = "max",
                 activation: str = "relu", negative_slope: float = 0.01, init: str = "default",
                 bias_init: Optional[str] = None, norm: Optional[str] = None, norm_momentum: float = 0.1, norm_eps: float = 1e-5,
                 norm_groups: int = 8, spatial_dropout: Rates = 0.0, head_dropout: Rates = 0.0,
                 dropout_placement: str = "after_activation", gaussian_noise: float = 0.0,
                 noise_placement: str = "input", gaussian_dropout: float = 0.0, alpha_dropout: float = 0.0,
                 drop_block: Optional[DropBlockSpec] = None):
        super().__init__()
        if pooling != "none" and image_size >> len(widths) < 1:
            raise ConfigError("model.widths", list(widths), f"at most {image_size.bit_length() - 1} pooled blocks "
                              f"for {image_size}x{image_size} images", "use fewer widths or model.pooling=none")
        ps = rates(spatial_dropout, len(widths), "regularizer.dropout.spatial")
        self.input_noise = make_gaussian_noise(gaussian_noise, noise_placement, "input")  # None: no module
        first_db = len(widths) - min(DROP_BLOCK_BLOCKS, len(widths))
        db = drop_block.per_place(len(widths) - first_db) if drop_block is not None and drop_block.rate > 0 else []
        blocks = []
        c = in_channels
        for b, (w, p) in enumerate(zip(widths, ps)):
            block = nn.Sequential()
            for i in range(convs_per_block):
                block.add_module(f"conv{i}", nn.Conv2d(c, w, 3, padding=1, bias=True))
                n = make_norm(norm, w, 2, norm_momentum, norm_eps, norm_groups)
                if n is not None:
                    block.add_module(f"norm{i}", n)
                block.add_module(f"act{i}", make_activation(activation, negative_slope))
                if p > 0:
                    block.add_module(f"dropout{i}", nn.Dropout2d(p))
                c = w
            if db and b >= first_db:
                size, scale = db[b - first_db]
                block.add_module("drop_block", DropBlock2d(drop_block.rate, size, scale))
            if pooling == "max":
                block.add_module("pool", nn.MaxPool2d(2))
            elif pooling == "avg":
                block.add_module("pool", nn.AvgPool2d(2))
            blocks.append(block)
        self.features = nn.Sequential(*blocks)
        self.global_pool = nn.AdaptiveMaxPool2d(1) if global_pool == "max" else nn.AdaptiveAvgPool2d(1)
        self.head = self._head(c, dense, num_classes, activation, negative_slope, head_dropout, dropout_placement,
                               make_gaussian_noise(gaussian_noise, noise_placement, "hidden"),
                               noise_dropouts(gaussian_dropout, alpha_dropout))
        init_weights(self, init, activation, negative_slope, bias_init)

    @staticmethod
    def _head(c: int, dense: int, num_classes: int, activation: str, negative_slope: float, head_dropout: Rates,
              dropout_placement: str, noise: Optional[nn.Module] = None,
              dropouts: Sequence[tuple[str, nn.Module]] = ()) -> nn.Sequential:
        head = nn.Sequential()
        head.add_module("flatten", nn.Flatten())
        head.add_module("dense", nn.Linear(c, dense))
        p = rates(head_dropout, 1, "regularizer.dropout.rate")[0]
        if p > 0 and dropout_placement == "before_activation":
            head.add_module("dropout", nn.Dropout(p))
        head.add_module("act", make_activation(activation, negative_slope))
        if noise is not None:
            head.add_module("noise", noise)
        if p > 0 and dropout_placement == "after_activation":
            head.add_module("dropout", nn.Dropout(p))
        for name, layer in dropouts:
            head.add_module(name, layer)
        head.add_module("out", nn.Linear(dense, num_classes))
        return head

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.input_noise is not None:
            x = self.input_noise(x)
        return self.head(self.global_pool(self.features(x)))

    @staticmethod
    def check_slots(m: Any, slots: LayerSlots) -> None:
        """Refuse what the CNN has no place for (before anything is built)."""
        refuse_unapplied(slots, "lecture_cnn", {"dropout", "dropout_placement", "spatial_dropout", "norm",
                                                "gaussian_noise", "gaussian_noise_placement", "gaussian_dropout",
                                                "alpha_dropout", "drop_block"})
        if len(slots.rate_list()) > 1:
            raise ConfigError(slots.key("dropout"), slots.rate_list(), "one rate for the CNN's single dense hidden "
                              "layer")
        check_alpha_dropout(m, slots)
        if slots.drop_block is not None:
            places = min(DROP_BLOCK_BLOCKS, len(m.widths))
            check_drop_block_places(slots, places, f"conv block it is in: the last {places} of model.widths")

    @classmethod
    def from_config(cls, m: Any, input_shape: Sequence[int], num_classes: int, slots: LayerSlots) -> "LectureCNN":
        c, h, w = input_shape
        return cls(c, min(h, w), num_classes, list(m.widths), m.convs_per_block, m.dense, m.pooling, m.global_pool,
                   m.activation, m.negative_slope, m.init, m.bias_init,
                   head_dropout=0.0 if slots.dropout is None else slots.dropout,
                   spatial_dropout=slots.spatial_dropout, dropout_placement=slots.dropout_placement,
                   **norm_kwargs(slots.norm), **noise_kwargs(slots), drop_block=slots.drop_block)

    @staticmethod
    def weight_layers(m: Any) -> int:
        """Conv and dense layers, from the config alone (what transfer's freeze_layers counts)."""
        return len(m.widths) * m.convs_per_block + 2  # convs, then the head's two dense layers
