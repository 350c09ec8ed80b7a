"""One stacked training step's objective and gradient rules, per member: the step-level regularizers of every
member (label smoothing, L1/L2/elastic-net penalties, regbench's own weight decay, gradient clipping), each computed
by the member's single-run formula on the member's own slice — its logits, its rows of the stacked parameters (row
k of a leaf [K, ...] is member k's parameter), their gradients — so every member gets bitwise what its single run
computes (a batched formula over [K, ...] sums in another order: one float32 ulp per step, which Adam's ε turns
into lr-sized steps for near-zero gradients and which grew to 7e-3 relative by epoch 5 in issue 25). The per-member
calls are small (a few per member and step) next to the members' matrix products.

Each rule is the member's own stacked form (regbench.regularizers.base: ``penalty_on``, ``grads_on``, its loss
options), the very method its single run calls on its own parameters; this module only maps each member's declared
parameter lists (``penalty_params``, ``grad_params``) to its rows and calls it, naming no member. A member that cannot
be in a stack (by its own declaration, or overriding a step hook without a stacked form) is refused. The
epoch-level members (early stopping, MC dropout, snapshot ensembles) run on each member's own model at the epoch
end (regbench.stacked.engine), unchanged.
"""

from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F

from regbench.errors import RegbenchError
from regbench.regularizers.base import acts_in, optimizer_params


def check_stackable(stack) -> None:
    """Refuse a member whose step-level behaviour the stacked step does not reproduce (its own declaration)."""
    for r in stack.members:
        why = type(r).stacking.refusal(type(r))
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
    stack's order, its gradient rules (regularizer, leaf indices; None: every parameter its optimizer steps) in
    the stack's order — as its single run's Stack.penalty_fn / before_step_fn call them."""

    def __init__(self, stack, slots: dict[int, int]):
        self.loss_options = stack.loss_options()
        self.penalties, self.rules = [], []
        for r in stack.members:
            if acts_in(type(r), "penalty") and (params := r.penalty_params()):  # none: it adds no term this run
                self.penalties.append((r, _indices(params, slots, r.key)))
            if acts_in(type(r), "before_step"):
                params = r.grad_params()
                if params is None or params:
                    self.rules.append((r, None if params is None else _indices(params, slots, r.key)))


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
        penalty_on(its rows) per penalty member, summed as its single run's penalty_fn sums them."""
        if not any(self.has_penalty):
            return None
        zero = torch.zeros((), device=self.device)
        totals = []
        for k, m in enumerate(self.members):
            # One view per leaf and member: its gradient terms add up in the order its single run's parameter's do.
            rows = {i: params[i][k] for _, ix in m.penalties for i in ix}
            terms = [r.penalty_on([rows[i] for i in ix]) for r, ix in m.penalties]
            totals.append(torch.stack(terms).sum() if terms else zero)
        return torch.stack(totals)

    @torch.no_grad()
    def before_step(self, params: list[torch.Tensor], optimizer) -> None:
        """Between backward and the optimizer step, on each member's rows and their gradients (views of the stacked
        ones, ``optimizer.attach_grads``), in its single run's member order: each member's grads_on (regbench's
        weight decay, gradient clipping...) with the member's own optimizer, re-pointed at its rows."""
        if not any(m.rules for m in self.members):
            return
        optimizer.attach_grads()
        for k, m in enumerate(self.members):
            opt, rows = optimizer.optimizers[k], optimizer.rows[k]
            for r, ix in m.rules:
                r.grads_on(optimizer_params(opt) if ix is None else [rows[i] for i in ix], opt)
