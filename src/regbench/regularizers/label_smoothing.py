"""Label smoothing: train against y = (1 − α)·onehot + α/K (torch's ``cross_entropy(label_smoothing=α)``).

The smoothed training loss has a floor, the entropy of y (≈ 0.50 nats for α = 0.1, K = 10), so it is not
comparable with the validation loss; the run's clean training metric (plain CE, eval mode) is.
"""

from __future__ import annotations

from dataclasses import dataclass

from regbench.errors import ConfigError
from regbench.regularizers.base import Context, Regularizer, Stacking, register


@dataclass
class LabelSmoothingConfig:
    alpha: float = 0.1  # α: probability mass spread uniformly over the K classes


@register
class LabelSmoothing(Regularizer):
    name, schema = "label_smoothing", LabelSmoothingConfig
    stacking = Stacking(shared=())  # α per member of a stack (through loss_options; without the member: α = 0)

    def check(self, ctx: Context) -> None:
        if not 0 <= self.cfg.alpha < 1:
            raise ConfigError(f"{self.key}.alpha", self.cfg.alpha, "a number in [0, 1)")

    def loss_options(self) -> dict:
        return {"label_smoothing": float(self.cfg.alpha)}
