#!/usr/bin/env python
"""Training-step throughput of regbench's loop vs a minimal hand-written PyTorch loop and a DataLoader loop.

All three train the same model (same initial weights) with the same optimizer, batch size and data, in one
process, interleaved epoch by epoch so that machine noise hits them alike; the table reports the median
images/s over the timed epochs and regbench's ratio to each baseline.

    python scripts/bench_loop.py                  # MLP and lecture CNN on CPU (about two minutes on 2 cores)
    python scripts/bench_loop.py --device cuda    # the same on a GPU
    python scripts/bench_loop.py --epochs 7 --models mlp

Contenders:
- regbench: ``regbench.loop.train_one_epoch`` over ``regbench.data.batches`` (what ``fit`` runs), including
  the on-device loss/accuracy sums and the once-per-epoch read-back.
- minimal: a permutation of the in-memory tensors, index, forward, cross-entropy, backward, step; nothing else.
- dataloader: the conventional ``DataLoader(TensorDataset(x, y), shuffle=True)`` loop (per-sample indexing and
  collation, num_workers=0), which is what most PyTorch tutorials write.
"""

from __future__ import annotations

import argparse
import copy
import os
import platform
import statistics
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from hydra import compose, initialize_config_dir

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))

import regbench.cli  # noqa: E402,F401  (registers schemas)
from regbench.cli import CONFIG_DIR  # noqa: E402
from regbench.data import batches, load_data  # noqa: E402
from regbench.models import build_model  # noqa: E402
from regbench.optim import build_optimizer  # noqa: E402
from regbench.loop import AutogradStep, train_one_epoch  # noqa: E402


def sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize()


def minimal_epoch(model, opt, x, y, bs, g):
    model.train()
    perm = torch.randperm(len(y), generator=g, device=x.device)
    for i in range(0, len(y), bs):
        idx = perm[i:i + bs]
        loss = F.cross_entropy(model(x[idx]), y[idx])
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()


def dataloader_epoch(model, opt, loader):
    model.train()
    for xb, yb in loader:
        loss = F.cross_entropy(model(xb), yb)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()


def regbench_epoch(model, opt, x, y, bs, g):
    out = train_one_epoch(AutogradStep(model, opt), batches(x, y, bs, g))
    return out["loss"].item() / out["seen"], out["correct"].item() / out["seen"]  # fit's once-per-epoch read-back


def bench(model_name: str, device: torch.device, epochs: int, warmup: int, train_size: int, batch_size: int):
    with initialize_config_dir(config_dir=str(CONFIG_DIR), version_base="1.3"):
        cfg = compose("train", [f"model={model_name}", f"data.train_size={train_size}",
                                f"data.batch_size={batch_size}"])
    data = load_data(cfg.data, device)
    x, y = data.train_x, data.train_y
    torch.manual_seed(0)
    base = build_model(cfg.model, data.input_shape, 10).to(device)
    models = {k: copy.deepcopy(base) for k in ("minimal", "dataloader", "regbench")}
    opts = {k: build_optimizer(cfg.optimizer, m.parameters()) for k, m in models.items()}
    gens = {k: torch.Generator(device=device).manual_seed(0) for k in models}
    loader = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(x, y), batch_size=batch_size, shuffle=True,
                                         generator=torch.Generator().manual_seed(0))
    run = {
        "minimal": lambda: minimal_epoch(models["minimal"], opts["minimal"], x, y, batch_size, gens["minimal"]),
        "dataloader": lambda: dataloader_epoch(models["dataloader"], opts["dataloader"], loader),
        "regbench": lambda: regbench_epoch(models["regbench"], opts["regbench"], x, y, batch_size, gens["regbench"]),
    }
    times = {k: [] for k in run}
    for epoch in range(warmup + epochs):
        order = list(run) if epoch % 2 == 0 else list(reversed(run))  # alternate who goes first
        for k in order:
            sync(device)
            t0 = time.perf_counter()
            run[k]()
            sync(device)
            if epoch >= warmup:
                times[k].append(time.perf_counter() - t0)
    ips = {k: len(y) / statistics.median(v) for k, v in times.items()}
    return ips, len(y), cfg.optimizer.name


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--device", default="cpu")
    p.add_argument("--models", nargs="+", default=["mlp", "lecture_cnn"])
    p.add_argument("--epochs", type=int, default=9, help="timed epochs per contender")
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--batch-size", type=int, default=128)
    p.add_argument("--threads", type=int, default=None)
    args = p.parse_args()
    device = torch.device(args.device)
    threads = args.threads or len(os.sched_getaffinity(0))
    torch.set_num_threads(threads)
    sizes = {"mlp": 3600, "lecture_cnn": 1024}
    print(f"machine: {platform.processor() or platform.machine()}, {os.cpu_count()} cores, torch {torch.__version__} "
          f"({threads} threads), device {device}"
          + (f" ({torch.cuda.get_device_name(device)})" if device.type == "cuda" else ""))
    print(f"median of {args.epochs} timed epochs after {args.warmup} warm-up epochs, batch {args.batch_size}, "
          "embedded MNIST sample, default optimizer (adam)\n")
    print("| model | images/epoch | minimal loop (img/s) | DataLoader loop (img/s) | regbench (img/s) "
          "| regbench / minimal | regbench / DataLoader |")
    print("|---|---|---|---|---|---|---|")
    for m in args.models:
        ips, n, _ = bench(m, device, args.epochs, args.warmup, sizes.get(m, 1024), args.batch_size)
        print(f"| {m} | {n} | {ips['minimal']:,.0f} | {ips['dataloader']:,.0f} | {ips['regbench']:,.0f} "
              f"| {ips['regbench'] / ips['minimal']:.3f} | {ips['regbench'] / ips['dataloader']:.2f} |", flush=True)


if __name__ == "__main__":
    main()
