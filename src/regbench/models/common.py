"""Layers and rules the model families share: activations, normalisation layers, weight init, drop-path, and
the range checks of the keys several families have (activation, init, bias_init, negative_slope).
"""

from __future__ import annotations

import math
from typing import Any, Optional, Sequence, Union

import torch
from torch import nn

from regbench.errors import ConfigError, choice
from regbench.errors import check as expect

Rates = Union[float, Sequence[float]]

ACTIVATIONS = ("relu", "leaky_relu", "elu", "sigmoid", "tanh")
INITS = ("default", "xavier_uniform", "xavier_normal", "kaiming_uniform", "kaiming_normal", "glorot_uniform",
         "he_normal")
BIAS_INITS = ("zeros", "torch")
KERAS_TRUNCATION = 0.87962566103423978  # std of a unit normal truncated at ±2 (keras VarianceScaling)


def expect_choice(node: Any, key: str, choices: tuple[str, ...]) -> None:
    """``node``'s value of the last part of ``key`` is one of ``choices``."""
    choice(node[key.rsplit(".", 1)[-1]], key, choices)


def check_init(m: Any) -> None:
    """model.init and model.bias_init (every family that draws its own weights has them)."""
    expect_choice(m, "model.init", INITS)
    expect(m.bias_init is None or m.bias_init in BIAS_INITS, "model.bias_init", m.bias_init,
           "zeros, torch or null (torch's with model.init=default, zeros otherwise)")


def check_activation(m: Any) -> None:
    """model.activation and model.negative_slope (the latter only means something for leaky_relu)."""
    expect_choice(m, "model.activation", ACTIVATIONS)
    expect(m.negative_slope >= 0, "model.negative_slope", m.negative_slope, "a number >= 0")
    expect(m.activation == "leaky_relu" or m.negative_slope == 0.01, "model.negative_slope", m.negative_slope,
           "to be left alone unless model.activation=leaky_relu (it is only used there)",
           "add model.activation=leaky_relu")


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


def norm_kwargs(norm: Any) -> dict[str, Any]:
    """A :class:`~regbench.models.slots.NormSpec` (or None) as the ``norm*`` keyword arguments of the MLP and CNN."""
    if norm is None:
        return {"norm": None}
    return {"norm": norm.kind, "norm_momentum": norm.momentum, "norm_eps": norm.eps, "norm_groups": norm.groups}


def rates(rate: Rates, n: int, key: str) -> list[float]:
    """``rate`` as one rate per layer (a number is repeated ``n`` times); ConfigError naming ``key`` otherwise."""
    out = [float(rate)] * n if isinstance(rate, (int, float)) else [float(r) for r in rate]
    if len(out) != n:
        raise ConfigError(key, list(out), f"one rate or a list of {n} rates (one per layer)")
    for r in out:
        if not 0 <= r < 1:
            raise ConfigError(key, r, "a rate in [0, 1)")
    return out


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
        _init_kernel(m.weight, scheme, negative_slope, nonlinearity)
        if m.bias is None:
            continue
        if bias_init == "zeros":
            nn.init.zeros_(m.bias)
        elif scheme != "default":  # torch's rule for a re-drawn kernel: uniform ±1/√fan_in
            bound = 1.0 / math.sqrt(nn.init._calculate_fan_in_and_fan_out(m.weight)[0])
            nn.init.uniform_(m.bias, -bound, bound)


def _init_kernel(w: torch.Tensor, scheme: str, negative_slope: float, nonlinearity: str) -> None:
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


def dropout_mask(shape: tuple[int, ...], p: float, device: torch.device,
                 dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """An inverted-dropout mask drawn from the global RNG exactly as torch's dropout draws it on a CPU and a GPU
    (``empty(shape).bernoulli_(1 − p)``, divided by 1 − p): the direct step (regbench.faststep) and the stacked
    model's per-member noise (regbench.stacked.model) draw through here, so the RNG stream advances as a run's own
    ``nn.Dropout`` layers advance it. (Dropout2d's shape: one value per sample and channel.)"""
    return torch.empty(shape, device=device, dtype=dtype).bernoulli_(1 - p).div_(1 - p)


class DropPath(nn.Module):
    """Drop a residual branch for a whole sample with probability ``p`` in training, scaling the kept branches
    by 1/(1−p) (inverted, like timm's DropPath), so evaluation is the identity with no rescaling."""

    # Read by regbench.stacked.model, which refuses a layer saying why it cannot be stacked.
    stack_refusal = "it draws one mask per sample inside its forward pass, from the global RNG"

    def __init__(self, p: float):
        super().__init__()
        self.p = p

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.training or self.p == 0:
            return x
        keep = 1.0 - self.p
        mask = x.new_empty((x.shape[0],) + (1,) * (x.ndim - 1)).bernoulli_(keep)
        return x * mask.div_(keep)

    def extra_repr(self) -> str:
        return f"p={self.p}"
