"""Dropout: inverted dropout (torch's nn.Dropout: zero with probability p, scale survivors by 1/(1−p)).

MLP: after (or before) the activation of every hidden layer, one rate or one per layer. Lecture CNN: ``rate``
in the dense head, ``spatial`` as Dropout2d (whole feature maps, Keras' ``noise_shape=(B,1,1,C)``) after
every conv. Evaluation mode is deterministic.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from regbench.errors import ConfigError
from regbench.regularizers.base import Context, Regularizer, register


@dataclass
class DropoutConfig:
    rate: Any = 0.5  # p: MLP hidden layers (a number, or a list with one per hidden layer) / CNN dense head
    placement: str = "after_activation"  # after_activation | before_activation
    spatial: float = 0.0  # Dropout2d rate after every conv of the lecture CNN (0 = none)


@register
class Dropout(Regularizer):
    name, schema = "dropout", DropoutConfig

    def check(self, ctx: Context) -> None:
        rate = self.cfg.rate
        rates = list(rate) if not isinstance(rate, (int, float)) else [rate]
        if not rates or not all(isinstance(r, (int, float)) and 0 <= r < 1 for r in rates):
            raise ConfigError(f"{self.key}.rate", rate, "a rate in [0, 1) or a list of them")
        if self.cfg.placement not in ("after_activation", "before_activation"):
            raise ConfigError(f"{self.key}.placement", self.cfg.placement, "after_activation or before_activation")
        if not 0 <= self.cfg.spatial < 1:
            raise ConfigError(f"{self.key}.spatial", self.cfg.spatial, "a rate in [0, 1)")
        model = ctx.cfg.model.name
        if model == "mlp" and not ctx.cfg.model.hidden:
            raise self.nothing("model.hidden=[] has no hidden layer to drop units in",
                               "give the MLP hidden layers (e.g. model.hidden=[256]) or drop dropout from the stack")
        if model == "mlp" and self.cfg.spatial > 0:
            raise ConfigError(f"{self.key}.spatial", self.cfg.spatial, "0 with model=mlp (spatial dropout drops "
                              "conv feature maps; the MLP has none)", "use model=lecture_cnn or drop the key")
        if model == "mlp" and len(rates) > 1 and len(rates) != len(ctx.cfg.model.hidden):
            raise ConfigError(f"{self.key}.rate", list(rates), f"one rate or {len(ctx.cfg.model.hidden)} "
                              "(one per hidden layer of model.hidden)")
        if model == "lecture_cnn" and len(rates) > 1:
            raise ConfigError(f"{self.key}.rate", list(rates), "one rate for the CNN's single dense hidden layer")

    def model_hooks(self, ctx: Context) -> dict[str, Any]:
        rate = self.cfg.rate if isinstance(self.cfg.rate, (int, float)) else list(self.cfg.rate)
        if ctx.cfg.model.name == "mlp":
            return {"dropout": rate, "dropout_placement": self.cfg.placement}
        return {"head_dropout": rate, "spatial_dropout": self.cfg.spatial, "dropout_placement": self.cfg.placement}
