"""regularizer=[dropblock]: timm's DropBlock2d (timm/layers/drop.py drop_block_2d, timm 1.0.31) by hand — γ, the
blocks' shape, the count/kept scaling, the expected dropped fraction — and against timm itself where installed;
where each conv family puts it, the schedule, refusals, stacks, a run from the config and its bitwise resume."""

from __future__ import annotations

import json

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from regbench.errors import ConfigError
from regbench.models import build_model, count_parameters
from regbench.models.common import DropBlock2d, drop_block_2d, drop_block_gamma
from regbench.regularizers import Context, build_stack
from regbench.regularizers.stacking import stack_refusals
from regbench.stacked.grouping import stack_key
from regbench.train import fit
from regbench.validation import validate
from tests.conftest import TINY, compose_cfg, small_model


def built(*overrides, shape=(3, 32, 32)):
    cfg = compose_cfg(*overrides)
    validate(cfg)
    stack = build_stack(cfg, Context(cfg))
    torch.manual_seed(0)
    model = build_model(cfg.model, shape, 10, stack.slots())
    stack.setup(model)
    return model, stack


def blocks_of(model: nn.Module) -> list[DropBlock2d]:
    return [m for m in model.modules() if isinstance(m, DropBlock2d)]


# ------------------------------------------------------------------------------------------------ the formula

def test_gamma_by_hand():
    # γ = gamma_scale·p·H·W / (k_h·k_w) / ((H − k_h + 1)(W − k_w + 1)), k = min(block_size, side)
    assert drop_block_gamma(0.1, 7, 16, 16) == pytest.approx(0.1 * 256 / 49 / 100)
    assert drop_block_gamma(0.1, 7, 8, 8) == pytest.approx(0.1 * 64 / 49 / 4)
    assert drop_block_gamma(0.2, 7, 5, 6) == pytest.approx(0.2 * 30 / 30 / 1)  # clipped to 5x6: the whole map
    assert drop_block_gamma(0.1, 5, 14, 14, 0.25) == pytest.approx(0.25 * 0.1 * 196 / 25 / 100)


def expected_dropped_fraction(gamma: float, k: int, h: int, w: int) -> float:
    """P(a position is dropped), averaged over the map: a position is dropped when a centre falls in the (clipped)
    k×k window around it, n(i, j) candidate centres, each drawn with probability γ (odd k)."""
    r = k // 2
    rows = [min(h - 1, i + r) - max(0, i - r) + 1 for i in range(h)]
    cols = [min(w - 1, j + r) - max(0, j - r) + 1 for j in range(w)]
    return sum(1 - (1 - gamma) ** (a * b) for a in rows for b in cols) / (h * w)


@pytest.mark.parametrize("h,k,gamma_scale,lost", [(16, 7, 1.0, 0.184), (8, 7, 1.0, 0.618), (7, 7, 1.0, 0.930),
                                                   (16, 5, 0.25, 0.037), (8, 3, 1.0, 0.140)])
def test_what_a_map_loses_at_rate_0_1_as_documented(h, k, gamma_scale, lost):
    """docs/regularizers.md: not p (centres are drawn anywhere, γ counts only the fitting ones; blocks overlap)."""
    assert expected_dropped_fraction(drop_block_gamma(0.1, k, h, h, gamma_scale), k, h, h) == pytest.approx(lost,
                                                                                                            abs=5e-4)


@pytest.mark.parametrize("h,k,p", [(16, 7, 0.1), (8, 7, 0.1), (8, 3, 0.3)])
def test_blocks_their_scaling_and_the_dropped_fraction(h, k, p):
    torch.manual_seed(0)
    x = torch.ones(2000, 3, h, h)
    out = drop_block_2d(x, p, k)
    dropped = out == 0
    assert torch.equal(dropped, dropped[:, :1].expand_as(dropped))  # one mask per sample, shared by the channels
    # every dropped position lies in a k×k block (clipped at the border) that is dropped whole: the mask is the
    # dilation of its own erosion (its block centres)
    d = dropped[:, :1].float()
    centres = -F.max_pool2d(-F.pad(d, (k // 2,) * 4, value=1.0), k, stride=1)  # positions whose whole block is dropped
    assert torch.equal(F.max_pool2d(centres, k, stride=1, padding=k // 2), d)
    # kept values scaled by count/kept over the batch (timm: numel / (Σ keep + 1e-7))
    kept = (~dropped[:, :1]).sum().item()
    scale = torch.tensor(2000 * h * h / (kept + 1e-7), dtype=torch.float32)
    assert torch.equal(out[~dropped], scale.expand(int((~dropped).sum())))
    # the fraction dropped: the exact expectation given γ (per-sample fractions are independent across samples)
    per_sample = d.mean((1, 2, 3)).double()
    expected = expected_dropped_fraction(drop_block_gamma(p, k, h, h), k, h, h)
    assert abs(per_sample.mean().item() - expected) < 5 * per_sample.std().item() / 2000 ** 0.5


def test_identity_in_evaluation_and_at_rate_zero():
    x = torch.randn(4, 2, 8, 8)
    assert DropBlock2d(0.5).eval()(x) is x
    assert DropBlock2d(0.0).train()(x) is x


@pytest.mark.parametrize("shape,block,gamma_scale,p", [((8, 4, 16, 16), 7, 1.0, 0.1), ((8, 4, 8, 8), 7, 1.0, 0.3),
                                                       ((4, 3, 9, 7), 4, 0.5, 0.2), ((4, 3, 14, 14), 5, 0.25, 0.1)])
def test_bitwise_timm(shape, block, gamma_scale, p):
    timm = pytest.importorskip("timm.layers")  # an extra oracle: timm is not a dependency
    x = torch.randn(shape)
    torch.manual_seed(3)
    want = timm.DropBlock2d(p, block, gamma_scale).train()(x)
    torch.manual_seed(3)
    assert torch.equal(DropBlock2d(p, block, gamma_scale).train()(x), want)


# ------------------------------------------------------------------------------------------------- placement

def test_resnet_last_two_stages_after_the_first_norm_before_the_relu():
    model, _ = built(*small_model("resnet"), "regularizer=[dropblock]", "regularizer.dropblock.block_size=[5,3]",
                     "regularizer.dropblock.gamma_scale=[0.25,1.0]")
    stages = model.features[1:4]
    assert [[b.drop_block is not None for b in s] for s in stages] == [[False], [True], [True]]
    assert [(b.drop_block.block_size, b.drop_block.gamma_scale) for s in stages[1:] for b in s] == [(5, 0.25), (3, 1.0)]
    block = stages[2][0].eval()
    seen = []
    block.drop_block = type("Probe", (nn.Module,), {"forward": lambda self, t: seen.append(t) or t * 0})()
    x = torch.randn(2, 32, 16, 16)
    out = block(x)
    assert torch.equal(seen[0], block.norm1(block.conv1(x)))  # conv1 -> norm1 -> drop_block -> ReLU (timm)
    shortcut = F.pad(x[:, :, ::2, ::2], (0, 0, 0, 0, 0, 32))
    assert torch.equal(out, F.relu(shortcut + block.norm2(block.conv2(torch.zeros_like(seen[0])))))


def test_lecture_cnn_end_of_the_last_two_blocks_and_no_parameters():
    model, _ = built("model=lecture_cnn", "model.widths=[4,8,16]", "regularizer=[dropblock]")
    assert [("drop_block" in dict(b.named_children())) for b in model.features] == [False, True, True]
    assert [n for n, _ in model.features[2].named_children()][-2:] == ["drop_block", "pool"]
    plain, _ = built("model=lecture_cnn", "model.widths=[4,8,16]")
    assert count_parameters(model) == count_parameters(plain)
    x = torch.randn(2, 3, 32, 32)
    assert torch.equal(model.eval()(x), plain.eval()(x))
    one, _ = built("model=lecture_cnn", "model.widths=[4]", "regularizer=[dropblock]")
    assert len(blocks_of(one)) == 1


@pytest.mark.parametrize("overrides,message", [
    (["regularizer=[dropblock]"], "regularizer.dropblock.rate=0.1: expected a convolutional model (model=mlp: the "
     "MLP has no conv feature maps); use model=lecture_cnn or resnet, or drop dropblock from the stack"),
    (["model=resnet", "regularizer=[dropblock]", "regularizer.dropblock.block_size=[5,3,3]"],
     "regularizer.dropblock.block_size=[5, 3, 3]: expected one value, or a list of 2 (one per residual stage it is "
     "in: the last two)"),
    (["model=lecture_cnn", "model.widths=[8]", "regularizer=[dropblock]", "regularizer.dropblock.gamma_scale=[1,1]"],
     "regularizer.dropblock.gamma_scale=[1.0, 1.0]: expected one value, or a list of 1"),
    (["model=resnet", "regularizer=[dropblock]", "regularizer.dropblock.rate=1"],
     "regularizer.dropblock.rate=1.0: expected a rate in [0, 1)"),
    (["model=resnet", "regularizer=[dropblock]", "regularizer.dropblock.block_size=0"],
     "regularizer.dropblock.block_size=0: expected an integer >= 1"),
    (["model=resnet", "regularizer=[dropblock]", "regularizer.dropblock.gamma_scale=2"],
     "regularizer.dropblock.gamma_scale=2: expected a number in (0, 1]"),
    (["model=resnet", "regularizer=[dropblock]", "regularizer.dropblock.schedule=cosine"],
     "regularizer.dropblock.schedule='cosine': expected constant or linear"),
])
def test_refusals_are_one_line_naming_the_key(overrides, message):
    with pytest.raises(ConfigError) as e:
        validate(compose_cfg(*TINY, *overrides))
    assert str(e.value).startswith(message) and "\n" not in str(e.value)


# ------------------------------------------------------------------------------------------------- schedule

def test_linear_schedule_ramps_per_epoch_and_resumes_its_clock():
    model, stack = built(*small_model("resnet"), "regularizer=[dropblock]", "regularizer.dropblock.schedule=linear",
                         "regularizer.dropblock.rate=0.2", "trainer.max_epochs=5")
    member = stack.get("dropblock")
    rates = [blocks_of(model)[0].drop_prob]
    for epoch in range(1, 5):
        stack.on_epoch_end(epoch, {}, model)
        rates.append(blocks_of(model)[0].drop_prob)
        assert len({b.drop_prob for b in blocks_of(model)}) == 1
    assert rates == pytest.approx([0.0, 0.05, 0.1, 0.15, 0.2])  # epoch n of N: rate·(n − 1)/(N − 1)
    state = member.state_dict()
    again, stack2 = built(*small_model("resnet"), "regularizer=[dropblock]", "regularizer.dropblock.schedule=linear",
                          "regularizer.dropblock.rate=0.2", "trainer.max_epochs=5")
    assert blocks_of(again)[0].drop_prob == 0.0
    stack2.get("dropblock").load_state_dict(state)
    assert [b.drop_prob for b in blocks_of(again)] == pytest.approx([0.2, 0.2])
    constant, stack3 = built(*small_model("resnet"), "regularizer=[dropblock]", "trainer.max_epochs=5")
    stack3.on_epoch_end(1, {}, constant)
    assert {b.drop_prob for b in blocks_of(constant)} == {0.1}  # timm: the rate never changes


# ------------------------------------------------------------------------------------------ stacks and a run

def test_refused_in_a_stack_with_one_line():
    cfg = compose_cfg(*TINY, "model=resnet", "regularizer=[dropblock]")
    (refusal,) = stack_refusals(cfg)
    assert (refusal.key, refusal.value) == ("regularizer", "dropblock")
    assert stack_key(cfg) == (None, "regularizer member dropblock: it draws its block masks inside the forward pass, "
                                    "which a stack does not draw per member (only dropout's masks)")


def test_a_run_from_the_config_resumes_bitwise_with_the_linear_schedule(tmp_path):
    args = [*TINY, "trainer.num_threads=1", "model=lecture_cnn", "model.widths=[4,8]", "model.dense=16",
            "trainer.max_epochs=2",
            "regularizer=[dropblock]", "regularizer.dropblock.schedule=linear", "regularizer.dropblock.rate=0.3",
            "regularizer.dropblock.block_size=3"]
    fit(compose_cfg(*args), tmp_path / "ref")
    ref = json.loads((tmp_path / "ref" / "summary.json").read_text())
    assert ref["status"] == "completed" and ref["step_impl"] == "autograd"
    assert ref["regularizer_info"]["dropblock"]["layers"] == 2
    run = tmp_path / "run"
    fit(compose_cfg(*args), run)
    summary = json.loads((run / "summary.json").read_text())
    summary["status"] = "interrupted"
    (run / "summary.json").write_text(json.dumps(summary))
    (run / "checkpoints" / "epoch_0002.pt").unlink()  # resume from epoch 1 (rate 0): epoch 2 trains with 0.3
    fit(compose_cfg(*args, "trainer.resume=true"), run)
    resumed = json.loads((run / "summary.json").read_text())
    assert resumed["resumed_from_epoch"] == 1
    drop = lambda row: {k: v for k, v in row.items() if k != "epoch_time_s"}  # noqa: E731
    assert drop(resumed["final"]) == drop(ref["final"]) and resumed["test"] == ref["test"]
