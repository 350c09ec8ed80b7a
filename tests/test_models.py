"""Models: exact parameter counts, layer order, activations, inits, and a finite gradient for every parameter."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from regbench.errors import ConfigError, RegbenchError
from regbench.models import MLP, MODELS, LayerSlots, LectureCNN, NormSpec, build_model, count_parameters, \
    weight_layer_count
from regbench.models.common import ACTIVATIONS, INITS, DropPath
from tests.conftest import REPO, compose_cfg, config_options, layered_models, model_options, small_model


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
    expected = {"relu": nn.ReLU, "leaky_relu": nn.LeakyReLU, "elu": nn.ELU, "sigmoid": nn.Sigmoid, "tanh": nn.Tanh,
                "selu": nn.SELU}
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
        "lecun_normal": math.sqrt(1 / fan_in),
    }[init]
    assert w.std().item() == pytest.approx(expected_std, rel=0.03)
    if init == "xavier_uniform":
        assert w.abs().max().item() <= math.sqrt(6 / (fan_in + fan_out))


def slots_with(**values) -> LayerSlots:
    slots = LayerSlots()
    for slot, value in values.items():
        slots.set(slot, value, f"regularizer.test.{slot}")
    return slots


@pytest.mark.parametrize("model_name", layered_models())
@pytest.mark.parametrize("norm", [None, "batchnorm", "layer_norm", "group_norm"])
def test_every_parameter_gets_a_finite_gradient(model_name, norm):
    cfg = compose_cfg(*small_model(model_name)).model
    slots = slots_with(dropout=0.2, **({"norm": NormSpec(norm, groups=4)} if norm else {}))
    model = build_model(cfg, (3, 32, 32), 10, slots)
    x = torch.randn(4, 3, 32, 32)
    loss = nn.functional.cross_entropy(model(x), torch.tensor([0, 1, 2, 3]))
    loss.backward()
    for name, p in model.named_parameters():
        assert p.grad is not None and torch.isfinite(p.grad).all(), name
    assert [m.p for m in model.modules() if isinstance(m, nn.Dropout)] == [0.2] * len(
        [m for m in model.modules() if isinstance(m, nn.Dropout)]) != []


# ------------------------------------------------------------------------------------ the registry


def test_every_family_has_a_yaml_naming_its_schema_and_every_yaml_a_family():
    assert sorted(model_options()) == config_options("model")
    for name in model_options():
        entry = MODELS[name]
        text = (REPO / "configs" / "model" / f"{name}.yaml").read_text()
        # @_here_, or @model in a `# @package _global_` file that also sets what the model needs elsewhere
        assert f"/schema/model/{name}@_here_" in text or f"/schema/model/{name}@model" in text
        assert compose_cfg(f"model={name}").model.name == name == entry.schema.name
        for hook in ("from_config", "check_slots", "weight_layers"):
            assert callable(getattr(entry.obj, hook)), (name, hook)


@pytest.mark.parametrize("model_name", model_options())
def test_every_family_builds_for_grey_and_rgb_and_counts_its_layers(model_name):
    cfg = compose_cfg(*small_model(model_name)).model
    torch.manual_seed(0)
    for shape in [(1, 28, 28), (3, 32, 32)]:
        model = build_model(cfg, shape, 7)
        model.eval()
        assert model(torch.zeros(2, *shape)).shape == (2, 7)
    layers = weight_layer_count(cfg)
    if layers is not None:  # what transfer's freeze_layers counts, from the config alone
        assert layers == sum(isinstance(m, (nn.Linear, nn.Conv2d)) for m in model.modules())


# A filled slot and the layer it must put in the model (the proof it was applied).
SLOT_LAYERS = {"dropout": (0.2, nn.Dropout), "spatial_dropout": (0.1, nn.Dropout2d),
               "norm": (NormSpec("group_norm", groups=4), nn.GroupNorm), "drop_path": (0.1, DropPath)}


@pytest.mark.parametrize("slot", sorted(SLOT_LAYERS))
@pytest.mark.parametrize("model_name", model_options())
def test_a_filled_slot_is_applied_or_refused_never_ignored(model_name, slot):
    cfg = compose_cfg(*small_model(model_name)).model
    value, layer = SLOT_LAYERS[slot]
    try:
        model = build_model(cfg, (3, 32, 32), 10, slots_with(**{slot: value}))
    except ConfigError as e:  # refused before anything is built, naming the key that filled the slot
        assert f"regularizer.test.{slot}=" in str(e) or str(e).startswith("regularizer=['test']"), str(e)
        return
    assert any(isinstance(m, layer) for m in model.modules()), f"{model_name} ignored the {slot} slot"


def test_a_slot_filled_twice_is_an_error():
    slots = slots_with(norm=NormSpec("batchnorm"))
    with pytest.raises(ConfigError, match=r"regularizer=\['test', 'other'\]: expected members that configure "
                       r"different parts of the model \('norm' is set twice\)"):
        slots.set("norm", NormSpec("layer_norm"), "regularizer.other")


def test_a_family_refuses_every_slot_it_does_not_list():
    # A slot a family does not apply is refused by default (a new slot kind cannot be silently ignored), naming
    # the key that filled it; modifiers (spatial rate, placement, rule) only when they differ from their default.
    from regbench.models.slots import SLOT_NAMES, refuse_unapplied

    slots = slots_with(drop_path=0.0, spatial_dropout=0.0, dropout_placement="after_activation")
    with pytest.raises(ConfigError, match=r"regularizer.test.drop_path=0.0: expected a model with residual branches "
                       r"to drop \(model=toy has none\); use model=resnet, or drop test from the stack"):
        refuse_unapplied(slots, "toy", set())
    refuse_unapplied(slots, "toy", {"drop_path"})  # the unchanged modifiers ask nothing
    refuse_unapplied(slots_with(), "toy", set())  # nothing filled, nothing refused
    assert set(SLOT_NAMES) == {"dropout", "dropout_placement", "spatial_dropout", "norm", "drop_path", "drop_path_rule",
                               "gaussian_noise", "gaussian_noise_placement", "gaussian_dropout", "alpha_dropout",
                               "drop_block"}
