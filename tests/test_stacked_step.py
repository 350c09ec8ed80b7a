"""The stacked step's per-member rules (regbench.stacked.step) against torch's and regbench's single-run ones:
bitwise, since each member's rule runs the single run's very formula on the member's own slice (issue 25: batched
formulas over [K, ...] rounded otherwise, and Adam turned the ulps into a 7e-3 relative difference by epoch 5)."""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F

from regbench.optim import build_optimizer
from regbench.regularizers import Context, build_stack
from regbench.stacked.optim import StackedOptimizer
from regbench.stacked.step import StepRules, check_stackable
from regbench.errors import RegbenchError
from tests.conftest import compose_cfg


def small_model():
    return torch.nn.Sequential(torch.nn.Linear(6, 5), torch.nn.ReLU(), torch.nn.Linear(5, 3))


def rules_for(*member_overrides, models=None):
    cfgs = [compose_cfg(*o) for o in member_overrides]
    stacks = [build_stack(c, Context(c)) for c in cfgs]
    models = models or [small_model() for _ in cfgs]
    for s, m, c in zip(stacks, models, cfgs):
        s.setup(m)
        s.param_groups(m, c.optimizer)  # weight decay decides here whether the optimizer applies it
    return StepRules(stacks, [list(m.parameters()) for m in models], torch.device("cpu")), stacks, models


def stacked_leaves(models):
    n = len(list(models[0].parameters()))
    return [torch.stack([list(m.parameters())[i].detach() for m in models]).requires_grad_() for i in range(n)]


def test_loss_is_each_members_cross_entropy_with_its_own_smoothing():
    rules, _, _ = rules_for(["regularizer=[label_smoothing]", "regularizer.label_smoothing.alpha=0.2"], [],
                            ["regularizer=[label_smoothing]", "regularizer.label_smoothing.alpha=0.05"])
    torch.manual_seed(0)
    logits, y = torch.randn(3, 8, 10), torch.randint(0, 10, (3, 8))
    soft = torch.softmax(torch.randn(3, 8, 10), -1)
    for target in (y, soft):
        got = rules.loss(logits, target)
        for k, a in enumerate((0.2, 0.0, 0.05)):
            assert torch.equal(got[k], F.cross_entropy(logits[k], target[k], label_smoothing=a)), (k, target.ndim)


def test_penalties_and_their_gradients_are_each_members_own_bitwise():
    rules, stacks, models = rules_for(
        ["regularizer=[l1]", "regularizer.l1.lam=0.01"], ["regularizer=[l2]", "regularizer.l2.lam=0.1"],
        ["regularizer=[elastic_net,l2]", "regularizer.elastic_net.lam=0.02", "regularizer.l2.half=true"], [])
    leaves = stacked_leaves(models)
    got = rules.penalty(leaves)
    got.sum().backward()
    for k, s in enumerate(stacks[:3]):
        want = s.penalty_fn()(models[k])
        assert torch.equal(got[k], want), k
        grads = torch.autograd.grad(want, list(models[k].parameters()), allow_unused=True)
        for i, g in enumerate(grads):  # a leaf no member penalises (the biases) gets no gradient at all
            got_g = None if leaves[i].grad is None else leaves[i].grad[k]
            assert (got_g is None or not got_g.any()) if g is None else torch.equal(got_g, g), (k, i)
    assert got[3].item() == 0 and rules.has_penalty == [True, True, True, False]


GRADIENT_MEMBERS = [
    ["regularizer=[grad_clip]", "regularizer.grad_clip.max=0.3"],
    ["regularizer=[grad_clip]", "regularizer.grad_clip.mode=value", "regularizer.grad_clip.max=0.2"],
    ["regularizer=[weight_decay,grad_clip]", "regularizer.weight_decay.rate=0.3", "optimizer.weight_decay=0",
     "regularizer.grad_clip.max=0.5", "regularizer.grad_clip.norm_type=1"],
    ["optimizer.lr=0.03"],
]


@pytest.mark.parametrize("optimizer", ["adam", "adamw"])  # adam: decoupled decay by regbench; adamw: coupled
def test_weight_decay_and_clipping_are_each_members_own_bitwise(optimizer):
    members = [[f"optimizer={optimizer}", *m] for m in GRADIENT_MEMBERS]
    if optimizer == "adamw":
        members[2].append("regularizer.weight_decay.mode=coupled")
    torch.manual_seed(1)
    models = [small_model() for _ in members]
    alone = copy.deepcopy(models)
    rules, stacks, _ = rules_for(*members, models=models)
    _, own_stacks, _ = rules_for(*members, models=alone)
    cfgs = [compose_cfg(*m) for m in members]
    opts = [build_optimizer(c.optimizer, s.param_groups(m, c.optimizer), fused=True)
            for c, s, m in zip(cfgs, stacks, models)]
    refs = [build_optimizer(c.optimizer, s.param_groups(m, c.optimizer), fused=True)
            for c, s, m in zip(cfgs, own_stacks, alone)]
    leaves = stacked_leaves(models)
    stacked = StackedOptimizer(leaves, [list(m.parameters()) for m in models], opts)
    g = torch.Generator().manual_seed(2)
    for _ in range(3):
        grads = [torch.randn(p.shape, generator=g) for p in leaves]
        stacked.zero_grad()
        for p, gr in zip(leaves, grads):
            p.grad = gr.clone()
        rules.before_step(leaves, stacked)
        stacked.step()
        for k, (m, o, s) in enumerate(zip(alone, refs, own_stacks)):
            for i, p in enumerate(m.parameters()):
                p.grad = grads[i][k].clone()
            s.before_step_fn()(m, o, None) if s.before_step_fn() else None
            o.step()
    for k, m in enumerate(alone):
        for i, p in enumerate(m.parameters()):
            assert torch.equal(leaves[i][k].detach(), p.detach()), (optimizer, k, i)


def test_stochastic_depth_is_refused_by_name():
    cfg = compose_cfg("model=resnet", "model.depth=8", "regularizer=[stochastic_depth]")
    with pytest.raises(RegbenchError, match="'stochastic_depth' cannot be trained in a stack"):
        check_stackable(build_stack(cfg, Context(cfg)))
