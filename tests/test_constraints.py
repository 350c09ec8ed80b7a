"""Keras' kernel constraints (max_norm, unit_norm, non_neg, min_max_norm): Keras' formulas on hand-computed kernels,
Keras' axis convention against torch's layout, the kernels chosen, the projection after every optimizer step, runs
from the composed config (direct step and autograd alike), bitwise resume, and the one-line refusals."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from torch import nn

from regbench.checkpoint import load_checkpoint
from regbench.errors import ConfigError, RegbenchError
from regbench.loop import AutogradStep
from regbench.models import build_model
from regbench.regularizers import Context, build_stack
from regbench.regularizers.constraints import EPSILON, max_norm, min_max_norm, non_neg, unit_norm
from regbench.regularizers.stacking import stack_refusals
from regbench.train import fit
from regbench.validation import validate
from tests.conftest import TINY, compose_cfg, interrupt_then_resume
from tests.test_resume import metrics_without_time

CONSTRAINTS = ["max_norm", "unit_norm", "non_neg", "min_max_norm"]


def f64(rows):
    return torch.tensor(rows, dtype=torch.float64)


def test_keras_formulas_on_hand_computed_kernels():
    # torch layout [out, in]: three output units with incoming norms 5, 1 and 2e-7 (where Keras' ε shows)
    w = f64([[3.0, 4.0], [0.6, 0.8], [2e-7, 0.0]])
    assert EPSILON == 1e-7  # keras.backend.epsilon()
    # MaxNorm(2): w · clip(n, 0, 2) / (ε + n)
    expected = f64([[3 * 2 / (5 + 1e-7), 4 * 2 / (5 + 1e-7)], [0.6 / (1 + 1e-7), 0.8 / (1 + 1e-7)],
                    [2e-7 * 2e-7 / 3e-7, 0.0]])
    assert torch.allclose(max_norm(w, 2.0), expected, rtol=1e-13, atol=0)  # float64: a few hundred eps, any CPU's norm
    assert max_norm(w, 2.0)[2, 0].item() == pytest.approx(1.3333333e-7)  # ε in the denominator, not max(n, ε)
    # UnitNorm: w / (ε + n)
    expected = f64([[3 / (5 + 1e-7), 4 / (5 + 1e-7)], [0.6 / (1 + 1e-7), 0.8 / (1 + 1e-7)], [2e-7 / 3e-7, 0.0]])
    assert torch.allclose(unit_norm(w), expected, rtol=1e-13, atol=0)  # float64: a few hundred eps, any CPU's norm
    # NonNeg: max(w, 0)
    assert torch.equal(non_neg(f64([[-1.5, 2.0], [0.0, -0.1]])), f64([[0.0, 2.0], [0.0, 0.0]]))
    # MinMaxNorm(0.5, 1, rate): (rate · clip(n, 0.5, 1) + (1 − rate) · n) / (ε + n); norms 5, 1, 0.25
    v = f64([[3.0, 4.0], [0.6, 0.8], [0.15, 0.2]])
    expected = f64([[3 * 1 / (5 + 1e-7), 4 / (5 + 1e-7)], [0.6 / (1 + 1e-7), 0.8 / (1 + 1e-7)],
                    [0.15 * 0.5 / (0.25 + 1e-7), 0.2 * 0.5 / (0.25 + 1e-7)]])
    assert torch.allclose(min_max_norm(v, 0.5, 1.0, 1.0), expected, rtol=1e-13, atol=0)  # float64: a few hundred eps, any CPU's norm
    half = 0.5 * 1 + 0.5 * 5  # rate 0.5: halfway from 5 to 1
    assert torch.allclose(min_max_norm(v, 0.5, 1.0, 0.5)[0], f64([3 * half / (5 + 1e-7), 4 * half / (5 + 1e-7)]),
                          rtol=1e-13, atol=0)  # float64: a few hundred eps, any CPU's norm
    # a dead unit (all zeros) stays zero: no division by zero
    zero = torch.zeros(2, 3)
    for out in (max_norm(zero, 2.0), unit_norm(zero), min_max_norm(zero, 0.0, 1.0, 1.0)):
        assert torch.equal(out, zero)


def _keras(kernel: np.ndarray, axis, fn) -> np.ndarray:
    """keras/src/constraints/constraints.py, on a kernel in Keras' layout (numpy for keras.ops)."""
    norms = np.sqrt(np.sum(np.square(kernel), axis=axis, keepdims=True))
    return fn(kernel, norms)


KERAS = {  # name: (our formula on torch's layout, Keras' __call__ given (w, norms))
    "max_norm": (lambda w: max_norm(w, 2.0), lambda w, n: w * (np.clip(n, 0, 2.0) / (1e-7 + n))),
    "unit_norm": (unit_norm, lambda w, n: w / (1e-7 + n)),
    "min_max_norm": (lambda w: min_max_norm(w, 0.5, 1.5, 0.7),
                     lambda w, n: w * ((0.7 * np.clip(n, 0.5, 1.5) + 0.3 * n) / (1e-7 + n))),
}


@pytest.mark.parametrize("name", sorted(KERAS))
def test_per_output_unit_in_keras_axis_convention(name):
    ours, keras = KERAS[name]
    torch.manual_seed(0)
    dense = nn.Linear(5, 3).weight.detach().double() * 4  # torch [out, in]; Keras' Dense kernel [in, out], axis=0
    conv = nn.Conv2d(2, 4, 3).weight.detach().double() * 4  # torch [out, in, h, w]; Keras [h, w, in, out], axis 0-2
    want_dense = _keras(dense.numpy().T, 0, keras).T
    want_conv = _keras(conv.permute(2, 3, 1, 0).numpy(), (0, 1, 2), keras).transpose(3, 2, 0, 1)
    assert np.allclose(ours(dense).numpy(), want_dense, rtol=1e-14, atol=0)
    assert np.allclose(ours(conv).numpy(), want_conv, rtol=1e-14, atol=0)
    norms = ours(conv).flatten(1).norm(dim=1)  # each filter [in, h, w] projected as a whole
    assert ((norms > 0.5 - 1e-6) & (norms < 2 + 1e-6)).all()


def _setup(*overrides, model=("model.hidden=[8]",)):
    cfg = compose_cfg(*TINY, *model, *overrides)
    stack = build_stack(cfg, Context(cfg))
    torch.manual_seed(0)
    model = build_model(cfg.model, (1, 28, 28), 10, stack.slots())
    stack.setup(model)
    return stack, model


def test_kernels_only_and_layers_narrow_them():
    stack, _ = _setup("regularizer=[batchnorm,max_norm]")
    assert stack.get("max_norm").names == ["hidden.0.linear.weight", "head.weight"]  # not biases, not BN
    stack, _ = _setup("regularizer=[max_norm]", "regularizer.max_norm.layers=[hidden.*]")
    assert stack.get("max_norm").names == ["hidden.0.linear.weight"]
    with pytest.raises(RegbenchError) as e:
        _setup("regularizer=[max_norm]", "regularizer.max_norm.layers=[head.bias]")
    assert str(e.value).startswith("regularizer member 'max_norm' applies to nothing: regularizer.max_norm.layers="
                                   "[head.bias] selects no trainable kernel")
    with pytest.raises(ConfigError, match=r"regularizer.unit_norm.layers='nope': expected a pattern matching"):
        _setup("regularizer=[unit_norm]", "regularizer.unit_norm.layers=[nope]")
    stack, _ = _setup("regularizer=[non_neg]", model=("model=lecture_cnn", "model.widths=[4]", "model.dense=8"))
    assert stack.get("non_neg").names == ["features.0.conv0.weight", "features.0.conv1.weight", "head.dense.weight",
                                          "head.out.weight"]


def test_projected_after_the_optimizer_step_exactly():
    """One Adam step with the constraint = the same step without it, then Keras' formula on the kernels."""
    results = []
    keys = ["regularizer.min_max_norm.min_value=0.9", "regularizer.min_max_norm.max_value=1.1",
            "regularizer.min_max_norm.rate=0.5"]
    for overrides in (["regularizer=[batchnorm]"], ["regularizer=[batchnorm,min_max_norm]", *keys]):
        stack, model = _setup(*overrides)
        optimizer = torch.optim.Adam(model.parameters(), lr=0.01)
        step = AutogradStep(model, optimizer, after_step=stack.after_step_fn())
        torch.manual_seed(1)
        step.step(torch.randn(16, 1, 28, 28), torch.randint(0, 10, (16,)))
        results.append(dict(model.named_parameters()))
    plain, constrained = results
    for name, p in constrained.items():
        if name.endswith("linear.weight") or name == "head.weight":
            assert torch.equal(p, min_max_norm(plain[name], 0.9, 1.1, 0.5)), name
        else:  # biases and batch-norm parameters as the optimizer left them
            assert torch.equal(p, plain[name]), name


def _weights(run):
    return load_checkpoint(run / "checkpoints" / "last.pt")["model"]


def _kernel_norms(weights):
    return {k: v.flatten(1).norm(dim=1) for k, v in weights.items() if k.endswith("weight") and v.ndim >= 2}


@pytest.mark.parametrize("name,overrides,ok", [
    ("max_norm", ["regularizer.max_norm.max_value=0.5"], lambda w, n: bool((n <= 0.5 * (1 + 1e-6)).all())),
    ("unit_norm", [], lambda w, n: torch.allclose(n, torch.ones_like(n), atol=1e-5)),
    ("non_neg", [], lambda w, n: bool((w >= 0).all())),
    ("min_max_norm", ["regularizer.min_max_norm.min_value=0.8"],
     lambda w, n: bool(((n >= 0.8 * (1 - 1e-5)) & (n <= 1 + 1e-5)).all())),
])
def test_composes_from_the_cli_config_and_trains_constrained(name, overrides, ok, tmp_path):
    fit(compose_cfg(*TINY, "model.hidden=[16]", f"regularizer=[{name}]", *overrides), tmp_path)
    s = json.loads((tmp_path / "summary.json").read_text())
    assert s["status"] == "completed" and s["regularizers"] == [name]
    assert s["regularizer_info"][name] == {"tensors": 2, "elements": 784 * 16 + 16 * 10}
    norms = _kernel_norms(_weights(tmp_path))
    assert set(norms) == {"hidden.0.linear.weight", "head.weight"}
    assert all(ok(_weights(tmp_path)[k], n) for k, n in norms.items())


def test_frozen_kernels_are_left_alone_until_fine_tune_unfreezes_them(tmp_path):
    fit(compose_cfg(*TINY, "trainer.max_epochs=2", "model.hidden=[16]", "regularizer=[fine_tune,max_norm]",
                    "regularizer.fine_tune.freeze_base_epochs=1", "regularizer.max_norm.max_value=0.05"), tmp_path)
    first = load_checkpoint(tmp_path / "checkpoints" / "epoch_0001.pt")["model"]
    stage1, stage2 = _kernel_norms(first), _kernel_norms(_weights(tmp_path))
    assert (stage1["head.weight"] <= 0.05 * (1 + 1e-6)).all()  # the head trains: projected
    assert (stage1["hidden.0.linear.weight"] > 0.3).all()  # the frozen base: untouched (torch's init, norms ~0.58)
    assert all((n <= 0.05 * (1 + 1e-6)).all() for n in stage2.values())  # unfrozen in epoch 2: projected too
    assert json.loads((tmp_path / "summary.json").read_text())["regularizer_info"]["max_norm"]["tensors"] == 2


def test_the_direct_step_applies_it_as_autograd_does(tmp_path):
    base = [*TINY, "model.hidden=[16]", "regularizer=[max_norm]",
            "regularizer.max_norm.max_value=0.3"]
    fit(compose_cfg(*base), tmp_path / "direct")
    fit(compose_cfg(*base, "trainer.fast_step=false"), tmp_path / "autograd")
    impl = [json.loads((tmp_path / r / "summary.json").read_text())["step_impl"] for r in ("direct", "autograd")]
    assert impl == ["direct", "autograd"]  # after_step runs after the direct step's optimizer kernel too
    assert metrics_without_time(tmp_path / "direct") == metrics_without_time(tmp_path / "autograd")
    a, b = _weights(tmp_path / "direct"), _weights(tmp_path / "autograd")
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_resume_is_bitwise(tmp_path, monkeypatch, epoch=1):
    run = ["data.train_size=64", "data.batch_size=32", "data.test_size=100", "trainer.max_epochs=3",
           "trainer.progress_bar=false", "model.hidden=[16]", "regularizer=[dropout,max_norm]",
           "regularizer.max_norm.max_value=0.4"]
    fit(compose_cfg(*run), tmp_path / "ref")
    interrupt_then_resume(monkeypatch, run, tmp_path / "run", epoch)
    assert json.loads((tmp_path / "run" / "summary.json").read_text())["resumed_from_epoch"] == epoch
    assert metrics_without_time(tmp_path / "run") == metrics_without_time(tmp_path / "ref")
    a, b = _weights(tmp_path / "run"), _weights(tmp_path / "ref")
    assert all(torch.equal(a[k], b[k]) for k in a)


@pytest.mark.parametrize("name", CONSTRAINTS)
def test_refused_in_a_stack_with_one_line(name):
    (refusal,) = stack_refusals(compose_cfg(f"regularizer=[{name}]"))
    assert (refusal.key, refusal.value) == ("regularizer", name)
    assert refusal.why == "acts after every optimizer step (its after_step, which a stack does not run)"
    assert refusal.fix == f"drop {name} from the regularizer list"


@pytest.mark.parametrize("overrides,expected", [
    (["regularizer=[max_norm]", "regularizer.max_norm.max_value=-1"],
     "regularizer.max_norm.max_value=-1.0: expected a norm >= 0"),
    (["regularizer=[min_max_norm]", "regularizer.min_max_norm.min_value=2"],
     "regularizer.min_max_norm.max_value=1.0: expected a norm >= min_value (2.0)"),
    (["regularizer=[min_max_norm]", "regularizer.min_max_norm.rate=1.5"],
     "regularizer.min_max_norm.rate=1.5: expected a number in [0, 1] (1: strict enforcement)"),
    (["regularizer=[non_neg,max_norm]"],
     ("regularizer='[max_norm,non_neg]': expected at most one of max_norm, unit_norm, non_neg, min_max_norm (Keras "
      "gives a kernel one kernel_constraint); keep one of them")),
])
def test_bad_values_are_one_line(overrides, expected):
    with pytest.raises(ConfigError) as e:
        validate(compose_cfg(*TINY, *overrides))
    assert str(e.value) == expected
