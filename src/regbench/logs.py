"""What a run leaves behind: metrics.csv (one row per epoch), summary.json, TensorBoard events, checkpoints.

Every file that is rewritten (summary.json, checkpoints) is written atomically: a temporary file in the same
folder, flushed and fsynced, then renamed over the old one, so a crash never leaves a half-written file.
"""

from __future__ import annotations

import csv
import io
import json
import math
import os
import signal
from pathlib import Path
from typing import Any, Callable

import torch
from omegaconf import DictConfig, OmegaConf

from regbench.errors import RegbenchError

METRIC_COLUMNS = ["epoch", "step", "lr", "train_loss", "train_penalty", "train_acc", "clean_train_loss",
                  "clean_train_acc", "val_loss", "val_acc", "val_ece", "gap_loss", "gap_acc", "clean_gap_loss",
                  "clean_gap_acc", "weight_l1", "weight_l2", "epoch_time_s"]
# TensorBoard tag -> metrics.csv column
TB_TAGS = {
    "loss/train": "train_loss", "loss/train_clean": "clean_train_loss", "loss/val": "val_loss",
    "loss/penalty": "train_penalty", "acc/train": "train_acc", "acc/train_clean": "clean_train_acc",
    "acc/val": "val_acc", "calibration/val_ece": "val_ece", "gap/loss": "gap_loss", "gap/acc": "gap_acc",
    "gap/loss_clean": "clean_gap_loss", "gap/acc_clean": "clean_gap_acc", "weights/l1": "weight_l1",
    "weights/l2": "weight_l2", "lr": "lr",
}


class LogWriteError(RegbenchError):
    """A log or checkpoint file could not be written (read-only folder, full disk...)."""


def atomic_write(path: Path, write: Callable[[io.BufferedWriter], None]) -> None:
    """Write ``path`` via a temp file in the same folder + fsync + rename (the old file survives any crash)."""
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    try:
        with open(tmp, "wb") as f:
            write(f)
            f.flush()
            if os.environ.get("REGBENCH_FAULT") == f"during_write:{path.name}":  # crash-safety tests only
                f.truncate(f.tell() // 2)
                os.kill(os.getpid(), signal.SIGKILL)
            os.fsync(f.fileno())
        os.replace(tmp, path)
        dir_fd = os.open(path.parent, os.O_RDONLY)
        try:
            os.fsync(dir_fd)
        finally:
            os.close(dir_fd)
    except OSError as e:
        tmp.unlink(missing_ok=True)
        raise LogWriteError(f"cannot write {path}: {e.strerror or e}; fix: make the run folder writable "
                            "(or choose another with hydra.run.dir=...) and free disk space") from None


def write_json(path: Path, obj: Any) -> None:
    atomic_write(path, lambda f: f.write((json.dumps(obj, indent=2, default=_jsonable) + "\n").encode()))


def _jsonable(v: Any) -> Any:
    if isinstance(v, torch.Tensor):
        return v.tolist()
    if isinstance(v, Path):
        return str(v)
    raise TypeError(f"not JSON serialisable: {type(v).__name__}")


def save_checkpoint(path: Path, state: dict) -> None:
    atomic_write(path, lambda f: torch.save(state, f))


def load_checkpoint(path: Path, map_location: str | torch.device = "cpu") -> dict:
    """Load a checkpoint with the safe unpickler only (tensors and primitives); never runs code from the file."""
    import pickle
    import re

    try:
        return torch.load(path, map_location=map_location, weights_only=True)
    except FileNotFoundError:
        raise RegbenchError(f"checkpoint {path}: no such file") from None
    except pickle.UnpicklingError as e:  # the safe unpickler refused something: code, or a foreign object
        found = re.search(r"GLOBAL ([\w.]+)", str(e))
        what = f"it references {found.group(1)}" if found else str(e).strip().splitlines()[-1][:160]
        raise RegbenchError(f"checkpoint {path}: cannot be loaded safely ({what}, which the weights-only loader "
                            "refuses; regbench never loads checkpoints unsafely); fix: use a checkpoint written by "
                            "regbench from a source you trust") from None
    except Exception as e:  # truncated or corrupt file
        reason = str(e).strip().splitlines()[0].split(". This is an internal")[0][:160]
        raise RegbenchError(f"checkpoint {path}: cannot be loaded safely (truncated or corrupt: {reason}); "
                            "fix: delete it, or use another checkpoint written by regbench") from None


def read_metrics(path: Path) -> list[dict]:
    """The complete rows of a metrics.csv (a line cut short by a crash is dropped), values as floats."""
    rows = []
    for line in _complete_lines(path)[1:]:
        values = next(csv.reader([line]))
        rows.append({k: (float(v) if v != "" else None) for k, v in zip(METRIC_COLUMNS, values)})
        rows[-1]["epoch"] = int(rows[-1]["epoch"])
    return rows


def _complete_lines(path: Path) -> list[str]:
    try:
        text = path.read_text()
    except FileNotFoundError:
        return []
    lines = text.split("\n")[:-1]  # the last element is "" after a final newline, or a cut-off line
    return [ln for ln in lines if ln.count(",") == len(METRIC_COLUMNS) - 1]


class RunLogger:
    """metrics.csv + TensorBoard writer of one run.

    ``resume_epoch``: continue an interrupted run — rows after that epoch are dropped from metrics.csv and
    TensorBoard events from later steps are purged (``purge_step``), so curves have no duplicated or stale
    points.
    """

    def __init__(self, run_dir: Path, cfg: DictConfig, resume_epoch: int | None = None):
        self.run_dir = run_dir
        self.cfg = cfg
        self.metrics_path = run_dir / "metrics.csv"
        header = ",".join(METRIC_COLUMNS)
        try:
            run_dir.mkdir(parents=True, exist_ok=True)
            (run_dir / "checkpoints").mkdir(exist_ok=True)
            if resume_epoch is None:
                lines = [header]
            else:
                lines = [header] + [ln for ln in _complete_lines(self.metrics_path)[1:]
                                    if int(ln.split(",", 1)[0]) <= resume_epoch]
            atomic_write(self.metrics_path, lambda f: f.write(("\r\n".join(lines) + "\r\n").encode()))
            self._csv_file = open(self.metrics_path, "a", newline="")
        except OSError as e:
            where = f" ({e.filename})" if e.filename else ""
            raise LogWriteError(f"cannot write in run folder {run_dir}: {e.strerror or e}{where}; fix: make it "
                                "writable or choose another with hydra.run.dir=...") from None
        self._csv = csv.DictWriter(self._csv_file, fieldnames=METRIC_COLUMNS)
        from torch.utils.tensorboard import SummaryWriter  # lazy: pulls in tensorboard

        if resume_epoch is None:
            self.tb = SummaryWriter(log_dir=str(run_dir / "tb"))
            self._layout()
            self.tb.add_text("config", _as_markdown_code(OmegaConf.to_yaml(cfg, resolve=True)), 0)
        else:
            self.tb = SummaryWriter(log_dir=str(run_dir / "tb"), purge_step=resume_epoch + 1)

    def _layout(self) -> None:
        # One chart per quantity with train and val drawn on the same axes (TensorBoard's Custom Scalars tab).
        self.tb.add_custom_scalars({
            "overfitting": {
                "loss (train vs val)": ["Multiline", ["loss/train", "loss/train_clean", "loss/val"]],
                "accuracy (train vs val)": ["Multiline", ["acc/train", "acc/train_clean", "acc/val"]],
                "generalization gap": ["Multiline", ["gap/loss", "gap/loss_clean", "gap/acc", "gap/acc_clean"]],
            }
        })

    def log_epoch(self, row: dict) -> None:
        try:
            self._csv.writerow({k: row[k] for k in METRIC_COLUMNS})
            self._csv_file.flush()
        except OSError as e:
            raise LogWriteError(f"cannot write {self.metrics_path}: {e.strerror or e}") from None
        step = row["epoch"]
        for tag, key in TB_TAGS.items():
            if row[key] is not None:
                self.tb.add_scalar(tag, row[key], step)
        self.tb.flush()

    def log_images(self, before: torch.Tensor, after: torch.Tensor) -> None:
        """A grid of training images before and after augmentation (TensorBoard's Images tab)."""
        from torchvision.utils import make_grid

        nrow = max(1, int(len(before) ** 0.5))
        self.tb.add_image("augmentation/before", make_grid(before.float().cpu(), nrow=nrow), 0)
        self.tb.add_image("augmentation/after", make_grid(after.float().cpu().clamp(0, 1), nrow=nrow), 0)
        self.tb.flush()

    def log_hparams(self, hparams: dict[str, Any], metrics: dict[str, float]) -> None:
        """Write the HParams-plugin summaries into this run's own event file.

        SummaryWriter.add_hparams would open a new writer in a timestamped sub-folder (a stray extra run in
        TensorBoard); writing the three plugin summaries ourselves keeps one run per run folder.
        """
        from torch.utils.tensorboard.summary import hparams as hparams_summary

        clean = {k: (v if isinstance(v, (int, float, str, bool)) else str(v)) for k, v in hparams.items()}
        metrics = {f"hparam/{k}": v for k, v in metrics.items() if v is not None and math.isfinite(v)}
        exp, ssi, sei = hparams_summary(clean, metrics)
        writer = self.tb._get_file_writer()
        for s in (exp, ssi, sei):
            writer.add_summary(s)
        for k, v in metrics.items():
            self.tb.add_scalar(k, v, self.cfg.trainer.max_epochs)
        self.tb.flush()

    def close(self) -> None:
        self._csv_file.close()
        self.tb.close()


def _as_markdown_code(text: str) -> str:
    return "\n".join("    " + line for line in text.splitlines())
