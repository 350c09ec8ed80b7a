"""StackedOptimizer: every member's own torch optimizer, stepping that member's row of the stacked parameters.

The stacked parameters are leaves [K, ...]; row k of each (a contiguous view) IS member k's parameter for its
torch optimizer: the member's optimizer (built by regbench.optim from its config, fused where torch has it, its
param groups from the regularizer stack, its lr schedule attached) is re-pointed at those rows, and each step the
rows' gradients are views of the stacked gradients. So every member is updated by torch.optim's own code with its
own hyperparameters (different lr, momentum, betas, eps, weight decay per member need no rewritten update rule),
its state is torch's own (its state_dict() is an ordinary checkpoint; a resumed member's loaded state moves with
it), and the update is bitwise what that optimizer computes for those gradients (tests/test_stacked_optim.py).

While the members' hyperparameters agree (a seed sweep; a grid over regularizer strengths), one torch optimizer of
the same kind steps every member's rows at once: its groups hold all the members' rows, its state IS the members'
state (the same dicts), so a fused Adam is one kernel call over K·n tensors — each row updated exactly as in its
member's own call (torch's kernels treat each tensor of the list alone), unlike one optimizer over the stacked
leaves [K, ...], whose fused CPU kernel splits a tensor into SIMD blocks and a scalar tail by position, so an
element could take the other path than in its member's own tensor. Fused Adam/AdamW/SGD steps run as one direct
kernel call (regbench.fastoptim), as the single run's direct step does.
"""

from __future__ import annotations

from typing import Callable, Optional

import torch
from torch import nn

from regbench.fastoptim import direct_optimizer


def _stepper(opt: torch.optim.Optimizer) -> Callable[[], None]:
    """``opt.step()``, by one direct kernel call where regbench.fastoptim applies (bitwise the same)."""
    direct = direct_optimizer(opt)
    return direct if direct is not None else opt.step


class StackedOptimizer:
    def __init__(self, params: list[torch.Tensor], member_params: list[list[nn.Parameter]],
                 member_optimizers: list[torch.optim.Optimizer]):
        kinds = {type(o) for o in member_optimizers}
        if len(kinds) != 1:
            raise ValueError(f"the members of one stack use different optimizers: {sorted(c.__name__ for c in kinds)}")
        self.params, self.optimizers = list(params), list(member_optimizers)
        self.rows: list[list[torch.Tensor]] = []
        for k, (opt, own) in enumerate(zip(self.optimizers, member_params)):
            self.rows.append(self._repoint(opt, own, [p[k] for p in self.params], k))
        self.steppers = [_stepper(o) for o in self.optimizers]
        self.shared: Optional[torch.optim.Optimizer] = None
        self._share()

    # ------------------------------------------------------------------------------------ one optimizer for all
    def _hypers(self, opt: torch.optim.Optimizer) -> list[dict]:
        return [{k: v for k, v in g.items() if k != "params"} for g in opt.param_groups]

    def _share(self) -> None:
        """One optimizer over every member's rows while their hyperparameters agree (see the module's doc)."""
        first = self._hypers(self.optimizers[0])
        if any(self._hypers(o) != first for o in self.optimizers[1:]):
            return
        opt0 = self.optimizers[0]
        # Built over placeholders (torch refuses views as parameters), then given the rows, as _repoint does.
        shared = type(opt0)([{**h, "params": [self.params[0].new_empty(0).requires_grad_()]} for h in first])
        for j, group in enumerate(shared.param_groups):
            group["params"] = [r for o in self.optimizers for r in o.param_groups[j]["params"]]
        for o in self.optimizers:
            shared.state.update(o.state)  # the very state dicts: stepped in place, for both
        self.shared, self._shared_step = shared, _stepper(shared)

    def _unshare(self) -> None:
        """Every member's optimizer on its own again (the members' hyperparameters parted)."""
        for k in range(len(self.optimizers)):
            self.export_member(k)
        self.shared = None

    def export_member(self, k: int) -> None:
        """Member k's state complete in its own torch optimizer (its state_dict() is then an ordinary checkpoint):
        the states the shared optimizer created (at its first step) are linked in; the others already are."""
        if self.shared is None:
            return
        own = self.optimizers[k].state
        for r in self.rows[k]:
            if r not in own and r in self.shared.state:
                own[r] = self.shared.state[r]

    def _sync_shared(self) -> bool:
        """The shared optimizer takes this step's hyperparameters (the schedules moved the members' ones); False
        when the members' hyperparameters no longer agree."""
        first = self._hypers(self.optimizers[0])
        if any(self._hypers(o) != first for o in self.optimizers[1:]):
            return False
        for group, h in zip(self.shared.param_groups, first):
            group.update(h)
        return True

    @staticmethod
    def _repoint(opt: torch.optim.Optimizer, old: list[torch.Tensor], new: list[torch.Tensor], k: int) -> list:
        """Make ``opt`` step ``new`` where it stepped ``old`` (positionally matched), its state moving along."""
        where = {id(p): i for i, p in enumerate(old)}
        held = {id(p) for g in opt.param_groups for p in g["params"]}
        if held != set(where):
            raise ValueError(f"member {k}'s optimizer does not hold exactly its trainable parameters")
        for group in opt.param_groups:
            group["params"] = [new[where[id(p)]] for p in group["params"]]
        for p in old:
            if p in opt.state:
                opt.state[new[where[id(p)]]] = opt.state.pop(p)
        return new

    def zero_grad(self) -> None:
        for p in self.params:
            p.grad = None
        for rows in self.rows:
            for r in rows:
                r.grad = None

    def attach_grads(self) -> None:
        """Each member's rows get their gradients: views of the stacked leaves' gradients (row k)."""
        for i, p in enumerate(self.params):
            g = p.grad
            for k, rows in enumerate(self.rows):
                rows[i].grad = None if g is None else g[k]

    def step(self) -> None:
        self.attach_grads()
        if self.shared is not None:
            if self._sync_shared():
                self._shared_step()
                return
            self._unshare()
        for step in self.steppers:
            step()

    def select(self, keep: list[int], params: list[torch.Tensor]) -> None:
        """Keep these members; ``params``: the model's new stacked leaves (row j = member keep[j])."""
        if self.shared is not None:
            self._unshare()
        self.params = list(params)
        self.optimizers = [self.optimizers[k] for k in keep]
        self.rows = [self._repoint(opt, self.rows[k], [p[j] for p in self.params], k)
                     for j, (k, opt) in enumerate(zip(keep, self.optimizers))]
        self.steppers = [_stepper(o) for o in self.optimizers]
        self._share()
