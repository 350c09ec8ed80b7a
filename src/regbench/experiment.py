"""Building the experiment a config describes: data on the device, augmentation policy, regularizer stack, model,
optimizer, schedule and loss — everything a run trains with, made in the order that fixes its random draws."""

from __future__ import annotations

import logging
from dataclasses import dataclass
from functools import partial
from typing import Any, Callable, Iterator, Optional

import torch
import torch.nn.functional as F
from omegaconf import DictConfig
from torch import nn

from regbench import accel, faststep, lint
from regbench.augment import build_policy
from regbench.data import load_data, num_batches
from regbench.errors import ConfigError
from regbench.models import build_model, count_parameters
from regbench.optim import build_optimizer, build_scheduler
from regbench.regularizers import Context, build_stack
from regbench.runtime import seed_everything

log = logging.getLogger(__name__)


@dataclass
class Experiment:
    """What a run trains with (built once, before any epoch; a resume restores their state into it)."""

    cfg: DictConfig
    data: Any  # regbench.data.Data: the splits on the device
    policy: Any  # the augmentation policy (an identity policy without augmentation)
    stack: Any  # regbench.regularizers.Stack
    model: nn.Module
    params: dict  # parameter counts (trainable, frozen, buffers)
    speed: dict  # what regbench.accel did for speed (summary.json: optimizer_impl, compile, channels_last, step_impl)
    optimizer: torch.optim.Optimizer
    scheduler: Any
    loss_fn: Callable[[torch.Tensor, torch.Tensor], torch.Tensor]
    penalty_fn: Optional[Callable]
    before_step: Optional[Callable]
    after_step: Optional[Callable]  # after every optimizer step (constraints, weight averaging)
    second_pass: Optional[Callable]  # SAM's ascent (see loop.AutogradStep)
    warnings: list[str]
    drop_last: bool
    steps_per_epoch: int
    clean_x: torch.Tensor  # the fixed training subset evaluated like validation (trainer.clean_subset)
    clean_y: torch.Tensor
    direct: Optional[Any] = None  # regbench.faststep.DirectStep where it applies (else the step uses autograd)
    step_plan: str = "autograd"  # which step, and why not the direct one ("direct" / "autograd: <why>")

    def train_batches(self, order: torch.Generator) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        """One epoch's training batches in the order ``order`` draws, as trained on (the policy's ops,
        normalisation and mixing applied)."""
        return self.policy.train_batches(self.data, self.cfg.data.batch_size, order, self.drop_last)


def build_experiment(cfg: DictConfig, device: torch.device, data: Any = None) -> Experiment:
    """Data, policy, stack, model, optimizer and schedule of ``cfg`` on ``device``; the warnings of the
    config/model combination are logged here and kept for summary.json. ``data``: the data ``cfg.data`` loads,
    loaded already (the members of a stack share one copy; loading draws nothing from the global RNG)."""
    seed_everything(cfg.seed)
    if data is None:
        data = load_data(cfg.data, device, keep_raw=bool(cfg.augmentation.ops))
    policy = build_policy(cfg.augmentation, data.info, data.pixel_mean)
    # The regularizer stack shapes the model (dropout, norms), its weights (transfer), the optimizer's
    # parameter groups (weight decay), the loss (penalties, smoothing) and the end of training.
    ctx = Context(cfg, num_classes=data.info.num_classes, device=device)
    stack = build_stack(cfg, ctx)
    torch.manual_seed(cfg.seed)  # model init does not depend on how much randomness data loading used
    model = build_model(cfg.model, data.input_shape, data.info.num_classes, stack.slots()).to(device)
    stack.setup(model)
    params = count_parameters(model)
    optimizer = build_optimizer(cfg.optimizer, stack.param_groups(model, cfg.optimizer), fused=cfg.trainer.fused)
    speed, speed_warning = accel.accelerate(cfg.trainer.compile, model, optimizer, device)
    loss_fn = partial(F.cross_entropy, **stack.loss_options()) if stack.loss_options() else F.cross_entropy
    second_pass = stack.second_pass_fn()
    direct, step_plan = faststep.plan(model, loss_fn, cfg.trainer, device,
                                      "a member's second pass (the direct step takes a single pass)" if second_pass else None)
    speed["step_impl"] = step_plan.split(":")[0]
    penalty_fn, before_step, after_step = stack.penalty_fn(), stack.before_step_fn(), stack.after_step_fn()
    warnings = lint.run_warnings(cfg, model, stack, policy, data.info)
    for w in warnings:
        log.warning("warning: %s", w)
    warnings += [speed_warning] if speed_warning else []  # logged where it arose
    drop_last, note = _drop_last(cfg, len(data.train_y), model)
    if note:
        log.warning("note: %s", note)
        warnings = warnings + [note]
    steps_per_epoch = num_batches(len(data.train_y), cfg.data.batch_size, drop_last)
    scheduler = build_scheduler(cfg.scheduler, optimizer, steps_per_epoch, cfg.trainer.max_epochs)
    clean_x, clean_y = _clean_subset(cfg, data, device)
    return Experiment(cfg, data, policy, stack, model, params, speed, optimizer, scheduler, loss_fn, penalty_fn,
                      before_step, after_step, second_pass, warnings, drop_last, steps_per_epoch, clean_x, clean_y, direct, step_plan)


def _drop_last(cfg: DictConfig, n_train: int, model: nn.Module) -> tuple[bool, Optional[str]]:
    """(data.drop_last as run, the note when a last batch of one image is dropped for batch norm)."""
    bs, drop_last = cfg.data.batch_size, cfg.data.drop_last
    if drop_last and bs > n_train:
        raise ConfigError("data.batch_size", bs, f"at most the {n_train} training images when "
                          "data.drop_last=true (else every batch is dropped)")
    # Batch norm cannot normalise a training batch of one sample (torch raises): drop that last sample of the
    # epoch's permutation, as data.drop_last=true (Keras/torch users' drop_last) would.
    note = lint.batch_of_one(n_train, bs, drop_last, model)
    if note is not None and n_train == 1:
        raise ConfigError("data.train_size", n_train, "at least 2 with batch norm in the model (it cannot "
                          "normalise a training batch of one image, so every epoch would train on nothing)",
                          "raise data.train_size or drop the normalisation from the stack")
    return drop_last or note is not None, note


def _clean_subset(cfg: DictConfig, data: Any, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """A fixed subset of the training split, evaluated like validation (eval mode, plain CE): the training loss
    under dropout / smoothing / penalties is not comparable with the validation loss, this one is."""
    n_clean = min(cfg.trainer.clean_subset, len(data.train_y))
    clean_idx = torch.randperm(len(data.train_y), generator=torch.Generator().manual_seed(cfg.data.split_seed))
    clean_idx = clean_idx[:n_clean].sort().values.to(device)
    return data.train_x[clean_idx], data.train_y[clean_idx]
