"""The stacked step's per-member rules (regbench.stacked.step) against torch's and regbench's single-run ones."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from regbench.regularizers import Context, build_stack
from regbench.stacked.step import StepRules, check_stackable
from regbench.errors import RegbenchError
from tests.conftest import F32_REL, compose_cfg


def rules_for(*member_overrides, models=None):
    cfgs = [compose_cfg(*o) for o in member_overrides]
    stacks = [build_stack(c, Context(c)) for c in cfgs]
    models = models or [torch.nn.Sequential(torch.nn.Linear(6, 5), torch.nn.ReLU(), torch.nn.Linear(5, 3))
                        for _ in cfgs]
    for s, m in zip(stacks, models):
        s.setup(m)
        s.param_groups(m, cfgs[0].optimizer)  # weight decay decides here whether the optimizer applies it
    return StepRules(stacks, [list(m.parameters()) for m in models], torch.device("cpu")), stacks, models


def test_loss_is_each_members_cross_entropy_with_its_own_smoothing():
    rules, _, _ = rules_for(["regularizer=[label_smoothing]", "regularizer.label_smoothing.alpha=0.2"], [],
                            ["regularizer=[label_smoothing]", "regularizer.label_smoothing.alpha=0.05"])
    torch.manual_seed(0)
    logits, y = torch.randn(3, 8, 10), torch.randint(0, 10, (3, 8))
    got = rules.loss(logits, y)
    for k, a in enumerate((0.2, 0.0, 0.05)):
        assert got[k].item() == pytest.approx(F.cross_entropy(logits[k], y[k], label_smoothing=a).item(), rel=F32_REL)
    soft = torch.softmax(torch.randn(3, 8, 10), -1)
    got = rules.loss(logits, soft)
    for k, a in enumerate((0.2, 0.0, 0.05)):
        assert got[k].item() == pytest.approx(F.cross_entropy(logits[k], soft[k], label_smoothing=a).item(),
                                              rel=F32_REL)


def test_penalties_are_each_members_own():
    rules, stacks, models = rules_for(
        ["regularizer=[l1]", "regularizer.l1.lam=0.01"], ["regularizer=[l2]", "regularizer.l2.lam=0.1"],
        ["regularizer=[elastic_net,l2]", "regularizer.elastic_net.lam=0.02", "regularizer.l2.half=true"], [])
    stacked = [torch.stack([list(m.parameters())[i].detach() for m in models]) for i in range(4)]
    got = rules.penalty(stacked)
    for k, s in enumerate(stacks):
        want = s.penalty_fn()(models[k]) if k < 3 else torch.tensor(0.0)
        assert got[k].item() == pytest.approx(want.item(), rel=F32_REL)
    assert rules.has_penalty == [True, True, True, False]


def test_stochastic_depth_is_refused_by_name():
    cfg = compose_cfg("model=resnet", "model.depth=8", "regularizer=[stochastic_depth]")
    with pytest.raises(RegbenchError, match="'stochastic_depth' cannot be trained in a stack"):
        check_stackable(build_stack(cfg, Context(cfg)))
