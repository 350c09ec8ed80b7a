"""What a run's epochs leave behind as logs: metrics.csv (one row per epoch), TensorBoard events (curves, the
HParams session, the augmentation preview) and the run log's file handler. Files are written through
:mod:`regbench.io` (atomically, never through a link); the row's columns are :class:`regbench.records.EpochRow`'s.
"""

from __future__ import annotations

import csv
import errno
import io
import json
import logging
import math
import os
import sys
from contextlib import nullcontext
from pathlib import Path
from typing import Any, ContextManager

import torch
from omegaconf import DictConfig, OmegaConf

from regbench.io import METRICS_LIMIT, LogWriteError, atomic_write, open_append, read_folder_text
from regbench.records import METRIC_COLUMNS, EpochRow
from regbench.speed import FastPath, attempt

# Which keys a sweep varies and the values they take, written by the sweep's pre-check (``sweep_hparams``) for
# every job: TensorBoard's HParams tab shows the keys that differ, and every key of the sweep, in every job.
SWEEP_HPARAMS_ENV = "REGBENCH_SWEEP_HPARAMS"


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
        from torch.utils.tensorboard import SummaryWriter  # lazy: pulls in tensorboard

        if resume_epoch is None:
            self.tb = SummaryWriter(log_dir=str(run_dir / "tb"))
            self._layout()
            yaml = OmegaConf.to_yaml(cfg, resolve=True)
            self.tb.add_text("config", "\n".join("    " + line for line in yaml.splitlines()), 0)  # as code
        else:
            self.tb = SummaryWriter(log_dir=str(run_dir / "tb"), purge_step=resume_epoch + 1)

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
        hparams = flat_hparams(self.cfg)
        plan = _sweep_plan(hparams)
        writer = attempt(self.events, self.tb._get_file_writer, lambda: self.tb.file_writer)
        if plan is not None:  # one identical experiment in every job of the sweep (the plugin reads any one)
            writer.add_summary(_hparams_summary("experiment", experiment_pb(plan)))
            # A member absent from this job's stack applies with strength 0: its columns get 0, not a gap (the
            # parallel-coordinates view drops a session that lacks a column's value).
            hparams.update({name: 0 for name in sweep_columns(plan) if name not in hparams
                            and _is_strength(name, plan[name])})
        # Values typed as the sweep's column (a key that is a number in one job and text in another is text).
        types = {k: _hparam_type(vs) for k, vs in (plan or {}).items()}
        start = _session_start(hparams, types, sweep_label(plan, hparams) if plan else "")
        writer.add_summary(_hparams_summary("session_start_info", start))
        step = self._last_epoch if self._last_epoch is not None else self.cfg.trainer.max_epochs
        for tag, value in _test_scalars(test, extra).items():
            self.tb.add_scalar(tag, value, step)
        from tensorboard.plugins.hparams import api_pb2, plugin_data_pb2

        end = plugin_data_pb2.SessionEndInfo(status=api_pb2.STATUS_SUCCESS)
        writer.add_summary(_hparams_summary("session_end_info", plugin_data_pb2.HParamsPluginData(
            session_end_info=end)))
        self.tb.flush()

    def close(self) -> None:
        self._csv_file.close()
        self.tb.close()


# ------------------------------------------------------------------------------------ TensorBoard HParams
# HParams metrics, tag -> column title, in display order (the tab shows the first five by default): the last
# value of each scalar tag. "{c}" is "_clean" (eval-mode plain CE on training images) unless a job turns it off.
HPARAM_METRICS = {
    "test/acc": "test acc", "gap/loss{c}": "final gap (val − {t} loss)", "loss/val": "final val loss",
    "acc/val": "final val acc", "test/loss": "test NLL", "test/ece": "test ECE",
    "gap/acc{c}": "final acc gap ({t} − val)", "loss/train{c}": "final {t} loss",
}
EXTRA_METRICS = ("acc", "nll", "ece")  # of each extra test evaluation (mc_dropout, ensemble, tta)


def flat_hparams(cfg: DictConfig) -> dict[str, Any]:
    """Every leaf of the task config as ``key.path -> bool | int | float | str`` (lists and null as text), plus
    the regularizer stack as one column, ``regularizer`` = ``[l2,dropout]`` (as it is written on the command
    line; it sorts before its members' ``regularizer.<member>.*`` keys)."""
    flat: dict[str, Any] = {}

    def walk(node: Any, prefix: str) -> None:
        for k, v in node.items():
            if isinstance(v, dict):
                walk(v, f"{prefix}{k}.")
            else:
                flat[f"{prefix}{k}"] = v if isinstance(v, (bool, int, float, str)) else json.dumps(v)

    task = OmegaConf.masked_copy(cfg, [k for k in cfg if k != "hydra"])  # a pre-check's job has hydra: too
    walk(OmegaConf.to_container(task, resolve=True), "")
    flat["regularizer"] = "[" + ",".join(cfg.regularizer) + "]"
    return flat


def sweep_hparams(cfgs: list[DictConfig]) -> dict[str, list]:
    """Every key of a sweep's jobs with the distinct values it takes (the sweep's HParams columns)."""
    values: dict[str, list] = {}
    for cfg in cfgs:
        for k, v in flat_hparams(cfg).items():
            _add_value(values.setdefault(k, []), v)
    return values


def _add_value(values: list, v: Any) -> None:
    if not any(isinstance(x, bool) == isinstance(v, bool) and x == v for x in values):  # True == 1 in Python
        values.append(v)


def _sweep_plan(own: dict[str, Any]) -> dict[str, list] | None:
    """The sweep's columns from the environment (None for a run outside a sweep), widened by this run's own
    values (a key or value the pre-check's jobs did not show)."""
    text = os.environ.get(SWEEP_HPARAMS_ENV)
    if not text:
        return None
    try:
        plan = json.loads(text)
        if not (isinstance(plan, dict) and all(isinstance(v, list) and all(isinstance(x, (bool, int, float, str))
                                                                            for x in v) for v in plan.values())):
            raise ValueError("expected {key: [values]}")
    except ValueError as e:
        logging.getLogger(__name__).warning("%s ignored (%s): HParams without the sweep's columns",
                                            SWEEP_HPARAMS_ENV, e)
        return None
    for k, v in own.items():
        _add_value(plan.setdefault(k, []), v)
    return plan


def _hparam_type(values: list) -> str:
    if all(isinstance(v, bool) for v in values):
        return "bool"
    if all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in values):
        return "number"
    return "text"


def _as_text(v: Any) -> str:
    return v if isinstance(v, str) else json.dumps(v)


def sweep_columns(plan: dict[str, list]) -> dict[str, bool]:
    """The HParams columns of a sweep, ``name -> differs``: every key the sweep varies, the regularizer stack,
    and its members' strengths (their numeric keys: λ, p, α...), which differ when a member is in some of
    the sweep's stacks only. The constant rest of the config is left out: TensorBoard ticks the first five
    columns after sorting by (not differs, name), constants included, so listing them would fill the default
    view whenever a sweep varies fewer than five keys (the Text tab shows the whole config)."""
    stacks = [set(_as_text(v).strip("[]").split(",")) - {""} for v in plan.get("regularizer", [])]
    grouped = bool(_varied(plan))
    columns = {}
    for name, values in plan.items():
        if name == "seed" and grouped:  # a row is a configuration, its seeds averaged (see sweep_label)
            continue
        differs = len({_as_text(v) for v in values}) > 1
        strength = _is_strength(name, values)
        if strength:  # a member's strength differs between a stack with the member and one without it
            differs |= not all(name.split(".")[1] in stack for stack in stacks)
        if differs or strength or name == "regularizer":
            columns[name] = differs
    return columns


def _is_strength(name: str, values: list) -> bool:
    """A member's numeric key (λ, p, α...): ``regularizer.<member>.<key>`` with numbers for values."""
    parts = name.split(".")
    return parts[0] == "regularizer" and len(parts) == 3 and _hparam_type(values) == "number"


def _varied(plan: dict[str, list]) -> list[str]:
    """The keys a sweep gives more than one value, seed aside (its configurations differ in these)."""
    return sorted(k for k, vs in plan.items() if k != "seed" and len({_as_text(v) for v in vs}) > 1)


def sweep_label(plan: dict[str, list], hparams: dict[str, Any]) -> str:
    """A job's configuration in the sweep's own terms, e.g. ``regularizer=[dropout]``: its values of the keys
    the sweep varies (seed aside). It is the HParams session group: the table gets one row per configuration,
    named so, with its metrics averaged over seeds (expand a row for the single runs). "" when the sweep varies
    only the seed (then each run is a row and seed a column)."""
    return ",".join(f"{k}={_as_text(hparams[k])}" for k in _varied(plan) if k in hparams)


def experiment_pb(plan: dict[str, list]):
    """The HParams experiment of a sweep (``sweep_columns``) with its domains and metric columns."""
    from google.protobuf import struct_pb2
    from tensorboard.plugins.hparams import api_pb2, plugin_data_pb2

    infos = []
    for name, differs in sorted(sweep_columns(plan).items()):
        values, kind = plan[name], _hparam_type(plan[name])
        info = api_pb2.HParamInfo(name=name, differs=differs)
        if kind == "number":
            info.type = api_pb2.DATA_TYPE_FLOAT64
            info.domain_interval.min_value, info.domain_interval.max_value = min(values), max(values)
        else:
            info.type = api_pb2.DATA_TYPE_BOOL if kind == "bool" else api_pb2.DATA_TYPE_STRING
            info.domain_discrete.CopyFrom(struct_pb2.ListValue(values=[
                struct_pb2.Value(bool_value=v) if kind == "bool" else struct_pb2.Value(string_value=_as_text(v))
                for v in values]))
        infos.append(info)
    clean = all(isinstance(v, int) and v > 0 for v in plan.get("trainer.clean_subset", [1]))
    c, t = ("_clean", "clean train") if clean else ("", "train")
    metrics = {tag.format(c=c): title.format(t=t) for tag, title in HPARAM_METRICS.items()}
    stacks = " ".join(_as_text(v) for v in plan.get("regularizer", []))
    extras = [m for m in ("mc_dropout", "ensemble") if m in stacks]
    extras += ["tta"] if True in plan.get("augmentation.tta.enabled", []) else []
    metrics.update({f"test/{name}_{k}": f"test {k.upper() if k != 'acc' else k} ({name})"
                    for name in extras for k in EXTRA_METRICS})
    return plugin_data_pb2.HParamsPluginData(experiment=api_pb2.Experiment(hparam_infos=infos, metric_infos=[
        api_pb2.MetricInfo(name=api_pb2.MetricName(tag=tag), display_name=title) for tag, title in metrics.items()]))


def _session_start(hparams: dict[str, Any], types: dict[str, str], group: str = ""):
    from tensorboard.plugins.hparams import plugin_data_pb2

    start = plugin_data_pb2.SessionStartInfo(group_name=group)
    for k, v in hparams.items():
        kind = types.get(k) or _hparam_type([v])
        if kind == "bool":
            start.hparams[k].bool_value = v
        elif kind == "number":
            start.hparams[k].number_value = v
        else:
            start.hparams[k].string_value = _as_text(v)
    return plugin_data_pb2.HParamsPluginData(session_start_info=start)


def _hparams_summary(which: str, data):
    """A Summary with the HParams plugin's ``_hparams_/<which>`` tag carrying ``data`` (the plugin reads only the
    metadata)."""
    from tensorboard.compat.proto.summary_pb2 import Summary
    from tensorboard.plugins.hparams import metadata

    return Summary(value=[Summary.Value(tag=f"_hparams_/{which}", metadata=metadata.create_summary_metadata(data))])


def _test_scalars(test: dict[str, float], extra: dict[str, dict]) -> dict[str, float]:
    """The test results as scalar tags (written once, at the last epoch's step); NaN/inf are left out."""
    values = {"test/acc": test["acc"], "test/loss": test["loss"], "test/ece": test["ece"]}
    for name, result in extra.items():
        values.update({f"test/{name}_{k}": result[k] for k in EXTRA_METRICS if k in result})
    return {k: float(v) for k, v in values.items() if v is not None and math.isfinite(v)}


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
