"""Keras' activity_regularizer (regularizer=[activity]): Keras' L1L2 term divided by the batch size on hand-computed
activations, which tensors are the hidden layers' outputs (MLP, lecture CNN, ResNet), that only the training forward
is read (no evaluation term, no graph kept), the autograd step it needs, runs from the composed config, bitwise
resume, and the one-line refusals."""

from __future__ import annotations

import copy
import json

import pytest
import torch
import torch.nn.functional as F

from regbench import faststep
from regbench.errors import ConfigError, RegbenchError
from regbench.loop import AutogradStep
from regbench.models import build_model
from regbench.regularizers import Context, build_stack
from regbench.regularizers.activity import activity_term
from regbench.regularizers.stacking import stack_refusals
from regbench.train import fit
from regbench.validation import validate
from tests.conftest import F32_REL, TINY, compose_cfg, interrupt_then_resume, small_model
from tests.test_resume import metrics_without_time


def test_keras_term_on_hand_computed_activations():
    # keras/src/regularizers/regularizers.py's example: Dense(5, kernel_initializer='ones') on ones(5, 5) * 2 gives
    # outputs of 10; activity_regularizer=L2(0.01): 0.01 · 25 · 100 = 25, "after dividing by batch size of 5 is 5.0"
    assert activity_term(torch.full((5, 5), 10.0), 0.0, 0.01).item() == pytest.approx(5.0, rel=F32_REL)
    a = torch.tensor([[1.0, -2.0], [3.0, 0.0]])  # B = 2: Σ|a| = 6, Σa² = 14
    assert activity_term(a, 0.1, 0.0).item() == pytest.approx(0.1 * 6 / 2, rel=F32_REL)
    assert activity_term(a, 0.1, 0.01).item() == pytest.approx((0.1 * 6 + 0.01 * 14) / 2, rel=F32_REL)
    conv = torch.ones(4, 3, 2, 2)  # a conv layer's output: summed over every unit of the sample, divided by B = 4
    assert activity_term(conv, 0.5, 0.0).item() == pytest.approx(0.5 * 48 / 4, rel=F32_REL)
    assert activity_term(a.bfloat16(), 0.0, 1.0).dtype == torch.float32  # under autocast: summed in float32


def _setup(*overrides, model=("model.hidden=[6,5]",)):
    cfg = compose_cfg(*TINY, *model, *overrides)
    stack = build_stack(cfg, Context(cfg))
    torch.manual_seed(0)
    net = build_model(cfg.model, (1, 28, 28) if "lecture_cnn" not in str(model) else (3, 8, 8), 10, stack.slots())
    stack.setup(net)
    return stack.get("activity"), net, stack


def test_the_mlp_hidden_outputs_after_the_activation_before_dropout():
    member, model, _ = _setup("regularizer=[dropout,activity]", "regularizer.dropout.rate=0.5",
                              "regularizer.activity.l1=0.003", "regularizer.activity.l2=0.02")
    assert member.names == ["hidden.0.act", "hidden.1.act"]  # not the head (the logits)
    x = torch.randn(7, 1, 28, 28)
    model.train()
    torch.manual_seed(3)
    model(x)
    got = member.penalty(model)
    lin0, lin1 = model.hidden[0].linear, model.hidden[1].linear
    torch.manual_seed(3)  # the same dropout masks
    h0 = F.relu(lin0(x.flatten(1)))
    h1 = F.relu(lin1(F.dropout(h0, 0.5, training=True)))
    want = sum((0.003 * h.abs().sum() + 0.02 * h.square().sum()) / 7 for h in (h0, h1))
    assert torch.allclose(got, want, rtol=1e-6, atol=0)
    assert member.outputs == {}  # taken out: no graph kept until the next step


def test_the_lecture_cnn_outputs_every_conv_and_the_dense_layer_before_pooling():
    member, model, _ = _setup("regularizer=[activity]", "regularizer.activity.l2=0.1",
                              model=("model=lecture_cnn", "model.widths=[4]", "model.dense=6"))
    assert member.names == ["features.0.act0", "features.0.act1", "head.act"]
    x = torch.randn(3, 3, 8, 8)
    model.train()
    model(x)
    got = member.penalty(model)
    block, head = model.features[0], model.head
    a0 = F.relu(block.conv0(x))
    a1 = F.relu(block.conv1(a0))
    a2 = F.relu(head.dense(F.adaptive_max_pool2d(F.max_pool2d(a1, 2), 1).flatten(1)))
    want = sum(0.1 * a.square().sum() / 3 for a in (a0, a1, a2))
    assert torch.allclose(got, want, rtol=1e-6, atol=0)


def test_the_resnet_outputs_its_stem_and_every_residual_block():
    member, _, _ = _setup("regularizer=[activity]", model=small_model("resnet"))
    assert member.names == ["features.0.2", "features.1.0", "features.2.0", "features.3.0"]


def test_layers_narrow_the_choice_and_choose_hidden_layers_only():
    member, _, _ = _setup("regularizer=[activity]", "regularizer.activity.layers=[hidden.1]")
    assert member.names == ["hidden.1.act"]
    with pytest.raises(ConfigError) as e:
        _setup("regularizer=[activity]", "regularizer.activity.layers=[head]")
    assert str(e.value) == ("regularizer.activity.layers='head': expected a pattern matching a hidden layer's output "
                            "of this model (hidden.0.act, hidden.1.act)")
    with pytest.raises(RegbenchError) as e:
        _setup("regularizer=[activity]", model=("model.hidden=[]",))
    assert str(e.value).startswith("regularizer member 'activity' applies to nothing: regularizer.activity.layers="
                                   "null chooses no hidden layer's output")


def test_only_the_training_forward_with_gradients_is_kept():
    member, model, stack = _setup("regularizer=[activity]")
    x = torch.randn(4, 1, 28, 28)
    model.eval()
    model(x)  # evaluation mode
    model.train()
    with torch.no_grad():
        model(x)  # no gradients (evaluate, MC dropout, TTA)
    twin = copy.deepcopy(model)  # an averaged model shares the hook functions, not the modules
    twin(x)
    assert member.outputs == {}
    model(x)
    model(x)
    assert sorted(member.outputs) == ["hidden.0.act", "hidden.1.act"]  # one tensor per layer: the latest
    step = AutogradStep(model, torch.optim.SGD(model.parameters(), lr=0.1), penalty_fn=stack.penalty_fn())
    _, _, penalty = step.step(x, torch.zeros(4, dtype=torch.long))
    assert penalty is not None and penalty.item() > 0 and member.outputs == {}


def test_the_hooks_send_the_step_to_autograd_and_zero_strength_adds_nothing(tmp_path):
    _, model, _ = _setup("regularizer=[activity]")
    direct, plan = faststep.plan(model, F.cross_entropy, compose_cfg().trainer, torch.device("cpu"))
    assert direct is None and plan == "autograd: hooks or parametrizations on hidden.0.act"
    zero, model, _ = _setup("regularizer=[activity]", "regularizer.activity.l2=0")
    assert zero.penalty(model) is None and not any(m._forward_hooks for m in model.modules())
    fit(compose_cfg(*TINY, "model.hidden=[16]", "regularizer=[activity]", "regularizer.activity.l2=0"), tmp_path / "z")
    fit(compose_cfg(*TINY, "model.hidden=[16]"), tmp_path / "plain")
    assert metrics_without_time(tmp_path / "z") == metrics_without_time(tmp_path / "plain")


def test_composes_from_the_cli_config_and_trains(tmp_path):
    fit(compose_cfg(*TINY, "model.hidden=[16]", "regularizer=[activity]", "regularizer.activity.l1=1e-3"), tmp_path)
    s = json.loads((tmp_path / "summary.json").read_text())
    assert s["status"] == "completed" and s["regularizers"] == ["activity"] and s["step_impl"] == "autograd"
    assert s["final"]["train_penalty"] > 0  # logged apart from the data loss
    assert s["regularizer_info"]["activity"] == {"layers": ["hidden.0.act"]}


def test_resume_is_bitwise(tmp_path, monkeypatch):
    run = ["data.train_size=64", "data.batch_size=32", "data.test_size=100", "trainer.max_epochs=3",
           "trainer.progress_bar=false", "model.hidden=[16]", "regularizer=[dropout,activity]",
           "regularizer.activity.l1=1e-3"]
    fit(compose_cfg(*run), tmp_path / "ref")
    interrupt_then_resume(monkeypatch, run, tmp_path / "run", 2)
    assert json.loads((tmp_path / "run" / "summary.json").read_text())["resumed_from_epoch"] == 2
    assert metrics_without_time(tmp_path / "run") == metrics_without_time(tmp_path / "ref")


def test_refused_in_a_stack_and_on_torchvision_with_one_line():
    (refusal,) = stack_refusals(compose_cfg("regularizer=[activity]"))
    assert (refusal.key, refusal.value) == ("regularizer", "activity")
    assert refusal.fix == "drop activity from the regularizer list"
    assert refusal.why == ("reads each layer's output through forward hooks on its own model, which a stack's "
                           "batched model does not run")
    with pytest.raises(ConfigError) as e:
        validate(compose_cfg(*TINY, *small_model("torchvision"), "regularizer=[activity]"))
    assert str(e.value).startswith("model='torchvision': expected a model of regbench's own layers with "
                                   "regularizer.activity (mlp, lecture_cnn, resnet: its activations are torchvision's")
    with pytest.raises(ConfigError, match=r"^regularizer.activity.l1=-1.0: expected a number >= 0$"):
        validate(compose_cfg(*TINY, "regularizer=[activity]", "regularizer.activity.l1=-1"))
