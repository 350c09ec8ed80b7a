"""Sharpness-aware minimization (SAM, Foret et al. 2021) and its adaptive form (ASAM, Kwon et al. 2021): a
two-pass step around the configured optimizer, as the reference implementation davda54/sam (sam.py, example/train.py,
example/utility/bypass_bn.py) takes it.

Each step (``second_pass``, called by the training step after the first backward; regbench.loop.AutogradStep):

1. g = ∇L(w), the first pass's gradient of the objective (the loss plus the members' penalties);
2. e(w) = ρ · g / (‖g‖₂ + 1e-12), the norm taken over every parameter the optimizer steps that has a gradient,
   as one vector; ASAM: e(w) = ρ · T² g / (‖T g‖₂ + 1e-12) with T = |w| elementwise (the reference's
   ``(torch.pow(p, 2) if adaptive else 1.0) * p.grad * scale`` and ``((torch.abs(p) if adaptive else 1.0) *
   p.grad).norm(p=2)``);
3. w ← w + e(w); the step recomputes the objective and its gradient on the same batch there (dropout and other
   random layers draw new masks: two independent draws per step, as the reference's two forward passes);
4. the undo puts back the saved weights (bitwise, as the reference's ``p.data = old_p``), and the step goes on
   with the second pass's gradient: the gradient rules (grad_clip, decoupled decay), then the optimizer's step.

BatchNorm (every torch ``_BatchNorm``): its running statistics are updated by the first pass only. The reference's
bypass_bn sets momentum 0 for the second pass and restores it after; so does this member, and it also restores
``num_batches_tracked`` (the reference counts the second pass there too, which changes the running averages only
where momentum is None: torch's cumulative average, whose factor is 1/num_batches_tracked).

Nothing here reads a value back to the host: the norm and the scale stay device tensors.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Callable, Optional

import torch
from torch import nn
from torch.nn.modules.batchnorm import _BatchNorm

from regbench.errors import ConfigError
from regbench.regularizers.base import Context, Regularizer, Stacking, register

log = logging.getLogger(__name__)

EPS = 1e-12  # the reference's term in the denominator: rho / (grad_norm + 1e-12)

# Why the two passes cannot run under mixed precision (trainer.amp), by its value.
_AMP_WHY = {
    "fp16": "fp16's GradScaler scales one backward per optimizer step and unscales and checks it once, and SAM "
            "takes two; the step runs no second pass under a GradScaler",
    "bf16": "bf16 autocast rounds the weights to 8 significant bits in the forward, as coarse as the ascent "
            "itself: at rho=0.05 on the lecture MLP the perturbation the forward sees is off by 70-80 % of its norm",
}


@dataclass
class SAMConfig:
    rho: float = 0.05  # ρ: the radius of the neighbourhood (SAM's 0.05; ASAM wants about 10x: 0.5-2.0)
    adaptive: bool = False  # ASAM: the neighbourhood scaled elementwise by |w|


@register
class SAM(Regularizer):
    name, schema = "sam", SAMConfig
    # setup only counts the model's BatchNorm layers; second_pass has no stacked form: refused in a stack by it.
    stacking = Stacking(before_training=("setup",))

    def __init__(self, cfg):
        super().__init__(cfg)
        self.norms: list[_BatchNorm] = []

    def check(self, ctx: Context) -> None:
        rho = self.cfg.rho
        if isinstance(rho, bool) or not rho >= 0:
            raise ConfigError(f"{self.key}.rho", rho, "a number >= 0 (the radius of the neighbourhood: SAM 0.05, "
                              "ASAM 0.5-2.0)")
        amp = ctx.cfg.trainer.amp
        if amp != "none":
            why = _AMP_WHY.get(amp, "SAM runs in float32")
            raise ConfigError("trainer.amp", amp, f"none with regularizer sam ({why})",
                              "set trainer.amp=none, or drop sam from the stack")

    def setup(self, model: nn.Module, ctx: Context) -> None:
        self.norms = [m for m in model.modules() if isinstance(m, _BatchNorm)]

    def info(self) -> dict:
        return {"rho": float(self.cfg.rho), "adaptive": bool(self.cfg.adaptive), "batchnorm_layers": len(self.norms)}

    def log_info(self, model: nn.Module) -> None:
        log.info("%s: rho=%g, two forward/backward passes per step; %d BatchNorm layers update their running "
                 "statistics in the first pass only", "ASAM" if self.cfg.adaptive else "SAM", self.cfg.rho,
                 len(self.norms))

    def second_pass(self, model: nn.Module, optimizer: torch.optim.Optimizer) -> Optional[Callable[[], None]]:
        params = [p for g in optimizer.param_groups for p in g["params"] if p.grad is not None]
        if not params:  # nothing has a gradient: no ascent, and no descent either
            return None
        with torch.no_grad():
            grads = [p.grad for p in params]
            scaled = torch._foreach_mul(torch._foreach_abs(params), grads) if self.cfg.adaptive else grads  # T g
            norm = torch.linalg.vector_norm(torch.stack(torch._foreach_norm(scaled)))  # one vector: all of them
            scale = float(self.cfg.rho) / (norm + EPS)
            if self.cfg.adaptive:
                e = torch._foreach_mul(params, params)  # T² g · scale, in the reference's order
                torch._foreach_mul_(e, grads)
                torch._foreach_mul_(e, scale)
            else:
                e = torch._foreach_mul(grads, scale)
            saved = [p.detach().clone() for p in params]
            torch._foreach_add_(params, e)  # climb to w + e(w)
        norms = [(m, m.momentum, None if m.num_batches_tracked is None else m.num_batches_tracked.clone())
                 for m in self.norms]
        for m, _, _ in norms:
            m.momentum = 0.0  # the second pass leaves the running statistics as the first pass left them

        def undo() -> None:
            with torch.no_grad():
                for p, w in zip(params, saved):
                    p.copy_(w)  # back to w, bitwise
            for m, momentum, count in norms:
                m.momentum = momentum
                if count is not None:
                    m.num_batches_tracked.copy_(count)

        return undo
