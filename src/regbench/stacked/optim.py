"""StackedOptimizer: every member's own torch optimizer, stepping that member's row of the stacked parameters.

The stacked parameters are leaves [K, ...]; row k of each (a contiguous view) IS member k's parameter for its
torch optimizer: the member's optimizer (built by regbench.optim from its config, fused where torch has it, its
param groups from the regularizer stack, its lr schedule attached) is re-pointed at those rows, and each step the
rows' gradients are views of the stacked gradients. So every member is updated by torch.optim's own code with its
own hyperparameters (different lr, momentum, betas, eps, weight decay per member need no rewritten update rule),
its state is torch's own (its state_dict() is an ordinary checkpoint; a resumed member's loaded state moves with
it), and the update is bitwise what that optimizer computes for those gradients (tests/test_stacked_optim.py).

Measured against a vectorised rewrite of the rules over the member dimension (one elementwise op over [K, ...] per
term): the rewrite costs about a dozen memory passes per step where torch's fused Adam makes one per member, and was
slower on 2 CPU cores (0.25 vs 0.09 s per epoch for 8 lecture MLPs).
"""

from __future__ import annotations

import math
from typing import Optional

import torch
from torch import nn


def _value(group: dict, key: str) -> float:
    if key.startswith("beta"):
        return float(group["betas"][int(key[-1]) - 1])
    return float(group[key])


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
        self.shared: Optional[torch.optim.Optimizer] = None
        self._share()

    # ------------------------------------------------------------------------------------ one optimizer for all
    def _hypers(self, opt: torch.optim.Optimizer) -> list[dict]:
        return [{k: v for k, v in g.items() if k != "params"} for g in opt.param_groups]

    def _share(self) -> None:
        """While every member's optimizer has the same hyperparameters (a seed sweep; a grid over regularizer
        strengths), one torch optimizer of the same kind steps the stacked leaves themselves: the same elementwise
        update for every row, one call instead of K (equal to each member's own optimizer to float rounding, not
        bitwise: the fused CPU kernels treat an element by its position — SIMD block or scalar tail). Its state
        rows are the members' states (moved in here; handed back at :meth:`export_member` and when the members'
        hyperparameters part, e.g. a member-specific schedule)."""
        first = self._hypers(self.optimizers[0])
        if any(self._hypers(o) != first for o in self.optimizers[1:]):
            return
        opt0 = self.optimizers[0]
        where = {id(r): i for i, r in enumerate(self.rows[0])}
        groups = [{**h, "params": [self.params[where[id(r)]] for r in g["params"]]}
                  for h, g in zip(first, opt0.param_groups)]
        shared = type(opt0)(groups)
        for i, p in enumerate(self.params):
            states = [o.state.get(rows[i]) for o, rows in zip(self.optimizers, self.rows)]
            if all(states):
                shared.state[p] = {key: (torch.stack([s[key] for s in states]) if _is_row(states[0][key], p)
                                         else states[0][key].clone()) for key in states[0]}
            for o, rows in zip(self.optimizers, self.rows):
                o.state.pop(rows[i], None)
        self.shared = shared

    def _unshare(self) -> None:
        """Hand every member its state rows back (the members' hyperparameters parted)."""
        for k in range(len(self.optimizers)):
            self.export_member(k)
        self.shared = None

    def export_member(self, k: int) -> None:
        """Member k's state into its own torch optimizer, in torch's format (its state_dict() is then an ordinary
        checkpoint); a no-op while each member's optimizer steps its own row."""
        if self.shared is None:
            return
        opt, rows = self.optimizers[k], self.rows[k]
        for i, p in enumerate(self.params):
            st = self.shared.state.get(p)
            if st:
                opt.state[rows[i]] = {key: (v[k].clone() if _is_stacked(v, p) else v.clone() if torch.is_tensor(v)
                                            else v) for key, v in st.items()}

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

    def hyper(self, key: str, group: int = 0) -> torch.Tensor:
        """Every member's current ``key`` of ``group`` (e.g. this step's lr): a tensor [K]."""
        return torch.tensor([_value(o.param_groups[group], key) for o in self.optimizers],
                            dtype=self.params[0].dtype, device=self.params[0].device)

    def zero_grad(self) -> None:
        for p in self.params:
            p.grad = None
        for rows in self.rows:
            for r in rows:
                r.grad = None

    def step(self) -> None:
        if self.shared is not None:
            if self._sync_shared():
                self.shared.step()
                return
            self._unshare()
        for i, p in enumerate(self.params):
            if p.grad is None:
                continue
            for k, rows in enumerate(self.rows):
                rows[i].grad = p.grad[k]
        for opt in self.optimizers:
            opt.step()

    def select(self, keep: list[int], params: list[torch.Tensor]) -> None:
        """Keep these members; ``params``: the model's new stacked leaves (row j = member keep[j])."""
        if self.shared is not None:
            self._unshare()
        self.params = list(params)
        self.optimizers = [self.optimizers[k] for k in keep]
        self.rows = [self._repoint(opt, self.rows[k], [p[j] for p in self.params], k)
                     for j, (k, opt) in enumerate(zip(keep, self.optimizers))]
        self._share()


def _is_row(value, stacked: torch.Tensor) -> bool:
    """A state entry with one value per parameter entry (exp_avg, momentum_buffer...), not a scalar (step)."""
    return torch.is_tensor(value) and value.ndim > 0 and tuple(value.shape) == tuple(stacked.shape[1:])


def _is_stacked(value, stacked: torch.Tensor) -> bool:
    return torch.is_tensor(value) and tuple(value.shape) == tuple(stacked.shape)


def _per_member(x: torch.Tensor, ndim: int) -> torch.Tensor:
    return x.view(-1, *[1] * (ndim - 1))


@torch.no_grad()
def clip_grad_norm_(grads: list[torch.Tensor], max_norm: torch.Tensor, norm_type: float) -> torch.Tensor:
    """torch.nn.utils.clip_grad_norm_ applied to each member's own gradients (``grads``: [K, ...] tensors, e.g. the
    flat leaf's gradient): per member the total norm over all of them, and the same clip coefficient
    max / (norm + 1e-6), capped at 1. Returns the norms [K]."""
    if math.isinf(norm_type):
        norms = torch.stack([g.abs().flatten(1).amax(1) for g in grads]).amax(0)
    else:
        norms = torch.linalg.vector_norm(
            torch.stack([torch.linalg.vector_norm(g.flatten(1), norm_type, dim=1) for g in grads]), norm_type, dim=0)
    coef = torch.clamp(max_norm / (norms + 1e-6), max=1.0)
    for g in grads:
        g.mul_(_per_member(coef, g.ndim))
    return norms


@torch.no_grad()
def clip_grad_value_(grads: list[torch.Tensor], clip: torch.Tensor) -> None:
    """torch.nn.utils.clip_grad_value_ per member: each member's gradient entries clamped to [−clip_k, clip_k]."""
    for g in grads:
        c = _per_member(clip, g.ndim)
        torch.maximum(g, -c, out=g)
        torch.minimum(g, c, out=g)
