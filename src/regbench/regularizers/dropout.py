"""Dropout: inverted dropout (torch's nn.Dropout: zero with probability p, scale survivors by 1/(1−p)).

The member fills the layer slots ``dropout`` (``rate``), ``dropout_placement`` and ``spatial_dropout`` (Dropout2d,
whole feature maps, Keras' ``noise_shape=(B,1,1,C)``); each model puts them where it has a place for them (MLP:
every hidden layer, one rate or one per layer; lecture CNN: the dense head, spatial after every conv; ResNet:
before the head) and refuses the rest. Evaluation mode is deterministic.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from regbench.errors import ConfigError
from regbench.models.slots import LayerSlots
from regbench.regularizers.base import Context, Regularizer, Stacking, register


@dataclass
class DropoutConfig:
    rate: Any = 0.5  # p: MLP hidden layers (a number, or a list with one per hidden layer) / CNN, ResNet head
    placement: str = "after_activation"  # after_activation | before_activation
    spatial: float = 0.0  # Dropout2d rate after every conv of the lecture CNN (0 = none)


@register
class Dropout(Regularizer):
    name, schema = "dropout", DropoutConfig
    # Rates per member of a stack (regbench.stacked.model draws each member's masks; without the member: rate 0);
    # where the layers are, and whether there are spatial ones, is shared.
    stacking = Stacking(shared=("placement",), shared_nonzero=("spatial",))

    def check(self, ctx: Context) -> None:
        rate = self.cfg.rate
        rates = list(rate) if not isinstance(rate, (int, float)) else [rate]
        if not rates or not all(isinstance(r, (int, float)) and 0 <= r < 1 for r in rates):
            raise ConfigError(f"{self.key}.rate", rate, "a rate in [0, 1) or a list of them")
        if self.cfg.placement not in ("after_activation", "before_activation"):
            raise ConfigError(f"{self.key}.placement", self.cfg.placement, "after_activation or before_activation")
        if not 0 <= self.cfg.spatial < 1:
            raise ConfigError(f"{self.key}.spatial", self.cfg.spatial, "a rate in [0, 1)")

    def fill_slots(self, slots: LayerSlots, ctx: Context) -> None:
        rate = self.cfg.rate if isinstance(self.cfg.rate, (int, float)) else list(self.cfg.rate)
        slots.set("dropout", rate, f"{self.key}.rate")
        slots.set("dropout_placement", self.cfg.placement, f"{self.key}.placement")
        slots.set("spatial_dropout", self.cfg.spatial, f"{self.key}.spatial")
