"""The training loop: config -> data on the device -> model -> optimizer/schedule -> epochs -> logs, checkpoints.

Plain PyTorch, one code path for CPU and CUDA (``nullcontext`` vs ``torch.autocast``). The hot loop has no
host synchronisation: per-step loss and accuracy are summed on the device and read once per epoch.
"""

from __future__ import annotations

import logging
import math
import os
import platform
import random
import sys
import time
from contextlib import nullcontext
from datetime import datetime, timezone
from functools import partial
from pathlib import Path
from typing import Callable, ContextManager, Iterable, Optional

import numpy as np
import torch
import torch.nn.functional as F
from omegaconf import DictConfig, OmegaConf
from torch import nn

from regbench import __version__
from regbench.config import validate
from regbench.data import batches, load_data, num_batches
from regbench.errors import ConfigError, RegbenchError
from regbench.logs import RunLogger, save_checkpoint, write_json
from regbench.models import build_model, count_parameters
from regbench.optim import build_optimizer, build_scheduler

log = logging.getLogger(__name__)


# ----------------------------------------------------------------------------------------- set-up


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise ConfigError("trainer.device", name, "a device this machine has: CUDA is not available here",
                          "use trainer.device=cpu or trainer.device=auto")
    return torch.device(name)


def default_num_threads() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # macOS, Windows
        return os.cpu_count() or 1


def seed_everything(seed: int) -> None:
    """Seed Python, NumPy and torch (CPU and every CUDA device) from the run's one seed."""
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def autocast_for(device: torch.device, amp: str) -> tuple[Callable[[], ContextManager], Optional[torch.amp.GradScaler]]:
    """(context factory, grad scaler) for ``trainer.amp``: none -> nullcontext; bf16/fp16 -> torch.autocast."""
    if amp == "none":
        return nullcontext, None
    if amp == "fp16" and device.type != "cuda":
        raise ConfigError("trainer.amp", amp, "bf16 or none on CPU (fp16 autocast needs CUDA)",
                          "use trainer.amp=bf16 or trainer.device=cuda")
    dtype = torch.bfloat16 if amp == "bf16" else torch.float16
    scaler = torch.amp.GradScaler(device.type) if amp == "fp16" else None
    return partial(torch.autocast, device_type=device.type, dtype=dtype), scaler


# ------------------------------------------------------------------------------------------- loop


def train_one_epoch(model: nn.Module, optimizer: torch.optim.Optimizer,
                    batch_iter: Iterable[tuple[torch.Tensor, torch.Tensor]], *,
                    scheduler=None, autocast: Callable[[], ContextManager] = nullcontext,
                    scaler: Optional[torch.amp.GradScaler] = None, on_step: Optional[Callable[[], None]] = None,
                    ) -> tuple[torch.Tensor, torch.Tensor, int]:
    """One pass over ``batch_iter``. Returns (summed loss, number correct) as device tensors, and the count.

    Nothing here reads a value back to the host, so CUDA steps queue up without stalls.
    """
    model.train()
    # Per-step values are kept as device tensors and reduced once at the end: two cheap ops per step
    # (detach, argmax) instead of a running sum, and no host sync.
    losses, sizes, preds, targets = [], [], [], []
    for xb, yb in batch_iter:
        with autocast():
            logits = model(xb)
            loss = F.cross_entropy(logits, yb)
        optimizer.zero_grad(set_to_none=True)
        if scaler is None:
            loss.backward()
            optimizer.step()
        else:
            scaler.scale(loss).backward()
            scaler.step(optimizer)
            scaler.update()
        if scheduler is not None:
            scheduler.step()
        losses.append(loss.detach())
        preds.append(logits.detach().argmax(1))
        targets.append(yb)
        sizes.append(yb.shape[0])
        if on_step is not None:
            on_step()
    device = next(model.parameters()).device
    if not losses:
        return torch.zeros((), device=device), torch.zeros((), dtype=torch.long, device=device), 0
    weights = torch.tensor(sizes, dtype=torch.float32).to(device, non_blocking=True)
    loss_sum = (torch.stack(losses).float() * weights).sum()
    correct = (torch.cat(preds) == torch.cat(targets)).sum()
    seen = sum(sizes)
    return loss_sum, correct, seen


@torch.no_grad()
def evaluate(model: nn.Module, x: torch.Tensor, y: torch.Tensor, batch_size: int,
             autocast: Callable[[], ContextManager] = nullcontext) -> dict[str, float]:
    """Mean cross-entropy and accuracy of ``model`` in eval mode over (x, y)."""
    model.eval()
    loss_sum = torch.zeros((), device=x.device, dtype=torch.float64)
    correct = torch.zeros((), device=x.device, dtype=torch.long)
    for i in range(0, len(y), batch_size):
        xb, yb = x[i:i + batch_size], y[i:i + batch_size]
        with autocast():
            logits = model(xb)
        loss_sum += F.cross_entropy(logits.float(), yb, reduction="sum")
        correct += (logits.argmax(1) == yb).sum()
    n = len(y)
    return {"loss": loss_sum.item() / n, "acc": correct.item() / n}


# -------------------------------------------------------------------------------------------- fit


def _versions() -> dict[str, str]:
    import torchvision

    return {"regbench": __version__, "torch": torch.__version__, "torchvision": torchvision.__version__,
            "cuda": torch.version.cuda or "none", "python": platform.python_version()}


def _now() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="seconds")


def fit(cfg: DictConfig, run_dir: Path) -> float:
    """Train the composed experiment ``cfg`` and write its results into ``run_dir``.

    Returns the best value of ``trainer.monitor`` (what Hydra sweepers optimise).
    """
    validate(cfg)
    run_dir = Path(run_dir)
    if (run_dir / "summary.json").exists() or (run_dir / "metrics.csv").exists():
        raise RegbenchError(f"{run_dir} already holds the results of a run; refusing to overwrite them; "
                            "fix: choose a new folder with hydra.run.dir=...")
    t = cfg.trainer
    device = resolve_device(t.device)
    threads = t.num_threads or default_num_threads()
    torch.set_num_threads(threads)
    autocast, scaler = autocast_for(device, t.amp)

    seed_everything(cfg.seed)
    data = load_data(cfg.data, device)
    torch.manual_seed(cfg.seed)  # model init does not depend on how much randomness data loading used
    model = build_model(cfg.model, data.input_shape, data.info.num_classes).to(device)
    params = count_parameters(model)
    optimizer = build_optimizer(cfg.optimizer, model.parameters())
    bs, drop_last = cfg.data.batch_size, cfg.data.drop_last
    if drop_last and bs > len(data.train_y):
        raise ConfigError("data.batch_size", bs, f"at most the {len(data.train_y)} training images when "
                          "data.drop_last=true (else every batch is dropped)")
    steps_per_epoch = num_batches(len(data.train_y), bs, drop_last)
    scheduler = build_scheduler(cfg.scheduler, optimizer, steps_per_epoch, t.max_epochs)
    order = torch.Generator(device=device).manual_seed(cfg.seed)  # data order, on the data's device

    log.info("model %s: %s trainable parameters, %s running-statistic values; optimizer %s; device %s, %d threads",
             cfg.model.name, f"{params['trainable']:,}", f"{params['buffers']:,}", cfg.optimizer.name, device,
             threads)

    logger = RunLogger(run_dir, cfg)
    summary = {
        "status": "running", "epochs_completed": 0, "max_epochs": t.max_epochs, "seed": cfg.seed,
        "params": params, "monitor": t.monitor, "final": None, "best": None, "test": None,
        "data": data.meta, "device": str(device), "amp": t.amp, "num_threads": threads,
        "steps_per_epoch": steps_per_epoch, "versions": _versions(), "run_dir": str(run_dir.resolve()),
        "started": _now(), "finished": None, "time_s": None, "error": None,
    }
    write_json(run_dir / "summary.json", summary)

    sign = 1.0 if t.monitor == "val_loss" else -1.0  # minimise val_loss, maximise val_acc
    best_score = math.inf
    step = 0
    started = time.perf_counter()
    show_bar = sys.stdout.isatty() if t.progress_bar is None else t.progress_bar
    from tqdm.auto import tqdm

    bar = tqdm(total=steps_per_epoch * t.max_epochs, disable=not show_bar, unit="step", dynamic_ncols=True,
               file=sys.stderr, leave=False)
    try:
        for epoch in range(1, t.max_epochs + 1):
            epoch_start = time.perf_counter()
            bar.set_description(f"epoch {epoch}/{t.max_epochs}")
            loss_sum, correct, seen = train_one_epoch(
                model, optimizer, batches(data.train_x, data.train_y, bs, order, drop_last),
                scheduler=scheduler, autocast=autocast, scaler=scaler, on_step=bar.update)
            step += steps_per_epoch
            train_loss, train_acc = loss_sum.item() / seen, correct.item() / seen  # the epoch's one host sync
            if not math.isfinite(train_loss):
                raise RegbenchError(
                    f"training diverged: non-finite training loss ({train_loss}) in epoch {epoch} (steps "
                    f"{step - steps_per_epoch + 1}-{step}) with optimizer {cfg.optimizer.name} lr={cfg.optimizer.lr}; "
                    "fix: lower optimizer.lr, or add a warmup schedule (scheduler=warmup)")
            val = evaluate(model, data.val_x, data.val_y, cfg.data.eval_batch_size, autocast)
            row = {
                "epoch": epoch, "step": step, "lr": optimizer.param_groups[0]["lr"],
                "train_loss": train_loss, "train_acc": train_acc, "val_loss": val["loss"], "val_acc": val["acc"],
                "gap_loss": val["loss"] - train_loss, "gap_acc": train_acc - val["acc"],
                "epoch_time_s": round(time.perf_counter() - epoch_start, 4),
            }
            logger.log_epoch(row)
            bar.set_postfix(train_loss=f"{train_loss:.4f}", val_loss=f"{val['loss']:.4f}", val_acc=f"{val['acc']:.4f}")
            log.info("epoch %d/%d  train loss %.4f acc %.4f | val loss %.4f acc %.4f | gap %.4f | lr %.3g | %.2fs",
                     epoch, t.max_epochs, train_loss, train_acc, val["loss"], val["acc"], row["gap_loss"], row["lr"],
                     row["epoch_time_s"])

            improved = sign * row[t.monitor] < best_score
            if improved:
                best_score = sign * row[t.monitor]
                summary["best"] = dict(row)
            if t.save_checkpoints:
                state = {
                    "model": model.state_dict(), "optimizer": optimizer.state_dict(),
                    "scheduler": scheduler.state_dict() if scheduler is not None else None,
                    "scaler": scaler.state_dict() if scaler is not None else None,
                    "epoch": epoch, "step": step, "metrics": row,
                    "config": OmegaConf.to_container(cfg, resolve=True),
                }
                save_checkpoint(run_dir / "checkpoints" / "last.pt", state)
                if improved:
                    save_checkpoint(run_dir / "checkpoints" / "best.pt", state)
            summary.update(epochs_completed=epoch, final=row)
            write_json(run_dir / "summary.json", summary)

        bar.close()
        test = evaluate(model, data.test_x, data.test_y, cfg.data.eval_batch_size, autocast)
        summary.update(status="completed", test=test, finished=_now(),
                       time_s=round(time.perf_counter() - started, 2))
        write_json(run_dir / "summary.json", summary)
        logger.log_hparams(_hparams(cfg), {
            "best_val_loss": summary["best"]["val_loss"], "best_val_acc": summary["best"]["val_acc"],
            "final_gap_loss": summary["final"]["gap_loss"], "test_acc": test["acc"], "test_loss": test["loss"],
        })
        log.info("test loss %.4f acc %.4f (final weights); best epoch %d by %s", test["loss"], test["acc"],
                 summary["best"]["epoch"], t.monitor)
    except BaseException as e:
        bar.close()
        summary.update(status="interrupted" if isinstance(e, KeyboardInterrupt) else "failed",
                       error=str(e).splitlines()[0] if str(e) else type(e).__name__, finished=_now(),
                       time_s=round(time.perf_counter() - started, 2))
        try:
            write_json(run_dir / "summary.json", summary)
        except RegbenchError:
            pass  # the original error is the one to report
        raise
    finally:
        logger.close()
    return summary["best"][t.monitor]


def _hparams(cfg: DictConfig) -> dict:
    """The hyperparameters shown as columns in TensorBoard's HParams tab: every leaf of the config."""
    flat = {}

    def walk(node, prefix):
        for k, v in node.items():
            key = f"{prefix}{k}"
            if isinstance(v, dict):
                walk(v, key + ".")
            else:
                flat[key] = v

    walk(OmegaConf.to_container(cfg, resolve=True), "")
    return flat
