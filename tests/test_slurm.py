"""``hydra/launcher=slurm`` on a real single-node SLURM cluster (tests/slurm_cluster.py, started once for this
module): a sweep completes like on the basic launcher; preemption by a higher-priority partition, a time
limit and ``scancel --signal=USR2`` requeue the job and it resumes from its last epoch, to the same numbers as
an uninterrupted run; a job cancelled outright is reported as failed in the status table, and re-running the
sweep runs only it.

Runs pause after epoch 1 (REGBENCH_PAUSE, a sleep) so the tests interrupt them at a known epoch; a resumed run
does not repeat epoch 1, so it does not pause again. Skipped, with the reason, where SLURM's packages are not
installed (``make test`` installs them with apt-get where it can).
"""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

from tests.slurm_cluster import for_tests

JOBS = ["data.train_size=64", "data.batch_size=32", "data.val_fraction=0.025", "data.test_size=100",
        "trainer.max_epochs=3", "trainer.progress_bar=false"]
SLURM = ["hydra/launcher=slurm", "hydra.launcher.cpus_per_task=1", "hydra.launcher.mem_gb=1"]
TIMES: dict[str, float] = {}


@pytest.fixture(scope="session")
def slurm():
    try:
        for cluster in for_tests():
            TIMES["cluster start"] = cluster.start_time_s
            yield cluster
    finally:
        if TIMES:
            print("\nSLURM test timings: " + ", ".join(f"{k} {v:.1f} s" for k, v in TIMES.items()))


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    """The two runs of the sweep, uninterrupted, on Hydra's basic launcher (one torch thread, like the jobs):
    started in the background at once; calling the fixture's value waits for it and gives the sweep folder."""
    sweep = tmp_path_factory.mktemp("reference") / "sweep"
    proc = start(["-m", "regularizer=[],[l2]", *JOBS, "trainer.num_threads=1", f"hydra.sweep.dir={sweep}"],
                 sweep.parent, None)

    def wait() -> Path:
        code, out, err = finish(proc, None, sweep.parent)
        assert code == 0, f"{out}\n{err}"
        return sweep

    yield wait
    if proc.poll() is None:
        proc.kill()
        proc.communicate()


def regbench(args, cwd, cluster=None, env=None, check=True, timeout=240) -> subprocess.CompletedProcess:
    proc = subprocess.run([sys.executable, "-m", "regbench", *args], cwd=cwd, capture_output=True, text=True,
                          timeout=timeout, env=_env(cluster, env))
    if check and proc.returncode != 0:
        raise AssertionError(f"exit {proc.returncode}\n{proc.stdout}\n{proc.stderr}\n{_logs(cluster, cwd)}")
    return proc


def start(args, cwd, cluster, env=None) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-m", "regbench", *args], cwd=cwd, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, env=_env(cluster, env))


def finish(proc: subprocess.Popen, cluster, cwd, timeout=180) -> tuple[int, str, str]:
    try:
        out, err = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        proc.kill()
        out, err = proc.communicate()
        raise AssertionError(f"the sweep did not end in {timeout} s\n{out}\n{err}\n{_logs(cluster, cwd)}") from None
    return proc.returncode, out, err


def _env(cluster, extra) -> dict[str, str]:
    env = dict(cluster.env if cluster is not None else os.environ)
    src = str(Path(__file__).resolve().parents[1] / "src")
    env["PYTHONPATH"] = os.pathsep.join(p for p in (src, env.get("PYTHONPATH")) if p)
    return {**env, "PYTHONUNBUFFERED": "1", **(extra or {})}


def _logs(cluster, cwd) -> str:
    """What to read when a test fails: the daemons' logs and the jobs' submitit logs."""
    parts = [cluster.log_tail(lines=20)] if cluster is not None else []
    for log in sorted(Path(cwd).rglob(".submitit/*/*_log.*"))[-6:]:
        parts.append(f"--- {log}\n" + "\n".join(log.read_text(errors="replace").splitlines()[-15:]))
    return "\n".join(parts)


def runs(sweep: Path) -> list[str]:
    return sorted(str(p.parent.relative_to(sweep)) for p in sweep.glob("*/seed=0/.hydra"))


def summary(run: Path) -> dict:
    try:
        return json.loads((run / "summary.json").read_text())
    except (OSError, ValueError):
        return {}


def outcomes(sweep: Path) -> dict[str, dict]:
    return {e["run"]: e for e in json.loads((sweep / "sweep_status.json").read_text())}


def slurm_job(run: Path) -> str:
    """The SLURM job id (<array>_<task>) that ran a run folder, as Hydra saved it (hydra.job.id)."""
    return str(yaml.safe_load((run / ".hydra" / "hydra.yaml").read_text())["hydra"]["job"]["id"])


def wait_paused(sweep: Path, n: int, proc, cluster, timeout=90) -> list[Path]:
    """The n run folders of a sweep once each has finished epoch 1 (and pauses)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        found = [sweep / r for r in runs(sweep)]
        if len(found) == n and all(summary(r).get("epochs_completed") == 1 for r in found):
            return found
        if proc.poll() is not None:
            break
        time.sleep(0.2)
    proc.kill()
    out, err = proc.communicate()
    raise AssertionError(f"the sweep's runs did not reach epoch 1\n{out}\n{err}\n{_logs(cluster, sweep.parent)}")


def assert_same_results(run: Path, ref: Path) -> None:
    """Bitwise the same metrics (all but the epoch's wall time) and summary numbers as the reference run."""
    def rows(path):
        lines = (path / "metrics.csv").read_text().splitlines()
        return [line.rsplit(",", 1)[0] for line in lines]  # epoch_time_s is the last column

    def numbers(s):
        strip = lambda row: {k: v for k, v in row.items() if k != "epoch_time_s"}  # noqa: E731
        return strip(s["final"]), strip(s["best"]), s["test"]

    assert rows(run) == rows(ref)
    assert numbers(summary(run)) == numbers(summary(ref))


def resumed_from(run: Path) -> list[int]:
    """The epochs the run was resumed from, in order, as its log says."""
    import re

    return [int(m) for m in re.findall(r"resuming \S+ from epoch (\d+)", (run / "regbench.log").read_text())]


# -------------------------------------------------------------------------------------------------- tests


@pytest.mark.slow
def test_a_two_job_sweep_completes_with_the_basic_launchers_folders_and_numbers(slurm, reference, tmp_path):
    sweep = tmp_path / "sweep"
    t0 = time.perf_counter()
    proc = regbench(["-m", *SLURM, "regularizer=[],[l2]", *JOBS, f"hydra.sweep.dir={sweep}"], tmp_path, slurm)
    TIMES["2-job sweep"] = time.perf_counter() - t0
    reference = reference()
    assert runs(sweep) == runs(reference) and len(runs(sweep)) == 2
    for run in runs(sweep):
        s = summary(sweep / run)
        assert s["status"] == "completed" and s["num_threads"] == 1 and s["resumed_from_epoch"] is None
        assert slurm_job(sweep / run).split("_")[1] in ("0", "1")  # ran as a task of the job array
        assert_same_results(sweep / run, reference / run)
    assert "2 ok, 0 resumed, 0 skipped, 0 failed" in proc.stdout


@pytest.mark.slow
def test_preempted_jobs_are_requeued_and_resume_from_their_last_epoch_bitwise(slurm, reference, tmp_path):
    sweep = tmp_path / "sweep"
    proc = start(["-m", *SLURM, "regularizer=[],[l2]", *JOBS, f"hydra.sweep.dir={sweep}"], tmp_path, slurm,
                 {"REGBENCH_PAUSE": "1:120"})
    paused = wait_paused(sweep, 2, proc, slurm)
    t0 = time.perf_counter()
    # A job of the higher-priority partition that needs the whole node: SLURM preempts both sweep jobs (USR2,
    # then requeue), runs it, then the requeued jobs.
    urgent = slurm.run("sbatch", "--parsable", "-p", "urgent", f"--cpus-per-task={slurm.cpus}", "-o", "/dev/null",
                       "--wrap", "sleep 1").stdout.strip()
    code, out, err = finish(proc, slurm, tmp_path)
    TIMES["preempt-resume cycle"] = time.perf_counter() - t0
    assert code == 0, f"{out}\n{err}\n{_logs(slurm, tmp_path)}"
    reference = reference()
    assert slurm.run("squeue", "-h", "-t", "all", "-j", urgent, "-o", "%T").stdout.strip() == "COMPLETED"
    status = outcomes(sweep)
    for run in paused:
        name = str(run.relative_to(sweep))
        assert status[name]["outcome"] == "resumed" and status[name]["reason"] == "unfinished (preempted)"
        assert resumed_from(run) == [1]  # not epoch 0: the epoch done before the preemption is kept
        s = summary(run)
        assert s["status"] == "completed" and s["resumed_from_epoch"] == 1
        assert_same_results(run, reference / name)
    assert "0 ok, 2 resumed" in out and "Traceback" not in err


@pytest.mark.slow
def test_time_limit_usr2_and_cancel_outright_then_the_rerun_runs_only_the_cancelled_job(slurm, reference, tmp_path):
    # Three jobs with a one-minute time limit; after epoch 1 each pauses: job 0 is cancelled outright, job 1
    # gets USR2 from scancel (as SLURM sends it before the time limit), job 2 waits for SLURM's own time-limit
    # signal. SLURM checks limits every 30 s and sends the signal once at most signal_delay_s + 30 s are left:
    # with 5 s, 25 to 55 s after the job starts (after epoch 1; the resumed run ends before its own signal).
    sweep = tmp_path / "sweep"
    args = ["-m", *SLURM, "hydra.launcher.timeout_min=1", "hydra.launcher.signal_delay_s=5",
            "regularizer=[],[l2],[dropout]", *JOBS, f"hydra.sweep.dir={sweep}"]
    t0 = time.perf_counter()
    proc = start(args, tmp_path, slurm, {"REGBENCH_PAUSE": "1:75"})
    paused = wait_paused(sweep, 3, proc, slurm)
    by_task = {slurm_job(run).split("_")[1]: run for run in paused}
    cancelled, signalled, limited = by_task["0"], by_task["1"], by_task["2"]
    slurm.run("scancel", slurm_job(cancelled))
    slurm.run("scancel", "--signal=USR2", slurm_job(signalled))
    code, out, err = finish(proc, slurm, tmp_path)
    TIMES["time-limit sweep"] = time.perf_counter() - t0
    assert code == 1 and "Traceback" not in err, f"{out}\n{err}"
    status = outcomes(sweep)
    name = lambda run: str(run.relative_to(sweep))  # noqa: E731
    assert status[name(cancelled)]["outcome"] == "failed"
    assert "ended without a result (state CANCELLED" in status[name(cancelled)]["reason"]
    assert "1 of 3 sweep jobs failed" in err and "0 ok, 2 resumed, 0 skipped, 1 failed" in out
    for run in (signalled, limited):
        assert (status[name(run)]["outcome"], status[name(run)]["reason"]) == ("resumed", "unfinished (timed-out)")
        assert resumed_from(run)[0] == 1 and summary(run)["status"] == "completed"
    reference = reference()
    for run in (signalled, limited):
        if (reference / name(run)).exists():
            assert_same_results(run, reference / name(run))

    done = {run: (run / "COMPLETED").stat().st_mtime_ns for run in (signalled, limited)}
    arrays = set(slurm.run("squeue", "-h", "-t", "all", "-o", "%F").stdout.split())
    t0 = time.perf_counter()
    rerun = regbench(args, tmp_path, slurm)  # the same command: only the cancelled job runs, from epoch 1
    TIMES["re-run of the cancelled job"] = time.perf_counter() - t0
    new = set(slurm.run("squeue", "-h", "-t", "all", "-o", "%F").stdout.split()) - arrays
    assert len(new) == 1  # one job array, of one job: the completed jobs were not submitted again
    assert len(slurm.run("squeue", "-h", "-r", "-t", "all", "-j", new.pop(), "-o", "%i").stdout.split()) == 1
    status = outcomes(sweep)
    assert status[name(cancelled)]["outcome"] == "resumed" and resumed_from(cancelled) == [1]
    assert {status[name(run)]["outcome"] for run in done} == {"skipped"}
    assert {run: (run / "COMPLETED").stat().st_mtime_ns for run in done} == done
    assert "0 ok, 1 resumed, 2 skipped, 0 failed" in rerun.stdout
    assert_same_results(cancelled, reference / name(cancelled))


@pytest.mark.slow
def test_requests_no_node_can_satisfy_fail_at_once_with_one_line(slurm, tmp_path, monkeypatch, capsys):
    from regbench.cli import main

    for name, value in slurm.env.items():
        monkeypatch.setenv(name, value)
    jobs = slurm.run("squeue", "-h", "-t", "all", "-o", "%i").stdout
    for key, value, most in (("cpus_per_task", 64, slurm.cpus), ("mem_gb", 64, slurm.mem_mb // 1024)):
        with pytest.raises(SystemExit) as e:
            main(["-m", *SLURM, f"hydra.launcher.{key}={value}", *JOBS, f"hydra.sweep.dir={tmp_path}/s"])
        err = capsys.readouterr().err
        assert e.value.code == 2 and err.count("\n") == 1, err
        assert err.startswith(f"regbench: error: hydra.launcher.{key}={value}: no node of partition (default) has "
                              f"that many (at most {most}")
        assert not (tmp_path / "s").exists()
    assert slurm.run("squeue", "-h", "-t", "all", "-o", "%i").stdout == jobs  # nothing submitted


# ------------------------------------------------------------- submitit's signal handler, without a cluster


@pytest.fixture
def submitit_handler(monkeypatch):
    """submitit's real USR2 handler for a job with a 1-minute limit (so any signal counts as "timed-out"),
    installed as in a job; ``requeue`` is what ``scontrol requeue`` does (returns, or raises)."""
    import signal
    import types

    from submitit.core import job_environment

    state = {"requeue": lambda countdown: None}
    monkeypatch.setattr(job_environment, "_checkpoint", lambda delayed, path, countdown: "")
    env = types.SimpleNamespace(global_rank=0, _requeue=lambda countdown: state["requeue"](countdown))
    delayed = types.SimpleNamespace(_timeout_min=1, _timeout_countdown=1,
                                    function=types.SimpleNamespace(checkpoint=None))
    handler = job_environment.SignalHandler(env, types.SimpleNamespace(submitted_pickle=None), delayed)
    sig = job_environment.JobEnvironment._usr_sig()
    old = signal.signal(sig, handler.checkpoint_and_try_requeue)
    yield state, delayed
    signal.signal(sig, old)


def signalled_fit(cfg, run_dir, resume, default_threads):
    from submitit.core.job_environment import JobEnvironment

    run_dir.mkdir(parents=True, exist_ok=True)
    os.kill(os.getpid(), JobEnvironment._usr_sig())
    time.sleep(5)  # the handler raises before this ends
    raise AssertionError("the signal did not arrive")


@pytest.mark.parametrize("case", ["requeued", "requeue-refused", "too-many-timeouts"])
def test_run_job_lets_submitits_requeue_end_the_process_and_records_why(case, submitit_handler, tmp_path):
    import subprocess as sp

    from regbench.sweep import OUTCOME, run_job
    from regbench.errors import stopped_status
    from tests.conftest import compose_cfg

    state, delayed = submitit_handler
    delayed._timeout_countdown = {"requeued": 1, "requeue-refused": 1, "too-many-timeouts": 0}[case]
    if case == "requeue-refused":
        def refuse(countdown):
            raise sp.CalledProcessError(1, ["scontrol", "requeue", "7_0"])
        state["requeue"] = refuse
    run = tmp_path / "run"
    cfg = compose_cfg("trainer.progress_bar=false")
    if case == "too-many-timeouts":  # submitit gives up: the job returns, the sweep reports it, a re-run resumes
        assert math.isnan(run_job(cfg, run, signalled_fit, None))
        outcome = json.loads((run / OUTCOME).read_text())
        assert outcome["outcome"] == "timed-out" and "timed-out too many times" in outcome["reason"]
        return
    with pytest.raises(SystemExit) as e:  # what submitit needs: the process ends without a result
        run_job(cfg, run, signalled_fit, None)
    assert e.value.regbench_status == "timed-out" and stopped_status(e.value) == "timed-out"
    outcome = json.loads((run / OUTCOME).read_text())
    assert outcome["outcome"] == "timed-out"
    expected = "requeued, it resumes" if case == "requeued" else "submitit's requeue failed (Command"
    assert expected in outcome["reason"], outcome["reason"]


def test_stopped_status_of_other_exceptions():
    from regbench.errors import stopped_status

    assert stopped_status(KeyboardInterrupt()) == "interrupted"
    assert stopped_status(SystemExit(1)) == "interrupted"
    assert stopped_status(ValueError("x")) == "failed"


# ------------------------------------------------------------------------- a cluster sinfo cannot reach


@pytest.mark.parametrize("sinfo,expected", [
    (None, "(`sinfo` not found)"),
    ("#!/bin/sh\nexec /bin/sleep 5\n", "(`sinfo` gave no answer in 0.5 s)"),
    ("#!/bin/sh\necho 'slurm_load_partitions: Zero Bytes were transmitted or received' >&2\nexit 1\n",
     "(`sinfo` exited with status 1: slurm_load_partitions: Zero Bytes were transmitted or received)"),
], ids=["missing", "timeout", "fails"])
def test_no_reachable_cluster_is_one_line_naming_it(sinfo, expected, tmp_path, monkeypatch):
    """Without an answer from sinfo the request cannot be checked, and sbatch would fail after Hydra wrote
    multirun.yaml and submitit a pickle per job: refused here, before anything is written."""
    from regbench import slurm
    from regbench.errors import RegbenchError

    if sinfo is not None:
        (tmp_path / "sinfo").write_text(sinfo)
        (tmp_path / "sinfo").chmod(0o755)
    monkeypatch.setenv("PATH", str(tmp_path))
    monkeypatch.setattr(slurm, "SINFO_TIMEOUT_S", 0.5)
    with pytest.raises(RegbenchError) as e:
        slurm.check_resources({"cpus_per_task": 1})
    assert str(e.value) == (f"hydra/launcher=slurm: no SLURM cluster reachable {expected}; fix: run the sweep on a "
                            "SLURM login node where `sinfo` answers (is slurmctld up, SLURM_CONF right?), or choose "
                            "another hydra/launcher")
