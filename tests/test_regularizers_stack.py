"""The stack itself: one ORDER list checked against the registry, members' facts (info) and log lines,
the stopped property, check() without side effects."""

from __future__ import annotations

import logging
import subprocess
import sys

import pytest
import torch

from regbench.models import build_model
from regbench.optim import build_optimizer
from regbench.regularizers import ORDER, REGISTRY, Context, build_stack, check_order
from tests.conftest import REPO, compose_cfg

# Per member: overrides under which its check() passes on the default MLP (check only reads the config).
CHECKABLE = {"mc_dropout": ["regularizer=[dropout,mc_dropout]"],
             "transfer": ["regularizer=[transfer]", "regularizer.transfer.init_from=/nowhere"],
             "ensemble": ["regularizer=[ensemble]", "regularizer.ensemble.k=1"]}


def built(*overrides):
    """(stack, model, optimizer) as fit builds them, on the tiny MLP."""
    cfg = compose_cfg("model.hidden=[6]", *overrides)
    stack = build_stack(cfg, Context(cfg))
    torch.manual_seed(0)
    model = build_model(cfg.model, (1, 2, 2), 10, stack.slots())
    stack.setup(model)
    optimizer = build_optimizer(cfg.optimizer, stack.param_groups(model, cfg.optimizer))
    return stack, model, optimizer


def test_order_places_every_registered_member_exactly_once():
    assert sorted(ORDER) == sorted(REGISTRY) and len(set(ORDER)) == len(ORDER)
    check_order(REGISTRY, ORDER)
    with pytest.raises(RuntimeError, match=r"registered but not placed: newcomer \(add each to ORDER\)"):
        check_order({**REGISTRY, "newcomer": object}, ORDER)
    with pytest.raises(RuntimeError, match=r"placed but not registered: ghost"):
        check_order(REGISTRY, [*ORDER, "ghost"])
    with pytest.raises(RuntimeError, match=r"placed twice: l2"):
        check_order(REGISTRY, [*ORDER, "l2"])


@pytest.mark.slow
def test_a_member_registered_but_not_placed_is_an_error_at_import():
    code = ("import importlib, regbench.regularizers as r\n"
            "from regbench.regularizers.base import Regularizer, register\n"
            "register(type('Newcomer', (Regularizer,), {'name': 'newcomer'}))\n"
            "importlib.reload(r)\n")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=REPO)
    assert proc.returncode != 0 and "registered but not placed: newcomer" in proc.stderr, proc.stderr


def test_the_stack_runs_in_order_whatever_the_command_line_says():
    cfg = compose_cfg("regularizer=[ensemble,grad_clip,dropout,l2,transfer]", "regularizer.transfer.init_from=/x",
                      "regularizer.ensemble.k=1")
    assert build_stack(cfg, Context(cfg)).names == ["transfer", "l2", "dropout", "grad_clip", "ensemble"]


@pytest.mark.parametrize("name", ORDER)
def test_check_only_reads(name):
    cfg = compose_cfg(*CHECKABLE.get(name, [f"regularizer=[{name}]"]))
    member = REGISTRY[name](cfg.regularizer[name])
    before = dict(vars(member))
    member.check(Context(cfg))
    after = vars(member)
    assert after.keys() == before.keys() and all(after[k] is v for k, v in before.items())


def test_info_collects_each_members_facts_in_stack_order():
    stack, model, _ = built("regularizer=[weight_decay,batchnorm,l2]", "optimizer=sgd")
    info = stack.info()
    assert list(info) == ["l2", "weight_decay", "batchnorm"]
    assert info["l2"] == {"tensors": 2, "elements": 4 * 6 + 6 * 10}
    assert info["weight_decay"] == {"mode": "decoupled", "rate": 5e-4, "applied_by": "regbench",
                                    "decayed_tensors": 2, "decayed_elements": 84,
                                    "not_decayed_tensors": 4, "not_decayed_elements": 6 + 6 + 6 + 10}
    assert info["batchnorm"] == {"convention": "torch", "torch_momentum": 0.1, "eps": 1e-5}


def test_members_without_facts_are_left_out_and_early_stopping_reports_at_the_end():
    stack, model, _ = built("regularizer=[early_stopping,dropout,label_smoothing]")
    assert stack.info() == {}
    stack.on_train_end(model)
    assert stack.info() == {"early_stopping": {"stopped_epoch": None, "best_epoch": None, "best": None,
                                               "monitor": "val_loss", "restored_best_weights": False}}


def test_members_log_their_own_lines(caplog):
    stack, model, _ = built("regularizer=[weight_decay,l1]", "optimizer=sgd")
    with caplog.at_level(logging.INFO):
        stack.log_info(model)
    assert [r.getMessage() for r in caplog.records] == [
        "l1 penalty: 84 parameters in 2 tensors penalised, 16 in 2 tensors not penalised",
        "weight decay (decoupled, regbench): 84 parameters in 2 tensors decayed, 16 in 2 tensors not decayed"]


def test_stopped_once_a_member_asks_and_after_a_resume():
    cfg = compose_cfg("regularizer=[early_stopping,ensemble]", "regularizer.early_stopping.patience=0",
                      "regularizer.ensemble.k=1")
    stack = build_stack(cfg, Context(cfg))
    model = torch.nn.Linear(2, 2)
    stack.setup(model)
    assert not stack.stopped
    assert not stack.on_epoch_end(1, {"val_loss": 1.0}, model) and not stack.stopped
    assert stack.on_epoch_end(2, {"val_loss": 2.0}, model) and stack.stopped
    resumed = build_stack(cfg, Context(cfg))
    resumed.setup(model)
    assert not resumed.stopped
    resumed.load_state_dict(stack.state_dict())
    assert resumed.stopped
