"""StackedOptimizer: torch.optim's update rules vectorised over the member dimension, with per-member
hyperparameters.

torch.optim cannot take a different lr / momentum / betas / eps / weight decay per slice of one tensor, so the
rules of SGD (momentum, dampening, Nesterov), Adagrad, RMSprop (centered, momentum), Adam and AdamW (AMSGrad) are
written here once more, as torch's single-tensor implementations compute them, with each hyperparameter a tensor
[K, 1, ...] broadcast over the stacked parameters [K, ...]. The hyperparameters are read every step from the
members' own torch optimizers (never stepped themselves): their lr schedulers move lr (and OneCycleLR momentum /
betas) exactly as in a single run. Each member's state can be written into its torch optimizer in torch's own
format (``export_member``) and read back (``import_member``): member checkpoints are ordinary checkpoints.
"""

from __future__ import annotations

import math
from typing import Optional

import torch
from torch import nn

# hyperparameters each optimizer reads per group (the rest of a group's keys are flags that must agree)
_HYPER = {
    torch.optim.SGD: ("lr", "momentum", "dampening", "weight_decay"),
    torch.optim.Adagrad: ("lr", "lr_decay", "eps", "weight_decay", "initial_accumulator_value"),
    torch.optim.RMSprop: ("lr", "alpha", "eps", "momentum", "weight_decay"),
    torch.optim.Adam: ("lr", "beta1", "beta2", "eps", "weight_decay"),
    torch.optim.AdamW: ("lr", "beta1", "beta2", "eps", "weight_decay"),
}
_FLAGS = {torch.optim.SGD: ("nesterov", "maximize"), torch.optim.Adagrad: ("maximize",),
          torch.optim.RMSprop: ("centered", "maximize"), torch.optim.Adam: ("amsgrad", "maximize"),
          torch.optim.AdamW: ("amsgrad", "maximize")}


def _value(group: dict, key: str) -> float:
    if key.startswith("beta"):
        return float(group["betas"][int(key[-1]) - 1])
    return float(group[key])


class StackedOptimizer:
    def __init__(self, params: list[torch.Tensor], member_params: list[list[nn.Parameter]],
                 member_optimizers: list[torch.optim.Optimizer]):
        kinds = {type(o) for o in member_optimizers}
        if len(kinds) != 1 or next(iter(kinds)) not in _HYPER:
            raise ValueError(f"a stack needs one optimizer kind of {[c.__name__ for c in _HYPER]}, got "
                             f"{sorted(c.__name__ for c in kinds)}")
        self.kind = kinds.pop()
        self.params, self.member_params, self.optimizers = list(params), member_params, list(member_optimizers)
        self.groups = self._group_of_params()
        self.n_groups = len(self.optimizers[0].param_groups)
        self.flags = self._flags()
        self.step_count = 0
        self._hyper: dict[tuple[int, str], torch.Tensor] = {}
        self._hyper_values: dict[tuple[int, str], tuple] = {}
        self.state: list[dict[str, Optional[torch.Tensor]]] = [self._fresh(i) for i in range(len(self.params))]

    # ------------------------------------------------------------------------------------ set-up
    def _group_of_params(self) -> list[int]:
        """The group index of every stacked parameter: the same in every member's optimizer."""
        groups = None
        for k, (opt, ps) in enumerate(zip(self.optimizers, self.member_params)):
            where = {id(p): g for g, group in enumerate(opt.param_groups) for p in group["params"]}
            mine = [where.get(id(p)) for p in ps]
            if None in mine:
                raise ValueError(f"member {k}'s optimizer does not hold every trainable parameter")
            if groups is not None and (mine != groups or len(opt.param_groups) != len(self.optimizers[0].param_groups)):
                raise ValueError(f"member {k}'s optimizer groups its parameters otherwise than member 0 (e.g. "
                                 "regularizer=[weight_decay] in one member only)")
            groups = mine
        return groups

    def _flags(self) -> dict[str, bool]:
        flags = {}
        for key in _FLAGS[self.kind]:
            values = {bool(g.get(key, False)) for o in self.optimizers for g in o.param_groups}
            if len(values) > 1:
                raise ValueError(f"members differ in optimizer flag {key}")
            flags[key] = values.pop()
        if flags.get("maximize"):
            raise ValueError("maximize=True is not supported in a stack")
        return flags

    def _fresh(self, i: int) -> dict[str, Optional[torch.Tensor]]:
        p = self.params[i]
        z = lambda: torch.zeros_like(p, memory_format=torch.preserve_format)  # noqa: E731
        if self.kind in (torch.optim.Adam, torch.optim.AdamW):
            return {"exp_avg": z(), "exp_avg_sq": z(), "max_exp_avg_sq": z() if self.flags["amsgrad"] else None}
        if self.kind is torch.optim.SGD:
            return {"momentum_buffer": None}
        if self.kind is torch.optim.Adagrad:
            init = self.hyper("initial_accumulator_value", self.groups[i])
            return {"sum": z().add_(init.view(-1, *[1] * (p.ndim - 1)))}
        return {"square_avg": z(), "momentum_buffer": z(), "grad_avg": z() if self.flags["centered"] else None}

    # ------------------------------------------------------------------------------------ hyperparameters
    def hyper(self, key: str, group: int = 0) -> torch.Tensor:
        """Every member's current value of ``key`` in ``group``: a tensor [K] (made anew only when one changed)."""
        values = tuple(_value(o.param_groups[group], key) for o in self.optimizers)
        if self._hyper_values.get((group, key)) != values:
            self._hyper[(group, key)] = torch.tensor(values, dtype=self.params[0].dtype, device=self.params[0].device)
            self._hyper_values[(group, key)] = values
        return self._hyper[(group, key)]

    def _h(self, key: str, group: int, ndim: int) -> torch.Tensor:
        return self.hyper(key, group).view(-1, *[1] * (ndim - 1))

    # ------------------------------------------------------------------------------------ the step
    def zero_grad(self) -> None:
        for p in self.params:
            p.grad = None

    @torch.no_grad()
    def step(self) -> None:
        self.step_count += 1
        rule = {torch.optim.SGD: self._sgd, torch.optim.Adagrad: self._adagrad, torch.optim.RMSprop: self._rmsprop,
                torch.optim.Adam: self._adam, torch.optim.AdamW: self._adam}[self.kind]
        for i, p in enumerate(self.params):
            if p.grad is not None:
                rule(p, p.grad, self.state[i], self.groups[i])

    def _decayed(self, p, grad, g):
        """Coupled weight decay: grad + wd·w (skipped when no member decays this group)."""
        if not any(self._values("weight_decay", g)):
            return grad
        return grad.add(p * self._h("weight_decay", g, p.ndim))

    def _sgd(self, p, grad, s, g):
        h = lambda key: self._h(key, g, p.ndim)  # noqa: E731
        grad = self._decayed(p, grad, g)
        if any(v != 0 for v in self._values("momentum", g)):
            if s["momentum_buffer"] is None:
                s["momentum_buffer"] = grad.clone()
            else:
                s["momentum_buffer"].mul_(h("momentum")).add_(grad * (1 - h("dampening")))
            buf = s["momentum_buffer"]
            grad = grad.add(buf * h("momentum")) if self.flags["nesterov"] else buf
        p.sub_(grad * h("lr"))

    def _adagrad(self, p, grad, s, g):
        h = lambda key: self._h(key, g, p.ndim)  # noqa: E731
        grad = self._decayed(p, grad, g)
        clr = h("lr") / (1 + (self.step_count - 1) * h("lr_decay"))
        s["sum"].addcmul_(grad, grad)
        std = s["sum"].sqrt().add_(h("eps"))
        p.sub_(grad / std * clr)

    def _rmsprop(self, p, grad, s, g):
        h = lambda key: self._h(key, g, p.ndim)  # noqa: E731
        grad = self._decayed(p, grad, g)
        alpha = h("alpha")
        s["square_avg"].mul_(alpha).add_(grad * grad * (1 - alpha))
        if self.flags["centered"]:
            s["grad_avg"].lerp_(grad, 1 - alpha)
            avg = s["square_avg"].addcmul(s["grad_avg"], s["grad_avg"], value=-1).sqrt_()
        else:
            avg = s["square_avg"].sqrt()
        avg = avg.add_(h("eps"))
        if any(v != 0 for v in self._values("momentum", g)):
            s["momentum_buffer"].mul_(h("momentum")).add_(grad / avg)
            p.sub_(s["momentum_buffer"] * h("lr"))
        else:
            p.sub_(grad / avg * h("lr"))

    def _adam(self, p, grad, s, g):
        h = lambda key: self._h(key, g, p.ndim)  # noqa: E731
        lr, b1, b2 = h("lr"), h("beta1"), h("beta2")
        if self.kind is torch.optim.AdamW:
            p.mul_(1 - lr * h("weight_decay"))
        else:
            grad = self._decayed(p, grad, g)
        s["exp_avg"].lerp_(grad, 1 - b1)
        s["exp_avg_sq"].mul_(b2).addcmul_(grad, grad * (1 - b2))
        bc1, bc2 = 1 - b1 ** self.step_count, 1 - b2 ** self.step_count
        if self.flags["amsgrad"]:
            torch.maximum(s["max_exp_avg_sq"], s["exp_avg_sq"], out=s["max_exp_avg_sq"])
            second = s["max_exp_avg_sq"]
        else:
            second = s["exp_avg_sq"]
        denom = (second.sqrt() / bc2.sqrt()).add_(h("eps"))
        p.sub_(s["exp_avg"] / denom * (lr / bc1))

    def _values(self, key: str, g: int) -> tuple:
        self.hyper(key, g)
        return self._hyper_values[(g, key)]

    # ------------------------------------------------------------------------------------ members
    def export_member(self, k: int) -> None:
        """Member k's state into its torch optimizer, in torch's format (its state_dict() is then a checkpoint
        torch.optim itself resumes from)."""
        opt = self.optimizers[k]
        for i, p in enumerate(self.member_params[k]):
            if self.step_count == 0 or (self.kind is torch.optim.SGD and
                                        self._values("momentum", self.groups[i])[k] == 0):
                opt.state.pop(p, None)  # torch keeps no state for it yet / for plain SGD
                continue
            opt.state[p] = self._torch_state(i, k, p)

    def _torch_state(self, i: int, k: int, p: torch.Tensor) -> dict:
        s, g = self.state[i], self.groups[i]
        step = torch.tensor(float(self.step_count), dtype=torch.float32,
                            device=p.device if self._step_on_device(k) else "cpu")
        take = lambda t: None if t is None else t[k].detach().clone()  # noqa: E731
        if self.kind is torch.optim.SGD:
            momentum = self._values("momentum", g)[k]
            return {"momentum_buffer": take(s["momentum_buffer"]) if momentum != 0 else None}
        if self.kind is torch.optim.Adagrad:
            return {"step": step, "sum": take(s["sum"])}
        if self.kind is torch.optim.RMSprop:
            out = {"step": step, "square_avg": take(s["square_avg"])}
            if self._values("momentum", g)[k] > 0:
                out["momentum_buffer"] = take(s["momentum_buffer"])
            if self.flags["centered"]:
                out["grad_avg"] = take(s["grad_avg"])
            return out
        out = {"step": step, "exp_avg": take(s["exp_avg"]), "exp_avg_sq": take(s["exp_avg_sq"])}
        if self.flags["amsgrad"]:
            out["max_exp_avg_sq"] = take(s["max_exp_avg_sq"])
        return out

    def _step_on_device(self, k: int) -> bool:
        group = self.optimizers[k].param_groups[0]
        return bool(group.get("fused") or group.get("capturable"))

    @torch.no_grad()
    def import_member(self, k: int) -> None:
        """Member k's torch optimizer state (e.g. loaded from its checkpoint) into slot k; nothing when it has none."""
        opt = self.optimizers[k]
        for i, p in enumerate(self.member_params[k]):
            st = opt.state.get(p)
            if not st:
                continue
            if "step" in st:
                self.step_count = int(float(st["step"]))
            for key, value in st.items():
                if key == "step" or value is None:
                    continue
                if self.state[i].get(key) is None:
                    self.state[i][key] = torch.zeros_like(self.params[i])
                self.state[i][key][k].copy_(value)
            if self.kind is torch.optim.SGD and st.get("momentum_buffer") is not None:
                self.step_count = max(self.step_count, 1)

    def select(self, keep: list[int], params: list[torch.Tensor]) -> None:
        idx = torch.tensor(keep, device=params[0].device)
        self.params = list(params)
        self.member_params = [self.member_params[k] for k in keep]
        self.optimizers = [self.optimizers[k] for k in keep]
        self.state = [{key: None if v is None else v[idx].clone() for key, v in s.items()} for s in self.state]
        self._hyper, self._hyper_values = {}, {}


def _per_member(x: torch.Tensor, ndim: int) -> torch.Tensor:
    return x.view(-1, *[1] * (ndim - 1))


@torch.no_grad()
def clip_grad_norm_(params: list[torch.Tensor], max_norm: torch.Tensor, norm_type: float) -> torch.Tensor:
    """torch.nn.utils.clip_grad_norm_ applied to each member's own gradients: per member [K] total norms."""
    grads = [p.grad for p in params if p.grad is not None]
    if not grads:
        return torch.zeros_like(max_norm)
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
def clip_grad_value_(params: list[torch.Tensor], clip: torch.Tensor) -> None:
    """torch.nn.utils.clip_grad_value_ per member: each member's gradient entries clamped to [−clip_k, clip_k]."""
    for p in params:
        if p.grad is not None:
            c = _per_member(clip, p.grad.ndim)
            torch.maximum(p.grad, -c, out=p.grad)
            torch.minimum(p.grad, c, out=p.grad)
