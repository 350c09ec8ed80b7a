"""hydra/launcher=stacked: which jobs share a stack (regbench.stacked.grouping), and sweeps end to end: every
member writes an ordinary run folder, re-runs skip finished members, unstackable jobs train the ordinary way,
a diverging member fails alone."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
from hydra.experimental.callback import Callback

from regbench.errors import RegbenchError
from regbench.stacked.grouping import group_jobs, stack_key
from tests.conftest import F32_REL, REPO, TINY, compose_cfg

SMALL = ["data.train_size=96", "data.batch_size=32", "data.val_fraction=0.05", "data.test_size=100",
         "trainer.max_epochs=2", "trainer.progress_bar=false", "model.hidden=[16]"]


def key(*overrides):
    return stack_key(compose_cfg(*overrides))


@pytest.mark.parametrize("a, b", [
    (["seed=0"], ["seed=1"]),
    (["optimizer.lr=0.001"], ["optimizer.lr=0.01"]),
    (["optimizer=momentum"], ["optimizer=momentum", "optimizer.momentum=0.5"]),
    (["regularizer=[]"], ["regularizer=[l2]"]),
    (["regularizer=[]"], ["regularizer=[dropout]"]),
    (["regularizer=[dropout]", "regularizer.dropout.rate=0.2"], ["regularizer=[dropout]"]),
    (["regularizer=[label_smoothing,grad_clip]"], ["regularizer=[early_stopping]"]),
    (["scheduler=cosine"], ["scheduler=constant"]),
    (["trainer.num_threads=1"], ["trainer.checkpoint_every=2"]),
])
def test_what_may_differ_inside_one_stack(a, b):
    assert key(*a)[0] is not None and key(*a)[0] == key(*b)[0]


@pytest.mark.parametrize("a, b", [
    (["model.hidden=[32]"], ["model.hidden=[64]"]),
    (["optimizer=adam"], ["optimizer=sgd"]),
    (["optimizer=adam"], ["optimizer=adam", "optimizer.amsgrad=true"]),
    (["data.batch_size=32"], ["data.batch_size=64"]),
    (["trainer.max_epochs=2"], ["trainer.max_epochs=3"]),
    (["regularizer=[]"], ["regularizer=[batchnorm]"]),
    (["regularizer=[dropout]"], ["regularizer=[dropout]", "regularizer.dropout.placement=before_activation"]),
    (["augmentation=none"], ["augmentation=digits"]),
    (["augmentation=mixup"], ["augmentation=mixup", "augmentation.ops.0.alpha=0.4"]),  # the engine refuses them mixed
])
def test_what_splits_a_sweep_into_stacks(a, b):
    assert key(*a)[0] != key(*b)[0]


@pytest.mark.parametrize("overrides, why", [
    (["model=resnet", "model.depth=8", "regularizer=[stochastic_depth]"], "stochastic_depth"),
    (["trainer.amp=bf16"], "trainer.amp=bf16"),
    (["trainer.compile=model"], "trainer.compile=model"),
])
def test_jobs_that_cannot_be_stacked_say_why(overrides, why):
    k, reason = key(*overrides)
    assert k is None and why in reason


def test_groups_keep_job_order_and_respect_max_members():
    assert group_jobs(["a", "b", "a", None, "a", "b"], 2) == [[0, 2], [4], [1, 5]]


def regbench(args, cwd, env=None):
    return subprocess.run([sys.executable, "-m", "regbench", *args], cwd=cwd, capture_output=True, text=True,
                          timeout=600, env={**os.environ, "PYTHONPATH": f"{REPO / 'src'}:{REPO}", **(env or {})})


class RecordJobEnds(Callback):
    """A Hydra callback (hydra.callbacks.<name>._target_ in a test's overrides): every job's on_job_start and
    on_job_end, a JSON line each in ``path``, with what the job's summary.json said at that moment."""

    def __init__(self, path: str):
        self.path = path

    def _write(self, event: str, config, **more) -> None:
        run_dir = Path(config.hydra.runtime.output_dir)
        try:
            summary = json.loads((run_dir / "summary.json").read_text())["status"]
        except OSError:
            summary = None
        with open(self.path, "a") as f:
            f.write(json.dumps({"event": event, "dir": str(run_dir), "summary": summary, **more}) + "\n")

    def on_job_start(self, config, **kwargs) -> None:
        self._write("start", config)

    def on_job_end(self, config, job_return, **kwargs) -> None:
        value = job_return._return_value
        self._write("end", config, status=job_return.status.name,
                    value=value if isinstance(value, float) else f"{type(value).__name__}: {value}")


def job_events(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


@pytest.mark.slow
def test_a_stacked_sweep_end_to_end(tmp_path):
    """3 stackable jobs and 1 unstackable one; every member's folder is an ordinary run folder naming its stack;
    a re-run skips them all; max_members cuts a group into stacks."""
    sweep = tmp_path / "sweep"
    args = ["-m", "hydra/launcher=stacked", "regularizer=[],[l2],[stochastic_depth]", "seed=0,1", "model=resnet",
            "model.depth=8", *[s for s in SMALL if not s.startswith("model.hidden")], f"hydra.sweep.dir={sweep}"]
    first = regbench(args, tmp_path)
    assert first.returncode == 0, first.stderr[-3000:]
    status = {e["run"]: e for e in json.loads((sweep / "sweep_status.json").read_text())}
    assert len(status) == 6 and all(e["outcome"] == "ok" for e in status.values())
    stacked = [r for r, e in status.items() if "stack" in e]
    assert sorted(stacked) == sorted(r for r in status if "stochastic_depth" not in r)
    assert {status[r]["stack"]["members"] for r in stacked} == {4}
    for run in status:
        folder = sweep / run
        for name in (".hydra/config.yaml", ".hydra/overrides.yaml", "tb", "metrics.csv", "summary.json",
                     "checkpoints/last.pt", "COMPLETED"):
            assert (folder / name).exists(), (run, name)
        summary = json.loads((folder / "summary.json").read_text())
        assert summary["status"] == "completed" and ("stacked" in summary) == (run in stacked)
    assert "1 stacks, 4 members, 2 jobs not in a stack" in first.stdout
    again = regbench(args, tmp_path)
    assert "0 ok, 0 resumed, 6 skipped, 0 failed" in again.stdout, again.stdout[-2000:]
    split = regbench(["-m", "hydra/launcher=stacked", "hydra.launcher.max_members=2", "seed=0,1,2", *SMALL,
                      f"hydra.sweep.dir={tmp_path / 'split'}"], tmp_path)
    assert split.returncode == 0 and "2 stacks, 3 members" in split.stdout, split.stdout[-2000:]


@pytest.mark.slow
def test_a_diverging_member_fails_alone_in_the_status_table(tmp_path):
    sweep = tmp_path / "sweep"
    proc = regbench(["-m", "hydra/launcher=stacked", "optimizer=sgd", "optimizer.lr=0.01,1e30", *SMALL,
                     f"hydra.sweep.dir={sweep}"], tmp_path)
    assert proc.returncode == 1
    assert "regbench: error: training diverged: non-finite" in proc.stderr and "Traceback" not in proc.stderr
    status = {e["run"]: e["outcome"] for e in json.loads((sweep / "sweep_status.json").read_text())}
    assert sorted(status.values()) == ["failed", "ok"]


@pytest.mark.slow
def test_rerun_of_a_member_trains_it_as_a_stack_of_one(tmp_path):
    """`regbench rerun <member>` computes what its stack computed for it (a member does not depend on its
    group-mates: equal to 1e-6 relative; bitwise on this machine, every member's slice of a batched product being
    computed alike)."""
    import csv

    sweep = tmp_path / "sweep"
    proc = regbench(["-m", "hydra/launcher=stacked", "seed=0,1", "regularizer=[dropout]", *SMALL,
                     f"hydra.sweep.dir={sweep}"], tmp_path)
    assert proc.returncode == 0, proc.stderr[-2000:]
    member = next(sweep.rglob("seed=1"))
    again = regbench(["rerun", str(member), f"hydra.run.dir={tmp_path / 'again'}"], tmp_path)
    assert again.returncode == 0, again.stderr[-2000:]
    a, b = (list(csv.DictReader(open(d / "metrics.csv"))) for d in (member, tmp_path / "again"))
    assert len(a) == len(b) == 2
    for x, y in zip(a, b):
        for c in ("train_loss", "val_loss", "clean_train_loss", "weight_l2"):
            assert float(x[c]) == pytest.approx(float(y[c]), rel=F32_REL), c  # bitwise on this machine
    assert json.loads((tmp_path / "again" / "summary.json").read_text())["stacked"]["members"] == 1


@pytest.mark.slow
def test_callbacks_see_each_member_end_after_it_trained_with_its_real_value(tmp_path):
    """Hydra's callbacks get a member's on_job_end after its stack trained (its summary.json says so), with its
    best monitored value, or JobStatus.FAILED and why; its on_job_start before it trains. (Before: every member's
    on_job_end came at its set-up, COMPLETED with NaN.)"""
    sweep, events = tmp_path / "sweep", tmp_path / "events.jsonl"
    proc = regbench(["-m", "hydra/launcher=stacked", "optimizer=sgd", "optimizer.lr=0.01,1e30", *SMALL,
                     f"hydra.sweep.dir={sweep}", "+hydra.callbacks.record._target_=tests.test_stacked_launcher."
                     "RecordJobEnds", f"+hydra.callbacks.record.path={events}"], tmp_path)
    assert proc.returncode == 1, proc.stderr[-3000:]  # the diverged member fails the sweep, after its table
    seen = job_events(events)
    assert [e["event"] for e in seen] == ["start", "start", "end", "end"]  # one stack: both start, then both end
    assert all(e["summary"] is None for e in seen[:2])
    outcomes = {Path(e["dir"]).parent.name: json.loads((Path(e["dir"]) / "sweep_job.json").read_text())
               for e in seen[2:]}
    ends = {Path(e["dir"]).parent.name: e for e in seen[2:]}
    ok, bad = ends["optimizer.lr=0.01"], ends["optimizer.lr=1e+30"]
    assert ok["summary"] == "completed" and ok["status"] == "COMPLETED"
    assert ok["value"] == outcomes["optimizer.lr=0.01"]["value"] and math.isfinite(ok["value"])
    assert bad["summary"] == "failed" and bad["status"] == "FAILED"
    assert bad["value"].startswith("MemberFailed: ") and "training diverged" in bad["value"]
    assert "return value: nan" not in proc.stdout + proc.stderr


@pytest.mark.parametrize("error", [RegbenchError("the stack key of this job: broken (a test)"),
                                   RuntimeError("a bug in the stack key (a test)")], ids=["regbench", "other"])
def test_an_error_in_the_launchers_set_up_reaches_the_user_as_itself(error, tmp_path, monkeypatch, capsys):
    """regbench's own error: its one line, exit 2; any other: Hydra's usual report of it (and with
    HYDRA_FULL_ERROR=1 the exception itself). Before: `KeyError: 'job'`, the error lost."""
    import regbench.stacked.grouping as grouping
    from regbench.cli import main

    def broken(cfg):
        raise error

    monkeypatch.setattr(grouping, "stack_key", broken)
    argv = ["-m", "hydra/launcher=stacked", "seed=0,1", *TINY, f"hydra.sweep.dir={tmp_path}/s"]
    with pytest.raises(SystemExit) as e:
        main(argv)
    err = capsys.readouterr().err
    assert "KeyError" not in err and str(error) in err, err
    if isinstance(error, RegbenchError):
        assert e.value.code == 2 and err == f"regbench: error: {error}\n"
        return
    assert e.value.code == 1 and f"RuntimeError: {error}" in err and "HYDRA_FULL_ERROR=1" in err  # Hydra's report
    monkeypatch.setenv("HYDRA_FULL_ERROR", "1")
    with pytest.raises(RuntimeError, match="a bug in the stack key"):
        main([*argv[:-1], f"hydra.sweep.dir={tmp_path}/t"])


def test_another_apps_sweep_gets_one_line(tmp_path):
    """hydra/launcher=stacked trains regbench's runs itself, never calling the task function: another Hydra app
    is refused in one line before any job is set up, not trained as regbench runs nor ended by a traceback."""
    (tmp_path / "my_app.py").write_text(
        "import hydra\n\n"
        "@hydra.main(version_base='1.3', config_path=None, config_name=None)\n"
        "def my_app(cfg):\n    return 1\n\n"
        "if __name__ == '__main__':\n    my_app()\n")
    proc = subprocess.run([sys.executable, "my_app.py", "-m", "hydra/launcher=stacked", "+x=1,2",
                           f"hydra.searchpath=[file://{REPO / 'configs'}]"], cwd=tmp_path, capture_output=True,
                          text=True, timeout=120, env={**os.environ, "PYTHONPATH": str(REPO / "src")})
    assert proc.returncode == 2, proc.stderr[-2000:]
    assert proc.stderr.splitlines()[-1].startswith("regbench: error: hydra/launcher=stacked trains regbench runs; "
                                                   "the task function my_app is another app's")
    assert "Traceback" not in proc.stderr and not list((tmp_path / "multirun").rglob("config.yaml"))


def test_a_stack_refused_as_a_whole_ends_every_started_job_failed(tmp_path, monkeypatch, capsys):
    """A RegbenchError of fit_stack (the stack as a whole refused before training) after the members' on_job_start:
    each started job gets its on_job_end, FAILED with that error, before the one line (review)."""
    import regbench.train as train
    from regbench.cli import main

    def refused(*args, **kwargs):
        raise RegbenchError("the stack as a whole is refused (a test)")

    monkeypatch.setattr(train, "fit_stack", refused)
    events = tmp_path / "events.jsonl"
    argv = ["-m", "hydra/launcher=stacked", "seed=0,1", *TINY, f"hydra.sweep.dir={tmp_path}/s",
            "+hydra.callbacks.record._target_=tests.test_stacked_launcher.RecordJobEnds",
            f"+hydra.callbacks.record.path={events}"]
    with pytest.raises(SystemExit) as e:
        main(argv)
    assert e.value.code == 2 and "the stack as a whole is refused (a test)" in capsys.readouterr().err
    seen = job_events(events)
    assert [x["event"] for x in seen] == ["start", "start", "end", "end"]
    assert all(x["status"] == "FAILED" and "the stack as a whole is refused" in x["value"] for x in seen[2:])
