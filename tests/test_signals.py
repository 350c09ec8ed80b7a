"""Ctrl-C and SIGTERM (issue 25): one line saying where the run stopped and how to continue it, no traceback;
summary.json says "interrupted" (SIGTERM left it "running" forever); `regbench resume` continues the run."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from types import SimpleNamespace

import pytest

from regbench import cli
from tests.conftest import REPO, TINY


def _start(run: Path, *extra: str) -> subprocess.Popen:
    """`regbench` in a subprocess that pauses 60 s after epoch 1 (REGBENCH_PAUSE), so a signal lands there."""
    env = dict(os.environ, REGBENCH_PAUSE="1:60")
    return subprocess.Popen([sys.executable, "-m", "regbench", *TINY, "trainer.max_epochs=2", f"hydra.run.dir={run}",
                             *extra], env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=REPO)


def _after_epoch_one(p: subprocess.Popen, run: Path) -> None:
    deadline = time.time() + 300
    while time.time() < deadline and p.poll() is None:
        try:
            if json.loads((run / "summary.json").read_text())["epochs_completed"] == 1:
                time.sleep(0.5)  # inside the pause
                return
        except (OSError, ValueError, KeyError):
            pass
        time.sleep(0.1)
    pytest.fail(f"the run did not reach its pause after epoch 1: {p.communicate()[1][-2000:]}")


@pytest.mark.slow
@pytest.mark.parametrize("sig,code,what,reason", [
    (signal.SIGINT, 130, "interrupted", "interrupted by Ctrl-C (SIGINT)"),
    (signal.SIGTERM, 143, "terminated (SIGTERM)", "terminated by SIGTERM"),
], ids=["ctrl-c", "sigterm"])
def test_a_signal_ends_the_run_with_one_line_and_resume_continues_it(sig, code, what, reason, tmp_path):
    run = tmp_path / "r"
    p = _start(run)
    _after_epoch_one(p, run)
    p.send_signal(sig)
    _, err = p.communicate(timeout=120)
    assert p.returncode == code
    assert err == f"regbench: {what} after epoch 1; continue with: regbench resume {run}\n"
    summary = json.loads((run / "summary.json").read_text())
    assert (summary["status"], summary["error"], summary["epochs_completed"]) == ("interrupted", reason, 1)
    # no stale lock: the resume may take the folder
    done = subprocess.run([sys.executable, "-m", "regbench", "resume", str(run)], capture_output=True, text=True,
                          cwd=REPO, timeout=600)
    assert done.returncode == 0, done.stderr[-2000:]
    summary = json.loads((run / "summary.json").read_text())
    assert (summary["status"], summary["epochs_completed"]) == ("completed", 2)


def test_the_line_for_a_run_that_never_started(tmp_path):
    assert cli._interrupted(KeyboardInterrupt(), None) == "interrupted; nothing was started"
    claim = SimpleNamespace(folder=tmp_path / "gone", kind="run")
    assert cli._interrupted(cli.Terminated(), claim) == "terminated (SIGTERM) before training started; nothing was kept"


def test_the_line_for_a_sweep_names_its_folder(tmp_path):
    claim = SimpleNamespace(folder=tmp_path / "my sweep", kind="sweep")
    assert cli._interrupted(KeyboardInterrupt(), claim) == (
        f"interrupted; continue with the same command and hydra.sweep.dir='{tmp_path}/my sweep' (completed jobs are "
        "skipped, unfinished ones resume from their checkpoints)")


def test_the_line_for_a_run_in_its_first_epoch(tmp_path):
    (tmp_path / "summary.json").write_text(json.dumps({"epochs_completed": 0}))
    claim = SimpleNamespace(folder=tmp_path, kind="run")
    assert cli._interrupted(KeyboardInterrupt(), claim) == (
        f"interrupted in its first epoch; continue with: regbench resume {tmp_path}")


def test_sigterm_is_handled_only_where_nobody_else_does_and_restored():
    before = signal.getsignal(signal.SIGTERM)
    signal.signal(signal.SIGTERM, signal.SIG_DFL)
    try:
        previous = cli._handle_sigterm()
        assert previous is signal.SIG_DFL and signal.getsignal(signal.SIGTERM) is not signal.SIG_DFL
        with pytest.raises(cli.Terminated):
            os.kill(os.getpid(), signal.SIGTERM)
            time.sleep(1)
        assert signal.getsignal(signal.SIGTERM) is signal.SIG_IGN  # a second one waits for the records
        signal.signal(signal.SIGTERM, lambda *a: None)  # e.g. submitit's handler in a SLURM job
        assert cli._handle_sigterm() is None
    finally:
        signal.signal(signal.SIGTERM, before)


@pytest.mark.slow
def test_ctrl_c_pressed_three_times_is_still_one_line(tmp_path):
    """Impatient Ctrl-C: the second and third arrive while the first one's records are written (or at exit); they
    are ignored, not a traceback from an atexit callback."""
    run = tmp_path / "r"
    p = _start(run)
    _after_epoch_one(p, run)
    for _ in range(3):
        p.send_signal(signal.SIGINT)
        time.sleep(0.01)
    _, err = p.communicate(timeout=120)
    assert p.returncode == 130
    assert err == f"regbench: interrupted after epoch 1; continue with: regbench resume {run}\n"
    assert json.loads((run / "summary.json").read_text())["status"] == "interrupted"
