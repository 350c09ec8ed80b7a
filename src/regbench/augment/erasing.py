"""Random erasing (Zhong et al. 2017) as ``torchvision.transforms.v2.RandomErasing`` draws and applies it, per
image, on the normalised images.

torchvision's own references (and timm's ``create_transform``) place RandomErasing after ``Normalize``, so its
``value`` lives in the model's input space: value 0 is the training mean, ``random`` is N(0, 1) noise on the
scale of the normalised data. regbench runs the op at the same place — the policy's stage after normalisation
(``Op.normalised``), before the mixing ops — so each value means what it means there. (Cutout, ``ops.Cutout``, is
another op: boxes with a uniform centre clipped at the border, filled in [0, 1] pixel space before normalisation.)
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field, fields
from typing import Any

import torch

from regbench.augment.functional import Batch, _const, box_mask
from regbench.augment.ops import Op, op
from regbench.errors import ConfigError

ATTEMPTS = 10  # torchvision's RandomErasing.make_params tries 10 boxes, then erases nothing


def erasing_boxes(r: torch.Tensor, h: int, w: int, scale, ratio) -> tuple[torch.Tensor, torch.Tensor]:
    """Boxes of torchvision's ``RandomErasing.make_params`` from uniform draws ``r`` (N x (2·ATTEMPTS + 2), float64):
    per attempt an area fraction uniform in ``scale`` and a log-uniform aspect ratio in ``ratio``, sides
    h = round(√(area·ratio)), w = round(√(area / ratio)) (Python's round: half to even, as torch.round); the first
    attempt with h < H and w < W is taken, its top-left corner uniform over the positions that keep the box inside
    the image; no such attempt: no box. Returns (start, end), N x 2 (row, column) whole numbers; an image without a
    box has end = start."""
    n = len(r)
    attempts = r[:, :2 * ATTEMPTS].view(n, ATTEMPTS, 2)
    area = (attempts[..., 0] * (scale[1] - scale[0]) + scale[0]) * (h * w)
    lo, hi = math.log(ratio[0]), math.log(ratio[1])
    aspect = torch.exp(attempts[..., 1] * (hi - lo) + lo)
    bh, bw = (area * aspect).sqrt_().round_(), (area / aspect).sqrt_().round_()
    fits = (bh < h) & (bw < w)
    first = fits.to(torch.int8).argmax(1, keepdim=True)  # the first fitting attempt (argmax returns the first max)
    bh, bw = bh.gather(1, first).squeeze(1), bw.gather(1, first).squeeze(1)
    found = fits.any(1)
    bh, bw = bh * found, bw * found  # no fitting attempt: an empty box
    # corner uniform in [0, H − h] x [0, W − w] (torch.randint(0, H − h + 1) in torchvision)
    top = (r[:, -2] * (h - bh + 1)).floor_().clamp_(max=h - bh)
    left = (r[:, -1] * (w - bw + 1)).floor_().clamp_(max=w - bw)
    start = torch.stack([top, left], 1)
    return start, start + torch.stack([bh, bw], 1)


def erase(x: Batch, start: torch.Tensor, end: torch.Tensor, fill: Batch) -> Batch:
    """``x`` with each image's box [start, end) replaced by ``fill`` (broadcast to x): torchvision's
    ``functional.erase`` per image, ``image[..., i:i + h, j:j + w] = v``, as one float 0/1 mask through torch.lerp
    (exactly x outside the box and exactly the fill inside)."""
    h, w = x.shape[-2:]
    mask = box_mask(start.to(x.dtype), end.to(x.dtype), h, w, x.dtype)
    return torch.lerp(x, fill.expand_as(x), mask)


@op("random_erasing")
@dataclass
class RandomErasing(Op):
    """torchvision's RandomErasing, every image its own draw: erased with probability ``p``, area a fraction
    uniform in ``scale``, aspect ratio (h / w) log-uniform in ``ratio``, up to 10 attempts for a box that fits,
    else nothing; ``value``: a number, one number per channel (a list), or ``random`` (per-pixel N(0, 1)) — in the
    normalised space (value 0 = the training mean under data.normalize=per_channel)."""

    p: float = 0.5
    scale: list[float] = field(default_factory=lambda: [0.02, 0.33])
    ratio: list[float] = field(default_factory=lambda: [0.3, 3.3])
    value: Any = 0.0  # a number | a list (one per channel, or one) | random
    normalised = True  # runs after normalisation, as torchvision's references place it

    def check(self, key, info):
        ok = (len(self.scale) == 2 and 0 <= self.scale[0] <= self.scale[1] <= 1
              and len(self.ratio) == 2 and 0 < self.ratio[0] <= self.ratio[1])
        value = self.value
        number = isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)
        numbers = (isinstance(value, (list, tuple)) and len(value) in (1, info.channels)
                   and all(isinstance(v, (int, float)) and math.isfinite(v) for v in value))
        if not (ok and (number or numbers or value == "random")):
            lists = ("a list of one number" if info.channels == 1
                     else f"a list of 1 or {info.channels} numbers (one per channel)")
            raise ConfigError(key, {f.name: getattr(self, f.name) for f in fields(self)},
                              "0 <= scale[0] <= scale[1] <= 1, 0 < ratio[0] <= ratio[1], value a number, "
                              f"{lists}, or random")

    def boxes(self, x: Batch) -> tuple[torch.Tensor, torch.Tensor]:
        """(start, end) of each image's box — empty where the image is not erased (not chosen, or no attempt fit)."""
        n, _, h, w = x.shape
        r = torch.rand(n, 2 * ATTEMPTS + 3, device=x.device, dtype=torch.float64)
        start, end = erasing_boxes(r[:, 1:], h, w, self.scale, self.ratio)
        return start, torch.where(r[:, :1] < self.p, end, start)

    def fill(self, x: Batch) -> Batch:
        if self.value == "random":
            return torch.randn_like(x)
        values = tuple(float(v) for v in (self.value if isinstance(self.value, (list, tuple)) else [self.value]))
        return _const(values, (1, len(values), 1, 1), x.device, x.dtype)

    def __call__(self, x: Batch) -> Batch:
        start, end = self.boxes(x)
        return erase(x, start, end, self.fill(x))
