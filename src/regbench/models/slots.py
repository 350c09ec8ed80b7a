"""The layer slots: what a regularizer member may ask of a model's layers, in layer words.

Members fill slots (``Regularizer.fill_slots(slots, ctx)``); each model family applies the slots it has a
place for and refuses the others with a ConfigError naming the key that filled them. A slot filled twice
(two members configuring the same part of the model) is an error. Unfilled slots leave the model as its own
config builds it.
"""

from __future__ import annotations

from dataclasses import dataclass, field, fields
from typing import Any, Optional, Sequence, Union

from regbench.errors import ConfigError, RegbenchError

Rates = Union[float, Sequence[float]]


@dataclass(frozen=True)
class NormSpec:
    """A normalisation layer between each dense/conv layer and its activation."""

    kind: str  # batchnorm | layer_norm | group_norm
    momentum: float = 0.1  # torch's convention: running <- (1 - m)·running + m·batch
    eps: float = 1e-5
    groups: int = 8  # group_norm only


@dataclass
class LayerSlots:
    dropout: Optional[Rates] = None  # unit dropout: one rate, or one per layer where the model has several sites
    dropout_placement: str = "after_activation"  # after_activation | before_activation
    spatial_dropout: float = 0.0  # Dropout2d (whole feature maps) after every conv
    norm: Optional[NormSpec] = None
    drop_path: float = 0.0  # stochastic depth: drop rate of the deepest residual branch
    drop_path_rule: str = "linear"  # linear: block l of L drops with l/L·drop_path | uniform: every block drop_path
    keys: dict[str, str] = field(default_factory=dict)  # slot -> the config key that filled it

    def set(self, slot: str, value: Any, key: str) -> None:
        """Fill ``slot`` with ``value``; ``key`` (e.g. regularizer.dropout.rate) names it in errors."""
        if slot not in SLOT_NAMES:
            raise ValueError(f"no layer slot {slot!r}")  # a programming error
        if slot in self.keys:
            members = [member_of(self.keys[slot]), member_of(key)]
            raise ConfigError("regularizer", members, f"members that configure different parts of the model "
                              f"('{slot}' is set twice)")
        setattr(self, slot, value)
        self.keys[slot] = key

    def filled(self, slot: str) -> bool:
        return slot in self.keys

    def key(self, slot: str) -> str:
        return self.keys[slot]

    def member(self, slot: str) -> str:
        return member_of(self.keys[slot])

    def rate_list(self) -> list[float]:
        """The dropout slot as a list of rates ([] when unfilled)."""
        if self.dropout is None:
            return []
        return [self.dropout] if isinstance(self.dropout, (int, float)) else list(self.dropout)


SLOT_NAMES = tuple(f.name for f in fields(LayerSlots) if f.name != "keys")


def member_of(key: str) -> str:
    """regularizer.<member>.<key> -> <member>."""
    parts = key.split(".")
    return parts[1] if len(parts) > 1 else key


def applies_to_nothing(member: str, why: str, fix: str) -> RegbenchError:
    """A member whose slot has no place in this model: the run would record it, yet be bitwise the run without it."""
    return RegbenchError(f"regularizer member '{member}' applies to nothing: {why}; fix: {fix}")


def refuse(slots: LayerSlots, slot: str, model: str, why: str, fix: str) -> ConfigError:
    """The error for a filled slot ``model`` cannot apply: names the key that filled it and its value."""
    return ConfigError(slots.key(slot), _value(getattr(slots, slot)), f"{_unset(slot)} with model={model} ({why})",
                       fix)


def refuse_drop_path(slots: LayerSlots, model: str) -> ConfigError:
    """Stochastic depth on a model without residual branches."""
    return ConfigError(slots.key("drop_path"), slots.drop_path, f"a model with residual branches to drop "
                       f"(model={model} has none)", f"use model=resnet, or drop {slots.member('drop_path')} "
                       "from the stack")


def _unset(slot: str) -> str:
    return {"dropout_placement": "after_activation", "norm": "no normalisation member"}.get(slot, "0")


def _value(value: Any) -> Any:
    return value.kind if isinstance(value, NormSpec) else value


def drop_path_rates(slots: LayerSlots, blocks: int) -> list[float]:
    """One drop rate per residual block, shallow to deep (Huang et al. 2016's linear decay: block l of L drops
    with probability l/L·p_L, so the first block is almost always kept and the last drops with p_L)."""
    if slots.drop_path_rule == "uniform":
        return [slots.drop_path] * blocks
    return [slots.drop_path * (i + 1) / blocks for i in range(blocks)]
