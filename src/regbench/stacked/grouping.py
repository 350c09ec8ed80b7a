"""Which jobs of a sweep may train in one stack: the stack key (what they must share) and the jobs that cannot
be stacked at all.

Members of one stack take their steps together, so they share everything structural: the model, the data (and
batch size), the epochs, the device, the optimizer's kind and flags, the norms, the augmentation ops. Inside a
stack each member keeps its own: seed, optimizer hyperparameters, schedule, regularizer strengths (and whether
it has a strength-only member at all: a member without l2 has λ = 0), dropout rates, early stopping and the
evaluation-only members, augmentation parameters. Each choice is a line in the tables below.
"""

from __future__ import annotations

import json
from typing import Any, Optional

from omegaconf import DictConfig, OmegaConf

# Regularizer members that need not be shared: their strengths are per-member values of the stacked step
# (regbench.stacked.step) or they act only at epoch ends / the final evaluation, on each member's own model.
# Listed keys inside them are structural all the same (they change the step's shape, not a strength).
FREE_MEMBERS: dict[str, tuple[str, ...]] = {
    "l1": (), "l2": (), "elastic_net": (),  # λ, ratio, half, which parameters: per member
    "weight_decay": ("mode", "exclude_bias_and_norm"),  # the rate per member; how it is applied is shared
    "dropout": ("placement", "spatial>0"),  # rates per member (absent = 0); where the layers are is shared
    "label_smoothing": (),  # α per member
    "grad_clip": ("mode", "norm_type"),  # max per member (absent = no clipping)
    "early_stopping": (),  # every member stops on its own
    "mc_dropout": (), "ensemble": (),  # final evaluations of each member's own model
}
# The structural keys' defaults: a member left at them stacks with runs that do not have the member at all
# (regularizer=[dropout] beside regularizer=[]: rate 0 in the latter).
STRUCTURAL_DEFAULTS = {"weight_decay": {"mode": "decoupled", "exclude_bias_and_norm": True},
                       "dropout": {"placement": "after_activation", "spatial>0": False},
                       "grad_clip": {"mode": "norm", "norm_type": 2.0}}
# Members that cannot be in a stack: the job runs the ordinary way.
NOT_STACKABLE = {
    "transfer": "it loads pretrained weights and freezes layers per run",
    "fine_tune": "it freezes and unfreezes layers during the run",
    "stochastic_depth": "it draws per-sample randomness inside the forward pass",
    "bagging": "a bagging run is a stack of its own",
}
# trainer keys each member may set for itself (everything else under trainer is shared)
FREE_TRAINER = ("num_threads", "progress_bar", "resume", "monitor", "checkpoint_every", "keep_last",
                "save_checkpoints", "clean_subset", "eval_every", "fused", "fast_step")  # fast_step: single runs only
# optimizer keys that are flags of the update rule (shared); the others are per-member hyperparameters
OPTIMIZER_FLAGS = ("name", "nesterov", "amsgrad", "centered")


def stack_key(cfg: DictConfig) -> tuple[Optional[str], str]:
    """(the key every job of one stack shares, "") or (None, why this job cannot be stacked)."""
    c: dict[str, Any] = OmegaConf.to_container(cfg, resolve=True)
    c.pop("hydra", None)
    why = _not_stackable(c)
    if why:
        return None, why
    c.pop("seed", None)
    c.pop("scheduler", None)  # each member's own schedule drives its own optimizer
    c["optimizer"] = {k: v for k, v in c["optimizer"].items() if k in OPTIMIZER_FLAGS}
    c["trainer"] = {k: v for k, v in c["trainer"].items() if k not in FREE_TRAINER}
    c["regularizer"] = {name: _structural(name, member) for name, member in (c.get("regularizer") or {}).items()}
    c["regularizer"] = {name: v for name, v in c["regularizer"].items() if v is not None}
    aug = c.get("augmentation") or {}
    c["augmentation"] = sorted(str(op.get("op", op) if isinstance(op, dict) else op) for op in (aug.get("ops") or []))
    return json.dumps(c, sort_keys=True, default=str), ""


def _not_stackable(c: dict) -> Optional[str]:
    for name in c.get("regularizer") or {}:
        if name in NOT_STACKABLE:
            return f"regularizer member {name}: {NOT_STACKABLE[name]}"
    t = c["trainer"]
    if t.get("amp") not in (None, "none"):
        return f"trainer.amp={t['amp']} (a stack trains in float32)"
    if t.get("compile") not in (None, "none"):
        return f"trainer.compile={t['compile']} (a stack runs uncompiled)"
    if c["model"].get("name") == "torchvision":
        return "model=torchvision (its layers are torchvision's: not stacked)"
    return None


def _structural(name: str, member: Any) -> Optional[dict]:
    """The part of a member's config every member of the stack must share (None: nothing)."""
    if name not in FREE_MEMBERS:
        return member  # a norm, ...: all of it is shared
    out = {}
    for key in FREE_MEMBERS[name]:
        out[key] = bool(member.get(key[:-2]) or 0) if key.endswith(">0") else member.get(key)
    return None if not out or out == STRUCTURAL_DEFAULTS.get(name) else out


def group_jobs(keys: list[Optional[str]], max_members: int) -> list[list[int]]:
    """Indices of the stackable jobs (key not None) grouped by key in job order, each group cut into stacks of at
    most ``max_members``."""
    groups: dict[str, list[int]] = {}
    for i, key in enumerate(keys):
        if key is not None:
            groups.setdefault(key, []).append(i)
    return [idx[j:j + max_members] for idx in groups.values() for j in range(0, len(idx), max_members)]
