"""Seeded, class-balanced splits of a dataset's labels: test / validation / training subsets.

Every split is drawn from its own generator seeded by ``data.split_seed`` (+0 test, +1 validation, +2 training
subset, +3 test subset), so the split stays fixed while ``seed`` varies init and order.
"""

from __future__ import annotations

import math

import torch
from omegaconf import DictConfig

from regbench.errors import ConfigError


def seeded_generator(seed: int, device: str | torch.device = "cpu") -> torch.Generator:
    return torch.Generator(device=device).manual_seed(int(seed))


def stratified_take(y: torch.Tensor, k: int, g: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """Split indices of labels ``y`` into (k taken, rest), keeping class proportions.

    Per-class quotas use the largest-remainder method so they add up to exactly k; which samples of a
    class are taken is decided by a permutation from ``g``.
    """
    n = len(y)
    perm = torch.randperm(n, generator=g)
    ys = y[perm]
    classes, counts = torch.unique(ys, return_counts=True)
    exact = counts.double() * k / n
    quota = exact.floor().long()
    short = k - int(quota.sum())
    if short:
        order = torch.argsort(exact - quota, descending=True, stable=True)
        quota[order[:short]] += 1
    taken = torch.zeros(n, dtype=torch.bool)
    for c, q in zip(classes.tolist(), quota.tolist()):
        members = torch.nonzero(ys == c).squeeze(1)
        taken[members[:q]] = True
    return perm[taken].sort().values, perm[~taken].sort().values


def split_validation(pool_y: torch.Tensor, cfg: DictConfig) -> tuple[torch.Tensor, torch.Tensor]:
    """(validation, training) indices into the training pool, by ``cfg.val_split``.

    stratified: a seeded, class-balanced subset of round(val_fraction·n) images (regbench's default).
    last: Keras' ``validation_split``: the last n − ⌊n·(1 − val_fraction)⌋ images of the pool in its stored
    order, before any shuffling (keras/src/trainers/data_adapters/array_slicing.py: train_validation_split).
    """
    n = len(pool_y)
    if cfg.val_split == "last":
        split_at = math.floor(n * (1.0 - cfg.val_fraction))
        if not 0 < split_at < n:
            raise ConfigError("data.val_fraction", cfg.val_fraction,
                              f"a fraction giving 1..{n - 1} validation images of {n}")
        idx = torch.arange(n)
        val_idx, train_idx = idx[split_at:], idx[:split_at]
        missing = sorted(set(pool_y[train_idx].tolist()) - set(pool_y[val_idx].tolist()))
        if missing:
            raise ConfigError("data.val_split", "last", f"a dataset stored in random order: the last {n - split_at} "
                              f"images of the {cfg.name} training pool lack classes {_fmt_classes(missing)} "
                              "(the data is stored sorted by class)", "use data.val_split=stratified")
        return val_idx, train_idx
    n_val = round(cfg.val_fraction * n)
    if not 1 <= n_val < n:
        raise ConfigError("data.val_fraction", cfg.val_fraction, f"a fraction giving 1..{n - 1} validation images of {n}")
    return stratified_take(pool_y, n_val, seeded_generator(cfg.split_seed + 1))


def _fmt_classes(classes: list[int]) -> str:
    return ", ".join(map(str, classes)) if len(classes) <= 4 else f"{classes[0]}..{classes[-1]} ({len(classes)} of them)"

