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


@dataclass(frozen=True)
class DropBlockSpec:
    """DropBlock (Ghiasi et al. 2018, timm's DropBlock2d) in a conv model's deepest two stages or blocks: the drop
    probability, and per place (one value for all, or a tuple of one per place, shallow to deep) the block size
    (clipped to the feature map) and gamma's scale."""

    rate: float
    block_size: Union[int, tuple[int, ...]] = 7
    gamma_scale: Union[float, tuple[float, ...]] = 1.0

    def per_place(self, places: int) -> list[tuple[int, float]]:
        """(block size, gamma scale) for each of ``places`` places (lists checked by the model's check_slots)."""
        sizes = self.block_size if isinstance(self.block_size, tuple) else (self.block_size,) * places
        scales = self.gamma_scale if isinstance(self.gamma_scale, tuple) else (self.gamma_scale,) * places
        return list(zip(sizes, scales))


@dataclass
class LayerSlots:
    dropout: Optional[Rates] = None  # unit dropout: one rate, or one per layer where the model has several sites
    dropout_placement: str = "after_activation"  # after_activation | before_activation
    spatial_dropout: float = 0.0  # Dropout2d (whole feature maps) after every conv
    norm: Optional[NormSpec] = None
    drop_path: float = 0.0  # stochastic depth: drop rate of the deepest residual branch
    drop_path_rule: str = "linear"  # linear: block l of L drops with l/L·drop_path | uniform: every block drop_path
    # Keras' noise layers (training only; evaluation is the identity):
    gaussian_noise: float = 0.0  # GaussianNoise(σ): adds N(0, σ²)
    gaussian_noise_placement: str = "input"  # input: on the model's input | hidden: where dropout goes
    gaussian_dropout: float = 0.0  # GaussianDropout(rate): multiplies by N(1, rate/(1−rate)), where dropout goes
    alpha_dropout: float = 0.0  # AlphaDropout(rate) for SELU networks, where dropout goes
    drop_block: Optional[DropBlockSpec] = None  # DropBlock in a conv model's deepest two stages (blocks)
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
DEFAULTS = {f.name: f.default for f in fields(LayerSlots) if f.name != "keys"}


def member_of(key: str) -> str:
    """regularizer.<member>.<key> -> <member>."""
    parts = key.split(".")
    return parts[1] if len(parts) > 1 else key


def applies_to_nothing(member: str, why: str, fix: str) -> RegbenchError:
    """A member whose slot has no place in this model: the run would record it, yet be bitwise the run without it."""
    return RegbenchError(f"regularizer member '{member}' applies to nothing: {why}; fix: {fix}")


# Slots whose filling alone asks for layers; the others modify those layers and only ask when they differ from
# their default (dropout's spatial rate 0 or placement after_activation ask nothing of an MLP).
ASKS_WHEN_FILLED = {"dropout", "norm", "drop_path", "gaussian_noise", "gaussian_dropout", "alpha_dropout",
                    "drop_block"}

# How a model refuses a slot it has no place for: (expected, why, fix), formatted with model=, why=, member=.
REFUSALS = {
    "dropout": ("a model with a place for dropout (model={model}: {why})", "it has none", "drop {member} from the stack"),
    "dropout_placement": ("after_activation with model={model} ({why})", "its dropout has no activation after it",
                          "drop the key"),
    "spatial_dropout": ("0 with model={model} (spatial dropout drops conv feature maps; {why})",
                        "model={model} has no place for it", "use model=lecture_cnn or drop the key"),
    "norm": ("a model with a place for normalisation (model={model}: {why})", "it has none",
             "drop {member} from the stack"),
    "drop_path": ("a model with residual branches to drop (model={model} has none)", "", "use model=resnet, or "
                  "drop {member} from the stack"),
    "drop_path_rule": ("to be left alone with model={model} (no residual branches to drop)", "", "drop the key"),
    "gaussian_noise": ("a model with a place for noise layers (model={model}: {why})", "it has none",
                       "drop {member} from the stack"),
    "gaussian_noise_placement": ("input with model={model} ({why})", "it has no hidden layer to add noise to",
                                 "drop the key"),
    "gaussian_dropout": ("a model with a place for dropout (model={model}: {why})", "it has none",
                         "drop {member} from the stack"),
    "alpha_dropout": ("a SELU network (model={model}: {why})", "it has no SELU activations",
                      "use model=mlp or lecture_cnn with model.activation=selu, or drop {member} from the stack"),
    "drop_block": ("a convolutional model (model={model}: {why})", "it has no conv feature maps to drop blocks of",
                   "use model=lecture_cnn or resnet, or drop {member} from the stack"),
}

if set(REFUSALS) != set(SLOT_NAMES):  # a new slot needs its refusal text
    raise RuntimeError(f"slots without a refusal in REFUSALS: {sorted(set(SLOT_NAMES) - set(REFUSALS))}")


def refuse_unapplied(slots: LayerSlots, model: str, applies: set[str], why: Optional[dict[str, str]] = None) -> None:
    """Raise ConfigError for the first slot that asks for layers ``model`` has no place for (``applies`` lists the
    slots it does apply; ``why`` overrides the reason given for a slot). A new slot is refused by every model that
    does not list it: never silently ignored."""
    for slot in SLOT_NAMES:
        if slot in applies or not slots.filled(slot):
            continue
        value = getattr(slots, slot)
        if slot not in ASKS_WHEN_FILLED and value == DEFAULTS[slot]:
            continue
        expected, reason, fix = REFUSALS[slot]
        reason = (why or {}).get(slot, reason).format(model=model)
        member = slots.member(slot)
        raise ConfigError(slots.key(slot), _value(value), expected.format(model=model, why=reason),
                          fix.format(member=member))


def _value(value: Any) -> Any:
    if isinstance(value, DropBlockSpec):
        return value.rate
    return value.kind if isinstance(value, NormSpec) else value


def drop_path_rates(slots: LayerSlots, blocks: int) -> list[float]:
    """One drop rate per residual block, shallow to deep (Huang et al. 2016's linear decay: block l of L drops
    with probability l/L·p_L, so the first block is almost always kept and the last drops with p_L)."""
    if slots.drop_path_rule == "uniform":
        return [slots.drop_path] * blocks
    return [slots.drop_path * (i + 1) / blocks for i in range(blocks)]
