"""One stacked training step's objective and gradient rules, per member: the step-level regularizers of every
member (label smoothing, L1/L2/elastic-net penalties, regbench's own weight decay, gradient clipping) as
per-member tensors [K], so one batched expression serves members with different strengths.

A member without one of them gets its neutral value (α = 0, λ = 0, rate 0, no clipping); what a member cannot
have in a stack (another loss option, a penalty or gradient hook this module does not know) is refused by name.
The epoch-level members (early stopping, MC dropout, snapshot ensembles) run on each member's own model at the
epoch end (regbench.stacked.engine), unchanged.
"""

from __future__ import annotations

import math
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


def check_stackable(stack) -> None:
    """Refuse a member whose step-level behaviour the stacked step does not reproduce."""
    for r in stack.members:
        hooks = [h for h in _STEP_HOOKS
                 if getattr(type(r), h) is not getattr(Regularizer, h) and h not in _ALLOWED.get(r.name, ())]
        why = _NOT_STACKABLE.get(r.name) or (f"its {', '.join(hooks)} acts inside every step" if hooks else None)
        if why:
            raise RegbenchError(f"regularizer member '{r.name}' cannot be trained in a stack ({why}); fix: run it "
                                "with the basic launcher")


def _coefficients(r) -> tuple[float, float]:
    """(coefficient of Σ|w|, coefficient of Σw²) of a penalty member (its formulas: regularizers/penalties.py)."""
    lam = float(r.cfg.lam)
    if r.name == "l1":
        return lam, 0.0
    if r.name == "l2":
        return 0.0, lam * (0.5 if r.cfg.half else 1.0)
    return lam * r.cfg.ratio, lam * (1 - r.cfg.ratio) / 2


def _indices(params: list, slots: dict[int, int], what: str) -> tuple[int, ...]:
    try:
        return tuple(sorted(slots[id(p)] for p in params))
    except KeyError:
        raise RegbenchError(f"{what} applies to a parameter the stack does not train") from None


class StepRules:
    """The per-member loss, penalty and gradient rules of one stack (members in slot order)."""

    def __init__(self, stacks: list, member_params: list[list[torch.nn.Parameter]], device: torch.device):
        self.device = device
        K = len(stacks)
        slots = [{id(p): i for i, p in enumerate(ps)} for ps in member_params]
        for s in stacks:
            check_stackable(s)
        self.alpha = self._vec([float(s.loss_options().get("label_smoothing", 0.0)) for s in stacks])
        self.smoothing = bool((self.alpha > 0).any())
        self.penalties, self.has_penalty = self._penalties(stacks, slots, K)
        self.decay_mode, self.decay_idx, self.decay_rate = self._decay(stacks, slots)
        self.clip_norm, self.norm_type, self.clip_value = self._clips(stacks)

    def _vec(self, values: list[float]) -> torch.Tensor:
        return torch.tensor(values, dtype=torch.float32, device=self.device)

    def select(self, keep: list[int]) -> None:
        idx = torch.tensor(keep, device=self.device)
        self.alpha = self.alpha[idx]
        self.penalties = [(ix, a[idx], b[idx], ua, ub) for ix, a, b, ua, ub in self.penalties]
        self.has_penalty = [self.has_penalty[k] for k in keep]
        if self.decay_rate is not None:
            self.decay_rate = self.decay_rate[idx]
        if self.clip_norm is not None:
            self.clip_norm = self.clip_norm[idx]
        if self.clip_value is not None:
            self.clip_value = self.clip_value[idx]

    # ------------------------------------------------------------------------------------ set-up
    def _penalties(self, stacks, slots, K):
        """[(parameter indices, l1 coefficient [K], squared-sum coefficient [K])] grouped by the parameters each
        applies to; l1: λ·Σ|w|, l2: λ·Σw² (½λ with half), elastic net: λ·(r·Σ|w| + (1−r)/2·Σw²)."""
        terms: dict[tuple[int, ...], list[list[float]]] = {}
        has = [False] * K
        for k, s in enumerate(stacks):
            for r in s.members:
                if r.name not in ("l1", "l2", "elastic_net") or not r.params or r.cfg.lam == 0:
                    continue
                has[k] = True
                a, b = _coefficients(r)
                ix = _indices(r.params, slots[k], f"regularizer.{r.name}")
                coef = terms.setdefault(ix, [[0.0] * K, [0.0] * K])
                coef[0][k] += a
                coef[1][k] += b
        return [(list(ix), self._vec(a), self._vec(b), any(a), any(b)) for ix, (a, b) in terms.items()], has

    def _decay(self, stacks, slots):
        """regbench's own weight decay (where the optimizer does not do it: coupled with AdamW, decoupled with the
        others): (mode, parameter indices, rate [K]); the optimizer's own decay is a group hyperparameter."""
        modes, idx, rates = set(), set(), []
        for k, s in enumerate(stacks):
            r = s.get("weight_decay")
            manual = getattr(r, "manual", None) if r is not None else None
            if manual and r.cfg.rate != 0:
                modes.add(r.cfg.mode)
                idx.add(_indices(manual, slots[k], "regularizer.weight_decay"))
                rates.append(float(r.cfg.rate))
            else:
                rates.append(0.0)
        if not modes:
            return None, [], None
        if len(modes) > 1 or len(idx) > 1:
            raise RegbenchError("members of one stack apply regbench's weight decay differently "
                                "(regularizer.weight_decay.mode or exclude_bias_and_norm differ); fix: sweep them "
                                "in separate commands or with the basic launcher")
        return modes.pop(), list(idx.pop()), self._vec(rates)

    def _clips(self, stacks):
        norm, value, types = [], [], set()
        for s in stacks:
            r = s.get("grad_clip")
            on_norm = r is not None and r.cfg.mode == "norm"
            norm.append(float(r.cfg.max) if on_norm else math.inf)
            value.append(float(r.cfg.max) if r is not None and not on_norm else math.inf)
            if on_norm:
                types.add(float(r.cfg.norm_type))
        if len(types) > 1:
            raise RegbenchError("members of one stack clip with different regularizer.grad_clip.norm_type; fix: "
                                "sweep them in separate commands or with the basic launcher")
        return (self._vec(norm) if types else None, types.pop() if types else 2.0,
                self._vec(value) if any(math.isfinite(v) for v in value) else None)

    # ------------------------------------------------------------------------------------ per step
    def loss(self, logits: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        """Per-member mean cross-entropy [K] of logits [K, B, C] against labels [K, B] or soft targets [K, B, C],
        with each member's label smoothing α (torch's: (1−α)·CE + α·mean over classes of −log p)."""
        K, B, C = logits.shape
        if not self.smoothing and y.ndim == 2:
            return F.cross_entropy(logits.reshape(K * B, C), y.reshape(K * B), reduction="none").view(K, B).mean(1)
        logp = F.log_softmax(logits, dim=-1)
        nll = -(logp * y).sum(-1) if y.ndim == 3 else -logp.gather(-1, y.unsqueeze(-1)).squeeze(-1)
        if not self.smoothing:
            return nll.mean(1)
        a = self.alpha.view(K, 1)
        return ((1 - a) * nll + a * (-logp.mean(-1))).mean(1)

    def penalty(self, params: list[torch.Tensor]) -> Optional[torch.Tensor]:
        """Per-member penalty [K] (zeros for members without one), or None when no member has one."""
        total = None
        for ix, a, b, use_a, use_b in self.penalties:  # use_*: decided at set-up (no host sync per step)
            if use_a:
                s1 = torch.stack([params[i].abs().flatten(1).sum(1) for i in ix]).sum(0)
                total = a * s1 if total is None else total + a * s1
            if use_b:
                s2 = torch.stack([params[i].pow(2).flatten(1).sum(1) for i in ix]).sum(0)
                total = b * s2 if total is None else total + b * s2
        return total

    def before_step(self, params: list[torch.Tensor], optimizer) -> None:
        """Between backward and the optimizer step, on the stacked parameters [K, ...] and their gradients, in the
        single run's member order: regbench's weight decay, then gradient clipping."""
        from regbench.stacked.optim import clip_grad_norm_, clip_grad_value_

        if self.decay_mode is not None:
            ps = [params[i] for i in self.decay_idx if params[i].grad is not None]
            if self.decay_mode == "coupled":  # grad += wd·w
                for p in ps:
                    p.grad.add_(p.detach() * self.decay_rate.view(-1, *[1] * (p.ndim - 1)))
            else:  # decoupled: w ← w·(1 − lr·wd), this step's lr (the first group's, as the single run)
                factor = 1 - optimizer.hyper("lr", 0) * self.decay_rate
                with torch.no_grad():
                    for p in ps:
                        p.mul_(factor.view(-1, *[1] * (p.ndim - 1)))
        grads = [p.grad for p in params if p.grad is not None]
        if self.clip_norm is not None:
            clip_grad_norm_(grads, self.clip_norm, self.norm_type)
        if self.clip_value is not None:
            clip_grad_value_(grads, self.clip_value)
