"""The regularizer stack: the members selected with ``regularizer=[...]``, applied in a fixed order.

Each member implements optional hooks of :class:`~regbench.regularizers.base.Regularizer`; the stack calls
them for the training loop. Members run in the order of :data:`ORDER`, never the command-line order, so
``regularizer=[l2,dropout]`` and ``regularizer=[dropout,l2]`` are the same run. Every module of this package
is imported here (its ``@register`` adds its members); a member registered but not in ``ORDER``, or named in
``ORDER`` but not registered, is an error at import.
"""

from __future__ import annotations

import importlib
import logging
import pkgutil
from typing import Any, Optional

import torch
from omegaconf import DictConfig
from torch import nn

from regbench.errors import ConfigError
from regbench.models import check_slots
from regbench.models.slots import LayerSlots
from regbench.regularizers.base import REGISTRY, Context, Regularizer, acts_in, overrides

log = logging.getLogger(__name__)

__all__ = ["ORDER", "REGISTRY", "Context", "Regularizer", "Stack", "build_stack", "rank"]

# The one order every hook runs in (setup, param groups, penalties summed, before_step, epoch ends, final
# evaluations), whatever the command-line order. Run folders are named by it (sweep_names.canonical_name) and
# bitwise tests pin it: moving a member changes what runs compute and where they are filed.
ORDER = [
    "transfer",  # first: loads the source weights and freezes layers before anyone selects trainable parameters
    "fine_tune",  # freezes the (loaded) base before the penalties and param groups look at requires_grad
    "elastic_net",  # the penalties select their parameters once freezing is done; their terms are summed in
    "l1",  # this order (floating-point sums depend on it); the three were tied and sorted by name
    "l2",
    "activity",  # a loss term on the layers' outputs (forward hooks), summed after the weight penalties; new
    "weight_decay",  # param groups of the trainable parameters; its coupled term reaches the gradient before
    #                  grad_clip clips it
    "dropout",  # model-shaping members (layer slots): independent of each other, kept where they were
    "stochastic_depth",  # the drop-path slot (model=resnet); new, so it moves no existing run
    "gaussian_noise",  # Keras' noise layers and DropBlock: more layer slots, independent of the others (each model
    "gaussian_dropout",  # fixes where its layers sit, whatever the order); new, so they move no existing run;
    "alpha_dropout",  # dropblock's on_epoch_end only sets its layers' rate for the next epoch
    "dropblock",
    "batchnorm",  # the three normalisations were tied and sorted by name (at most one is allowed)
    "group_norm",
    "layer_norm",
    "label_smoothing",  # a loss option only
    "grad_clip",  # last of the before_step hooks: clips the gradient every other member has finished
    "sam",  # the step's second pass: it runs before the gradient rules wherever it sits; new, so it moves no run
    "max_norm",  # Keras' kernel constraints (after_step): project the weights the optimizer stepped, before a
    "unit_norm",  # weight average reads them; at most one of the four in a run (Keras: one kernel_constraint)
    "non_neg",
    "min_max_norm",
    "weight_averaging",  # after every member acting on the step: its after_step averages the finished weights
    "early_stopping",  # ends training and restores the best weights before the final evaluations
    "mc_dropout",  # final evaluations last, on the restored model; test_extra lists them in this order
    "ensemble",
    "bagging",  # a run of its own kind (regbench.stacked.bagging); placed last, it changes no other member's order
]


def check_order(registered, order: list[str]) -> None:
    """Every registered member has exactly one place in ``order`` and every name there is registered."""
    problems = []
    unplaced = sorted(set(registered) - set(order))
    if unplaced:
        problems.append(f"registered but not placed: {', '.join(unplaced)} (add each to ORDER)")
    unknown = [n for n in order if n not in registered]
    if unknown:
        problems.append(f"placed but not registered: {', '.join(unknown)} (its module must @register it)")
    doubled = sorted({n for n in order if order.count(n) > 1})
    if doubled:
        problems.append(f"placed twice: {', '.join(doubled)}")
    if problems:
        raise RuntimeError("regbench.regularizers.ORDER does not match the registered members: " + "; ".join(problems))


def _import_members() -> None:
    """Import every module of this package: each ``@register``s its members (nothing else to list)."""
    for module in pkgutil.iter_modules(__path__):
        importlib.import_module(f"{__name__}.{module.name}")


_import_members()
check_order(REGISTRY, ORDER)
_RANK = {name: i for i, name in enumerate(ORDER)}


def rank(name: str) -> int:
    """A member's position in :data:`ORDER`."""
    return _RANK[name]


class Stack:
    def __init__(self, members: list[Regularizer], ctx: Context):
        self.members = sorted(members, key=lambda r: rank(r.name))
        self.ctx = ctx

    @property
    def names(self) -> list[str]:
        return [r.name for r in self.members]

    def __contains__(self, name: str) -> bool:
        return name in self.names

    def get(self, name: str) -> Optional[Regularizer]:
        return next((r for r in self.members if r.name == name), None)

    # --- construction ---------------------------------------------------------------------------
    def slots(self) -> LayerSlots:
        """The layer slots the members fill, checked against the model family (which refuses what it cannot
        apply); a slot filled by two members is an error."""
        slots = LayerSlots()
        for r in self.members:
            r.fill_slots(slots, self.ctx)
        check_slots(self.ctx.cfg.model, slots)
        return slots

    def setup(self, model: nn.Module) -> None:
        for r in self.members:
            r.setup(model, self.ctx)

    def param_groups(self, model: nn.Module, optimizer_cfg: DictConfig) -> list:
        groups = None
        for r in self.members:
            g = r.param_groups(model, optimizer_cfg, self.ctx)
            if g is not None:
                groups = g
        if groups is None:
            groups = [{"params": [p for p in model.parameters() if p.requires_grad]}]
        return [g for g in groups if g["params"]]

    # --- every step -----------------------------------------------------------------------------
    def penalty_fn(self):
        """A function model -> summed penalty, or None when no member adds one (keeps the loop lean)."""
        members = [r for r in self.members if acts_in(type(r), "penalty")]
        if not members:
            return None

        def penalty(model: nn.Module) -> Optional[torch.Tensor]:
            terms = [t for t in (r.penalty(model) for r in members) if t is not None]
            return torch.stack(terms).sum() if terms else None

        return penalty

    def loss_options(self) -> dict[str, Any]:
        options: dict[str, Any] = {}
        for r in self.members:
            options.update(r.loss_options())
        return options

    def before_step_fn(self):
        """A function (model, optimizer, scaler) run between backward and step, or None if nobody needs it."""
        members = [r for r in self.members if acts_in(type(r), "before_step")]
        if not members:
            return None
        unscale = any(getattr(r, "needs_unscaled_grads", False) for r in members)

        def before_step(model, optimizer, scaler) -> None:
            if scaler is not None and unscale:
                scaler.unscale_(optimizer)  # clip / decay the true gradients, not the loss-scaled ones
            for r in members:
                r.before_step(model, optimizer, scaler)

        return before_step

    def second_pass_fn(self):
        """The member's second pass (SAM) as (model, optimizer) -> undo, or None when no member takes one."""
        members = [r for r in self.members if overrides(type(r), "second_pass")]
        return members[0].second_pass if members else None

    def after_step_fn(self):
        """A function (model, optimizer) run after every optimizer step, or None if nobody needs it."""
        members = [r for r in self.members if overrides(type(r), "after_step")]
        if not members:
            return None

        def after_step(model, optimizer) -> None:
            for r in members:
                r.after_step(model, optimizer)

        return after_step

    def eval_model(self, model: nn.Module, train_x: torch.Tensor) -> nn.Module:
        """The model evaluations read: a member's (weight averaging's averaged model), else the trained one.
        ``train_x``: the training split's un-augmented inputs (see Regularizer.eval_model)."""
        for r in self.members:
            other = r.eval_model(model, train_x)
            if other is not None:
                return other
        return model

    def lr_schedule(self, epoch: int, optimizer: torch.optim.Optimizer, steps_per_epoch: int, default: Any) -> Any:
        """The learning-rate schedule stepped in epoch ``epoch``: a member's (SWA's SWALR), else ``default`` (the
        run's). Every member is asked at every epoch's start (see Regularizer.lr_schedule)."""
        given = [(r.name, s) for r in self.members
                 if (s := r.lr_schedule(epoch, optimizer, steps_per_epoch)) is not None]
        if len(given) > 1:
            raise RuntimeError(f"members {', '.join(n for n, _ in given)} each replace the learning-rate schedule")
        return given[0][1] if given else default

    # --- epochs ---------------------------------------------------------------------------------
    def on_epoch_end(self, epoch: int, row: dict, model: nn.Module) -> bool:
        stop = False
        for r in self.members:
            stop |= bool(r.on_epoch_end(epoch, row, model))
        return stop

    def on_train_end(self, model: nn.Module) -> None:
        for r in self.members:
            r.on_train_end(model, self.ctx)

    def final_evals(self, model: nn.Module, x: torch.Tensor, y: torch.Tensor, evaluate) -> dict[str, dict]:
        out = {}
        for r in self.members:
            result = r.final_eval(model, x, y, evaluate)
            if result is not None:
                out[r.name] = result
        return out

    def state_dict(self) -> dict[str, dict]:
        return {r.name: r.state_dict() for r in self.members}

    def load_state_dict(self, state: dict[str, dict]) -> None:
        for r in self.members:
            r.load_state_dict(state.get(r.name, {}))

    # --- facts -----------------------------------------------------------------------------------
    @property
    def stopped(self) -> bool:
        """True once a member asked training to stop (early stopping), also after a resume."""
        return any(r.stopped for r in self.members)

    def info(self) -> dict[str, dict]:
        """summary.json's ``regularizer_info``: each member's facts (members without any are left out)."""
        facts = {}
        for r in self.members:
            member_info = r.info()
            if member_info is not None:
                facts[r.name] = member_info
        return facts

    def log_info(self, model: nn.Module) -> None:
        """Each member's own log lines (what it applies to), once the model and optimizer exist."""
        for r in self.members:
            r.log_info(model)


def build_stack(cfg: DictConfig, ctx: Context) -> Stack:
    members = []
    for name in cfg.regularizer:
        if name not in REGISTRY:
            raise ConfigError("regularizer", name, "one of " + ", ".join(sorted(REGISTRY)))
        members.append(REGISTRY[name](cfg.regularizer[name]))
    stack = Stack(members, ctx)
    for hook in ("second_pass", "eval_model"):
        takers = [r.name for r in stack.members if overrides(type(r), hook)]
        if len(takers) > 1:
            raise ConfigError("regularizer", f"[{','.join(takers)}]", f"at most one of {', '.join(takers)} (each "
                              f"changes the {'step' if hook == 'second_pass' else 'evaluated model'} its own way)")
    for r in stack.members:
        r.check(ctx)
    stack.slots()  # the model refuses, before anything is built, the layers it has no place for
    return stack
