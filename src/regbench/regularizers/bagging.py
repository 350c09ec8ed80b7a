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
from regbench.regularizers.base import Context, Regularizer, Stacking, register
from regbench.regularizers.stacking import stack_refusals


@dataclass
class BaggingConfig:
    members: int = 5  # k: models trained (and averaged)
    bootstrap: bool = True  # true: each on its own bootstrap resample (bagging); false: deep ensemble (seeds only)


@register
class Bagging(Regularizer):
    name, schema = "bagging", BaggingConfig
    stacking = Stacking(refused="a bagging run is a stack of its own")

    def check(self, ctx: Context) -> None:
        k = self.cfg.members
        if not isinstance(k, int) or isinstance(k, bool) or not 2 <= k <= 64:
            raise ConfigError(f"{self.key}.members", k, "an integer in 2..64 (models in the ensemble)")
        if not isinstance(self.cfg.bootstrap, bool):
            raise ConfigError(f"{self.key}.bootstrap", self.cfg.bootstrap, "true (bagging) or false (deep ensemble)")
        # Its members' config (the run's without bagging) must be stackable: what a stack refuses, said as bagging's.
        refusals = stack_refusals(ctx.cfg, ignore=(self.name,))
        if not refusals:
            return
        r = refusals[0]
        if r.key == "regularizer":
            raise ConfigError("regularizer", f"[bagging,{r.value}]", f"bagging without {r.value} (its members train "
                              f"as one stack, and {r.value}: {r.why})", "drop one of the two")
        if r.key == "model":
            raise ConfigError("regularizer", "[bagging]", "a regbench model (mlp, lecture_cnn, resnet) with bagging "
                              f"(model={r.value}: {r.why})")
        raise ConfigError(r.key, r.value, f"none with regularizer=[bagging] (its members train as one stack, and "
                          f"{r.why})", f"add {r.fix}")

    def info(self) -> dict:
        return {"members": int(self.cfg.members), "bootstrap": bool(self.cfg.bootstrap)}
