"""The policy: the configured ops of a run, and the one path augmentation takes through it.

``build_policy(cfg.augmentation, info, stats)`` always returns a ``Policy``; with no ops it is the identity
(``policy.identity``), so the training loop never branches on whether there is augmentation. The loop uses:

- ``train_batches(data, batch_size, order, drop_last)``: one epoch of (x, y) batches — per-image ops on [0, 1]
  chunks of the shuffled training images, then normalisation, then the ops that work on normalised images
  (random_erasing, placed after Normalize as in torchvision's references), then mixing per batch (soft targets);
- ``preview(data, k)``: (before, after) images for TensorBoard, or None;
- ``tta(model, x, y, batch_size)``: the test-time-augmentation metrics, or None;
- ``info()``: what summary.json records about the augmentation.
"""

from __future__ import annotations

import re
from dataclasses import fields
from pathlib import Path
from typing import Any, Iterator, Optional

import torch

import regbench.augment.tta as tta_views
from regbench.augment.functional import Batch
from regbench.augment.ops import OPS, Crop, HFlip, Op
from regbench.data import batches
from regbench.errors import ConfigError


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


class Policy:
    """The configured list of ops; ``__call__(x01, y) -> (x01, y_or_soft)``, batched on x's device.

    ``config`` (the augmentation node) gives the TTA views and the summary facts; ``flips_label_safe`` (the
    dataset's) whether TTA may use mirrored views. A policy made from ops alone (tests, benchmarks) has no TTA and
    no summary facts."""

    def __init__(self, ops: list[Op], num_classes: int, config: Any = None, flips_label_safe: bool = True):
        self.ops = _fuse([o for o in ops if not o.mixes and not o.normalised])
        self.after_norm = [o for o in ops if o.normalised and not o.mixes]
        self.mixers = [o for o in ops if o.mixes]
        self.num_classes = num_classes
        self.config = config
        self.flips_label_safe = flips_label_safe

    @property
    def identity(self) -> bool:
        """No ops at all: training batches are the normalised training images, as they are."""
        return not self.ops and not self.after_norm and not self.mixers

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
    def normalised(self, x: Batch) -> Batch:
        """The ops that work on normalised images (random_erasing), after the per-image ops and normalisation."""
        for o in self.after_norm:
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
        """Every stage on a batch that needs no normalisation (the after-normalisation ops see it as given)."""
        return self.mix(self.normalised(self.images(x)), y)

    def train_batches(self, data, batch_size: int, order: torch.Generator, drop_last: bool,
                      chunk: Optional[int] = None) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        """One epoch of training batches of ``data`` (a ``regbench.data.Data``), shuffled by ``order``.

        Per-image ops run on [0, 1] images in chunks of the shuffled data (``data.batches``' ``chunk``), then
        normalisation; mixing ops run per batch (their partners come from the batch). The identity policy
        yields the already normalised training images. Random draws: the permutation from ``order``, the ops'
        parameters from torch's global generator, in the order the batches are consumed."""

        if self.identity:
            return batches(data.train_x, data.train_y, batch_size, order, drop_last)
        if self.after_norm:
            def transform(xb):
                return self.normalised(data.normalize(self.images(xb)))
        else:
            def transform(xb):
                return data.normalize(self.images(xb))
        stream = batches(data.train_raw, data.train_y, batch_size, order, drop_last, transform, chunk)
        return (self.mix(xb, yb) for xb, yb in stream) if self.mixers else stream

    def preview(self, data, k: int) -> Optional[tuple[Batch, Batch]]:
        """``k`` training images in [0, 1] before and after the per-image ops (every class in turn), or None for
        the identity policy or k = 0. Drawn under a forked RNG: the preview leaves training's draws alone. The
        after-normalisation ops (random_erasing) are shown mapped back to [0, 1] where the normalisation is
        elementwise (per_channel, featurewise, none); a samplewise or zca preview shows the per-image ops only."""
        if self.identity or k == 0:
            return None
        device = data.train_raw.device
        with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
            before = data.train_raw[preview_indices(data.train_y, k)]
            after = self.images(before)
            norm = data.normalize
            if self.after_norm and norm is not None and norm.kind in ("per_channel", "featurewise", "none"):
                after = (self.normalised(norm(after)) * norm.std + norm.mean).clamp_(0, 1)
            return before, after

    def tta(self, model: torch.nn.Module, x: torch.Tensor, y: torch.Tensor, batch_size: int) -> Optional[dict]:
        """Test-time augmentation of the normalised images ``x`` (``augmentation.tta``), or None when it is off."""
        if self.config is None or not self.config.tta.enabled:
            return None
        return tta_views.evaluate(model, x, y, self.config.tta, self.flips_label_safe, batch_size)

    def info(self) -> dict:
        """The policy as run, for summary.json: ``name`` is the preset's only when the ops are the preset's own,
        else ``custom`` (``preset`` keeps the name the ops started from)."""
        from omegaconf import OmegaConf

        ops = OmegaConf.to_container(self.config.ops, resolve=True)
        name = self.config.name
        info = {"name": name if preset_ops(name) in (None, ops) else "custom", "preset": name, "ops": ops,
                "soft_targets": self.soft_targets}
        if info["soft_targets"]:
            info["train_acc"] = "accuracy against the dominant label of each mixed target"
        return info


def preset_ops(name: str) -> Optional[list]:
    """The ops of regbench's augmentation preset ``name`` (None when there is no such preset file; a name that
    is not a plain file stem, e.g. from a saved config, is never turned into a path)."""
    from omegaconf import OmegaConf

    path = Path(__file__).resolve().parent.parent / "configs" / "augmentation" / f"{name}.yaml"
    if not re.fullmatch(r"[A-Za-z0-9_-]+", name) or not path.is_file():
        return None
    preset = OmegaConf.load(path)
    return OmegaConf.to_container(preset.ops, resolve=True) if "ops" in preset else None


def preview_indices(y: torch.Tensor, k: int) -> torch.Tensor:
    """``k`` training indices for the augmentation preview, stratified: the first image of each class in turn,
    then the second of each... (the training split is ordered by class, so its first k would be one class)."""
    y_host = y.cpu()  # once per run (the preview), not per step
    order = torch.argsort(y_host, stable=True)
    ys = y_host[order]
    first = torch.searchsorted(ys, ys, side="left")  # where each image's class starts in the sorted order
    rank = torch.arange(len(ys)) - first  # the image's position within its class
    key = rank * (int(ys.max()) + 1 if len(ys) else 1) + ys
    return order[torch.argsort(key, stable=True)[:k]].to(y.device)


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


def build_policy(cfg, info, stats=None) -> Policy:
    """The policy of ``cfg`` (the augmentation node) for dataset ``info`` (the identity when it has no ops);
    ``stats``: the training pixels' per-channel mean in [0, 1] (cutout's fill)."""
    ops = []
    seen_mixer = seen_normalised = False
    for i, spec in enumerate(cfg.ops):
        key = f"augmentation.ops[{i}]"
        if not isinstance(spec, dict):
            from omegaconf import OmegaConf

            spec = OmegaConf.to_container(spec, resolve=True) if not isinstance(spec, str) else {"op": spec}
        o = build_op(spec, key, _Info(info, stats))
        if seen_mixer and not o.mixes:
            raise ConfigError(key, spec, "mixing ops (mixup, cutmix, mixup_cutmix) last in the list")
        if seen_normalised and not (o.normalised or o.mixes):
            raise ConfigError(key, spec, "the per-image ops before random_erasing (it runs on the normalised images, "
                                         "after normalisation, as torchvision's references place RandomErasing)")
        seen_mixer |= o.mixes
        seen_normalised |= o.normalised
        ops.append(o)
    return Policy(ops, info.num_classes, cfg, info.flips_label_safe)


class _Info:
    """What ops may check: the dataset's channels / name and the training mean (for cutout's fill)."""

    def __init__(self, info, stats):
        self.name, self.channels = info.name, info.channels
        if stats is not None:
            self.mean = stats
