"""The regularizer stack: each member against a hand computation, composition, order, warnings, errors."""

from __future__ import annotations

import copy
import csv
import json
import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from regbench.data import batches
from regbench.errors import ConfigError, RegbenchError
from regbench.checkpoint import load_checkpoint
from regbench.metrics import expected_calibration_error, summarize_probs
from regbench.models import MLP, build_model
from regbench.optim import build_optimizer
from regbench.regularizers import REGISTRY, Context, build_stack
from regbench.regularizers.early_stopping import EarlyStopping
from regbench.regularizers.ensemble import Ensemble
from regbench.regularizers.mc_dropout import mc_dropout_eval
from regbench.evaluation import evaluate
from regbench.loop import AutogradStep, train_one_epoch
from regbench.train import fit
from regbench.validation import validate
from tests.conftest import F32_REL, REPO, TINY, compose_cfg, config_options, layered_models, small_model


def stack_for(*overrides):
    cfg = compose_cfg(*overrides)
    return build_stack(cfg, Context(cfg)), cfg


def tiny_mlp(stack, cfg, in_shape=(1, 28, 28)):
    torch.manual_seed(0)
    model = build_model(cfg.model, in_shape, 10, stack.slots())
    stack.setup(model)
    return model


def read_rows(run_dir):
    with open(run_dir / "metrics.csv") as f:
        return list(csv.DictReader(f))


def strip_time(rows):
    return [{k: v for k, v in r.items() if k != "epoch_time_s"} for r in rows]


def test_every_member_has_a_yaml_and_the_yaml_names_its_schema():
    assert set(REGISTRY) <= set(config_options("regularizer"))
    for option in config_options("regularizer"):
        text = (REPO / "configs" / "regularizer" / f"{option}.yaml").read_text()
        member = option if option in REGISTRY else text.split("/schema/regularizer/")[1].split("@")[0]
        assert member in REGISTRY and f"/schema/regularizer/{member}@{member}" in text, option  # presets too
    assert list(compose_cfg("regularizer=[lecture_dropout]").regularizer) == ["dropout"]


# ---------------------------------------------------------------------------------------- penalties


def _weights(model):
    return [p for p in model.parameters() if p.ndim >= 2]


@pytest.mark.parametrize("name,extra,formula", [
    ("l1", [], lambda ws, lam: lam * sum(w.abs().sum() for w in ws)),
    ("l2", [], lambda ws, lam: lam * sum((w ** 2).sum() for w in ws)),
    ("l2", ["regularizer.l2.half=true"], lambda ws, lam: 0.5 * lam * sum((w ** 2).sum() for w in ws)),
    ("elastic_net", ["regularizer.elastic_net.ratio=0.3"],
     lambda ws, lam: lam * (0.3 * sum(w.abs().sum() for w in ws) + 0.7 / 2 * sum((w ** 2).sum() for w in ws))),
])
def test_penalty_values_and_gradients_by_hand(name, extra, formula):
    stack, cfg = stack_for(f"regularizer=[{name}]", f"regularizer.{name}.lam=0.01", "model.hidden=[5]", *extra)
    model = tiny_mlp(stack, cfg)
    penalty = stack.penalty_fn()(model)
    expected = formula(_weights(model), 0.01)
    assert penalty.item() == pytest.approx(expected.item(), rel=F32_REL)
    penalty.backward()
    w = model.hidden[0].linear.weight
    grad = {"l1": 0.01 * w.sign(), "l2": 0.01 * (1.0 if "half" in "".join(extra) else 2.0) * w,
            "elastic_net": 0.01 * (0.3 * w.sign() + 0.7 * w)}[name]
    assert torch.allclose(w.grad, grad.detach(), atol=1e-7)
    assert model.hidden[0].linear.bias.grad is None  # biases are not penalised by default


def test_penalty_params_all_and_layer_patterns():
    stack, cfg = stack_for("regularizer=[l2]", "regularizer.l2.lam=1", "regularizer.l2.params=all", "model.hidden=[4]")
    model = tiny_mlp(stack, cfg)
    assert stack.penalty_fn()(model).item() == pytest.approx(sum((p ** 2).sum() for p in model.parameters()).item(),
                                                             rel=F32_REL)
    stack, cfg = stack_for("regularizer=[l1]", "regularizer.l1.lam=1", "regularizer.l1.layers=[head]",
                           "model.hidden=[4]")
    model = tiny_mlp(stack, cfg)
    assert stack.penalty_fn()(model).item() == pytest.approx(model.head.weight.abs().sum().item(), rel=F32_REL)
    stack, cfg = stack_for("regularizer=[l1]", "regularizer.l1.layers=[hiden.*]")
    with pytest.raises(ConfigError, match=r"regularizer.l1.layers='hiden.\*': expected a pattern matching"):
        tiny_mlp(stack, cfg)


def test_penalty_is_optimised_and_logged_apart_from_the_data_loss(tmp_path):
    fit(compose_cfg(*TINY, "regularizer=[l2]", "regularizer.l2.lam=0.001", "trainer.max_epochs=2"), tmp_path)
    rows = read_rows(tmp_path)
    assert all(float(r["train_penalty"]) > 0 for r in rows)
    last = load_checkpoint(tmp_path / "checkpoints" / "last.pt")["model"]
    l2_end = sum((v ** 2).sum().item() for k, v in last.items() if k.endswith("weight"))
    assert float(rows[-1]["weight_l2"]) == pytest.approx(math.sqrt(l2_end), rel=1e-5)
    base = tmp_path / "base"
    fit(compose_cfg(*TINY, "trainer.max_epochs=2"), base)
    assert all(float(r["train_penalty"]) == 0 for r in read_rows(base))
    # Same seed: the data loss starts equal; the penalty changes what is optimised afterwards.
    assert float(read_rows(base)[1]["weight_l2"]) > float(rows[1]["weight_l2"])


def test_keras_l2_equals_sgd_coupled_decay_of_twice_lambda():
    x, y = torch.randn(64, 1, 4, 4), torch.randint(0, 10, (64,))

    def train(*overrides):
        stack, cfg = stack_for("optimizer=sgd", "optimizer.lr=0.1", "model.hidden=[8]", *overrides)
        model = tiny_mlp(stack, cfg, (1, 4, 4))
        opt = build_optimizer(cfg.optimizer, stack.param_groups(model, cfg.optimizer))
        step = AutogradStep(model, opt, penalty_fn=stack.penalty_fn(), before_step=stack.before_step_fn())
        train_one_epoch(step, batches(x, y, 16, torch.Generator().manual_seed(0)))
        return model

    a = train("regularizer=[l2]", "regularizer.l2.lam=0.01")
    b = train("regularizer=[weight_decay]", "regularizer.weight_decay.mode=coupled", "regularizer.weight_decay.rate=0.02")
    for pa, pb in zip(a.parameters(), b.parameters()):
        assert torch.allclose(pa, pb, atol=1e-6)


# -------------------------------------------------------------------------------------- weight decay


def _one_step(overrides, x=None, steps=1):
    stack, cfg = stack_for("model.hidden=[6]", *overrides)
    model = tiny_mlp(stack, cfg, (1, 2, 2))
    start = copy.deepcopy(model)
    opt = build_optimizer(cfg.optimizer, stack.param_groups(model, cfg.optimizer))
    x = torch.randn(8, 1, 2, 2) if x is None else x
    y = torch.arange(8) % 10
    for _ in range(steps):
        train_one_epoch(AutogradStep(model, opt, before_step=stack.before_step_fn()), [(x, y)])
    return start, model, stack


def test_decoupled_decay_with_sgd_by_hand():
    x = torch.randn(8, 1, 2, 2)
    start, model, stack = _one_step(["optimizer=sgd", "optimizer.lr=0.1", "regularizer=[weight_decay]",
                                     "regularizer.weight_decay.rate=0.5"], x)
    w0 = start.hidden[0].linear.weight.detach().clone().requires_grad_(True)
    # The data gradient at w0, computed on the starting model.
    loss = F.cross_entropy(start(x), torch.arange(8) % 10)
    g = torch.autograd.grad(loss, start.hidden[0].linear.weight)[0]
    expected = w0 * (1 - 0.1 * 0.5) - 0.1 * g  # w <- w - lr*wd*w - lr*g
    assert torch.allclose(model.hidden[0].linear.weight, expected, atol=1e-6)
    gb = torch.autograd.grad(F.cross_entropy(start(x), torch.arange(8) % 10), start.hidden[0].linear.bias)[0]
    assert torch.allclose(model.hidden[0].linear.bias, start.hidden[0].linear.bias - 0.1 * gb, atol=1e-6)  # not decayed
    info = stack.info()["weight_decay"]
    assert (info["decayed_tensors"], info["decayed_elements"]) == (2, 4 * 6 + 6 * 10)
    assert (info["not_decayed_tensors"], info["not_decayed_elements"]) == (2, 6 + 10)
    assert info["applied_by"] == "regbench"


def test_decoupled_decay_with_adam_equals_torch_adamw():
    x = torch.randn(8, 1, 2, 2)
    common = ["optimizer.lr=0.01", "regularizer=[weight_decay]", "regularizer.weight_decay.rate=0.1"]
    _, ours, s1 = _one_step(["optimizer=adam", *common], x, steps=5)
    _, native, s2 = _one_step(["optimizer=adamw", "optimizer.weight_decay=0", *common], x, steps=5)
    assert s1.info()["weight_decay"]["applied_by"] == "regbench"
    assert s2.info()["weight_decay"]["applied_by"] == "optimizer"
    for a, b in zip(ours.parameters(), native.parameters()):
        assert torch.allclose(a, b, atol=1e-6)


def test_coupled_decay_with_adamw_equals_torch_adam_weight_decay():
    x = torch.randn(8, 1, 2, 2)
    common = ["optimizer.lr=0.01", "regularizer=[weight_decay]", "regularizer.weight_decay.rate=0.1",
              "regularizer.weight_decay.mode=coupled"]
    _, ours, _ = _one_step(["optimizer=adamw", "optimizer.weight_decay=0", *common], x, steps=5)
    _, native, _ = _one_step(["optimizer=adam", *common], x, steps=5)
    for a, b in zip(ours.parameters(), native.parameters()):
        assert torch.allclose(a, b, atol=1e-6)


def test_weight_decay_groups_exclude_norm_parameters():
    stack, cfg = stack_for("regularizer=[weight_decay,batchnorm]", "model.hidden=[6]")
    model = tiny_mlp(stack, cfg, (1, 2, 2))
    groups = stack.param_groups(model, cfg.optimizer)
    assert [len(g["params"]) for g in groups] == [2, 4]  # 2 kernels | 2 biases + BN gamma, beta
    stack, cfg = stack_for("regularizer=[weight_decay]", "regularizer.weight_decay.exclude_bias_and_norm=false")
    assert len(stack.param_groups(tiny_mlp(stack, cfg), cfg.optimizer)) == 1


def test_weight_decay_refuses_a_second_source_of_decay():
    with pytest.raises(ConfigError, match=r"optimizer.weight_decay=0.01: expected 0 when regularizer weight_decay"):
        stack_for("optimizer=adamw", "regularizer=[weight_decay]")


# ------------------------------------------------------------------------------------------ dropout


def test_dropout_fraction_scaling_and_deterministic_eval():
    stack, cfg = stack_for("regularizer=[dropout]", "regularizer.dropout.rate=0.3", "model.hidden=[2000]")
    model = tiny_mlp(stack, cfg)
    drop = model.hidden[0].dropout
    torch.manual_seed(0)
    out = drop(torch.ones(100, 2000))
    zero = (out == 0).double().mean().item()
    assert zero == pytest.approx(0.3, abs=0.005)
    assert torch.allclose(out[out != 0], torch.full_like(out[out != 0], 1 / 0.7))  # inverted dropout
    model.eval()
    x = torch.randn(4, 1, 28, 28)
    assert torch.equal(model(x), model(x))


def test_dropout_per_layer_rates_placement_and_spatial():
    stack, cfg = stack_for("regularizer=[dropout]", "regularizer.dropout.rate=[0.3,0.2]", "model.hidden=[8,8]",
                           "regularizer.dropout.placement=before_activation")
    model = tiny_mlp(stack, cfg)
    assert [m.p for m in model.modules() if isinstance(m, nn.Dropout)] == [0.3, 0.2]
    assert [n for n, _ in model.hidden[0].named_children()] == ["linear", "dropout", "act"]
    stack, cfg = stack_for("model=lecture_cnn", "regularizer=[dropout]", "regularizer.dropout.spatial=0.25",
                           "regularizer.dropout.rate=0.4")
    cnn = tiny_mlp(stack, cfg, (3, 32, 32))
    assert sum(isinstance(m, nn.Dropout2d) for m in cnn.modules()) == 6
    assert [m.p for m in cnn.head if isinstance(m, nn.Dropout)] == [0.4]
    d2 = next(m for m in cnn.modules() if isinstance(m, nn.Dropout2d))
    torch.manual_seed(0)
    maps = d2(torch.ones(50, 32, 4, 4))
    per_map = maps.flatten(2)
    assert torch.all((per_map == 0).all(2) | (per_map != 0).all(2))  # whole feature maps are dropped
    assert (per_map[:, :, 0] == 0).double().mean().item() == pytest.approx(0.25, abs=0.03)


@pytest.mark.parametrize("overrides,match", [
    (["regularizer.dropout.spatial=0.2"], "regularizer.dropout.spatial=0.2: expected 0 with model=mlp"),
    (["regularizer.dropout.rate=1.0"], "regularizer.dropout.rate=1.0: expected a rate in"),
    (["regularizer.dropout.rate=[0.1,0.2,0.3]"], "expected one rate or 2"),
    (["regularizer.dropout.placement=before"], "regularizer.dropout.placement='before'"),
])
def test_dropout_errors(overrides, match):
    with pytest.raises(ConfigError, match=match):
        stack_for("regularizer=[dropout]", *overrides)


# ------------------------------------------------------------------------------------------- norms


@pytest.mark.parametrize("convention,momentum,torch_m", [("torch", None, 0.1), ("keras", None, 0.01),
                                                         ("keras", 0.9, 0.1), ("torch", 0.3, 0.3)])
def test_batchnorm_running_statistics_in_both_conventions(convention, momentum, torch_m):
    extra = [] if momentum is None else [f"regularizer.batchnorm.momentum={momentum}"]
    stack, cfg = stack_for("regularizer=[batchnorm]", f"regularizer.batchnorm.convention={convention}",
                           "model.hidden=[3]", *extra)
    model = tiny_mlp(stack, cfg, (1, 2, 2))
    bn = model.hidden[0].norm
    assert isinstance(bn, nn.BatchNorm1d)
    assert bn.eps == (1e-5 if convention == "torch" else 1e-3)
    model.train()
    x = torch.randn(16, 1, 2, 2)
    h = model.hidden[0].linear(x.flatten(1)).detach()
    model(x)
    # torch: running <- (1 - m)·running + m·batch (running starts at 0 / 1; the variance is unbiased)
    assert torch.allclose(bn.running_mean, torch_m * h.mean(0), atol=1e-6)
    assert torch.allclose(bn.running_var, (1 - torch_m) * 1 + torch_m * h.var(0, unbiased=True), atol=1e-6)


def test_group_and_layer_norm_and_only_one_norm():
    stack, cfg = stack_for("model=lecture_cnn", "regularizer=[group_norm]", "regularizer.group_norm.groups=4")
    cnn = tiny_mlp(stack, cfg, (3, 32, 32))
    gns = [m for m in cnn.modules() if isinstance(m, nn.GroupNorm)]
    assert len(gns) == 6 and all(g.num_groups == 4 for g in gns)
    stack, cfg = stack_for("regularizer=[layer_norm]", "model.hidden=[5]")
    assert isinstance(tiny_mlp(stack, cfg).hidden[0].norm, nn.LayerNorm)
    with pytest.raises(ConfigError, match="at most one normalisation"):
        stack_for("regularizer=[batchnorm,layer_norm]")
    stack, cfg = stack_for("regularizer=[group_norm]", "regularizer.group_norm.groups=7", "model.hidden=[8]")
    with pytest.raises(ConfigError, match="regularizer.group_norm.groups=7: expected a divisor"):
        tiny_mlp(stack, cfg)


# -------------------------------------------------------------------------------- label smoothing


def test_label_smoothing_targets_by_hand():
    stack, _ = stack_for("regularizer=[label_smoothing]", "regularizer.label_smoothing.alpha=0.1")
    logits = torch.tensor([[2.0, 0.5, -1.0], [0.1, 0.2, 0.3]])
    y = torch.tensor([0, 2])
    loss = F.cross_entropy(logits, y, **stack.loss_options())
    K, a = 3, 0.1
    soft = torch.full((2, K), a / K)
    soft[0, 0] += 1 - a
    soft[1, 2] += 1 - a  # on-class 1 - α + α/K, off-class α/K
    expected = -(soft * torch.log_softmax(logits, 1)).sum(1).mean()
    assert loss.item() == pytest.approx(expected.item(), rel=F32_REL)


def test_label_smoothing_loss_floor_is_the_target_entropy():
    stack, _ = stack_for("regularizer=[label_smoothing]", "regularizer.label_smoothing.alpha=0.1")
    K, a = 10, 0.1
    soft = torch.full((1, K), a / K)
    soft[0, 3] += 1 - a
    entropy = -(soft * soft.log()).sum().item()
    assert entropy == pytest.approx(0.5003, abs=1e-4)  # ≈ 0.50 nats for α = 0.1, K = 10
    best = F.cross_entropy(soft.log(), torch.tensor([3]), **stack.loss_options())  # logits = log y_soft
    assert best.item() == pytest.approx(entropy, rel=1e-5)


def test_label_smoothing_run_logs_a_comparable_clean_loss(tmp_path):
    fit(compose_cfg(*TINY, "regularizer=[label_smoothing]", "regularizer.label_smoothing.alpha=0.2",
                    "trainer.max_epochs=3", "data.train_size=200"), tmp_path)
    rows = read_rows(tmp_path)
    # The smoothed training loss stays above its floor; the clean one (plain CE, eval mode) does not have it.
    assert all(float(r["train_loss"]) > float(r["clean_train_loss"]) for r in rows)


# -------------------------------------------------------------------------------- early stopping


def es(**kw):
    cfg = compose_cfg("regularizer=[early_stopping]", *[f"regularizer.early_stopping.{k}={v}" for k, v in kw.items()])
    member = build_stack(cfg, Context(cfg)).get("early_stopping")
    return member


def feed(member, values):
    for epoch, v in enumerate(values, start=1):
        if member.update(epoch, v):
            return epoch
    return None


def test_early_stopping_patience_on_a_scripted_sequence():
    m = es(patience=2)
    assert feed(m, [1.0, 0.9, 0.95, 0.93, 0.92, 0.5]) == 4  # no improvement in epochs 3, 4 -> stop after 4
    assert m.best_epoch == 2 and m.stopped_epoch == 4
    m = es(patience=0)
    assert feed(m, [1.0, 1.1]) == 2


def test_early_stopping_min_delta_mode_and_baseline():
    m = es(patience=1, min_delta=0.02)
    assert feed(m, [1.0, 0.95, 0.94, 0.90]) == 3  # 0.94 beats 0.95 by only 0.01
    m = es(monitor="val_acc", patience=1)  # auto mode: max for accuracies
    assert feed(m, [0.5, 0.6, 0.6]) == 3 and m.best_epoch == 2
    # Improvements that do not beat the baseline do not reset the wait (Keras 3: the stop check runs on the
    # first epoch that does not improve): stop at epoch 3 with baseline 0.5, not without one.
    m = es(patience=2, baseline=0.5)
    assert feed(m, [0.9, 0.8, 0.85]) == 3 and m.best_epoch == 2
    assert feed(es(patience=2), [0.9, 0.8, 0.85]) is None
    m = es(patience=1, start_from_epoch=2)
    assert feed(m, [1.0, 2.0, 3.0, 4.0, 5.0]) == 4  # monitoring starts at epoch 3


def test_early_stopping_restores_the_best_state_including_bn_buffers(tmp_path):
    cfg = compose_cfg(*TINY, "regularizer=[early_stopping,batchnorm]", "regularizer.early_stopping.patience=50",
                      "trainer.max_epochs=6", "optimizer.lr=0.05", "data.train_size=128")
    fit(cfg, tmp_path)  # never stops: restore_best_weights must still restore (the old Keras bug)
    s = json.loads((tmp_path / "summary.json").read_text())
    info = s["regularizer_info"]["early_stopping"]
    assert info["stopped_epoch"] is None and info["restored_best_weights"]
    best = load_checkpoint(tmp_path / "checkpoints" / "best.pt")  # trainer.monitor = val_loss, as early stopping
    assert best["epoch"] == info["best_epoch"] == s["best"]["epoch"]
    # The test metrics were computed on the restored state: re-evaluating best.pt gives the same numbers.
    from regbench.data import load_data

    data = load_data(cfg.data, torch.device("cpu"))
    stack = build_stack(cfg, Context(cfg))
    model = build_model(cfg.model, data.input_shape, 10, stack.slots())
    model.load_state_dict(best["model"])
    assert any("running_mean" in k for k in best["model"])
    test = evaluate(model, data.test_x, data.test_y, 1000)
    assert test["loss"] == pytest.approx(s["test"]["loss"], rel=F32_REL)


def test_early_stopping_stops_the_run(tmp_path):
    fit(compose_cfg(*TINY, "regularizer=[early_stopping]", "regularizer.early_stopping.patience=1",
                    "regularizer.early_stopping.min_delta=10", "trainer.max_epochs=8"), tmp_path)
    s = json.loads((tmp_path / "summary.json").read_text())
    assert s["epochs_completed"] == 2 and s["regularizer_info"]["early_stopping"]["stopped_epoch"] == 2
    assert len(read_rows(tmp_path)) == 2 and s["status"] == "completed"


# -------------------------------------------------------------------------------------- grad clip


def _grads_after_clip(overrides, scale=None):
    stack, cfg = stack_for("regularizer=[grad_clip]", "model.hidden=[4]", *overrides)
    model = tiny_mlp(stack, cfg, (1, 2, 2))
    opt = build_optimizer(cfg.optimizer, stack.param_groups(model, cfg.optimizer))
    loss = 100 * F.cross_entropy(model(torch.randn(8, 1, 2, 2)), torch.arange(8) % 10)
    scaler = None
    if scale is not None:
        scaler = torch.amp.GradScaler("cpu", init_scale=scale)
        scaler.scale(loss).backward()
    else:
        loss.backward()
    raw = [p.grad.clone() / (scale or 1) for p in model.parameters()]
    stack.before_step_fn()(model, opt, scaler)
    return raw, [p.grad for p in model.parameters()]


def test_grad_clip_by_norm_and_by_value():
    raw, clipped = _grads_after_clip(["regularizer.grad_clip.max=0.5"])
    norm = torch.sqrt(sum((g ** 2).sum() for g in raw))
    assert norm > 0.5
    for r, c in zip(raw, clipped):
        assert torch.allclose(c, r * 0.5 / norm, atol=1e-6)  # g <- g · max / ‖g‖
    raw, clipped = _grads_after_clip(["regularizer.grad_clip.mode=value", "regularizer.grad_clip.max=0.01"])
    for r, c in zip(raw, clipped):
        assert torch.equal(c, r.clamp(-0.01, 0.01))


def test_grad_clip_unscales_amp_gradients_first():
    raw, clipped = _grads_after_clip(["regularizer.grad_clip.max=0.5"], scale=1024.0)
    norm = torch.sqrt(sum((g ** 2).sum() for g in raw))
    for r, c in zip(raw, clipped):
        assert torch.allclose(c, r * 0.5 / norm, atol=1e-5)  # the threshold applies to the true gradients


# --------------------------------------------------------------------------- calibration, MC dropout


def test_ece_on_a_hand_made_example():
    probs = torch.tensor([[0.9, 0.1], [0.6, 0.4], [0.3, 0.7], [0.8, 0.2]])
    y = torch.tensor([0, 1, 1, 0])
    # confidences 0.9, 0.6, 0.7, 0.8 (right, wrong, right, right) fall in four different bins of 15:
    assert expected_calibration_error(probs, y, 15) == pytest.approx((0.1 + 0.6 + 0.3 + 0.2) / 4, rel=F32_REL)
    # with 2 bins all four share (0.5, 1]: accuracy 0.75, mean confidence 0.75
    assert expected_calibration_error(probs, y, 2) == pytest.approx(0.0, abs=F32_REL)  # float32 confidences
    out = summarize_probs(probs, y)
    assert out["acc"] == 0.75
    assert out["nll"] == pytest.approx(-(math.log(0.9) + math.log(0.4) + math.log(0.7) + math.log(0.8)) / 4, rel=F32_REL)


def test_plain_evaluation_reports_ece_consistently():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Flatten(), nn.Linear(4, 3))
    x, y = torch.randn(50, 1, 2, 2), torch.randint(0, 3, (50,))
    with torch.no_grad():
        probs = torch.softmax(model(x), 1)
    # Batches of 7 and one batch of 50 are different float32 kernels: the probabilities differ by ulps (the ECE by
    # ~1e-9 on AVX-512 against AVX2), so the two ECEs agree to float32 precision, not bitwise.
    assert evaluate(model, x, y, 7)["ece"] == pytest.approx(expected_calibration_error(probs, y), rel=F32_REL)


def test_mc_dropout_keeps_bn_frozen_and_is_seeded():
    stack, cfg = stack_for("regularizer=[dropout,batchnorm,mc_dropout]", "regularizer.dropout.rate=0.5",
                           "model.hidden=[32]")
    model = tiny_mlp(stack, cfg, (1, 4, 4))
    model.train()
    model(torch.randn(64, 1, 4, 4))  # give BN some running statistics
    before = copy.deepcopy(model.state_dict())
    x, y = torch.randn(40, 1, 4, 4), torch.randint(0, 10, (40,))
    a = mc_dropout_eval(model, x, y, passes=8, seed=3)
    b = mc_dropout_eval(model, x, y, passes=8, seed=3)
    assert a == b
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())  # BN buffers untouched
    plain = evaluate(model, x, y, 100)
    assert a["nll"] != pytest.approx(plain["loss"], rel=F32_REL)  # stochastic passes differ from the plain model
    one = mc_dropout_eval(model, x, y, passes=1, seed=0)
    assert 0 <= one["ece"] <= 1


def test_mc_dropout_needs_dropout():
    """Both messages give the stack as it is typed (no dict), and the zero-rate case is caught before the run."""
    with pytest.raises(RegbenchError, match=r"^regularizer=\[l2,mc_dropout\]: expected dropout in the model for"):
        stack_for("regularizer=[l2,mc_dropout]")
    with pytest.raises(RegbenchError) as e:
        stack_for("regularizer=[dropout,mc_dropout]", "regularizer.dropout.rate=0")
    assert str(e.value).startswith("regularizer=[dropout,mc_dropout]: expected a dropout layer with a non-zero rate "
                                   "in the model for mc_dropout (regularizer.dropout.rate=0, spatial=0.0)")
    assert "{" not in str(e.value)


# -------------------------------------------------------------------------------------- ensembles


def test_snapshot_ensemble_averages_the_chosen_snapshots():
    cfg = compose_cfg("regularizer=[ensemble]", "regularizer.ensemble.k=2", "trainer.max_epochs=4")
    member = build_stack(cfg, Context(cfg)).get("ensemble")
    torch.manual_seed(0)
    model = nn.Sequential(nn.Flatten(), nn.Linear(4, 3))
    member.setup(model, Context(cfg))  # the monitor is read here, not in check()
    states = []
    for epoch in range(1, 5):
        with torch.no_grad():
            for p in model.parameters():
                p.add_(torch.randn_like(p))
        states.append(copy.deepcopy(model.state_dict()))
        member.on_epoch_end(epoch, {"val_loss": float(epoch)}, model)
    x, y = torch.randn(20, 1, 2, 2), torch.randint(0, 3, (20,))
    out = member.final_eval(model, x, y, evaluate)
    assert out["members"] == [3, 4]
    probs = []
    for s in states[2:]:
        model.load_state_dict(s)
        with torch.no_grad():
            probs.append(torch.softmax(model(x).double(), 1))
    expected = summarize_probs((probs[0] + probs[1]) / 2, y)
    assert out["acc"] == expected["acc"] and out["nll"] == pytest.approx(expected["nll"], rel=F32_REL)

    cfg = compose_cfg("regularizer=[ensemble]", "regularizer.ensemble.k=2", "regularizer.ensemble.source=best",
                      "trainer.max_epochs=4")
    best = build_stack(cfg, Context(cfg)).get("ensemble")
    best.setup(model, Context(cfg))
    for epoch, loss in enumerate([0.5, 0.2, 0.9, 0.3], start=1):
        best.on_epoch_end(epoch, {"val_loss": loss}, model)
    assert sorted(e for _, e, _ in best.snapshots) == [2, 4]


# --------------------------------------------------------------------------------------- transfer


@pytest.fixture(scope="module")
def source_run(tmp_path_factory):
    run_dir = tmp_path_factory.mktemp("source")
    fit(compose_cfg(*TINY, "model.hidden=[16,8]"), run_dir)
    return run_dir


def test_transfer_loads_and_freezes(source_run, tmp_path):
    cfg = compose_cfg(*TINY, "model.hidden=[16,8]", "regularizer=[transfer]",
                      f"regularizer.transfer.init_from={source_run}", "regularizer.transfer.freeze_layers=1",
                      "regularizer.transfer.freeze=[hidden.1.linear.bias]", "trainer.max_epochs=2")
    fit(cfg, tmp_path)
    src = load_checkpoint(source_run / "checkpoints" / "best.pt")["model"]
    out = load_checkpoint(tmp_path / "checkpoints" / "last.pt")["model"]
    for k in ("hidden.0.linear.weight", "hidden.0.linear.bias", "hidden.1.linear.bias"):
        assert torch.equal(src[k], out[k]), k  # frozen: bitwise unchanged
    assert not torch.equal(src["hidden.1.linear.weight"], out["hidden.1.linear.weight"])
    s = json.loads((tmp_path / "summary.json").read_text())
    assert s["params"]["frozen"] == 784 * 16 + 16 + 8
    assert s["regularizer_info"]["transfer"]["frozen"] == ["hidden.0.linear.weight", "hidden.0.linear.bias",
                                                          "hidden.1.linear.bias"]


def test_transfer_shape_mismatch_names_the_layers(source_run, tmp_path):
    cfg = compose_cfg(*TINY, "model.hidden=[32,8]", "regularizer=[transfer]",
                      f"regularizer.transfer.init_from={source_run}")
    with pytest.raises(RegbenchError) as e:
        fit(cfg, tmp_path / "a")
    msg = str(e.value)
    assert "shapes differ: hidden.0.linear.weight (16, 784) -> (32, 784)" in msg
    assert "hidden.1.linear.weight (8, 16) -> (8, 32)" in msg
    assert "skip=[hidden.0.linear.*,hidden.1.linear.*]" in msg
    # Skipping them loads the rest (the head) and keeps the skipped layers freshly initialised.
    fit(compose_cfg(*TINY, "model.hidden=[32,8]", "regularizer=[transfer]", f"regularizer.transfer.init_from={source_run}",
                    "regularizer.transfer.skip=[hidden.0.*,hidden.1.*]", "regularizer.transfer.freeze=[head.*]"),
        tmp_path / "b")
    src = load_checkpoint(source_run / "checkpoints" / "best.pt")["model"]
    out = load_checkpoint(tmp_path / "b" / "checkpoints" / "last.pt")["model"]
    assert torch.equal(src["head.weight"], out["head.weight"])


def test_transfer_from_a_missing_or_corrupt_checkpoint(tmp_path):
    cfg = compose_cfg(*TINY, "regularizer=[transfer]", f"regularizer.transfer.init_from={tmp_path}/nope")
    with pytest.raises(RegbenchError, match="no checkpoint at"):
        fit(cfg, tmp_path / "a")
    bad = tmp_path / "bad.pt"
    bad.write_bytes(b"not a checkpoint")
    cfg = compose_cfg(*TINY, "regularizer=[transfer]", f"regularizer.transfer.init_from={bad}")
    with pytest.raises(RegbenchError, match="cannot be loaded safely"):
        fit(cfg, tmp_path / "b")


# ------------------------------------------------------------------------- composition and warnings


def _member_overrides(name, model, source):
    extra = {"mc_dropout": ["regularizer=[dropout,mc_dropout]", "regularizer.mc_dropout.passes=2"],
             "transfer": ["regularizer=[transfer]", f"regularizer.transfer.init_from={source}"],
             "ensemble": ["regularizer=[ensemble]", "regularizer.ensemble.k=1"],
             "group_norm": ["regularizer=[group_norm]", "regularizer.group_norm.groups=4"],
             "alpha_dropout": ["regularizer=[alpha_dropout]"] + (["model.activation=selu", "model.init=lecun_normal"]
                                                                 if model != "resnet" else [])}
    return extra.get(name, [f"regularizer=[{name}]"])


@pytest.mark.parametrize("model", layered_models())
@pytest.mark.parametrize("name", sorted(REGISTRY))
def test_each_member_trains_a_step_with_each_model(name, model, tmp_path, tmp_path_factory):
    source = tmp_path / "source"
    if name == "transfer":
        fit(compose_cfg(*TINY, *small_model(model)), source)
    cfg = compose_cfg(*TINY, *small_model(model), *_member_overrides(name, model, source))
    refusal = {"stochastic_depth": "expected a model with residual branches",  # only models with a place apply
               "dropblock": "expected a convolutional model", "alpha_dropout": "expected a SELU network"}  # these
    if name in refusal:
        try:
            validate(cfg)
        except ConfigError as e:
            assert refusal[name] in str(e) and f"model={model}" in str(e)
            return
    fit(cfg, tmp_path / "run")
    s = json.loads((tmp_path / "run" / "summary.json").read_text())
    assert s["status"] == "completed" and name in s["regularizers"]
    if name in ("mc_dropout", "ensemble"):
        assert set(s["test_extra"][name]) >= {"acc", "nll", "ece"}


def test_member_order_on_the_command_line_does_not_matter(tmp_path):
    common = [*TINY, "trainer.max_epochs=2", "regularizer.l2.lam=0.001", "regularizer.dropout.rate=0.3"]
    fit(compose_cfg("regularizer=[l2,dropout]", *common), tmp_path / "a")
    fit(compose_cfg("regularizer=[dropout,l2]", *common), tmp_path / "b")
    assert strip_time(read_rows(tmp_path / "a")) == strip_time(read_rows(tmp_path / "b"))
    assert json.loads((tmp_path / "a" / "summary.json").read_text())["regularizers"] == ["l2", "dropout"]


def test_an_experiment_file_sets_the_stack_and_the_command_line_changes_it():
    cfg = compose_cfg("experiment=mnist_mlp_dropout")
    assert list(cfg.regularizer) == ["dropout"] and list(cfg.regularizer.dropout.rate) == [0.3, 0.2]
    cfg = compose_cfg("experiment=mnist_mlp_dropout", "regularizer=[l2,dropout]", "regularizer.l2.lam=0.01")
    assert sorted(cfg.regularizer) == ["dropout", "l2"] and cfg.regularizer.l2.lam == 0.01


@pytest.mark.parametrize("overrides,expected", [
    (["regularizer=[l2,weight_decay]", "regularizer.weight_decay.mode=coupled"], "double counting"),
    (["regularizer=[l2]", "optimizer=sgd", "optimizer.weight_decay=0.001"], "double counting"),
    (["optimizer=adam", "optimizer.weight_decay=0.01"], "Adam with coupled weight decay is not AdamW"),
    (["optimizer=adam", "regularizer=[weight_decay]", "regularizer.weight_decay.mode=coupled"], "not AdamW"),
    (["regularizer=[dropout,batchnorm]", "model.hidden=[8,8]"], "dropout placed before batch norm"),
])
def test_warnings_are_printed_once_and_saved(overrides, expected, tmp_path, caplog):
    with caplog.at_level("WARNING"):
        fit(compose_cfg(*TINY, *overrides), tmp_path)
    warnings = json.loads((tmp_path / "summary.json").read_text())["warnings"]
    assert sum(expected in w for w in warnings) == 1
    assert sum(expected in r.getMessage() for r in caplog.records) == 1


def test_no_warnings_for_clean_combinations(tmp_path):
    fit(compose_cfg(*TINY, "regularizer=[l2,dropout]", "optimizer=adamw", "optimizer.weight_decay=0"), tmp_path)
    warnings = json.loads((tmp_path / "summary.json").read_text())["warnings"]
    assert [w for w in warnings if "chance accuracy" not in w] == []  # one tiny epoch may well end at chance


# --------------------------------------------------------------------------- members that apply to nothing

# Per member: overrides under which it would apply to nothing (an error naming it), or — for members that
# apply to every model — why they cannot. Every registered member must be listed: a new one has to decide.
# "{source}" is a completed run of model.hidden=[16,8] (the transfer source).
APPLIES_TO_NOTHING = {
    "dropout": (["model.hidden=[]", "regularizer=[dropout]"], "model.hidden=[] has no hidden layer to drop"),
    "batchnorm": (["model.hidden=[]", "regularizer=[batchnorm]"], "model.hidden=[] has no hidden layer to normalise"),
    "layer_norm": (["model.hidden=[]", "regularizer=[layer_norm]"], "model.hidden=[] has no hidden layer"),
    "group_norm": (["model.hidden=[]", "regularizer=[group_norm]"], "model.hidden=[] has no hidden layer"),
    "l1": (["regularizer=[l1]", "regularizer.l1.layers=[head.bias]"],
           "regularizer.l1.params=weights with layers=[head.bias] selects no trainable parameter"),
    "l2": (["regularizer=[l2]", "regularizer.l2.layers=[hidden.0.linear.bias]"], "selects no trainable parameter"),
    "elastic_net": (["regularizer=[elastic_net]", "regularizer.elastic_net.layers=[head.bias]"],
                    "selects no trainable parameter"),
    "weight_decay": (["model.hidden=[16,8]", "regularizer=[transfer,batchnorm,weight_decay]",
                      "regularizer.transfer.init_from={source}", "regularizer.transfer.skip=[hidden.*.norm.*]",
                      "regularizer.transfer.freeze_layers=3"], "no trainable parameter to decay"),
    "grad_clip": (["regularizer=[grad_clip]", "regularizer.grad_clip.max=inf"], "max=inf never clips"),
    "early_stopping": (["regularizer=[early_stopping]", "regularizer.early_stopping.start_from_epoch=1"],
                       "starts monitoring after the last epoch"),
    "mc_dropout": (["regularizer=[dropout,mc_dropout]", "regularizer.dropout.rate=0"], "mc_dropout"),
    "transfer": (["model.hidden=[16,8]", "regularizer=[transfer]", "regularizer.transfer.init_from={source}",
                  "regularizer.transfer.skip=[*]"], "skips every parameter and buffer: nothing is loaded"),
    "fine_tune": (["model.hidden=[]", "regularizer=[fine_tune]"], "the model has no base to freeze"),
    "stochastic_depth": (["regularizer=[stochastic_depth]"], "expected a model with residual branches to drop "
                         "(model=mlp has none)"),  # the model refuses it (docs/errors.md stochastic-depth-no-residual)
    "gaussian_noise": (["model.hidden=[]", "regularizer=[gaussian_noise]", "regularizer.gaussian_noise.placement=hidden"],
                       "model.hidden=[] has no hidden layer to add noise to"),
    "gaussian_dropout": (["model.hidden=[]", "regularizer=[gaussian_dropout]"],
                         "model.hidden=[] has no hidden layer to apply Gaussian dropout to"),
    "alpha_dropout": (["model.hidden=[]", "model.activation=selu", "regularizer=[alpha_dropout]"],
                      "model.hidden=[] has no hidden layer to drop units in"),
    "dropblock": (["regularizer=[dropblock]"], "expected a convolutional model (model=mlp: the MLP has no conv feature "
                  "maps)"),  # the model refuses it (docs/errors.md member-cannot-apply)
    **{c: ([f"regularizer=[{c}]", f"regularizer.{c}.layers=[head.bias]"], "selects no trainable kernel")
       for c in ("max_norm", "unit_norm", "non_neg", "min_max_norm")},
    "activity": (["model.hidden=[]", "regularizer=[activity]"], "chooses no hidden layer's output"),
    "sam": "takes its ascent on every model's parameters",
    "label_smoothing": "changes the training targets of every model",
    "ensemble": "evaluates snapshots of every model",
    "bagging": "trains k members of every model",
    "weight_averaging": (["regularizer=[weight_averaging]", "regularizer.weight_averaging.start_epoch=1"],
                         "starts averaging after the last epoch"),  # TINY: trainer.max_epochs=1
}


def test_every_member_says_when_it_applies_to_nothing():
    assert set(APPLIES_TO_NOTHING) == set(REGISTRY)


@pytest.mark.parametrize("name", sorted(REGISTRY))
def test_a_member_that_applies_to_nothing_is_an_error_naming_it(name, source_run, tmp_path):
    case = APPLIES_TO_NOTHING[name]
    if isinstance(case, str):  # applies to every model: even with no hidden layer the run differs from the plain one
        extra = {"ensemble": ["regularizer.ensemble.k=1"], "bagging": ["regularizer.bagging.members=2"]}.get(name, [])
        fit(compose_cfg(*TINY, "model.hidden=[]", f"regularizer=[{name}]", *extra), tmp_path / "m")
        fit(compose_cfg(*TINY, "model.hidden=[]"), tmp_path / "plain")
        a, b = (json.loads((tmp_path / r / "summary.json").read_text()) for r in ("m", "plain"))
        assert (a["final"]["train_loss"], a.get("test_extra")) != (b["final"]["train_loss"], b.get("test_extra"))
        return
    overrides, expected = case
    cfg = compose_cfg(*TINY, *(o.format(source=source_run) for o in overrides))
    with pytest.raises(RegbenchError) as e:
        fit(cfg, tmp_path / "r")
    msg = str(e.value)
    assert expected in msg and name in msg and "\n" not in msg, msg
    if name not in ("mc_dropout", "stochastic_depth", "dropblock"):
        assert msg.startswith(f"regularizer member '{name}' applies to nothing: ")


def test_transfer_freezing_every_parameter_is_an_error(source_run, tmp_path):
    base = [*TINY, "model.hidden=[16,8]", f"regularizer.transfer.init_from={source_run}"]
    with pytest.raises(ConfigError, match=r"freeze_layers=3: expected fewer than the model's 3 dense/conv layers"):
        stack_for(*base, "regularizer=[transfer]", "regularizer.transfer.freeze_layers=3")
    with pytest.raises(ConfigError, match=r"freeze=\['\*'\]: expected patterns that leave at least one parameter"):
        fit(compose_cfg(*base, "regularizer=[transfer]", "regularizer.transfer.freeze=[*]"), tmp_path / "a")
    # all dense layers frozen, the batch-norm parameters left to train: allowed (BN-only fine-tuning)
    fit(compose_cfg(*base, "regularizer=[transfer,batchnorm]", "regularizer.transfer.skip=[hidden.*.norm.*]",
                    "regularizer.transfer.freeze_layers=3"), tmp_path / "b")
    s = json.loads((tmp_path / "b" / "summary.json").read_text())
    assert s["params"]["trainable"] == 2 * (16 + 8)
