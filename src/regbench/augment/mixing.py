"""Mixing ops (MixUp, CutMix, their per-image switch): pairs of images of one batch and their soft targets."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from regbench.augment.functional import Batch, _chosen, _const, _where, box_mask
from regbench.augment.ops import Op, op
from regbench.errors import ConfigError


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
