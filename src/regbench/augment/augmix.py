"""AugMix (Hendrycks et al. 2020) as ``torchvision.transforms.v2.AugMix`` computes it, every image its own draws.

torchvision's formula (``AugMix.forward``): m ~ Dirichlet(α, α) (a Beta), weights w ~ Dirichlet(α, …, α) over
``mixture_width`` chains; each chain applies ``chain_depth`` ops (−1: a depth uniform in 1..3 per chain), each op
uniform over AugMix's op list with a magnitude bin uniform in [0, severity) of 10 bins and a random sign for the
signed ops; the result is m₀·x + Σₖ m₁·wₖ·chainₖ(x). torchvision applied to a batch draws the op choices once for the
whole batch (only the weights per image); here every image draws its own weights, depths, ops, bins and signs.
The ops are the batched ones of RandAugment (``auto.apply_named_op`` / ``auto.geometric_ops``), with AugMix's own
magnitude table and torchvision's default bilinear interpolation for the geometric ones. The JSD consistency loss
of the paper (three views per image) is not part of this op: it needs a training-loop change (docs/regularizers.md).
"""

from __future__ import annotations

import functools
from dataclasses import dataclass, fields

import torch

from regbench.augment.auto import GEOMETRIC, apply_named_op, geometric_ops, group_by_op
from regbench.augment.functional import Batch, _chosen, _const, _where
from regbench.augment.ops import Op, op
from regbench.errors import ConfigError

PARAMETER_MAX = 10  # torchvision's AugMix._PARAMETER_MAX: 10 magnitude bins, severity in 1..10
PARTIAL_OPS = GEOMETRIC + ("Posterize", "Solarize", "AutoContrast", "Equalize")
ALL_OPS = PARTIAL_OPS + ("Brightness", "Color", "Contrast", "Sharpness")  # torchvision's order (all_ops=True)


@functools.lru_cache(maxsize=16)
def augmix_table(h: int, w: int, all_ops: bool, device: torch.device) -> tuple[tuple, torch.Tensor, torch.Tensor]:
    """(op names, magnitudes [ops x 10] float32 (0 for the ops without one), signed [ops] bool): torchvision's
    ``AugMix._AUGMENTATION_SPACE`` (``_PARTIAL_AUGMENTATION_SPACE`` without ``all_ops``) at num_bins = 10."""
    def up_to(top: float) -> torch.Tensor:
        return torch.linspace(0.0, top, PARAMETER_MAX)

    space = {
        "ShearX": (up_to(0.3), True), "ShearY": (up_to(0.3), True),
        "TranslateX": (up_to(w / 3.0), True), "TranslateY": (up_to(h / 3.0), True),
        "Rotate": (up_to(30.0), True),
        "Posterize": ((4 - (torch.arange(PARAMETER_MAX) / ((PARAMETER_MAX - 1) / 4))).round().int(), False),
        "Solarize": (torch.linspace(1.0, 0.0, PARAMETER_MAX), False),
        "AutoContrast": (None, False), "Equalize": (None, False),
        "Brightness": (up_to(0.9), True), "Color": (up_to(0.9), True),
        "Contrast": (up_to(0.9), True), "Sharpness": (up_to(0.9), True),
    }
    names = ALL_OPS if all_ops else PARTIAL_OPS
    mags = torch.stack([torch.zeros(PARAMETER_MAX) if space[k][0] is None else space[k][0].float() for k in names])
    signed = torch.tensor([space[k][1] for k in names])
    return names, mags.to(device), signed.to(device)


def apply_ops(x: Batch, names: tuple, which: torch.Tensor, magnitude: torch.Tensor, mode: str,
              grouped: bool) -> Batch:
    """Each image its own op: ``which`` (per image) indexes ``names`` (−1: left alone), ``magnitude`` is its signed
    magnitude. Grouped (CPU): each op on the images that chose it; else (CUDA) every op on the whole batch, each
    image keeping its own op's result (no data-dependent shapes: no host sync). The geometric ops, the first five
    of ``names``, share one warp."""
    out = x.clone() if grouped else x
    for i, name in enumerate(names):
        if name in GEOMETRIC:
            continue
        if grouped:
            idx = torch.nonzero(which == i).squeeze(1)
            if idx.numel():
                out[idx] = apply_named_op(x[idx], name, magnitude[idx])
        else:
            out = _where(which == i, apply_named_op(x, name, magnitude), out)
    geometric = (which >= 0) & (which < len(GEOMETRIC))
    if grouped:
        idx = torch.nonzero(geometric).squeeze(1)
        if idx.numel():
            out[idx] = geometric_ops(x[idx], which[idx], magnitude[idx], mode)
    else:
        out = _where(geometric, geometric_ops(x, which.clamp(0, len(GEOMETRIC) - 1), magnitude, mode), out)
    return out


@op("augmix")
@dataclass
class AugMix(Op):
    """torchvision's AugMix (severity, mixture_width, chain_depth, alpha, all_ops, interpolation), every image its
    own draws; ``p``: the share of images AugMix-ed (1 = torchvision; the others are left as they are)."""

    severity: int = 3  # magnitude bins 0..severity−1 of 10
    mixture_width: int = 3  # chains mixed
    chain_depth: int = -1  # ops per chain; −1: 1..3, uniform, per chain
    alpha: float = 1.0  # Dirichlet / Beta parameter of the mixing weights
    all_ops: bool = True  # also brightness, colour, contrast, sharpness (torchvision's default)
    interpolation: str = "bilinear"  # bilinear (torchvision's default) | nearest
    p: float = 1.0

    def check(self, key, info):
        ok = (1 <= self.severity <= PARAMETER_MAX and self.mixture_width >= 1
              and (self.chain_depth == -1 or self.chain_depth >= 1) and self.alpha > 0
              and isinstance(self.all_ops, bool) and self.interpolation in ("bilinear", "nearest"))
        if not ok:
            raise ConfigError(key, {f.name: getattr(self, f.name) for f in fields(self)},
                              f"1 <= severity <= {PARAMETER_MAX}, mixture_width >= 1, chain_depth -1 or >= 1, "
                              "alpha > 0, all_ops true|false, interpolation bilinear|nearest")

    def draw(self, x: Batch) -> dict:
        """Every image's draws: m (N x 2, original vs chains), w (N x width, the chains' Dirichlet weights), op
        index (−1 past the chain's depth) and signed magnitude (N x width x depth), whether it is AugMix-ed (N)."""
        n, _, h, w = x.shape
        dev = x.device
        names, mags, signed = augmix_table(h, w, self.all_ops, dev)
        k, a = self.mixture_width, float(self.alpha)
        m = torch._sample_dirichlet(_const((a, a), (1, 2), dev).expand(n, -1))
        chains = torch._sample_dirichlet(_const((a,) * k, (1, k), dev).expand(n, -1))
        most = self.chain_depth if self.chain_depth > 0 else 3
        which = torch.randint(0, len(names), (n, k, most), device=dev)
        bins = torch.randint(0, self.severity, (n, k, most), device=dev)
        negative = (torch.rand(n, k, most, device=dev) <= 0.5) & signed[which]  # torchvision: rand <= 0.5 flips
        magnitude = torch.where(negative, -mags[which, bins], mags[which, bins])
        if self.chain_depth <= 0:
            depth = torch.randint(1, 4, (n, k, 1), device=dev)
            steps = torch.arange(most, device=dev)
            which = torch.where(steps < depth, which, -1)
        return {"m": m, "w": chains, "which": which, "magnitude": magnitude,
                "on": _chosen(n, self.p, dev)}

    def apply(self, x: Batch, d: dict, grouped=None) -> Batch:
        """m₀·x + Σₖ (m₁·wₖ)·chainₖ(x), accumulated in torchvision's order (clamped to [0, 1] against the last
        ulp); images not chosen: x as it is."""
        h, w = x.shape[-2:]
        names = augmix_table(h, w, self.all_ops, x.device)[0]
        grouped = group_by_op(x.device) if grouped is None else grouped
        weights = d["w"] * d["m"][:, 1:]  # torchvision's combined_weights
        mix = d["m"][:, 0].view(-1, 1, 1, 1) * x
        for k in range(d["which"].shape[1]):
            aug = x
            for s in range(d["which"].shape[2]):
                aug = apply_ops(aug, names, d["which"][:, k, s], d["magnitude"][:, k, s], self.interpolation,
                                grouped)
            mix.add_(weights[:, k].view(-1, 1, 1, 1) * aug)
        # a convex combination of [0, 1] images, but its float sum may pass 1 by an ulp: kept in [0, 1]
        return _where(d["on"], mix.clamp_(0, 1), x)

    def __call__(self, x: Batch) -> Batch:
        return self.apply(x, self.draw(x))
