"""Layers and rules the model families share: activations, normalisation layers, weight init, drop-path, Keras'
noise layers (GaussianNoise, GaussianDropout; AlphaDropout is torch's own), DropBlock, and the range checks of the
keys several families have (activation, init, bias_init, negative_slope).
"""

from __future__ import annotations

import math
from typing import Any, Optional, Sequence, Union

import torch
import torch.nn.functional as F
from torch import nn

from regbench.errors import ConfigError, choice
from regbench.errors import check as expect

Rates = Union[float, Sequence[float]]

ACTIVATIONS = ("relu", "leaky_relu", "elu", "sigmoid", "tanh", "selu")
INITS = ("default", "xavier_uniform", "xavier_normal", "kaiming_uniform", "kaiming_normal", "glorot_uniform",
         "he_normal", "lecun_normal")
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
    if name == "selu":  # Klambauer et al. 2017: λ·(x if x > 0 else α(eˣ − 1)); with lecun_normal, self-normalising
        return nn.SELU()
    raise ConfigError("model.activation", name, f"one of {', '.join(ACTIVATIONS)}")


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
    elif scheme in ("he_normal", "lecun_normal"):
        # Keras 3 (keras/src/initializers/random_initializers.py): HeNormal / LecunNormal are VarianceScaling(scale=2
        # / 1, mode="fan_in", distribution="truncated_normal"): a normal truncated at ±2σ with
        # σ = √(scale/fan_in) / 0.8796…, so that the truncated draw has variance scale/fan_in.
        scale = 2.0 if scheme == "he_normal" else 1.0
        std = math.sqrt(scale / nn.init._calculate_fan_in_and_fan_out(w)[0]) / KERAS_TRUNCATION
        nn.init.trunc_normal_(w, 0.0, std, -2 * std, 2 * std)
    elif scheme != "default":
        raise ConfigError("model.init", scheme, ", ".join(INITS))


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


class GaussianNoise(nn.Module):
    """Keras' GaussianNoise(stddev) (keras/src/layers/regularization/gaussian_noise.py, ``call``): in training,
    ``x + N(0, stddev²)`` drawn afresh for every element (from the global RNG); evaluation is the identity."""

    stack_refusal = "it draws Gaussian noise inside its forward pass, from the global RNG"

    def __init__(self, stddev: float):
        super().__init__()
        self.stddev = stddev

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.training or self.stddev == 0:
            return x
        return x + torch.randn_like(x).mul_(self.stddev)

    def extra_repr(self) -> str:
        return f"stddev={self.stddev}"


class GaussianDropout(nn.Module):
    """Keras' GaussianDropout(rate) (keras/src/layers/regularization/gaussian_dropout.py, ``call``): in training,
    ``x · N(1, σ²)`` with σ = √(rate/(1 − rate)) (the variance of inverted dropout's mask of the same rate), drawn
    for every element; evaluation is the identity."""

    stack_refusal = "it draws Gaussian noise inside its forward pass, from the global RNG"

    def __init__(self, rate: float):
        super().__init__()
        self.rate = rate

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.training or self.rate == 0:
            return x
        stddev = math.sqrt(self.rate / (1.0 - self.rate))
        return x * torch.randn_like(x).mul_(stddev).add_(1.0)

    def extra_repr(self) -> str:
        return f"rate={self.rate}"


def drop_block_gamma(drop_prob: float, block_size: int, h: int, w: int, gamma_scale: float = 1.0) -> float:
    """DropBlock's seed probability γ on an h×w map, as timm 1.0.31 computes it (the block clipped to the map)."""
    kh, kw = min(block_size, h), min(block_size, w)
    return float(gamma_scale * drop_prob * h * w) / float(kh * kw) / float((h - kh + 1) * (w - kw + 1))


def drop_block_2d(x: torch.Tensor, drop_prob: float, block_size: int, gamma_scale: float = 1.0) -> torch.Tensor:
    """timm's ``drop_block_2d`` (timm/layers/drop.py, timm 1.0.31; its defaults with_noise=False,
    couple_channels=True, scale_by_keep=True): block centres are drawn with probability
    γ = gamma_scale·p·H·W / (kh·kw) / ((H − kh + 1)(W − kw + 1)), kh = min(block_size, H) (the block clipped to the
    map), one mask per sample shared by its channels; each centre drops the kh×kw block around it (max pooling,
    blocks cut at the border); the kept values are scaled by count/kept = numel/(Σ keep + 1e-7) over the batch."""
    _, _, h, w = x.shape
    kh, kw = min(block_size, h), min(block_size, w)
    gamma = drop_block_gamma(drop_prob, block_size, h, w, gamma_scale)
    with torch.no_grad():
        block = torch.empty((x.shape[0], 1, h, w), dtype=x.dtype, device=x.device).bernoulli_(gamma)
        block = F.max_pool2d(block, kernel_size=(kh, kw), stride=1, padding=(kh // 2, kw // 2))
        if kh % 2 == 0 or kw % 2 == 0:  # an even kernel's pooling is one larger: timm keeps the last H×W
            block = block[..., (kh + 1) % 2:, (kw + 1) % 2:]
        keep = 1.0 - block
        keep.mul_((keep.numel() / keep.to(torch.float32).sum().add(1e-7)).to(x.dtype))
    return x * keep


class DropBlock2d(nn.Module):
    """timm's DropBlock2d (Ghiasi et al. 2018): :func:`drop_block_2d` in training, the identity in evaluation.
    ``drop_prob`` may change between epochs (regularizer dropblock's linear schedule sets it)."""

    stack_refusal = "it draws its block masks inside its forward pass, from the global RNG"

    def __init__(self, drop_prob: float, block_size: int = 7, gamma_scale: float = 1.0):
        super().__init__()
        self.drop_prob, self.block_size, self.gamma_scale = drop_prob, block_size, gamma_scale

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.training or not self.drop_prob:
            return x
        return drop_block_2d(x, self.drop_prob, self.block_size, self.gamma_scale)

    def extra_repr(self) -> str:
        return f"drop_prob={self.drop_prob}, block_size={self.block_size}, gamma_scale={self.gamma_scale}"


def noise_kwargs(slots: Any) -> dict[str, Any]:
    """The noise slots of a :class:`~regbench.models.slots.LayerSlots` as the keyword arguments of the MLP, the
    lecture CNN and the ResNet (as :func:`norm_kwargs`)."""
    return {"gaussian_noise": slots.gaussian_noise, "noise_placement": slots.gaussian_noise_placement,
            "gaussian_dropout": slots.gaussian_dropout, "alpha_dropout": slots.alpha_dropout}


def make_gaussian_noise(stddev: float, placement: str, here: str) -> Optional[nn.Module]:
    """GaussianNoise(stddev) when its placement is ``here`` (input | hidden) and stddev > 0, else None."""
    return GaussianNoise(stddev) if stddev > 0 and placement == here else None


def noise_dropouts(gaussian_dropout: float, alpha_dropout: float) -> list[tuple[str, nn.Module]]:
    """The dropout-like noise layers for where a family's dropout goes (after an activation, after its dropout), in
    this order, named as in the model: GaussianDropout, then torch's AlphaDropout."""
    layers: list[tuple[str, nn.Module]] = []
    if gaussian_dropout > 0:
        layers.append(("gaussian_dropout", GaussianDropout(gaussian_dropout)))
    if alpha_dropout > 0:
        # torch's AlphaDropout is Keras' AlphaDropout: both keep a unit with probability 1 − p, set a dropped one to
        # α' = −λα (SELU's saturation value) and return a·x + b with a = ((1 − p)(1 + p·α'²))^−½, b = −a·α'·p
        # (keras/src/layers/regularization/alpha_dropout.py ``call``; tests/test_noise_layers.py checks torch's).
        layers.append(("alpha_dropout", nn.AlphaDropout(alpha_dropout)))
    return layers


def check_alpha_dropout(m: Any, slots: Any) -> None:
    """Alpha dropout needs SELU activations: its a, b are derived for SELU's saturation value, to keep the SELU
    network's fixed point (mean 0, variance 1) through the layer (Klambauer et al. 2017, "alpha dropout")."""
    if slots.filled("alpha_dropout") and m.activation != "selu":
        raise ConfigError("model.activation", m.activation, f"selu with {slots.member('alpha_dropout')} in the stack "
                          "(alpha dropout sets dropped units to SELU's saturation value and rescales to keep a SELU "
                          "network's mean 0 and variance 1; with other activations it is neither)",
                          f"add model.activation=selu model.init=lecun_normal, or use dropout instead of "
                          f"{slots.member('alpha_dropout')}")


def check_drop_block_places(slots: Any, places: int, where: str) -> None:
    """A DropBlock slot's per-place lists (block_size, gamma_scale) have one value per place (``where``: what a
    place is in this family, e.g. 'residual stage it is in (the last two)')."""
    base = slots.key("drop_block").rsplit(".", 1)[0]
    for name in ("block_size", "gamma_scale"):
        value = getattr(slots.drop_block, name)
        if isinstance(value, tuple) and len(value) != places:
            raise ConfigError(f"{base}.{name}", list(value), f"one value, or a list of {places} (one per {where})")
