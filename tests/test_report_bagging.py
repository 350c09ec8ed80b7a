"""``regbench report`` of a sweep with bagging runs: one row per bagging configuration, its validation and test
numbers the ensemble's, its members' mean in their own columns; its members are not configurations."""

from __future__ import annotations

import csv
import json

import pytest

from regbench.report import report
from regbench.train import fit
from tests.conftest import compose_cfg
from tests.test_report import completed

BAGGING = ["regularizer=[bagging]", "regularizer.bagging.members=2", "data.train_size=200", "data.test_size=100",
           "model.hidden=[32]", "trainer.max_epochs=2", "trainer.progress_bar=false"]


@pytest.fixture(autouse=True)
def no_paper_figures(monkeypatch):
    """The paper figures are drawn in tests/test_report.py and tests/test_report_plots.py; here they would take
    seconds per report for nothing (a bagging row's numbers are the point)."""
    from regbench import report as report_mod

    monkeypatch.setattr(report_mod, "plot_small_multiples", lambda *a, **k: [])
    monkeypatch.setattr(report_mod, "plot_forest", lambda *a, **k: [])


@pytest.fixture(scope="module")
def sweep(tmp_path_factory):
    sweep = tmp_path_factory.mktemp("sweep")
    completed(sweep / "regularizer=[]" / "seed=0")
    for seed in (0, 1):
        run = sweep / "regularizer=[bagging]" / f"seed={seed}"
        fit(compose_cfg(*BAGGING, f"seed={seed}"), run)
        (run / ".hydra").mkdir()  # as a sweep job's folder (the command line writes it)
    return sweep


def test_a_bagging_run_is_one_row_of_its_ensembles_numbers(sweep):
    out = report(sweep)
    assert out["failed"] == []  # not "unusable: no epoch rows"
    table = {row["config"]: row for row in out["table"]}
    assert sorted(table) == ["regularizer=[]", "regularizer=[bagging]"]  # members are not configurations
    row = table["regularizer=[bagging]"]
    assert row["n"] == 2 and row["regularizers"] == "[bagging]"
    runs = [sweep / "regularizer=[bagging]" / f"seed={s}" for s in (0, 1)]
    summaries = [json.loads((r / "summary.json").read_text()) for r in runs]
    mean = lambda xs: sum(xs) / len(xs)  # noqa: E731
    assert row["best_val_loss"] == pytest.approx(mean([s["best"]["ensemble_val_loss"] for s in summaries]))
    assert row["best_val_acc"] == pytest.approx(mean([s["best"]["ensemble_val_acc"] for s in summaries]))
    assert row["test_nll"] == pytest.approx(mean([s["test"]["loss"] for s in summaries]))
    members = [s["test_extra"]["members_mean"] for s in summaries]
    assert row["test_members_mean_nll"] == pytest.approx(mean([m["loss"] for m in members]))
    assert row["test_members_mean_acc"] == pytest.approx(mean([m["acc"] for m in members]))
    ens = [[float(r["ensemble_val_loss"]) for r in csv.DictReader(open(run / "metrics.csv"))] for run in runs]
    assert row["min_val_loss_epoch"] == pytest.approx(mean([e.index(min(e)) + 1 for e in ens]))
    assert row["final_gap"] == pytest.approx(mean([s["final"]["clean_gap_loss"] for s in summaries]))


def test_the_report_says_what_a_bagging_row_holds(sweep):
    report(sweep)
    md = (sweep / "report.md").read_text()
    assert "test NLL (bagging members' mean)" in md
    assert "members/" not in md.split("## Figures")[0].replace("members/\\<j\\>", "")
    assert "Bagging runs (regularizer=\\[bagging\\])" in md
