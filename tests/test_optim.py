"""Optimizers and schedules: config values reach torch.optim, steps match hand computations."""

from __future__ import annotations

import math

import pytest
import torch

from regbench.optim import build_optimizer, build_scheduler
from regbench.registry import OPTIMIZERS, SCHEDULERS
from tests.conftest import F32_REL, compose_cfg, config_options

EXPECTED = {
    "sgd": (torch.optim.SGD, {"lr": 0.01, "momentum": 0.0, "nesterov": False}),
    "momentum": (torch.optim.SGD, {"lr": 0.01, "momentum": 0.9, "nesterov": False}),
    "nesterov": (torch.optim.SGD, {"lr": 0.01, "momentum": 0.9, "nesterov": True}),
    "adagrad": (torch.optim.Adagrad, {"lr": 0.01, "eps": 1e-10}),
    "rmsprop": (torch.optim.RMSprop, {"lr": 0.001, "alpha": 0.99, "centered": False}),
    "adam": (torch.optim.Adam, {"lr": 0.001, "betas": (0.9, 0.999), "weight_decay": 0.0}),
    "adamw": (torch.optim.AdamW, {"lr": 0.001, "betas": (0.9, 0.999), "weight_decay": 0.01}),
}


def test_every_optimizer_option_is_covered():
    assert config_options("optimizer") == sorted(EXPECTED)


@pytest.mark.parametrize("name", sorted(EXPECTED))
def test_optimizer_config_reaches_torch(name):
    cls, values = EXPECTED[name]
    opt = build_optimizer(compose_cfg(f"optimizer={name}").optimizer, [torch.nn.Parameter(torch.ones(2))])
    assert type(opt) is cls
    for k, v in values.items():
        assert opt.param_groups[0][k] == v, k


@pytest.mark.parametrize("name", list(OPTIMIZERS))
def test_every_registered_optimizer_builds_its_torch_class_with_every_key(name):
    """Each key of the option's schema (name aside) is a hyperparameter of torch's class, passed as configured:
    non-default values (each float halved, plus 0.01) come back from the optimizer's parameter group."""
    base = compose_cfg(f"optimizer={name}").optimizer
    overrides = [f"optimizer.{k}={v / 2 + 0.01}" for k, v in base.items() if type(v) is float]
    cfg = compose_cfg(f"optimizer={name}", *overrides).optimizer
    opt = build_optimizer(cfg, [torch.nn.Parameter(torch.ones(2))])
    assert type(opt).__module__.startswith("torch.optim") and type(opt).__name__.lower() == name
    group = opt.param_groups[0]
    for key, value in cfg.items():
        if key != "name":
            assert group[key] == (tuple(value) if key == "betas" else value), key
    assert set(OPTIMIZERS[name].schema.__dataclass_fields__) - {"name"} <= set(group)


def test_overrides_reach_torch():
    cfg = compose_cfg("optimizer=rmsprop", "optimizer.lr=0.05", "optimizer.momentum=0.5", "optimizer.centered=true",
                      "optimizer.weight_decay=0.001").optimizer
    g = build_optimizer(cfg, [torch.nn.Parameter(torch.ones(2))]).param_groups[0]
    assert (g["lr"], g["momentum"], g["centered"], g["weight_decay"]) == (0.05, 0.5, True, 0.001)


def test_sgd_momentum_step_by_hand():
    w = torch.nn.Parameter(torch.tensor([1.0, -2.0]))
    opt = build_optimizer(compose_cfg("optimizer=momentum", "optimizer.lr=0.1").optimizer, [w])
    for _ in range(2):
        opt.zero_grad()
        (w ** 2).sum().backward()  # gradient 2w
        opt.step()
    # step 1: v = 2w0 = (2, -4); w1 = w0 - 0.1 v = (0.8, -1.6)
    # step 2: v = 0.9 (2, -4) + 2 w1 = (3.4, -6.8); w2 = w1 - 0.1 v = (0.46, -0.92)
    assert w.detach().tolist() == pytest.approx([0.46, -0.92], rel=F32_REL)


def _lrs(sched_overrides, steps_per_epoch=10, epochs=5, lr=0.1):
    cfg = compose_cfg(*sched_overrides, f"optimizer.lr={lr}", f"trainer.max_epochs={epochs}")
    opt = build_optimizer(cfg.optimizer, [torch.nn.Parameter(torch.ones(1))])
    sched = build_scheduler(cfg.scheduler, opt, steps_per_epoch, epochs)
    lrs = []
    for _ in range(steps_per_epoch * epochs):
        lrs.append(opt.param_groups[0]["lr"])
        opt.step()
        if sched is not None:
            sched.step()
    return lrs


def test_constant_schedule():
    assert set(_lrs(["scheduler=constant"])) == {0.1}


def test_step_schedule_counts_epochs():
    lrs = _lrs(["scheduler=step", "scheduler.step_epochs=2", "scheduler.gamma=0.5"])
    # 10 steps per epoch: lr halves after epoch 2 (step 20) and epoch 4 (step 40)
    assert lrs[19] == pytest.approx(0.1) and lrs[20] == pytest.approx(0.05) and lrs[40] == pytest.approx(0.025)


def test_cosine_schedule_by_hand():
    lrs = _lrs(["scheduler=cosine", "scheduler.min_lr=0.01"])
    total = 50
    for t in (0, 10, 25, 49):
        assert lrs[t] == pytest.approx(0.01 + 0.5 * (0.1 - 0.01) * (1 + math.cos(math.pi * t / total)))


def test_warmup_schedules():
    lrs = _lrs(["scheduler=warmup", "scheduler.warmup_epochs=1", "scheduler.start_factor=0.1"])
    # linear from 0.01 to 0.1 over 10 steps, then constant
    assert lrs[0] == pytest.approx(0.01) and lrs[5] == pytest.approx(0.01 + 0.5 * 0.09)
    assert lrs[10:] == pytest.approx([0.1] * 40)
    lrs = _lrs(["scheduler=warmup_cosine", "scheduler.warmup_epochs=1", "scheduler.min_lr=0.0"])
    assert lrs[10] == pytest.approx(0.1)
    assert lrs[10 + 20] == pytest.approx(0.05)  # half-way through the 40 cosine steps
    assert lrs[-1] < 0.001


def test_onecycle_peaks_at_pct_start():
    lrs = _lrs(["scheduler=onecycle", "scheduler.pct_start=0.2"])
    assert lrs[0] == pytest.approx(0.1 / 25)
    assert max(lrs) == pytest.approx(0.1) and lrs.index(max(lrs)) == pytest.approx(0.2 * 49, abs=1)
    assert lrs[-1] < 1e-4


def test_every_schedule_option_builds():
    assert config_options("scheduler") == sorted(SCHEDULERS)  # one YAML per registered schedule
    for name in SCHEDULERS:
        lrs = _lrs([f"scheduler={name}"], steps_per_epoch=3, epochs=2)
        assert len(lrs) == 6 and lrs[0] <= 0.1 and all(0 <= lr <= 0.1 for lr in lrs)
