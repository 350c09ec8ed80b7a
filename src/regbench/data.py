"""Datasets decoded once into tensors on the training device, split train/val/test, batched by permutation.

Which datasets exist and how each is read: regbench/datasets.py (the table); the seeded splits:
regbench/splits.py. Here: the bundle a run trains on (normalised tensors on the device) and its batches. No
DataLoader, no per-sample Python in the training loop.
"""

from __future__ import annotations

import dataclasses
import logging
from dataclasses import dataclass, field
from typing import Callable, Iterator, Optional

import torch
from omegaconf import DictConfig

from regbench.datasets import DATASETS, DatasetInfo
from regbench.errors import ConfigError
from regbench.splits import seeded_generator, split_validation, stratified_take

log = logging.getLogger(__name__)

# ------------------------------------------------------------------------------------------ bundle


class Normalizer:
    """Maps [0, 1] images to the model's input; statistics come from the training split only.

    per_channel: (x − mean_c) / std_c over all training pixels of channel c (the usual choice; what Keras calls
    featurewise_center + featurewise_std_normalization). featurewise: (x − mean_f) / (std_f + 1e-6) for every
    input feature f (pixel and channel) separately. samplewise: each image minus its own mean, divided by its
    own std (+ 1e-6). zca: per-feature centring, then ZCA whitening W = U·diag(1/√(S + ε))·Uᵀ from the
    training covariance. none: the [0, 1] pixels as they are.
    """

    def __init__(self, kind: str, train01: torch.Tensor, zca_epsilon: float = 0.1):
        self.kind = kind
        x = train01.double()
        c = x.shape[1]
        self.mean = torch.zeros(1, c, 1, 1, dtype=torch.float64)
        self.std = torch.ones(1, c, 1, 1, dtype=torch.float64)
        self.zca: Optional[torch.Tensor] = None
        if kind == "per_channel":
            self.mean = x.mean(dim=(0, 2, 3), keepdim=True)
            self.std = x.std(dim=(0, 2, 3), keepdim=True).clamp_min(1e-8)
        elif kind == "featurewise":
            self.mean = x.mean(dim=0, keepdim=True)
            self.std = x.std(dim=0, keepdim=True) + 1e-6
        elif kind == "zca":
            self.mean = x.mean(dim=0, keepdim=True)
            flat = (x - self.mean).flatten(1)
            cov = flat.T @ flat / len(flat)
            eigval, eigvec = torch.linalg.eigh(cov)
            self.zca = (eigvec * (1.0 / torch.sqrt(eigval.clamp_min(0) + zca_epsilon))) @ eigvec.T

    def to(self, device: torch.device) -> "Normalizer":
        self.mean = self.mean.to(device, torch.float32)
        self.std = self.std.to(device, torch.float32)
        if self.zca is not None:
            self.zca = self.zca.to(device, torch.float32)
        return self

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        if self.kind == "samplewise":
            dims = tuple(range(1, x.ndim))
            return (x - x.mean(dim=dims, keepdim=True)) / (x.std(dim=dims, keepdim=True) + 1e-6)
        if self.kind == "zca":
            return ((x - self.mean).flatten(1) @ self.zca).view_as(x)
        return (x - self.mean) / self.std


@dataclass
class Data:
    """Normalised float32 tensors on the training device, plus what the run records about them.

    ``train_raw`` (the training images in [0, 1]) is kept only when an augmentation policy needs it; the
    policy's output then goes through ``normalize``.
    """

    info: DatasetInfo
    train_x: torch.Tensor
    train_y: torch.Tensor
    val_x: torch.Tensor
    val_y: torch.Tensor
    test_x: torch.Tensor
    test_y: torch.Tensor
    mean: list[float]
    std: list[float]
    normalize: Optional[Normalizer] = None
    pixel_mean: list[float] = field(default_factory=list)  # per-channel mean of the training pixels in [0, 1]
    train_raw: Optional[torch.Tensor] = None
    meta: dict = field(default_factory=dict)

    @property
    def input_shape(self) -> tuple[int, int, int]:
        return tuple(self.train_x.shape[1:])  # type: ignore[return-value]


def load_data(cfg: DictConfig, device: torch.device, keep_raw: bool = False) -> Data:
    """Decode ``cfg.name``, split it with ``cfg.split_seed``, normalise with training statistics, move to device.

    ``keep_raw``: also keep the training images in [0, 1] for an augmentation policy."""
    info = DATASETS[cfg.name]
    pool_x, pool_y, test_x, test_y = info.load(cfg)
    if cfg.classes is not None:
        info = dataclasses.replace(info, num_classes=len(cfg.classes))
        pool_x, pool_y = keep_classes(pool_x, pool_y, cfg.classes)
        test_x, test_y = keep_classes(test_x, test_y, cfg.classes)

    val_idx, train_idx = split_validation(pool_y, cfg)
    n_val = len(val_idx)
    if cfg.train_size is not None:
        if cfg.train_size > len(train_idx):
            raise ConfigError("data.train_size", cfg.train_size,
                              f"at most {len(train_idx)} (the training split of {cfg.name} after holding out "
                              f"{n_val} for validation)", "lower it or set data.train_size=null")
        keep, _ = stratified_take(pool_y[train_idx], cfg.train_size, seeded_generator(cfg.split_seed + 2))
        train_idx = train_idx[keep]
    if not info.embedded and cfg.test_size is not None:
        if cfg.test_size > len(test_y):
            raise ConfigError("data.test_size", cfg.test_size, f"at most {len(test_y)} (the {cfg.name} test set)")
        keep, _ = stratified_take(test_y, cfg.test_size, seeded_generator(cfg.split_seed + 3))
        test_x, test_y = test_x[keep], test_y[keep]

    train_x, train_y = pool_x[train_idx], pool_y[train_idx]
    val_x, val_y = pool_x[val_idx], pool_y[val_idx]

    # Statistics from the training images only (never validation or test), on [0, 1] pixels.
    scaled = train_x.double().div_(255)
    norm = Normalizer(cfg.normalize, scaled, cfg.zca_epsilon).to(device)
    pixel_mean = [float(v) for v in scaled.mean(dim=(0, 2, 3))]

    def to01(x: torch.Tensor) -> torch.Tensor:
        return x.to(device=device, dtype=torch.float32).div_(255)

    def prep(x: torch.Tensor) -> torch.Tensor:
        return norm(to01(x)).contiguous()

    per_channel = norm.kind in ("per_channel", "none")  # the modes whose constants are one number per channel
    data = Data(
        info=info,
        train_x=prep(train_x), train_y=train_y.to(device),
        val_x=prep(val_x), val_y=val_y.to(device),
        test_x=prep(test_x), test_y=test_y.to(device),
        mean=[float(v) for v in norm.mean.flatten()] if per_channel else [0.0] * info.channels,
        std=[float(v) for v in norm.std.flatten()] if per_channel else [1.0] * info.channels,
        normalize=norm, pixel_mean=pixel_mean,
        train_raw=to01(train_x).contiguous() if keep_raw else None,
    )
    data.meta = {
        "name": cfg.name,
        "train": len(train_y), "val": len(val_y), "test": len(test_y),
        "input_shape": list(data.input_shape), "num_classes": info.num_classes,
        "normalize": cfg.normalize, "mean": data.mean, "std": data.std, "pixel_mean": pixel_mean,
        "split_seed": cfg.split_seed, "val_split": cfg.val_split,
    }
    if cfg.classes is not None:
        data.meta["classes"] = list(cfg.classes)
    if cfg.normalize == "zca":
        data.meta["zca_epsilon"] = cfg.zca_epsilon
    log.info("data %s: train %d, val %d, test %d, shape %s, normalize %s, pixel mean %s", cfg.name, len(train_y),
             len(val_y), len(test_y), list(data.input_shape), cfg.normalize, _fmt(pixel_mean))
    return data


def keep_classes(x: torch.Tensor, y: torch.Tensor, classes) -> tuple[torch.Tensor, torch.Tensor]:
    """The images whose label is in ``classes``, relabelled with the label's position in ``classes``.

    Filtering runs after the dataset's own test split (mnist5k: its seeded 1,000), so two disjoint sets of
    classes (digits 0-4 and 5-9) get disjoint images, and every split keeps its class proportions."""
    remap = torch.full((max(int(y.max()), *classes) + 1,), -1, dtype=torch.int64)
    remap[torch.tensor(list(classes), dtype=torch.int64)] = torch.arange(len(classes))
    new = remap[y]
    keep = new >= 0
    return x[keep], new[keep]


def _fmt(values: list[float]) -> str:
    return "[" + ", ".join(f"{v:.4f}" for v in values) + "]"


def batches(x: torch.Tensor, y: torch.Tensor, batch_size: int, g: torch.Generator, drop_last: bool = False,
            transform: Optional[Callable[[torch.Tensor], torch.Tensor]] = None,
            chunk: Optional[int] = None) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """One epoch of shuffled mini-batches: a permutation drawn on the data's device, then index_select of a chunk
    of batches at once, cut into batches (views).

    Without ``transform`` a chunk holds about 4 MiB of images: one gather reads the scattered rows once, and the
    batches are then contiguous slices (measured ~4 % of a lecture-MLP step on 2 CPU cores against a gather per
    batch, docs/benchmarks.md). ``transform`` (per-image augmentation + normalisation:
    ``augment.Policy.train_batches`` passes it, the one augmentation path) runs on chunks of about ``chunk``
    images at once, then the chunk is cut into batches; every image still gets its own random parameters.
    Default: one batch per chunk on CPU (measured fastest: larger chunks fall out of the caches, 3x slower at
    2,048 CIFAR images), 2,048 images on CUDA, where a bigger launch amortises the fixed cost per call (not
    measured here).
    """
    n = len(y)
    if chunk is None and transform is None:  # about 4 MiB of images per gather, at least one batch
        chunk = (4 << 20) // max(1, x[0].numel() * x.element_size()) if n else batch_size
    elif chunk is None:
        chunk = 2048 if x.device.type == "cuda" else batch_size
    perm = torch.randperm(n, generator=g, device=x.device)
    stop = n - n % batch_size if drop_last else n
    step = batch_size * max(1, chunk // batch_size)
    for c in range(0, stop, step):
        idx = perm[c:min(c + step, stop)]
        xc, yc = x.index_select(0, idx), y.index_select(0, idx)
        xc = transform(xc) if transform is not None else xc
        for i in range(0, len(idx), batch_size):
            yield xc[i:i + batch_size], yc[i:i + batch_size]


def num_batches(n: int, batch_size: int, drop_last: bool) -> int:
    return n // batch_size if drop_last else -(-n // batch_size)
