"""Batched data augmentation on the training device, with random parameters drawn per image.

A policy is a list of ops applied to a whole batch of [0, 1] images (N x C x H x W) at once; every image
draws its own parameters (flip or not, crop offset, angle, box, op and magnitude...), so two identical
images in a batch come out different. Randomness comes from torch's global generator (seeded by the run's
seed and saved in checkpoints), so runs and resumes are reproducible.

Why not torchvision.transforms.v2 directly: applied to a batch it draws *one* set of parameters for the
whole batch, and applied per sample it needs a Python loop (or DataLoader workers) — 10x and more slower.
The geometric and colour maths below reproduce torchvision's v2 functional ops exactly (the tests use them
as oracles), and parameter-free ops (equalize, autocontrast, sharpness' blur) call torchvision itself.
"""

from __future__ import annotations

import functools
import math
from dataclasses import dataclass, field, fields
from typing import Any, Callable, Optional, Union

import torch
import torch.nn.functional as F
from torchvision.transforms.v2 import functional as TF

from regbench.errors import ConfigError

Batch = torch.Tensor  # N x C x H x W, float in [0, 1]


# ---------------------------------------------------------------------------------------- helpers


def _u(n: int, lo: float, hi: float, device) -> torch.Tensor:
    return torch.rand(n, device=device) * (hi - lo) + lo


def _chosen(n: int, p: float, device) -> torch.Tensor:
    return torch.rand(n, device=device) < p


@functools.lru_cache(maxsize=64)
def _const(values: tuple, shape: tuple, device: torch.device, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """A constant tensor made once per device: building it from Python numbers at every call would copy it
    host -> GPU at every step, and such a copy waits for the GPU (a host sync)."""
    return torch.tensor(values, dtype=dtype).view(shape).to(device)


def _where(mask: torch.Tensor, a: Batch, b: Batch) -> Batch:
    return torch.where(mask.view(-1, 1, 1, 1), a, b)


def inverse_affine(angle, tx, ty, zx, zy, shear_x, shear_y, cx=0.0, cy=0.0,
                   dtype: torch.dtype = torch.float64) -> torch.Tensor:
    """Per-sample inverse affine matrices (N x 2 x 3), torchvision's ``_get_inverse_affine_matrix`` batched,
    with separate x / y scales (Keras' zoom draws them independently). Angles in degrees, pixels, centre at
    (cx, cy) relative to the image centre. Computed in float64 like torchvision's Python floats, so nearest-
    neighbour sampling rounds the same way (float32 is enough for bilinear sampling, which has no ties)."""
    angle, tx, ty, zx, zy, shear_x, shear_y = (torch.as_tensor(v, dtype=dtype) for v in
                                               (angle, tx, ty, zx, zy, shear_x, shear_y))
    rot, sx, sy = torch.deg2rad(angle), torch.deg2rad(shear_x), torch.deg2rad(shear_y)
    a = torch.cos(rot - sy) / torch.cos(sy)
    b = -(a * torch.tan(sx) + torch.sin(rot))
    c = torch.sin(rot - sy) / torch.cos(sy)
    d = torch.cos(rot) - c * torch.tan(sx)
    m0, m1, m3, m4 = d / zx, -b / zx, -c / zy, a / zy
    m2 = cx - m0 * (cx + tx) - m1 * (cy + ty)
    m5 = cy - m3 * (cx + tx) - m4 * (cy + ty)
    return torch.stack([m0, m1, m2, m3, m4, m5], dim=1).view(-1, 2, 3)


@functools.lru_cache(maxsize=16)
def _base_grid(h: int, w: int, device: torch.device, dtype: torch.dtype) -> torch.Tensor:
    """Rows x, y, 1 of the output pixel centres relative to the image centre (3 x H·W), as torchvision's
    ``_affine_grid`` builds them (x varies fastest)."""
    xs = torch.linspace(-w * 0.5 + 0.5, w * 0.5 - 0.5, w, device=device, dtype=dtype)
    ys = torch.linspace(-h * 0.5 + 0.5, h * 0.5 - 0.5, h, device=device, dtype=dtype)
    return torch.stack([xs.repeat(h), ys.repeat_interleave(w), torch.ones(h * w, device=device, dtype=dtype)])


def warp(x: Batch, theta: torch.Tensor, mode: str = "bilinear", fill: str = "zero") -> Batch:
    """Apply per-sample inverse affine matrices (N x 2 x 3, pixel units about the centre) like torchvision's
    ``_affine_grid`` + ``grid_sample``.

    Bilinear: the grid of all N images is ONE matrix product, the (2N x 3) stacked matrix rows times the
    (3 x H·W) pixel centres, viewed as N x H x W x 2. torchvision's form, a batched (H·W x 3)·(3 x 2) product
    per image, is ten times slower on CPU (measured: 256 µs against 25 µs for 128 MNIST images; the
    sampling itself takes ~100 µs)."""
    n, _, h, w = x.shape
    if mode == "nearest":
        # Nearest sampling jumps at rounding ties, so here the grid is computed exactly as torchvision does
        # (one bmm, float64 matrices), to pick the same pixels; bilinear sampling is continuous.
        t = (theta / _const((0.5 * w, 0.5 * h), (1, 2, 1), theta.device, torch.float64)).to(x.device, x.dtype)
        base = _base_grid(h, w, x.device, x.dtype).T.unsqueeze(0)  # 1 x HW x 3
        grid = base.expand(n, -1, -1).bmm(t.transpose(1, 2)).view(n, h, w, 2)
    else:
        # rows rescaled by 1 / (W/2, H/2) to grid_sample's normalised coordinates
        t = theta.to(x.device, x.dtype) * _const((2.0 / w, 2.0 / h), (1, 2, 1), x.device, x.dtype)
        grid = t.view(2 * n, 3).mm(_base_grid(h, w, x.device, x.dtype)).view(n, 2, h, w).permute(0, 2, 3, 1)
    padding = "border" if fill == "nearest" else "zeros"  # Keras' fill_mode='nearest' repeats the edge pixels
    return F.grid_sample(x, grid, mode=mode, padding_mode=padding, align_corners=False)


def _affine_ranges(rotation: float, translate: float, zoom: float, shear: float, h: int, w: int,
                   device: torch.device, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(low, span, identity) of Affine's parameters, 1 x 6 each: columns angle (degrees), tx, ty (pixels), zx,
    zy, shear (degrees) are uniform in [low, low + span); identity is the parameters of an image left alone."""
    identity = (0.0, 0.0, 0.0, 1.0, 1.0, 0.0)
    top = (rotation, translate * w, translate * h, zoom, zoom, shear)
    return (_const(tuple(i - t for i, t in zip(identity, top)), (1, 6), device, dtype),
            _const(tuple(2 * t for t in top), (1, 6), device, dtype), _const(identity, (1, 6), device, dtype))


def _blend(x: Batch, degenerate: Batch, factor: torch.Tensor) -> Batch:
    """torchvision's _blend: factor * x + (1 - factor) * degenerate, clamped to [0, 1]; factor per sample."""
    f = factor.view(-1, 1, 1, 1).to(x.dtype)
    return (f * x + (1 - f) * degenerate).clamp_(0, 1)


def grayscale(x: Batch) -> Batch:
    if x.shape[1] == 1:
        return x
    return TF.rgb_to_grayscale(x, num_output_channels=1)


def adjust_brightness(x: Batch, factor: torch.Tensor) -> Batch:
    return _blend(x, torch.zeros_like(x), factor)


def adjust_contrast(x: Batch, factor: torch.Tensor) -> Batch:
    mean = grayscale(x).mean(dim=(-3, -2, -1), keepdim=True)
    return _blend(x, mean.expand_as(x), factor)


def adjust_saturation(x: Batch, factor: torch.Tensor) -> Batch:
    if x.shape[1] == 1:  # grey images have no saturation (torchvision returns them unchanged)
        return x
    return _blend(x, grayscale(x).expand_as(x), factor)


def adjust_sharpness(x: Batch, factor: torch.Tensor) -> Batch:
    """torchvision's sharpness: blend with the image blurred by its 3x3 kernel (1s around a 5, / 13), borders
    kept. The blur is written as shifted-slice sums (row sums, then column sums, plus 4 x the centre): half
    the time of torchvision's depthwise conv2d on CPU, and no kernel built from Python numbers at every call
    (on CUDA a host -> GPU copy per step); equal to torchvision up to float rounding (tested)."""
    h, w = x.shape[-2:]
    if h <= 2 or w <= 2:
        return x
    rows = x[..., :-2] + x[..., 1:-1] + x[..., 2:]  # N x C x H x (W-2)
    box = rows[..., :-2, :] + rows[..., 1:-1, :] + rows[..., 2:, :]  # N x C x (H-2) x (W-2)
    degenerate = x.clone()
    degenerate[..., 1:-1, 1:-1] = box.add_(x[..., 1:-1, 1:-1], alpha=4).div_(13)
    return _blend(x, degenerate.clamp_(0, 1), factor)


def posterize(x: Batch, bits: torch.Tensor) -> Batch:
    levels = (2.0 ** bits).view(-1, 1, 1, 1).to(x.dtype)
    return x.mul(levels).floor_().clamp_(max=levels - 1).div_(levels)


def solarize(x: Batch, threshold: torch.Tensor) -> Batch:
    return torch.where(x >= threshold.view(-1, 1, 1, 1), 1.0 - x, x)


# ------------------------------------------------------------------------------------------- ops

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


def shifted_crop(x: Batch, padding: int, mode: str, ox: torch.Tensor, oy: torch.Tensor,
                 flip: Optional[torch.Tensor] = None) -> Batch:
    """Pad by ``padding`` and cut an H x W window at per-sample offsets (ox, oy) in [0, 2 * padding] —
    mirrored left-right where ``flip`` is set — as one gather over the flattened padded images."""
    n, c, h, w = x.shape
    pad_mode = {"reflect": "reflect", "zero": "constant", "edge": "replicate"}[mode]
    xp = F.pad(x, (padding,) * 4, mode=pad_mode).flatten(2)  # N x C x (H+2p)(W+2p)
    wp = w + 2 * padding
    j = torch.arange(w, device=x.device)
    cols = ox.view(n, 1) + (j if flip is None else torch.where(flip.view(n, 1), w - 1 - j, j))  # N x W
    rows = (oy.view(n, 1) + torch.arange(h, device=x.device)) * wp  # N x H
    index = (rows.view(n, h, 1) + cols.view(n, 1, w)).view(n, 1, h * w).expand(n, c, h * w)
    return xp.gather(2, index).view(n, c, h, w)


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


def box_mask(start: torch.Tensor, end: torch.Tensor, h: int, w: int, dtype: torch.dtype) -> torch.Tensor:
    """N x 1 x H x W, 1.0 inside the boxes [start, end) and 0.0 outside; start / end are N x 2 (row, column)
    float tensors of whole numbers. Rows and columns are tested separately (N x 2 x L), then multiplied.

    A float 0/1 mask used through ``torch.lerp`` (exact for weights 0 and 1) is about four times faster on CPU
    than a broadcast boolean mask through ``torch.where`` (measured: 50 µs against 170 µs for 128 CIFAR images)."""
    idx = _const(tuple(range(max(h, w))), (1, 1, -1), start.device)  # pixel positions 0..L-1
    inside = ((idx >= start.unsqueeze(2)) & (idx < end.unsqueeze(2))).to(dtype)
    return (inside[:, 0, :h, None] * inside[:, 1, None, :w]).unsqueeze(1)


def random_boxes(r: torch.Tensor, h: int, w: int, scale: list[float], ratio: list[float]):
    """Cutout's boxes from uniform draws ``r`` (N x 4: area, aspect, centre row, centre column): area a fraction
    uniform in ``scale`` of H·W, aspect ratio (height / width) log-uniform in ``ratio``, side lengths rounded and
    at least 1 pixel, centre uniform over the image, clipped to it. Returns (start, end), N x 2 (row, column)."""
    hw = _const((float(h), float(w)), (1, 2), r.device)
    area = r[:, :1] * ((scale[1] - scale[0]) * h * w) + scale[0] * h * w  # pixels, N x 1
    lo, hi = math.log(ratio[0]), math.log(ratio[1])
    half_log_ratio = r[:, 1:2] * (0.5 * (hi - lo)) + 0.5 * lo
    # height = √(area·ratio), width = √(area / ratio): √area · exp(±½ log ratio)
    side = torch.exp(half_log_ratio * _const((1.0, -1.0), (1, 2), r.device)).mul_(area.sqrt_())
    side = side.round_().clamp_(min=1).clamp_(max=hw)
    start = (r[:, 2:4] * hw).floor_().sub_((side * 0.5).floor_())
    end = (start + side).clamp_(max=hw)
    return start.clamp_(min=0), end



@op("cutout")
@dataclass
class Cutout(Op):
    """Cutout / random erasing: ``count`` boxes per image, area a fraction in ``scale`` of the image, aspect
    ratio (h / w) log-uniform in ``ratio``; filled with the dataset mean (0 after normalisation), a constant
    in [0, 1], or Gaussian noise."""

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


# --------------------------------------------------------------------- RandAugment / TrivialAugment

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


def geometric_ops(x: Batch, kind: torch.Tensor, magnitude: torch.Tensor) -> Batch:
    """torchvision's geometric ops of RandAugment / TrivialAugment, each image its own: ``kind`` (per image) is
    the index of its op in GEOMETRIC, ``magnitude`` its magnitude. All of them are affine maps, so one warp does
    the whole batch (nearest, fill 0) — one grid_sample instead of one per op; the matrices are exactly those
    of the ops one at a time."""
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
    return warp(x, theta, "nearest", "zero")


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


# ------------------------------------------------------------------------------------------ mixing


class Mixer(Op):
    """Batch op that mixes pairs of images and their targets: ``mix(x, y_soft) -> (x, y_soft)``."""

    mixes = True


def _beta(alpha: float, n: int, device) -> torch.Tensor:
    a = torch.full((n,), float(alpha), device=device)
    # validate_args=False: the argument check (α > 0, already enforced by the config) would read a boolean
    # back from the device — a host sync at every step on CUDA.
    return torch.distributions.Beta(a, a, validate_args=False).sample()


def mixup(x, y, lam, perm):
    """x̃ = λ·x_i + (1 − λ)·x_j, ỹ = λ·y_i + (1 − λ)·y_j, partner j = perm[i]; λ per sample."""
    l4 = lam.view(-1, 1, 1, 1).to(x.dtype)
    l2 = lam.view(-1, 1).to(y.dtype)
    return l4 * x + (1 - l4) * x[perm], l2 * y + (1 - l2) * y[perm]


def cutmix(x, y, lam, perm):
    """Paste a box of side √(1 − λ)·H × √(1 − λ)·W (centre uniform, clipped) from the partner; the target weight
    is λ recomputed from the clipped box: λ_adj = 1 − box area / (H·W)."""
    n, _, h, w = x.shape
    cut = torch.sqrt(1.0 - lam)
    bh, bw = (cut * h).floor(), (cut * w).floor()  # H first (rows), then W (columns)
    hw = _const((float(h), float(w)), (1, 2), x.device)
    half = torch.stack([bh, bw], 1).div_(2).floor_()
    centre = (torch.rand(n, 2, device=x.device) * hw).floor_()  # uniform over the rows and columns
    start, end = (centre - half).clamp_(min=0), (centre + half).clamp_(max=hw)
    mask = box_mask(start, end, h, w, x.dtype)
    y0, x0, y1, x1 = start[:, 0], start[:, 1], end[:, 0], end[:, 1]
    lam_adj = 1.0 - ((y1 - y0) * (x1 - x0)).to(y.dtype) / (h * w)
    l2 = lam_adj.view(-1, 1)
    return torch.lerp(x, x[perm], mask), l2 * y + (1 - l2) * y[perm], lam_adj


@dataclass
class _BetaMixer(Mixer):
    alpha: float = 1.0  # λ ~ Beta(α, α), one λ per image
    p: float = 1.0

    def check(self, key, info):
        if not self.alpha > 0:
            raise ConfigError(f"{key}.alpha", self.alpha, "a number > 0")

    def draw(self, x: Batch) -> tuple[torch.Tensor, torch.Tensor]:
        """(λ per image — 1 where the op does not apply —, partner permutation of the batch)."""
        n = len(x)
        lam = _beta(self.alpha, n, x.device)
        return torch.where(_chosen(n, self.p, x.device), lam, torch.ones_like(lam)), torch.randperm(n, device=x.device)


@op("mixup")
@dataclass
class MixUp(_BetaMixer):
    alpha: float = 0.2

    def mix(self, x, y):
        return mixup(x, y, *self.draw(x))


@op("cutmix")
@dataclass
class CutMix(_BetaMixer):
    alpha: float = 1.0  # CutMix's own α (not MixUp's)

    def mix(self, x, y):
        xm, ym, _ = cutmix(x, y, *self.draw(x))
        return xm, ym


@op("mixup_cutmix")
@dataclass
class MixUpCutMix(Mixer):
    """Per image: CutMix with probability ``switch_prob`` (its own α), else MixUp."""

    mixup_alpha: float = 0.2
    cutmix_alpha: float = 1.0
    switch_prob: float = 0.5
    p: float = 1.0

    def check(self, key, info):
        if not (self.mixup_alpha > 0 and self.cutmix_alpha > 0 and 0 <= self.switch_prob <= 1):
            raise ConfigError(key, {"mixup_alpha": self.mixup_alpha, "cutmix_alpha": self.cutmix_alpha,
                                    "switch_prob": self.switch_prob}, "alphas > 0 and switch_prob in [0, 1]")

    def mix(self, x, y):
        n = len(x)
        perm = torch.randperm(n, device=x.device)
        use_cut = _chosen(n, self.switch_prob, x.device)
        on = _chosen(n, self.p, x.device)
        lam_m = torch.where(on, _beta(self.mixup_alpha, n, x.device), torch.ones(n, device=x.device))
        lam_c = torch.where(on, _beta(self.cutmix_alpha, n, x.device), torch.ones(n, device=x.device))
        xm, ym = mixup(x, y, lam_m, perm)
        xc, yc, _ = cutmix(x, y, lam_c, perm)
        return _where(use_cut, xc, xm), torch.where(use_cut.view(-1, 1), yc, ym)


# ------------------------------------------------------------------------------------------ policy


def _fuse(ops: list[Op]) -> list[Op]:
    """An hflip next to a crop becomes part of the crop's gather (one pass instead of two). Exact in
    distribution: the crop offset is symmetric, and every padding mode commutes with a mirror."""
    out: list[Op] = []
    for o in ops:
        prev = out[-1] if out else None
        if isinstance(o, HFlip) and isinstance(prev, Crop) and prev.flip_p == 0:
            prev.flip_p = o.p
            continue
        if isinstance(o, Crop) and isinstance(prev, HFlip):
            fused = Crop(o.padding, o.padding_mode, o.p)
            fused.flip_p = prev.p
            out[-1] = fused
            continue
        out.append(o)
    return out


def build_op(spec: dict, key: str, info) -> Op:
    spec = dict(spec)
    name = spec.pop("op", None)
    if name not in OPS:
        raise ConfigError(f"{key}.op", name, "one of " + ", ".join(sorted(OPS)))
    cls = OPS[name]
    known = [f.name for f in fields(cls)]
    unknown = [k for k in spec if k not in known]
    if unknown:
        raise ConfigError(f"{key}.{unknown[0]}", spec[unknown[0]], f"a key of op {name} ({', '.join(known)})")
    instance = cls(**spec)
    if not 0 <= instance.p <= 1:
        raise ConfigError(f"{key}.p", instance.p, "a probability in [0, 1]")
    instance.check(key, info)
    return instance


class Policy:
    """The configured list of ops; ``__call__(x01, y) -> (x01, y_or_soft)``, batched on x's device."""

    def __init__(self, ops: list[Op], num_classes: int):
        self.ops = _fuse([o for o in ops if not o.mixes])
        self.mixers = [o for o in ops if o.mixes]
        self.num_classes = num_classes

    @property
    def soft_targets(self) -> bool:
        return bool(self.mixers)

    @property
    def flips(self) -> bool:
        return any(o.flips for o in self.ops)

    @torch.no_grad()
    def images(self, x: Batch) -> Batch:
        for o in self.ops:
            x = o(x)
        return x

    @torch.no_grad()
    def mix(self, x: Batch, y: torch.Tensor) -> tuple[Batch, torch.Tensor]:
        """The mixing ops (MixUp / CutMix) on one batch: partners come from that batch; targets become soft.
        Mixing is linear, so it may run on normalised images."""
        if self.mixers:
            if y.ndim == 1:  # one-hot by scatter: F.one_hot reads the labels' minimum back on CPU
                y = torch.zeros(len(y), self.num_classes, device=y.device, dtype=x.dtype).scatter_(1, y[:, None], 1.0)
            for m in self.mixers:
                x, y = m.mix(x, y)
        return x, y

    @torch.no_grad()
    def __call__(self, x: Batch, y: torch.Tensor) -> tuple[Batch, torch.Tensor]:
        return self.mix(self.images(x), y)


def build_policy(cfg, info, stats=None) -> Optional[Policy]:
    """The policy of ``cfg`` (the augmentation node) for dataset ``info``, or None when it has no ops."""
    ops = []
    seen_mixer = False
    for i, spec in enumerate(cfg.ops):
        key = f"augmentation.ops[{i}]"
        if not isinstance(spec, dict):
            from omegaconf import OmegaConf

            spec = OmegaConf.to_container(spec, resolve=True) if not isinstance(spec, str) else {"op": spec}
        o = build_op(spec, key, _Info(info, stats))
        if seen_mixer and not o.mixes:
            raise ConfigError(key, spec, "mixing ops (mixup, cutmix, mixup_cutmix) last in the list")
        seen_mixer |= o.mixes
        ops.append(o)
    return Policy(ops, info.num_classes) if ops else None


class _Info:
    """What ops may check: the dataset's channels / name and the training mean (for cutout's fill)."""

    def __init__(self, info, stats):
        self.name, self.channels = info.name, info.channels
        if stats is not None:
            self.mean = stats
