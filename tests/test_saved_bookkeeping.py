"""Keys that may differ on a resume (issue 25, item 8): every bookkeeping key the README lists ("Sweeps and the
report": data.root, data.download, trainer.num_threads, trainer.progress_bar, trainer.device, trainer.resume)
added to `regbench resume <run>` and to the re-run of an interrupted sweep: the interrupted job resumes and
completes, its saved .hydra/ record is not rewritten (byte for byte), and `regbench resume <job>` (or the
re-run) works afterwards."""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import pytest

from regbench.cli import main
from regbench.rundir import BOOKKEEPING, RESUME_MAY_DIFFER
from regbench.sweep_names import NOT_DEFINING
from tests.conftest import REPO, make_mnist_like

# data=mnist (a torchvision dataset, written in its on-disk format) has data.root and data.download
RUN = ["data=mnist", "data.download=false", "data.train_size=64", "data.batch_size=32", "data.val_fraction=0.05",
       "data.test_size=50", "trainer.max_epochs=2", "trainer.progress_bar=false"]
# a value other than the run's for each key (data.root: another copy of the same files)
NEW_VALUE = {"data.root": "{tmp}/data2", "data.download": "true", "trainer.num_threads": "1",
             "trainer.progress_bar": "true", "trainer.device": "cpu", "trainer.resume": "true"}


def test_the_readme_lists_exactly_the_bookkeeping_keys():
    text = " ".join((REPO / "README.md").read_text().split())
    listed = re.search(r"Keys that do not change what a run computes \(([^)]*)\) may differ", text)
    assert listed, "the README's sentence on the keys that may differ is gone"
    assert re.findall(r"`([a-z_.]+)`", listed.group(1)) == list(BOOKKEEPING) == list(NEW_VALUE)
    assert NOT_DEFINING == BOOKKEEPING and set(BOOKKEEPING) <= set(RESUME_MAY_DIFFER)


def regbench(args, cwd, env=None):
    return subprocess.run([sys.executable, "-m", "regbench", *args], cwd=cwd, capture_output=True, text=True,
                          timeout=300, env={**os.environ, "PYTHONUNBUFFERED": "1", **(env or {})})


@pytest.fixture(scope="module")
def interrupted(tmp_path_factory):
    """A run and a one-job sweep, each SIGKILLed after epoch 1 of 2 (what a preemption leaves)."""
    tmp = tmp_path_factory.mktemp("interrupted")
    make_mnist_like(tmp / "data", "MNIST")
    args = [*RUN, f"data.root={tmp}/data"]
    kill = {"REGBENCH_FAULT": "after_checkpoint:1"}
    single = regbench([*args, f"hydra.run.dir={tmp}/run"], tmp, kill)
    sweep = regbench(["-m", *args, "seed=0", f"hydra.sweep.dir={tmp}/sweep"], tmp, kill)
    assert single.returncode == sweep.returncode == -signal.SIGKILL, single.stderr + sweep.stderr
    return tmp, args


def copy_of(interrupted, tmp_path, key: str, what: str) -> tuple[list[str], str, Path]:
    """A copy of the interrupted run (or sweep) folder, the run's arguments, and the key's override."""
    tmp, args = interrupted
    shutil.copytree(tmp / "data", tmp_path / "data2")  # the same files elsewhere
    shutil.copytree(tmp / what, tmp_path / what)
    return args, f"{key}={NEW_VALUE[key].format(tmp=tmp_path)}", tmp_path / what


def record(run: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted((run / ".hydra").iterdir())}


def finished(run: Path) -> dict:
    summary = json.loads((run / "summary.json").read_text())
    assert summary["status"] == "completed" and summary["epochs_completed"] == 2, summary
    assert summary["resumed_from_epoch"] == 1 and (run / "COMPLETED").is_file()
    return summary


@pytest.fixture(autouse=True)
def _in_process_command(monkeypatch):
    monkeypatch.setattr(sys, "argv", ["regbench"])  # main() sets it for Hydra
    monkeypatch.delenv("REGBENCH_SWEEP_ID", raising=False)
    monkeypatch.delenv("REGBENCH_SWEEP_HPARAMS", raising=False)
    yield


@pytest.mark.slow
@pytest.mark.parametrize("key", list(NEW_VALUE))
def test_a_run_resumes_with_a_bookkeeping_key_changed(interrupted, tmp_path, key, capsys):
    args, override, run = copy_of(interrupted, tmp_path, key, "run")
    saved = record(run)
    if key == "trainer.resume":  # spelled out: the run's own command line plus trainer.resume=true
        main([*args, f"hydra.run.dir={run}", override])
    else:
        main(["resume", str(run), override])
    finished(run)
    assert record(run) == saved  # a resume never rewrites the record
    main(["resume", str(run)])
    assert "is already finished (completed); nothing to resume" in capsys.readouterr().out


@pytest.mark.slow
@pytest.mark.parametrize("key", list(NEW_VALUE))
def test_an_interrupted_sweep_reruns_with_a_bookkeeping_key_added(interrupted, tmp_path, key, capsys):
    args, override, sweep = copy_of(interrupted, tmp_path, key, "sweep")
    (job,) = [p.parent for p in sweep.rglob(".hydra")]
    saved = record(job)
    main(["-m", *args, "seed=0", override, f"hydra.sweep.dir={sweep}"])
    status = json.loads((sweep / "sweep_status.json").read_text())
    assert [(s["outcome"], s["current"]) for s in status] == [("resumed", True)], status
    finished(job)
    assert record(job) == saved  # the job's record says how it was started, not the re-run's key
    # afterwards: the same re-run skips it, and `regbench resume <job>` says it is finished
    main(["-m", *args, "seed=0", override, f"hydra.sweep.dir={sweep}"])
    assert [s["outcome"] for s in json.loads((sweep / "sweep_status.json").read_text())] == ["skipped"]
    assert record(job) == saved
    main(["resume", str(job), override])
    assert "is already finished (completed); nothing to resume" in capsys.readouterr().out


@pytest.mark.slow
@pytest.mark.parametrize("key", list(NEW_VALUE))
def test_a_sweep_job_resumes_alone_with_a_bookkeeping_key(interrupted, tmp_path, key):
    """`regbench resume <job>` of the interrupted sweep job, with the key (the issue's failing retry)."""
    _, override, sweep = copy_of(interrupted, tmp_path, key, "sweep")
    (job,) = [p.parent for p in sweep.rglob(".hydra")]
    saved = record(job)
    main(["resume", str(job), override])
    finished(job)
    assert record(job) == saved
