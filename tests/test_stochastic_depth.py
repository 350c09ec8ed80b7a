"""regularizer=[stochastic_depth]: drop-path by hand, Huang et al.'s linear decay over depth, and refusal by
every model family without residual branches of its own building."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from regbench.validation import validate
from regbench.errors import ConfigError
from regbench.models import build_model
from regbench.models.common import DropPath
from regbench.models.resnet import BasicBlock
from regbench.models.slots import NormSpec
from regbench.regularizers import Context, build_stack
from tests.conftest import TINY, compose_cfg, model_options, small_model


def resnet_with(*overrides):
    cfg = compose_cfg("model=resnet", "regularizer=[stochastic_depth]", *overrides)
    return build_model(cfg.model, (3, 32, 32), 10, build_stack(cfg, Context(cfg)).slots())


def test_drop_path_drops_whole_samples_and_scales_the_kept_ones():
    drop = DropPath(0.3)
    torch.manual_seed(0)
    x = torch.ones(20_000, 4, 2, 2)
    out = drop(x).flatten(1)
    dropped = (out == 0).all(1)
    assert torch.all(dropped | (out == out[:, :1]).all(1))  # a sample is dropped whole or kept whole
    assert dropped.double().mean().item() == pytest.approx(0.3, abs=0.01)
    assert torch.allclose(out[~dropped], torch.full_like(out[~dropped], 1 / 0.7))  # inverted: E[out] = x
    drop.eval()
    assert drop(x) is x  # evaluation: the identity
    assert DropPath(0.0)(x) is x


def test_linear_decay_over_depth_and_uniform_rule():
    rates = [m.p for m in resnet_with("regularizer.stochastic_depth.rate=0.5").modules() if isinstance(m, DropPath)]
    assert rates == pytest.approx([0.5 * l / 9 for l in range(1, 10)])  # ResNet-20: L = 9 blocks, p_L = 0.5
    deep = [m.p for m in resnet_with("model.depth=56").modules() if isinstance(m, DropPath)]
    assert len(deep) == 27 and deep[-1] == pytest.approx(0.5) and deep[0] == pytest.approx(0.5 / 27)
    flat = [m.p for m in resnet_with("regularizer.stochastic_depth.rule=uniform", "regularizer.stochastic_depth.rate=0.2")
            .modules() if isinstance(m, DropPath)]
    assert flat == [0.2] * 9
    assert not any(isinstance(m, DropPath) for m in resnet_with("regularizer.stochastic_depth.rate=0").modules())


@pytest.mark.parametrize("preact", [False, True])
def test_a_dropped_branch_leaves_the_shortcut(preact):
    torch.manual_seed(0)
    block = BasicBlock(4, 4, 1, NormSpec("batchnorm"), preact=preact, drop_path=0.5).eval()
    block.drop_path.train()  # sample the drop-path only; BN uses running statistics: a fixed function per sample
    x = torch.randn(64, 4, 3, 3)
    if preact:
        branch = block.conv2(torch.relu(block.norm2(block.conv1(torch.relu(block.norm1(x))))))
    else:
        branch = block.norm2(block.conv2(torch.relu(block.norm1(block.conv1(x)))))
    finish = (lambda t: t) if preact else torch.relu  # nothing after the sum in a pre-activation block
    torch.manual_seed(1)
    out = block(x).flatten(1)
    kept = finish(x + branch / 0.5).flatten(1)  # kept branches scaled by 1/(1-p)
    dropped = finish(x).flatten(1)
    is_dropped = (out == dropped).all(1)
    is_kept = torch.isclose(out, kept, rtol=1e-5, atol=1e-6).all(1)
    assert torch.all(is_dropped | is_kept) and 0 < is_dropped.sum() < 64


def test_training_is_stochastic_and_evaluation_deterministic():
    model = resnet_with("model.depth=8", "regularizer.stochastic_depth.rate=0.9")
    x = torch.randn(8, 3, 16, 16)
    model.eval()
    assert torch.equal(model(x), model(x))
    model.train()
    torch.manual_seed(0)
    a = model(x)
    torch.manual_seed(1)
    assert not torch.equal(a, model(x))


@pytest.mark.parametrize("model_name", model_options())
def test_every_family_applies_it_or_refuses_it_in_one_line(model_name):
    cfg = compose_cfg(*TINY, *small_model(model_name), "regularizer=[stochastic_depth]")
    if model_name == "resnet":
        validate(cfg)
        return
    with pytest.raises(ConfigError) as e:
        validate(cfg)
    msg = str(e.value)
    assert msg.startswith("regularizer.stochastic_depth.rate=0.5: expected a model with residual branches")
    assert f"model={model_name}" in msg and "use model=resnet" in msg and "\n" not in msg


@pytest.mark.parametrize("overrides,match", [
    (["regularizer.stochastic_depth.rate=1.0"], "regularizer.stochastic_depth.rate=1.0: expected a rate in"),
    (["regularizer.stochastic_depth.rule=exp"], "regularizer.stochastic_depth.rule='exp': expected linear or uniform"),
])
def test_bad_keys(overrides, match):
    with pytest.raises(ConfigError, match=match):
        validate(compose_cfg(*TINY, "model=resnet", "regularizer=[stochastic_depth]", *overrides))
