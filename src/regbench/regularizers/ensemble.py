"""Snapshot (checkpoint) ensembles: average the softmax of the weights of the last k epochs, or of the k
best epochs by ``trainer.monitor``, evaluated on the test set at the end. (Seed ensembles come from sweeps.)
"""

from __future__ import annotations

import copy
from dataclasses import dataclass
from typing import Optional

import torch
from torch import nn

from regbench.config import evaluations
from regbench.errors import ConfigError
from regbench.evaluation import probabilities
from regbench.metrics import summarize_probs
from regbench.records import monitor_sign
from regbench.regularizers.base import Context, Regularizer, Stacking, register


@dataclass
class EnsembleConfig:
    source: str = "last"  # last: the last k epochs | best: the k best epochs by trainer.monitor
    k: int = 5
    bins: int = 15  # ECE bins


@register
class Ensemble(Regularizer):
    name, schema = "ensemble", EnsembleConfig
    # A final evaluation of each member's own model; setup only reads the config and checks the model.
    stacking = Stacking(shared=(), before_training=("setup",), reads_model=("on_epoch_end",))  # snapshots

    def __init__(self, cfg) -> None:
        super().__init__(cfg)
        self.snapshots: list[tuple[float, int, dict]] = []  # (score, epoch, state on CPU)

    def check(self, ctx: Context) -> None:
        if self.cfg.source not in ("last", "best"):
            raise ConfigError(f"{self.key}.source", self.cfg.source, "last or best")
        t = ctx.cfg.trainer
        if not 1 <= self.cfg.k <= t.max_epochs:
            raise ConfigError(f"{self.key}.k", self.cfg.k, f"1..trainer.max_epochs={t.max_epochs} "
                              "(one snapshot per epoch)")
        if self.cfg.source == "best" and self.cfg.k > evaluations(t):
            raise ConfigError(f"{self.key}.k", self.cfg.k, f"1..{evaluations(t)}: the epochs trainer.eval_every="
                              f"{t.eval_every} evaluates of trainer.max_epochs={t.max_epochs} (the best epochs are "
                              "picked by their validation metrics)", "lower k or trainer.eval_every")

    def setup(self, model: nn.Module, ctx: Context) -> None:
        self.monitor = ctx.cfg.trainer.monitor
        self.sign = monitor_sign(self.monitor)

    def on_epoch_end(self, epoch: int, row: dict, model: nn.Module) -> bool:
        if self.cfg.source == "best" and row[self.monitor] is None:
            return False  # an epoch trainer.eval_every does not evaluate has no score
        state = {k: v.detach().to("cpu", copy=True) for k, v in model.state_dict().items()}
        score = epoch if self.cfg.source == "last" else -self.sign * row[self.monitor]
        self.snapshots.append((score, epoch, state))
        self.snapshots.sort(key=lambda s: s[0], reverse=True)  # keep the k highest scores
        del self.snapshots[self.cfg.k:]
        return False

    def state_dict(self) -> dict:
        return {"snapshots": [list(s) for s in self.snapshots]}

    def load_state_dict(self, state: dict) -> None:
        self.snapshots = [tuple(s) for s in state["snapshots"]]

    @torch.no_grad()
    def final_eval(self, model: nn.Module, x: torch.Tensor, y: torch.Tensor, evaluate) -> Optional[dict]:
        member = copy.deepcopy(model).eval()
        probs = None
        for _, _, state in self.snapshots:
            member.load_state_dict(state)
            p = probabilities(member, x, 1000)
            probs = p if probs is None else probs + p
        out = summarize_probs(probs / len(self.snapshots), y, self.cfg.bins)
        out["members"] = sorted(epoch for _, epoch, _ in self.snapshots)
        out["source"] = self.cfg.source
        return out
