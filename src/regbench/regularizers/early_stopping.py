"""Early stopping with Keras' semantics (keras.callbacks.EarlyStopping, Keras 3).

An epoch improves when its monitored value beats the best by more than ``min_delta`` (in the direction of
``mode``); ``wait`` counts epochs since the last improvement (it resets only if the value also beats
``baseline``), and training stops once ``wait >= patience``. ``restore_best_weights`` restores the whole
model state, BatchNorm buffers included, at the end of training — also when it ends without stopping early
(an old Keras version restored only when stopping fired).
"""

from __future__ import annotations

import copy
import math
from dataclasses import dataclass
from typing import Optional

from regbench.errors import ConfigError
from regbench.regularizers.base import Context, Regularizer, Stacking, register



@dataclass
class EarlyStoppingConfig:
    monitor: str = "val_loss"  # val_loss | val_acc
    mode: str = "auto"  # auto (min for losses, max for accuracies) | min | max
    patience: int = 5  # epochs without improvement before stopping
    min_delta: float = 0.0  # an improvement must be larger than this
    baseline: Optional[float] = None  # wait only resets on values better than this too
    restore_best_weights: bool = True
    start_from_epoch: int = 0  # epochs to train before monitoring starts


@register
class EarlyStopping(Regularizer):
    name, schema = "early_stopping", EarlyStoppingConfig
    stacking = Stacking(shared=(), reads_model=("on_epoch_end",))  # every member of a stack stops on its own (it then leaves the stack)

    def __init__(self, cfg) -> None:
        super().__init__(cfg)
        self.reset()

    def check(self, ctx: Context) -> None:
        c = self.cfg
        if c.monitor not in ("val_loss", "val_acc"):
            raise ConfigError(f"{self.key}.monitor", c.monitor, "val_loss or val_acc")
        if c.mode not in ("auto", "min", "max"):
            raise ConfigError(f"{self.key}.mode", c.mode, "auto, min or max")
        if c.patience < 0 or c.min_delta < 0 or c.start_from_epoch < 0:
            raise ConfigError(self.key, {"patience": c.patience, "min_delta": c.min_delta,
                                         "start_from_epoch": c.start_from_epoch}, "values >= 0")
        if ctx.cfg.trainer.eval_every != 1:
            raise ConfigError("trainer.eval_every", ctx.cfg.trainer.eval_every, f"1 with {self.key} (it watches "
                              f"{c.monitor} after every epoch; its patience counts epochs)",
                              "set trainer.eval_every=1 or drop early_stopping from regularizer=[...]")
        if c.start_from_epoch >= ctx.cfg.trainer.max_epochs:
            raise self.nothing(f"{self.key}.start_from_epoch={c.start_from_epoch} starts monitoring after the last "
                               f"epoch (trainer.max_epochs={ctx.cfg.trainer.max_epochs})",
                               f"lower {self.key}.start_from_epoch or raise trainer.max_epochs")

    def reset(self) -> None:
        mode = self.cfg.mode if self.cfg.mode != "auto" else ("max" if "acc" in self.cfg.monitor else "min")
        self.sign = 1.0 if mode == "min" else -1.0  # compare sign·value: smaller is better
        self.best = math.inf
        self.best_epoch: Optional[int] = None
        self.best_state: Optional[dict] = None
        self.wait = 0
        self.stopped_epoch: Optional[int] = None
        self.restored: Optional[bool] = None  # set at the end of training

    @property
    def stopped(self) -> bool:
        return self.stopped_epoch is not None

    def _improves(self, value: float, reference: float) -> bool:
        return self.sign * value + self.cfg.min_delta < reference

    def update(self, epoch: int, value: float, state_fn=None) -> bool:
        """Feed one epoch's monitored value (epochs count from 1); True means stop now."""
        if epoch <= self.cfg.start_from_epoch:
            return False
        if self.cfg.restore_best_weights and self.best_state is None and state_fn is not None:
            self.best_state, self.best_epoch = state_fn(), epoch
        self.wait += 1
        if self._improves(value, self.best):
            self.best, self.best_epoch = self.sign * value, epoch
            if self.cfg.restore_best_weights and state_fn is not None:
                self.best_state = state_fn()
            if self.cfg.baseline is None or self._improves(value, self.sign * self.cfg.baseline):
                self.wait = 0
            return False
        if self.wait >= self.cfg.patience and epoch > 1:
            self.stopped_epoch = epoch
            return True
        return False

    def on_epoch_end(self, epoch: int, row: dict, model) -> bool:
        return self.update(epoch, row[self.cfg.monitor], lambda: copy.deepcopy(model.state_dict()))

    STATE = ("best", "best_epoch", "best_state", "wait", "stopped_epoch")

    def state_dict(self) -> dict:
        return {k: getattr(self, k) for k in self.STATE}

    def load_state_dict(self, state: dict) -> None:
        for k in self.STATE:
            setattr(self, k, state[k])

    def on_train_end(self, model, ctx: Context) -> None:
        self.restored = self.cfg.restore_best_weights and self.best_state is not None
        if self.restored:
            model.load_state_dict(self.best_state)

    def info(self) -> Optional[dict]:
        if self.restored is None:  # its facts are the end of training's
            return None
        return {"stopped_epoch": self.stopped_epoch, "best_epoch": self.best_epoch,
                "best": None if self.best_epoch is None else self.sign * self.best,
                "monitor": self.cfg.monitor, "restored_best_weights": self.restored}
