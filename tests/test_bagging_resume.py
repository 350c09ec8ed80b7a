"""A bagging run killed at any of its write points, then resumed, ends as the run never killed (bitwise on CPU):
its ensemble rows (written before the members' checkpoints of their epoch), its members, its end. Also: nothing is
written through a symlinked members/ folder; a member is resumed with its bagging run, never alone."""

from __future__ import annotations

import csv
import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from regbench.errors import RegbenchError
from regbench.train import fit
from tests.conftest import compose_cfg, one_line_error

RUN = ["regularizer=[bagging,dropout]", "regularizer.bagging.members=2", "data.train_size=200", "data.test_size=100",
       "model.hidden=[32]", "trainer.max_epochs=3", "trainer.progress_bar=false"]

# Every write of a 2-member bagging run, in the order it happens (REGBENCH_FAULT=<point>:<epoch> SIGKILLs there).
FAULTS = [
    "during_write:summary.json",  # the run's first summary.json: nothing else written yet
    "after_metrics:1",  # member 0's first row
    "during_write:metrics.csv",  # the ensemble's first row, half written
    "after_metrics:2", "after_summary:2",  # inside member 0's record of epoch 2
    "after_member_record_0:2", "after_member_record_1:2",  # both members' rows, no ensemble row yet
    "after_ensemble_row:2",  # the ensemble row, no checkpoint of epoch 2 yet
    "during_write:epoch_0002.pt", "after_checkpoint:2",  # member 0's checkpoint (half / whole), not member 1's
    "after_member_checkpoint_1:2",  # every checkpoint of epoch 2, not pruned yet
    "after_ensemble_row:3", "after_member_checkpoint_1:3",  # the last epoch
    "before_marker:3", "during_write:COMPLETED",  # member 0 completed, no marker / half a marker
    "after_member_complete_0:3", "after_member_complete_1:3",  # members completed, the ensemble's end not yet
    "during_write:ensemble.pt", "after_ensemble_weights:3",
    "before_ensemble_marker:3",  # the run's summary.json says completed, its COMPLETED marker is not written
]


def cli(*args, env=None):
    return subprocess.run([sys.executable, "-m", "regbench", *args], capture_output=True, text=True, timeout=300,
                          env={**os.environ, "PYTHONUNBUFFERED": "1", **(env or {})})


def rows(path: Path) -> list[dict]:
    with open(path, newline="") as f:
        return [{k: v for k, v in r.items() if k != "epoch_time_s"} for r in csv.DictReader(f)]


def without_time(row):
    return {k: v for k, v in (row or {}).items() if k != "epoch_time_s"}


def results(run: Path) -> dict:
    """What a bagging run computed: its rows and summary numbers, its members', the ensemble's weights."""
    s = json.loads((run / "summary.json").read_text())
    members = [json.loads((run / "members" / str(j) / "summary.json").read_text()) for j in range(2)]
    weights = torch.load(run / "checkpoints" / "ensemble.pt", weights_only=True)
    return {"rows": rows(run / "metrics.csv"), "status": s["status"], "epochs": s["epochs_completed"],
            "test": s["test"], "test_extra": s["test_extra"], "best": without_time(s["best"]),
            "final": without_time(s["final"]), "seeds": s["bagging"]["seeds"],
            "unique": s["bagging"]["unique_fraction"],
            "members": [(rows(run / "members" / str(j) / "metrics.csv"), m["status"], m["test"],
                         without_time(m["best"])) for j, m in enumerate(members)],
            "weights": [{k: v.tolist() for k, v in m.items()} for m in weights["members"]]}


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    run = tmp_path_factory.mktemp("ref") / "run"
    done = cli(*RUN, f"hydra.run.dir={run}")
    assert done.returncode == 0, done.stderr[-2000:]
    return run


@pytest.mark.slow
@pytest.mark.parametrize("fault", FAULTS)
def test_a_bagging_run_killed_at_any_write_then_resumed_equals_the_run_never_killed(fault, reference, tmp_path):
    run = tmp_path / "run"
    killed = cli(*RUN, f"hydra.run.dir={run}", env={"REGBENCH_FAULT": fault})
    assert killed.returncode == -signal.SIGKILL, killed.stderr[-2000:]
    if fault.startswith("before_ensemble_marker"):  # completed, as a single run killed before its marker
        assert json.loads((run / "summary.json").read_text())["status"] == "completed"
        assert not (run / "COMPLETED").exists()
    else:  # resumed in this process (as `regbench resume <run>`; the kill above needs a process of its own)
        from regbench.cli import main

        main(["resume", str(run)])
        assert (run / "COMPLETED").is_file()
    ours, theirs = results(run), results(reference)
    for key in theirs:
        assert ours[key] == theirs[key], key
    assert [int(r["epoch"]) for r in ours["rows"]] == [1, 2, 3]
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(run / "tb"))
    acc.Reload()
    assert [e.step for e in acc.Scalars("ensemble/val_loss")] == [1, 2, 3]  # every epoch once, none redone twice


def test_a_resume_refuses_a_bagging_run_that_lost_an_ensemble_row(tmp_path):
    """A run killed by an earlier regbench between its checkpoints and its ensemble row lacks that row for good:
    the resume says so in one line before training, instead of completing without it."""
    run = tmp_path / "run"
    cfg = compose_cfg(*RUN[:-2], "trainer.max_epochs=2", "trainer.progress_bar=false")
    fit(cfg, run)
    lines = (run / "metrics.csv").read_text().splitlines(keepends=True)
    (run / "metrics.csv").write_text(lines[0] + lines[2])  # epoch 1's row lost
    s = json.loads((run / "summary.json").read_text())
    (run / "summary.json").write_text(json.dumps({**s, "status": "interrupted"}))
    (run / "COMPLETED").unlink()
    with pytest.raises(RegbenchError, match=r"metrics.csv lacks the ensemble rows of epochs 1 \(they cannot be"):
        fit(compose_cfg(*RUN[:-2], "trainer.max_epochs=2", "trainer.progress_bar=false", "trainer.resume=true"),
            run)


@pytest.mark.parametrize("link", ["members", "members/1"])
def test_nothing_is_written_through_a_symlinked_members_folder(tmp_path, link):
    outside = tmp_path / "outside"
    outside.mkdir()
    run = tmp_path / "run"
    (run / link).parent.mkdir(parents=True, exist_ok=True)
    (run / link).symlink_to(outside, target_is_directory=True)
    with pytest.raises(RegbenchError, match="is a symbolic link; regbench never writes through links"):
        fit(compose_cfg(*RUN), run)
    assert list(outside.iterdir()) == []
    assert not (run / "summary.json").exists()  # refused before anything was written


@pytest.mark.slow
def test_a_member_is_resumed_and_rerun_with_its_bagging_run(reference, tmp_path, capsys):
    """members/<j> has no .hydra/ of its own: `regbench resume` / `rerun` of it is one line naming the fix; a rerun
    of the bagging run reproduces every member."""
    import shutil

    copy = tmp_path / "copy"
    shutil.copytree(reference, copy)
    member = copy / "members" / "0"
    s = json.loads((member / "summary.json").read_text())
    (member / "summary.json").write_text(json.dumps({**s, "status": "interrupted"}))
    for command in ("resume", "rerun"):
        msg = one_line_error(capsys, command, str(member))
        assert "no .hydra/config.yaml" in msg
    again = cli("rerun", str(reference), f"hydra.run.dir={tmp_path}/again")
    assert again.returncode == 0, again.stderr[-2000:]
    assert results(tmp_path / "again") == results(reference)


def test_a_bagging_run_prints_the_ensembles_result(tmp_path, caplog):
    import logging

    with caplog.at_level(logging.INFO, logger="regbench"):
        fit(compose_cfg(*RUN[:-2], "trainer.max_epochs=1", "trainer.progress_bar=false"), tmp_path / "run")
    s = json.loads((tmp_path / "run" / "summary.json").read_text())
    t, m = s["test"], s["test_extra"]["members_mean"]
    line = (f"ensemble of 2 members: test loss {t['loss']:.4f} acc {t['acc']:.4f} ece {t['ece']:.4f} (members' mean: "
            f"loss {m['loss']:.4f} acc {m['acc']:.4f} ece {m['ece']:.4f}); best epoch 1 by ensemble_val_loss")
    assert line in caplog.text
    assert "epoch 1/1  ensemble of 2: val loss" in caplog.text


@pytest.mark.parametrize("status", ["preempted", "timed-out"])
def test_a_bagging_run_records_the_status_its_members_record(status, tmp_path, monkeypatch):
    """A bagging run stopped by SLURM's signal says "preempted" / "timed-out" (its requeued job resumes), as its
    members' summary.json do, not "failed" (issue 26)."""
    import regbench.stacked.engine as engine

    def stop(point, epoch, settle=None):
        if point == "after_member_record_1" and epoch == 2:
            e = SystemExit(0)
            e.regbench_status = status  # what regbench.sweep's watch of submitit's requeue handler sets
            raise e

    monkeypatch.setattr(engine, "fault_point", stop)
    with pytest.raises(SystemExit):
        fit(compose_cfg(*RUN), tmp_path)
    assert json.loads((tmp_path / "summary.json").read_text())["status"] == status
    for j in (0, 1):
        assert json.loads((tmp_path / "members" / str(j) / "summary.json").read_text())["status"] == status
