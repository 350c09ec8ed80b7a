"""A run's records as types: EpochRow is metrics.csv's columns and TensorBoard's tags, Summary is summary.json
(its keys pinned, validated when read from a folder), RunState is the checkpoint payload (round trip)."""

from __future__ import annotations

import dataclasses
import json
import math

import pytest
import torch

from regbench.checkpoint import load_checkpoint
from regbench.experiment import build_experiment
from regbench.logs import read_metrics
from regbench.records import METRIC_COLUMNS, TB_TAGS, EpochRow, Summary, monitor_sign
from regbench.state import RunState, checkpoint_rows
from regbench.train import fit
from tests.conftest import compose_cfg

SMALL = ["data.train_size=200", "data.batch_size=50", "data.test_size=100", "trainer.max_epochs=2",
         "trainer.progress_bar=false", "model.hidden=[32]"]

# The columns metrics.csv has always had, in order (a contract: reports, notebooks and older runs read them).
COLUMNS = ["epoch", "step", "lr", "train_loss", "train_penalty", "train_acc", "clean_train_loss",
           "clean_train_acc", "val_loss", "val_acc", "val_ece", "gap_loss", "gap_acc", "clean_gap_loss",
           "clean_gap_acc", "weight_l1", "weight_l2", "epoch_time_s"]
# summary.json's keys in the order fit writes them (test_extra appears once the test evaluation ran).
SUMMARY_KEYS = ["status", "epochs_completed", "max_epochs", "seed", "regularizers", "params", "monitor", "final",
                "best", "test", "data", "device", "amp", "num_threads", "deterministic", "steps_per_epoch",
                "warnings", "optimizer_impl", "compile", "channels_last", "step_impl", "checkpoint_impl", "timing", "regularizer_info", "convention", "augmentation", "versions", "git", "command",
                "provenance", "run_dir", "resumed_from_epoch", "started", "finished", "time_s", "error",
                "test_extra"]


def _row(**values) -> EpochRow:
    base = {name: float(i) for i, name in enumerate(METRIC_COLUMNS)}
    base.update(epoch=3, step=12, **values)
    return EpochRow(**base)


def test_epoch_row_fields_are_the_metrics_columns_and_name_every_tag():
    assert METRIC_COLUMNS == [f.name for f in dataclasses.fields(EpochRow)] == COLUMNS
    assert set(TB_TAGS.values()) == set(COLUMNS) - {"epoch", "step", "epoch_time_s"}
    row = _row(clean_train_loss=None, clean_gap_loss=None)
    assert list(row.to_dict()) == COLUMNS
    scalars = row.scalars()
    assert "loss/train_clean" not in scalars and "gap/loss_clean" not in scalars  # None: no point drawn
    assert scalars["loss/val"] == row.val_loss and scalars["lr"] == row.lr


def test_measured_row_derives_the_gaps():
    row = EpochRow.measured(2, 8, 0.1, {"loss": 0.5, "penalty": 0.01, "acc": 0.9},
                            {"loss": 0.75, "acc": 0.8, "ece": 0.05}, {"loss": 0.25, "acc": 0.95, "ece": 0.0},
                            (3.0, 2.0), 1.234567)
    assert (row.gap_loss, row.clean_gap_loss) == (0.75 - 0.5, 0.75 - 0.25)
    assert (row.gap_acc, row.clean_gap_acc) == (0.9 - 0.8, 0.95 - 0.8)  # the same float64 arithmetic
    assert (row.weight_l1, row.weight_l2, row.epoch_time_s) == (3.0, 2.0, 1.2346)
    no_clean = EpochRow.measured(2, 8, 0.1, {"loss": 0.5, "penalty": 0.0, "acc": 0.9},
                                 {"loss": 0.75, "acc": 0.8, "ece": 0.05}, None, (3.0, 2.0), 1.0)
    assert no_clean.clean_train_loss is None and no_clean.clean_gap_acc is None


def test_monitor_direction():
    assert monitor_sign("val_loss") == 1.0 and monitor_sign("val_acc") == -1.0


def test_a_run_writes_epoch_rows_and_summary_keys_as_the_records_say(tmp_path):
    fit(compose_cfg(*SMALL), tmp_path)
    assert (tmp_path / "metrics.csv").read_text().splitlines()[0] == ",".join(COLUMNS)
    rows = read_metrics(tmp_path / "metrics.csv")
    assert [r["epoch"] for r in rows] == [1, 2] and all(list(r) == COLUMNS for r in rows)
    summary = json.loads((tmp_path / "summary.json").read_text())
    assert list(summary) == SUMMARY_KEYS
    loaded = Summary.load(tmp_path / "summary.json")
    assert loaded.to_dict() == summary  # NaN-free run: the round trip is exact
    assert loaded.best_value() == summary["best"]["val_loss"] == min(r["val_loss"] for r in rows)
    assert json.loads((tmp_path / "COMPLETED").read_text()) == loaded.marker()


def test_summary_omits_test_extra_until_the_test_ran_and_refuses_unknown_fields():
    s = Summary(status="running")
    assert list(s.to_dict()) == SUMMARY_KEYS[:-1]
    s.update(test_extra={})
    assert list(s.to_dict()) == SUMMARY_KEYS
    with pytest.raises(AttributeError, match="no field 'tset'"):
        s.update(tset={})


@pytest.mark.parametrize("record,message", [
    ([1, 2], "expected a JSON object"),
    ({"status": 3}, "key 'status' is 3, expected str"),
    ({"status": "completed", "best": "x" * 80}, "key 'best' is 'xxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxx..., expected dict"),
    ({"epochs_completed": True}, "key 'epochs_completed' is True, expected int"),
    ({"time_s": "1"}, "key 'time_s' is '1', expected a number"),
], ids=["not-an-object", "status", "best", "bool-for-int", "time"])
def test_a_summary_read_from_a_folder_is_validated(record, message):
    with pytest.raises(ValueError) as e:
        Summary.from_dict(record)
    assert str(e.value) == message


def test_a_partial_or_newer_summary_reads_what_it_has():
    s = Summary.from_dict({"status": "failed", "error": "boom", "written_by_a_newer_regbench": {"x": 1},
                           "best": {"val_loss": math.nan}, "monitor": "val_loss"})
    assert (s.status, s.error, s.final) == ("failed", "boom", None)
    assert math.isnan(s.best_value())
    with pytest.raises(KeyError, match="finished"):
        s.marker()
    assert Summary.from_dict({"provenance": {"rerun_of": ["not", "a", "path"]}}).rerun_of() is None


def _equal(a, b, path="state") -> None:
    if isinstance(a, torch.Tensor):
        assert torch.equal(a, b), path
    elif isinstance(a, dict):
        assert list(a) == list(b), path
        for k in a:
            _equal(a[k], b[k], f"{path}.{k}")
    elif isinstance(a, (list, tuple)):
        assert len(a) == len(b), path
        for i, (x, y) in enumerate(zip(a, b)):
            _equal(x, y, f"{path}[{i}]")
    else:
        assert a == b, (path, a, b)


def test_run_state_round_trips_its_checkpoint_payload(tmp_path):
    """load_state_dict then state_dict gives back the checkpoint fit wrote, key for key and bit for bit."""
    cfg = compose_cfg(*SMALL, "regularizer=[dropout,early_stopping]", "scheduler=cosine")
    fit(cfg, tmp_path)
    payload = load_checkpoint(tmp_path / "checkpoints" / "last.pt")
    # The keys checkpoints have always had: runs checkpointed by earlier versions resume through the same code.
    assert list(payload) == ["model", "optimizer", "scheduler", "scaler", "regularizers", "rng", "epoch", "step",
                             "metrics", "best_score", "best_row", "config", "history"]
    assert payload["metrics"] == checkpoint_rows(payload["history"])[-1] and payload["metrics"]["epoch"] == 2
    assert isinstance(payload["history"], str)  # the rows as one JSON text (one object for torch.save's pickler)
    exp = build_experiment(cfg, torch.device("cpu"))
    state = RunState(exp.model, exp.optimizer, exp.scheduler, None, exp.stack, torch.Generator().manual_seed(99),
                     config=payload["config"], monitor=cfg.trainer.monitor)
    assert state.epoch == 0 and state.history == []
    state.load_state_dict(payload)
    assert (state.epoch, state.step, state.best_row) == (2, 8, payload["best_row"])
    _equal(state.state_dict(), payload)
