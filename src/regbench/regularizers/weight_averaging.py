"""Weight averaging through torch.optim.swa_utils: stochastic weight averaging (SWA; Izmailov et al. 2018,
"Averaging Weights Leads to Wider Optima and Better Generalization") and an exponential moving average of the
weights (EMA; timm's ModelEmaV3, with its optional warm-up).

From epoch ``start_epoch + 1`` on, a copy of the model (``AveragedModel``) holds the average, and every evaluation
reads it (:meth:`WeightAveraging.eval_model`: validation, the clean training subset, the test, the final
evaluations, TTA); before it holds one, the trained model is evaluated. The run reports the trained model's own test
beside it (summary.json ``test_extra.trained``).

- ``swa``: torch's recipe (the example of ``AveragedModel``'s docstring): the average is updated once per epoch, after
  the epoch's last optimizer step (``update_parameters``: the equal-weight running mean), and torch's ``SWALR``
  replaces the run's lr schedule from the first averaged epoch on (anneal to ``swa_lr``, then constant; stepped after
  every optimizer step like every regbench schedule, see :func:`regbench.optim.swa_schedule`).
- ``ema``: ``update_parameters`` after every optimizer step with ``get_ema_multi_avg_fn(decay)``:
  W_ema <- decay * W_ema + (1 - decay) * W (``torch._foreach_lerp_``), the first update a copy. ``warmup``: timm's
  ModelEmaV3.get_decay (timm/utils/model_ema.py; timm's train.py passes step = updates so far, 1 on the first):
  decay_n = min(decay, 1 - (1 + n / warmup_gamma) ** -warmup_power) at the update that finds n updates made.

BatchNorm statistics of the average: averaged with the weights (``use_buffers``, EMA's default, as timm does), or
recomputed by torch's ``update_bn`` over the training split (SWA's default; torch's recipe does it once, after
training). Here every evaluation reads the average, so the pass runs before the first evaluation after each update
(once per epoch at most; not at all for a model without BatchNorm). It reads the un-augmented training split in its
stored order, in batches of data.batch_size: the inputs validation and test see, no draw from the training's data
order or augmentation streams; its dropout masks (update_bn runs the model in training mode) come from a generator of
their own, seeded with the run's seed — so the statistics are a function of the averaged weights alone, and a
resumed run recomputes them bitwise.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any, Optional

import torch
from torch import nn
from torch.nn.modules.batchnorm import _BatchNorm
from torch.optim.swa_utils import AveragedModel, get_ema_multi_avg_fn, update_bn

from regbench.errors import ConfigError, choice, positive
from regbench.optim import swa_schedule
from regbench.regularizers.base import Context, Regularizer, Stacking, register, schema_defaults

log = logging.getLogger(__name__)


@dataclass
class WeightAveragingConfig:
    mode: str = "ema"  # swa | ema
    start_epoch: int = 0  # averaging begins after this epoch (torch's swa_start); 0: from the first step / epoch
    use_buffers: Optional[bool] = None  # average the BN buffers too; null: false for swa (update_bn), true for ema
    # swa only: torch's SWALR from the first averaged epoch on
    swa_lr: Optional[float] = None  # the lr it anneals to and holds; null: optimizer.lr
    anneal_epochs: float = 10.0  # its anneal, in epochs (torch's default 10); 0: swa_lr at once
    anneal_strategy: str = "cos"  # cos | linear
    # ema only
    decay: float = 0.999  # torch's get_ema_multi_avg_fn default
    warmup: bool = False  # timm ModelEmaV3's use_warmup: decay_n = min(decay, 1 - (1 + n/gamma)^-power)
    warmup_gamma: float = 1.0  # timm's warmup_gamma
    warmup_power: float = 2 / 3  # timm's warmup_power


SWA_KEYS = ("swa_lr", "anneal_epochs", "anneal_strategy")
EMA_KEYS = ("decay", "warmup", "warmup_gamma", "warmup_power")


def ema_decay(n: int, decay: float, warmup: bool = False, gamma: float = 1.0, power: float = 2 / 3) -> float:
    """The decay of the EMA update that finds ``n`` updates made: timm's ModelEmaV3.get_decay(step=n + 1) with
    update_after_step=0, min_decay=0 (0 at the first: a copy, which torch's AveragedModel makes itself)."""
    if n <= 0:
        return 0.0
    if not warmup:
        return decay
    return max(min(1 - (1 + n / gamma) ** -power, decay), 0.0)


@register
class WeightAveraging(Regularizer):
    name, schema = "weight_averaging", WeightAveragingConfig
    # setup only copies the model (the average's AveragedModel); its after_step, eval_model and lr_schedule have no
    # stacked form: refused in a stack by those.
    stacking = Stacking(before_training=("setup",))

    def __init__(self, cfg) -> None:
        super().__init__(cfg)
        self.averaged: Optional[AveragedModel] = None
        self.updates = 0  # update_parameters calls so far (the average's n_averaged, kept on the host)
        self.schedule = None  # the SWALR, from the first SWA epoch on
        self.pending_schedule: Optional[dict] = None  # its state from a checkpoint, loaded once it is built
        self.epoch, self.steps_per_epoch, self.step_in_epoch = 0, 0, 0
        self.bn_stale = False  # the average changed since its BN statistics were recomputed

    @property
    def swa(self) -> bool:
        return self.cfg.mode == "swa"

    # --- construction ---------------------------------------------------------------------------
    def check(self, ctx: Context) -> None:
        c, key = self.cfg, self.key
        choice(c.mode, f"{key}.mode", ("swa", "ema"))
        epochs = ctx.cfg.trainer.max_epochs
        if not isinstance(c.start_epoch, int) or c.start_epoch < 0:
            raise ConfigError(f"{key}.start_epoch", c.start_epoch, "an integer >= 0")
        if c.start_epoch >= epochs:
            raise self.nothing(f"{key}.start_epoch={c.start_epoch} starts averaging after the last epoch "
                               f"(trainer.max_epochs={epochs})", f"lower {key}.start_epoch or raise trainer.max_epochs")
        defaults = schema_defaults(self.schema)
        for k in EMA_KEYS if self.swa else SWA_KEYS:  # a key of the other mode would be accepted and ignored
            if c[k] != defaults[k]:
                raise ConfigError(f"{key}.{k}", c[k], f"{defaults[k]} with {key}.mode={c.mode} (a key of mode="
                                  f"{'ema' if self.swa else 'swa'})", f"drop {key}.{k} or set {key}.mode="
                                  f"{'ema' if self.swa else 'swa'}")
        if self.swa:
            if c.swa_lr is not None:
                positive(c.swa_lr, f"{key}.swa_lr", "e.g. the lr the schedule ends at, or null: optimizer.lr")
            if c.anneal_epochs < 0:
                raise ConfigError(f"{key}.anneal_epochs", c.anneal_epochs, "a number >= 0 (0: swa_lr at once)")
            choice(c.anneal_strategy, f"{key}.anneal_strategy", ("cos", "linear"))
        else:
            if not 0 <= c.decay < 1:
                raise ConfigError(f"{key}.decay", c.decay, "a number in [0, 1) (1 would keep the first step's weights "
                                  "for ever)", "e.g. 0.999 (torch's default) or 0.99 for a short run")
            positive(c.warmup_gamma, f"{key}.warmup_gamma")
            positive(c.warmup_power, f"{key}.warmup_power")
        self._check_company(ctx)

    def _check_company(self, ctx: Context) -> None:
        """The members whose meaning the averaged model's evaluations would break (one line each)."""
        members = ctx.cfg.regularizer
        if "early_stopping" in members and members.early_stopping.restore_best_weights:
            raise ConfigError("regularizer.early_stopping.restore_best_weights", True, "false with "
                              "weight_averaging (the validation it watches is the averaged model's, and it would "
                              "restore the trained model's weights, not the average's)", "set "
                              "regularizer.early_stopping.restore_best_weights=false (it then stops on the averaged "
                              "model's validation) or drop early_stopping")
        if "ensemble" in members:
            raise ConfigError("regularizer", f"[{','.join(members)}]", "ensemble or weight_averaging, not both "
                              "(ensemble's snapshots are the trained model's weights, and every evaluation reads the "
                              "averaged model)", "drop one of them from the list")

    def setup(self, model: nn.Module, ctx: Context) -> None:
        c = self.cfg
        self.use_buffers = (not self.swa) if c.use_buffers is None else bool(c.use_buffers)
        self.swa_lr = (c.swa_lr if c.swa_lr is not None else ctx.cfg.optimizer.lr) if self.swa else None
        self.averaged = AveragedModel(model, multi_avg_fn=None if self.swa else self._ema,
                                      use_buffers=self.use_buffers)
        self.averaged.requires_grad_(False)
        self.has_bn = any(isinstance(m, _BatchNorm) for m in model.modules())
        self.bn_pass = not self.use_buffers and self.has_bn
        self.batch_size, self.seed = int(ctx.cfg.data.batch_size), int(ctx.cfg.seed)

    def _ema(self, averaged: list, current: list, n_averaged) -> None:
        """torch's get_ema_multi_avg_fn at this update's decay (warm-up: it changes every update)."""
        c = self.cfg
        get_ema_multi_avg_fn(ema_decay(self.updates, c.decay, c.warmup, c.warmup_gamma, c.warmup_power))(
            averaged, current, n_averaged)

    # --- the run's epochs and steps -------------------------------------------------------------
    def lr_schedule(self, epoch: int, optimizer: torch.optim.Optimizer, steps_per_epoch: int) -> Optional[Any]:
        self.epoch, self.steps_per_epoch, self.step_in_epoch = epoch, steps_per_epoch, 0
        if not self.swa or epoch <= self.cfg.start_epoch:
            return None
        if self.schedule is None:
            self.schedule = swa_schedule(optimizer, self.swa_lr, self.cfg.anneal_epochs, self.cfg.anneal_strategy,
                                         steps_per_epoch)
            if self.pending_schedule is not None:  # resumed after the switch: where the schedule was
                self.schedule.load_state_dict(self.pending_schedule)
                self.pending_schedule = None
        return self.schedule

    def after_step(self, model: nn.Module, optimizer: torch.optim.Optimizer) -> None:
        self.step_in_epoch += 1
        if self.epoch <= self.cfg.start_epoch:
            return
        if not self.swa or self.step_in_epoch == self.steps_per_epoch:  # swa: after the epoch's last step
            self.averaged.update_parameters(model)
            self.updates += 1
            self.bn_stale = True

    def eval_model(self, model: nn.Module, train_x: torch.Tensor) -> Optional[nn.Module]:
        if self.updates == 0:
            return None  # no average yet: the trained model
        if self.bn_pass and self.bn_stale:
            self.recompute_bn(train_x)
        return self.averaged

    def recompute_bn(self, train_x: torch.Tensor) -> None:
        """torch's update_bn over the un-augmented training split (see the module's docstring)."""
        fork = [train_x.device] if train_x.device.type == "cuda" else []
        with torch.random.fork_rng(devices=fork):
            torch.manual_seed(self.seed)
            update_bn((train_x[i:i + self.batch_size] for i in range(0, len(train_x), self.batch_size)),
                      self.averaged)
        self.bn_stale = False

    # --- what it did ----------------------------------------------------------------------------
    def info(self) -> Optional[dict]:
        c = self.cfg
        facts = {"mode": c.mode, "start_epoch": c.start_epoch, "updates": self.updates,
                 "bn_statistics": ("no batch norm" if not self.has_bn else "averaged" if self.use_buffers
                                   else "update_bn")}
        if self.swa:
            facts.update(swa_lr=self.swa_lr, anneal_epochs=c.anneal_epochs, anneal_strategy=c.anneal_strategy)
        else:
            facts.update(decay=c.decay, warmup=c.warmup)
        return facts

    def log_info(self, model: nn.Module) -> None:
        c = self.cfg
        how = (f"swa: the average of each epoch's end weights, SWALR to lr {self.swa_lr:g} over {c.anneal_epochs:g} "
               f"epochs ({c.anneal_strategy})" if self.swa else
               f"ema: decay {c.decay:g} after every step{', with timm warm-up' if c.warmup else ''}")
        bn = ("none in the model" if not self.has_bn else "averaged" if self.use_buffers
              else "recomputed by update_bn before each evaluation")
        log.info("weight averaging %s, from epoch %d; BatchNorm statistics %s; evaluations read the average",
                 how, c.start_epoch + 1, bn)

    # --- checkpoints ----------------------------------------------------------------------------
    def state_dict(self) -> dict[str, Any]:
        return {"averaged": self.averaged.state_dict(), "updates": self.updates,
                "schedule": self.schedule.state_dict() if self.schedule is not None else None}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if not state:
            return
        self.averaged.load_state_dict(state["averaged"])
        self.updates = int(state["updates"])
        self.pending_schedule = state["schedule"]
        self.bn_stale = True
