"""What a run's convention (``convention=torch|keras``, docs/conventions.md) amounts to, read back from the built
objects: the values the model, the optimizer, the batch norm layers and the data split actually use.

The convention itself is plain config composition (configs/convention/); this record in summary.json shows
that each of its values reached the run.
"""

from __future__ import annotations

from typing import Any

import torch
from omegaconf import DictConfig
from torch import nn

# The hyperparameters of torch.optim optimizers that the two conventions set differently (or that the record
# should show beside them); each is reported only when the optimizer has it.
OPTIMIZER_KEYS = ("lr", "betas", "eps", "alpha", "momentum", "initial_accumulator_value", "weight_decay")


def effective(cfg: DictConfig, model: nn.Module, optimizer: torch.optim.Optimizer) -> dict[str, Any]:
    """The convention's values as the run uses them (summary.json ``convention``)."""
    group = optimizer.param_groups[0]
    m = cfg.model
    record: dict[str, Any] = {
        "name": cfg.convention,
        "optimizer": {k: (list(group[k]) if isinstance(group[k], tuple) else group[k])
                      for k in OPTIMIZER_KEYS if k in group},
        "batch_size": cfg.data.batch_size,
        "val_split": cfg.data.val_split,
        "val_fraction": cfg.data.val_fraction,
    }
    if "init" in m:
        bias = m.bias_init if "bias_init" in m and m.bias_init is not None else (
            "torch" if m.init == "default" else "zeros")
        record["init"] = {"kernel": m.init, "bias": bias}
    bn = next((x for x in model.modules() if isinstance(x, nn.modules.batchnorm._BatchNorm)), None)
    if bn is not None:
        record["batchnorm"] = {"torch_momentum": bn.momentum, "keras_momentum": 1.0 - bn.momentum, "eps": bn.eps}
    return record
