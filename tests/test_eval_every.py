"""trainer.eval_every: validation and the clean subset every N epochs (the last epoch always), the rest of the run
unchanged — the same training, bitwise; empty evaluation cells, no TensorBoard point, no best epoch where an
epoch is skipped; what needs every epoch evaluated (early stopping) refused in one line."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from regbench.checkpoint import load_checkpoint
from regbench.errors import ConfigError
from regbench.logs import read_metrics
from regbench.records import EVALUATION_COLUMNS as EVALUATION, Summary
from regbench.report import _results
from regbench.report_plots import _curve
from regbench.train import fit
from tests.conftest import compose_cfg, one_line_error

SMALL = ["data.train_size=200", "data.batch_size=50", "data.test_size=100", "trainer.max_epochs=5",
         "trainer.progress_bar=false", "model.hidden=[32]", "trainer.clean_subset=64", "trainer.keep_last=5",
         "regularizer=[dropout]", "regularizer.dropout.rate=0.2"]
EVALUATED = [2, 4, 5]  # eval_every=2 of 5 epochs: the last one always


def without_time(rows: list[dict]) -> list[dict]:
    return [{k: v for k, v in r.items() if k != "epoch_time_s"} for r in rows]


def summary(run_dir: Path) -> dict:
    return json.loads((run_dir / "summary.json").read_text())


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """The same run evaluated every epoch and every second epoch."""
    root = tmp_path_factory.mktemp("eval_every")
    fit(compose_cfg(*SMALL), root / "every")
    fit(compose_cfg(*SMALL, "trainer.eval_every=2"), root / "sparse")
    return root / "every", root / "sparse"


def test_skipped_epochs_have_empty_evaluation_cells_and_the_training_is_bitwise_the_same(runs):
    every, sparse = runs
    full, part = without_time(read_metrics(every / "metrics.csv")), without_time(read_metrics(sparse / "metrics.csv"))
    assert [r["epoch"] for r in part] == [1, 2, 3, 4, 5]  # still one row per epoch
    for a, b in zip(full, part):
        if a["epoch"] in EVALUATED:
            assert a == b  # evaluated epochs: every value bitwise the every-epoch run's
        else:
            assert all(b[c] is None for c in EVALUATION) and all(a[c] is not None for c in EVALUATION)
            assert {k: v for k, v in a.items() if k not in EVALUATION} == {
                k: v for k, v in b.items() if k not in EVALUATION}  # training, norms, lr: unchanged
    wa = load_checkpoint(every / "checkpoints" / "last.pt")["model"]
    wb = load_checkpoint(sparse / "checkpoints" / "last.pt")["model"]
    assert all(torch.equal(wa[k], wb[k]) for k in wa)
    sa, sb = summary(every), summary(sparse)
    assert sa["test"] == sb["test"] and sb["final"]["epoch"] == 5 and sb["final"]["val_loss"] is not None
    best = min((r for r in full if r["epoch"] in EVALUATED), key=lambda r: r["val_loss"])
    assert sb["best"]["epoch"] == best["epoch"] and sb["best"]["val_loss"] == best["val_loss"]
    assert load_checkpoint(sparse / "checkpoints" / "best.pt")["epoch"] == best["epoch"]


def test_tensorboard_has_evaluation_points_only_at_evaluated_epochs(runs):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(runs[1] / "tb"))
    acc.Reload()
    for tag in ("loss/val", "acc/val", "calibration/val_ece", "loss/train_clean", "gap/loss_clean", "gap/loss"):
        assert [e.step for e in acc.Scalars(tag)] == EVALUATED, tag
    for tag in ("loss/train", "acc/train", "weights/l2", "lr"):
        assert [e.step for e in acc.Scalars(tag)] == [1, 2, 3, 4, 5], tag


def test_the_report_uses_the_evaluated_epochs(runs):
    result = _results(runs[1], Summary.load(runs[1] / "summary.json"))
    rows = [r for r in read_metrics(runs[1] / "metrics.csv") if r["epoch"] in EVALUATED]
    assert result["best_val_loss"] == min(r["val_loss"] for r in rows)
    assert result["min_val_loss_epoch"] == min(rows, key=lambda r: r["val_loss"])["epoch"]
    assert result["final_gap"] == rows[-1]["clean_gap_loss"]
    assert _curve([result], "val_loss")[0] == EVALUATED  # the validation curve: the evaluated epochs
    assert _curve([result], "clean_gap_loss")[1] == [r["clean_gap_loss"] for r in rows]
    assert _curve([result], "train_loss")[0] == [1, 2, 3, 4, 5]


def test_a_resume_from_a_skipped_epoch_continues_bitwise(runs, tmp_path):
    run = tmp_path / "run"
    fit(compose_cfg(*SMALL, "trainer.eval_every=2"), run)
    for epoch in (4, 5):
        (run / "checkpoints" / f"epoch_000{epoch}.pt").unlink()
    s = summary(run)
    s["status"] = "interrupted"
    (run / "summary.json").write_text(json.dumps(s))
    fit(compose_cfg(*SMALL, "trainer.eval_every=2", "trainer.resume=true"), run)  # from epoch 3 (not evaluated)
    assert summary(run)["resumed_from_epoch"] == 3
    assert without_time(read_metrics(run / "metrics.csv")) == without_time(read_metrics(runs[1] / "metrics.csv"))
    assert summary(run)["best"]["epoch"] == summary(runs[1])["best"]["epoch"]


def test_early_stopping_needs_every_epoch_evaluated(capsys, tmp_path):
    line = one_line_error(capsys, "regularizer=[early_stopping]", "trainer.eval_every=2",
                          f"hydra.run.dir={tmp_path / 'run'}")
    assert "trainer.eval_every=2: expected 1 with regularizer.early_stopping" in line
    assert "set trainer.eval_every=1 or drop early_stopping" in line
    assert not (tmp_path / "run").exists()


def test_a_snapshot_ensemble_of_the_best_epochs_picks_among_evaluated_epochs(tmp_path):
    cfg = [*SMALL[:-2], "regularizer=[ensemble]", "regularizer.ensemble.source=best", "trainer.eval_every=2"]
    fit(compose_cfg(*cfg, "regularizer.ensemble.k=2"), tmp_path / "run")
    snapshots = load_checkpoint(tmp_path / "run" / "checkpoints" / "last.pt")["regularizers"]["ensemble"]["snapshots"]
    assert len(snapshots) == 2 and {epoch for _, epoch, _ in snapshots} <= set(EVALUATED)
    with pytest.raises(ConfigError, match=r"regularizer.ensemble.k=4: expected 1..3: the epochs trainer.eval_every"):
        fit(compose_cfg(*cfg, "regularizer.ensemble.k=4"), tmp_path / "k4")
    fit(compose_cfg(*SMALL[:-2], "regularizer=[ensemble]", "regularizer.ensemble.k=4", "trainer.eval_every=2"),
        tmp_path / "last")  # the last k epochs need no validation metrics


def test_eval_every_must_be_a_positive_integer(capsys, tmp_path):
    line = one_line_error(capsys, "trainer.eval_every=0", f"hydra.run.dir={tmp_path / 'run'}")
    assert line == "regbench: error: trainer.eval_every=0: expected an integer >= 1 (epochs)"
