"""The two model families: an MLP and the lectures' small CNN, with per-layer slots for dropout and norms.

Regularizers ask for dropout and normalisation through the constructor arguments (``dropout``, ``norm``...),
so the same builder serves a plain model and a regularized one.
"""

from __future__ import annotations

import math
from typing import Optional, Sequence, Union

import torch
from omegaconf import DictConfig
from torch import nn

from regbench.errors import ConfigError

Rates = Union[float, Sequence[float]]


def make_activation(name: str, negative_slope: float = 0.01) -> nn.Module:
    if name == "relu":
        return nn.ReLU()
    if name == "leaky_relu":
        return nn.LeakyReLU(negative_slope)
    if name == "elu":
        return nn.ELU()
    if name == "sigmoid":
        return nn.Sigmoid()
    if name == "tanh":
        return nn.Tanh()
    raise ConfigError("model.activation", name, "one of relu, leaky_relu, elu, sigmoid, tanh")


def make_norm(kind: Optional[str], features: int, dims: int, momentum: float = 0.1, eps: float = 1e-5,
              groups: int = 8) -> Optional[nn.Module]:
    """Normalisation layer for ``features`` channels of a ``dims``-D layer (1 = dense, 2 = conv).

    ``momentum`` follows torch's convention: running <- (1 - momentum) * running + momentum * batch.
    """
    if kind is None or kind == "none":
        return None
    if kind == "batchnorm":
        cls = nn.BatchNorm1d if dims == 1 else nn.BatchNorm2d
        return cls(features, eps=eps, momentum=momentum)
    if kind == "layer_norm":
        # Over all features of a sample; for conv maps this is GroupNorm with a single group.
        return nn.LayerNorm(features, eps=eps) if dims == 1 else nn.GroupNorm(1, features, eps=eps)
    if kind == "group_norm":
        if features % groups:
            raise ConfigError("regularizer.group_norm.groups", groups, f"a divisor of every normalised layer's width ({features})")
        return nn.GroupNorm(groups, features, eps=eps)
    raise ValueError(f"unknown norm {kind!r}")


def _rates(rate: Rates, n: int, key: str) -> list[float]:
    rates = [float(rate)] * n if isinstance(rate, (int, float)) else [float(r) for r in rate]
    if len(rates) != n:
        raise ConfigError(key, list(rates), f"one rate or a list of {n} rates (one per layer)")
    for r in rates:
        if not 0 <= r < 1:
            raise ConfigError(key, r, "a rate in [0, 1)")
    return rates


KERAS_TRUNCATION = 0.87962566103423978  # std of a unit normal truncated at ±2 (keras VarianceScaling)


def init_weights(model: nn.Module, scheme: str, activation: str = "relu", negative_slope: float = 0.01,
                 bias_init: Optional[str] = None) -> None:
    """Re-initialise dense and conv kernels with ``scheme`` ('default' keeps torch's) and biases with ``bias_init``.

    ``bias_init``: zeros (Keras' default) | torch (uniform ±1/√fan_in, torch's own rule) | None = torch's when
    ``scheme`` is 'default', zeros otherwise (what regbench did before the key existed).
    """
    if bias_init is None:
        bias_init = "torch" if scheme == "default" else "zeros"
    if scheme == "default" and bias_init == "torch":
        return  # the layers' constructors already drew torch's init
    nonlinearity = activation if activation in ("relu", "leaky_relu", "tanh", "sigmoid") else "relu"
    for m in model.modules():
        if not isinstance(m, (nn.Linear, nn.Conv2d)):
            continue
        w = m.weight
        if scheme in ("xavier_uniform", "glorot_uniform"):  # Keras' glorot_uniform: limit √(6/(fan_in+fan_out))
            nn.init.xavier_uniform_(w)
        elif scheme == "xavier_normal":
            nn.init.xavier_normal_(w)
        elif scheme == "kaiming_uniform":
            nn.init.kaiming_uniform_(w, a=negative_slope, nonlinearity=nonlinearity)
        elif scheme == "kaiming_normal":
            nn.init.kaiming_normal_(w, a=negative_slope, nonlinearity=nonlinearity)
        elif scheme == "he_normal":  # Keras': normal truncated at ±2σ, σ chosen so the variance is 2/fan_in
            std = math.sqrt(2.0 / nn.init._calculate_fan_in_and_fan_out(w)[0]) / KERAS_TRUNCATION
            nn.init.trunc_normal_(w, 0.0, std, -2 * std, 2 * std)
        elif scheme != "default":
            raise ConfigError("model.init", scheme, "default, xavier_uniform, xavier_normal, kaiming_uniform, "
                              "kaiming_normal, glorot_uniform or he_normal")
        if m.bias is None:
            continue
        if bias_init == "zeros":
            nn.init.zeros_(m.bias)
        elif scheme != "default":  # torch's rule for a re-drawn kernel: uniform ±1/√fan_in
            bound = 1.0 / math.sqrt(nn.init._calculate_fan_in_and_fan_out(w)[0])
            nn.init.uniform_(m.bias, -bound, bound)


class MLP(nn.Module):
    """Flatten -> [Linear -> (norm) -> activation -> (dropout)] per hidden layer -> Linear head.

    ``dropout_placement='before_activation'`` puts dropout between the norm and the activation instead.
    """

    def __init__(self, in_features: int, num_classes: int, hidden: Sequence[int], activation: str = "relu",
                 negative_slope: float = 0.01, init: str = "default", bias_init: Optional[str] = None,
                 dropout: Rates = 0.0,
                 dropout_placement: str = "after_activation", norm: Optional[str] = None,
                 norm_momentum: float = 0.1, norm_eps: float = 1e-5, norm_groups: int = 8):
        super().__init__()
        rates = _rates(dropout, len(hidden), "regularizer.dropout.rate")
        self.flatten = nn.Flatten()
        blocks = []
        width = in_features
        for h, p in zip(hidden, rates):
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


class LectureCNN(nn.Module):
    """The lectures' CIFAR-10 network.

    Blocks of ``convs_per_block`` 3x3 'same' convs with bias (-> norm) -> activation (-> Dropout2d), each block
    followed by 2x2 pooling; global pooling; Dense(dense) -> activation (-> dropout) -> Dense(classes).
    With the defaults on 32x32x3 input: 295,914 parameters (296,810 with BatchNorm after every conv).
    """

    def __init__(self, in_channels: int, image_size: int, num_classes: int, widths: Sequence[int] = (32, 64, 128),
                 convs_per_block: int = 2, dense: int = 64, pooling: str = "max", global_pool: str = "max",
                 activation: str = "relu", negative_slope: float = 0.01, init: str = "default",
                 bias_init: Optional[str] = None, norm: Optional[str] = None, norm_momentum: float = 0.1, norm_eps: float = 1e-5,
                 norm_groups: int = 8, spatial_dropout: Rates = 0.0, head_dropout: Rates = 0.0,
                 dropout_placement: str = "after_activation"):
        super().__init__()
        if pooling != "none" and image_size >> len(widths) < 1:
            raise ConfigError("model.widths", list(widths), f"at most {image_size.bit_length() - 1} pooled blocks "
                              f"for {image_size}x{image_size} images", "use fewer widths or model.pooling=none")
        rates = _rates(spatial_dropout, len(widths), "regularizer.dropout.spatial")
        blocks = []
        c = in_channels
        for w, p in zip(widths, rates):
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
            if pooling == "max":
                block.add_module("pool", nn.MaxPool2d(2))
            elif pooling == "avg":
                block.add_module("pool", nn.AvgPool2d(2))
            blocks.append(block)
        self.features = nn.Sequential(*blocks)
        self.global_pool = nn.AdaptiveMaxPool2d(1) if global_pool == "max" else nn.AdaptiveAvgPool2d(1)
        head = nn.Sequential()
        head.add_module("flatten", nn.Flatten())
        head.add_module("dense", nn.Linear(c, dense))
        p = _rates(head_dropout, 1, "regularizer.dropout.rate")[0]
        if p > 0 and dropout_placement == "before_activation":
            head.add_module("dropout", nn.Dropout(p))
        head.add_module("act", make_activation(activation, negative_slope))
        if p > 0 and dropout_placement == "after_activation":
            head.add_module("dropout", nn.Dropout(p))
        head.add_module("out", nn.Linear(dense, num_classes))
        self.head = head
        init_weights(self, init, activation, negative_slope, bias_init)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.global_pool(self.features(x)))


def build_model(cfg: DictConfig, input_shape: Sequence[int], num_classes: int, **hooks) -> nn.Module:
    """Model named by ``cfg.name`` for inputs of ``input_shape`` (C, H, W); ``hooks`` come from regularizers."""
    c, h, w = input_shape
    if cfg.name == "mlp":
        return MLP(c * h * w, num_classes, list(cfg.hidden), cfg.activation, cfg.negative_slope, cfg.init,
                   cfg.bias_init, **hooks)
    if cfg.name == "lecture_cnn":
        return LectureCNN(c, min(h, w), num_classes, list(cfg.widths), cfg.convs_per_block, cfg.dense, cfg.pooling,
                          cfg.global_pool, cfg.activation, cfg.negative_slope, cfg.init, cfg.bias_init, **hooks)
    if cfg.name == "torchvision":
        from regbench.backbones import build

        return build(cfg, input_shape, num_classes, **hooks)
    raise ConfigError("model.name", cfg.name, "mlp, lecture_cnn or torchvision")


def count_parameters(model: nn.Module) -> dict[str, int]:
    """Trainable and frozen parameter counts, and running-statistic buffer values (BN means/variances).

    Integer buffers such as BatchNorm's ``num_batches_tracked`` are not counted (Keras has none).
    """
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    frozen = sum(p.numel() for p in model.parameters() if not p.requires_grad)
    buffers = sum(b.numel() for b in model.buffers() if b.is_floating_point())
    return {"trainable": trainable, "frozen": frozen, "buffers": buffers, "total": trainable + frozen + buffers}
