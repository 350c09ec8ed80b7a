"""Which jobs of a sweep may train in one stack: the stack key (what they must share) and the jobs that cannot
be stacked at all.

Members of one stack take their steps together, so they share everything structural: the model, the data (and
batch size), the epochs, the device, the optimizer's kind and flags, the augmentation ops (with their parameters:
each member draws its own augmentation, by the same ops), and of each regularizer
member what it declares shared (regbench.regularizers.base.Stacking: the norms all of their config, weight decay its
mode...). Inside a stack each member keeps its own: seed, optimizer hyperparameters, schedule, the rest of its
regularizer members (strengths: a member without l2 has λ = 0; dropout rates; early stopping and the
evaluation-only members). What keeps a job out of a stack is asked of
regbench.regularizers.stacking (the members' own declarations, amp, compile, torchvision).
"""

from __future__ import annotations

import json
from typing import Any, Optional

from omegaconf import DictConfig, OmegaConf

from regbench.regularizers.stacking import shared_part, stack_refusals

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
    c["regularizer"] = {name: shared_part(name, member) for name, member in (c.get("regularizer") or {}).items()}
    c["regularizer"] = {name: v for name, v in c["regularizer"].items() if v is not None}
    # The ops with their parameters, as the engine requires them alike (engine._SHARED: augmentation.ops); keyed on
    # the op names only, a sweep over an op's parameter was grouped into one stack and then refused by the engine.
    c["augmentation"] = (c.get("augmentation") or {}).get("ops") or []
    return json.dumps(c, sort_keys=True, default=str), ""


def _not_stackable(c: dict) -> Optional[str]:
    refusals = stack_refusals(c)
    if not refusals:
        return None
    r = refusals[0]
    return f"regularizer member {r.value}: {r.why}" if r.key == "regularizer" else f"{r.key}={r.value} ({r.why})"


def group_jobs(keys: list[Optional[str]], max_members: int) -> list[list[int]]:
    """Indices of the stackable jobs (key not None) grouped by key in job order, each group cut into stacks of at
    most ``max_members``."""
    groups: dict[str, list[int]] = {}
    for i, key in enumerate(keys):
        if key is not None:
            groups.setdefault(key, []).append(i)
    return [idx[j:j + max_members] for idx in groups.values() for j in range(0, len(idx), max_members)]
