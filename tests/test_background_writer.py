"""regbench.io.BackgroundWriter: an epoch's checkpoint and summary.json are written while the next epoch trains,
in submission order, with a write's error raised to the run."""

from __future__ import annotations

import json
import threading
import time

import pytest

from regbench import checkpoint
from regbench.io import BackgroundWriter, LogWriteError
from regbench.train import fit
from tests.conftest import TINY, compose_cfg


def test_jobs_run_in_order_off_the_calling_thread_and_wait_joins_them():
    done, threads = [], []

    def job(name, delay=0.0):
        def run():
            time.sleep(delay)
            threads.append(threading.current_thread().name)
            done.append(name)
        return run

    w = BackgroundWriter()
    w.submit(job("a", 0.05))
    w.submit(job("b"))  # waits for "a" first: at most one job pending
    assert done == ["a"]
    w.wait()
    assert done == ["a", "b"] and all(t.startswith("regbench-writer") for t in threads)
    w.close()


def test_a_failed_write_is_raised_by_the_next_call_once():
    w = BackgroundWriter()

    def fail():
        raise LogWriteError("cannot write x: No space left on device; fix: free disk space")

    w.submit(fail)
    with pytest.raises(LogWriteError, match="No space left"):
        w.wait()
    w.wait()  # reported once
    w.submit(fail)
    with pytest.raises(LogWriteError):
        w.submit(lambda: None)
    w.close()


def test_a_run_ends_with_every_epochs_files_on_disk(tmp_path):
    fit(compose_cfg(*TINY, "trainer.max_epochs=3", "trainer.keep_last=2"), tmp_path)
    summary = json.loads((tmp_path / "summary.json").read_text())
    assert summary["status"] == "completed" and summary["epochs_completed"] == 3
    assert sorted(p.name for p in (tmp_path / "checkpoints").iterdir()) == \
        ["best.pt", "epoch_0002.pt", "epoch_0003.pt", "last.pt"]


def test_a_background_write_error_stops_the_run_with_its_one_line(tmp_path, monkeypatch):
    real = checkpoint.write_bytes
    calls = []

    def full_disk(path, data):
        calls.append(path.name)
        if len(calls) == 2:  # epoch 2's summary.json
            raise LogWriteError(f"cannot write {path}: No space left on device; fix: free disk space")
        real(path, data)

    monkeypatch.setattr(checkpoint, "write_bytes", full_disk)
    with pytest.raises(LogWriteError, match="No space left on device"):
        fit(compose_cfg(*TINY, "trainer.max_epochs=4"), tmp_path)
    summary = json.loads((tmp_path / "summary.json").read_text())
    assert summary["status"] == "failed" and summary["epochs_completed"] == 2  # written by fail(), after the job
    assert "No space left" in summary["error"]


def test_an_interrupted_wait_leaves_the_job_pending_until_it_is_done():
    gate = threading.Event()
    w = BackgroundWriter()
    w.submit(gate.wait)
    original = w._pending.result

    def interrupted(*a, **k):
        raise KeyboardInterrupt  # as a signal would, while the job still runs

    w._pending.result = interrupted
    with pytest.raises(KeyboardInterrupt):
        w.wait()
    assert w._pending is not None and not w._pending.done()
    w._pending.result = original
    gate.set()
    w.close()
    assert w._pending is None
