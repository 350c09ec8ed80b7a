"""A new user's first hour (issue 12): runs that end at chance say so, the preview shows every class, the log
and summary.json say what was run and where it came from, ``resume`` of a finished run, the help, the bar."""

from __future__ import annotations

import json
import logging
import re
import sys

import pytest
import torch

from regbench.augment import preview_indices
from regbench.cli import main
from regbench.data import load_data
from regbench.logs import RunLogger
from regbench.lint import chance_warning
from regbench.train import fit
from tests.conftest import REPO, TINY, compose_cfg

# ------------------------------------------------------------------------------------ ending at chance


def test_chance_threshold_is_three_standard_errors_above_one_over_classes():
    # 10 classes, 400 validation images: chance 0.1, standard error sqrt(0.1 * 0.9 / 400) = 0.015.
    assert chance_warning({"val_acc": 0.144}, 10, 400) is not None
    assert chance_warning({"val_acc": 0.100}, 10, 400) is not None
    assert chance_warning({"val_acc": 0.146}, 10, 400) is None
    assert "not above 0.145" in chance_warning({"val_acc": 0.1}, 10, 400)
    # Too few images to tell chance from learning (3 standard errors above 1/K exceed 1/K): no verdict.
    assert chance_warning({"val_acc": 0.1}, 10, 80) is None
    assert chance_warning({"val_acc": 0.1}, 10, 82) is not None
    assert chance_warning({"val_acc": 0.5}, 2, 400) is not None and chance_warning({"val_acc": 0.6}, 2, 400) is None
    assert chance_warning(None, 10, 400) is None


# Decoupled decay with lr * rate = 1 wipes the weights before every step (w <- w * (1 - lr * rate)), so each
# step starts over from one gradient step: the network never accumulates what it learns, ends up predicting a
# single class, and the stratified validation set (40 images per class) puts it at exactly 1/10.
AT_CHANCE = ["optimizer=sgd", "optimizer.lr=0.1", "regularizer=[weight_decay]", "regularizer.weight_decay.rate=10",
             "trainer.max_epochs=1", "trainer.progress_bar=false", "trainer.save_checkpoints=false"]


def test_a_run_that_ends_at_chance_warns_in_the_log_and_the_summary(tmp_path, caplog):
    with caplog.at_level("WARNING"):
        fit(compose_cfg(*AT_CHANCE), tmp_path / "r")
    summary = json.loads((tmp_path / "r" / "summary.json").read_text())
    assert summary["status"] == "completed" and summary["final"]["val_acc"] == pytest.approx(0.1, rel=1e-5)
    assert [w for w in summary["warnings"] if "ended at chance accuracy" in w] == [
        "the run ended at chance accuracy: final val acc 0.100 with 10 classes (chance 0.100; not above 0.145, "
        "chance + 3 standard errors over 400 validation images): the model did not learn; check optimizer.lr "
        "(too high can kill ReLUs, too low stays on the initial plateau), model.init, gradient spikes "
        "(regularizer=[grad_clip]), or train longer"]
    assert sum("ended at chance accuracy" in r.getMessage() for r in caplog.records) == 1


def test_a_run_that_learns_does_not_warn(tmp_path):
    fit(compose_cfg("trainer.max_epochs=1", "trainer.progress_bar=false", "trainer.save_checkpoints=false"),
        tmp_path / "r")
    summary = json.loads((tmp_path / "r" / "summary.json").read_text())
    assert summary["final"]["val_acc"] > 0.5 and summary["warnings"] == []


# -------------------------------------------------------------------------------- augmentation preview


def test_preview_indices_take_every_class_in_turn():
    y = torch.arange(10).repeat_interleave(7)  # ordered by class, as the training split is
    idx = preview_indices(y, 16)
    assert y[idx].tolist() == [*range(10), *range(6)]
    assert len(set(idx.tolist())) == 16
    shuffled = y[torch.randperm(len(y), generator=torch.Generator().manual_seed(0))]
    assert sorted(shuffled[preview_indices(shuffled, 20)].tolist()) == sorted([*range(10)] * 2)


def test_the_preview_grid_shows_every_class(tmp_path, monkeypatch):
    seen = {}
    monkeypatch.setattr(RunLogger, "log_images", lambda self, before, after: seen.update(before=before))
    cfg = compose_cfg(*TINY, "augmentation=digits")
    fit(cfg, tmp_path / "r")
    data = load_data(cfg.data, torch.device("cpu"), keep_raw=True)
    idx = preview_indices(data.train_y, 16)
    assert torch.equal(seen["before"], data.train_raw[idx])
    assert set(data.train_y[idx].tolist()) == set(range(10))
    assert set(data.train_y[:16].tolist()) != set(range(10))  # what the first 16 would have shown


# ---------------------------------------------------------------------------------- what was run, said


def test_penalty_log_line_gives_penalised_and_other_parameter_counts(tmp_path, caplog):
    with caplog.at_level("INFO"):
        fit(compose_cfg(*TINY, "regularizer=[l1,l2]"), tmp_path / "r")
    lines = [r.getMessage() for r in caplog.records if " penalty: " in r.getMessage()]
    # MLP 784-256-128-10: weights 200,704 + 32,768 + 1,280; biases 256 + 128 + 10.
    assert lines == ["l1 penalty: 234,752 parameters in 3 tensors penalised, 394 in 3 tensors not penalised",
                     "l2 penalty: 234,752 parameters in 3 tensors penalised, 394 in 3 tensors not penalised"]


@pytest.mark.parametrize("overrides,name,preset", [
    (["augmentation=digits"], "digits", "digits"),
    (["augmentation=digits", "augmentation.ops.0.rotation=20"], "custom", "digits"),
    (["augmentation.ops=[{op:noise}]"], "custom", "none"),
    ([], "none", "none"),
])
def test_summary_names_the_augmentation_custom_when_its_ops_were_changed(overrides, name, preset, tmp_path):
    fit(compose_cfg(*TINY, *overrides), tmp_path / "r")
    info = json.loads((tmp_path / "r" / "summary.json").read_text())["augmentation"]
    assert (info["name"], info["preset"]) == (name, preset)


def test_rerun_and_resume_record_the_run_they_came_from(tmp_path):
    src = tmp_path / "src"
    main([*TINY, f"hydra.run.dir={src}"])
    assert json.loads((src / "summary.json").read_text())["provenance"] == {"rerun_of": None, "resumed_from": None}
    main(["rerun", str(src), f"hydra.run.dir={tmp_path}/again", "trainer.max_epochs=2"])
    text = (tmp_path / "again" / "summary.json").read_text()
    summary = json.loads(text)
    assert summary["provenance"] == {"rerun_of": str(src.resolve()), "resumed_from": None}
    assert summary["command"] == ["regbench", "rerun", str(src), f"hydra.run.dir={tmp_path}/again",
                                  "trainer.max_epochs=2"]
    assert "regbench-rerun-" not in text  # no trace of the temporary config folder
    # The rerun, killed just before its completion marker, then resumed: it keeps saying where it came from.
    (tmp_path / "again" / "COMPLETED").unlink()
    (tmp_path / "again" / "summary.json").write_text(json.dumps({**summary, "status": "interrupted"}))
    main(["resume", str(tmp_path / "again")])
    resumed = json.loads((tmp_path / "again" / "summary.json").read_text())
    assert resumed["status"] == "completed" and resumed["resumed_from_epoch"] == 2
    assert resumed["provenance"] == {"rerun_of": str(src.resolve()),
                                     "resumed_from": str((tmp_path / "again").resolve())}
    assert resumed["command"][:2] == ["regbench", "resume"]


def test_resume_of_a_finished_run_says_so_and_exits_0(tmp_path, capsys):
    run = tmp_path / "done"
    fit(compose_cfg(*TINY), run)
    before = {p: p.stat().st_mtime_ns for p in run.rglob("*")}
    main(["resume", str(run)])  # returns: exit status 0
    out, err = capsys.readouterr()
    assert out == f"regbench: {run.resolve()} is already finished (completed); nothing to resume\n" and err == ""
    assert {p: p.stat().st_mtime_ns for p in run.rglob("*")} == before  # nothing written


def test_help_lists_the_launchers(capsys):
    with pytest.raises(SystemExit) as e:
        main(["--help"])
    assert e.value.code in (0, None)
    out = capsys.readouterr().out
    line = next(ln for ln in out.splitlines() if ln.strip().startswith("hydra/launcher:"))
    shipped = sorted(p.stem for p in (REPO / "configs" / "hydra" / "launcher").glob("*.yaml"))
    names = [item.split()[0] for item in line.split(":", 1)[1].split(",")]
    assert names == ["basic", *shipped, "ray"]  # Hydra's default, the shipped configs, the plugin's own


# ------------------------------------------------------------------------------ progress bar and logging


def test_log_lines_do_not_land_inside_the_progress_bar(tmp_path, capsys):
    root = logging.getLogger()
    handler = logging.StreamHandler(sys.stderr)  # a console handler, as Hydra's job logging sets up
    handler.setFormatter(logging.Formatter("%(message)s"))
    root.addHandler(handler)
    root.setLevel(logging.INFO)
    try:
        fit(compose_cfg(*TINY, "trainer.max_epochs=3", "trainer.progress_bar=true"), tmp_path / "r")
    finally:
        root.removeHandler(handler)
    err = capsys.readouterr().err
    segments = re.split(r"[\r\n]", err)
    epoch_lines = [s for s in segments if "train loss" in s]
    assert len(epoch_lines) == 3
    for s in epoch_lines:  # each epoch line starts a line of its own, never after a bar's text
        assert re.match(r"epoch \d/3  train loss", s), s
    assert any("step" in s and "%" in s for s in segments)  # the bar was drawn
    assert root.handlers.count(handler) == 0 and not any(type(h).__name__ == "_TqdmLoggingHandler"
                                                         for h in root.handlers)


def test_the_bar_adds_no_console_handler_where_there_was_none(tmp_path, capsys):
    root = logging.getLogger()
    for h in [h for h in root.handlers if isinstance(h, logging.StreamHandler)
              and h.stream in (sys.stdout, sys.stderr)]:
        root.removeHandler(h)
    fit(compose_cfg(*TINY, "trainer.progress_bar=true"), tmp_path / "r")
    err = capsys.readouterr().err
    assert "train loss" not in err  # the log line went nowhere, as before: tqdm added no handler of its own



# ---------------------------------------------------------------------------------- the TensorBoard hint


def test_tensorboard_hint_runs_as_printed(tmp_path, monkeypatch):
    import shutil

    from regbench.cli import tensorboard_command

    venv_bin = tmp_path / "venv" / "bin"
    venv_bin.mkdir(parents=True)
    (venv_bin / "tensorboard").write_text("#!/bin/sh\n")
    monkeypatch.setattr(sys, "executable", str(venv_bin / "python"))
    monkeypatch.setattr(shutil, "which", lambda name: None)  # the venv is not activated: not on PATH
    assert tensorboard_command() == str(venv_bin / "tensorboard")
    monkeypatch.setattr(shutil, "which", lambda name: str(venv_bin / name))  # activated
    assert tensorboard_command() == "tensorboard"
    monkeypatch.setattr(shutil, "which", lambda name: "/usr/bin/tensorboard")  # another one first on PATH
    assert tensorboard_command() == str(venv_bin / "tensorboard")
    (venv_bin / "tensorboard").unlink()
    monkeypatch.setattr(shutil, "which", lambda name: None)  # none beside this Python: its module
    assert tensorboard_command() == f"{venv_bin / 'python'} -m tensorboard.main"


def test_make_tb_runs_the_venv_tensorboard():
    import subprocess

    out = subprocess.run(["make", "--no-print-directory", "-n", "tb", "DIR=outputs/runs/x"], cwd=REPO,
                         capture_output=True, text=True, check=True).stdout
    assert ".venv/bin/tensorboard --logdir 'outputs/runs/x'" in out  # (under `make test`, make -n runs nested)
