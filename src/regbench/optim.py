"""Optimizers (torch.optim, every hyperparameter from config) and learning-rate schedules, one table each.

Every option registers beside its builder: its schema (the keys its YAML may set), its range checks and the
function that builds it (:data:`regbench.registry.OPTIMIZERS`, :data:`regbench.registry.SCHEDULERS`).
Adding one = its registration here, its YAML in configs/optimizer/ or configs/scheduler/, its test.

Schedules are torch.optim.lr_scheduler objects stepped once per optimizer step; their lengths are given in
epochs in config and converted to steps here, so a schedule means the same thing at any batch size.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable, Iterable, Optional

import torch
from omegaconf import DictConfig
from torch.optim import lr_scheduler as sched
from torch.optim.swa_utils import SWALR

from regbench import accel
from regbench.errors import check, choice, in_unit, positive
from regbench.registry import OPTIMIZERS, SCHEDULERS

# ---------------------------------------------------------------------------------------- optimizers


@dataclass
class SGDConfig:
    name: str = "sgd"
    lr: float = 0.01
    momentum: float = 0.0
    dampening: float = 0.0
    nesterov: bool = False
    weight_decay: float = 0.0  # coupled: wd*w is added to the gradient (torch semantics)


@dataclass
class AdagradConfig:
    name: str = "adagrad"
    lr: float = 0.01
    lr_decay: float = 0.0
    initial_accumulator_value: float = 0.0
    eps: float = 1e-10
    weight_decay: float = 0.0  # coupled


@dataclass
class RMSpropConfig:
    name: str = "rmsprop"
    lr: float = 0.001
    alpha: float = 0.99  # smoothing constant of the squared-gradient average (Keras calls it rho, default 0.9)
    eps: float = 1e-8
    momentum: float = 0.0
    centered: bool = False
    weight_decay: float = 0.0  # coupled


@dataclass
class AdamConfig:
    name: str = "adam"
    lr: float = 0.001
    betas: list[float] = field(default_factory=lambda: [0.9, 0.999])
    eps: float = 1e-8
    amsgrad: bool = False
    weight_decay: float = 0.0  # adam: coupled (added to the gradient, then divided by sqrt(v)); adamw: decoupled


def _check_common(o: DictConfig) -> None:
    positive(o.lr, "optimizer.lr", "a learning rate must be positive, e.g. optimizer.lr=0.001")
    check(o.weight_decay >= 0, "optimizer.weight_decay", o.weight_decay, "a number >= 0")


def _check_sgd(o: DictConfig, cfg: DictConfig) -> None:
    _check_common(o)
    in_unit(o.momentum, "optimizer.momentum")
    in_unit(o.dampening, "optimizer.dampening")
    check(not o.nesterov or (o.momentum > 0 and o.dampening == 0), "optimizer.nesterov", o.nesterov,
          "momentum > 0 and dampening = 0 for Nesterov momentum", "set optimizer.momentum=0.9 or use optimizer=nesterov")


def _check_adagrad(o: DictConfig, cfg: DictConfig) -> None:
    _check_common(o)
    positive(o.eps, "optimizer.eps")


def _check_rmsprop(o: DictConfig, cfg: DictConfig) -> None:
    _check_common(o)
    in_unit(o.momentum, "optimizer.momentum")
    in_unit(o.alpha, "optimizer.alpha")
    positive(o.eps, "optimizer.eps")


def _check_adam(o: DictConfig, cfg: DictConfig) -> None:
    _check_common(o)
    check(len(o.betas) == 2 and all(0 <= b < 1 for b in o.betas), "optimizer.betas", list(o.betas),
          "two numbers in [0, 1), e.g. [0.9,0.999]")
    positive(o.eps, "optimizer.eps")


@OPTIMIZERS.register("sgd", schema=SGDConfig, check=_check_sgd)
def _sgd(cfg: DictConfig, params: list, fused: bool = False) -> torch.optim.Optimizer:
    return torch.optim.SGD(params, lr=cfg.lr, momentum=cfg.momentum, dampening=cfg.dampening,
                           nesterov=cfg.nesterov, weight_decay=cfg.weight_decay,
                           **accel.implementation(torch.optim.SGD, params, fused))


@OPTIMIZERS.register("adagrad", schema=AdagradConfig, check=_check_adagrad)
def _adagrad(cfg: DictConfig, params: list, fused: bool = False) -> torch.optim.Optimizer:
    return torch.optim.Adagrad(params, lr=cfg.lr, lr_decay=cfg.lr_decay, eps=cfg.eps,
                               initial_accumulator_value=cfg.initial_accumulator_value,
                               weight_decay=cfg.weight_decay,
                               **accel.implementation(torch.optim.Adagrad, params, fused))


@OPTIMIZERS.register("rmsprop", schema=RMSpropConfig, check=_check_rmsprop)
def _rmsprop(cfg: DictConfig, params: list, fused: bool = False) -> torch.optim.Optimizer:
    return torch.optim.RMSprop(params, lr=cfg.lr, alpha=cfg.alpha, eps=cfg.eps, momentum=cfg.momentum,
                               centered=cfg.centered, weight_decay=cfg.weight_decay,
                               **accel.implementation(torch.optim.RMSprop, params, fused))


@OPTIMIZERS.register("adam", schema=AdamConfig, check=_check_adam)
def _adam(cfg: DictConfig, params: list, fused: bool = False) -> torch.optim.Optimizer:
    return torch.optim.Adam(params, lr=cfg.lr, betas=tuple(cfg.betas), eps=cfg.eps, amsgrad=cfg.amsgrad,
                            weight_decay=cfg.weight_decay, **accel.implementation(torch.optim.Adam, params, fused))


@OPTIMIZERS.register("adamw", schema=AdamConfig, check=_check_adam, schema_name="adam")
def _adamw(cfg: DictConfig, params: list, fused: bool = False) -> torch.optim.Optimizer:
    return torch.optim.AdamW(params, lr=cfg.lr, betas=tuple(cfg.betas), eps=cfg.eps, amsgrad=cfg.amsgrad,
                             weight_decay=cfg.weight_decay, **accel.implementation(torch.optim.AdamW, params, fused))


def build_optimizer(cfg: DictConfig, params: Iterable, fused: bool = False) -> torch.optim.Optimizer:
    """The torch.optim optimizer named by ``cfg.name``; ``params`` may be parameters or parameter groups.
    ``fused``: its fastest implementation (``trainer.fused``, see regbench.accel); False: torch's default."""
    return accel.keep_implementation(OPTIMIZERS[cfg.name].obj(cfg, list(params), fused))


# ----------------------------------------------------------------------------------------- schedules
# Every schedule is stepped once per optimizer step; lengths are given in epochs (floats allowed) and
# converted to steps with the run's steps-per-epoch.


@dataclass
class ConstantSchedule:
    name: str = "constant"


@dataclass
class StepSchedule:
    name: str = "step"
    step_epochs: float = 10.0  # multiply the lr by gamma every step_epochs epochs
    gamma: float = 0.1


@dataclass
class CosineSchedule:
    name: str = "cosine"
    min_lr: float = 0.0  # lr reached at the last step


@dataclass
class OneCycleSchedule:
    name: str = "onecycle"
    max_lr: Optional[float] = None  # null = the optimizer's lr
    pct_start: float = 0.3
    div_factor: float = 25.0  # initial lr = max_lr / div_factor
    final_div_factor: float = 1e4  # final lr = initial lr / final_div_factor
    anneal_strategy: str = "cos"  # cos | linear
    cycle_momentum: bool = False  # also cycle momentum / beta1 inversely (torch's default is true)


@dataclass
class WarmupSchedule:
    name: str = "warmup"
    warmup_epochs: float = 1.0  # linear ramp from start_factor*lr to lr, then constant
    start_factor: float = 0.01


@dataclass
class WarmupCosineSchedule(WarmupSchedule):
    name: str = "warmup_cosine"
    min_lr: float = 0.0  # lr reached at the last step, after the cosine decay that follows the warmup


@dataclass(frozen=True)
class Steps:
    """A run's length in optimizer steps, and the conversion of an epoch count (at least one step)."""

    per_epoch: int
    total: int

    def __call__(self, epochs: float) -> int:
        return max(1, round(epochs * self.per_epoch))


def _check_step(s: DictConfig, cfg: DictConfig) -> None:
    positive(s.step_epochs, "scheduler.step_epochs")
    check(0 < s.gamma <= 1, "scheduler.gamma", s.gamma, "a number in (0, 1]")


def _check_min_lr(s: DictConfig, cfg: DictConfig) -> None:
    lr = cfg.optimizer.lr
    check(0 <= s.min_lr < lr, "scheduler.min_lr", s.min_lr, f"a number in [0, optimizer.lr={lr})")


def _check_onecycle(s: DictConfig, cfg: DictConfig) -> None:
    check(s.max_lr is None or s.max_lr > 0, "scheduler.max_lr", s.max_lr, "a number > 0 or null")
    in_unit(s.pct_start, "scheduler.pct_start", closed_low=False)
    positive(s.div_factor, "scheduler.div_factor")
    positive(s.final_div_factor, "scheduler.final_div_factor")
    choice(s.anneal_strategy, "scheduler.anneal_strategy", ("cos", "linear"))
    o = cfg.optimizer  # torch cycles the optimizer's momentum or beta1, and fails on one that has neither
    check(not s.cycle_momentum or "momentum" in o or "betas" in o, "scheduler.cycle_momentum", s.cycle_momentum,
          f"false with optimizer={o.name} (it has no momentum or beta1 to cycle)",
          "set scheduler.cycle_momentum=false, or use an optimizer with momentum or betas (e.g. sgd, adam)")


def _check_warmup(s: DictConfig, cfg: DictConfig) -> None:
    check(s.warmup_epochs >= 0, "scheduler.warmup_epochs", s.warmup_epochs, "a number >= 0")
    check(0 < s.start_factor <= 1, "scheduler.start_factor", s.start_factor, "a number in (0, 1]")
    cosine = s.name == "warmup_cosine"  # the cosine phase needs at least part of an epoch after the warmup
    epochs = cfg.trainer.max_epochs
    check(s.warmup_epochs < epochs if cosine else s.warmup_epochs <= epochs, "scheduler.warmup_epochs",
          s.warmup_epochs, f"{'fewer' if cosine else 'no more'} epochs than trainer.max_epochs={epochs}")


def _check_warmup_cosine(s: DictConfig, cfg: DictConfig) -> None:
    _check_min_lr(s, cfg)
    _check_warmup(s, cfg)


@SCHEDULERS.register("constant", schema=ConstantSchedule)
def _constant(cfg: DictConfig, optimizer: torch.optim.Optimizer, steps: Steps) -> None:
    return None  # the optimizer's lr as it is: nothing to step


@SCHEDULERS.register("step", schema=StepSchedule, check=_check_step)
def _step(cfg: DictConfig, optimizer: torch.optim.Optimizer, steps: Steps) -> sched.LRScheduler:
    return sched.StepLR(optimizer, step_size=steps(cfg.step_epochs), gamma=cfg.gamma)


@SCHEDULERS.register("cosine", schema=CosineSchedule, check=_check_min_lr)
def _cosine(cfg: DictConfig, optimizer: torch.optim.Optimizer, steps: Steps) -> sched.LRScheduler:
    return sched.CosineAnnealingLR(optimizer, T_max=steps.total, eta_min=cfg.min_lr)


@SCHEDULERS.register("onecycle", schema=OneCycleSchedule, check=_check_onecycle)
def _onecycle(cfg: DictConfig, optimizer: torch.optim.Optimizer, steps: Steps) -> sched.LRScheduler:
    max_lr = [g["lr"] for g in optimizer.param_groups] if cfg.max_lr is None else cfg.max_lr
    return sched.OneCycleLR(optimizer, max_lr=max_lr, total_steps=steps.total, pct_start=cfg.pct_start,
                            div_factor=cfg.div_factor, final_div_factor=cfg.final_div_factor,
                            anneal_strategy=cfg.anneal_strategy, cycle_momentum=cfg.cycle_momentum)


def _warmup_then(cfg: DictConfig, optimizer: torch.optim.Optimizer, steps: Steps,
                 after: Callable[[int], sched.LRScheduler]) -> sched.LRScheduler:
    """A linear ramp over ``warmup_epochs`` (none for 0), then the schedule ``after(warmup steps)`` builds."""
    warm = steps(cfg.warmup_epochs) if cfg.warmup_epochs > 0 else 0
    if warm == 0:
        return after(warm)
    # The ramp is built first: building a schedule sets the optimizer's lr, so the order is part of the result.
    ramp = sched.LinearLR(optimizer, start_factor=cfg.start_factor, end_factor=1.0, total_iters=warm)
    return sched.SequentialLR(optimizer, [ramp, after(warm)], milestones=[warm])


@SCHEDULERS.register("warmup", schema=WarmupSchedule, check=_check_warmup)
def _warmup(cfg: DictConfig, optimizer: torch.optim.Optimizer, steps: Steps) -> sched.LRScheduler:
    return _warmup_then(cfg, optimizer, steps, lambda warm: sched.ConstantLR(optimizer, factor=1.0, total_iters=0))


@SCHEDULERS.register("warmup_cosine", schema=WarmupCosineSchedule, check=_check_warmup_cosine)
def _warmup_cosine(cfg: DictConfig, optimizer: torch.optim.Optimizer, steps: Steps) -> sched.LRScheduler:
    return _warmup_then(cfg, optimizer, steps, lambda warm: sched.CosineAnnealingLR(
        optimizer, T_max=max(1, steps.total - warm), eta_min=cfg.min_lr))


def build_scheduler(cfg: DictConfig, optimizer: torch.optim.Optimizer, steps_per_epoch: int,
                    max_epochs: int) -> Optional[sched.LRScheduler]:
    """The schedule named by ``cfg.name``, to be stepped after every optimizer step; None for constant."""
    return SCHEDULERS[cfg.name].obj(cfg, optimizer, Steps(steps_per_epoch, steps_per_epoch * max_epochs))


def swa_schedule(optimizer: torch.optim.Optimizer, swa_lr: float, anneal_epochs: float, anneal_strategy: str,
                 steps_per_epoch: int) -> SWALR:
    """torch's SWALR (torch.optim.swa_utils), stepped like every schedule here after each optimizer step: it anneals
    every group's lr from where it finds it to ``swa_lr`` over ``anneal_epochs`` epochs (converted to steps; 0: at
    once), by ``anneal_strategy`` (cos | linear), then holds it. torch's recipe steps it once per epoch (its
    ``anneal_epochs`` counts steps of the schedule): the same anneal, here in per-step increments. Building it
    leaves the lr as it is (with no anneal, sets ``swa_lr``)."""
    anneal = Steps(steps_per_epoch, 0)(anneal_epochs) if anneal_epochs > 0 else 0
    return SWALR(optimizer, swa_lr=swa_lr, anneal_epochs=anneal, anneal_strategy=anneal_strategy)
