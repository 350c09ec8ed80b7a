"""model=resnet: He et al. 2016's CIFAR ResNets — exact parameter counts, option A shortcuts, pre-activation
blocks, the layer slots it applies and those it refuses, and a training step under every member and preset."""

from __future__ import annotations

import json

import pytest
import torch
from torch import nn

from regbench.errors import ConfigError
from regbench.models import LayerSlots, NormSpec, build_model, count_parameters
from regbench.models.common import DropPath
from regbench.models.resnet import BasicBlock, ResNet, _shortcut_a
from regbench.regularizers import Context, build_stack
from regbench.train import fit
from tests.conftest import TINY, compose_cfg


def resnet_params(n: int, classes: int = 10, in_channels: int = 3) -> int:
    """By hand: 3x3 convs without bias, BN (γ, β) after each, option A shortcuts (no parameters), Dense head."""
    conv = lambda cin, cout: 9 * cin * cout  # noqa: E731
    bn = lambda c: 2 * c  # noqa: E731
    total = conv(in_channels, 16) + bn(16)
    for cin, cout in [(16, 16), (16, 32), (32, 64)]:
        total += conv(cin, cout) + conv(cout, cout) + 2 * bn(cout)  # the stage's first block
        total += (n - 1) * (2 * conv(cout, cout) + 2 * bn(cout))
    return total + 64 * classes + classes


@pytest.mark.parametrize("depth,expected,buffers", [(20, 269_722, 1_376), (32, 464_154, 2_272),
                                                    (56, 853_018, 4_064)])
def test_parameter_counts_match_the_paper(depth, expected, buffers):
    # He et al. 2016, Table 6: ResNet-20 0.27 M, ResNet-32 0.46 M, ResNet-56 0.85 M (CIFAR-10).
    assert resnet_params((depth - 2) // 6) == expected
    model = build_model(compose_cfg("model=resnet", f"model.depth={depth}").model, (3, 32, 32), 10)
    assert count_parameters(model) == {"trainable": expected, "frozen": 0, "buffers": buffers,
                                       "total": expected + buffers}
    assert round(expected / 1e6, 2) == {20: 0.27, 32: 0.46, 56: 0.85}[depth]
    convs = [m for m in model.modules() if isinstance(m, nn.Conv2d)]
    assert len(convs) == depth - 1 and all(c.bias is None and c.kernel_size == (3, 3) for c in convs)
    # Pre-activation moves the norms (BN over a block's input) and adds a final one: the same total here.
    pre = build_model(compose_cfg("model=resnet", f"model.depth={depth}", "model.preact=true").model, (3, 32, 32), 10)
    assert count_parameters(pre)["trainable"] == expected


def test_stages_shapes_and_option_a_shortcut():
    model = ResNet(3, 10, 20)
    blocks = [m for m in model.modules() if isinstance(m, BasicBlock)]
    assert len(blocks) == 9 and [b.out_channels for b in blocks] == [16] * 3 + [32] * 3 + [64] * 3
    assert [b.stride for b in blocks] == [1, 1, 1, 2, 1, 1, 2, 1, 1]
    x = torch.randn(2, 16, 8, 8)
    s = _shortcut_a(x, 32, 2)  # subsampled identity, new channels zero
    assert s.shape == (2, 32, 4, 4) and torch.equal(s[:, :16], x[:, :, ::2, ::2]) and not s[:, 16:].any()
    feats = {}
    model.features[3].register_forward_hook(lambda m, i, o: feats.setdefault("out", o))
    assert model(torch.randn(2, 3, 32, 32)).shape == (2, 10) and feats["out"].shape == (2, 64, 8, 8)
    assert model(torch.randn(2, 3, 28, 28)).shape == (2, 10)  # MNIST-sized maps: 28 -> 14 -> 7


def test_original_and_preactivation_block_by_hand():
    torch.manual_seed(0)
    x = torch.randn(3, 4, 5, 5)
    post = BasicBlock(4, 4, 1, NormSpec("batchnorm"), preact=False, drop_path=0.0).eval()
    expected = torch.relu(post.norm2(post.conv2(torch.relu(post.norm1(post.conv1(x))))) + x)
    assert torch.equal(post(x), expected)
    pre = BasicBlock(4, 4, 1, NormSpec("batchnorm"), preact=True, drop_path=0.0).eval()
    expected = pre.conv2(torch.relu(pre.norm2(pre.conv1(torch.relu(pre.norm1(x)))))) + x  # nothing after the sum
    assert torch.equal(pre(x), expected)
    model = ResNet(3, 10, 8, preact=True)
    assert [type(m) for m in model.features[-1]] == [nn.BatchNorm2d, nn.ReLU]  # the final norm -> ReLU
    assert len(model.features[0]) == 1  # the stem is the conv alone


def test_init_is_he_normal_fan_in_and_norm_none_gives_conv_biases():
    torch.manual_seed(0)
    model = ResNet(3, 10, 56)
    w = model.features[3][0].conv2.weight  # 64 x 64 x 3 x 3: fan_in 576
    assert w.std().item() == pytest.approx((2 / 576) ** 0.5, rel=0.02)
    assert torch.count_nonzero(model.head[-1].bias) == 0  # biases zero with a re-drawn kernel (as mlp, cnn)
    plain = build_model(compose_cfg("model=resnet", "model.norm=none").model, (3, 32, 32), 10)
    assert not any(isinstance(m, nn.BatchNorm2d) for m in plain.modules())
    assert all(c.bias is not None for c in plain.modules() if isinstance(c, nn.Conv2d))


def stack_slots(*overrides):
    cfg = compose_cfg("model=resnet", *overrides)
    return cfg, build_stack(cfg, Context(cfg)).slots()


def test_the_stack_sets_dropout_norm_and_drop_path():
    cfg, slots = stack_slots("regularizer=[dropout,group_norm,stochastic_depth]", "regularizer.dropout.rate=0.3",
                             "regularizer.group_norm.groups=4", "regularizer.stochastic_depth.rate=0.3")
    model = build_model(cfg.model, (3, 32, 32), 10, slots)
    assert [type(m) for m in model.head] == [nn.Flatten, nn.Dropout, nn.Linear] and model.head[1].p == 0.3
    norms = [m for m in model.modules() if isinstance(m, nn.GroupNorm)]
    assert len(norms) == 19 and all(g.num_groups == 4 for g in norms)
    assert not any(isinstance(m, nn.BatchNorm2d) for m in model.modules())
    assert [m.p for m in model.modules() if isinstance(m, DropPath)] == pytest.approx([0.3 * l / 9 for l in range(1, 10)])
    cfg, slots = stack_slots("regularizer=[batchnorm]", "regularizer.batchnorm.convention=keras")
    bns = [m for m in build_model(cfg.model, (3, 32, 32), 10, slots).modules() if isinstance(m, nn.BatchNorm2d)]
    assert len(bns) == 19 and all(b.momentum == pytest.approx(0.01) and b.eps == 1e-3 for b in bns)


@pytest.mark.parametrize("overrides,match", [
    (["regularizer=[dropout]", "regularizer.dropout.spatial=0.2"],
     r"regularizer.dropout.spatial=0.2: expected 0 with model=resnet \(spatial dropout drops conv feature maps; "
     r"model=resnet has no place for it\); use model=lecture_cnn or drop the key"),
    (["regularizer=[dropout]", "regularizer.dropout.placement=before_activation"],
     "regularizer.dropout.placement='before_activation': expected after_activation with model=resnet"),
    (["regularizer=[dropout]", "regularizer.dropout.rate=[0.1,0.2]"],
     r"regularizer.dropout.rate=\[0.1, 0.2\]: expected one rate for the ResNet's single dropout"),
    (["regularizer=[layer_norm]", "model.norm=none"],
     r"model.norm='none': expected to be left alone \(batchnorm\) with layer_norm in the stack"),
    (["regularizer=[group_norm]", "regularizer.group_norm.groups=3"],
     r"regularizer.group_norm.groups=3: expected a divisor of 16"),
    (["model.depth=21"], r"model.depth=21: expected 6n\+2"),
])
def test_what_a_resnet_refuses(overrides, match):
    from regbench.validation import validate

    with pytest.raises(ConfigError, match=match):
        validate(compose_cfg(*TINY, "model=resnet", *overrides))


# Every member and every augmentation preset train a step with every family that takes layer slots, the
# ResNet included: test_regularizers.py and test_augment.py loop over the model registry (at depth 8 there).
def test_resnet20_trains_and_its_loss_falls(tmp_path):
    fit(compose_cfg(*TINY, "model=resnet", "trainer.max_epochs=3", "optimizer.lr=0.003", "augmentation=standard",
                    "regularizer=[dropout,stochastic_depth]", "regularizer.dropout.rate=0.1",
                    "regularizer.stochastic_depth.rate=0.2"), tmp_path)
    s = json.loads((tmp_path / "summary.json").read_text())
    assert s["status"] == "completed" and s["regularizers"] == ["dropout", "stochastic_depth"]
    rows = (tmp_path / "metrics.csv").read_text().splitlines()
    header = rows[0].split(",")
    losses = [float(r.split(",")[header.index("train_loss")]) for r in rows[1:]]
    assert losses[-1] < losses[0]


def test_slots_default_to_nothing():
    assert LayerSlots().rate_list() == [] and LayerSlots().norm is None and not LayerSlots().filled("drop_path")
