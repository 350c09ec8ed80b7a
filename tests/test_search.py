"""Searching (issue 30, item 4): Hydra's Optuna sweeper behind regbench's pre-check, and regbench's resumable form
``hydra/sweeper=search`` (the study in the sweep folder; ``n_trials`` counts finished trials across reruns; a trial a
kill interrupted is asked again and resumes from its checkpoint; a batch of trials is one launch)."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest

from regbench.cli_check import check
from tests.conftest import one_line_error

SMALL = ["data.train_size=64", "data.batch_size=32", "data.val_fraction=0.05", "data.test_size=100",
         "trainer.progress_bar=false", "model.hidden=[16]"]
SEARCH = ["-m", "hydra/sweeper=search", "regularizer=[l2]", "regularizer.l2.lam=tag(log,interval(1e-5,1e-2))"]


def regbench(args, env=None, check_rc=True):
    proc = subprocess.run([sys.executable, "-m", "regbench", *args], capture_output=True, text=True, timeout=300,
                          env={**os.environ, "PYTHONUNBUFFERED": "1", **(env or {})})
    if check_rc and proc.returncode != 0:
        raise AssertionError(f"exit {proc.returncode}\n{proc.stdout}\n{proc.stderr}")
    return proc


def trials(sweep: Path) -> dict[str, int]:
    import optuna

    study = optuna.load_study(study_name="regbench", storage=f"sqlite:///{sweep}/search.db")
    states: dict[str, int] = {}
    for t in study.trials:
        states[t.state.name] = states.get(t.state.name, 0) + 1
    return states


def test_an_interval_is_checked_at_both_ends(tmp_path, capsys):
    """A search samples anywhere in its interval: the pre-check validates both ends like a grid's values."""
    low = one_line_error(capsys, *SEARCH, "regularizer.l2.lam=interval(-1,1e-2)", *SMALL,
                         f"hydra.sweep.dir={tmp_path}/s")
    assert "regularizer.l2.lam=-1.0: expected a number >= 0" in low
    high = one_line_error(capsys, "-m", "hydra/sweeper=search", "regularizer=[dropout]",
                          "regularizer.dropout.rate=interval(0.1,1.0)", *SMALL, f"hydra.sweep.dir={tmp_path}/s")
    assert "regularizer.dropout.rate=1.0" in high
    assert not (tmp_path / "s").exists()
    cfgs = check(["regularizer=[l2]", "regularizer.l2.lam=tag(log,interval(1e-5,1e-2))", "hydra/sweeper=search"],
                 multirun=True, runs=False)
    assert [c.regularizer.l2.lam for c in cfgs] == [1e-5, 1e-2]


def test_the_named_search_composes():
    cfgs = check(["sweep=search_l2_dropout"], multirun=True, runs=False)
    sweeper = cfgs[0].hydra.sweeper
    assert sweeper._target_.endswith("SearchSweeper") and sweeper.sampler._target_.endswith("TPESampler")
    assert sweeper.storage == f"sqlite:///{cfgs[0].hydra.sweep.dir}/search.db"
    assert list(cfgs[0].regularizer) == ["l2", "dropout"]
    assert {c.regularizer.dropout.rate for c in cfgs} == {0.0, 0.7}  # the interval's ends, checked


@pytest.mark.slow
def test_a_killed_search_resumes_without_retraining_its_finished_trials(tmp_path):
    sweep = tmp_path / "s"
    args = [*SEARCH, "hydra.sweeper.n_jobs=1", *SMALL, "trainer.max_epochs=3", f"hydra.sweep.dir={sweep}"]
    killed = regbench([*args, "hydra.sweeper.n_trials=2"], env={"REGBENCH_FAULT": "after_checkpoint:2"},
                      check_rc=False)
    assert killed.returncode == -signal.SIGKILL
    assert trials(sweep) == {"RUNNING": 1}  # the kill left the first trial running in the storage
    [interrupted] = [p.parent for p in sweep.glob("*/seed=0/summary.json")]

    out = regbench([*args, "hydra.sweeper.n_trials=2"]).stdout + ""
    assert trials(sweep) == {"FAIL": 1, "COMPLETE": 2}  # the stale trial failed, asked again, and one more
    summaries = {p.parent: json.loads(p.read_text()) for p in sweep.glob("*/seed=0/summary.json")}
    assert len(summaries) == 2 and all(s["status"] == "completed" for s in summaries.values())
    assert summaries[interrupted]["resumed_from_epoch"] == 2  # its own folder, from its checkpoint
    assert "1 resumed" in out

    again = regbench([*args, "hydra.sweeper.n_trials=2"])
    assert "2 of 2 trials finished; 0 to go" in again.stdout + again.stderr
    assert trials(sweep) == {"FAIL": 1, "COMPLETE": 2}  # nothing retrained


@pytest.mark.slow
def test_a_batch_of_trials_trains_as_one_stack(tmp_path):
    sweep = tmp_path / "s"
    regbench([*SEARCH, "hydra/launcher=stacked", "hydra.sweeper.n_trials=2", "hydra.sweeper.n_jobs=2", *SMALL,
              "trainer.max_epochs=2", f"hydra.sweep.dir={sweep}"])
    summaries = [json.loads(p.read_text()) for p in sweep.glob("*/seed=0/summary.json")]
    assert len(summaries) == 2 and all(s["status"] == "completed" for s in summaries)
    groups = {s["stacked"]["group"] for s in summaries}
    assert len(groups) == 1 and {s["stacked"]["members"] for s in summaries} == {2}
    assert trials(sweep) == {"COMPLETE": 2}


def test_trial_counts_and_log_ranges_are_checked_before_anything_starts(tmp_path, capsys):
    for key, value in (("n_trials", 0), ("n_jobs", 0), ("n_trials", -2)):
        msg = one_line_error(capsys, *SEARCH, f"hydra.sweeper.{key}={value}", *SMALL, f"hydra.sweep.dir={tmp_path}/s")
        assert f"hydra.sweeper.{key}={value}: expected a whole number >= 1" in msg
    msg = one_line_error(capsys, "-m", "hydra/sweeper=search", "regularizer=[l2]",
                         "regularizer.l2.lam=tag(log,interval(0,1e-2))", *SMALL, f"hydra.sweep.dir={tmp_path}/s")
    assert "a log-scale interval starts above 0 (got 0.0)" in msg
    assert not (tmp_path / "s").exists()


def test_a_study_started_by_another_command_is_not_continued(tmp_path, capsys):
    """The sweep folder's study remembers the command that started it; another command (other fixed overrides, an
    other search space) would count its trials as this one's: refused in one line, nothing written."""
    from regbench.search import SIGNATURE, quiet_optuna, signature

    optuna = quiet_optuna()
    sweep = tmp_path / "s"
    sweep.mkdir()
    started = ["regularizer=[l2]", "regularizer.l2.lam=tag(log,interval(1e-5,1e-2))", *SMALL]
    study = optuna.create_study(study_name="regbench", storage=f"sqlite:///{sweep}/search.db")
    study.set_user_attr(SIGNATURE, signature(started, {}))
    check(["hydra/sweeper=search", *started, f"hydra.sweep.dir={sweep}"], multirun=True)  # the same command: fine
    msg = one_line_error(capsys, "-m", "hydra/sweeper=search", *started, "trainer.max_epochs=2",
                         f"hydra.sweep.dir={sweep}")
    assert f"hydra.sweep.dir={sweep}: its search (0 trials) was started by another command" in msg
    assert "fix: the same command to continue it, or another hydra.sweep.dir" in msg
    assert sorted(p.name for p in sweep.iterdir()) == ["search.db"]
