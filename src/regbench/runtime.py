"""The process a run trains in: its device, CPU threads, determinism switches, seeds and mixed precision."""

from __future__ import annotations

import os
import random
from contextlib import nullcontext
from dataclasses import dataclass
from functools import partial
from typing import Callable, ContextManager, Optional

import numpy as np
import torch

from regbench.errors import ConfigError


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise ConfigError("trainer.device", name, "a device this machine has: CUDA is not available here",
                          "use trainer.device=cpu or trainer.device=auto")
    return torch.device(name)


def default_num_threads() -> int:
    """``trainer.num_threads=null``: OMP_NUM_THREADS where it is set to a positive integer (as torch's own default
    honours it: a scheduler's or a parallel runner's share of the cores), else every core this process may use."""
    env = os.environ.get("OMP_NUM_THREADS", "").strip()
    if env.isdigit() and int(env) > 0:
        return int(env)
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # macOS, Windows
        return os.cpu_count() or 1


def set_determinism(on: bool) -> None:
    """trainer.deterministic: torch's deterministic algorithms, CUBLAS workspace, no cudnn autotuning."""
    if on:
        os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
    torch.use_deterministic_algorithms(on)
    torch.backends.cudnn.benchmark = False
    torch.backends.cudnn.deterministic = on


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


@dataclass
class Runtime:
    """Where and how a run computes: its device, CPU threads, autocast context factory and AMP grad scaler."""

    device: torch.device
    threads: int
    autocast: Callable[[], ContextManager]
    scaler: Optional[torch.amp.GradScaler]


def set_up(trainer, default_threads: Optional[int] = None) -> Runtime:
    """Apply ``cfg.trainer``'s determinism and thread count to this process; its device and mixed precision.
    ``default_threads`` replaces the all-cores default of ``trainer.num_threads=null`` (parallel sweep jobs)."""
    set_determinism(trainer.deterministic)
    device = resolve_device(trainer.device)
    threads = trainer.num_threads or default_threads or default_num_threads()
    torch.set_num_threads(threads)
    autocast, scaler = autocast_for(device, trainer.amp)
    return Runtime(device, threads, autocast, scaler)
