"""The torch / Keras convention switch (docs/conventions.md): each Keras value is in the composed config and
reaches the built model, optimizer, batch norm layers, data split and summary.json; torch stays the default.
And the lecture experiment files pinned against the lecture code as quoted in docs/experiments.md."""

from __future__ import annotations

import json
import math

import pytest
import torch
from omegaconf import OmegaConf
from torch import nn

from regbench.cli import check
from regbench.data import load_data, split_validation
from regbench.models import KERAS_TRUNCATION, build_model
from regbench.optim import build_optimizer
from regbench.train import fit
from tests.conftest import REPO, TINY, compose_cfg, config_options

F32 = torch.finfo(torch.float32).eps

# keras/src/optimizers/{adam,adamw,rmsprop,adagrad,sgd}.py (Keras 3 __init__ defaults); torch.optim for torch.
KERAS_OPTIMIZERS = {
    "adam": {"lr": 0.001, "betas": (0.9, 0.999), "eps": 1e-7, "weight_decay": 0.0},
    "adamw": {"lr": 0.001, "betas": (0.9, 0.999), "eps": 1e-7, "weight_decay": 0.004},
    "rmsprop": {"lr": 0.001, "alpha": 0.9, "eps": 1e-7, "momentum": 0.0},
    "adagrad": {"lr": 0.001, "initial_accumulator_value": 0.1, "eps": 1e-7},
    "sgd": {"lr": 0.01, "momentum": 0.0},
}
TORCH_OPTIMIZERS = {
    "adam": {"lr": 0.001, "betas": (0.9, 0.999), "eps": 1e-8, "weight_decay": 0.0},
    "adamw": {"lr": 0.001, "betas": (0.9, 0.999), "eps": 1e-8, "weight_decay": 0.01},
    "rmsprop": {"lr": 0.001, "alpha": 0.99, "eps": 1e-8, "momentum": 0.0},
    "adagrad": {"lr": 0.01, "initial_accumulator_value": 0.0, "eps": 1e-10},
    "sgd": {"lr": 0.01, "momentum": 0.0},
}


def built_optimizer(*overrides):
    cfg = compose_cfg(*overrides)
    model = nn.Linear(4, 3)
    return cfg, model, build_optimizer(cfg.optimizer, model.parameters())


@pytest.mark.parametrize("convention,expected", [("keras", KERAS_OPTIMIZERS), ("torch", TORCH_OPTIMIZERS)])
@pytest.mark.parametrize("name", sorted(KERAS_OPTIMIZERS))
def test_optimizer_values_are_read_back_from_the_optimizer(convention, expected, name):
    cfg, model, opt = built_optimizer(f"convention={convention}", f"optimizer={name}")
    group = opt.param_groups[0]
    for key, value in expected[name].items():
        assert group[key] == value, (key, group[key])
        if key != "betas":
            assert cfg.optimizer[key] == value  # visible in the composed config too
    if name == "adagrad":  # the accumulator really starts at the value, not just the recorded hyperparameter
        assert torch.equal(opt.state[model.weight]["sum"], torch.full_like(model.weight, expected[name]
                                                                           ["initial_accumulator_value"]))


def test_torch_is_the_default_and_changes_nothing():
    cfg = compose_cfg()
    assert cfg.convention == "torch" and cfg.model.init == "default" and cfg.model.bias_init is None
    assert cfg.data.batch_size == 128 and cfg.data.val_split == "stratified" and cfg.optimizer.eps == 1e-8
    assert OmegaConf.to_container(compose_cfg("convention=torch")) == OmegaConf.to_container(cfg)


def test_convention_files_only_name_existing_options():
    """convention/<group>/keras_<option>.yaml is picked by ${convention}_${<group>}: a renamed option would
    silently lose its Keras values."""
    for group in ("model", "optimizer"):
        for stem in config_options(f"convention/{group}"):
            conv, option = stem.split("_", 1)
            assert conv in config_options("convention") and option in config_options(group), stem


def test_command_line_and_experiment_win_over_the_convention():
    assert compose_cfg("convention=keras", "optimizer.eps=0.5").optimizer.eps == 0.5
    assert compose_cfg("convention=keras", "data.batch_size=64").data.batch_size == 64
    assert compose_cfg("convention=keras").data.batch_size == 32  # Keras' fit(batch_size=None)
    assert compose_cfg("experiment=mnist_bn_elu").data.batch_size == 200  # the lecture passes 200
    assert compose_cfg("experiment=mnist_mlp", "convention=torch").data.batch_size == 128


def _variance(w: torch.Tensor) -> float:
    return w.double().pow(2).mean().item()  # about zero mean: the second moment is the variance


@pytest.mark.parametrize("model_name", [f.removeprefix("keras_") for f in config_options("convention/model")])
def test_keras_init_glorot_kernels_and_zero_biases(model_name):
    torch.manual_seed(0)
    width = "model.hidden=[512]" if model_name == "mlp" else "model.dense=512"
    cfg = compose_cfg("convention=keras", f"model={model_name}", width)
    assert cfg.model.init == "glorot_uniform" and cfg.model.bias_init == "zeros"
    model = build_model(cfg.model, (3, 32, 32), 10)
    layers = [m for m in model.modules() if isinstance(m, (nn.Linear, nn.Conv2d))]
    assert layers
    for m in layers:
        assert torch.count_nonzero(m.bias) == 0
        fan_in, fan_out = nn.init._calculate_fan_in_and_fan_out(m.weight)
        limit = math.sqrt(6 / (fan_in + fan_out))
        assert m.weight.abs().max().item() <= limit * (1 + F32)
        if m.weight.numel() >= 10_000:  # enough draws for a 5 % tolerance on the variance (std ~1 %)
            assert _variance(m.weight) == pytest.approx(2 / (fan_in + fan_out), rel=0.05)


def test_keras_he_normal_is_truncated_with_variance_two_over_fan_in():
    torch.manual_seed(0)
    cfg = compose_cfg("convention=keras", "model.init=he_normal", "model.hidden=[512]")
    model = build_model(cfg.model, (1, 28, 28), 10)
    w = model.hidden[0].linear.weight
    std = math.sqrt(2 / 784)
    assert _variance(w) == pytest.approx(std ** 2, rel=0.05)
    assert w.abs().max().item() <= 2 * std / KERAS_TRUNCATION * (1 + F32)  # truncated at ±2σ (Keras' σ)
    assert torch.count_nonzero(model.hidden[0].linear.bias) == 0


def test_bias_init_is_its_own_switch():
    torch.manual_seed(0)
    zeros = build_model(compose_cfg("model.bias_init=zeros").model, (1, 28, 28), 10)  # torch kernels
    first = zeros.hidden[0].linear
    assert torch.count_nonzero(first.bias) == 0 and first.weight.abs().max() <= 1 / math.sqrt(784)
    torch.manual_seed(0)
    uniform = build_model(compose_cfg("model.init=glorot_uniform", "model.bias_init=torch").model, (1, 28, 28), 10)
    b = uniform.hidden[0].linear.bias
    assert torch.count_nonzero(b) == b.numel() and b.abs().max() <= 1 / math.sqrt(784)
    torch.manual_seed(0)
    legacy = build_model(compose_cfg("model.init=xavier_uniform").model, (1, 28, 28), 10)  # null: zeros as before
    assert torch.count_nonzero(legacy.hidden[0].linear.bias) == 0


def test_keras_run_records_what_reached_model_optimizer_and_batchnorm(tmp_path):
    cfg = compose_cfg(*TINY, "convention=keras", "optimizer=rmsprop", "regularizer=[batchnorm]")
    fit(cfg, tmp_path)
    record = json.loads((tmp_path / "summary.json").read_text())["convention"]
    assert record["name"] == "keras" and record["batch_size"] == 32 and record["val_split"] == "stratified"
    assert record["init"] == {"kernel": "glorot_uniform", "bias": "zeros"}
    assert record["optimizer"]["alpha"] == 0.9 and record["optimizer"]["eps"] == 1e-7
    bn = record["batchnorm"]  # Keras' BatchNormalization(momentum=0.99, epsilon=1e-3)
    assert bn["keras_momentum"] == pytest.approx(0.99, rel=F32) and bn["eps"] == 1e-3
    assert bn["torch_momentum"] == pytest.approx(0.01, rel=1e3 * F32)


def test_batchnorm_follows_the_convention_unless_set():
    keras = compose_cfg("convention=keras", "regularizer=[batchnorm]")
    assert keras.regularizer.batchnorm.convention == "keras"
    assert compose_cfg("regularizer=[batchnorm]").regularizer.batchnorm.convention == "torch"
    mixed = compose_cfg("convention=keras", "regularizer=[batchnorm]", "regularizer.batchnorm.convention=torch")
    assert mixed.regularizer.batchnorm.convention == "torch"


# ---------------------------------------------------------------------------------------- val split


def test_val_split_last_is_the_last_fraction_unshuffled():
    y = torch.arange(1000) % 10
    cfg = OmegaConf.create({"val_split": "last", "val_fraction": 0.1, "split_seed": 0, "name": "x"})
    val, train = split_validation(y, cfg)
    assert torch.equal(val, torch.arange(900, 1000)) and torch.equal(train, torch.arange(900))
    # Keras: split_at = floor(n * (1 - f)) (keras/src/trainers/data_adapters/array_slicing.py)
    cfg.val_fraction = 0.15
    val, _ = split_validation(torch.arange(999) % 10, cfg)
    assert len(val) == 999 - math.floor(999 * 0.85)
    stratified = split_validation(y, OmegaConf.merge(cfg, {"val_split": "stratified", "val_fraction": 0.1}))[0]
    assert len(stratified) == 100 and not torch.equal(stratified, torch.arange(900, 1000))


def test_val_split_last_reaches_the_data(tv_root):
    cfg = compose_cfg("data=mnist", f"data.root={tv_root}", "data.download=false", "data.val_split=last",
                      "data.normalize=none")
    data = load_data(cfg.data, torch.device("cpu"))
    from tests.conftest import make_mnist_like

    x, y = make_mnist_like(tv_root / "again", "MNIST", seed=1)["train"]  # the same generated training set
    n = len(y)
    split_at = math.floor(n * 0.9)
    assert torch.equal(data.val_y, torch.as_tensor(y[split_at:], dtype=torch.int64))
    assert torch.equal(data.val_x, torch.as_tensor(x[split_at:], dtype=torch.float32).div(255).unsqueeze(1))
    assert data.meta["val_split"] == "last"


# -------------------------------------------------------------------------------- lecture experiments
# The lecture code's values as docs/experiments.md quotes them (the section named in each comment); the test
# also checks that the docs still say so, so the two cannot drift apart silently.
LECTURE = {
    # docs/experiments.md, section 1: "Flatten → 128 → 128 → 64 → 10 ..., Adam, 10 epochs, validation split 0.1";
    # Keras fit without batch_size (issue 16) -> 32.
    "mnist_mlp": {
        "quote": "Flatten → 128 → 128 → 64 → 10",
        "model.hidden": [128, 128, 64], "model.activation": "relu", "optimizer.name": "adam", "optimizer.lr": 0.001,
        "trainer.max_epochs": 10, "data.val_fraction": 0.1, "data.batch_size": 32, "data.name": "mnist",
        "regularizer": {},
    },
    # section 1: "Flatten → 128 (0.3) → 128 (0.2) → 10, Adam, 10 epochs, validation split 0.1"
    "mnist_mlp_dropout": {
        "quote": "Flatten → 128 (0.3) → 128 (0.2) → 10, Adam, 10 epochs, validation split 0.1",
        "model.hidden": [128, 128], "model.activation": "relu", "optimizer.name": "adam", "optimizer.lr": 0.001,
        "regularizer.dropout.rate": [0.3, 0.2], "regularizer.dropout.placement": "after_activation",
        "trainer.max_epochs": 10, "data.val_fraction": 0.1, "data.batch_size": 32, "data.name": "mnist",
    },
    # section 2: "300 → 100 → 10 MLP with ELU, He (Kaiming) initialisation and batch norm (Keras momentum 0.9)
    # before each activation, plain SGD lr 0.01, batch 200, 10 epochs"
    "mnist_bn_elu": {
        "quote": "300 → 100 → 10 MLP with ELU, He (Kaiming) initialisation and batch norm (Keras",
        "model.hidden": [300, 100], "model.activation": "elu", "model.init": "he_normal", "model.bias_init": "zeros",
        "regularizer.batchnorm.convention": "keras", "regularizer.batchnorm.momentum": 0.9,
        "optimizer.name": "sgd", "optimizer.lr": 0.01, "optimizer.momentum": 0.0, "data.batch_size": 200,
        "trainer.max_epochs": 10,
    },
    # section 3: "The lecture's ladder for its CNN (AdamW, batch 200, 40 epochs)"
    "cifar10_cnn": {
        "quote": "(AdamW, batch 200, 40 epochs)",
        "model.name": "lecture_cnn", "model.widths": [32, 64, 128], "model.convs_per_block": 2, "model.dense": 64,
        "model.global_pool": "max", "optimizer.name": "adamw", "optimizer.lr": 0.001, "data.batch_size": 200,
        "trainer.max_epochs": 40, "data.name": "cifar10",
    },
}
KERAS_MODEL = {"model.init": "glorot_uniform", "model.bias_init": "zeros"}


def _select(cfg, key):
    value = OmegaConf.select(cfg, key)
    return OmegaConf.to_container(value) if OmegaConf.is_config(value) else value


@pytest.mark.parametrize("name", sorted(LECTURE))
def test_lecture_experiment_is_the_lecture_code_under_keras(name):
    docs = (REPO / "docs" / "experiments.md").read_text()
    expected = dict(LECTURE[name])
    assert expected.pop("quote") in docs
    cfg = check([f"experiment={name}"])[0]
    assert cfg.convention == "keras"
    for key, value in {**KERAS_MODEL, **expected}.items():
        assert _select(cfg, key) == value, key
    if cfg.optimizer.name in ("adam", "adamw"):
        assert cfg.optimizer.eps == 1e-7
    header = (REPO / "configs" / "experiment" / f"{name}.yaml").read_text().split("defaults:")[0]
    assert "Lecture:" in header and "convention=keras" in header


def test_lecture_studies_run_the_experiments_under_keras(tv_root, monkeypatch):
    monkeypatch.setenv("REGBENCH_DATA", str(tv_root))  # a sweep's pre-check looks for its datasets once
    monkeypatch.setenv("REGBENCH_DOWNLOAD", "false")
    for cfg in check(["sweep=mnist_dropout"], multirun=True):
        assert cfg.convention == "keras" and cfg.data.batch_size == 32 and cfg.model.init == "glorot_uniform"
    ladder = check(["sweep=cifar10_ladder"], multirun=True)
    for cfg in ladder:
        assert cfg.convention == "keras" and cfg.optimizer.eps == 1e-7 and cfg.data.batch_size == 200
    bn = [c for c in ladder if "batchnorm" in c.regularizer]
    assert bn and all(c.regularizer.batchnorm.convention == "keras" and c.regularizer.batchnorm.momentum is None
                      for c in bn)  # Keras' BatchNormalization() defaults: 0.99, 1e-3


@pytest.mark.parametrize("name,old", [
    ("mnist_mlp", ["data=mnist", "model.hidden=[128,128,64]", "trainer.max_epochs=10"]),
    ("mnist_mlp_dropout", ["data=mnist", "regularizer=[dropout]", "model.hidden=[128,128]",
                           "regularizer.dropout.rate=[0.3,0.2]", "trainer.max_epochs=10"]),
])
def test_torch_form_of_a_lecture_file_is_the_file_before_the_convention(name, old):
    """docs/experiments.md section 1's table was measured with these files before convention=keras; adding
    convention=torch composes exactly those configs (what the old files listed, as overrides)."""
    def plain(cfg):
        return {k: OmegaConf.to_container(cfg[k], resolve=True) if OmegaConf.is_config(cfg[k]) else cfg[k]
                for k in cfg if k != "hydra"}

    assert plain(compose_cfg(f"experiment={name}", "convention=torch")) == plain(compose_cfg(*old))
