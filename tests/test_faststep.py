"""regbench.faststep: the direct step (forward and backward without the autograd engine) against autograd.

Both paths run the same ATen kernels in the same order on the same machine, so the comparisons are bitwise
(``torch.equal``) on any CPU: gradients of every layer kind, both dropout placements, the losses (plain
cross-entropy by hand; label smoothing and soft targets through autograd on the logits), the penalties, the
global RNG after the step, and whole runs through the CLI.
"""

from __future__ import annotations

import csv
import functools
import json

import pytest
import torch
import torch.nn.functional as F

from regbench import faststep
from regbench.data import batches
from regbench.models import build_model
from regbench.optim import build_optimizer
from regbench.regularizers import Context, build_stack
from regbench.train import fit, train_one_epoch
from tests.conftest import TINY, compose_cfg

ACTIVATIONS = ["relu", "leaky_relu", "elu", "sigmoid", "tanh"]


@functools.lru_cache(maxsize=None)
def _compose(*overrides: str):
    return compose_cfg(*overrides)


def _setup(*overrides: str):
    cfg = _compose("model.hidden=[32,16]", *overrides)
    stack = build_stack(cfg, Context(cfg))
    torch.manual_seed(0)
    model = build_model(cfg.model, (1, 8, 8), 10, stack.slots())
    stack.setup(model)
    loss_fn = functools.partial(F.cross_entropy, **stack.loss_options()) if stack.loss_options() else F.cross_entropy
    return cfg, stack, model, loss_fn


def _batch(soft: bool = False):
    g = torch.Generator().manual_seed(3)
    x = torch.randn(12, 1, 8, 8, generator=g)
    y = torch.arange(12) % 10
    if soft:  # MixUp-like targets: two classes mixed per sample
        y = 0.7 * F.one_hot(y, 10).float() + 0.3 * F.one_hot((y + 3) % 10, 10).float()
    return x, y


def _autograd_step(model, loss_fn, penalty_fn, x, y):
    model.zero_grad(set_to_none=True)
    logits = model(x)
    loss = loss_fn(logits, y)
    penalty = penalty_fn(model) if penalty_fn else None
    (loss + penalty if penalty is not None else loss).backward()
    return logits.detach(), loss.detach(), [p.grad for p in model.parameters()]


def _direct_step(model, loss_fn, penalty_fn, x, y):
    direct, impl = faststep.plan(model, loss_fn, _compose().trainer, torch.device("cpu"))
    assert impl == "direct", impl
    for p in model.parameters():
        p.grad = None
    logits, loss, _ = direct(x, y, penalty_fn)
    return logits, loss, [p.grad for p in model.parameters()]


def _same_step(overrides: tuple, soft: bool = False):
    _, stack, model, loss_fn = _setup(*overrides)
    model.train()
    x, y = _batch(soft)
    torch.manual_seed(11)
    a = _autograd_step(model, loss_fn, stack.penalty_fn(), x, y)
    rng_a = torch.get_rng_state()
    torch.manual_seed(11)
    b = _direct_step(model, loss_fn, stack.penalty_fn(), x, y)
    assert torch.equal(rng_a, torch.get_rng_state())  # dropout drew the same masks
    assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])
    for ga, gb in zip(a[2], b[2]):
        assert ga is not None and torch.equal(ga, gb) and ga.stride() == gb.stride()


# ------------------------------------------------------------------------------------------ gradients


@pytest.mark.parametrize("activation", ACTIVATIONS)
def test_gradients_equal_autograds_for_every_activation(activation):
    _same_step((f"model.activation={activation}",))


@pytest.mark.parametrize("placement", ["after_activation", "before_activation"])
def test_dropout_masks_and_gradients_equal_autograds(placement):
    _same_step(("regularizer=[dropout]", "regularizer.dropout.rate=0.3",
                f"regularizer.dropout.placement={placement}", "model.activation=elu"))
    _same_step(("regularizer=[dropout]", "regularizer.dropout.rate=[0.5,0.1]"))


@pytest.mark.parametrize("stack", [["regularizer=[l2]"], ["regularizer=[l1,l2]"], ["regularizer=[elastic_net]"],
                                   ["regularizer=[l2,dropout]", "regularizer.l2.lam=0.01"]])
def test_penalty_gradients_add_as_autograds_buffer_adds_them(stack):
    _same_step(tuple(stack))


def test_label_smoothing_and_soft_targets_go_through_autograd_on_the_logits():
    _same_step(("regularizer=[label_smoothing]",))
    _same_step((), soft=True)
    _same_step(("regularizer=[label_smoothing]",), soft=True)


# ------------------------------------------------------------------------------------------- whole runs


def _weights_after(fast: bool, *overrides: str) -> torch.Tensor:
    cfg, stack, model, loss_fn = _setup(*overrides)
    opt = build_optimizer(cfg.optimizer, stack.param_groups(model, cfg.optimizer), fused=True)
    direct = faststep.plan(model, loss_fn, cfg.trainer, torch.device("cpu"))[0] if fast else None
    assert (direct is not None) == fast
    x, y = torch.randn(40, 1, 8, 8, generator=torch.Generator().manual_seed(1)), torch.arange(40) % 10
    torch.manual_seed(5)
    sums = []
    for epoch in range(2):
        out = train_one_epoch(model, opt, batches(x, y, 8, torch.Generator().manual_seed(epoch)), loss_fn=loss_fn,
                              penalty_fn=stack.penalty_fn(), before_step=stack.before_step_fn(), direct=direct)
        sums += [out["loss"], out["correct"]] + ([out["penalty"]] if out["penalty"] is not None else [])
    return torch.cat([p.detach().flatten() for p in model.parameters()] + [s.reshape(1).float() for s in sums])


@pytest.mark.parametrize("stack", [[], ["regularizer=[dropout,l2,grad_clip]"], ["regularizer=[weight_decay]"],
                                   ["regularizer=[label_smoothing,l1]", "optimizer=sgd"]])
def test_training_epochs_equal_autograds_bitwise(stack):
    assert torch.equal(_weights_after(True, *stack), _weights_after(False, *stack))


def test_a_run_is_bitwise_the_autograd_run_and_says_which_step_ran(tmp_path):
    common = [*TINY, "regularizer=[dropout,l2]", "trainer.max_epochs=2"]
    for fast in ("true", "false"):
        fit(compose_cfg(*common, f"trainer.fast_step={fast}"), tmp_path / fast)
    summaries = {f: json.loads((tmp_path / f / "summary.json").read_text()) for f in ("true", "false")}
    assert summaries["true"]["step_impl"] == "direct" and summaries["false"]["step_impl"] == "autograd"
    assert summaries["true"]["test"] == summaries["false"]["test"]
    rows = []
    for f in ("true", "false"):
        with open(tmp_path / f / "metrics.csv") as fh:
            rows.append([{k: v for k, v in r.items() if k != "epoch_time_s"} for r in csv.DictReader(fh)])
    assert len(rows[0]) == 2 and rows[0] == rows[1]  # every metric of every epoch, to the last digit


# ----------------------------------------------------------------------------------------- where it applies


@pytest.mark.parametrize("overrides, why", [
    (["trainer.fast_step=false"], "trainer.fast_step=false"),
    (["trainer.compile=model"], "trainer.compile=model"),
    (["trainer.amp=bf16"], "trainer.amp=bf16"),
    (["regularizer=[batchnorm]"], "layer BatchNorm1d"),
    (["regularizer=[layer_norm]"], "layer LayerNorm"),
])
def test_other_models_and_settings_train_through_autograd(overrides, why):
    cfg, _, model, loss_fn = _setup(*overrides)
    direct, impl = faststep.plan(model, loss_fn, cfg.trainer, torch.device("cpu"))
    assert direct is None and impl == f"autograd: {why}"


def test_conv_models_gpus_hooks_and_frozen_layers_train_through_autograd():
    cfg, _, model, loss_fn = _setup()
    t = cfg.trainer
    assert faststep.plan(model, loss_fn, t, torch.device("cuda"))[1].startswith("autograd: device cuda")
    conv = build_model(_compose("model=lecture_cnn").model, (1, 28, 28), 10)
    assert faststep.plan(conv, loss_fn, t, torch.device("cpu"))[1] == \
        f"autograd: model {type(conv).__name__} (the direct step covers regbench's mlp)"
    handle = model.head.register_forward_hook(lambda *a: None)
    assert faststep.plan(model, loss_fn, t, torch.device("cpu"))[1] == "autograd: hooks or parametrizations on head"
    handle.remove()
    model.head.weight.requires_grad_(False)
    assert faststep.plan(model, loss_fn, t, torch.device("cpu"))[1] == "autograd: frozen parameter head.weight"
    model.head.weight.requires_grad_(True)
    assert faststep.plan(model.double(), loss_fn, t, torch.device("cpu"))[1] == \
        "autograd: parameters that are not float32"
