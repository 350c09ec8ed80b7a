"""Models: exact parameter counts, layer order, activations, inits, and a finite gradient for every parameter."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from regbench.config import ACTIVATIONS, INITS
from regbench.errors import ConfigError
from regbench.models import MLP, LectureCNN, build_model, count_parameters
from tests.conftest import compose_cfg


def test_lecture_cnn_parameter_count_matches_the_lecture():
    model = LectureCNN(3, 32, 10)
    # conv 3->32 (896) + 32->32 (9,248) + 32->64 (18,496) + 64->64 (36,928) + 64->128 (73,856)
    # + 128->128 (147,584) + dense 128->64 (8,256) + 64->10 (650)
    assert count_parameters(model) == {"trainable": 295_914, "frozen": 0, "buffers": 0, "total": 295_914}


def test_lecture_cnn_with_batchnorm_matches_keras_counts():
    model = LectureCNN(3, 32, 10, norm="batchnorm")
    counts = count_parameters(model)
    assert counts["trainable"] == 296_810  # + gamma and beta for 2 * (32 + 32 + 64 + 64 + 128 + 128) channels
    assert counts["buffers"] == 896  # running mean + variance ("non-trainable" in Keras)
    assert counts["total"] == 297_706  # Keras's "Total params"
    # BN sits between each conv and its activation.
    names = [n for n, _ in model.features[0].named_children()]
    assert names == ["conv0", "norm0", "act0", "conv1", "norm1", "act1", "pool"]


def test_lecture_cnn_follows_the_dataset_shape():
    model = LectureCNN(1, 28, 10)
    assert model(torch.zeros(2, 1, 28, 28)).shape == (2, 10)
    assert count_parameters(model)["trainable"] == 295_914 - 2 * 9 * 32  # first conv sees 1 channel, not 3
    assert LectureCNN(3, 32, 100)(torch.zeros(1, 3, 32, 32)).shape == (1, 100)


@pytest.mark.parametrize("pooling,layer", [("max", nn.MaxPool2d), ("avg", nn.AvgPool2d), ("none", None)])
def test_lecture_cnn_pooling_is_switchable(pooling, layer):
    model = LectureCNN(3, 32, 10, pooling=pooling)
    pools = [m for m in model.features.modules() if isinstance(m, (nn.MaxPool2d, nn.AvgPool2d))]
    assert len(pools) == (0 if layer is None else 3) and all(isinstance(p, layer) for p in pools)
    assert count_parameters(model)["trainable"] == 295_914  # pooling has no parameters
    assert model(torch.zeros(2, 3, 32, 32)).shape == (2, 10)
    assert isinstance(LectureCNN(3, 32, 10, global_pool="avg").global_pool, nn.AdaptiveAvgPool2d)


def test_lecture_cnn_too_many_pooled_blocks_is_a_config_error():
    with pytest.raises(ConfigError, match="model.widths"):
        LectureCNN(1, 4, 10, widths=[8, 8, 8, 8])


def test_mlp_parameter_count_and_structure():
    model = MLP(784, 10, [256, 128])
    assert count_parameters(model)["trainable"] == 784 * 256 + 256 + 256 * 128 + 128 + 128 * 10 + 10
    lecture = MLP(784, 10, [128, 128, 64])  # the lecture's Flatten-128-128-64-10 network
    assert count_parameters(lecture)["trainable"] == 100_480 + 16_512 + 8_256 + 650 == 125_898
    assert model(torch.zeros(3, 1, 28, 28)).shape == (3, 10)


def test_mlp_dropout_and_norm_hooks_are_placed_per_layer():
    model = MLP(784, 10, [128, 128], dropout=[0.3, 0.2], norm="batchnorm")
    first = [type(m) for m in model.hidden[0].children()]
    assert first == [nn.Linear, nn.BatchNorm1d, nn.ReLU, nn.Dropout]
    assert [m.p for m in model.modules() if isinstance(m, nn.Dropout)] == [0.3, 0.2]
    before = MLP(784, 10, [16], dropout=0.5, dropout_placement="before_activation")
    assert [type(m) for m in before.hidden[0].children()] == [nn.Linear, nn.Dropout, nn.ReLU]
    assert not any(isinstance(m, nn.Dropout) for m in MLP(784, 10, [16], dropout=0.0).modules())
    with pytest.raises(ConfigError, match="one rate or a list of 2 rates"):
        MLP(784, 10, [128, 128], dropout=[0.3])


def test_cnn_spatial_and_head_dropout_hooks():
    model = LectureCNN(3, 32, 10, spatial_dropout=0.1, head_dropout=0.3, norm="group_norm")
    assert sum(isinstance(m, nn.Dropout2d) for m in model.modules()) == 6
    assert [m.p for m in model.head if isinstance(m, nn.Dropout)] == [0.3]
    assert sum(isinstance(m, nn.GroupNorm) for m in model.modules()) == 6


@pytest.mark.parametrize("activation", ACTIVATIONS)
def test_every_activation(activation):
    expected = {"relu": nn.ReLU, "leaky_relu": nn.LeakyReLU, "elu": nn.ELU, "sigmoid": nn.Sigmoid, "tanh": nn.Tanh}
    model = MLP(4, 2, [3], activation=activation, negative_slope=0.2)
    act = model.hidden[0].act
    assert isinstance(act, expected[activation])
    if activation == "leaky_relu":
        assert act.negative_slope == 0.2


@pytest.mark.parametrize("init", INITS)
def test_every_init(init):
    torch.manual_seed(0)
    model = MLP(1000, 10, [500], init=init)
    w = model.hidden[0].linear.weight
    fan_in, fan_out = 1000, 500
    if init == "default":  # torch's kaiming_uniform(a=sqrt(5)): bound 1/sqrt(fan_in), biases not zero
        assert w.abs().max().item() <= 1 / math.sqrt(fan_in)
        assert model.hidden[0].linear.bias.abs().sum().item() > 0
        return
    assert model.hidden[0].linear.bias.abs().sum().item() == 0  # biases zeroed, as Keras initialises them
    expected_std = {
        "xavier_uniform": math.sqrt(2 / (fan_in + fan_out)), "xavier_normal": math.sqrt(2 / (fan_in + fan_out)),
        "kaiming_uniform": math.sqrt(2 / fan_in), "kaiming_normal": math.sqrt(2 / fan_in),
        "glorot_uniform": math.sqrt(2 / (fan_in + fan_out)), "he_normal": math.sqrt(2 / fan_in),
    }[init]
    assert w.std().item() == pytest.approx(expected_std, rel=0.03)
    if init == "xavier_uniform":
        assert w.abs().max().item() <= math.sqrt(6 / (fan_in + fan_out))


@pytest.mark.parametrize("model_name", ["mlp", "lecture_cnn"])
@pytest.mark.parametrize("norm", [None, "batchnorm", "layer_norm", "group_norm"])
def test_every_parameter_gets_a_finite_gradient(model_name, norm):
    cfg = compose_cfg(f"model={model_name}").model
    hooks = {"norm": norm, "norm_groups": 4} if norm else {}
    if model_name == "mlp":
        hooks["dropout"] = 0.2
    model = build_model(cfg, (3, 32, 32), 10, **hooks)
    x = torch.randn(4, 3, 32, 32)
    loss = nn.functional.cross_entropy(model(x), torch.tensor([0, 1, 2, 3]))
    loss.backward()
    for name, p in model.named_parameters():
        assert p.grad is not None and torch.isfinite(p.grad).all(), name
