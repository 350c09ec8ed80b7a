"""Shared fixtures: composing the real configs, and small datasets written in torchvision's on-disk formats."""

from __future__ import annotations

import gzip
import hashlib
import logging
import os
import pickle
import struct
from pathlib import Path

import numpy as np
import pytest
from hydra import compose, initialize_config_dir

import regbench.cli  # noqa: F401  (registers the schemas and resolvers)
from regbench.cli import CONFIG_DIR

REPO = Path(__file__).resolve().parents[1]

# Under pytest-xdist every worker trains on its share of the cores: two workers with torch's all-cores default on a
# 2-core machine would each run 2 threads, the oversubscription that stalls torch's thread pool (issue 30). The
# workers' runs (and the subprocesses they start) default to their share through OMP_NUM_THREADS, which
# trainer.num_threads=null honours (regbench.runtime.default_num_threads); a test that sets threads is unaffected.
if int(os.environ.get("PYTEST_XDIST_WORKER_COUNT", "1")) > 1 and "OMP_NUM_THREADS" not in os.environ:
    os.environ["OMP_NUM_THREADS"] = str(max(1, (os.cpu_count() or 1) // int(os.environ["PYTEST_XDIST_WORKER_COUNT"])))

# Two computations of one float32 quantity along different paths (another batch size or summation order, another
# SIMD width: AVX2 vs AVX-512 kernels) agree to some units of float32's eps, never to 1e-9: compare such results
# with this relative tolerance (64 eps ≈ 7.6e-6). Bitwise comparisons of reruns on one machine stay exact.
F32_REL = 64 * 2.0 ** -23

# A tiny, fast setting for runs that only need to exercise the pipeline.
TINY = ["data.train_size=64", "data.batch_size=32", "data.val_fraction=0.025", "data.test_size=100",
        "trainer.max_epochs=1", "trainer.progress_bar=false"]


@pytest.fixture(autouse=True)
def _restore_logging():
    """Hydra's in-process runs attach log handlers to the test's captured stderr; drop them afterwards."""
    root = logging.getLogger()
    handlers, level = root.handlers[:], root.level
    yield
    root.handlers[:] = handlers
    root.setLevel(level)


def one_line_error(capsys, *argv) -> str:
    """Run the command in-process; return its one stderr line (asserting exit status 2 and a single line)."""
    from regbench.cli import main

    with pytest.raises(SystemExit) as e:
        main(list(argv))
    assert e.value.code == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("regbench: error: "), err
    return err.strip()


def compose_cfg(*overrides: str, config_dir: Path = CONFIG_DIR, config_name: str = "train"):
    with initialize_config_dir(config_dir=str(config_dir), version_base="1.3"):
        return compose(config_name=config_name, overrides=list(overrides))


def config_options(group: str) -> list[str]:
    return sorted(p.stem for p in (REPO / "configs" / group).glob("*.yaml"))


# Tests that loop over the model registry use these overrides to keep a family small and offline.
SMALL_MODEL = {"torchvision": ["model.arch=mobilenet_v3_small", "model.weights=null", "model.input_size=32"],
               "resnet": ["model.depth=8"]}
NO_LAYER_SLOTS = {"torchvision"}  # the arch has its own layers: it refuses every layer slot (test_backbones.py)


def model_options() -> list[str]:
    """Every registered model family."""
    import regbench.validation  # noqa: F401 — imports every module that registers
    from regbench.registry import MODELS

    return MODELS.names()


def layered_models() -> list[str]:
    """The families that apply regbench's layer slots (dropout, norms...) and so train under every member."""
    return [m for m in model_options() if m not in NO_LAYER_SLOTS]


def small_model(name: str) -> list[str]:
    return [f"model={name}", *SMALL_MODEL.get(name, [])]


# ------------------------------------------------------------------------ torchvision on-disk formats


def _md5(path: Path) -> str:
    return hashlib.md5(path.read_bytes()).hexdigest()


def write_idx(folder: Path, prefix: str, images: np.ndarray, labels: np.ndarray, gz: bool = False) -> None:
    """MNIST's IDX format: big-endian magic (0x0803 images / 0x0801 labels), dims, then uint8 data."""
    folder.mkdir(parents=True, exist_ok=True)
    n, h, w = images.shape
    files = {
        f"{prefix}-images-idx3-ubyte": struct.pack(">iiii", 0x803, n, h, w) + images.astype(np.uint8).tobytes(),
        f"{prefix}-labels-idx1-ubyte": struct.pack(">ii", 0x801, n) + labels.astype(np.uint8).tobytes(),
    }
    for name, payload in files.items():
        (folder / name).write_bytes(payload)
        if gz:
            (folder / f"{name}.gz").write_bytes(gzip.compress(payload))


def make_mnist_like(root: Path, cls_folder: str, n_train: int = 240, n_test: int = 100, seed: int = 0) -> dict:
    rng = np.random.default_rng(seed)
    out = {}
    for prefix, n in (("train", n_train), ("t10k", n_test)):
        x = rng.integers(0, 256, size=(n, 28, 28), dtype=np.uint8)
        y = np.arange(n) % 10
        write_idx(root / cls_folder / "raw", prefix, x, y, gz=True)
        out[prefix] = (x, y)
    return out


def make_cifar(root: Path, monkeypatch, classes: int = 10, n_train: int = 250, n_test: int = 100,
               seed: int = 0) -> dict:
    """CIFAR python-pickle batches; torchvision's md5 table is pointed at the generated files."""
    import torchvision.datasets as tvd

    rng = np.random.default_rng(seed)
    cls = tvd.CIFAR10 if classes == 10 else tvd.CIFAR100
    folder = root / cls.base_folder
    folder.mkdir(parents=True, exist_ok=True)
    label_key = "labels" if classes == 10 else "fine_labels"
    x_train = rng.integers(0, 256, size=(n_train, 3, 32, 32), dtype=np.uint8)
    y_train = np.arange(n_train) % classes
    x_test = rng.integers(0, 256, size=(n_test, 3, 32, 32), dtype=np.uint8)
    y_test = np.arange(n_test) % classes

    def dump(name, x, y):
        path = folder / name
        with open(path, "wb") as f:
            pickle.dump({"data": x.reshape(len(x), -1), label_key: [int(v) for v in y]}, f)
        return [name, _md5(path)]

    train_names = [n for n, _ in cls.train_list]
    chunks = np.array_split(np.arange(n_train), len(train_names))
    train_list = [dump(name, x_train[idx], y_train[idx]) for name, idx in zip(train_names, chunks)]
    test_list = [dump(cls.test_list[0][0], x_test, y_test)]
    meta_path = folder / cls.meta["filename"]
    with open(meta_path, "wb") as f:
        pickle.dump({cls.meta["key"]: [f"class{i}" for i in range(classes)]}, f)
    monkeypatch.setattr(cls, "train_list", train_list)
    monkeypatch.setattr(cls, "test_list", test_list)
    monkeypatch.setattr(cls, "meta", {**cls.meta, "md5": _md5(meta_path)})
    return {"train": (x_train, y_train), "test": (x_test, y_test)}


def make_svhn(root: Path, monkeypatch, n_train: int = 200, n_test: int = 100, seed: int = 0) -> dict:
    """SVHN's .mat files: X is H x W x C x N, y is N x 1 with digit 0 stored as 10."""
    import scipy.io
    import torchvision.datasets as tvd

    rng = np.random.default_rng(seed)
    root.mkdir(parents=True, exist_ok=True)
    split_list = {k: list(v) for k, v in tvd.SVHN.split_list.items()}
    out = {}
    for split, n in (("train", n_train), ("test", n_test)):
        x = rng.integers(0, 256, size=(n, 3, 32, 32), dtype=np.uint8)
        y = np.arange(n) % 10
        path = root / split_list[split][1]
        scipy.io.savemat(path, {"X": x.transpose(2, 3, 1, 0), "y": np.where(y == 0, 10, y).reshape(-1, 1)})
        split_list[split][2] = _md5(path)
        out[split] = (x, y)
    monkeypatch.setattr(tvd.SVHN, "split_list", split_list)
    return out


@pytest.fixture
def tv_root(tmp_path, monkeypatch) -> Path:
    """A data.root holding small generated copies of every torchvision dataset regbench supports."""
    root = tmp_path / "tvdata"
    make_mnist_like(root, "MNIST", seed=1)
    make_mnist_like(root, "FashionMNIST", seed=2)
    make_cifar(root, monkeypatch, classes=10, seed=3)
    make_cifar(root, monkeypatch, classes=100, n_train=400, n_test=100, seed=4)
    make_svhn(root, monkeypatch, seed=5)
    return root


def writes_fail_after_epoch(monkeypatch, epoch: int, err: int) -> None:
    """From after ``epoch``'s summary.json on, every file regbench.io opens for writing fails with errno ``err``
    (a run folder made read-only mid-run, a file-size limit: simulated at the OS call, since root ignores file
    modes). The previous epochs' files are on disk as a synchronous run would have written them."""
    import os
    import regbench.io as rio
    import regbench.run as train

    failing = {"on": False}

    class FailingOS:
        def __getattr__(self, name):
            return getattr(os, name)

        def open(self, path, flags, *args, **kwargs):
            if failing["on"] and flags & (os.O_WRONLY | os.O_RDWR):
                raise OSError(err, os.strerror(err), str(path))
            return os.open(path, flags, *args, **kwargs)

    monkeypatch.setattr(rio, "os", FailingOS())
    monkeypatch.setattr(train, "fault_point", _once_recorded(train.fault_point, epoch,
                                                              lambda: failing.update(on=True)))


def _once_recorded(real, epoch: int, then):
    """regbench's fault_point hook ``real`` that, once ``epoch``'s summary.json is written (the background writer
    settled: its files on disk), calls ``then``."""

    def hook(point, at, settle=None):
        real(point, at, settle)
        if point == "after_summary" and at == epoch:
            if settle is not None:
                settle()
            then()

    return hook


def interrupt_then_resume(monkeypatch, overrides, run_dir: Path, epoch: int) -> None:
    """A run of ``overrides`` stopped by Ctrl-C right after epoch ``epoch`` is recorded (its checkpoint and
    summary.json on disk), then resumed in this process with trainer.resume=true: the cheap form of
    tests/test_resume.py's killed subprocesses, for a member's bitwise-resume test."""
    import regbench.run as train
    from regbench.train import fit

    def stop():
        raise KeyboardInterrupt

    with monkeypatch.context() as m:
        m.setattr(train, "fault_point", _once_recorded(train.fault_point, epoch, stop))
        with pytest.raises(KeyboardInterrupt):
            fit(compose_cfg(*overrides), run_dir)
    fit(compose_cfg(*overrides, "trainer.resume=true"), run_dir)
