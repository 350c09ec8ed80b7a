"""Keras' noise layers as members: ``gaussian_noise`` (GaussianNoise), ``gaussian_dropout`` (GaussianDropout) and
``alpha_dropout`` (AlphaDropout). Each fills a layer slot; the model family puts the layers where it has a place
for them (regbench.models: the input, or where its dropout goes) and refuses the rest with one line. Training only:
in evaluation mode every one is the identity, so validation and test are deterministic and unchanged.

- gaussian_noise (Keras 3, keras/src/layers/regularization/gaussian_noise.py, ``GaussianNoise.call``):
  x + N(0, σ²), every element drawn afresh; Keras accepts 0 <= stddev <= 1, and so does regbench.
  ``placement: input`` (the default; Keras' usual use: noise on the inputs, a data augmentation) or ``hidden``
  (after every hidden activation, where dropout goes).
- gaussian_dropout (keras/src/layers/regularization/gaussian_dropout.py, ``GaussianDropout.call``):
  x · N(1, rate/(1 − rate)): the mean and variance of inverted dropout's mask of the same rate, without zeros.
- alpha_dropout (keras/src/layers/regularization/alpha_dropout.py, ``AlphaDropout.call``; torch's nn.AlphaDropout
  computes the same, which the models use): a dropped unit is set to SELU's saturation value α' = −λα, then
  a·x + b with a = ((1 − p)(1 + p·α'²))^−½, b = −a·α'·p keeps mean 0 and variance 1 (Klambauer et al. 2017).
  For SELU networks only: a model with another activation refuses it (model.activation must be selu).

Stacks: the stacked model batches only dropout's masks, so each of these is refused in a stack with one line (the
layers also say so themselves: regbench.models.common ``stack_refusal``). The direct step (regbench.faststep) does
not know these layers, so a run with one trains through autograd (summary.json's step_impl says so).
"""

from __future__ import annotations

from dataclasses import dataclass

from regbench.errors import ConfigError
from regbench.models.slots import LayerSlots
from regbench.regularizers.base import Context, Regularizer, Stacking, register

# Why each is refused in a stack (a clause after "it"): the stacked model draws per member only dropout's masks.
_REFUSED = "it draws {} inside the forward pass, which a stack does not draw per member (only dropout's masks)"
PLACEMENTS = ("input", "hidden")


def _rate(value, key: str) -> None:
    if not (isinstance(value, (int, float)) and 0 <= value < 1):
        raise ConfigError(key, value, "a rate in [0, 1)")


@dataclass
class GaussianNoiseConfig:
    stddev: float = 0.1  # σ of the additive noise (Keras' GaussianNoise(stddev): 0 <= σ <= 1)
    placement: str = "input"  # input: on the model's input | hidden: after every hidden activation (where dropout goes)


@register
class GaussianNoise(Regularizer):
    name, schema = "gaussian_noise", GaussianNoiseConfig
    stacking = Stacking(refused=_REFUSED.format("its additive Gaussian noise"))

    def check(self, ctx: Context) -> None:
        s = self.cfg.stddev
        if not (isinstance(s, (int, float)) and 0 <= s <= 1):
            raise ConfigError(f"{self.key}.stddev", s, "a number in [0, 1] (Keras' GaussianNoise accepts no more)")
        if self.cfg.placement not in PLACEMENTS:
            raise ConfigError(f"{self.key}.placement", self.cfg.placement, " or ".join(PLACEMENTS))

    def fill_slots(self, slots: LayerSlots, ctx: Context) -> None:
        slots.set("gaussian_noise", float(self.cfg.stddev), f"{self.key}.stddev")
        slots.set("gaussian_noise_placement", self.cfg.placement, f"{self.key}.placement")


@dataclass
class GaussianDropoutConfig:
    rate: float = 0.1  # p: multiplicative noise N(1, p/(1-p)) after every hidden activation (where dropout goes)


@register
class GaussianDropout(Regularizer):
    name, schema = "gaussian_dropout", GaussianDropoutConfig
    stacking = Stacking(refused=_REFUSED.format("its multiplicative Gaussian noise"))

    def check(self, ctx: Context) -> None:
        _rate(self.cfg.rate, f"{self.key}.rate")

    def fill_slots(self, slots: LayerSlots, ctx: Context) -> None:
        slots.set("gaussian_dropout", float(self.cfg.rate), f"{self.key}.rate")


@dataclass
class AlphaDropoutConfig:
    rate: float = 0.1  # p: alpha dropout after every hidden SELU activation (where dropout goes)


@register
class AlphaDropout(Regularizer):
    name, schema = "alpha_dropout", AlphaDropoutConfig
    stacking = Stacking(refused=_REFUSED.format("its alpha-dropout masks"))

    def check(self, ctx: Context) -> None:
        _rate(self.cfg.rate, f"{self.key}.rate")

    def fill_slots(self, slots: LayerSlots, ctx: Context) -> None:
        slots.set("alpha_dropout", float(self.cfg.rate), f"{self.key}.rate")
