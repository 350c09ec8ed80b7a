"""The model families, one module each, found here by name: adding a family = its module in this folder (a
class registered with ``@MODELS.register(name, schema=..., check=...)``), its YAML in configs/model/, its test.

A family's registered class provides:

- ``from_config(node, input_shape, num_classes, slots)``: the model for inputs of ``input_shape`` (C, H, W);
- ``check_slots(node, slots)``: raise ConfigError for a filled :class:`LayerSlots` slot it cannot apply
  (called when the stack is built, so before anything runs, and again by :func:`build_model`);
- ``weight_layers(node)``: its dense/conv layer count from the config alone, or None when unknown.
"""

from __future__ import annotations

import importlib
import pkgutil
from typing import Any, Optional, Sequence

from omegaconf import DictConfig
from torch import nn

from regbench.models.common import KERAS_TRUNCATION, init_weights, make_activation, make_norm
from regbench.models.slots import LayerSlots, NormSpec
from regbench.registry import MODELS

_PRIVATE = {"common", "slots"}  # shared code, not families
for _module in pkgutil.iter_modules(__path__):
    if _module.name not in _PRIVATE:
        importlib.import_module(f"{__name__}.{_module.name}")

from regbench.models.lecture_cnn import LectureCNN  # noqa: E402  (registered above; re-exported for callers)
from regbench.models.mlp import MLP  # noqa: E402

__all__ = ["KERAS_TRUNCATION", "LayerSlots", "LectureCNN", "MLP", "MODELS", "NormSpec", "build_model",
           "check_slots", "count_parameters", "init_weights", "make_activation", "make_norm", "weight_layer_count"]


def check_slots(node: Any, slots: LayerSlots) -> None:
    """Raise ConfigError if the family ``node.name`` cannot apply a filled slot."""
    MODELS[node.name].obj.check_slots(node, slots)


def build_model(cfg: DictConfig, input_shape: Sequence[int], num_classes: int,
                slots: Optional[LayerSlots] = None) -> nn.Module:
    """Model named by ``cfg.name`` for inputs of ``input_shape`` (C, H, W); ``slots`` come from the regularizers."""
    slots = LayerSlots() if slots is None else slots
    family = MODELS[cfg.name].obj
    family.check_slots(cfg, slots)
    return family.from_config(cfg, input_shape, num_classes, slots)


def weight_layer_count(node: Any) -> Optional[int]:
    """Dense and conv layers of the configured model, from its config alone; None when the family cannot tell."""
    return MODELS[node.name].obj.weight_layers(node)


def count_parameters(model: nn.Module) -> dict[str, int]:
    """Trainable and frozen parameter counts, and running-statistic buffer values (BN means/variances).

    Integer buffers such as BatchNorm's ``num_batches_tracked`` are not counted (Keras has none).
    """
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    frozen = sum(p.numel() for p in model.parameters() if not p.requires_grad)
    buffers = sum(b.numel() for b in model.buffers() if b.is_floating_point())
    return {"trainable": trainable, "frozen": frozen, "buffers": buffers, "total": trainable + frozen + buffers}
