"""Reproducibility and crash safety: bitwise reruns, SIGKILL at any point then resume, safe checkpoint loading."""

from __future__ import annotations

import json
import os
import pickle
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from regbench.errors import RegbenchError
from regbench.checkpoint import load_checkpoint
from regbench.io import LogWriteError
from regbench.logs import read_metrics
from regbench.train import fit
from tests.conftest import compose_cfg

# A run that exercises every piece of state a resume must restore: Adam moments, a cosine schedule,
# dropout (torch RNG), early-stopping and snapshot-ensemble state, the data order generator.
RUN = ["data.train_size=256", "data.batch_size=32", "data.test_size=200", "trainer.max_epochs=5",
       "trainer.progress_bar=false", "model.hidden=[64]", "scheduler=cosine",
       "regularizer=[dropout,l2,early_stopping,ensemble]", "regularizer.early_stopping.patience=50",
       "regularizer.ensemble.k=2", "trainer.keep_last=2", "augmentation=digits"]


def cli(args, env=None, check=True):
    proc = subprocess.run([sys.executable, "-m", "regbench", *args], capture_output=True, text=True, timeout=300,
                          env={**os.environ, "PYTHONUNBUFFERED": "1", **(env or {})})
    if check and proc.returncode != 0:
        raise AssertionError(f"exit {proc.returncode}\n{proc.stdout}\n{proc.stderr}")
    return proc


def metrics_without_time(run_dir: Path):
    return [{k: v for k, v in r.items() if k != "epoch_time_s"} for r in read_metrics(run_dir / "metrics.csv")]


def final_state(run_dir: Path):
    summary = json.loads((run_dir / "summary.json").read_text())
    weights = load_checkpoint(run_dir / "checkpoints" / "last.pt")["model"]
    return summary, weights


def assert_same_run(a: Path, b: Path):
    assert metrics_without_time(a) == metrics_without_time(b)
    sa, wa = final_state(a)
    sb, wb = final_state(b)
    assert sa["status"] == sb["status"] == "completed"
    assert sa["test"] == sb["test"] and sa["test_extra"] == sb["test_extra"]
    drop = lambda row: {k: v for k, v in row.items() if k != "epoch_time_s"}  # noqa: E731
    assert drop(sa["best"]) == drop(sb["best"]) and drop(sa["final"]) == drop(sb["final"])
    assert wa.keys() == wb.keys() and all(torch.equal(wa[k], wb[k]) for k in wa)


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    run_dir = tmp_path_factory.mktemp("ref") / "run"
    cli([*RUN, f"hydra.run.dir={run_dir}"])
    return run_dir


def test_same_config_and_seed_rerun_bitwise_from_the_run_folder(reference, tmp_path):
    cli(["rerun", str(reference), f"hydra.run.dir={tmp_path}/again"])
    assert_same_run(reference, tmp_path / "again")
    summary = json.loads((reference / "summary.json").read_text())
    assert summary["versions"]["torch"] == torch.__version__ and summary["device"] == "cpu"
    assert set(summary["git"]) == {"commit", "dirty"}
    assert (reference / ".hydra" / "overrides.yaml").read_text().count("regularizer=") == 1


def resume_here(run_dir) -> None:
    """`regbench resume <run_dir>`, in this process (the kill before it needs a process of its own; the resume is the
    same command line, without a second interpreter and torch import per case)."""
    from regbench.cli import main

    main(["resume", str(run_dir)])
    assert (run_dir / "COMPLETED").is_file()


@pytest.mark.slow
@pytest.mark.parametrize("fault", ["after_summary:1", "after_metrics:2", "after_checkpoint:3",
                                   "during_write:epoch_0002.pt", "during_write:summary.json",
                                   "during_write:metrics.csv", "after_metrics:5"])
def test_sigkill_at_a_fault_point_then_resume_is_bitwise_identical(fault, reference, tmp_path):
    run_dir = tmp_path / "run"
    killed = cli([*RUN, f"hydra.run.dir={run_dir}"], env={"REGBENCH_FAULT": fault}, check=False)
    assert killed.returncode == -signal.SIGKILL, killed.stderr
    summary = run_dir / "summary.json"  # the first write of summary.json may be the one that was killed
    assert not summary.exists() or json.loads(summary.read_text())["status"] == "running"
    resume_here(run_dir)
    assert_same_run(reference, run_dir)
    assert not list((run_dir / "checkpoints").glob(".*.tmp-*"))  # no torn temp files left behind
    assert sorted(p.name for p in (run_dir / "checkpoints").glob("epoch_*.pt")) == ["epoch_0004.pt", "epoch_0005.pt"]


@pytest.mark.slow
@pytest.mark.parametrize("after_rows", [1, 3])
def test_external_sigkill_mid_epoch_then_resume(after_rows, reference, tmp_path):
    run_dir = tmp_path / "run"
    proc = subprocess.Popen([sys.executable, "-m", "regbench", *RUN, f"hydra.run.dir={run_dir}"],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 120
    while time.time() < deadline and proc.poll() is None:
        if len(read_metrics(run_dir / "metrics.csv")) >= after_rows:
            break
        time.sleep(0.005)
    proc.send_signal(signal.SIGKILL)
    assert proc.wait() == -signal.SIGKILL
    resume_here(run_dir)
    assert_same_run(reference, run_dir)


@pytest.mark.parametrize("fault", ["after_metrics:3", "after_checkpoint:3", "after_summary:3"])
def test_tensorboard_has_every_step_once_after_resume(tmp_path, fault):
    """Killed before epoch 3's checkpoint (its events are redone) or after it (its events were flushed before the
    checkpoint was written: a resume from it never lacks them)."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    run_dir = tmp_path / "run"
    killed = cli([*RUN, f"hydra.run.dir={run_dir}"], env={"REGBENCH_FAULT": fault}, check=False)
    assert killed.returncode == -signal.SIGKILL
    resume_here(run_dir)
    acc = EventAccumulator(str(run_dir / "tb"))
    acc.Reload()
    steps = [e.step for e in acc.Scalars("loss/val")]
    assert steps == [1, 2, 3, 4, 5]
    rows = read_metrics(run_dir / "metrics.csv")
    assert [e.value for e in acc.Scalars("loss/val")] == pytest.approx([r["val_loss"] for r in rows])


# ------------------------------------------------------------------------------- in-process faults

SMALL = ["data.train_size=128", "data.batch_size=32", "data.test_size=100", "trainer.max_epochs=3",
         "trainer.progress_bar=false", "model.hidden=[32]"]


def _mark_unfinished(run_dir: Path, status="interrupted"):
    summary = json.loads((run_dir / "summary.json").read_text())
    summary["status"] = status
    (run_dir / "summary.json").write_text(json.dumps(summary))


def test_a_corrupt_newest_checkpoint_falls_back_to_the_previous_one(tmp_path, caplog):
    fit(compose_cfg(*SMALL), tmp_path / "ref")
    run = tmp_path / "run"
    fit(compose_cfg(*SMALL), run)
    _mark_unfinished(run)
    newest = run / "checkpoints" / "epoch_0003.pt"
    newest.write_bytes(newest.read_bytes()[:1000])  # truncated (a disk problem, not a torn write)
    with caplog.at_level("WARNING"):
        fit(compose_cfg(*SMALL, "trainer.resume=true"), run)
    assert any("epoch_0003.pt" in r.getMessage() and "falling back" in r.getMessage() for r in caplog.records)
    summary = json.loads((run / "summary.json").read_text())
    assert summary["resumed_from_epoch"] == 2 and any("falling back" in w for w in summary["warnings"])
    assert metrics_without_time(run) == metrics_without_time(tmp_path / "ref")


def test_resume_refuses_a_checkpoint_of_another_config(tmp_path):
    fit(compose_cfg(*SMALL), tmp_path)
    _mark_unfinished(tmp_path)
    with pytest.raises(RegbenchError) as e:
        fit(compose_cfg(*SMALL, "model.hidden=[16]", "optimizer.lr=0.01", "trainer.resume=true"), tmp_path)
    msg = str(e.value)
    assert msg.startswith(f"cannot resume {tmp_path}: its checkpoint was written with another config; keys that differ:")
    assert "model.hidden ([32] in the checkpoint, [16] now)" in msg and "optimizer.lr (0.001 in the checkpoint" in msg


def test_unfinished_run_needs_an_explicit_resume(tmp_path):
    fit(compose_cfg(*SMALL), tmp_path)
    _mark_unfinished(tmp_path, "failed")
    with pytest.raises(RegbenchError, match=r"unfinished run \(status failed\).*trainer.resume=true"):
        fit(compose_cfg(*SMALL), tmp_path)


def test_divergence_keeps_the_last_good_checkpoint(tmp_path, monkeypatch):
    import regbench.run as train

    real = train.train_one_epoch
    calls = {"n": 0}

    def diverging(*args, **kwargs):
        out = real(*args, **kwargs)
        calls["n"] += 1
        if calls["n"] == 2:
            out["loss"] = out["loss"] * float("nan")
        return out

    monkeypatch.setattr(train, "train_one_epoch", diverging)
    with pytest.raises(RegbenchError, match=r"non-finite training loss \(nan, penalty 0.0\) in epoch 2 \(steps 5-8\)"):
        fit(compose_cfg(*SMALL, "regularizer=[dropout]"), tmp_path)
    summary = json.loads((tmp_path / "summary.json").read_text())
    assert summary["status"] == "failed" and "regularizers [dropout]" in summary["error"]
    assert load_checkpoint(tmp_path / "checkpoints" / "last.pt")["epoch"] == 1
    assert f"its last good checkpoint (epoch 1) is kept in {tmp_path / 'checkpoints'}" in summary["error"]
    assert len(read_metrics(tmp_path / "metrics.csv")) == 1


class Payload:
    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def test_a_malicious_pickle_checkpoint_is_refused_without_running_it(tmp_path):
    marker = tmp_path / "pwned"
    evil = tmp_path / "evil.pt"
    torch.save({"model": Payload(marker), "epoch": 1}, evil)
    with open(tmp_path / "plain.pkl", "wb") as f:
        pickle.dump(Payload(marker), f)
    for path in (evil, tmp_path / "plain.pkl"):
        with pytest.raises(RegbenchError, match=f"checkpoint {path}: cannot be loaded safely"):
            load_checkpoint(path)
    assert not marker.exists()
    # Through the command line: transfer from it, and resume a run whose newest checkpoint is it.
    proc = cli(["data.train_size=64", "trainer.max_epochs=1", "regularizer=[transfer]",
                f"regularizer.transfer.init_from={evil}", f"hydra.run.dir={tmp_path}/t"], check=False)
    assert proc.returncode == 2 and "cannot be loaded safely" in proc.stderr and not marker.exists()
    fit(compose_cfg(*SMALL), tmp_path / "run")
    _mark_unfinished(tmp_path / "run")
    (tmp_path / "run" / "checkpoints" / "epoch_0003.pt").write_bytes(evil.read_bytes())
    # A checkpoint made to run code is no torn write: the resume is refused (no quiet fall-back past it), in one
    # line naming it, and the run folder is left as it was.
    before = {p: p.read_bytes() for p in (tmp_path / "run").rglob("*") if p.is_file()}
    with pytest.raises(RegbenchError, match="epoch_0003.pt: cannot be loaded safely \\(it references posix.system"
                       ".*refusing to resume a run folder that holds it") as e:
        fit(compose_cfg(*SMALL, "trainer.resume=true"), tmp_path / "run")
    assert "\n" not in str(e.value)
    assert {p: p.read_bytes() for p in (tmp_path / "run").rglob("*") if p.is_file()} == before
    assert not marker.exists()


def test_checkpoints_hold_everything_a_resume_needs(tmp_path):
    fit(compose_cfg(*SMALL, "regularizer=[early_stopping,ensemble]", "regularizer.ensemble.k=2",
                    "trainer.keep_last=1"), tmp_path)
    state = load_checkpoint(tmp_path / "checkpoints" / "last.pt")
    assert {"model", "optimizer", "scheduler", "scaler", "regularizers", "rng", "epoch", "step", "metrics",
            "best_score", "best_row", "config"} <= set(state)
    assert {"python", "numpy", "torch", "order"} <= set(state["rng"])
    assert set(state["regularizers"]) == {"early_stopping", "ensemble"}
    assert len(state["regularizers"]["ensemble"]["snapshots"]) == 2
    assert [p.name for p in (tmp_path / "checkpoints").glob("epoch_*.pt")] == ["epoch_0003.pt"]  # keep_last=1
    assert os.path.samefile(tmp_path / "checkpoints" / "last.pt", tmp_path / "checkpoints" / "epoch_0003.pt")


def test_checkpoint_every_and_no_checkpoints(tmp_path):
    fit(compose_cfg(*SMALL, "trainer.max_epochs=5", "trainer.checkpoint_every=2", "trainer.keep_last=5"), tmp_path / "a")
    assert sorted(p.name for p in (tmp_path / "a" / "checkpoints").glob("epoch_*.pt")) == [
        "epoch_0002.pt", "epoch_0004.pt", "epoch_0005.pt"]  # the last epoch is always saved
    fit(compose_cfg(*SMALL, "trainer.save_checkpoints=false"), tmp_path / "b")
    assert list((tmp_path / "b" / "checkpoints").iterdir()) == []


def test_unwritable_run_folder_is_a_clear_error(tmp_path):
    (tmp_path / "checkpoints").write_text("a file where the folder should be")
    with pytest.raises(LogWriteError, match=f"cannot write in run folder {tmp_path}"):
        fit(compose_cfg(*SMALL), tmp_path)


def test_deterministic_mode_sets_torch_flags(tmp_path):
    try:
        fit(compose_cfg(*SMALL, "trainer.deterministic=true"), tmp_path)
        assert torch.are_deterministic_algorithms_enabled()
        assert os.environ["CUBLAS_WORKSPACE_CONFIG"] == ":4096:8"
        assert json.loads((tmp_path / "summary.json").read_text())["deterministic"] is True
    finally:
        torch.use_deterministic_algorithms(False)


def test_a_checkpoint_of_an_earlier_regbench_resumes_bitwise(tmp_path):
    """Earlier checkpoints held the rows as a list of dicts and Python's RNG state as a list of ints (now one JSON
    text and one tensor): they resume through the same code, to the same run."""
    fit(compose_cfg(*SMALL), tmp_path / "ref")
    run = tmp_path / "run"
    fit(compose_cfg(*SMALL), run)
    _mark_unfinished(run)
    (run / "checkpoints" / "epoch_0003.pt").unlink()
    path = run / "checkpoints" / "epoch_0002.pt"
    state = load_checkpoint(path)
    state["history"] = json.loads(state["history"])
    state["rng"]["python"]["state"] = state["rng"]["python"]["state"].tolist()
    path.unlink()
    torch.save(state, path)
    fit(compose_cfg(*SMALL, "trainer.resume=true"), run)
    assert json.loads((run / "summary.json").read_text())["resumed_from_epoch"] == 2
    assert metrics_without_time(run) == metrics_without_time(tmp_path / "ref")


@pytest.mark.parametrize("history, why", [
    ("[1, 2]", "row 1 of its history does not have metrics.csv's columns"),
    ('[{"epoch": 1}]', "row 1 of its history does not have metrics.csv's columns"),
    ("not json", "Expecting value"),
    (7, "its history is not a list of rows")])
def test_a_checkpoint_with_a_malformed_history_is_refused_in_one_line(tmp_path, history, why):
    run = tmp_path / "run"
    fit(compose_cfg(*SMALL), run)
    _mark_unfinished(run)
    path = run / "checkpoints" / "epoch_0003.pt"
    state = load_checkpoint(path)
    state["history"] = history
    path.unlink()
    torch.save(state, path)
    with pytest.raises(RegbenchError, match=f"cannot resume {run}: its checkpoint of epoch 3 is not one regbench "
                                            f"wrote \\(.*{why}"):
        fit(compose_cfg(*SMALL, "trainer.resume=true"), run)


def test_a_history_of_the_wrong_values_or_epochs_is_refused():
    from regbench.records import METRIC_COLUMNS
    from regbench.state import checkpoint_rows

    row = {c: 1.0 for c in METRIC_COLUMNS} | {"epoch": 1, "step": 2}
    skipped = row | {"epoch": 2, "val_loss": None, "gap_loss": None}  # an epoch trainer.eval_every skipped
    assert checkpoint_rows(json.dumps([row, skipped]), 2) == [row, skipped]
    for bad, why in [([row | {"lr": "os.system"}], r"row 1 of its history holds a non-number \(lr\)"),
                     ([row | {"epoch": 1.5}], r"holds a non-number \(epoch\)"),
                     ([row | {"train_loss": True}], r"holds a non-number \(train_loss\)"),
                     ([row | {"weight_l2": None}], r"holds a non-number \(weight_l2\)"),  # only evaluations may be empty
                     ([row, row], "row 2 of its history is of epoch 1"),
                     ([skipped], "row 1 of its history is of epoch 2")]:
        with pytest.raises(ValueError, match=why):
            checkpoint_rows(json.dumps(bad))
    with pytest.raises(ValueError, match="its history holds 2 rows for epoch 1"):
        checkpoint_rows(json.dumps([row, skipped]), 1)


def test_a_checkpoint_with_a_damaged_rng_state_is_refused_in_one_line(tmp_path):
    run = tmp_path / "run"
    fit(compose_cfg(*SMALL), run)
    _mark_unfinished(run)
    path = run / "checkpoints" / "epoch_0003.pt"
    state = load_checkpoint(path)
    state["rng"]["python"]["state"] = torch.zeros(3, dtype=torch.int64)
    path.unlink()
    torch.save(state, path)
    with pytest.raises(RegbenchError, match=f"cannot resume {run}: its checkpoint of epoch 3 is not one regbench "
                                            "wrote \\(.*\\); fix: delete that checkpoint"):
        fit(compose_cfg(*SMALL, "trainer.resume=true"), run)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_a_cuda_run_resumes(tmp_path):
    """A checkpoint is loaded onto the run's device; the generators' states go back to the CPU to be restored."""
    cuda = [*SMALL, "trainer.device=cuda"]
    fit(compose_cfg(*cuda), tmp_path / "ref")
    run = tmp_path / "run"
    fit(compose_cfg(*cuda), run)
    _mark_unfinished(run)
    (run / "checkpoints" / "epoch_0003.pt").unlink()
    fit(compose_cfg(*cuda, "trainer.resume=true"), run)
    assert json.loads((run / "summary.json").read_text())["resumed_from_epoch"] == 2
    assert [r["train_loss"] for r in read_metrics(run / "metrics.csv")] == pytest.approx(
        [r["train_loss"] for r in read_metrics(tmp_path / "ref" / "metrics.csv")], rel=1e-5)
