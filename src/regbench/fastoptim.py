"""The direct step's optimizer half (regbench.faststep): a fused Adam/AdamW (:class:`DirectAdam`) or SGD
(:class:`DirectSGD`) step on the CPU as one direct call of torch's kernel, bitwise equal to ``optimizer.step()``.

A fast path of regbench.speed ("direct optimizer step"): only on the torch versions it was tested on; its first
direct call is checked bit for bit against ``optimizer.step()``; any exception or mismatch turns it off for the
rest of the run (``optimizer.step()`` then, from the state before the failed call)."""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Optional

import torch
from torch.optim import optimizer as _optimizer_module  # the global step hooks

from regbench.speed import FastPath, failure, same_bits


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

    TENSORS = ("params", "exp_avgs", "exp_avg_sqs", "max_exp_avg_sqs", "steps")  # what a step updates

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

    TENSORS = ("params", "buffers")

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


def _copy(lists: "_AdamGroup | _SGDGroup") -> "_AdamGroup | _SGDGroup":
    """The group's lists with every tensor a step updates cloned (for the first direct call's check)."""
    return replace(lists, **{k: [t.detach().clone() for t in getattr(lists, k)] for k in lists.TENSORS})


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
        self.path = FastPath("direct optimizer step", "optimizer.step()")
        self.checked = False  # the first direct call was compared with optimizer.step() and agreed
        self.fused_checked = False  # torch's own first fused step was compared with its for-loop step

    def speed_paths(self) -> list[FastPath]:
        return [self.path]

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
        if not self.path.on:
            self.plain()
            return
        try:
            groups = self._lists() if self.applies() else None
            grads = [[p.grad for p in g.params] for g in groups] if groups is not None else None
        except Exception as e:  # noqa: BLE001 — torch's internals changed: its own step from now on
            self.path.off(failure(e))
            groups = None
        if groups is None or any(g is None or g.is_sparse for gs in grads for g in gs):
            self.plain()
            return
        if not self.checked:
            self._check(groups, grads)
            return
        if "step" in opt.__dict__:
            opt._opt_called = True  # what the LR scheduler's wrapper of step() notes
        done = 0
        try:
            with torch.no_grad():
                for done, (g, group_grads) in enumerate(zip(groups, grads)):
                    if g.params:
                        self.kernel(g, group_grads)
        except Exception as e:  # noqa: BLE001 — the groups not stepped yet by torch's own step
            self.path.off(failure(e))
            every = opt.param_groups
            opt.param_groups = every[done:]
            try:
                opt.step()
            finally:
                opt.param_groups = every

    def _check(self, groups: list, grads: list) -> None:
        """The first direct call: ``optimizer.step()`` steps the parameters, the kernel steps copies of them and
        their state; the direct call takes over only where every tensor agrees bit for bit."""
        copies = [_copy(g) for g in groups]
        grads = [[t.clone() for t in gs] for gs in grads]
        self.plain()
        if not self.path.on:  # torch's own fused step failed its check: the optimizer is unfused now
            return
        try:
            with torch.no_grad():
                for c, group_grads in zip(copies, grads):
                    if c.params:
                        self.kernel(c, group_grads)
            bad = next((f"{name} of parameter group {i}" for i, (c, g) in enumerate(zip(copies, groups))
                        for name in g.TENSORS
                        if not all(same_bits(a, b) for a, b in zip(getattr(c, name), getattr(g, name)))), None)
        except Exception as e:  # noqa: BLE001
            bad = None
            self.path.off(failure(e))
        if bad is not None:
            self.path.off(f"its first step differs from optimizer.step() in the {bad}")
        self.checked = self.path.on


    def plain(self) -> None:
        """``optimizer.step()``. Its first fused step (torch's fused kernels are the direct call's too) is checked
        against torch's default for-loop step on copies, to float rounding; where it raises or differs, the
        optimizer steps unfused (what ``trainer.fused=false`` runs) from the state before it, for the rest of
        the run."""
        opt, O = self.optimizer, _optimizer_module
        # (not under global step hooks: the check's own step would run them)
        if self.fused_checked or not any(g.get("fused") for g in opt.param_groups) or \
                getattr(O, "_global_optimizer_pre_hooks", None) or getattr(O, "_global_optimizer_post_hooks", None):
            opt.step()
            return
        self.fused_checked = True
        before = _snapshot(opt)
        try:
            opt.step()
            bad = _differs_from_for_loop(opt, before)
        except Exception as e:  # noqa: BLE001
            bad = f"raised {failure(e)}"
        if bad is None:
            return
        self.path.off(f"torch's fused optimizer step {bad}", plain="the unfused optimizer.step() "
                      "(trainer.fused=false's implementation)")
        self.path.key, self.path.impls, self.path.used = "optimizer_impl", ("fused", "for-loop"), True  # summary
        _restore(opt, before)
        for g in opt.param_groups:
            g["fused"] = False
        opt.step()


def _snapshot(opt: torch.optim.Optimizer) -> tuple[dict, dict]:
    """({parameter: a copy}, {parameter: a copy of its state}) of every parameter of ``opt``."""
    params = {p: p.detach().clone() for g in opt.param_groups for p in g["params"]}
    return params, {p: {k: v.clone() if isinstance(v, torch.Tensor) else v for k, v in s.items()}
                    for p, s in opt.state.items()}


def _restore(opt: torch.optim.Optimizer, before: tuple[dict, dict]) -> None:
    """Parameters and state as :func:`_snapshot` saw them (the state dicts themselves kept: a stack's members
    share them)."""
    params, states = before
    with torch.no_grad():
        for p, saved in params.items():
            p.copy_(saved)
    for p in [p for p in opt.state if p not in states]:
        del opt.state[p]
    for p, saved in states.items():
        live = opt.state[p]
        live.clear()
        live.update(saved)


def _differs_from_for_loop(opt: torch.optim.Optimizer, before: tuple[dict, dict]) -> Optional[str]:
    """None where ``opt``'s step just taken agrees, to float rounding, with torch's for-loop step of the same
    class and groups from the state ``before`` it; else what differs."""
    params, states = before
    copies = {p: params[p].clone().requires_grad_(p.requires_grad) for p in params}
    ref = type(opt)([{**{k: v for k, v in g.items() if k != "params"}, "fused": False, "foreach": False,
                      "params": [copies[p] for p in g["params"]]} for g in opt.param_groups])
    for p, c in copies.items():
        c.grad = None if p.grad is None else p.grad.clone()
        if p in states:
            ref.state[c] = {k: v.clone() if isinstance(v, torch.Tensor) else v for k, v in states[p].items()}
    ref.step()

    def close(a: torch.Tensor, b: torch.Tensor) -> bool:
        # Whole-tensor relative error: the fused and the for-loop kernels round differently, and one element whose
        # update nearly cancels (v̂ ≈ 0 next to ε, a learning rate near 0 at the end of a schedule) can differ by
        # far more than 1e-4 of itself while the tensor agrees to ~1e-7; a broken kernel (nothing updated,
        # garbage) is off by the update's whole size. A spurious failure here would switch the run to the
        # for-loop step and change its results, so the bound is the loose one.
        if a.shape != b.shape:
            return False
        a, b = a.detach().double(), b.detach().double()
        finite = torch.isfinite(b)
        if not torch.equal(torch.isfinite(a), finite):
            return False
        diff = torch.linalg.vector_norm((a - b)[finite])
        return bool(diff <= 1e-3 * torch.linalg.vector_norm(b[finite]) + 1e-30)
    for i, (p, c) in enumerate(copies.items()):
        if not close(p - params[p], c - params[p]):
            return f"moved parameter {i} otherwise than the for-loop step"
        for k, v in ref.state.get(c, {}).items():
            if isinstance(v, torch.Tensor) and not close(opt.state[p].get(k, torch.empty(0)), v):
                return f"left state {k!r} of parameter {i} otherwise than the for-loop step"
    return None


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
        kernel = torch._fused_adamw_ if group["decoupled_weight_decay"] else torch._fused_adam_
        torch._foreach_add_(g.steps, g.ones)
        try:
            kernel(g.params, grads, g.exp_avgs, g.exp_avg_sqs, g.max_exp_avg_sqs, g.steps,
                   amsgrad=group["amsgrad"], lr=group["lr"], beta1=group["betas"][0], beta2=group["betas"][1],
                   weight_decay=group["weight_decay"], eps=group["eps"], maximize=group["maximize"],
                   grad_scale=None, found_inf=None)
        except BaseException:
            torch._foreach_sub_(g.steps, g.ones)  # the counters as before (whole numbers: exact)
            raise


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
