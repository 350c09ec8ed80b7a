"""Stochastic depth (Huang et al. 2016): in training, drop each residual branch for a whole sample, keeping the
identity shortcut; evaluation uses every block (the identity, no rescaling).

Block l of L drops with probability p_l = l/L · p_L (``rule: linear``, the paper's decay: the first block is
almost always kept, the deepest drops with ``rate`` = p_L) or p_L everywhere (``rule: uniform``). Kept branches
are scaled by 1/(1−p_l) in training (timm's DropPath; the paper scales by the survival probability at test time
instead: the same expectation). The member fills the ``drop_path`` slot; a model without residual branches
(mlp, lecture_cnn) or whose blocks are not regbench's (torchvision) refuses it with one line.
"""

from __future__ import annotations

from dataclasses import dataclass

from regbench.errors import ConfigError
from regbench.models.slots import LayerSlots
from regbench.regularizers.base import Context, Regularizer, Stacking, register


@dataclass
class StochasticDepthConfig:
    rate: float = 0.5  # p_L: drop probability of the deepest residual block (the paper's 1 - p_L = 0.5)
    rule: str = "linear"  # linear: p_l = l/L · rate (Huang et al.) | uniform: every block drops with rate


@register
class StochasticDepth(Regularizer):
    name, schema = "stochastic_depth", StochasticDepthConfig
    stacking = Stacking(refused="it draws per-sample randomness inside the forward pass")

    def check(self, ctx: Context) -> None:
        if not 0 <= self.cfg.rate < 1:
            raise ConfigError(f"{self.key}.rate", self.cfg.rate, "a rate in [0, 1)")
        if self.cfg.rule not in ("linear", "uniform"):
            raise ConfigError(f"{self.key}.rule", self.cfg.rule, "linear or uniform")

    def fill_slots(self, slots: LayerSlots, ctx: Context) -> None:
        slots.set("drop_path", float(self.cfg.rate), f"{self.key}.rate")
        slots.set("drop_path_rule", self.cfg.rule, f"{self.key}.rule")
