"""The direct step's optimizer half (regbench.faststep): a fused Adam/AdamW (:class:`DirectAdam`) or SGD
(:class:`DirectSGD`) step on the CPU as one direct call of torch's kernel, bitwise equal to ``optimizer.step()``."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch
from torch.optim import optimizer as _optimizer_module  # the global step hooks


@dataclass
class _AdamGroup:
    """One parameter group's lists for the fused kernel, and the objects they were read from."""

    group: dict
    params: list
    states: list  # the state dicts
    exp_avgs: list
    exp_avg_sqs: list
    max_exp_avg_sqs: list
    steps: list
    ones: list  # +1 as one-tensors: foreach's CPU path converts a Scalar per tensor (~3x slower); the same sum

    @classmethod
    def of(cls, state: dict, group: dict) -> Optional["_AdamGroup"]:
        """The lists of ``group`` from the optimizer's ``state``; None while a parameter has no state yet (its first
        step creates it) or a tensor is not where the CPU kernel takes it."""
        params = list(group["params"])
        states = [state.get(p) for p in params]
        keys = ("step", "exp_avg", "exp_avg_sq") + (("max_exp_avg_sq",) if group["amsgrad"] else ())
        if any(not s or any(k not in s for k in keys) for s in states) or \
                any(p.device.type != "cpu" or p.dtype != torch.float32 for p in params):
            return None
        steps = [s["step"] for s in states]
        if any(t.dim() or t.device.type != "cpu" or t.dtype != steps[0].dtype for t in steps):
            return None
        return cls(group, params, states, [s["exp_avg"] for s in states], [s["exp_avg_sq"] for s in states],
                   [s["max_exp_avg_sq"] for s in states] if group["amsgrad"] else [], steps,
                   [torch.ones((), dtype=steps[0].dtype)] * len(steps) if steps else [])

    def current(self, state: dict, group: dict) -> bool:
        """Whether the lists still are the group's: the same group, parameters, state dicts and tensors."""
        params = group["params"]
        if group is not self.group or len(params) != len(self.params):
            return False
        amsgrad = group["amsgrad"]
        for j, p in enumerate(params):
            s = state.get(p)
            if p is not self.params[j] or s is not self.states[j] or s.get("step") is not self.steps[j] or \
                    s.get("exp_avg") is not self.exp_avgs[j] or s.get("exp_avg_sq") is not self.exp_avg_sqs[j] or \
                    (amsgrad and s.get("max_exp_avg_sq") is not self.max_exp_avg_sqs[j]) or \
                    (not amsgrad and self.max_exp_avg_sqs):
                return False
        return True


@dataclass
class _SGDGroup:
    """One SGD parameter group's lists for the fused kernel (momentum buffers only with momentum), and the
    objects they were read from."""

    group: dict
    params: list
    states: list  # the state dicts (with momentum)
    buffers: list

    @classmethod
    def of(cls, state: dict, group: dict) -> Optional["_SGDGroup"]:
        params = list(group["params"])
        if any(p.device.type != "cpu" or p.dtype != torch.float32 for p in params):
            return None
        if group["momentum"] == 0:  # torch keeps no state and passes no buffers
            return cls(group, params, [], [])
        states = [state.get(p) for p in params]
        if any(not s or not isinstance(s.get("momentum_buffer"), torch.Tensor) for s in states):
            return None
        return cls(group, params, states, [s["momentum_buffer"] for s in states])

    def current(self, state: dict, group: dict) -> bool:
        """Whether the lists still are the group's: the same group, parameters, momentum or not, state dicts and
        buffers."""
        params = group["params"]
        if group is not self.group or len(params) != len(self.params) or \
                (group["momentum"] == 0) != (not self.buffers and not self.states) or \
                any(p is not q for p, q in zip(params, self.params)):
            return False
        return all(state.get(p) is s and s.get("momentum_buffer") is b
                   for p, s, b in zip(params, self.states, self.buffers))


def direct_optimizer(optimizer: torch.optim.Optimizer) -> Optional["_Direct"]:
    """The direct step of ``optimizer``'s class, or None (then ``optimizer.step()`` always)."""
    if type(optimizer) in DirectAdam.classes:
        return DirectAdam(optimizer)
    if type(optimizer) in DirectSGD.classes:
        return DirectSGD(optimizer)
    return None


class _Direct:
    """``optimizer.step()`` as torch's own fused implementation makes it, without the Python around it: one
    kernel call per parameter group with the group's very arguments.

    Why by hand: at the lecture's batch 32 that Python (the step's profiler scope and hook loops, the
    per-parameter ``_init_group`` walk, grouping the tensors by device and dtype) costs more than the kernel
    itself (Adam: ~105 vs ~45 us per step on 2 cores, docs/benchmarks.md). The update is the same kernel on the
    same tensors, so bitwise equal (tests/test_faststep.py). ``optimizer.step()`` itself runs whenever this does
    not apply: another optimizer or implementation, step hooks, a step wrapped by anything but torch's LR
    scheduler, AMP's grad scale, capturable/differentiable groups, tensor hyper-parameters, a parameter without
    state yet (its first step initialises it) or without a gradient."""

    classes: tuple = ()

    def __init__(self, optimizer: torch.optim.Optimizer):
        self.optimizer = optimizer
        self._cache: list = []  # per parameter group: its lists as of the last step

    def applies(self) -> bool:
        """Whether the optimizer as a whole allows the direct call (its groups are checked by ``_lists``)."""
        opt, O = self.optimizer, _optimizer_module
        if type(opt) not in self.classes or opt._optimizer_step_pre_hooks or \
                opt._optimizer_step_post_hooks or O._global_optimizer_pre_hooks or O._global_optimizer_post_hooks:
            return False
        wrapped = opt.__dict__.get("step")  # an LR scheduler wraps it to note that step() was called
        # (the class's step: torch wraps AdamW's own when an AdamW is the first of the two built in a process)
        if wrapped is not None and not (getattr(wrapped, "_wrapped_by_lr_sched", False)
                                        and getattr(wrapped, "__wrapped__", None) is type(opt).step):
            return False
        return getattr(opt, "grad_scale", None) is None and getattr(opt, "found_inf", None) is None

    def _lists(self) -> Optional[list]:
        """Every group's tensor lists as they are now, or None where a group does not fit. Checked at every step
        against the optimizer's own objects (a group's flags, its parameters, each state dict and its tensors:
        ~3 us), so nothing replaced since — load_state_dict, a cleared or edited state, other parameters — is
        ever stepped from a stale list."""
        opt, groups = self.optimizer, []
        if len(self._cache) != len(opt.param_groups):
            self._cache = [None] * len(opt.param_groups)
        for i, group in enumerate(opt.param_groups):
            if not group.get("fused") or group.get("capturable") or group.get("differentiable") or \
                    type(group["lr"]) is not float or not self.fits(group):
                return None
            cached = self._cache[i]
            if cached is None or not cached.current(opt.state, group):
                cached = self._cache[i] = self.lists.of(opt.state, group)
                if cached is None:
                    return None
            groups.append(cached)
        return groups

    def __call__(self) -> None:
        opt = self.optimizer
        groups = self._lists() if self.applies() else None
        grads = [[p.grad for p in g.params] for g in groups] if groups is not None else None
        if groups is None or any(g is None or g.is_sparse for gs in grads for g in gs):
            opt.step()
            return
        if "step" in opt.__dict__:
            opt._opt_called = True  # what the LR scheduler's wrapper of step() notes
        with torch.no_grad():
            for g, group_grads in zip(groups, grads):
                if g.params:
                    self.kernel(g, group_grads)


class DirectAdam(_Direct):
    """Adam / AdamW as torch's ``_fused_adam`` steps them: the step counters +1, then ``torch._fused_adam_``
    (``_fused_adamw_`` with decoupled decay)."""

    classes = (torch.optim.Adam, torch.optim.AdamW)

    lists = _AdamGroup  # a group's tensor lists

    @staticmethod
    def fits(group: dict) -> bool:
        return all(type(b) is float for b in group["betas"])

    @staticmethod
    def kernel(g: "_AdamGroup", grads: list) -> None:
        group = g.group
        torch._foreach_add_(g.steps, g.ones)
        kernel = torch._fused_adamw_ if group["decoupled_weight_decay"] else torch._fused_adam_
        kernel(g.params, grads, g.exp_avgs, g.exp_avg_sqs, g.max_exp_avg_sqs, g.steps,
               amsgrad=group["amsgrad"], lr=group["lr"], beta1=group["betas"][0], beta2=group["betas"][1],
               weight_decay=group["weight_decay"], eps=group["eps"], maximize=group["maximize"],
               grad_scale=None, found_inf=None)


class DirectSGD(_Direct):
    """SGD (plain, momentum, Nesterov) as torch's ``_fused_sgd`` steps it once the momentum buffers exist (its
    first step, which creates them, is ``optimizer.step()``'s): one ``torch._fused_sgd_`` per group."""

    classes = (torch.optim.SGD,)

    lists = _SGDGroup

    @staticmethod
    def fits(group: dict) -> bool:
        return all(type(group[k]) in (float, int) for k in ("momentum", "dampening", "weight_decay"))

    @staticmethod
    def kernel(g: "_SGDGroup", grads: list) -> None:
        group = g.group
        torch._fused_sgd_(g.params, grads, g.buffers, weight_decay=group["weight_decay"],
                          momentum=group["momentum"], lr=group["lr"], dampening=group["dampening"],
                          nesterov=group["nesterov"], maximize=group["maximize"], is_first_step=False,
                          grad_scale=None, found_inf=None)
