"""Bagging and deep ensembles (the lecture: "train multiple models and average their results; bagging uses k
different datasets, or SGD/init noise"): ``regularizer=[bagging]`` trains ``members`` copies of the run's model as
one stack (regbench.stacked), each from its own seed; with ``bootstrap`` each trains on its own bootstrap resample
of the training split (n draws with replacement: Breiman's bagging, ~63.2 % of the images, some twice), without it
on the whole split (a deep ensemble: only init, data order and dropout masks differ). The run reports the
ensemble (softmax averaged over the members) beside the members' mean, every epoch and on the test set.

The member changes nothing inside a model's step; ``train.fit`` hands a run that has it to
:func:`regbench.stacked.bagging.fit_bagging`.
"""

from __future__ import annotations

from dataclasses import dataclass

from regbench.errors import ConfigError
from regbench.regularizers.base import Context, Regularizer, register

# What a bagging run cannot combine with: it is a stack, and these cannot be stacked (regbench.stacked.grouping).
_REFUSED_MEMBERS = {"transfer": "pretrained weights and frozen layers", "fine_tune": "layers unfrozen mid-run",
                    "stochastic_depth": "per-sample randomness inside the forward pass"}


@dataclass
class BaggingConfig:
    members: int = 5  # k: models trained (and averaged)
    bootstrap: bool = True  # true: each on its own bootstrap resample (bagging); false: deep ensemble (seeds only)


@register
class Bagging(Regularizer):
    name, schema = "bagging", BaggingConfig

    def check(self, ctx: Context) -> None:
        k = self.cfg.members
        if not isinstance(k, int) or isinstance(k, bool) or not 2 <= k <= 64:
            raise ConfigError(f"{self.key}.members", k, "an integer in 2..64 (models in the ensemble)")
        if not isinstance(self.cfg.bootstrap, bool):
            raise ConfigError(f"{self.key}.bootstrap", self.cfg.bootstrap, "true (bagging) or false (deep ensemble)")
        cfg = ctx.cfg
        for name, why in _REFUSED_MEMBERS.items():
            if name in cfg.regularizer:
                raise ConfigError("regularizer", f"[bagging,{name}]", f"bagging without {name} (its members train "
                                  f"as one stack, which cannot reproduce {why})", "drop one of the two")
        if cfg.model.name == "torchvision":
            raise ConfigError("regularizer", "[bagging]", "a regbench model (mlp, lecture_cnn, resnet) with "
                              "bagging; model=torchvision layers are not stacked")
        for key in ("amp", "compile"):
            if cfg.trainer[key] != "none":
                raise ConfigError(f"trainer.{key}", cfg.trainer[key], "none with regularizer=[bagging] (its members "
                                  "train as one float32, uncompiled stack)", f"add trainer.{key}=none")

    def info(self) -> dict:
        return {"members": int(self.cfg.members), "bootstrap": bool(self.cfg.bootstrap)}
