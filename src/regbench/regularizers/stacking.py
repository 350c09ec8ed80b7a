"""What keeps a run out of a stack, and what of its members a stack shares, asked of the members' own declarations
(:class:`~regbench.regularizers.base.Stacking`). The one place the stack-wide refusals are written: the launcher's
grouping (regbench.stacked.grouping), the stacked engine and the bagging member ask :func:`stack_refusals` and
phrase the answer as their own error.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Collection, Mapping, Optional

from regbench.regularizers.base import REGISTRY


@dataclass(frozen=True)
class Refusal:
    """One reason a run cannot train in a stack: ``key=value`` (``regularizer=<member>`` for a member), why, and
    the fix (an override, or a phrase for a member: the caller knows its own way out)."""

    key: str
    value: Any
    why: str
    fix: str


# What a stack itself cannot do, whatever its members: (trainer key, why a value other than none is refused).
_TRAINER = (("amp", "a stack trains in float32"), ("compile", "a stack runs uncompiled"))


def member_refusal(name: str) -> Optional[str]:
    """Why member ``name`` cannot train in a stack (a clause after "it"), or None; an unknown name: None (the run's
    own validation refuses it)."""
    cls = REGISTRY.get(name)
    return None if cls is None else cls.stacking.refusal(cls)


def shared_part(name: str, member_cfg: Any) -> Optional[dict]:
    """The part of member ``name``'s config (a mapping) every member of a stack shares; None: nothing."""
    cls = REGISTRY.get(name)
    if cls is None:
        return member_cfg  # not a member: the run's own validation refuses it
    return cls.stacking.structure(cls, member_cfg)


def stack_refusals(cfg: Mapping, ignore: Collection[str] = ()) -> list[Refusal]:
    """Everything in a run's config (a DictConfig or its plain container) that keeps it out of a stack, in this
    order: its members that cannot be stacked (as listed; ``ignore``: members left out, e.g. bagging asking for its
    members' config, which drops bagging), trainer.amp, trainer.compile, model=torchvision. [] : it can be stacked."""
    out = []
    for name in cfg.get("regularizer") or {}:
        why = None if name in ignore else member_refusal(name)
        if why:
            out.append(Refusal("regularizer", name, why, f"drop {name} from the regularizer list"))
    trainer = cfg["trainer"]
    for key, why in _TRAINER:
        if trainer.get(key) not in (None, "none"):
            out.append(Refusal(f"trainer.{key}", trainer[key], why, f"trainer.{key}=none"))
    if cfg["model"].get("name") == "torchvision":
        out.append(Refusal("model", "torchvision", "its layers are torchvision's, which a stack does not batch",
                           "model=mlp, lecture_cnn or resnet (regbench's own layers)"))
    return out
