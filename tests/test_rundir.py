"""One folder belongs to one run: unique default names, locks, refused commands that write nothing, atomic
completion, and a run log that is never written through a link. (The one-line refusals themselves are rows
of docs/errors.md, tested in test_errors.py.)"""

from __future__ import annotations

import json
import logging
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from regbench.cli import check, claim_folder, main
from regbench.errors import RegbenchError
from regbench.logs import RunLogHandler, read_metrics
from regbench.rundir import LOCK, lock
from regbench.state import checkpoint_rows
from regbench.sweep import MARKER, job_plan
from regbench.train import fit
from tests.conftest import TINY, compose_cfg
from tests.test_errors import run_cli


def snapshot(folder: Path) -> dict:
    """Every file below ``folder`` with its bytes (links as their target), to compare "nothing was written"."""
    return {str(p.relative_to(folder)): (os.readlink(p) if p.is_symlink() else p.read_bytes() if p.is_file() else None)
            for p in sorted(folder.rglob("*"))}


def test_default_names_never_collide(tmp_path, monkeypatch):
    """Two runs whose time-stamped default name is the same (same second) get two folders."""
    monkeypatch.chdir(tmp_path)
    cfg = check(TINY)[0]  # ${now:...} resolves once per config: both claims see the same second
    first, handed1 = claim_folder(cfg, multirun=False)
    second, handed2 = claim_folder(cfg, multirun=False)
    try:
        assert second.folder == first.folder.with_name(first.folder.name + "_2")
        assert first.folder.is_dir() and second.folder.is_dir()
        assert handed1 == [f"hydra.run.dir='{first.folder}'"] and handed2 == [f"hydra.run.dir='{second.folder}'"]
    finally:
        first.finish(ok=True)
        second.finish(ok=True)
    assert not (first.folder / ".regbench.lock").exists()


def test_a_run_that_fails_before_training_leaves_nothing(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    msg = run_cli(capsys, *TINY, "trainer.device=cpu", "trainer.amp=fp16")  # found in fit, after Hydra started
    assert "expected bf16 or none on CPU" in msg
    assert list(tmp_path.iterdir()) == []  # not even outputs/runs/<date>/


def test_refused_resume_writes_nothing_and_the_plain_resume_still_works(tmp_path, capsys):
    run = tmp_path / "run"
    main([*TINY, "trainer.max_epochs=2", f"hydra.run.dir={run}"])
    summary = json.loads((run / "summary.json").read_text())
    summary["status"] = "interrupted"  # as if killed after its last checkpoint
    (run / "summary.json").write_text(json.dumps(summary))
    (run / MARKER).unlink()
    before = snapshot(run)
    msg = run_cli(capsys, "resume", str(run), "model.hidden=[16]")
    assert "its checkpoint was written with another config; keys that differ: model.hidden" in msg
    assert snapshot(run) == before  # not even .hydra/ (the record `resume` and `rerun` read) was rewritten
    main(["resume", str(run)])
    assert json.loads((run / "summary.json").read_text())["status"] == "completed"
    assert (run / ".hydra" / "config.yaml").read_bytes() == before[".hydra/config.yaml"]  # the record stays


@pytest.mark.slow
def test_three_runs_into_one_folder_only_one_succeeds(tmp_path):
    run = tmp_path / "run"
    procs = [subprocess.Popen([sys.executable, "-m", "regbench", *TINY, f"seed={seed}", f"hydra.run.dir={run}"],
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for seed in range(3)]
    results = [(p.wait(timeout=300), p.stderr.read()) for p in procs]
    winners = [seed for seed, (code, _) in enumerate(results) if code == 0]
    assert len(winners) == 1, results
    for code, err in (r for seed, r in enumerate(results) if seed not in winners):
        assert code == 2 and err.count("\n") == 1
        assert "is in use by a live run (pid" in err or "already holds the results of a completed run" in err
    assert json.loads((run / "summary.json").read_text())["seed"] == winners[0]
    assert f"seed: {winners[0]}\n" in (run / ".hydra" / "config.yaml").read_text()


def test_resume_restores_metrics_rows_that_were_lost(tmp_path):
    small = [*TINY, "trainer.max_epochs=3"]
    fit(compose_cfg(*small), tmp_path / "ref")
    run = tmp_path / "run"
    fit(compose_cfg(*small), run)
    summary = json.loads((run / "summary.json").read_text())
    summary["status"] = "interrupted"
    (run / "summary.json").write_text(json.dumps(summary))
    (run / "checkpoints" / "epoch_0003.pt").unlink()  # killed before epoch 3's checkpoint
    metrics = run / "metrics.csv"
    written = metrics.read_bytes()
    metrics.write_text(written.decode().splitlines()[0] + "\r\n")  # and metrics.csv lost its rows
    fit(compose_cfg(*small, "trainer.resume=true"), run)
    rows_1_2 = b"".join(written.splitlines(keepends=True)[:3])
    assert metrics.read_bytes().startswith(rows_1_2)  # back byte for byte, from the checkpoint's record
    strip = lambda rows: [{k: v for k, v in r.items() if k != "epoch_time_s"} for r in rows]  # noqa: E731
    assert strip(read_metrics(metrics)) == strip(read_metrics(tmp_path / "ref" / "metrics.csv"))
    history = torch.load(run / "checkpoints" / "last.pt", weights_only=True)["history"]
    assert checkpoint_rows(history) == read_metrics(metrics)


def test_a_sweep_job_killed_between_its_summary_and_marker_is_finished(tmp_path):
    job = tmp_path / "job"
    fit(compose_cfg(*TINY), job)
    marker = json.loads((job / MARKER).read_text())
    (job / MARKER).unlink()  # killed after summary.json said "completed", before the marker
    action, reason = job_plan(job)
    assert action == "skip" and "completed earlier" in reason
    assert json.loads((job / MARKER).read_text()) == marker


@pytest.mark.slow
def test_a_sweep_killed_before_a_marker_finishes_when_run_again(tmp_path):
    args = [sys.executable, "-m", "regbench", "-m", "regularizer=[],[l2]", *TINY, f"hydra.sweep.dir={tmp_path}/s"]
    env = {**os.environ, "REGBENCH_FAULT": "before_marker:1"}
    killed = subprocess.run(args, capture_output=True, text=True, timeout=300, env=env)
    assert killed.returncode == -signal.SIGKILL
    again = subprocess.run(args, capture_output=True, text=True, timeout=300)
    assert again.returncode == 0, again.stderr
    status = {j["run"]: j["outcome"] for j in json.loads((tmp_path / "s" / "sweep_status.json").read_text())}
    assert sorted(status.values()) == ["ok", "skipped"]
    assert all((tmp_path / "s" / run / MARKER).is_file() for run in status)


def test_the_run_log_is_never_written_through_a_link(tmp_path, capsys):
    outside = tmp_path / "outside.txt"
    outside.write_text("not regbench's\n")
    log = tmp_path / "regbench.log"
    log.symlink_to(outside)
    handler = RunLogHandler(str(log))
    handler.emit(logging.LogRecord("regbench", logging.INFO, __file__, 1, "epoch 1/1", None, None))
    handler.close()
    assert outside.read_text() == "not regbench's\n"
    assert not log.is_symlink() and log.read_text() == "epoch 1/1\n"
    assert "was a symbolic link; replaced it with a regular file" in capsys.readouterr().err


@pytest.mark.parametrize("job_here,taken", [(None, False), ("17", False), ("42", True)])
def test_a_lock_from_another_host_is_taken_over_only_by_the_same_slurm_job(job_here, taken, tmp_path,
                                                                            monkeypatch):
    """flock may not reach across hosts on a shared file system: another host's lock file is refused unless it
    names this SLURM job (a job requeued onto another node continues its own run)."""
    stale = {"kind": "run", "pid": 4242, "host": "node-a", "slurm_job": "42", "since": "2026-11-28T10:00:00+00:00"}
    (tmp_path / LOCK).write_text(json.dumps(stale))
    if job_here is None:
        monkeypatch.delenv("SLURM_JOB_ID", raising=False)
    else:
        monkeypatch.setenv("SLURM_JOB_ID", job_here)
    if taken:
        held = lock(tmp_path)
        assert json.loads((tmp_path / LOCK).read_text())["pid"] == os.getpid()
        held.release()
        assert not (tmp_path / LOCK).exists()
    else:
        with pytest.raises(RegbenchError, match=r"in use by a live run \(pid 4242 on host node-a, since "):
            lock(tmp_path)
        assert json.loads((tmp_path / LOCK).read_text()) == stale  # left as it was


def test_a_lock_is_reentrant_within_one_process(tmp_path):
    held = lock(tmp_path)
    assert lock(tmp_path) is None  # the command line claimed it; fit, in the same process, finds it held
    held.release()
    assert lock(tmp_path) is not None
