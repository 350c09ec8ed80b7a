"""What a run's epochs leave behind as logs: metrics.csv (one row per epoch), TensorBoard events (curves, the
HParams session, the augmentation preview) and the run log's file handler. Files are written through
:mod:`regbench.io` (atomically, never through a link); the row's columns are :class:`regbench.records.EpochRow`'s.
"""

from __future__ import annotations

import csv
import errno
import io
import logging
import os
import sys
import time
from contextlib import nullcontext
from pathlib import Path
from typing import ContextManager

import torch
from omegaconf import DictConfig, OmegaConf

from regbench import hparams as hp
from regbench.io import METRICS_LIMIT, LogWriteError, atomic_write, open_append, read_folder_text
from regbench.records import METRIC_COLUMNS, EpochRow
from regbench.speed import FastPath, attempt


def read_metrics(path: Path) -> list[dict]:
    """The complete rows of a metrics.csv (a line cut short by a crash is dropped), values as floats."""
    rows = []
    for line in _complete_lines(path)[1:]:
        values = next(csv.reader([line]))
        rows.append({k: (float(v) if v != "" else None) for k, v in zip(METRIC_COLUMNS, values)})
        rows[-1]["epoch"] = int(rows[-1]["epoch"])
    return rows


def _complete_lines(path: Path) -> list[str]:
    try:  # a regular file, never through a link, bounded (a run folder is data)
        text = read_folder_text(path, METRICS_LIMIT, "metrics.csv")
    except FileNotFoundError:
        return []
    lines = text.split("\n")[:-1]  # the last element is "" after a final newline, or a cut-off line
    return [ln for ln in lines if ln.count(",") == len(METRIC_COLUMNS) - 1]


_log = logging.getLogger(__name__)


def summary_writer(log_dir: Path, purge_step: int | None = None):
    """torch's SummaryWriter on ``log_dir``, its event file named to sort after every file already there.

    TensorBoard reads a folder's event files in name order, and torch names them
    ``events.out.tfevents.<unix second>.<host>.<pid>...``: a resume in the same second as the run it continues
    (a kill followed at once by ``regbench resume``) would sort before the older file whenever its pid is smaller,
    and TensorBoard would draw the resumed epochs first. So a new writer waits for the clock to pass the newest
    existing file's second (at most ~1 s; a folder from a machine whose clock runs ahead is not waited for: one
    warning).
    """
    from torch.utils.tensorboard import SummaryWriter  # lazy: pulls in tensorboard

    newest = -1
    try:
        for p in Path(log_dir).glob("events.out.tfevents.*"):
            stamp = p.name.split(".")[3]
            if stamp.isdigit():
                newest = max(newest, int(stamp))
    except OSError:
        pass
    wait = newest + 1 - time.time()
    if 0 < wait <= 2:
        time.sleep(wait)
    elif wait > 2:
        _log.warning("TensorBoard events in %s are dated %.0f s in the future (another machine's clock?): "
                     "TensorBoard may draw this run's new events before the older ones", log_dir, wait)
    return SummaryWriter(log_dir=str(log_dir), purge_step=purge_step)


class RunLogger:
    """metrics.csv + TensorBoard writer of one run.

    ``resume_epoch``: continue an interrupted run — rows after that epoch are dropped from metrics.csv and
    TensorBoard events from later steps are purged (``purge_step``), so curves have no duplicated or stale
    points. ``rows``: the rows up to that epoch as the checkpoint recorded them, written back instead of
    metrics.csv's own (which may have lost some).
    """

    def __init__(self, run_dir: Path, cfg: DictConfig, resume_epoch: int | None = None,
                 rows: list[dict] | None = None):
        self.run_dir = run_dir
        self.cfg = cfg
        self.metrics_path = run_dir / "metrics.csv"
        header = ",".join(METRIC_COLUMNS)
        try:
            run_dir.mkdir(parents=True, exist_ok=True)
            (run_dir / "checkpoints").mkdir(exist_ok=True)
            if resume_epoch is None:
                lines = [header]
            elif rows is not None:
                lines = [header] + [_csv_line(r) for r in rows if r["epoch"] <= resume_epoch]
            else:
                lines = [header] + [ln for ln in _complete_lines(self.metrics_path)[1:]
                                    if int(ln.split(",", 1)[0]) <= resume_epoch]
            atomic_write(self.metrics_path, lambda f: f.write(("\r\n".join(lines) + "\r\n").encode()))
            self._csv_file = open_append(self.metrics_path, newline="")
        except OSError as e:
            where = f" ({e.filename})" if e.filename else ""
            raise LogWriteError(f"cannot write in run folder {run_dir}: {e.strerror or e}{where}; fix: make it "
                                "writable or choose another with hydra.run.dir=...") from None
        self._csv = csv.DictWriter(self._csv_file, fieldnames=METRIC_COLUMNS)
        self._last_epoch: int | None = None  # the test results are drawn at the last epoch's step
        self.events = FastPath("TensorBoard batch write", "SummaryWriter.add_scalar")  # regbench.speed
        if resume_epoch is None:
            self.tb = summary_writer(run_dir / "tb")
            self._layout()
            yaml = OmegaConf.to_yaml(cfg, resolve=True)
            self.tb.add_text("config", "\n".join("    " + line for line in yaml.splitlines()), 0)  # as code
        else:
            self.tb = summary_writer(run_dir / "tb", purge_step=resume_epoch + 1)

    def _layout(self) -> None:
        # TensorBoard's Custom Scalars tab: one chart per quantity, so a chart of n runs has n (or 2n) lines.
        # The clean train loss (eval mode, plain CE) is the one comparable with the val loss; the loss as trained
        # includes dropout noise, smoothing and mixing. Loss and accuracy gaps have different units: two charts.
        # Tags are anchored regexes (the plugin matches by regex: "loss/val" would also match "loss/val_x").
        clean = "_clean" if self.cfg.trainer.clean_subset > 0 else ""
        which = "clean train (eval mode, plain CE)" if clean else "train (as trained)"
        self.tb.add_custom_scalars({
            "overfitting": {
                f"loss: {which} vs val": ["Multiline", [f"^loss/train{clean}$", "^loss/val$"]],
                f"generalization gap: val loss − {which.split(' (')[0]} loss": ["Multiline", [f"^gap/loss{clean}$"]],
                f"accuracy: {which} vs val": ["Multiline", [f"^acc/train{clean}$", "^acc/val$"]],
                f"accuracy gap: {which.split(' (')[0]} acc − val acc": ["Multiline", [f"^gap/acc{clean}$"]],
            }
        })

    def log_epoch(self, row: EpochRow) -> None:
        try:
            self._csv.writerow(row.to_dict())
            self._csv_file.flush()
        except OSError as e:
            raise LogWriteError(f"cannot write {self.metrics_path}: {e.strerror or e}") from None
        step = self._last_epoch = row.epoch
        # One event holding the epoch's scalars (what add_scalar writes, one Summary.Value per tag, but one event
        # instead of ~15: add_scalar's per-call work was ~1 ms of a 60 ms lecture-MLP epoch).
        from tensorboard.compat.proto.summary_pb2 import Summary

        values = [Summary.Value(tag=tag, simple_value=float(v)) for tag, v in row.scalars().items()]
        attempt(self.events, lambda: self.tb._get_file_writer().add_summary(Summary(value=values), step),
                lambda: [self.tb.add_scalar(v.tag, v.simple_value, step) for v in values])

    def speed_paths(self) -> list[FastPath]:
        return [self.events]

    def flush(self) -> None:
        """Wait until the events logged so far are in the event file (the epoch's background write calls it:
        TensorBoard's writer thread checksums each event in pure Python, ~0.3 ms an epoch off the training
        thread)."""
        self.tb.flush()

    def log_images(self, before: torch.Tensor, after: torch.Tensor) -> None:
        """A grid of training images before and after augmentation (TensorBoard's Images tab)."""
        from torchvision.utils import make_grid

        nrow = max(1, int(len(before) ** 0.5))
        self.tb.add_image("augmentation/before", make_grid(before.float().cpu(), nrow=nrow), 0)
        self.tb.add_image("augmentation/after", make_grid(after.float().cpu().clamp(0, 1), nrow=nrow), 0)
        self.tb.flush()

    def log_hparams(self, test: dict[str, float], extra: dict[str, dict]) -> None:
        """Write this run's HParams-plugin session (its config values, success) and its test metrics.

        Written into the run's own event file (SummaryWriter.add_hparams would open a timestamped sub-run).
        The plugin reads metric values only from scalar time series, the very ones the Scalars tab lists; so
        the metrics are the last points of per-epoch curves where one exists (final val loss, final gap), and
        only the test results, which exist once, are single points (under test/).
        """
        writer = attempt(self.events, self.tb._get_file_writer, lambda: self.tb.file_writer)
        for summary in hp.session_start(self.cfg):
            writer.add_summary(summary)
        step = self._last_epoch if self._last_epoch is not None else self.cfg.trainer.max_epochs
        for tag, value in hp.test_scalars(test, extra).items():
            self.tb.add_scalar(tag, value, step)
        writer.add_summary(hp.session_end())
        self.tb.flush()

    def close(self) -> None:
        self._csv_file.close()
        self.tb.close()


def _csv_line(row: dict) -> str:
    """One metrics.csv row, formatted exactly as :meth:`RunLogger.log_epoch` writes it (without the line end)."""
    buf = io.StringIO()
    csv.DictWriter(buf, fieldnames=METRIC_COLUMNS).writerow({k: row[k] for k in METRIC_COLUMNS})
    return buf.getvalue().removesuffix("\r\n")


class RunLogHandler(logging.FileHandler):
    """Hydra's file handler for ``<run>/regbench.log`` (configs/hydra/default.yaml), opened without following a
    symbolic link: a link planted in a run folder is replaced by a regular file, never appended through."""

    def _open(self):
        try:
            return open_append(Path(self.baseFilename), encoding=self.encoding, errors=self.errors)
        except OSError as e:
            if e.errno != errno.ELOOP:
                raise
        os.unlink(self.baseFilename)
        print(f"regbench: warning: {self.baseFilename} was a symbolic link; replaced it with a regular file (the "
              "run log is never written through a link)", file=sys.stderr)
        return open_append(Path(self.baseFilename), encoding=self.encoding, errors=self.errors)


def progress_bar(t: DictConfig, steps_per_epoch: int, start_epoch: int):
    """(tqdm bar over the run's steps, the context that routes log lines through it while it is shown)."""
    from tqdm.auto import tqdm

    show_bar = sys.stdout.isatty() if t.progress_bar is None else t.progress_bar
    bar = tqdm(total=steps_per_epoch * t.max_epochs, initial=steps_per_epoch * start_epoch, disable=not show_bar,
               unit="step", dynamic_ncols=True, file=sys.stderr, leave=False)
    # While the bar is shown, console log lines go through tqdm.write (the bar is cleared, the line printed,
    # the bar redrawn below it) instead of landing in the middle of the bar's line.
    return bar, (log_through_bar(tqdm) if show_bar else nullcontext())


def log_through_bar(tqdm_class) -> ContextManager:
    """tqdm's redirect of the root logger's console handler; nothing when there is none (tqdm would add one)."""
    from tqdm.contrib.logging import logging_redirect_tqdm

    root = logging.getLogger()
    if not any(isinstance(h, logging.StreamHandler) and h.stream in (sys.stdout, sys.stderr) for h in root.handlers):
        return nullcontext()
    return logging_redirect_tqdm(loggers=[root], tqdm_class=tqdm_class)
