"""ResNets for CIFAR (He et al. 2016, §4.2): depth 6n+2, three stages of n basic blocks with 16, 32, 64 channels
(the first block of stages 2 and 3 halves the map with stride 2), global average pooling, Dense(classes).

Shortcuts are the paper's CIFAR option A: identity, with the map subsampled and the extra channels zero-padded
where a stage widens (no parameters, so ResNet-20 has 269,722 parameters on CIFAR-10; the paper's 0.27 M).
``preact=true`` uses the pre-activation blocks of He et al. 2016b (norm -> ReLU -> conv, twice; nothing after
the addition; a final norm -> ReLU before pooling). Convs have no bias where a norm follows them.

Slots: the normalisation (the model's own BatchNorm, or the stack's batchnorm/group_norm/layer_norm member),
dropout (one rate, between the pooling and the head), drop-path on every residual branch (stochastic depth),
Keras' GaussianNoise (on the input image, or where dropout goes) and GaussianDropout (where dropout goes), and
DropBlock in every block of the last two stages (the 16x16 and 8x8 maps on 32x32 input; timm's ResNet puts it in its
last two stages), after the first conv's norm, before its ReLU, as timm's BasicBlock. Spatial dropout, dropout
before the activation and AlphaDropout (a ReLU network: no SELU) have no place here and are refused.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Optional, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from regbench.errors import ConfigError
from regbench.models.common import DropBlock2d, DropPath, check_drop_block_places, check_init, expect, \
    expect_choice, init_weights, make_gaussian_noise, make_norm, noise_dropouts
from regbench.models.slots import DropBlockSpec, LayerSlots, NormSpec, drop_path_rates, refuse_unapplied
from regbench.registry import MODELS

WIDTHS = (16, 32, 64)
DROP_BLOCK_STAGES = 2  # DropBlock in the last two stages, as timm's ResNet (timm/models/resnet.py drop_blocks)


@dataclass
class ResNetConfig:
    name: str = "resnet"
    depth: int = 20  # 6n+2: 20, 32, 44, 56, 110 (n basic blocks per stage)
    preact: bool = False  # pre-activation blocks (He et al. 2016b) instead of the original ones
    norm: str = "batchnorm"  # the model's own normalisation when no norm member is in the stack: batchnorm | none
    init: str = "kaiming_normal"  # the paper's He init for conv and dense kernels; default = torch's
    bias_init: Optional[str] = None  # the head's bias (the convs have none): zeros | torch; null as the other models


def check(m: Any, cfg: Any) -> None:
    expect(m.depth >= 8 and (m.depth - 2) % 6 == 0, "model.depth", m.depth, "6n+2 with n >= 1: 8, 14, 20, 32, "
           "44, 56, 110, ... (the paper's CIFAR ResNets)")
    expect_choice(m, "model.norm", ("batchnorm", "none"))
    check_init(m)


def _shortcut_a(x: torch.Tensor, out_channels: int, stride: int) -> torch.Tensor:
    """Option A: the identity, subsampled by ``stride``, zero-padded to ``out_channels`` (new channels last)."""
    if stride > 1:
        x = x[:, :, ::stride, ::stride]
    if out_channels > x.shape[1]:
        x = F.pad(x, (0, 0, 0, 0, 0, out_channels - x.shape[1]))
    return x


def _conv(cin: int, cout: int, stride: int, norm: Optional[NormSpec]) -> nn.Conv2d:
    return nn.Conv2d(cin, cout, 3, stride=stride, padding=1, bias=norm is None)


def _norm(norm: Optional[NormSpec], channels: int) -> nn.Module:
    if norm is None:
        return nn.Identity()
    return make_norm(norm.kind, channels, 2, norm.momentum, norm.eps, norm.groups)


class BasicBlock(nn.Module):
    """conv -> norm -> ReLU -> conv -> norm, plus the shortcut, then ReLU (original); or norm -> ReLU -> conv,
    twice, plus the shortcut (pre-activation). ``drop_path`` drops the residual branch per sample; ``drop_block``
    (a DropBlock2d or None) acts on the first conv's normalised output, before its ReLU (timm's BasicBlock: conv1 ->
    bn1 -> drop_block -> act1; in a pre-activation block: conv1 -> norm2 -> drop_block -> ReLU -> conv2)."""

    def __init__(self, cin: int, cout: int, stride: int, norm: Optional[NormSpec], preact: bool, drop_path: float,
                 drop_block: Optional[nn.Module] = None):
        super().__init__()
        self.preact, self.stride, self.out_channels = preact, stride, cout
        self.norm1 = _norm(norm, cin if preact else cout)
        self.conv1 = _conv(cin, cout, stride, norm)
        self.norm2 = _norm(norm, cout)
        self.conv2 = _conv(cout, cout, 1, norm)
        self.drop_path = DropPath(drop_path) if drop_path > 0 else nn.Identity()
        self.drop_block = drop_block  # None: no module

    def _drop_block(self, x: torch.Tensor) -> torch.Tensor:
        return x if self.drop_block is None else self.drop_block(x)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        shortcut = _shortcut_a(x, self.out_channels, self.stride)
        if self.preact:
            out = self.conv1(F.relu(self.norm1(x)))
            out = self.conv2(F.relu(self._drop_block(self.norm2(out))))
            return shortcut + self.drop_path(out)
        out = F.relu(self._drop_block(self.norm1(self.conv1(x))))
        out = self.norm2(self.conv2(out))
        return F.relu(shortcut + self.drop_path(out))


@MODELS.register("resnet", schema=ResNetConfig, check=check)
class ResNet(nn.Module):
    """``features`` (stem, three stages, and for pre-activation the final norm -> ReLU), pooling, ``head``."""

    def __init__(self, in_channels: int, num_classes: int, depth: int = 20, preact: bool = False,
                 norm: Optional[NormSpec] = NormSpec("batchnorm"), init: str = "kaiming_normal",
                 bias_init: Optional[str] = None, dropout: float = 0.0, drop_path: Sequence[float] = (),
                 gaussian_noise: float = 0.0, noise_placement: str = "input", gaussian_dropout: float = 0.0,
                 drop_block: Optional[DropBlockSpec] = None):
        super().__init__()
        n = (depth - 2) // 6
        drop_path = list(drop_path) or [0.0] * (3 * n)
        first_db = len(WIDTHS) - DROP_BLOCK_STAGES
        db = drop_block.per_place(DROP_BLOCK_STAGES) if drop_block is not None and drop_block.rate > 0 else []
        self.input_noise = make_gaussian_noise(gaussian_noise, noise_placement, "input")  # None: no module
        stem = nn.Sequential(_conv(in_channels, WIDTHS[0], 1, norm))
        if not preact:  # a pre-activation block starts with its own norm -> ReLU
            stem.append(_norm(norm, WIDTHS[0]))
            stem.append(nn.ReLU())
        stages, cin = [stem], WIDTHS[0]
        for s, width in enumerate(WIDTHS):
            blocks = [BasicBlock(cin if b == 0 else width, width, 2 if s > 0 and b == 0 else 1, norm, preact,
                                 drop_path[s * n + b],
                                 DropBlock2d(drop_block.rate, *db[s - first_db]) if db and s >= first_db else None)
                      for b in range(n)]
            stages.append(nn.Sequential(*blocks))
            cin = width
        if preact:
            stages.append(nn.Sequential(_norm(norm, cin), nn.ReLU()))
        self.features = nn.Sequential(*stages)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.head = nn.Sequential()
        self.head.add_module("0", nn.Flatten())
        noise = make_gaussian_noise(gaussian_noise, noise_placement, "hidden")
        if noise is not None:
            self.head.add_module("noise", noise)
        if dropout > 0:
            self.head.add_module(str(len(self.head)), nn.Dropout(dropout))
        for name, layer in noise_dropouts(gaussian_dropout, 0.0):
            self.head.add_module(name, layer)
        self.head.add_module(str(len(self.head)), nn.Linear(cin, num_classes))
        init_weights(self, init, "relu", 0.01, bias_init)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.input_noise is not None:
            x = self.input_noise(x)
        return self.head(self.pool(self.features(x)))

    @staticmethod
    def check_slots(m: Any, slots: LayerSlots) -> None:
        """Refuse what a ResNet has no place for (before anything is built)."""
        refuse_unapplied(slots, "resnet", {"dropout", "norm", "drop_path", "drop_path_rule", "gaussian_noise",
                                           "gaussian_noise_placement", "gaussian_dropout", "drop_block"},
                         why={"dropout_placement": "its dropout sits between the pooling and the head, after the last "
                                                   "activation",
                              "alpha_dropout": "its activations are ReLUs; alpha dropout is for SELU networks"})
        if slots.drop_block is not None:
            check_drop_block_places(slots, DROP_BLOCK_STAGES, "residual stage it is in: the last two")
        if len(slots.rate_list()) > 1:
            raise ConfigError(slots.key("dropout"), slots.rate_list(), "one rate for the ResNet's single dropout "
                              "(between the pooling and the head)")
        if slots.norm is not None and m.norm != "batchnorm":
            raise ConfigError("model.norm", m.norm, f"to be left alone (batchnorm) with {slots.member('norm')} in the "
                              f"stack (the member sets the ResNet's normalisation)",
                              f"drop model.norm or drop {slots.member('norm')} from the stack")
        if slots.norm is not None and slots.norm.kind == "group_norm" and WIDTHS[0] % slots.norm.groups:
            raise ConfigError(f"{slots.key('norm')}.groups", slots.norm.groups, f"a divisor of {WIDTHS[0]} (the "
                              "ResNet's narrowest stage)")

    @classmethod
    def from_config(cls, m: Any, input_shape: Sequence[int], num_classes: int, slots: LayerSlots) -> "ResNet":
        norm = slots.norm if slots.norm is not None else (NormSpec("batchnorm") if m.norm == "batchnorm" else None)
        rates = slots.rate_list()
        blocks = 3 * ((m.depth - 2) // 6)
        return cls(input_shape[0], num_classes, m.depth, m.preact, norm, m.init, m.bias_init,
                   dropout=rates[0] if rates else 0.0, drop_path=drop_path_rates(slots, blocks),
                   gaussian_noise=slots.gaussian_noise, noise_placement=slots.gaussian_noise_placement,
                   gaussian_dropout=slots.gaussian_dropout, drop_block=slots.drop_block)

    @staticmethod
    def weight_layers(m: Any) -> int:
        """Conv and dense layers (what transfer's freeze_layers counts): depth = 6n+1 convs + the head."""
        return m.depth
