"""Optimizers (torch.optim, every hyperparameter from config) and learning-rate schedules.

Schedules are torch.optim.lr_scheduler objects stepped once per optimizer step; their lengths are given in
epochs in config and converted to steps here, so a schedule means the same thing at any batch size.
"""

from __future__ import annotations

from typing import Iterable, Optional

import torch
from omegaconf import DictConfig
from torch.optim import lr_scheduler as sched

OPTIMIZERS = ("sgd", "adagrad", "rmsprop", "adam", "adamw")


def build_optimizer(cfg: DictConfig, params: Iterable) -> torch.optim.Optimizer:
    """The torch.optim optimizer named by ``cfg.name``; ``params`` may be parameters or parameter groups."""
    params = list(params)
    if cfg.name == "sgd":
        return torch.optim.SGD(params, lr=cfg.lr, momentum=cfg.momentum, dampening=cfg.dampening,
                               nesterov=cfg.nesterov, weight_decay=cfg.weight_decay)
    if cfg.name == "adagrad":
        return torch.optim.Adagrad(params, lr=cfg.lr, lr_decay=cfg.lr_decay, eps=cfg.eps,
                                   initial_accumulator_value=cfg.initial_accumulator_value,
                                   weight_decay=cfg.weight_decay)
    if cfg.name == "rmsprop":
        return torch.optim.RMSprop(params, lr=cfg.lr, alpha=cfg.alpha, eps=cfg.eps, momentum=cfg.momentum,
                                   centered=cfg.centered, weight_decay=cfg.weight_decay)
    if cfg.name in ("adam", "adamw"):
        cls = torch.optim.AdamW if cfg.name == "adamw" else torch.optim.Adam
        return cls(params, lr=cfg.lr, betas=tuple(cfg.betas), eps=cfg.eps, amsgrad=cfg.amsgrad,
                   weight_decay=cfg.weight_decay)
    raise ValueError(f"unknown optimizer {cfg.name!r}")  # unreachable after config.validate


def build_scheduler(cfg: DictConfig, optimizer: torch.optim.Optimizer, steps_per_epoch: int,
                    max_epochs: int) -> Optional[sched.LRScheduler]:
    """The schedule named by ``cfg.name``, to be stepped after every optimizer step; None for constant."""
    total = steps_per_epoch * max_epochs

    def steps(epochs: float) -> int:
        return max(1, round(epochs * steps_per_epoch))

    if cfg.name == "constant":
        return None
    if cfg.name == "step":
        return sched.StepLR(optimizer, step_size=steps(cfg.step_epochs), gamma=cfg.gamma)
    if cfg.name == "cosine":
        return sched.CosineAnnealingLR(optimizer, T_max=total, eta_min=cfg.min_lr)
    if cfg.name == "onecycle":
        max_lr = [g["lr"] for g in optimizer.param_groups] if cfg.max_lr is None else cfg.max_lr
        return sched.OneCycleLR(optimizer, max_lr=max_lr, total_steps=total, pct_start=cfg.pct_start,
                                div_factor=cfg.div_factor, final_div_factor=cfg.final_div_factor,
                                anneal_strategy=cfg.anneal_strategy, cycle_momentum=cfg.cycle_momentum)
    if cfg.name in ("warmup", "warmup_cosine"):
        warm = steps(cfg.warmup_epochs) if cfg.warmup_epochs > 0 else 0
        if warm == 0:
            ramp = None
        else:
            ramp = sched.LinearLR(optimizer, start_factor=cfg.start_factor, end_factor=1.0, total_iters=warm)
        if cfg.name == "warmup":
            after = sched.ConstantLR(optimizer, factor=1.0, total_iters=0)
        else:
            after = sched.CosineAnnealingLR(optimizer, T_max=max(1, total - warm), eta_min=cfg.min_lr)
        if ramp is None:
            return after
        return sched.SequentialLR(optimizer, [ramp, after], milestones=[warm])
    raise ValueError(f"unknown schedule {cfg.name!r}")  # unreachable after config.validate
