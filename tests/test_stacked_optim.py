"""StackedOptimizer: every member is stepped by torch.optim's own update rule, with its own hyperparameters — so a
member's trajectory equals its torch optimizer stepping it alone, bitwise, for all seven optimizers. So does the one
shared optimizer used while the hyperparameters agree: it steps the members' rows (each a tensor of its own in the
kernel's list, as in the member's own call), not the stacked leaves (issue 25: a fused CPU kernel splits a [K, ...]
tensor into SIMD blocks and a scalar tail by position, so an element could take the other path than in its member's
own tensor). States move with select, export and resume."""

from __future__ import annotations

import copy

import pytest
import torch
from omegaconf import OmegaConf

from regbench.optim import build_optimizer
from regbench.stacked.optim import StackedOptimizer
from tests.conftest import compose_cfg, config_options

OPTIMIZERS = config_options("optimizer")


def optimizer_cfg(name: str, k: int, vary: bool):
    cfg = OmegaConf.to_container(compose_cfg(f"optimizer={name}").optimizer, resolve=True)
    if vary:  # per-member hyperparameters
        cfg["lr"] *= 1 + k
        if cfg.get("momentum"):
            cfg["momentum"] = 0.9 - 0.1 * k
        if "betas" in cfg:
            cfg["betas"] = [0.9 - 0.05 * k, 0.999]
        if "eps" in cfg:
            cfg["eps"] *= 1 + k
        cfg["weight_decay"] = 0.01 * k
    return OmegaConf.create(cfg)


def members(name: str, K: int, vary: bool, fused: bool = True):
    torch.manual_seed(0)
    models = [torch.nn.Sequential(torch.nn.Linear(5, 4), torch.nn.Tanh(), torch.nn.Linear(4, 3)) for _ in range(K)]
    alone = [copy.deepcopy(m) for m in models]
    opts = [build_optimizer(optimizer_cfg(name, k, vary), m.parameters(), fused=fused) for k, m in enumerate(models)]
    refs = [build_optimizer(optimizer_cfg(name, k, vary), m.parameters(), fused=fused) for k, m in enumerate(alone)]
    params = [torch.stack([list(m.parameters())[i].detach() for m in models]).requires_grad_() for i in range(4)]
    return models, alone, opts, refs, params


def run(params, stacked, alone, refs, steps=4, seed=1):
    g = torch.Generator().manual_seed(seed)
    for _ in range(steps):
        grads = [torch.randn(p.shape, generator=g) for p in params]
        for p, gr in zip(params, grads):
            p.grad = gr.clone()
        stacked.step()
        stacked.zero_grad()
        for k, (m, o) in enumerate(zip(alone, refs)):
            for i, p in enumerate(m.parameters()):
                p.grad = grads[i][k].clone()
            o.step()


@pytest.mark.parametrize("name", OPTIMIZERS)
@pytest.mark.parametrize("vary", [True, False], ids=["own-hyperparameters", "shared-optimizer"])
def test_each_member_follows_its_own_torch_optimizer_bitwise(name, vary):
    models, alone, opts, refs, params = members(name, 3, vary)
    stacked = StackedOptimizer(params, [list(m.parameters()) for m in models], opts)
    assert (stacked.shared is None) == vary
    run(params, stacked, alone, refs)
    for k, m in enumerate(alone):
        for i, p in enumerate(m.parameters()):
            assert torch.equal(params[i][k].detach(), p.detach()), (name, k, i)
    for k in range(3):  # the member's torch state_dict is what its optimizer alone would save
        stacked.export_member(k)
        mine, ref = opts[k].state_dict()["state"], refs[k].state_dict()["state"]
        assert mine.keys() == ref.keys()
        for j in ref:
            for key, v in ref[j].items():
                assert torch.equal(mine[j][key], v) if torch.is_tensor(v) else mine[j][key] == v, (name, key)


def test_select_keeps_the_kept_members_trajectories():
    models, alone, opts, refs, params = members("adam", 4, vary=True)
    stacked = StackedOptimizer(params, [list(m.parameters()) for m in models], opts)
    run(params, stacked, alone, refs, steps=2)
    keep = [0, 2]
    params = [p.detach()[keep].clone().requires_grad_() for p in params]
    stacked.select(keep, params)
    run(params, stacked, [alone[k] for k in keep], [refs[k] for k in keep], steps=3, seed=5)
    for j, k in enumerate(keep):
        for i, p in enumerate(alone[k].parameters()):
            assert torch.equal(params[i][j], p.detach())


def test_a_resumed_members_loaded_state_moves_into_the_stack():
    models, alone, opts, refs, params = members("momentum", 2, vary=True, fused=False)
    for k, m in enumerate(alone):  # a few steps alone, then their state_dicts are "checkpoints"
        for p in m.parameters():
            p.grad = torch.ones_like(p)
        refs[k].step()
    for k in range(2):
        models[k].load_state_dict(alone[k].state_dict())
        opts[k].load_state_dict(copy.deepcopy(refs[k].state_dict()))  # as from a checkpoint file: its own tensors
    params = [torch.stack([list(m.parameters())[i].detach() for m in models]).requires_grad_() for i in range(4)]
    stacked = StackedOptimizer(params, [list(m.parameters()) for m in models], opts)
    run(params, stacked, alone, refs, steps=3)
    for k, m in enumerate(alone):
        for i, p in enumerate(m.parameters()):
            assert torch.equal(params[i][k], p.detach())
