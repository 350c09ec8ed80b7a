"""One stacked training step's objective and gradient rules, per member: the step-level regularizers of every
member (label smoothing, L1/L2/elastic-net penalties, regbench's own weight decay, gradient clipping), each computed
by the member's single-run formula on the member's own slice — its logits, its rows of the stacked parameters (row
k of a leaf [K, ...] is member k's parameter), their gradients — so every member gets bitwise what its single run
computes (a batched formula over [K, ...] sums in another order: one float32 ulp per step, which Adam's ε turns
into lr-sized steps for near-zero gradients and which grew to 7e-3 relative by epoch 5 in issue 25). The per-member
calls are small (a few per member and step) next to the members' matrix products.

A member without one of them simply has none (no penalty term, no clipping); what a member cannot have in a stack
(another loss option, a penalty or gradient hook this module does not know) is refused by name. The epoch-level
members (early stopping, MC dropout, snapshot ensembles) run on each member's own model at the epoch end
(regbench.stacked.engine), unchanged.
"""

from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F

from regbench.errors import RegbenchError
from regbench.regularizers.base import Regularizer

# Members whose step-level hooks (penalty, loss option, gradient hook, parameter groups) this module reproduces per
# member; any other member overriding one of those hooks, or drawing randomness inside the forward pass
# (stochastic depth), cannot be stacked and is refused by name.
_ALLOWED = {"l1": ("setup", "penalty"), "l2": ("setup", "penalty"), "elastic_net": ("setup", "penalty"),
            "weight_decay": ("param_groups", "before_step"), "label_smoothing": ("loss_options",),
            "grad_clip": ("before_step",),
            # epoch-level members whose setup only reads the config / checks the model:
            "ensemble": ("setup",), "mc_dropout": ("setup",), "early_stopping": ("setup",)}
_STEP_HOOKS = ("setup", "penalty", "loss_options", "before_step", "param_groups")
_NOT_STACKABLE = {"stochastic_depth": "it draws its own per-sample randomness inside the forward pass"}
_PENALTIES = ("l1", "l2", "elastic_net")


def check_stackable(stack) -> None:
    """Refuse a member whose step-level behaviour the stacked step does not reproduce."""
    for r in stack.members:
        hooks = [h for h in _STEP_HOOKS
                 if getattr(type(r), h) is not getattr(Regularizer, h) and h not in _ALLOWED.get(r.name, ())]
        why = _NOT_STACKABLE.get(r.name) or (f"its {', '.join(hooks)} acts inside every step" if hooks else None)
        if why:
            raise RegbenchError(f"regularizer member '{r.name}' cannot be trained in a stack ({why}); fix: run it "
                                "with the basic launcher")


def _indices(params: list, slots: dict[int, int], what: str) -> list[int]:
    """Where ``params`` (a member's own parameters) sit among the stacked leaves, in their order."""
    try:
        return [slots[id(p)] for p in params]
    except KeyError:
        raise RegbenchError(f"{what} applies to a parameter the stack does not train") from None


class _Member:
    """One member's step-level rules: its loss options, its penalty terms (regularizer, leaf indices) in the
    stack's order, its gradient hooks (regularizer, leaf indices) in the stack's order."""

    def __init__(self, stack, slots: dict[int, int]):
        self.loss_options = stack.loss_options()
        # As RegularizerStack.penalty_fn: the members that add a term (λ = 0 or no parameters adds none).
        self.penalties = [(r, _indices(r.params, slots, f"regularizer.{r.name}")) for r in stack.members
                          if r.name in _PENALTIES and r.params and r.cfg.lam != 0]
        self.hooks = []
        for r in stack.members:
            if r.name == "weight_decay" and getattr(r, "manual", None) and r.cfg.rate != 0:
                self.hooks.append((r, _indices(r.manual, slots, "regularizer.weight_decay")))
            elif r.name == "grad_clip":
                self.hooks.append((r, None))


class StepRules:
    """The per-member loss, penalty and gradient rules of one stack (members in slot order)."""

    def __init__(self, stacks: list, member_params: list[list[torch.nn.Parameter]], device: torch.device):
        self.device = device
        for s in stacks:
            check_stackable(s)
        self.members = [_Member(s, {id(p): i for i, p in enumerate(ps)}) for s, ps in zip(stacks, member_params)]
        self.has_penalty = [bool(m.penalties) for m in self.members]

    def select(self, keep: list[int]) -> None:
        self.members = [self.members[k] for k in keep]
        self.has_penalty = [self.has_penalty[k] for k in keep]

    # ------------------------------------------------------------------------------------ per step
    def loss(self, logits: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        """Per-member mean cross-entropy [K] of logits [K, B, C] against labels [K, B] or soft targets [K, B, C]:
        each member's ``F.cross_entropy`` with its own options (label smoothing α), as its single run calls it."""
        return torch.stack([F.cross_entropy(logits[k], y[k], **m.loss_options) for k, m in enumerate(self.members)])

    def penalty(self, params: list[torch.Tensor]) -> Optional[torch.Tensor]:
        """Per-member penalty [K] (zero for members without one), or None when no member has one: member k's
        λ·value(its rows) per penalty member, summed as its single run's penalty_fn sums them."""
        if not any(self.has_penalty):
            return None
        zero = torch.zeros((), device=self.device)
        totals = []
        for k, m in enumerate(self.members):
            # One view per leaf and member: its gradient terms add up in the order its single run's parameter's do.
            rows = {i: params[i][k] for _, ix in m.penalties for i in ix}
            terms = [r.cfg.lam * r.value([rows[i] for i in ix]) for r, ix in m.penalties]
            totals.append(torch.stack(terms).sum() if terms else zero)
        return torch.stack(totals)

    @torch.no_grad()
    def before_step(self, params: list[torch.Tensor], optimizer) -> None:
        """Between backward and the optimizer step, on each member's rows and their gradients (views of the stacked
        ones, ``optimizer.attach_grads``), in its single run's member order: regbench's weight decay (coupled:
        g ← g + wd·w; decoupled: w ← w·(1 − lr·wd) with the member's lr of this step), gradient clipping (torch's
        own clip_grad_norm_ / clip_grad_value_, through the member's optimizer as its single run calls it)."""
        if not any(m.hooks for m in self.members):
            return
        optimizer.attach_grads()
        for k, m in enumerate(self.members):
            for r, ix in m.hooks:
                opt = optimizer.optimizers[k]
                if r.name == "grad_clip":
                    r.before_step(None, opt, None)
                    continue
                rows = [optimizer.rows[k][i] for i in ix if optimizer.rows[k][i].grad is not None]
                if r.cfg.mode == "coupled":  # regularizers/weight_decay.py's rules, on the member's rows
                    torch._foreach_add_([w.grad for w in rows], rows, alpha=r.cfg.rate)
                else:
                    lr = opt.param_groups[0]["lr"]
                    torch._foreach_mul_([optimizer.rows[k][i] for i in ix], 1 - lr * r.cfg.rate)
