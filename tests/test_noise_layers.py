"""regularizer=[gaussian_noise], [gaussian_dropout], [alpha_dropout]: Keras' noise layers against Keras 3's formulas
(keras/src/layers/regularization/{gaussian_noise,gaussian_dropout,alpha_dropout}.py), where each family puts them,
selu + lecun_normal, refusals, stacks, the direct step's fallback, a run from the config and its bitwise resume."""

from __future__ import annotations

import json
import math

import pytest
import torch
from torch import nn

from regbench import faststep
from regbench.errors import ConfigError, RegbenchError
from regbench.models import KERAS_TRUNCATION, build_model, count_parameters
from regbench.models.common import GaussianDropout, GaussianNoise
from regbench.models.mlp import MLP
from regbench.regularizers import Context, build_stack
from regbench.regularizers.stacking import stack_refusals
from regbench.stacked.grouping import stack_key
from regbench.stacked.model import StackedModel
from regbench.train import fit
from regbench.validation import validate
from tests.conftest import TINY, compose_cfg, small_model

SELU = ["model.activation=selu", "model.init=lecun_normal"]
# Keras 3, keras/src/layers/regularization/alpha_dropout.py AlphaDropout.call
ALPHA, SCALE = 1.6732632423543772848170429916717, 1.0507009873554804934193349852946


def model_of(*overrides, shape=(1, 28, 28)):
    cfg = compose_cfg(*overrides)
    validate(cfg)
    torch.manual_seed(0)
    return build_model(cfg.model, shape, 10, build_stack(cfg, Context(cfg)).slots())


# ------------------------------------------------------------------------------------------- the layers' formulas

def test_gaussian_noise_adds_n_0_sigma2_in_training_only():
    layer = GaussianNoise(0.3)
    x = torch.linspace(-2, 2, 1_000_000)
    torch.manual_seed(0)
    noise = (layer(x) - x).double()
    n = noise.numel()
    assert abs(noise.mean().item()) < 5 * 0.3 / math.sqrt(n)  # E = 0
    assert noise.std().item() == pytest.approx(0.3, rel=0.005)  # sd σ (the sample sd's sd is σ/√(2n))
    assert abs(torch.corrcoef(torch.stack([noise, x.double()]))[0, 1].item()) < 0.005  # independent of x
    x.requires_grad_()
    layer(x).sum().backward()
    assert torch.equal(x.grad, torch.ones_like(x))  # additive: the gradient passes unchanged
    layer.eval()
    assert layer(x) is x
    assert GaussianNoise(0.0).train()(x) is x


def test_gaussian_dropout_multiplies_by_n_1_rate_over_1_minus_rate():
    rate = 0.2
    layer = GaussianDropout(rate)
    x = torch.full((1_000_000,), 3.0)
    torch.manual_seed(0)
    factor = (layer(x) / 3.0).double()
    sd = math.sqrt(rate / (1 - rate))  # 0.5: Keras' stddev = sqrt(rate / (1 - rate))
    assert abs(factor.mean().item() - 1) < 5 * sd / math.sqrt(factor.numel())
    assert factor.std().item() == pytest.approx(sd, rel=0.005)
    # the same mean and variance as an inverted-dropout mask of the same rate (Bernoulli(1-p)/(1-p): var p/(1-p))
    torch.manual_seed(0)
    mask = nn.functional.dropout(torch.ones(1_000_000), rate).double()
    assert mask.var().item() == pytest.approx(sd ** 2, rel=0.01)
    layer.eval()
    assert layer(x) is x


def test_torch_alpha_dropout_is_keras_alpha_dropout():
    """torch's nn.AlphaDropout (what the models use) computes Keras 3's AlphaDropout.call: kept units a·x + b,
    dropped ones a·α' + b, with α' = −λα, a = ((1 − p)(1 + p·α'²))^−½, b = −a·α'·p."""
    p = 0.2
    alpha_p = -ALPHA * SCALE
    a = ((1 - p) * (1 + p * alpha_p ** 2)) ** -0.5
    b = -a * alpha_p * p
    x = torch.randn(400_000, dtype=torch.float64)
    torch.manual_seed(0)
    y = nn.AlphaDropout(p).train()(x)
    kept = torch.isclose(y, a * x + b, rtol=0, atol=1e-12)
    dropped = torch.isclose(y, torch.full_like(y, a * alpha_p + b), rtol=0, atol=1e-12)
    assert torch.all(kept | dropped)
    assert dropped.double().mean().item() == pytest.approx(p, abs=0.003)
    # SELU's fixed point survives: standard-normal SELU outputs keep mean 0 and variance 1 through the layer
    z = torch.selu(torch.randn(1_000_000, dtype=torch.float64) * 1.0)
    torch.manual_seed(1)
    out = nn.AlphaDropout(p).train()(z)
    assert out.mean().item() == pytest.approx(z.mean().item(), abs=0.005)
    assert out.var().item() == pytest.approx(z.var().item(), abs=0.01)
    assert nn.AlphaDropout(p).eval()(x) is x


def test_selu_and_keras_lecun_normal():
    torch.manual_seed(0)
    model = MLP(1000, 10, [500], activation="selu", init="lecun_normal")
    assert isinstance(model.hidden[0].act, nn.SELU)
    w = model.hidden[0].linear.weight
    # Keras' LecunNormal: VarianceScaling(1, fan_in, truncated_normal): the draw has sd √(1/fan_in), from a normal
    # of sd √(1/fan_in)/0.8796… truncated at ±2 of its sd (keras/src/initializers/random_initializers.py)
    assert w.std().item() == pytest.approx(math.sqrt(1 / 1000), rel=0.02)
    assert w.abs().max().item() <= 2 * math.sqrt(1 / 1000) / KERAS_TRUNCATION * (1 + 1e-6)
    assert w.abs().max().item() > 1.9 * math.sqrt(1 / 1000) / KERAS_TRUNCATION  # truncated there, not before
    assert model.hidden[0].linear.bias.abs().sum().item() == 0  # zeros, as Keras
    conv = model_of("model=lecture_cnn", "model.init=lecun_normal", shape=(3, 32, 32)).features[2].conv0
    assert conv.weight.std().item() == pytest.approx(math.sqrt(1 / (64 * 9)), rel=0.03)  # fan_in = C_in·3·3


# ------------------------------------------------------------------------------------------------- placement

def names(seq: nn.Module) -> list[str]:
    return [n for n, _ in seq.named_children()]


def test_mlp_places_them_after_each_hidden_activation_and_the_input():
    model = model_of("model.hidden=[16,8]", "regularizer=[gaussian_noise,dropout,gaussian_dropout]",
                     "regularizer.gaussian_noise.placement=hidden")
    for block in model.hidden:
        assert names(block) == ["linear", "act", "noise", "dropout", "gaussian_dropout"]
    assert model.input_noise is None
    model = model_of("model.hidden=[16]", "regularizer=[gaussian_noise,alpha_dropout]", *SELU)
    assert isinstance(model.input_noise, GaussianNoise) and model.input_noise.stddev == 0.1
    assert names(model) == ["flatten", "input_noise", "hidden", "head"]  # the forward's order
    assert names(model.hidden[0]) == ["linear", "act", "alpha_dropout"]
    assert model_of("model.hidden=[]", "regularizer=[gaussian_noise]").input_noise is not None


def test_cnn_and_resnet_place_them_on_the_input_and_where_dropout_goes():
    cnn = model_of(*small_model("lecture_cnn"), "model.widths=[4,8]", "regularizer=[gaussian_noise,gaussian_dropout,"
                   "alpha_dropout]", "regularizer.gaussian_noise.placement=hidden", *SELU, shape=(3, 32, 32))
    assert names(cnn.head) == ["flatten", "dense", "act", "noise", "gaussian_dropout", "alpha_dropout", "out"]
    assert cnn.input_noise is None and not any(isinstance(m, GaussianNoise) for m in cnn.features.modules())
    res = model_of(*small_model("resnet"), "regularizer=[gaussian_noise,gaussian_dropout,dropout]", shape=(3, 32, 32))
    assert isinstance(res.input_noise, GaussianNoise)
    assert [type(m) for m in res.head] == [nn.Flatten, nn.Dropout, GaussianDropout, nn.Linear]


@pytest.mark.parametrize("model_name,extra", [("mlp", SELU), ("lecture_cnn", SELU), ("resnet", [])])
def test_no_parameters_and_evaluation_unchanged(model_name, extra):
    members = "gaussian_noise,gaussian_dropout" + (",alpha_dropout" if extra else "")
    args = [*small_model(model_name), *extra] + (["model.widths=[4,8]"] if model_name == "lecture_cnn" else [])
    plain = model_of(*args, shape=(3, 32, 32))
    noisy = model_of(*args, f"regularizer=[{members}]", "regularizer.gaussian_noise.stddev=0.5", shape=(3, 32, 32))
    assert count_parameters(noisy) == count_parameters(plain)
    assert all(torch.equal(a, b) for a, b in zip(plain.state_dict().values(), noisy.state_dict().values()))
    x = torch.randn(4, 3, 32, 32)
    plain.eval(), noisy.eval()
    assert torch.equal(noisy(x), plain(x))  # evaluation: deterministic and the model without the layers
    noisy.train()
    torch.manual_seed(0)
    a = noisy(x)
    torch.manual_seed(0)
    assert torch.equal(a, noisy(x)) and not torch.equal(a, plain.train()(x))  # training: noise from the global RNG


# ------------------------------------------------------------------------------------------------- refusals

@pytest.mark.parametrize("overrides,message", [
    (["regularizer=[alpha_dropout]"], "model.activation='relu': expected selu with alpha_dropout in the stack "
     "(alpha dropout sets dropped units to SELU's saturation value"),
    ([*small_model("lecture_cnn"), "regularizer=[alpha_dropout]"], "model.activation='relu': expected selu"),
    ([*small_model("resnet"), "regularizer=[alpha_dropout]"], "regularizer.alpha_dropout.rate=0.1: expected a SELU "
     "network (model=resnet: its activations are ReLUs; alpha dropout is for SELU networks)"),
    (["regularizer=[gaussian_noise]", "regularizer.gaussian_noise.stddev=1.5"],
     "regularizer.gaussian_noise.stddev=1.5: expected a number in [0, 1] (Keras' GaussianNoise accepts no more)"),
    (["regularizer=[gaussian_noise]", "regularizer.gaussian_noise.placement=output"],
     "regularizer.gaussian_noise.placement='output': expected input or hidden"),
    (["regularizer=[gaussian_dropout]", "regularizer.gaussian_dropout.rate=1.0"],
     "regularizer.gaussian_dropout.rate=1.0: expected a rate in [0, 1)"),
    (["regularizer=[alpha_dropout]", *SELU, "regularizer.alpha_dropout.rate=-0.1"],
     "regularizer.alpha_dropout.rate=-0.1: expected a rate in [0, 1)"),
])
def test_refusals_are_one_line_naming_the_key(overrides, message):
    with pytest.raises(ConfigError) as e:
        validate(compose_cfg(*TINY, *overrides))
    assert str(e.value).startswith(message) and "\n" not in str(e.value)


@pytest.mark.parametrize("overrides,what", [
    (["regularizer=[gaussian_dropout]"], "apply Gaussian dropout to"),
    (["regularizer=[alpha_dropout]", *SELU], "drop units in"),
    (["regularizer=[gaussian_noise]", "regularizer.gaussian_noise.placement=hidden"], "add noise to"),
])
def test_without_hidden_layers_they_apply_to_nothing(overrides, what):
    with pytest.raises(RegbenchError, match=f"applies to nothing: model.hidden=\\[\\] has no hidden layer to {what}"):
        validate(compose_cfg(*TINY, "model.hidden=[]", *overrides))


# ------------------------------------------------------------------------------------- stacks and the direct step

@pytest.mark.parametrize("name,extra", [("gaussian_noise", []), ("gaussian_dropout", []), ("alpha_dropout", SELU)])
def test_refused_in_a_stack_with_one_line(name, extra):
    cfg = compose_cfg(*TINY, f"regularizer=[{name}]", *extra)
    (refusal,) = stack_refusals(cfg)
    assert (refusal.key, refusal.value) == ("regularizer", name)
    assert refusal.why.startswith("it draws its ") and "a stack does not draw per member" in refusal.why
    key, why = stack_key(cfg)
    assert key is None and why == f"regularizer member {name}: {refusal.why}" and "\n" not in why
    # the layers say so themselves too, should a model with them reach the stacked model
    model = model_of(*TINY, f"regularizer=[{name}]", *extra)
    with pytest.raises(ValueError, match="draws randomness a stack cannot reproduce per member"):
        StackedModel([model, model])


def test_a_run_trains_through_autograd_and_resumes_bitwise(tmp_path):
    """From the config (all three at once, on a SELU MLP): the direct step does not know the layers, so the run
    says step_impl autograd; killed after epoch 1 and resumed, it ends as the uninterrupted run."""
    args = [*TINY, "trainer.num_threads=1", "trainer.max_epochs=2", "model.hidden=[32,16]", *SELU,
            "regularizer=[gaussian_noise,gaussian_dropout,alpha_dropout]",
            "regularizer.gaussian_noise.placement=hidden"]
    fit(compose_cfg(*args), tmp_path / "ref")
    summary = json.loads((tmp_path / "ref" / "summary.json").read_text())
    assert summary["status"] == "completed" and summary["step_impl"] == "autograd"
    run = tmp_path / "run"
    fit(compose_cfg(*args), run)
    summary = json.loads((run / "summary.json").read_text())
    summary["status"] = "interrupted"
    (run / "summary.json").write_text(json.dumps(summary))
    (run / "checkpoints" / "epoch_0002.pt").unlink()
    fit(compose_cfg(*args, "trainer.resume=true"), run)
    resumed = json.loads((run / "summary.json").read_text())
    ref = json.loads((tmp_path / "ref" / "summary.json").read_text())
    assert resumed["resumed_from_epoch"] == 1
    drop = lambda row: {k: v for k, v in row.items() if k != "epoch_time_s"}  # noqa: E731
    assert drop(resumed["final"]) == drop(ref["final"]) and resumed["test"] == ref["test"]


def test_the_direct_step_steps_aside_for_the_layers_and_keeps_a_zero_strength_run():
    """σ = 0 (a sweep's baseline point) adds no layer: the baseline model, which the direct step trains; with a
    layer the direct step falls back to autograd, naming it."""
    cfg = compose_cfg(*TINY)

    def plan(model):
        return faststep.plan(model, nn.functional.cross_entropy, cfg.trainer, torch.device("cpu"))[1]

    zero = model_of(*TINY, "regularizer=[gaussian_noise]", "regularizer.gaussian_noise.stddev=0")
    assert str(zero) == str(model_of(*TINY)) and plan(zero) == "direct"
    assert plan(model_of(*TINY, "regularizer=[gaussian_noise]")) == "autograd: layer GaussianNoise"
    assert plan(model_of(*TINY, "regularizer=[gaussian_dropout]")) == "autograd: layer GaussianDropout"
    assert plan(model_of(*TINY, "regularizer=[alpha_dropout]", *SELU)) == "autograd: layer SELU"
