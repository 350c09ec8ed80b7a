"""The op registry and the per-image ops (flips, crop, affine, colour, noise, cutout).

An op is a dataclass whose fields are its config keys, registered under its config name with ``@op(name)``;
``__call__(x) -> x`` transforms a [0, 1] batch, every image with its own random parameters drawn from torch's
global generator (seeded by the run's seed and saved in checkpoints), so runs and resumes are reproducible.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field, fields
from typing import Any

import torch

from regbench.augment.functional import (Batch, _affine_ranges, _chosen, _const, _u, _where, adjust_brightness,
                                         adjust_contrast, adjust_saturation, box_mask, inverse_affine, random_boxes,
                                         shifted_crop, warp)
from regbench.errors import ConfigError

OPS: dict[str, type] = {}


def op(name: str):
    def register(cls):
        cls.name = name
        OPS[name] = cls
        return cls
    return register


class Op:
    """Per-image op: ``__call__(x) -> x`` on a [0, 1] batch. ``mixes`` ops also change the targets."""

    name: str
    mixes = False
    flips = False  # changes left/right or up/down: not label-safe for digits
    normalised = False  # runs on the normalised images, after normalisation (random_erasing), not on [0, 1] ones

    def check(self, key: str, info) -> None:
        """Raise ConfigError for values out of range (``key`` names the op in the config)."""


@dataclass
class _Flip(Op):
    p: float = 0.5
    flips = True
    dim = -1

    def __call__(self, x: Batch) -> Batch:
        return _where(_chosen(len(x), self.p, x.device), x.flip(self.dim), x)


@op("hflip")
@dataclass
class HFlip(_Flip):
    dim = -1  # mirror left-right


@op("vflip")
@dataclass
class VFlip(_Flip):
    dim = -2  # mirror up-down


@op("crop")
@dataclass
class Crop(Op):
    padding: int = 4  # pixels added on every side before a random H x W crop
    padding_mode: str = "reflect"  # reflect | zero | edge
    p: float = 1.0
    flip_p = 0.0  # set by Policy when it fuses a neighbouring hflip into this crop (not a config key)

    @property
    def flips(self) -> bool:
        return self.flip_p > 0

    def check(self, key, info):
        if self.padding < 1 or self.padding_mode not in ("reflect", "zero", "edge"):
            raise ConfigError(key, {"padding": self.padding, "padding_mode": self.padding_mode},
                              "padding >= 1 and padding_mode reflect, zero or edge")

    def __call__(self, x: Batch) -> Batch:
        n = len(x)
        ox = torch.randint(0, 2 * self.padding + 1, (n,), device=x.device)
        oy = torch.randint(0, 2 * self.padding + 1, (n,), device=x.device)
        keep = ~_chosen(n, self.p, x.device)
        ox = torch.where(keep, torch.full_like(ox, self.padding), ox)
        oy = torch.where(keep, torch.full_like(oy, self.padding), oy)
        flip = _chosen(n, self.flip_p, x.device) if self.flip_p > 0 else None
        return shifted_crop(x, self.padding, self.padding_mode, ox, oy, flip)


@op("affine")
@dataclass
class Affine(Op):
    """Keras ImageDataGenerator's geometry: rotation_range (degrees), width/height_shift_range (fractions of
    the size), zoom_range z (zx, zy drawn independently from [1 − z, 1 + z]), shear_range (degrees)."""

    rotation: float = 0.0  # angle uniform in [−rotation, rotation] degrees
    translate: float = 0.0  # shift uniform in [−translate, translate] × width (and × height)
    zoom: float = 0.0  # zx, zy uniform in [1 − zoom, 1 + zoom], independently
    shear: float = 0.0  # shear angle uniform in [−shear, shear] degrees (along x)
    fill: str = "nearest"  # nearest (Keras' default: repeat the edge) | zero
    interpolation: str = "bilinear"  # bilinear | nearest
    p: float = 1.0

    def check(self, key, info):
        ok = self.rotation >= 0 and 0 <= self.translate < 1 and 0 <= self.zoom < 1 and 0 <= self.shear < 90
        if not ok or self.fill not in ("nearest", "zero") or self.interpolation not in ("bilinear", "nearest"):
            raise ConfigError(key, {f.name: getattr(self, f.name) for f in fields(self)},
                              "rotation >= 0, 0 <= translate < 1, 0 <= zoom < 1, 0 <= shear < 90, fill nearest|zero, "
                              "interpolation bilinear|nearest")

    def __call__(self, x: Batch) -> Batch:
        n, _, h, w = x.shape
        dt = torch.float64 if self.interpolation == "nearest" else torch.float32
        low, span, identity = _affine_ranges(self.rotation, self.translate, self.zoom, self.shear, h, w,
                                             x.device, dt)
        # One draw for all parameters of all images (columns as in _affine_ranges, then "apply?"); the fast path
        # below is about ten tensor ops per batch, because on CPU every op costs microseconds of overhead.
        r = torch.rand(n, 7, device=x.device, dtype=dt)
        v = torch.addcmul(low, r[:, :6], span)
        if self.p < 1:
            v = torch.where(r[:, 6:] < self.p, v, identity)
        if self.shear == 0:  # the common case: inverse of rotation·zoom about the centre, then of the shift
            # cos(angle − phase), phases [[0, π/2], [−π/2, 0]]: [[cos, sin], [−sin, cos]] in one op
            minus_phase = _const((0.0, -math.pi / 2, math.pi / 2, 0.0), (1, 2, 2), x.device, dt)
            rot = torch.cos(torch.add(minus_phase, v[:, :1, None], alpha=math.pi / 180))  # N x 2 x 2
            m = rot / v[:, 3:5, None]  # row i divided by the zoom along its axis
            theta = torch.cat([m, (m * v[:, None, 1:3]).sum(2, keepdim=True).neg_()], 2)  # N x 2 x 3
        else:
            theta = inverse_affine(v[:, 0], v[:, 1], v[:, 2], v[:, 3], v[:, 4], v[:, 5],
                                   torch.zeros_like(v[:, 5]), dtype=dt)
        return warp(x, theta, self.interpolation, self.fill)


@dataclass
class _Colour(Op):
    strength: float = 0.2  # factor uniform in [1 − strength, 1 + strength]
    p: float = 1.0

    def check(self, key, info):
        if not 0 <= self.strength < 1:
            raise ConfigError(f"{key}.strength", self.strength, "a number in [0, 1)")

    def factors(self, x: Batch) -> torch.Tensor:
        n = len(x)
        f = _u(n, 1 - self.strength, 1 + self.strength, x.device)
        return torch.where(_chosen(n, self.p, x.device), f, torch.ones_like(f))


@op("brightness")
@dataclass
class Brightness(_Colour):
    def __call__(self, x):
        return adjust_brightness(x, self.factors(x))


@op("contrast")
@dataclass
class Contrast(_Colour):
    def __call__(self, x):
        return adjust_contrast(x, self.factors(x))


@op("saturation")
@dataclass
class Saturation(_Colour):
    def check(self, key, info):
        super().check(key, info)
        if info.channels != 3:
            raise ConfigError(key, "saturation", f"an RGB dataset (data={info.name} has {info.channels} channel)")

    def __call__(self, x):
        return adjust_saturation(x, self.factors(x))


@op("noise")
@dataclass
class Noise(Op):
    std: float = 0.05  # Gaussian noise σ, in [0, 1] pixel units
    p: float = 1.0

    def check(self, key, info):
        if not self.std >= 0:
            raise ConfigError(f"{key}.std", self.std, "a number >= 0")

    def __call__(self, x):
        on = _chosen(len(x), self.p, x.device).to(x.dtype).view(-1, 1, 1, 1)
        return (x + on * self.std * torch.randn_like(x)).clamp_(0, 1)


@op("cutout")
@dataclass
class Cutout(Op):
    """Cutout (DeVries & Taylor 2017): ``count`` boxes per image, area a fraction in ``scale`` of the image, aspect
    ratio (h / w) log-uniform in ``ratio``, centre uniform over the image and the box clipped at the border — so a
    box erases less than its drawn area (the cutout preset, 10–25 % drawn on 32×32: 14 % erased on average, 23 %
    of boxes under 10 %); filled in [0, 1] pixels with the dataset mean (0 after normalisation), a constant in
    [0, 1], or uniform noise. Not torchvision's RandomErasing (``erasing.RandomErasing``: boxes inside the image)."""

    count: int = 1
    scale: list[float] = field(default_factory=lambda: [0.02, 0.33])
    ratio: list[float] = field(default_factory=lambda: [0.3, 3.3])
    value: Any = "mean"  # mean | noise | a number in [0, 1]
    p: float = 0.5

    def check(self, key, info):
        ok = (self.count >= 1 and len(self.scale) == 2 and 0 < self.scale[0] <= self.scale[1] <= 1
              and len(self.ratio) == 2 and 0 < self.ratio[0] <= self.ratio[1])
        ok &= self.value in ("mean", "noise") or (isinstance(self.value, (int, float)) and 0 <= self.value <= 1)
        if not ok:
            raise ConfigError(key, {f.name: getattr(self, f.name) for f in fields(self)},
                              "count >= 1, 0 < scale[0] <= scale[1] <= 1, 0 < ratio[0] <= ratio[1], "
                              "value mean, noise or a number in [0, 1]")
        self.mean = tuple(float(v) for v in (info.mean if hasattr(info, "mean") else [0.5] * info.channels))

    def __call__(self, x):
        n, c, h, w = x.shape
        mask = None
        for _ in range(self.count):
            r = torch.rand(n, 5, device=x.device)
            start, end = random_boxes(r[:, :4], h, w, self.scale, self.ratio)
            end = torch.where(r[:, 4:] < self.p, end, start)  # an image not chosen gets an empty box
            box = box_mask(start, end, h, w, x.dtype)
            mask = box if mask is None else torch.maximum(mask, box, out=mask)
        if self.value == "mean":
            fill = _const(self.mean, (1, c, 1, 1), x.device, x.dtype).expand_as(x)
        elif self.value == "noise":
            fill = torch.rand_like(x)
        else:
            fill = _const((float(self.value),), (1, 1, 1, 1), x.device, x.dtype).expand_as(x)
        return torch.lerp(x, fill, mask)  # exactly x where the mask is 0 and exactly the fill where it is 1
