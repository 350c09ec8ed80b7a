"""A run's records as types: the epoch row (its fields ARE the metrics.csv columns and name the TensorBoard
tags) and the summary (summary.json: written by ``fit`` in one place, read by ``report``, ``sweep`` and the
run-folder policy through :class:`Summary`, never by string keys).

summary.json is a contract (its keys and their order are what earlier runs wrote); a summary read from a folder
is data, never code: it is validated field by field against the types below (JSON values only) before any of it
is used.
"""

from __future__ import annotations

from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any, Optional

from regbench.io import encode_json, read_json, write_json

# The monitored value's direction, in one place: fit's best epoch, the snapshot ensemble's best epochs and the
# report's best columns all follow it (val_loss is minimised, val_acc maximised).
MONITOR_SIGN = {"val_loss": 1.0, "val_acc": -1.0}


def monitor_sign(monitor: str) -> float:
    """+1 for a value to minimise (val_loss), -1 for one to maximise (val_acc): ``sign * value`` is minimised."""
    return MONITOR_SIGN[monitor]


def _tb(tag: Optional[str] = None) -> Any:
    return field(metadata={"tb": tag} if tag else {})



@dataclass
class EpochTiming:
    """Where a session's epochs spent their time (summary.json ``timing``): training up to its once-per-epoch
    read-back, evaluation (validation, clean subset, weight norms), and the rest of the epoch's bookkeeping (logs,
    TensorBoard, encoding the checkpoint and summary.json for the background writer, waiting for its previous
    write); ``overhead`` = (evaluation + bookkeeping) / training."""

    train_s: float = 0.0
    evaluate_s: float = 0.0
    bookkeeping_s: float = 0.0

    def add(self, train: float, evaluate: float, bookkeeping: float) -> dict:
        """Add one epoch's seconds; returns the totals as summary.json records them."""
        self.train_s += train
        self.evaluate_s += evaluate
        self.bookkeeping_s += bookkeeping
        overhead = (self.evaluate_s + self.bookkeeping_s) / max(self.train_s, 1e-9)
        return {"train_s": round(self.train_s, 4), "evaluate_s": round(self.evaluate_s, 4),
                "bookkeeping_s": round(self.bookkeeping_s, 4), "overhead": round(overhead, 4)}

@dataclass
class EpochRow:
    """One epoch's metrics: a metrics.csv row (columns in field order) and its TensorBoard scalars (the ``tb``
    tag of each field; epoch and step are the axes). The clean fields are None when trainer.clean_subset=0, the
    validation, clean and gap fields on an epoch that trainer.eval_every does not evaluate."""

    epoch: int = _tb()
    step: int = _tb()
    lr: float = _tb("lr")
    train_loss: float = _tb("loss/train")
    train_penalty: float = _tb("loss/penalty")
    train_acc: float = _tb("acc/train")
    clean_train_loss: Optional[float] = _tb("loss/train_clean")
    clean_train_acc: Optional[float] = _tb("acc/train_clean")
    val_loss: Optional[float] = _tb("loss/val")
    val_acc: Optional[float] = _tb("acc/val")
    val_ece: Optional[float] = _tb("calibration/val_ece")
    gap_loss: Optional[float] = _tb("gap/loss")
    gap_acc: Optional[float] = _tb("gap/acc")
    clean_gap_loss: Optional[float] = _tb("gap/loss_clean")
    clean_gap_acc: Optional[float] = _tb("gap/acc_clean")
    weight_l1: float = _tb("weights/l1")
    weight_l2: float = _tb("weights/l2")
    epoch_time_s: float = _tb()

    @classmethod
    def measured(cls, epoch: int, step: int, lr: float, train: dict, val: Optional[dict], clean: Optional[dict],
                 norms: tuple[float, float], seconds: float) -> "EpochRow":
        """The row of one epoch from what it measured: ``train`` (loss, penalty, acc as trained), ``val`` and
        ``clean`` (evaluations: loss, acc, ece; None when not evaluated), the weight norms (l1, l2) and its wall
        time. The gaps are derived here: val − train for losses, train − val for accuracies."""
        evaluations = dict.fromkeys(EVALUATION_COLUMNS)  # all empty on an epoch trainer.eval_every skips
        if val is not None:
            evaluations.update(val_loss=val["loss"], val_acc=val["acc"], val_ece=val["ece"],
                               gap_loss=val["loss"] - train["loss"], gap_acc=train["acc"] - val["acc"])
        if val is not None and clean:
            evaluations.update(clean_train_loss=clean["loss"], clean_train_acc=clean["acc"],
                               clean_gap_loss=val["loss"] - clean["loss"], clean_gap_acc=clean["acc"] - val["acc"])
        return cls(epoch=epoch, step=step, lr=lr, train_loss=train["loss"], train_penalty=train["penalty"],
                   train_acc=train["acc"], **evaluations, weight_l1=norms[0], weight_l2=norms[1],
                   epoch_time_s=round(seconds, 4))

    def evaluation_text(self) -> str:
        """The log line's evaluation part: clean train metrics, validation and gap (nothing on an epoch that
        trainer.eval_every skips)."""
        if self.val_loss is None:
            return ""
        has_clean = self.clean_train_loss is not None
        clean = f" (clean {self.clean_train_loss:.4f} / {self.clean_train_acc:.4f})" if has_clean else ""
        return (f"{clean} | val loss {self.val_loss:.4f} acc {self.val_acc:.4f} | "
                f"gap {self.clean_gap_loss if has_clean else self.gap_loss:.4f}")

    def to_dict(self) -> dict[str, Any]:
        """column -> value, in column order (the form rows take in checkpoints, summary.json and the stack)."""
        return {name: getattr(self, name) for name in METRIC_COLUMNS}

    def scalars(self) -> dict[str, float]:
        """TensorBoard tag -> value of the fields that have a value this run."""
        return {tag: getattr(self, name) for tag, name in TB_TAGS.items() if getattr(self, name) is not None}


MARKER = "COMPLETED"  # the completion marker: written last by a run (a sweep skips a folder that has it)
METRIC_COLUMNS = [f.name for f in fields(EpochRow)]
# A bagging run's metrics.csv (regbench.stacked.bagging): its members' mean of every column, the ensemble's
# validation metrics, and how many members were still training in that epoch.
ENSEMBLE_COLUMNS = ("ensemble_val_loss", "ensemble_val_acc", "ensemble_val_ece")
BAGGING_COLUMNS = (*METRIC_COLUMNS, *ENSEMBLE_COLUMNS, "members_training")
# The columns an epoch may leave empty: the evaluations (trainer.eval_every, trainer.clean_subset=0) and what
# is derived from them.
EVALUATION_COLUMNS = ("clean_train_loss", "clean_train_acc", "val_loss", "val_acc", "val_ece", "gap_loss", "gap_acc",
                      "clean_gap_loss", "clean_gap_acc")
TB_TAGS = {f.metadata["tb"]: f.name for f in fields(EpochRow) if "tb" in f.metadata}  # tag -> column


# ------------------------------------------------------------------------------------------- summary

_NUMBER = (int, float)


def _kind(*types: type) -> Any:
    """A summary field that holds a JSON value of one of ``types`` (or null)."""
    return field(default=None, metadata={"types": types})


@dataclass
class Summary:
    """summary.json. Field order is the file's key order; ``test_extra`` (the extra test evaluations) is written
    only once the test evaluation ran, last, as runs always wrote it."""

    status: Optional[str] = _kind(str)
    epochs_completed: Optional[int] = _kind(int)
    max_epochs: Optional[int] = _kind(int)
    seed: Optional[int] = _kind(int)
    regularizers: Optional[list] = _kind(list)
    params: Optional[dict] = _kind(dict)
    monitor: Optional[str] = _kind(str)
    final: Optional[dict] = _kind(dict)
    best: Optional[dict] = _kind(dict)
    test: Optional[dict] = _kind(dict)
    data: Optional[dict] = _kind(dict)
    device: Optional[str] = _kind(str)
    amp: Optional[str] = _kind(str)
    num_threads: Optional[int] = _kind(int)
    deterministic: Optional[bool] = _kind(bool)
    steps_per_epoch: Optional[int] = _kind(int)
    warnings: Optional[list] = _kind(list)
    optimizer_impl: Optional[str] = _kind(str)
    compile: Optional[str] = _kind(str)
    channels_last: Optional[bool] = _kind(bool)
    step_impl: Optional[str] = _kind(str)
    checkpoint_impl: Optional[str] = _kind(str)  # encoder / torch.save (regbench.speed); null before a checkpoint
    timing: Optional[dict] = _kind(dict)
    regularizer_info: Optional[dict] = _kind(dict)
    convention: Optional[dict] = _kind(dict)
    augmentation: Optional[dict] = _kind(dict)
    versions: Optional[dict] = _kind(dict)
    git: Optional[dict] = _kind(dict)
    command: Optional[list] = _kind(list)
    provenance: Optional[dict] = _kind(dict)
    run_dir: Optional[str] = _kind(str)
    resumed_from_epoch: Optional[int] = _kind(int)
    started: Optional[str] = _kind(str)
    finished: Optional[str] = _kind(str)
    time_s: Optional[float] = _kind(*_NUMBER)
    error: Optional[str] = _kind(str)
    test_extra: Optional[dict] = _kind(dict)
    stacked: Optional[dict] = _kind(dict)  # trained in a stack (hydra/launcher=stacked): its group, index, size
    bagging: Optional[dict] = _kind(dict)  # regularizer=[bagging]: the members' seeds, folders, bootstrap

    # --------------------------------------------------------------------------- writing (fit)

    def to_dict(self) -> dict[str, Any]:
        out = {f.name: getattr(self, f.name) for f in fields(self)}
        for optional in ("test_extra", "stacked", "bagging"):  # absent, not null, where they do not apply
            if out[optional] is None:
                del out[optional]
        return out

    def write(self, path: Path) -> None:
        write_json(path, self.to_dict())

    def encode(self) -> bytes:
        """The bytes :meth:`write` writes, as of now (for a background writer)."""
        return encode_json(self.to_dict())

    def update(self, **values: Any) -> None:
        """Set fields by name (an unknown name is an error, not a new key in the file)."""
        for name in values:
            if name not in _FIELDS:
                raise AttributeError(f"Summary has no field {name!r}")
        for name, value in values.items():
            setattr(self, name, value)

    # --------------------------------------------------------------------------- reading (report, sweep)

    @classmethod
    def from_dict(cls, record: Any) -> "Summary":
        """A summary from a parsed summary.json, validated: a JSON object whose known keys hold values of their
        field's type (keys it lacks are None; keys regbench does not know are ignored). Raises ValueError."""
        if not isinstance(record, dict):
            raise ValueError("expected a JSON object")
        for name, value in record.items():
            types = _FIELDS.get(name)
            if types is None or value is None:
                continue
            if not isinstance(value, types) or (isinstance(value, bool) and bool not in types):
                expected = "a number" if types == _NUMBER else " or ".join(t.__name__ for t in types)
                raise ValueError(f"key {name!r} is {_short(value)}, expected {expected}")
        return cls(**{k: v for k, v in record.items() if k in _FIELDS})

    @classmethod
    def load(cls, path: Path) -> "Summary":
        """Read and validate ``path`` (never through a symbolic link). Raises OSError or ValueError."""
        return cls.from_dict(read_json(path))

    def best_value(self, monitor: Optional[str] = None) -> float:
        """The best epoch's value of ``monitor`` (default: the monitor the run recorded). Raises KeyError
        (naming the key) or TypeError when the summary lacks it."""
        monitor = monitor or self.monitor
        if self.best is None or monitor is None:
            raise KeyError("best" if self.best is None else "monitor")
        return self.best[monitor]

    def marker(self) -> dict[str, Any]:
        """The COMPLETED marker's content (its file name: MARKER) (fit writes it last; a sweep re-derives it from a completed summary)."""
        if self.finished is None:
            raise KeyError("finished")
        return {"finished": self.finished, "best": self.best_value()}

    def rerun_of(self) -> Optional[str]:
        """The run folder this run was rerun from, when the summary records one as a path string."""
        origin = (self.provenance or {}).get("rerun_of")
        return origin if isinstance(origin, str) else None


_FIELDS = {f.name: f.metadata["types"] for f in fields(Summary)}


def _short(value: Any) -> str:
    text = repr(value)
    return text if len(text) <= 40 else text[:37] + "..."
