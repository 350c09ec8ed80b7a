"""Mixing ops (MixUp, CutMix, their switch): pairs of images of one batch and their soft targets.

``mode`` says how images are paired and how parameters are shared, timm's ``Mixup`` meanings (timm/data/mixup.py,
``Mixup._mix_batch`` / ``_mix_pair`` / ``_mix_elem``) plus regbench's original form:

- ``shuffle`` (default, regbench's form before timm's modes existed): λ (and the MixUp-or-CutMix choice, the box)
  per image, partner from a random permutation of the batch;
- ``batch``: ONE λ, one "apply?" draw, one MixUp-or-CutMix choice and one CutMix box for the whole batch; image i
  mixed with image B−1−i (timm's ``x.flip(0)``);
- ``pair``: one set per pair (i, B−1−i), both images of a pair mixed with each other with the same λ and box;
- ``elem``: one set per image, image i mixed with image B−1−i (the partner is not mixed back with the same λ).

In the flipped modes an image paired with itself (the middle one of an odd batch, which timm refuses) stays as it
is, with its own target. CutMix's λ is corrected from the clipped box, as timm's ``correct_lam=True``.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from regbench.augment.functional import Batch, _chosen, _const, _where, box_mask
from regbench.augment.ops import Op, op
from regbench.errors import ConfigError

MODES = ("shuffle", "batch", "pair", "elem")


class Mixer(Op):
    """Batch op that mixes pairs of images and their targets: ``mix(x, y_soft) -> (x, y_soft)``."""

    mixes = True


def _beta(alpha: float, n: int, device) -> torch.Tensor:
    a = torch.full((n,), float(alpha), device=device)
    # validate_args=False: the argument check (α > 0, already enforced by the config) would read a boolean
    # back from the device — a host sync at every step on CUDA.
    return torch.distributions.Beta(a, a, validate_args=False).sample()


def pairing(n: int, mode: str, device) -> tuple[torch.Tensor, torch.Tensor]:
    """(tie, partner) for the flipped modes: image i takes the parameters drawn for image ``tie[i]`` (itself for
    elem, min(i, B−1−i) for pair, 0 for batch) and is mixed with image ``partner[i]`` = B−1−i."""
    i = torch.arange(n, device=device)
    partner = i.flip(0)
    tie = {"elem": i, "pair": torch.minimum(i, partner), "batch": torch.zeros_like(i)}[mode]
    return tie, partner


def _check_mode(key: str, mode: str) -> None:
    if mode not in MODES:
        raise ConfigError(f"{key}.mode", mode, "one of " + ", ".join(MODES))


def mixup(x, y, lam, perm):
    """x̃ = λ·x_i + (1 − λ)·x_j, ỹ = λ·y_i + (1 − λ)·y_j, partner j = perm[i]; λ per sample."""
    l4 = lam.view(-1, 1, 1, 1).to(x.dtype)
    l2 = lam.view(-1, 1).to(y.dtype)
    return l4 * x + (1 - l4) * x[perm], l2 * y + (1 - l2) * y[perm]


def cutmix(x, y, lam, perm, centre=None):
    """Paste a box of side √(1 − λ)·H × √(1 − λ)·W (centre uniform, clipped) from the partner; the target weight
    is λ recomputed from the clipped box: λ_adj = 1 − box area / (H·W). ``centre`` (N x 2, row and column as
    whole numbers) is drawn here when not given. timm's ``rand_bbox`` + ``cutmix_bbox_and_lam``."""
    n, _, h, w = x.shape
    cut = torch.sqrt(1.0 - lam)
    bh, bw = (cut * h).floor(), (cut * w).floor()  # H first (rows), then W (columns)
    hw = _const((float(h), float(w)), (1, 2), x.device)
    half = torch.stack([bh, bw], 1).div_(2).floor_()
    if centre is None:
        centre = (torch.rand(n, 2, device=x.device) * hw).floor_()  # uniform over the rows and columns
    start, end = (centre - half).clamp_(min=0), (centre + half).clamp_(max=hw)
    mask = box_mask(start, end, h, w, x.dtype)
    y0, x0, y1, x1 = start[:, 0], start[:, 1], end[:, 0], end[:, 1]
    lam_adj = 1.0 - ((y1 - y0) * (x1 - x0)).to(y.dtype) / (h * w)
    l2 = lam_adj.view(-1, 1)
    return torch.lerp(x, x[perm], mask), l2 * y + (1 - l2) * y[perm], lam_adj


def _centres(x: Batch) -> torch.Tensor:
    h, w = x.shape[-2:]
    return (torch.rand(len(x), 2, device=x.device) * _const((float(h), float(w)), (1, 2), x.device)).floor_()


@dataclass
class _BetaMixer(Mixer):
    alpha: float = 1.0  # λ ~ Beta(α, α)
    p: float = 1.0
    mode: str = "shuffle"  # shuffle | batch | pair | elem (timm's meanings; see the module's docstring)

    def check(self, key, info):
        if not self.alpha > 0:
            raise ConfigError(f"{key}.alpha", self.alpha, "a number > 0")
        _check_mode(key, self.mode)

    def draw(self, x: Batch) -> tuple[torch.Tensor, torch.Tensor]:
        """(λ per image — 1 where the op does not apply —, partner of each image)."""
        n = len(x)
        lam = _beta(self.alpha, n, x.device)
        on = _chosen(n, self.p, x.device)
        if self.mode == "shuffle":
            return torch.where(on, lam, torch.ones_like(lam)), torch.randperm(n, device=x.device)
        tie, partner = pairing(n, self.mode, x.device)
        on = on[tie] & (partner != torch.arange(n, device=x.device))  # no image mixed with itself
        return torch.where(on, lam[tie], torch.ones_like(lam)), partner


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
        lam, perm = self.draw(x)
        centre = None
        if self.mode != "shuffle":
            centre = _centres(x)[pairing(len(x), self.mode, x.device)[0]]  # pair / batch: one box per draw
        xm, ym, _ = cutmix(x, y, lam, perm, centre)
        return xm, ym


@op("mixup_cutmix")
@dataclass
class MixUpCutMix(Mixer):
    """CutMix with probability ``switch_prob`` (its own α), else MixUp — per image, pair or batch (``mode``)."""

    mixup_alpha: float = 0.2
    cutmix_alpha: float = 1.0
    switch_prob: float = 0.5
    p: float = 1.0
    mode: str = "shuffle"  # shuffle | batch | pair | elem (timm's meanings; see the module's docstring)

    def check(self, key, info):
        if not (self.mixup_alpha > 0 and self.cutmix_alpha > 0 and 0 <= self.switch_prob <= 1):
            raise ConfigError(key, {"mixup_alpha": self.mixup_alpha, "cutmix_alpha": self.cutmix_alpha,
                                    "switch_prob": self.switch_prob}, "alphas > 0 and switch_prob in [0, 1]")
        _check_mode(key, self.mode)

    def params(self, x: Batch) -> dict:
        """Every draw of one batch: partner, use_cut, λ of MixUp and of CutMix (1 where nothing applies), and the
        CutMix centres (None: drawn by ``cutmix`` itself, shuffle mode's original order of draws)."""
        n = len(x)
        if self.mode == "shuffle":
            perm = torch.randperm(n, device=x.device)
            use_cut = _chosen(n, self.switch_prob, x.device)
            on = _chosen(n, self.p, x.device)
            lam_m = torch.where(on, _beta(self.mixup_alpha, n, x.device), torch.ones(n, device=x.device))
            lam_c = torch.where(on, _beta(self.cutmix_alpha, n, x.device), torch.ones(n, device=x.device))
            return {"partner": perm, "use_cut": use_cut, "lam_mixup": lam_m, "lam_cutmix": lam_c, "centre": None}
        tie, partner = pairing(n, self.mode, x.device)
        use_cut = _chosen(n, self.switch_prob, x.device)[tie]
        on = _chosen(n, self.p, x.device)[tie] & (partner != torch.arange(n, device=x.device))
        one = torch.ones(n, device=x.device)
        lam_m = torch.where(on, _beta(self.mixup_alpha, n, x.device)[tie], one)
        lam_c = torch.where(on, _beta(self.cutmix_alpha, n, x.device)[tie], one)
        return {"partner": partner, "use_cut": use_cut, "lam_mixup": lam_m, "lam_cutmix": lam_c,
                "centre": _centres(x)[tie]}

    @staticmethod
    def apply(x, y, params):
        """MixUp and CutMix of every image, each image keeping the one its ``use_cut`` says."""
        perm, use_cut = params["partner"], params["use_cut"]
        xm, ym = mixup(x, y, params["lam_mixup"], perm)
        xc, yc, _ = cutmix(x, y, params["lam_cutmix"], perm, params["centre"])
        return _where(use_cut, xc, xm), torch.where(use_cut.view(-1, 1), yc, ym)

    def mix(self, x, y):
        return self.apply(x, y, self.params(x))
