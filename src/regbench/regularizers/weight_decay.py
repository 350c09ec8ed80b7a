"""Weight decay through optimizer parameter groups, coupled or decoupled, for any optimizer.

    decoupled: w ← w − lr·wd·w before each step (AdamW's rule; it follows the lr schedule)
    coupled:   g ← g + wd·w (torch's ``weight_decay``; in Adam it is then divided by √v̂, so not true decay)

Biases and other 1-D parameters (normalisation scales and shifts) are excluded by default — timm's and
nanoGPT's choice; torch applies ``weight_decay`` to every parameter. Where the optimizer implements the rule
itself (torch's coupled decay in SGD/Adam/RMSprop/Adagrad, AdamW's decoupled decay) its own code does the
work through the group's ``weight_decay``; otherwise the rule is applied here, on the same groups.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

import torch
from torch import nn

from regbench.errors import ConfigError
from regbench.regularizers.base import Context, Regularizer, Stacking, register

log = logging.getLogger(__name__)


@dataclass
class WeightDecayConfig:
    rate: float = 5e-4  # wd
    mode: str = "decoupled"  # decoupled | coupled
    exclude_bias_and_norm: bool = True  # leave biases and 1-D parameters undecayed


@register
class WeightDecay(Regularizer):
    name, schema = "weight_decay", WeightDecayConfig
    needs_unscaled_grads = True
    # The rate may differ per member of a stack (a run without the member has rate 0); how it applies is shared.
    # param_groups only splits the member's own optimizer's groups; grads_on takes its parameters or their rows.
    stacking = Stacking(shared=("mode", "exclude_bias_and_norm"), before_training=("param_groups",))

    def check(self, ctx: Context) -> None:
        if not self.cfg.rate >= 0:
            raise ConfigError(f"{self.key}.rate", self.cfg.rate, "a number >= 0")
        if self.cfg.mode not in ("decoupled", "coupled"):
            raise ConfigError(f"{self.key}.mode", self.cfg.mode, "decoupled or coupled")
        if ctx.cfg.optimizer.weight_decay != 0:
            raise ConfigError("optimizer.weight_decay", ctx.cfg.optimizer.weight_decay,
                              "0 when regularizer weight_decay is in the stack (it owns the decay)",
                              "add optimizer.weight_decay=0")

    def param_groups(self, model: nn.Module, optimizer_cfg, ctx: Context) -> list[dict]:
        decay, keep = [], []
        for _, p in model.named_parameters():
            if p.requires_grad:
                (decay if p.ndim >= 2 or not self.cfg.exclude_bias_and_norm else keep).append(p)
        if not decay:
            raise self.nothing("no trainable parameter to decay (the trainable ones are all biases or "
                               "normalisation parameters, which exclude_bias_and_norm=true leaves out)",
                               f"set {self.key}.exclude_bias_and_norm=false, unfreeze weights, or drop weight_decay")
        native = (self.cfg.mode == "coupled") != (optimizer_cfg.name == "adamw")  # the optimizer does it itself
        self.manual = [] if native else decay
        self.native, self.decay, self.keep = native, decay, keep
        groups = [{"params": decay, "weight_decay": self.cfg.rate if native else 0.0}]
        if keep:
            groups.append({"params": keep, "weight_decay": 0.0})
        return groups

    def info(self) -> dict:
        decay, keep = self.decay, self.keep
        return {
            "mode": self.cfg.mode, "rate": self.cfg.rate, "applied_by": "optimizer" if self.native else "regbench",
            "decayed_tensors": len(decay), "decayed_elements": sum(p.numel() for p in decay),
            "not_decayed_tensors": len(keep), "not_decayed_elements": sum(p.numel() for p in keep),
        }

    def log_info(self, model: nn.Module) -> None:
        i = self.info()
        log.info("weight decay (%s, %s): %s parameters in %d tensors decayed, %s in %d tensors not decayed",
                 i["mode"], i["applied_by"], f"{i['decayed_elements']:,}", i["decayed_tensors"],
                 f"{i['not_decayed_elements']:,}", i["not_decayed_tensors"])

    def grad_params(self) -> list[nn.Parameter]:
        """The parameters regbench decays itself (none where the optimizer's own code does: ``native``)."""
        return self.manual if self.cfg.rate != 0 else []

    @torch.no_grad()
    def grads_on(self, params: list[torch.Tensor], optimizer: torch.optim.Optimizer) -> None:
        if self.cfg.mode == "coupled":  # AdamW has no coupled mode: add wd·w to the gradient ourselves
            params = [p for p in params if p.grad is not None]
            torch._foreach_add_([p.grad for p in params], params, alpha=self.cfg.rate)
        else:  # decoupled for SGD/Adam/...: w ← w·(1 − lr·wd) with this step's lr, before the update (as AdamW)
            lr = optimizer.param_groups[0]["lr"]
            torch._foreach_mul_(params, 1 - lr * self.cfg.rate)
