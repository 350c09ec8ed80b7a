#!/usr/bin/env python
"""Augmentation throughput: regbench's batched policy vs the conventional per-sample torchvision pipeline.

Same ops on both sides — horizontal flip, 4-pixel reflect-padded random crop, affine (±15°, ±10 % shifts),
random erasing — on MNIST-sized (1×28×28) and CIFAR-sized (3×32×32) images, batch 128, in one process:

- regbench: ``regbench.augment.Policy`` on whole batches held as tensors (what training runs).
- torchvision: ``transforms.v2.Compose`` applied per sample in a ``Dataset.__getitem__``, batched by a
  ``DataLoader`` with 0 and with 2 worker processes (the usual PyTorch recipe).

A third row does the same for the ``heavy`` preset on CIFAR-sized images: crop, flip, TrivialAugmentWide
(one of 14 ops per image — regbench's strategy groups the images by op on CPU) and random erasing, against
torchvision's ``RandomCrop``, ``RandomHorizontalFlip``, ``TrivialAugmentWide`` and ``RandomErasing``.

Also: the MLP's epoch time on the embedded MNIST sample with and without the ``digits`` policy.

    python scripts/bench_augment.py            # about three minutes on 2 cores
    python scripts/bench_augment.py --device cuda
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import sys
import time
from pathlib import Path

import torch
from torch.utils.data import DataLoader, Dataset
from torchvision.transforms import v2

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))

import regbench.cli  # noqa: E402,F401
from hydra import compose, initialize_config_dir  # noqa: E402

from regbench.augment import build_policy  # noqa: E402
from regbench.cli import CONFIG_DIR  # noqa: E402
from regbench.data import DATASETS, batches, load_data  # noqa: E402
from regbench.models import build_model  # noqa: E402
from regbench.optim import build_optimizer  # noqa: E402
from regbench.loop import AutogradStep, train_one_epoch  # noqa: E402

OPS = [{"op": "hflip", "p": 0.5}, {"op": "crop", "padding": 4, "padding_mode": "reflect"},
       {"op": "affine", "rotation": 15, "translate": 0.1, "fill": "zero"},
       {"op": "cutout", "p": 0.5, "value": 0.0}]


def torchvision_pipeline(size: int) -> v2.Compose:
    return v2.Compose([
        v2.RandomHorizontalFlip(0.5),
        v2.RandomCrop(size, padding=4, padding_mode="reflect"),
        v2.RandomAffine(degrees=15, translate=(0.1, 0.1), interpolation=v2.InterpolationMode.BILINEAR),
        v2.RandomErasing(p=0.5, value=0.0),
    ])


class PerSample(Dataset):
    def __init__(self, x, y, transform):
        self.x, self.y, self.transform = x, y, transform

    def __len__(self):
        return len(self.y)

    def __getitem__(self, i):
        return self.transform(self.x[i]), self.y[i]


def sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize()


def time_it(fn, device, repeats):
    times = []
    for _ in range(repeats):
        sync(device)
        t0 = time.perf_counter()
        fn()
        sync(device)
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def heavy_torchvision_pipeline(size: int) -> v2.Compose:
    """The ``heavy`` preset's ops in torchvision: crop, flip, TrivialAugmentWide, random erasing."""
    return v2.Compose([
        v2.RandomCrop(size, padding=4, padding_mode="reflect"),
        v2.RandomHorizontalFlip(0.5),
        v2.TrivialAugmentWide(),
        v2.RandomErasing(p=0.5, scale=(0.02, 0.25), value=0.5),
    ])


def bench_pipelines(channels: int, size: int, n: int, device, repeats: int, overrides: list[str],
                    pipeline: v2.Compose) -> dict[str, float]:
    x = torch.rand(n, channels, size, size)
    y = torch.randint(0, 10, (n,))
    info = DATASETS["cifar10" if channels == 3 else "mnist5k"]
    with initialize_config_dir(config_dir=str(CONFIG_DIR), version_base="1.3"):
        cfg = compose("train", [*overrides, "augmentation.allow_label_unsafe=true"])
    policy = build_policy(cfg.augmentation, info, [0.5] * channels)
    xd, yd = x.to(device), y.to(device)
    g = torch.Generator(device=device).manual_seed(0)

    def ours():  # as in training: per-image ops on chunks of the shuffled data, cut into batches of 128
        for xb, yb in batches(xd, yd, 128, g, transform=policy.images):
            pass

    results = {"regbench": n / time_it(ours, device, repeats)}
    ds = PerSample(x, y, pipeline)
    for workers in (0, 2):
        loader = DataLoader(ds, batch_size=128, shuffle=True, num_workers=workers,
                            persistent_workers=workers > 0)

        def theirs(loader=loader):
            for _ in loader:
                pass

        theirs()  # start the workers / warm up
        results[f"torchvision_{workers}w"] = n / time_it(theirs, device, max(1, repeats // 2))
    return results


def _ops_override() -> str:
    parts = []
    for o in OPS:
        parts.append("{" + ",".join(f"{k}:{v}" for k, v in o.items()) + "}")
    return "[" + ",".join(parts) + "]"


def bench_mlp_epoch(device, repeats: int) -> dict[str, float]:
    out = {}
    for preset in ("none", "digits"):
        with initialize_config_dir(config_dir=str(CONFIG_DIR), version_base="1.3"):
            cfg = compose("train", [f"augmentation={preset}"])
        data = load_data(cfg.data, device, keep_raw=preset != "none")
        policy = build_policy(cfg.augmentation, data.info, data.pixel_mean)
        torch.manual_seed(0)
        model = build_model(cfg.model, data.input_shape, 10).to(device)
        opt = build_optimizer(cfg.optimizer, model.parameters())
        g = torch.Generator(device=device).manual_seed(0)

        def epoch():  # what fit runs: chunked augmentation + normalisation, then the training steps
            r = train_one_epoch(AutogradStep(model, opt), policy.train_batches(data, cfg.data.batch_size, g, False))
            r["loss"].item()

        epoch()
        out[preset] = time_it(epoch, device, repeats)
    return out


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--device", default="cpu")
    p.add_argument("--images", type=int, default=4096)
    p.add_argument("--repeats", type=int, default=5)
    args = p.parse_args()
    device = torch.device(args.device)
    threads = len(os.sched_getaffinity(0))
    torch.set_num_threads(threads)
    print(f"machine: {platform.machine()}, {os.cpu_count()} cores, torch {torch.__version__} ({threads} threads), "
          f"device {device}" + (f" ({torch.cuda.get_device_name(device)})" if device.type == "cuda" else ""))
    print(f"ops: flip + reflect-pad crop + affine + erasing, batch 128, {args.images} images, median of "
          f"{args.repeats} passes\n")
    print("| images | regbench (img/s) | torchvision per-sample, 0 workers | 2 workers | regbench / best per-sample |")
    print("|---|---|---|---|---|")
    cases = [(1, 28, "MNIST-sized 1×28×28", [f"augmentation.ops={_ops_override()}"], torchvision_pipeline(28)),
             (3, 32, "CIFAR-sized 3×32×32", [f"augmentation.ops={_ops_override()}"], torchvision_pipeline(32)),
             (3, 32, "CIFAR-sized, `heavy` preset (crop, flip, TrivialAugmentWide, erasing)",
              ["augmentation=heavy"], heavy_torchvision_pipeline(32))]
    for channels, size, label, overrides, pipeline in cases:
        r = bench_pipelines(channels, size, args.images, device, args.repeats, overrides, pipeline)
        best = max(r["torchvision_0w"], r["torchvision_2w"])
        print(f"| {label} | {r['regbench']:,.0f} | {r['torchvision_0w']:,.0f} | {r['torchvision_2w']:,.0f} "
              f"| {r['regbench'] / best:.1f}× |", flush=True)
    e = bench_mlp_epoch(device, args.repeats)
    print(f"\nMLP epoch on the embedded MNIST sample (3,600 images, batch 128): no augmentation {e['none'] * 1000:.1f} ms, "
          f"digits policy {e['digits'] * 1000:.1f} ms, ratio {e['digits'] / e['none']:.2f}")


if __name__ == "__main__":
    main()
