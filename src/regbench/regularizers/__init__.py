"""The regularizer stack: the members selected with ``regularizer=[...]``, applied in a fixed order.

Each member implements optional hooks of :class:`~regbench.regularizers.base.Regularizer`; the stack calls
them for the training loop. Members run in their registry order (``order``), never the command-line order,
so ``regularizer=[l2,dropout]`` and ``regularizer=[dropout,l2]`` are the same run.
"""

from __future__ import annotations

import logging
from typing import Any, Optional

import torch
from omegaconf import DictConfig
from torch import nn

from regbench.errors import ConfigError
from regbench.regularizers import (  # noqa: F401  (each module registers its members)
    dropout, early_stopping, ensemble, grad_clip, label_smoothing, mc_dropout, norm, penalties, transfer,
    weight_decay)
from regbench.regularizers.base import REGISTRY, Context, Regularizer

log = logging.getLogger(__name__)

__all__ = ["REGISTRY", "Context", "Regularizer", "Stack", "build_stack"]


class Stack:
    def __init__(self, members: list[Regularizer], ctx: Context):
        self.members = sorted(members, key=lambda r: (r.order, r.name))
        self.ctx = ctx

    @property
    def names(self) -> list[str]:
        return [r.name for r in self.members]

    def __contains__(self, name: str) -> bool:
        return name in self.names

    def get(self, name: str) -> Optional[Regularizer]:
        return next((r for r in self.members if r.name == name), None)

    # --- construction ---------------------------------------------------------------------------
    def model_hooks(self) -> dict[str, Any]:
        hooks: dict[str, Any] = {}
        for r in self.members:
            for k, v in r.model_hooks(self.ctx).items():
                if k in hooks:
                    raise ConfigError("regularizer", self.names, f"members that configure different parts of the "
                                      f"model ('{k}' is set twice)")
                hooks[k] = v
        return hooks

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
        members = [r for r in self.members if type(r).penalty is not Regularizer.penalty]
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
        members = [r for r in self.members if type(r).before_step is not Regularizer.before_step]
        if not members:
            return None
        unscale = any(getattr(r, "needs_unscaled_grads", False) for r in members)

        def before_step(model, optimizer, scaler) -> None:
            if scaler is not None and unscale:
                scaler.unscale_(optimizer)  # clip / decay the true gradients, not the loss-scaled ones
            for r in members:
                r.before_step(model, optimizer, scaler)

        return before_step

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

    def collect_warnings(self, model: nn.Module) -> list[str]:
        """Combinations that are legal but probably not what the user meant; each printed once, saved in the run."""
        o = self.ctx.cfg.optimizer
        found = []
        wd = self.get("weight_decay")
        if o.name == "adam" and (o.weight_decay > 0 or (wd is not None and wd.cfg.mode == "coupled")):
            found.append("Adam with coupled weight decay is not AdamW: the decay term is divided by √v̂ like the "
                         "gradient; use optimizer=adamw or regularizer.weight_decay.mode=decoupled")
        for r in self.members:
            found.extend(r.warnings(self.members, self.ctx))
        leaves = [m for m in model.modules() if not list(m.children())]
        seen_dropout = False
        for m in leaves:
            if isinstance(m, (nn.Dropout, nn.Dropout2d)) and m.p > 0:
                seen_dropout = True
            elif seen_dropout and isinstance(m, nn.modules.batchnorm._BatchNorm):
                found.append("dropout placed before batch norm: BN's batch statistics in training see dropout's "
                             "variance, its running statistics at test time do not (variance shift)")
                break
        return found


def build_stack(cfg: DictConfig, ctx: Context) -> Stack:
    members = []
    for name in cfg.regularizer:
        if name not in REGISTRY:
            raise ConfigError("regularizer", name, "one of " + ", ".join(sorted(REGISTRY)))
        members.append(REGISTRY[name](cfg.regularizer[name]))
    stack = Stack(members, ctx)
    for r in stack.members:
        r.check(ctx)
    return stack
