"""Monte Carlo dropout: at test time keep only the dropout layers stochastic (BatchNorm stays in eval mode)
and average the softmax over N passes; reported beside the plain evaluation (accuracy, NLL, ECE).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch
from omegaconf import OmegaConf
from torch import nn

from regbench.errors import ConfigError, RegbenchError
from regbench.evaluation import probabilities
from regbench.metrics import summarize_probs
from regbench.regularizers.base import Context, Regularizer, Stacking, register

DROPOUT_TYPES = (nn.Dropout, nn.Dropout1d, nn.Dropout2d, nn.Dropout3d, nn.AlphaDropout)


@dataclass
class MCDropoutConfig:
    passes: int = 30  # N stochastic forward passes
    bins: int = 15  # ECE bins


def _stack(ctx: Context) -> str:
    """The stack as it is written on the command line: ``regularizer=[dropout,mc_dropout]``."""
    return f"regularizer=[{','.join(ctx.cfg.regularizer)}]"


def _no_rate(ctx: Context) -> RegbenchError:
    d = ctx.cfg.regularizer.dropout
    return RegbenchError(f"{_stack(ctx)}: expected a dropout layer with a non-zero rate in the model for mc_dropout "
                         f"(regularizer.dropout.rate={OmegaConf.to_container(d)['rate']}, spatial={d.spatial}); fix: "
                         "set regularizer.dropout.rate, e.g. regularizer.dropout.rate=0.5")


@register
class MCDropout(Regularizer):
    name, schema = "mc_dropout", MCDropoutConfig
    # A final evaluation of each member's own model; setup only reads the config and checks the model.
    stacking = Stacking(shared=(), before_training=("setup",))

    def check(self, ctx: Context) -> None:
        if self.cfg.passes < 1 or self.cfg.bins < 1:
            raise ConfigError(self.key, {"passes": self.cfg.passes, "bins": self.cfg.bins}, "integers >= 1")
        if "dropout" not in ctx.cfg.regularizer:  # no model builds dropout layers unless the member fills its slot
            raise RegbenchError(f"{_stack(ctx)}: expected dropout in the model for mc_dropout; add it to the stack, "
                                "e.g. regularizer=[dropout,mc_dropout]")
        d = ctx.cfg.regularizer.dropout
        rates = list(d.rate) if OmegaConf.is_list(d.rate) else [d.rate]
        if not any(rates) and not d.spatial:  # caught before the run starts; setup() checks the built model
            raise _no_rate(ctx)

    def setup(self, model: nn.Module, ctx: Context) -> None:
        if not any(isinstance(m, DROPOUT_TYPES) and m.p > 0 for m in model.modules()):
            raise _no_rate(ctx)
        self.seed = int(ctx.cfg.seed)

    @torch.no_grad()
    def final_eval(self, model: nn.Module, x: torch.Tensor, y: torch.Tensor, evaluate) -> Optional[dict]:
        return {**mc_dropout_eval(model, x, y, self.cfg.passes, self.cfg.bins, seed=self.seed),
                "passes": self.cfg.passes}


@torch.no_grad()
def mc_dropout_eval(model: nn.Module, x: torch.Tensor, y: torch.Tensor, passes: int, bins: int = 15,
                    batch_size: int = 1000, seed: int = 0) -> dict:
    was_training = model.training
    model.eval()
    for m in model.modules():
        if isinstance(m, DROPOUT_TYPES):
            m.train()
    # Seeded on its own so the evaluation does not depend on (or disturb) the training RNG stream.
    fork = [x.device] if x.device.type == "cuda" else []
    with torch.random.fork_rng(devices=fork):
        torch.manual_seed(seed)
        # One image's pass first: it once sized the sum, and its dropout masks are part of the seeded stream that
        # every recorded MC-dropout result was drawn from (kept, so those results stay bitwise the same).
        model(x[:1])
        probs = None
        for _ in range(passes):
            p = probabilities(model, x, batch_size)
            probs = p if probs is None else probs + p
    model.train(was_training)
    return summarize_probs(probs / passes, y, bins)
