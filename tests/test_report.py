"""``regbench report`` on hand-made sweep folders (no training): failed and unfinished jobs listed apart, atomic
writes that never follow a planted symlink, Markdown escaping, and bad run files handled without a traceback."""

from __future__ import annotations

import errno
import json
import math
import os
from pathlib import Path

import pytest

from regbench import report_plots as plots_mod
from regbench.cli import main
from regbench.records import METRIC_COLUMNS
from regbench.report import report


def completed(job: Path, seed: int = 0, stack=(), val_losses=(1.0, 0.8, 0.7), test_acc: float = 0.9) -> Path:
    """A completed run folder with the files the report reads (summary.json, metrics.csv, .hydra/)."""
    (job / ".hydra").mkdir(parents=True)
    rows = []
    for epoch, val in enumerate(val_losses, 1):
        row = {k: 0.5 for k in METRIC_COLUMNS}
        row.update(epoch=epoch, step=epoch * 2, val_loss=val, clean_train_loss=val - 0.1, clean_gap_loss=0.1,
                   gap_loss=0.2)
        rows.append(",".join(str(row[k]) for k in METRIC_COLUMNS))
    (job / "metrics.csv").write_text("\r\n".join([",".join(METRIC_COLUMNS), *rows]) + "\r\n")
    best = min(val_losses)
    (job / "summary.json").write_text(json.dumps({
        "status": "completed", "seed": seed, "regularizers": list(stack), "monitor": "val_loss",
        "best": {"val_loss": best, "val_acc": 0.8, "epoch": val_losses.index(best) + 1},
        "final": {"clean_gap_loss": 0.1, "gap_loss": 0.2},
        "test": {"acc": test_acc, "loss": 0.3, "ece": 0.05}}))
    return job


def failed_job(job: Path, error: str, status: str = "failed") -> Path:
    (job / ".hydra").mkdir(parents=True)
    (job / "summary.json").write_text(json.dumps({"status": status, "error": error}))
    return job


def run_report(capsys, sweep: Path, *args: str) -> str:
    """``regbench report`` in-process; returns stderr (asserting exit status 0)."""
    main(["report", str(sweep), *args])
    return capsys.readouterr().err


def test_jobs_that_failed_before_training_are_listed_apart(tmp_path, capsys):
    sweep = tmp_path / "sweep"
    completed(sweep / "regularizer=[]" / "seed=0")
    (sweep / "regularizer=[l2]" / "seed=0" / ".hydra").mkdir(parents=True)  # crashed before summary.json
    early = sweep / "data=mnist" / "seed=0"
    (early / ".hydra").mkdir(parents=True)
    (early / "sweep_job.json").write_text(json.dumps({"outcome": "failed", "reason": "dataset files missing"}))
    (sweep / "sweep_status.json").write_text(json.dumps([
        {"run": "regularizer=[]/seed=0", "outcome": "ok", "reason": ""},
        {"run": "data=mnist/seed=0", "outcome": "failed", "reason": "dataset files missing"},
        {"run": "regularizer=[dropout]/seed=0", "outcome": "not run", "reason": ""},  # its folder is gone
    ]))
    err = run_report(capsys, sweep)
    out = report(sweep)
    failed = {f["run"]: (f["status"], f["error"]) for f in out["failed"]}
    assert failed == {
        "regularizer=[l2]/seed=0": ("not started", failed["regularizer=[l2]/seed=0"][1]),
        "data=mnist/seed=0": ("failed", "dataset files missing"),
        "regularizer=[dropout]/seed=0": ("not run", ""),
    }
    assert "before training started" in failed["regularizer=[l2]/seed=0"][1]
    assert [row["config"] for row in out["table"]] == ["regularizer=[]"]
    md = (sweep / "report.md").read_text()
    assert "## Failed or unfinished jobs (3)" in md
    assert "| data=mnist/seed=0 | failed | dataset files missing |" in md
    assert "3 failed or unfinished jobs" in err and err.count("\n") == 1


def test_an_all_failed_sweep_still_gets_a_report_of_its_failures(tmp_path, capsys):
    sweep = tmp_path / "sweep"
    failed_job(sweep / "regularizer=[]" / "seed=0", "training diverged: boom")
    (sweep / "regularizer=[l2]" / "seed=0" / ".hydra").mkdir(parents=True)
    err = run_report(capsys, sweep)
    md = (sweep / "report.md").read_text()
    assert "No completed run in this sweep" in md and "## Failed or unfinished jobs (2)" in md
    assert "| regularizer=\\[\\]/seed=0 | failed | training diverged: boom |" in md
    assert "![" not in md and not list(sweep.glob("*.png"))  # no plots of nothing
    assert (sweep / "report.csv").read_text().startswith("label,config,regularizers,n,best_val_loss")
    assert "no completed run, so no table or plots" in err


def test_a_folder_without_any_job_is_a_one_line_error(tmp_path, capsys):
    with pytest.raises(SystemExit) as e:
        main(["report", str(tmp_path)])
    assert e.value.code == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "no completed run below it" in err
    assert list(tmp_path.iterdir()) == []  # nothing written


def test_gap_plot_says_clean_train_loss_and_epoch_ticks_are_integers(tmp_path, monkeypatch):
    sweep = tmp_path / "sweep"
    completed(sweep / "regularizer=[]" / "seed=0")
    completed(sweep / "regularizer=[l2]" / "seed=0", stack=["l2"])
    axes = {}
    save = plots_mod._save

    def keep_axes(fig, path):
        fig.canvas.draw()  # ticks are placed at draw time
        axes[path.name] = (fig.axes[0].get_ylabel(), list(fig.axes[0].get_xticks()))
        return save(fig, path)

    monkeypatch.setattr(plots_mod, "_save", keep_axes)
    report(sweep)
    assert axes["gap.png"][0] == "val loss − clean train loss"
    for name in ("curves.png", "gap.png"):
        ticks = axes[name][1]
        assert ticks and all(t == int(t) for t in ticks), (name, ticks)  # 3 epochs: no 1.25, 1.5, ...


def test_report_files_are_written_atomically(tmp_path, monkeypatch, capsys):
    sweep = tmp_path / "sweep"
    completed(sweep / "regularizer=[]" / "seed=0")
    (sweep / "report.md").write_text("the previous report\n")

    def disk_full(fd):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr(os, "fsync", disk_full)
    with pytest.raises(SystemExit) as e:
        main(["report", str(sweep)])
    assert e.value.code == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "No space left on device" in err
    assert (sweep / "report.md").read_text() == "the previous report\n"  # never a 0-byte or half file
    assert not [p for p in sweep.iterdir() if ".tmp" in p.name]  # no temp file left behind


def test_a_symlink_planted_at_report_md_is_replaced_not_followed(tmp_path, capsys):
    sweep = tmp_path / "sweep"
    completed(sweep / "regularizer=[]" / "seed=0")
    outside = tmp_path / "precious.txt"
    outside.write_text("not yours\n")
    (sweep / "report.md").symlink_to(outside)
    (sweep / "gap.png").symlink_to(outside)
    run_report(capsys, sweep)
    assert outside.read_text() == "not yours\n"
    for name in ("report.md", "gap.png"):
        assert not (sweep / name).is_symlink()
    assert (sweep / "report.md").read_text().startswith("# Sweep report")


def test_error_text_with_newlines_and_pipes_stays_in_its_table_cell(tmp_path, capsys):
    sweep = tmp_path / "sweep"
    completed(sweep / "regularizer=[]" / "seed=0")
    failed_job(sweep / "regularizer=[l2]" / "seed=0", "line one\n| injected | row |\nline three")
    run_report(capsys, sweep)
    md = (sweep / "report.md").read_text().splitlines()
    rows = [line for line in md if line.startswith("| regularizer=\\[l2\\]/seed=0")]
    assert rows == ["| regularizer=\\[l2\\]/seed=0 | failed | line one \\| injected \\| row \\| line three |"]
    assert not any(line.startswith("| injected") for line in md)


def test_symlinked_configuration_folders_are_named_not_silently_skipped(tmp_path, capsys):
    sweep, elsewhere = tmp_path / "sweep", tmp_path / "elsewhere"
    completed(sweep / "regularizer=[]" / "seed=0")
    completed(elsewhere / "seed=0", stack=["l2"])
    (sweep / "regularizer=[l2]").symlink_to(elsewhere, target_is_directory=True)
    err = run_report(capsys, sweep)
    assert "regularizer=[l2]: a symbolic link, not followed" in err
    md = (sweep / "report.md").read_text()
    assert "## Symlinked folders not followed (1)" in md and "- regularizer=\\[l2\\]" in md
    assert [row["config"] for row in report(sweep)["table"]] == ["regularizer=[]"]  # not counted


@pytest.mark.parametrize("damage,reason", [
    (lambda job: (job / "metrics.csv").write_text(
        (job / "metrics.csv").read_text().replace("0.5,", "abc,", 1)), "metrics.csv has a malformed row"),
    (lambda job: (job / "metrics.csv").write_text(",".join(METRIC_COLUMNS) + "\r\n"), "metrics.csv has no epoch rows"),
    (lambda job: (job / "summary.json").write_text(json.dumps({"status": "completed"})),
     "summary.json: missing or malformed key 'final'"),
    (lambda job: (job / "summary.json").write_text("[1, 2]"), "summary.json: expected a JSON object"),
], ids=["bad-row", "header-only", "missing-key", "not-an-object"])
def test_a_damaged_completed_run_is_listed_not_a_traceback(tmp_path, capsys, damage, reason):
    sweep = tmp_path / "sweep"
    completed(sweep / "regularizer=[]" / "seed=0")
    damage(completed(sweep / "regularizer=[l2]" / "seed=0", stack=["l2"]))
    run_report(capsys, sweep)
    failed = report(sweep)["failed"]
    assert [(f["run"], f["status"]) for f in failed] == [("regularizer=[l2]/seed=0", "unusable"
                                                         if "summary.json: expected" not in reason else "unreadable")]
    assert failed[0]["error"].startswith(reason)


def test_a_nan_summary_value_is_reported_as_nan_and_sorted_last(tmp_path, capsys):
    sweep = tmp_path / "sweep"
    for seed in (0, 1):
        completed(sweep / "regularizer=[]" / f"seed={seed}", seed=seed, test_acc=0.8)
        job = completed(sweep / "regularizer=[l2]" / f"seed={seed}", seed=seed, stack=["l2"])
    summary = json.loads((job / "summary.json").read_text())
    summary["best"]["val_loss"] = float("nan")
    summary["test"]["acc"] = float("inf")
    (job / "summary.json").write_text(json.dumps(summary))  # JSON's NaN / Infinity, as Python writes them
    run_report(capsys, sweep)
    table = report(sweep)["table"]
    assert [row["config"] for row in table] == ["regularizer=[]", "regularizer=[l2]"]
    l2 = table[1]
    assert math.isnan(l2["best_val_loss"]) and math.isnan(l2["best_val_loss_std"])
    assert l2["test_acc"] == math.inf
    assert table[0]["test_acc"] == pytest.approx(0.8) and table[0]["test_acc_std"] == 0.0
    assert "| regularizer=\\[l2\\] | 2 | nan ± nan" in (sweep / "report.md").read_text()


def test_a_summary_of_the_wrong_types_is_unreadable_data_not_a_traceback(tmp_path, capsys):
    """summary.json is validated against the Summary type before any of it is used."""
    sweep = tmp_path / "sweep"
    completed(sweep / "regularizer=[]" / "seed=0")
    job = completed(sweep / "regularizer=[l2]" / "seed=0", stack=["l2"])
    summary = json.loads((job / "summary.json").read_text())
    (job / "summary.json").write_text(json.dumps({**summary, "test": "__import__('os')"}))
    run_report(capsys, sweep)
    failed = report(sweep)["failed"]
    assert [(f["run"], f["status"], f["error"]) for f in failed] == [
        ("regularizer=[l2]/seed=0", "unreadable", "summary.json: key 'test' is \"__import__('os')\", expected dict")]


# ------------------------------------------------------------------------------- what a careful user expects


def test_text_cells_a_spreadsheet_would_evaluate_are_prefixed_in_report_csv(tmp_path, capsys):
    import csv

    sweep = tmp_path / "sweep"
    for name in ("=HYPERLINK(1)", "+cmd", "-x", "@SUM(1)"):
        completed(sweep / name / "seed=0")
    run_report(capsys, sweep)
    rows = list(csv.DictReader(open(sweep / "report.csv", newline="")))
    assert sorted(r["config"] for r in rows) == ["'+cmd", "'-x", "'=HYPERLINK(1)", "'@SUM(1)"]
    assert all(r["label"].startswith("'") for r in rows)
    assert all(float(r["best_val_loss"]) == 0.7 for r in rows)  # numbers stay numbers


def test_report_md_shows_markup_from_folder_names_and_errors_as_text(tmp_path, capsys):
    sweep = tmp_path / "sweep"
    completed(sweep / "[click](http:evil.example)" / "seed=0")
    completed(sweep / "![img](http:x.example)<b>" / "seed=0")
    failed_job(sweep / "regularizer=[l2]" / "seed=0", "<script>alert(1)</script> see https://x.example or `code`")
    run_report(capsys, sweep)
    md = (sweep / "report.md").read_text()
    assert "<script>" not in md and "<b>" not in md and "&lt;script&gt;" in md
    assert "](" not in md.replace("](curves.png)", "").replace("](gap.png)", "").replace("](final_gap.png)", "")
    assert "\\[click\\]\\(http:evil.example\\)" in md and "\\!\\[img\\]" in md
    assert "https://" not in md and "`code`" not in md


def test_control_characters_in_folder_names_are_not_printed_raw(tmp_path, capsys):
    sweep = tmp_path / "sweep\x1b]0;owned\x07"
    completed(sweep / "regularizer=[]" / "seed=0")
    (sweep / "x\x1b[2Jy").symlink_to(tmp_path, target_is_directory=True)
    main(["report", str(sweep)])
    out, err = capsys.readouterr()
    assert "\x1b" not in out + err and "\x07" not in out + err
    assert "sweep\\x1b]0;owned\\x07" in out and "x\\x1b[2Jy: a symbolic link" in err
    assert "\x1b" not in (sweep / "report.md").read_text()


def test_best_epoch_val_acc_is_the_best_epochs(tmp_path):
    """The column says best-epoch: the val acc of the epoch the run chose (by val_loss), not the highest val acc
    of any epoch (here 0.5 in every row, 0.8 at the best epoch)."""
    sweep = tmp_path / "sweep"
    completed(sweep / "regularizer=[]" / "seed=0")
    assert report(sweep)["table"][0]["best_val_acc"] == 0.8


def test_one_seed_has_no_std_and_no_error_bar(tmp_path, monkeypatch, capsys):
    import csv

    sweep = tmp_path / "sweep"
    completed(sweep / "regularizer=[]" / "seed=0")
    for seed, gap in ((0, 0.1), (1, 0.3)):
        job = completed(sweep / "regularizer=[l2]" / f"seed={seed}", seed=seed, stack=["l2"])
        s = json.loads((job / "summary.json").read_text())
        s["final"]["clean_gap_loss"] = gap
        (job / "summary.json").write_text(json.dumps(s))
    bars = {}
    save = plots_mod._save

    def keep(fig, path):
        from matplotlib.collections import LineCollection

        bars[path.name] = sum(len(c.get_segments()) for c in fig.axes[0].collections if isinstance(c, LineCollection))
        return save(fig, path)

    monkeypatch.setattr(plots_mod, "_save", keep)
    run_report(capsys, sweep)
    table = {row["config"]: row for row in report(sweep)["table"]}
    assert table["regularizer=[]"]["best_val_loss_std"] is None
    assert table["regularizer=[l2]"]["final_gap_std"] == pytest.approx(math.sqrt(0.02))
    rows = {r["config"]: r for r in csv.DictReader(open(sweep / "report.csv", newline=""))}
    assert rows["regularizer=[]"]["best_val_loss_std"] == "" and rows["regularizer=[l2]"]["final_gap_std"] != ""
    assert bars["final_gap.png"] == 1  # the error bar of the two seeds only
