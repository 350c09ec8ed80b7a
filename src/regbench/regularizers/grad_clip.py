"""Gradient clipping against exploding gradients: by global norm (clip_grad_norm_) or by value.

Under fp16 AMP the gradients are unscaled first (GradScaler.unscale_), so the threshold means the same as
without AMP.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from regbench.errors import ConfigError
from regbench.regularizers.base import Context, Regularizer, Stacking, register


@dataclass
class GradClipConfig:
    mode: str = "norm"  # norm: rescale so the global norm is at most max | value: clamp each entry to [−max, max]
    max: float = 1.0
    norm_type: float = 2.0  # mode=norm only: which p-norm (2 = Euclidean, inf = max-abs)


@register
class GradClip(Regularizer):
    name, schema = "grad_clip", GradClipConfig
    needs_unscaled_grads = True
    # max may differ per member of a stack (a run without the member does not clip); how it clips is shared.
    stacking = Stacking(shared=("mode", "norm_type"))

    def check(self, ctx: Context) -> None:
        if self.cfg.mode not in ("norm", "value"):
            raise ConfigError(f"{self.key}.mode", self.cfg.mode, "norm or value")
        if not self.cfg.max > 0:
            raise ConfigError(f"{self.key}.max", self.cfg.max, "a number > 0")
        if self.cfg.max == float("inf"):
            raise self.nothing(f"{self.key}.max=inf never clips a gradient", f"give a finite {self.key}.max or "
                               "drop grad_clip from the stack")
        if self.cfg.mode == "value" and self.cfg.norm_type != 2.0:
            raise ConfigError(f"{self.key}.norm_type", self.cfg.norm_type, "to be left alone with mode=value "
                              "(it is only used by mode=norm)", "add regularizer.grad_clip.mode=norm")

    def grad_params(self) -> None:
        return None  # every parameter the optimizer steps, in its order (the global norm sums in that order)

    def grads_on(self, params: list[torch.Tensor], optimizer: torch.optim.Optimizer) -> None:
        params = [p for p in params if p.grad is not None]
        if self.cfg.mode == "norm":
            torch.nn.utils.clip_grad_norm_(params, self.cfg.max, norm_type=self.cfg.norm_type)
        else:
            torch.nn.utils.clip_grad_value_(params, self.cfg.max)
