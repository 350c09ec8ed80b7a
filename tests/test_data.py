"""Data: the embedded MNIST sample, torchvision's loaders on generated files, splits, statistics, batches."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from regbench.data import batches, load_data, num_batches
from regbench.datasets import DATASETS, _read_mnist5k
from regbench.errors import ConfigError, DataError
from regbench.splits import stratified_take
from tests.conftest import compose_cfg, config_options, make_cifar, make_mnist_like, make_svhn

CPU = torch.device("cpu")


def data_cfg(*overrides):
    return compose_cfg(*overrides).data


def test_mnist5k_is_the_real_sample():
    x, y = _read_mnist5k()
    assert x.shape == (5000, 1, 28, 28) and x.dtype == np.uint8
    assert np.bincount(y).tolist() == [500] * 10
    assert x.max() == 255 and x.min() == 0
    # The first row of the file is a '0' whose first ink is 51, 159, 253, 159, 50 at row 4, columns 15-19.
    assert y[0] == 0
    assert x[0, 0, 4, 15:20].tolist() == [51, 159, 253, 159, 50]


def test_mnist5k_default_split_is_stratified_and_disjoint():
    d = load_data(data_cfg(), CPU)
    assert (len(d.train_y), len(d.val_y), len(d.test_y)) == (3600, 400, 1000)
    assert torch.bincount(d.test_y).tolist() == [100] * 10
    assert torch.bincount(d.val_y).tolist() == [40] * 10
    assert torch.bincount(d.train_y).tolist() == [360] * 10
    # No image appears in two splits (images of the sample are all distinct).
    flat = lambda t: {tuple(r) for r in t.flatten(1).round(decimals=4).tolist()}  # noqa: E731
    tr, va, te = flat(d.train_x), flat(d.val_x), flat(d.test_x)
    assert not (tr & va) and not (tr & te) and not (va & te)


def test_split_depends_on_split_seed_only():
    a = load_data(data_cfg("seed=1"), CPU)
    b = load_data(data_cfg("seed=2"), CPU)
    c = load_data(data_cfg("data.split_seed=7"), CPU)
    assert torch.equal(a.val_x, b.val_x) and torch.equal(a.test_y, b.test_y)
    assert not torch.equal(a.val_x, c.val_x)


def test_train_size_subset_is_stratified_and_stats_come_from_it():
    d = load_data(data_cfg("data.train_size=100"), CPU)
    assert torch.bincount(d.train_y).tolist() == [10] * 10
    # Normalised with the training subset's own statistics: mean 0, std 1 over the training images.
    assert d.train_x.mean().item() == pytest.approx(0.0, abs=1e-5)
    assert d.train_x.std().item() == pytest.approx(1.0, abs=1e-4)
    assert 0.10 < d.mean[0] < 0.16 and 0.28 < d.std[0] < 0.34  # MNIST's familiar 0.13 / 0.31
    assert d.meta["mean"] == d.mean and d.meta["train"] == 100


def test_normalize_none_keeps_unit_range():
    d = load_data(data_cfg("data.normalize=none"), CPU)
    assert d.train_x.min().item() == 0.0 and d.train_x.max().item() == 1.0
    assert d.mean == [0.0] and d.std == [1.0]


def test_classes_keep_and_renumber_labels_after_the_test_split():
    full = load_data(data_cfg("data.normalize=none"), CPU)
    high = load_data(data_cfg("data.normalize=none", "data.classes=[5,6,7,8,9]"), CPU)
    assert high.info.num_classes == 5 and high.meta["num_classes"] == 5 and high.meta["classes"] == [5, 6, 7, 8, 9]
    # the same test images as the full split's digits 5-9 (filtered after mnist5k's own test split), relabelled 0-4
    keep = full.test_y >= 5
    assert torch.equal(high.test_x, full.test_x[keep]) and torch.equal(high.test_y, full.test_y[keep] - 5)
    assert torch.bincount(high.test_y).tolist() == [100] * 5 and len(high.train_y) + len(high.val_y) == 2000
    swapped = load_data(data_cfg("data.normalize=none", "data.classes=[9,5]"), CPU)
    assert torch.equal(swapped.test_x[swapped.test_y == 0], full.test_x[full.test_y == 9])


def test_train_size_larger_than_split_is_a_config_error():
    with pytest.raises(ConfigError, match=r"data.train_size=3601: expected at most 3600"):
        load_data(data_cfg("data.train_size=3601"), CPU)


def test_stratified_take_exact_count_and_proportions():
    y = torch.tensor([0] * 50 + [1] * 30 + [2] * 20)
    taken, rest = stratified_take(y, 10, torch.Generator().manual_seed(0))
    assert len(taken) == 10 and len(rest) == 90
    assert torch.bincount(y[taken]).tolist() == [5, 3, 2]
    assert sorted(torch.cat([taken, rest]).tolist()) == list(range(100))
    # Largest remainder: 7 of (50, 30, 20) -> exact (3.5, 2.1, 1.4) -> floors (3, 2, 1), the .5 gets the extra one.
    taken, _ = stratified_take(y, 7, torch.Generator().manual_seed(0))
    assert torch.bincount(y[taken]).tolist() == [4, 2, 1]


def test_batches_cover_each_sample_once_and_follow_the_generator():
    x = torch.arange(10).float().view(10, 1, 1, 1)
    y = torch.arange(10)
    got = list(batches(x, y, 4, torch.Generator().manual_seed(3)))
    assert [len(b[1]) for b in got] == [4, 4, 2]
    assert sorted(torch.cat([b[1] for b in got]).tolist()) == list(range(10))
    assert all(torch.equal(bx.flatten().long(), by) for bx, by in got)  # x and y stay paired
    again = list(batches(x, y, 4, torch.Generator().manual_seed(3)))
    assert all(torch.equal(a[1], b[1]) for a, b in zip(got, again))
    assert [len(b[1]) for b in batches(x, y, 4, torch.Generator().manual_seed(3), drop_last=True)] == [4, 4]
    assert num_batches(10, 4, False) == 3 and num_batches(10, 4, True) == 2


@pytest.mark.parametrize("drop_last", [False, True])
def test_batches_gathered_a_chunk_at_a_time_are_the_batches_gathered_one_by_one(drop_last):
    x, y = torch.randn(103, 3, 4, 4), torch.arange(103)
    one_by_one = list(batches(x, y, 8, torch.Generator().manual_seed(1), drop_last, chunk=8))
    default = list(batches(x, y, 8, torch.Generator().manual_seed(1), drop_last))  # ~4 MiB chunks: one here
    odd = list(batches(x, y, 8, torch.Generator().manual_seed(1), drop_last, chunk=20))  # 2 batches per chunk
    assert len(one_by_one) == len(default) == len(odd) == (12 if drop_last else 13)
    for (a, ay), (b, by), (c, cy) in zip(one_by_one, default, odd):
        assert torch.equal(a, b) and torch.equal(ay, by) and torch.equal(a, c) and torch.equal(ay, cy)
    # the default cuts one gather into views: consecutive batches share its storage
    assert default[0][0].untyped_storage().data_ptr() == default[1][0].untyped_storage().data_ptr()


# ------------------------------------------------------------------ torchvision loaders, generated files


@pytest.mark.parametrize("name,folder", [("mnist", "MNIST"), ("fashion_mnist", "FashionMNIST")])
def test_mnist_family_through_torchvision(tmp_path, name, folder):
    made = make_mnist_like(tmp_path, folder)
    pool_x, pool_y, test_x, test_y = DATASETS[name].load(data_cfg(f"data={name}", f"data.root={tmp_path}",
                                                                  "data.download=false"))
    assert pool_x.shape == (240, 1, 28, 28) and pool_x.dtype == torch.uint8
    assert np.array_equal(pool_x[:, 0].numpy(), made["train"][0])
    assert np.array_equal(test_y.numpy(), made["t10k"][1])


@pytest.mark.parametrize("classes", [10, 100])
def test_cifar_through_torchvision(tmp_path, monkeypatch, classes):
    made = make_cifar(tmp_path, monkeypatch, classes=classes)
    name = "cifar10" if classes == 10 else "cifar100"
    pool_x, pool_y, test_x, test_y = DATASETS[name].load(data_cfg(f"data={name}", f"data.root={tmp_path}",
                                                                  "data.download=false"))
    # CHW order restored from torchvision's HWC arrays, pixel for pixel.
    assert pool_x.shape == (250, 3, 32, 32)
    assert np.array_equal(pool_x.numpy(), made["train"][0])
    assert np.array_equal(pool_y.numpy(), made["train"][1])
    assert np.array_equal(test_x.numpy(), made["test"][0])


def test_svhn_through_torchvision(tmp_path, monkeypatch):
    made = make_svhn(tmp_path, monkeypatch)
    pool_x, pool_y, test_x, test_y = DATASETS["svhn"].load(data_cfg("data=svhn", f"data.root={tmp_path}",
                                                                    "data.download=false"))
    assert np.array_equal(pool_x.numpy(), made["train"][0])
    assert np.array_equal(pool_y.numpy(), made["train"][1])  # label 10 -> digit 0
    assert np.array_equal(test_y.numpy(), made["test"][1])


def test_torchvision_dataset_splits_and_rgb_statistics(tmp_path, monkeypatch):
    made = make_cifar(tmp_path, monkeypatch, classes=10)
    d = load_data(data_cfg("data=cifar10", f"data.root={tmp_path}", "data.download=false", "data.test_size=20"), CPU)
    assert (len(d.train_y), len(d.val_y), len(d.test_y)) == (225, 25, 20)
    assert d.input_shape == (3, 32, 32) and len(d.mean) == 3
    # Statistics use the training split only: undo the normalisation, recover the uint8 training images and
    # recompute their per-channel mean; the whole pool (train + val) gives a measurably different one.
    std = torch.tensor(d.std).view(1, 3, 1, 1)
    mean = torch.tensor(d.mean).view(1, 3, 1, 1)
    raw_train = ((d.train_x * std + mean) * 255).round().double()
    assert raw_train.mean(dim=(0, 2, 3)).div(255).tolist() == pytest.approx(d.mean, abs=1e-6)
    pool_mean = (made["train"][0].astype(np.float64) / 255).mean(axis=(0, 2, 3))
    assert max(abs(a - b) for a, b in zip(pool_mean, d.mean)) > 1e-5
    assert d.train_x.transpose(0, 1).flatten(1).mean(1).abs().max().item() < 1e-5


ON_DISK = [name for name, info in DATASETS.items() if not info.embedded]


def test_every_dataset_has_its_yaml_and_schema():
    """The table is the one list of datasets: each has configs/data/<name>.yaml composing to its own schema."""
    from omegaconf import OmegaConf

    from regbench.registry import DATASETS as TABLE

    assert config_options("data") == sorted(TABLE)
    for name in TABLE:
        d = data_cfg(f"data={name}")
        assert d.name == name == DATASETS[name].name
        assert OmegaConf.get_type(d) is TABLE[name].schema
        assert ("root" in d) == (not DATASETS[name].embedded)  # torchvision's datasets are read from data.root


@pytest.mark.parametrize("name", ON_DISK)
def test_missing_dataset_offline_is_one_clear_line(tmp_path, name):
    cfg = data_cfg(f"data={name}", f"data.root={tmp_path}", "data.download=false")
    with pytest.raises(DataError) as e:
        load_data(cfg, CPU)
    msg = str(e.value)
    assert "\n" not in msg
    assert msg.startswith(f"data={name}: dataset files missing or corrupt in {tmp_path}")
    assert "data.download=false" in msg and "fix:" in msg


def test_corrupt_cifar_file_is_reported(tmp_path, monkeypatch):
    make_cifar(tmp_path, monkeypatch)
    (tmp_path / "cifar-10-batches-py" / "data_batch_1").write_bytes(b"garbage")
    with pytest.raises(DataError, match="data=cifar10: dataset files missing or corrupt"):
        load_data(data_cfg("data=cifar10", f"data.root={tmp_path}", "data.download=false"), CPU)
