"""``regbench report`` on hand-made sweep folders (no training): failed and unfinished jobs listed apart, atomic
writes that never follow a planted symlink, Markdown escaping, and bad run files handled without a traceback."""

from __future__ import annotations

import errno
import json
import math
import os
import re
from pathlib import Path

import pytest

from regbench import report as report_mod
from regbench import report_plots as plots_mod
from regbench.cli import main
from regbench.records import METRIC_COLUMNS
from regbench.report import METRICS, report
from regbench.report_files import _cell, csv_columns
from regbench.stats import format_p


@pytest.fixture(autouse=True)
def paper_figures(monkeypatch):
    """The paper figures (regbench.report_figures, drawn and checked in tests/test_report_plots.py) are recorded
    here, not drawn: they take seconds, and these tests are about the report's numbers and files. The calls are
    returned; test_the_paper_figures_are_drawn_from_the_comparisons draws them for real (monkeypatch.undo())."""
    calls: list[tuple[str, tuple, dict]] = []
    monkeypatch.setattr(report_mod, "plot_small_multiples", lambda *a, **k: calls.append(("small", a, k)) or [])
    monkeypatch.setattr(report_mod, "plot_forest", lambda *a, **k: calls.append(("forest", a, k)) or [])
    return calls


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
    assert (sweep / "report.csv").read_text() == ",".join(csv_columns(METRICS)) + "\n"  # the header, no rows
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
    md = (sweep / "report.md").read_text()
    assert "| regularizer=\\[l2\\] | 2 | nan (no interval: nan/inf) |" in md
    assert "no test: a NaN or infinite value among the seeds" in md


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
    assert all(r["vs"].startswith("'") for r in rows if r["vs"])  # the baseline's label too
    assert all(float(r["best_val_loss"]) == 0.7 for r in rows)  # numbers stay numbers


def test_report_md_shows_markup_from_folder_names_and_errors_as_text(tmp_path, capsys):
    sweep = tmp_path / "sweep"
    completed(sweep / "[click](http:evil.example)" / "seed=0")
    completed(sweep / "![img](http:x.example)<b>" / "seed=0")
    failed_job(sweep / "regularizer=[l2]" / "seed=0", "<script>alert(1)</script> see https://x.example or `code`")
    run_report(capsys, sweep)
    md = (sweep / "report.md").read_text()
    assert "<script>" not in md and "<b>" not in md and "&lt;script&gt;" in md
    assert "](" not in re.sub(r"\]\([a-z_]+\.png\)", "", md)  # only the report's own figures are links
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
    assert rows["regularizer=[]"]["best_val_loss_ci_lo"] == "" and rows["regularizer=[l2]"]["final_gap_ci_lo"] != ""
    assert bars["final_gap.png"] == 1  # the error bar of the two seeds only


# ------------------------------------------------------------------------- statistics (issue 29)

BASE = [0.70, 0.72, 0.69, 0.71, 0.73]  # best-epoch val loss of the baseline's 5 seeds
LOWER = [0.651, 0.668, 0.642, 0.659, 0.681]  # 0.05 lower on every seed, give or take 0.003: a planted effect
SAME = [0.705, 0.715, 0.695, 0.705, 0.735]  # the baseline ± 0.007: a null


def seeded(sweep: Path, config: str, losses, stack=(), **summary) -> None:
    """One completed run per value (seed i: best-epoch and final val loss losses[i]); ``summary``: keys to set."""
    for seed, loss in enumerate(losses):
        job = completed(sweep / config / f"seed={seed}", seed=seed, stack=stack, val_losses=(2.0, loss))
        if summary:
            s = json.loads((job / "summary.json").read_text())
            (job / "summary.json").write_text(json.dumps({**s, **summary}))


def comparison(out: dict, config: str, metric: str = "best_val_loss", vs: str = "regularizer=[]"):
    [c] = [f["comparison"] for f in out["comparisons"] if f["row"]["config"] == config and f["metric"] == metric
           and f["reference"]["config"] == vs]
    return c


def test_a_planted_effect_is_different_and_a_null_within_noise_in_every_file(tmp_path, capsys):
    import csv

    sweep = tmp_path / "sweep"
    seeded(sweep, "regularizer=[]", BASE)
    seeded(sweep, "regularizer=[l2]", LOWER, stack=["l2"])
    seeded(sweep, "regularizer=[dropout]", SAME, stack=["dropout"])
    run_report(capsys, sweep, "--metrics", "best_val_loss,test_acc")
    out = report(sweep, metrics="best_val_loss,test_acc")
    l2, dropout = comparison(out, "regularizer=[l2]"), comparison(out, "regularizer=[dropout]")
    assert l2.paired and l2.n == 5 and l2.decision == "different" and l2.p_holm == pytest.approx(2 * l2.p)
    assert l2.verdict == f"lower than the baseline (p_holm {format_p(l2.p_holm)})"
    assert dropout.decision == "within noise" and "80 % power would need ≈" in dropout.verdict
    assert comparison(out, "regularizer=[l2]", "test_acc").verdict == "within noise: equal on every seed up to " \
                                                                        "float32 rounding"
    md = (sweep / "report.md").read_text()
    assert f"| {_cell(l2.verdict)} |" in md and "paired \\(initial weights and data order\\)" in md
    assert "| regularizer=\\[dropout\\] | 5 | " in md and "within noise \\(95 % CI of Δ: " in md
    assert "### best-epoch val loss (lower is better)" in md and "assuming the observed mean Δ and SD" in md
    assert "| **regularizer=\\[\\]** (baseline) | 5 | 0.7100 [0.6904, 0.7296] |" in md  # mean [t interval]
    rows = {r["config"]: r for r in csv.DictReader(open(sweep / "report.csv", newline=""))}
    assert list(rows) == ["regularizer=[]", "regularizer=[l2]", "regularizer=[dropout]"]  # the baseline first
    assert rows["regularizer=[l2]"]["best_val_loss_decision"] == "different"
    assert rows["regularizer=[l2]"]["best_val_loss_paired"] == "True" and rows["regularizer=[l2]"]["vs"] == \
        "regularizer=[]"
    assert float(rows["regularizer=[l2]"]["best_val_loss_p_holm"]) == pytest.approx(l2.p_holm)
    assert rows["regularizer=[dropout]"]["best_val_loss_seeds_for_80pct_power"] == str(dropout.seeds_needed)
    assert rows["regularizer=[]"]["best_val_loss_verdict"] == ""  # the baseline is not compared with itself
    assert "test_nll" not in rows["regularizer=[]"]  # --metrics chose the columns


def test_runs_that_do_not_share_initial_weights_are_compared_by_welch_and_say_why(tmp_path):
    sweep = tmp_path / "sweep"
    params = {"trainable": 25450, "frozen": 0, "buffers": 0, "total": 25450}
    seeded(sweep, "regularizer=[]", BASE, params=params)
    seeded(sweep, "regularizer=[batchnorm]", LOWER, stack=["batchnorm"],
           params={"trainable": 25514, "frozen": 0, "buffers": 64, "total": 25578})
    seeded(sweep, "regularizer=[l2]", LOWER, stack=["l2"], params=params, data={"train": 200})
    out = report(sweep)
    bn, l2 = comparison(out, "regularizer=[batchnorm]"), comparison(out, "regularizer=[l2]")
    assert not bn.paired and bn.effect_name == "Hedges' g"
    assert bn.why_unpaired == ("different architectures (parameters 25450 vs 25578): the same seed does not give "
                               "the same initial weights")
    assert l2.paired and l2.effect_name == "d_z"
    md = (sweep / "report.md").read_text()
    assert "Welch: different architectures" in md and "paired \\(initial weights; the training data differ\\)" in md


def test_a_different_model_config_is_a_different_architecture(tmp_path):
    sweep = tmp_path / "sweep"
    seeded(sweep, "model.hidden=[32]", BASE)
    seeded(sweep, "model.hidden=[64]", LOWER)
    for hidden, config in ((32, "model.hidden=[32]"), (64, "model.hidden=[64]")):
        for job in (sweep / config).iterdir():
            (job / ".hydra" / "config.yaml").write_text(f"seed: 0\nmodel:\n  name: mlp\n  hidden: [{hidden}]\n")
    out = report(sweep, baseline="model.hidden=[32]")
    c = comparison(out, "model.hidden=[64]", vs="model.hidden=[32]")
    assert not c.paired and c.why_unpaired.startswith("different architectures: ")
    assert out["baseline_chosen"] == "chosen with --baseline"


def test_the_pairing_rule_holds_for_regbenchs_own_init():
    """What the report assumes, checked on real models: the same seed gives the same initial weights where the
    parameter counts (and the model config) agree — dropout, l2, label smoothing — and not with batch norm."""
    import torch

    from regbench.experiment import build_experiment
    from tests.conftest import compose_cfg

    def initial(*overrides):
        exp = build_experiment(compose_cfg("data.train_size=64", "data.test_size=100", "model.hidden=[16]",
                                           "seed=3", *overrides), torch.device("cpu"))
        return exp.params, exp.model.state_dict()

    params, weights = initial()
    for stack in ("[dropout]", "[l2]", "[label_smoothing]", "[batchnorm]"):
        p, w = initial(f"regularizer={stack}")
        same = list(w) == list(weights) and all(torch.equal(w[k], weights[k]) for k in w)
        assert same == (p == params), stack
        assert same == (stack != "[batchnorm]"), stack


def test_one_seed_per_configuration_says_no_interval_can_be_given(tmp_path, capsys):
    sweep = tmp_path / "sweep"
    seeded(sweep, "regularizer=[]", BASE[:1])
    seeded(sweep, "regularizer=[l2]", LOWER[:1], stack=["l2"])
    run_report(capsys, sweep)
    md = (sweep / "report.md").read_text()
    assert "Every configuration has one seed: no interval can be given" in md
    assert "| regularizer=\\[l2\\] | 1 | 0.6510 |" in md  # the value alone: no interval of nothing
    assert "no test: the baseline has fewer than 2 seeds: no interval can be given" in md
    tex = (sweep / "report.tex").read_text()
    assert "\\pm" not in tex.split("\\midrule")[1]


def test_all_pairs_compares_every_pair_in_one_holm_family_per_metric(tmp_path):
    sweep = tmp_path / "sweep"
    seeded(sweep, "regularizer=[]", BASE)
    seeded(sweep, "regularizer=[l2]", LOWER, stack=["l2"])
    seeded(sweep, "regularizer=[dropout]", SAME, stack=["dropout"])
    out = report(sweep, metrics="best_val_loss", all_pairs=True)
    assert len(out["comparisons"]) == 3
    pair = [f for f in out["comparisons"] if f["reference"]["config"] != "regularizer=[]"]
    assert [(f["reference"]["label"], f["row"]["label"]) for f in pair] == [("[l2]", "[dropout]")] or \
        [(f["reference"]["label"], f["row"]["label"]) for f in pair] == [("regularizer=[l2]", "regularizer=[dropout]")]
    assert pair[0]["comparison"].verdict.startswith("higher than regularizer=[l2] (p_holm ")
    ps = sorted(f["comparison"].p for f in out["comparisons"])
    assert min(f["comparison"].p_holm for f in out["comparisons"]) == pytest.approx(3 * ps[0])
    md = (sweep / "report.md").read_text()
    assert "## Every pair of configurations" in md and "| configuration | vs | n |" in md


def test_report_tex_is_a_booktabs_table_with_best_bold_and_marks_defined(tmp_path):
    import shutil
    import subprocess

    sweep = tmp_path / "sweep"
    seeded(sweep, "regularizer=[]", BASE)
    seeded(sweep, "regularizer=[l2]", LOWER, stack=["l2"])
    seeded(sweep, "regularizer=[dropout_&_50%]", SAME, stack=["dropout"])
    report(sweep, metrics="best_val_loss,test_acc")
    tex = (sweep / "report.tex").read_text()
    table = tex.split("% --- regbench table: from here ---")[1].split("% --- regbench table: to here ---")[0]
    assert tex.startswith("% regbench report") and "\\usepackage{booktabs}" in tex and tex.count("\\begin{") == \
        tex.count("\\end{")
    for part in ("\\begin{table}", "\\caption{", "\\begin{tabular}{l r cc}", "\\toprule", "\\midrule", "\\bottomrule"):
        assert part in table, part
    rows = table.split("\\midrule")[1].split("\\bottomrule")[0].strip().splitlines()
    assert rows[0].startswith("regularizer=[l2] & 5 & $\\mathbf{0.6602 \\pm 0.0187}^{***}$ & ")  # best, p_holm < .001
    assert rows[2].startswith("regularizer=[dropout\\_\\&\\_50\\%] & 5 & $0.7110 \\pm 0.0188$ & ")  # escaped, no mark
    assert "$^{*}$, $^{**}$, $^{***}$: different from the baseline" in table and "$^{\\dagger}$: Welch" in table
    if shutil.which("pdflatex"):  # a standard LaTeX compiles it as written
        proc = subprocess.run(["pdflatex", "-interaction=nonstopmode", "-halt-on-error", "report.tex"], cwd=sweep,
                              capture_output=True, text=True, timeout=120)
        assert proc.returncode == 0, proc.stdout[-2000:]


def test_the_gap_against_the_clean_and_the_as_trained_training_loss(tmp_path):
    sweep = tmp_path / "sweep"
    seeded(sweep, "regularizer=[]", BASE[:2])
    seeded(sweep, "regularizer=[l2]", LOWER[:2], stack=["l2"], final={"gap_loss": 0.2})  # trainer.clean_subset=0
    table = {row["config"]: row for row in report(sweep)["table"]}
    assert table["regularizer=[]"]["final_gap"] == pytest.approx(0.1)  # val − clean train loss
    assert table["regularizer=[]"]["final_gap_trained"] == pytest.approx(0.2)  # val − train loss as trained
    assert table["regularizer=[l2]"]["final_gap"] is None and table["regularizer=[l2]"]["final_gap_trained"] == 0.2
    assert table["regularizer=[]"]["final_val_loss"] == pytest.approx(0.71)  # the last epoch's


@pytest.mark.slow
def test_a_real_sweep_says_different_for_a_planted_effect_and_within_noise_for_a_null(tmp_path):
    """The issue's "done means": data.train_size 100 vs 2000 certainly changes the best-epoch val loss;
    trainer.num_threads changes nothing but the order of a sum. 4 configurations × 3 seeds of a tiny MLP, 3 epochs,
    through the command line."""
    import csv
    import subprocess
    import sys

    sweep = tmp_path / "sweep"
    regbench = [str(Path(sys.executable).parent / "regbench")]
    subprocess.run([*regbench, "-m", "data.train_size=100,2000", "trainer.num_threads=1,2", "seed=0,1,2",
                    "trainer.max_epochs=3", "model.hidden=[16]", "data.test_size=100", "trainer.progress_bar=false",
                    f"hydra.sweep.dir={sweep}"], cwd=tmp_path, check=True, capture_output=True, timeout=600)
    proc = subprocess.run([*regbench, "report", str(sweep), "--metrics", "best_val_loss,test_acc"], cwd=tmp_path,
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0 and proc.stderr == "", proc.stderr
    rows = {r["label"]: r for r in csv.DictReader(open(sweep / "report.csv", newline=""))}
    base = "data.train_size=100,trainer.num_threads=1"  # the first configuration in folder order
    assert rows[base]["vs"] == "" and rows["data.train_size=100,trainer.num_threads=2"]["vs"] == base
    null = rows["data.train_size=100,trainer.num_threads=2"]
    assert null["best_val_loss_decision"] == "within noise" and null["best_val_loss_paired"] == "True"
    for threads in (1, 2):
        planted = rows[f"data.train_size=2000,trainer.num_threads={threads}"]
        assert planted["best_val_loss_decision"] == "different", planted["best_val_loss_verdict"]
        assert planted["best_val_loss_verdict"].startswith("lower than the baseline (p_holm ")
        assert planted["best_val_loss_paired"] == "True" and planted["n"] == "3"
    md = (sweep / "report.md").read_text()
    assert "paired \\(initial weights; the training data differ\\)" in md
    assert "paired \\(initial weights and data order\\)" in md


def test_the_paper_figures_get_each_seeds_curves_and_the_comparisons(tmp_path, paper_figures):
    sweep = tmp_path / "sweep"
    seeded(sweep, "regularizer=[]", BASE[:3])
    seeded(sweep, "regularizer=[l2]", LOWER[:3], stack=["l2"])
    out = report(sweep, metrics="best_val_loss,test_acc")
    (small, (curves, baseline, _, metric), kw), (forest, (rows, _), _) = paper_figures
    assert (small, forest, baseline, metric) == ("small", "forest", "regularizer=[]", "val_loss")
    assert curves["regularizer=[l2]"] == [[2.0, loss] for loss in LOWER[:3]]  # per seed, per epoch
    assert kw["train_metric"] == "clean_train_loss" and kw["train"]["regularizer=[]"][0] == [1.9, BASE[0] - 0.1]
    c = comparison(out, "regularizer=[l2]")
    assert rows[0] == {"config": "regularizer=[l2]", "metric": "best_val_loss", "delta": c.delta, "lo": c.t_ci[0],
                       "hi": c.t_ci[1], "verdict": c.verdict}
    assert [r["metric"] for r in rows] == ["best_val_loss", "test_acc"]


def test_the_paper_figures_are_drawn_from_the_comparisons(tmp_path, monkeypatch):
    monkeypatch.undo()  # the real figures
    sweep = tmp_path / "sweep"
    seeded(sweep, "regularizer=[]", BASE[:3])
    seeded(sweep, "regularizer=[l2]", LOWER[:3], stack=["l2"])
    names = [p.name for p in report(sweep, metrics="best_val_loss")["files"]]
    for stem in ("overfitting_val_loss", "forest_best_val_loss"):
        assert [f"{stem}.{ext}" in names and (sweep / f"{stem}.{ext}").stat().st_size > 0
                for ext in ("png", "pdf", "svg")] == [True] * 3, names
    assert "![forest\\_best\\_val\\_loss](forest_best_val_loss.png)" in (sweep / "report.md").read_text()
