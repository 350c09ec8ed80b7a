"""The state of a run between two epochs, in one object: what a checkpoint holds and a resume restores.

:class:`RunState` spells the checkpoint payload once (``state_dict``) and unpacks it once (``load_state_dict``);
the payload's keys are those regbench has always written, so checkpoints of earlier versions resume and a
checkpoint stays loadable with ``torch.load(weights_only=True)`` (tensors, primitives, dicts and lists only).
"""

from __future__ import annotations

import json
import logging
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional

import torch
from torch import nn

from regbench.checkpoint import (
    Checkpoints,
    capture_rng,
    config_differences,
    restore_rng,
)
from regbench.errors import RegbenchError
from regbench.logs import read_metrics
from regbench.records import EVALUATION_COLUMNS, METRIC_COLUMNS, monitor_sign
from regbench.rundir import RESUME_MAY_DIFFER

log = logging.getLogger(__name__)


@dataclass
class RunState:
    """Model, optimizer, schedule, AMP scaler, regularizer stack and data-order generator of a run, with its
    position (epoch, step), its best epoch so far (by ``monitor``), every epoch's metrics row and the resolved
    config it was started with."""

    model: nn.Module
    optimizer: torch.optim.Optimizer
    scheduler: Any  # an LR scheduler, or None (a constant learning rate)
    scaler: Optional[torch.amp.GradScaler]
    stack: Any  # regbench.regularizers.Stack
    order: torch.Generator  # the data order: shuffles every epoch's batches
    config: dict  # the resolved config (a resume must be started with the same one)
    monitor: str = "val_loss"
    epoch: int = 0
    step: int = 0
    best_score: float = math.inf  # monitor_sign(monitor) * the best epoch's value: lower is better
    best_row: Optional[dict] = None
    history: list[dict] = field(default_factory=list)  # every epoch's metrics row (restores metrics.csv)
    # The rows as the checkpoint holds them: one JSON text per row, encoded once. torch.save's pickler calls a
    # Python hook for every object it writes (~9 us per row as a dict): a 300-epoch run spent 2.7 ms of each
    # epoch's checkpoint on its history; one string is one object.
    _history_json: list[str] = field(default_factory=list)

    def end_epoch(self, row: dict) -> bool:
        """Record a finished epoch's metrics row; True when it is the best epoch so far (an epoch without
        validation metrics, see trainer.eval_every, never is)."""
        self.history.append(row)
        self._history_json.append(json.dumps(row))
        self.epoch = row["epoch"]
        if row[self.monitor] is None:
            return False
        score = monitor_sign(self.monitor) * row[self.monitor]
        improved = score < self.best_score
        if improved:
            self.best_score, self.best_row = score, dict(row)
        return improved

    def state_dict(self) -> dict[str, Any]:
        """The checkpoint payload (its key order is the one earlier regbench versions wrote)."""
        return {
            "model": self.model.state_dict(), "optimizer": self.optimizer.state_dict(),
            "scheduler": self.scheduler.state_dict() if self.scheduler is not None else None,
            "scaler": self.scaler.state_dict() if self.scaler is not None else None,
            "regularizers": self.stack.state_dict(), "rng": capture_rng(self.order),
            "epoch": self.epoch, "step": self.step, "metrics": self.history[-1] if self.history else None,
            "best_score": self.best_score, "best_row": self.best_row, "config": self.config,
            "history": "[" + ",".join(self._history_json) + "]",
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Continue from a checkpoint payload (``history``: the rows of every epoch up to its own)."""
        self.model.load_state_dict(state["model"])
        self.optimizer.load_state_dict(state["optimizer"])
        if self.scheduler is not None:
            self.scheduler.load_state_dict(state["scheduler"])
        if self.scaler is not None and state["scaler"] is not None:
            self.scaler.load_state_dict(state["scaler"])
        self.stack.load_state_dict(state["regularizers"])
        restore_rng(state["rng"], self.order)
        self.epoch, self.step = state["epoch"], state["step"]
        self.best_score, self.best_row = state["best_score"], state["best_row"]
        self.history = checkpoint_rows(state["history"])
        self._history_json = [json.dumps(row) for row in self.history]


def checkpoint_rows(history: Any, epoch: Optional[int] = None) -> list[dict]:
    """The metrics rows a checkpoint's ``history`` holds — JSON text (this regbench) or a list of rows (earlier
    ones) — checked as data: rows of metrics.csv's columns holding numbers (nothing only in the evaluation
    columns), of epochs 1.. in order (up to ``epoch``, the checkpoint's own, when given). Raises ValueError."""
    rows = json.loads(history) if isinstance(history, str) else history
    if not isinstance(rows, list):
        raise ValueError("its history is not a list of rows")
    for i, row in enumerate(rows, 1):
        if not isinstance(row, dict) or set(row) != set(METRIC_COLUMNS):
            raise ValueError(f"row {i} of its history does not have metrics.csv's columns")
        bad = [k for k, v in row.items() if (v is not None or k not in EVALUATION_COLUMNS)
               and (isinstance(v, bool) or not isinstance(v, (int, float)))]
        if bad or not isinstance(row["epoch"], int) or not isinstance(row["step"], int):
            raise ValueError(f"row {i} of its history holds a non-number ({(bad or ['epoch'])[0]})")
        if row["epoch"] != i:
            raise ValueError(f"row {i} of its history is of epoch {row['epoch']}")
    if epoch is not None and len(rows) != epoch:
        raise ValueError(f"its history holds {len(rows)} rows for epoch {epoch}")
    return rows


def restore_latest(state: RunState, ckpts: Checkpoints, run_dir: Path,
           device: torch.device, at_most_epoch: Optional[int] = None) -> tuple[Optional[list[dict]], list[str]]:
    """Load the newest usable checkpoint of ``run_dir`` (onto ``device``) into ``state``. Returns (the rows metrics.csv gets back,
    None to keep its own; a warning per checkpoint that could not be used). A checkpoint written with another
    config is refused with one line; without any usable checkpoint the run starts from epoch 1."""
    payload, warnings = ckpts.load_latest(device, at_most_epoch)
    for w in warnings:
        log.warning("warning: %s", w)
    restore = None
    if payload is not None:
        differ = config_differences(payload["config"], state.config, RESUME_MAY_DIFFER)
        if differ:
            raise RegbenchError(f"cannot resume {run_dir}: its checkpoint was written with another config; keys "
                                f"that differ: {'; '.join(differ)}; fix: resume with the run's own config "
                                f"(`regbench resume {run_dir}`) or start a new run folder")
        try:
            history, restore = resumed_rows(run_dir, payload)  # a checkpoint of an older regbench holds no rows
            state.load_state_dict({**payload, "history": history})
        except (KeyError, TypeError, ValueError, RuntimeError, IndexError, RecursionError) as e:  # made by hand
            why = (str(e).strip().splitlines() or [type(e).__name__])[0][:160]
            raise RegbenchError(f"cannot resume {run_dir}: its checkpoint of epoch {payload.get('epoch')} is not "
                                f"one regbench wrote ({why}); fix: delete that checkpoint to resume from the one "
                                "before, or start a new run folder") from None
        log.info("resuming %s from epoch %d", run_dir, state.epoch)
    else:
        log.warning("warning: %s has no usable checkpoint; starting it from epoch 1", run_dir)
    ckpts.clean_temporaries()  # only now: a refused resume leaves the folder as it was
    return restore, warnings


def resumed_rows(run_dir: Path, state: dict) -> tuple[list[dict], Optional[list[dict]]]:
    """(metrics rows of epochs 1..the checkpoint's, the rows to write back into metrics.csv or None to keep its
    own). A checkpoint holds every row so far (metrics.csv may have lost some); one written by an older regbench
    holds none, and then metrics.csv must hold them all, or the resumed run would have a gap."""

    if "history" in state:
        rows = checkpoint_rows(state["history"], state["epoch"])  # ValueError: refused by the caller
        return rows, list(rows)
    epoch = state["epoch"]
    rows = [{**r, "step": int(r["step"])} for r in read_metrics(run_dir / "metrics.csv") if r["epoch"] <= epoch]
    missing = sorted(set(range(1, epoch + 1)) - {r["epoch"] for r in rows})
    if missing:
        raise RegbenchError(f"cannot resume {run_dir}: metrics.csv lacks the rows of epochs "
                            f"{', '.join(map(str, missing))} and its checkpoint (written by an older regbench) holds "
                            "no copy of them; fix: put the rows back into metrics.csv, or start a new run folder")
    return rows, None


def last_row(run_dir: Path) -> Optional[dict]:
    """The last complete row of the run's metrics.csv (None when it has none): a run resumed after its last epoch
    was checkpointed ends with it."""
    rows = read_metrics(run_dir / "metrics.csv")
    return rows[-1] if rows else None
