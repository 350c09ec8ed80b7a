"""The one interface every regularizer implements: optional hooks the training loop calls.

A regularizer overrides only the hooks it needs; the defaults do nothing. Adding one = a module in this
package with a schema dataclass and a ``Regularizer`` subclass decorated with ``@register``, its name placed
in ``ORDER`` (regularizers/__init__.py), a YAML file in ``configs/regularizer/``, and a test.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, ClassVar, Optional

import torch
from omegaconf import DictConfig

from regbench.errors import RegbenchError
from regbench.models.slots import LayerSlots
from torch import nn

REGISTRY: dict[str, type["Regularizer"]] = {}


def register(cls: type["Regularizer"]) -> type["Regularizer"]:
    REGISTRY[cls.name] = cls
    return cls


@dataclass
class Context:
    """What a regularizer may look at when it is checked and set up: the whole config and the run's facts."""

    cfg: DictConfig
    num_classes: int = 10
    device: torch.device = field(default_factory=lambda: torch.device("cpu"))


class Regularizer:
    name: ClassVar[str]
    schema: ClassVar[type]
    # The position in the stack is the name's place in regularizers.ORDER (one list, not a number per member).

    def __init__(self, cfg: DictConfig):
        self.cfg = cfg

    @property
    def key(self) -> str:
        return f"regularizer.{self.name}"

    def nothing(self, why: str, fix: str) -> RegbenchError:
        """The error for a member that would apply to nothing: a run recording it as applied would be
        bitwise the run without it. (A zero strength — rate 0, λ = 0 — is allowed: a sweep's baseline point.)"""
        return RegbenchError(f"regularizer member '{self.name}' applies to nothing: {why}; fix: {fix}")

    # --- construction ---------------------------------------------------------------------------
    def check(self, ctx: Context) -> None:
        """Raise ConfigError if this regularizer cannot apply to the chosen model/optimizer/data.

        Pure: it only reads (config validation builds and checks a stack that is then thrown away); state
        belongs in ``__init__`` or :meth:`setup`."""

    def fill_slots(self, slots: LayerSlots, ctx: Context) -> None:
        """Ask for layers in the model with ``slots.set(slot, value, key)`` (dropout rates, a normalisation,
        drop-path...); the model applies them or refuses with a ConfigError naming ``key``."""

    def setup(self, model: nn.Module, ctx: Context) -> None:
        """Called once the model exists (load pretrained weights, freeze layers...)."""

    def param_groups(self, model: nn.Module, optimizer_cfg: DictConfig, ctx: Context) -> Optional[list[dict]]:
        """Optimizer parameter groups, or None to leave the default single group."""
        return None

    # --- every step -----------------------------------------------------------------------------
    def penalty(self, model: nn.Module) -> Optional[torch.Tensor]:
        """A term added to the training loss (logged apart from the data loss)."""
        return None

    def loss_options(self) -> dict[str, Any]:
        """Keyword arguments for the training cross-entropy (e.g. label_smoothing)."""
        return {}

    def before_step(self, model: nn.Module, optimizer: torch.optim.Optimizer, scaler) -> None:
        """After backward, before optimizer.step() (gradient clipping, decoupled decay)."""

    # --- every epoch / the end ------------------------------------------------------------------
    def on_epoch_end(self, epoch: int, row: dict, model: nn.Module) -> bool:
        """Return True to stop training after this epoch."""
        return False

    def on_train_end(self, model: nn.Module, ctx: Context) -> None:
        """Once after the last epoch, before the test evaluation (e.g. restore the best weights)."""

    def final_eval(self, model: nn.Module, x: torch.Tensor, y: torch.Tensor, evaluate) -> Optional[dict]:
        """An extra evaluation of the test set reported beside the plain one (MC dropout, ensembles)."""
        return None

    @property
    def stopped(self) -> bool:
        """True once this member asked training to stop (and still after a resume)."""
        return False

    # --- what it did ----------------------------------------------------------------------------
    def info(self) -> Optional[dict[str, Any]]:
        """Facts for summary.json's ``regularizer_info`` (what it applied to), or None when it has none."""
        return None

    def log_info(self, model: nn.Module) -> None:
        """Log this member's own lines once the run is set up (e.g. how many parameters it applies to)."""

    # --- checkpoints ----------------------------------------------------------------------------
    def state_dict(self) -> dict[str, Any]:
        """What this member must carry across a resume (tensors and primitives only)."""
        return {}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore what :meth:`state_dict` returned."""
