"""regbench.io.BackgroundWriter: an epoch's checkpoint and summary.json are written while the next epoch trains,
in submission order, with a write's error raised to the run."""

from __future__ import annotations

import io
import json
import threading
import time
import zipfile

import pytest
import torch

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


def _torch_save_bytes(obj) -> bytes:
    buf = io.BytesIO()
    torch.save(obj, buf)
    return buf.getvalue()


def test_a_checkpoint_encoded_without_crcs_is_written_byte_for_byte_as_torch_save_writes_it(tmp_path):
    from torch.utils.serialization import config

    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(30, 20), torch.nn.ReLU(), torch.nn.Linear(20, 4))
    opt = torch.optim.Adam(model.parameters())
    model(torch.randn(8, 30)).sum().backward()
    opt.step()
    state = {"model": model.state_dict(), "optimizer": opt.state_dict(), "epoch": 3, "history": [{"a": 1.5}],
             "rng": {"torch": torch.get_rng_state()}, "empty": torch.zeros(0)}
    encoded = checkpoint.encode_checkpoint(state)
    assert config.save.compute_crc32  # torch's own setting is back
    assert encoded != _torch_save_bytes(state)  # the CRC fields are still zero ...
    filled = checkpoint.fill_zip_crc(encoded)
    assert filled == _torch_save_bytes(state)  # ... and filled: torch.save's bytes, serialization id included
    assert checkpoint.fill_zip_crc(filled) == filled
    checkpoint.save_checkpoint(tmp_path / "c.pt", encoded)
    assert (tmp_path / "c.pt").read_bytes() == filled
    with zipfile.ZipFile(tmp_path / "c.pt") as z:
        assert z.testzip() is None  # every CRC-32 checks out
    loaded = checkpoint.load_checkpoint(tmp_path / "c.pt")
    assert torch.equal(loaded["model"]["0.weight"], state["model"]["0.weight"]) and loaded["history"] == [{"a": 1.5}]


def test_an_encoding_error_leaves_torchs_crc_setting_alone():
    from torch.utils.serialization import config

    with pytest.raises(Exception):
        checkpoint.encode_checkpoint({"f": lambda: None})  # not picklable
    assert config.save.compute_crc32
