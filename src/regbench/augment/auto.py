"""RandAugment and TrivialAugment: torchvision's op tables and magnitude bins, batched with one op per image."""

from __future__ import annotations

import functools
from dataclasses import dataclass
from typing import Optional

import torch
from torchvision.transforms.v2 import functional as TF

from regbench.augment.functional import (Batch, _chosen, _where, adjust_brightness, adjust_contrast,
                                         adjust_saturation, adjust_sharpness, inverse_affine, posterize, solarize,
                                         warp)
from regbench.augment.ops import Op, op
from regbench.errors import ConfigError

@functools.lru_cache(maxsize=32)
def _augmentation_space(kind: str, bins: int, h: int, w: int,
                        device: Optional[torch.device] = None) -> dict[str, tuple[torch.Tensor, bool]]:
    """{op: (magnitude of each bin, signed)} — torchvision's RandAugment / TrivialAugmentWide tables, which
    differ only in their ranges (the tests compare them with torchvision's own); made once per device."""
    if device is not None:
        return {k: (v.to(device), signed) for k, (v, signed) in _augmentation_space(kind, bins, h, w).items()}
    if kind == "randaugment":
        shear, tx, ty, rotate, colour, posterize_steps = 0.3, 150.0 / 331.0 * w, 150.0 / 331.0 * h, 30.0, 0.9, 4
    else:  # trivialaugment (wide)
        shear, tx, ty, rotate, colour, posterize_steps = 0.99, 32.0, 32.0, 135.0, 0.99, 6

    def up_to(top: float) -> torch.Tensor:
        return torch.linspace(0.0, top, bins)

    none = torch.tensor(0.0)
    return {
        "Identity": (none, False),
        "ShearX": (up_to(shear), True),
        "ShearY": (up_to(shear), True),
        "TranslateX": (up_to(tx), True),
        "TranslateY": (up_to(ty), True),
        "Rotate": (up_to(rotate), True),
        "Brightness": (up_to(colour), True),
        "Color": (up_to(colour), True),
        "Contrast": (up_to(colour), True),
        "Sharpness": (up_to(colour), True),
        "Posterize": (8 - (torch.arange(bins) / ((bins - 1) / posterize_steps)).round().int(), False),
        "Solarize": (torch.linspace(1.0, 0.0, bins), False),
        "AutoContrast": (none, False),
        "Equalize": (none, False),
    }


GEOMETRIC = ("ShearX", "ShearY", "TranslateX", "TranslateY", "Rotate")


def geometric_ops(x: Batch, kind: torch.Tensor, magnitude: torch.Tensor, mode: str = "nearest") -> Batch:
    """torchvision's geometric ops of RandAugment / TrivialAugment / AugMix, each image its own: ``kind`` (per
    image) is the index of its op in GEOMETRIC, ``magnitude`` its magnitude. All of them are affine maps, so one
    warp does the whole batch (``mode``: nearest, RandAugment's default, or bilinear, AugMix's; fill 0) — one
    grid_sample instead of one per op; the matrices are exactly those of the ops one at a time."""
    h, w = x.shape[-2:]
    m = magnitude.to(x.device, torch.float32)
    zero, one = torch.zeros_like(m), torch.ones_like(m)
    shear_x, shear_y, translate_x, translate_y, rotate = (kind == i for i in range(len(GEOMETRIC)))
    deg = torch.rad2deg(torch.atan(m))  # shear about the top-left corner, as torchvision's center=[0, 0]
    t = m.trunc()  # int(magnitude) in torchvision
    sheared = shear_x | shear_y
    theta = inverse_affine(torch.where(rotate, -m, zero),  # torchvision's rotate(angle) is affine(-angle)
                           torch.where(translate_x, t, zero), torch.where(translate_y, t, zero), one, one,
                           torch.where(shear_x, deg, zero), torch.where(shear_y, deg, zero),
                           cx=torch.where(sheared, -w * 0.5, 0.0).double(),
                           cy=torch.where(sheared, -h * 0.5, 0.0).double())
    return warp(x, theta, mode, "zero")


@functools.lru_cache(maxsize=16)
def _geometric_table(kind: str, bins: int, h: int, w: int, device: torch.device) -> torch.Tensor:
    """The magnitude bins of the GEOMETRIC ops, one row each (5 x bins), on ``device``."""
    space = _augmentation_space(kind, bins, h, w)
    names = list(space)
    first = names.index(GEOMETRIC[0])
    assert names[first:first + len(GEOMETRIC)] == list(GEOMETRIC)  # _round relies on their order
    return torch.stack([space[g][0].float() for g in GEOMETRIC]).to(device)


def apply_named_op(x: Batch, name: str, magnitude: torch.Tensor) -> Batch:
    """torchvision's ``_apply_op`` for a batch, with one magnitude per image (interpolation nearest, fill 0)."""
    m = magnitude.to(x.device, torch.float32)
    if name == "Identity":
        return x
    if name in GEOMETRIC:
        return geometric_ops(x, torch.full((len(x),), GEOMETRIC.index(name), device=x.device), m)
    if name == "Brightness":
        return adjust_brightness(x, 1.0 + m)
    if name == "Color":
        return adjust_saturation(x, 1.0 + m)
    if name == "Contrast":
        return adjust_contrast(x, 1.0 + m)
    if name == "Sharpness":
        return adjust_sharpness(x, 1.0 + m)
    if name == "Posterize":
        return posterize(x, m.int().float())
    if name == "Solarize":
        return solarize(x, m)
    if name == "AutoContrast":
        return TF.autocontrast(x)
    if name == "Equalize":
        return TF.equalize(x)
    raise ValueError(name)


def group_by_op(device: torch.device) -> bool:
    """RandAugment / TrivialAugment strategy: gather each op's images (CPU) or run every op on the whole batch
    and select (CUDA: no data-dependent shapes, no host sync)."""
    return device.type == "cpu"


@dataclass
class _AutoAugment(Op):
    bins: int = 31
    p: float = 1.0
    kind = "randaugment"

    def check(self, key, info):
        if self.bins < 2:
            raise ConfigError(f"{key}.bins", self.bins, "an integer >= 2")

    def _round(self, x: Batch, magnitude_bin: Optional[int], grouped: Optional[bool] = None) -> Batch:
        """One op per image (uniform over the op list), each image its own sign (and for TrivialAugment its
        own magnitude bin). ``grouped`` (default on CPU): the images of each op are gathered and transformed
        together. Otherwise (default on CUDA) every op runs on the whole batch and each image keeps its own
        op's result: more arithmetic, but no data-dependent shapes, so no host sync per step. Both give the
        same images (tested)."""
        n, _, h, w = x.shape
        space = _augmentation_space(self.kind, self.bins, h, w, x.device)
        names = list(space)
        which = torch.randint(0, len(names), (n,), device=x.device)
        which = torch.where(_chosen(n, self.p, x.device), which, torch.zeros_like(which))  # 0 = Identity
        if magnitude_bin is None:  # TrivialAugment: a magnitude bin per image
            bins = torch.randint(0, self.bins, (n,), device=x.device)
        else:
            bins = torch.full((n,), magnitude_bin, device=x.device)
        sign = torch.where(torch.rand(n, device=x.device) < 0.5, -1.0, 1.0)
        grouped = group_by_op(x.device) if grouped is None else grouped
        out = x.clone() if grouped else x
        for i, name in enumerate(names):
            if name == "Identity" or name in GEOMETRIC:
                continue
            mags, signed = space[name]
            if grouped:
                idx = torch.nonzero(which == i).squeeze(1)
                if idx.numel() == 0:
                    continue
                m = mags[bins[idx]].float() if mags.ndim else torch.zeros(len(idx), device=x.device)
                out[idx] = apply_named_op(x[idx], name, m * sign[idx] if signed else m)
            else:
                m = mags[bins].float() if mags.ndim else torch.zeros(n, device=x.device)
                out = _where(which == i, apply_named_op(x, name, m * sign if signed else m), out)
        # The five geometric ops (all signed) in one warp: each image's kind and magnitude from a 5 x bins table.
        first = names.index(GEOMETRIC[0])
        kind = which - first
        geometric = (kind >= 0) & (kind < len(GEOMETRIC))
        table = _geometric_table(self.kind, self.bins, h, w, x.device)
        if grouped:
            idx = torch.nonzero(geometric).squeeze(1)
            if idx.numel():
                k = kind[idx]
                out[idx] = geometric_ops(x[idx], k, table[k, bins[idx]] * sign[idx])
        else:
            k = kind.clamp(0, len(GEOMETRIC) - 1)
            out = _where(geometric, geometric_ops(x, k, table[k, bins] * sign), out)
        return out


@op("randaugment")
@dataclass
class RandAugment(_AutoAugment):
    """torchvision's RandAugment: ``num_ops`` rounds, each image its own op, fixed magnitude bin."""

    num_ops: int = 2
    magnitude: int = 9  # bin index in [0, bins)
    kind = "randaugment"

    def check(self, key, info):
        super().check(key, info)
        if self.num_ops < 1 or not 0 <= self.magnitude < self.bins:
            raise ConfigError(key, {"num_ops": self.num_ops, "magnitude": self.magnitude, "bins": self.bins},
                              "num_ops >= 1 and 0 <= magnitude < bins")

    def __call__(self, x):
        for _ in range(self.num_ops):
            x = self._round(x, self.magnitude)
        return x


@op("trivialaugment")
@dataclass
class TrivialAugment(_AutoAugment):
    """torchvision's TrivialAugmentWide: one op per image, magnitude bin uniform per image."""

    kind = "trivialaugment"

    def __call__(self, x):
        return self._round(x, None)
