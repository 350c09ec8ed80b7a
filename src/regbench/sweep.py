"""Sweeps that survive failures and re-runs.

Each job of a multirun decides from its run folder what to do (regbench.job_plan): a folder with a ``COMPLETED``
marker (written atomically at the very end of a run) is skipped; an unfinished one (killed, preempted, requeued)
is resumed from its checkpoint; a failed one is tried again from scratch, its failed attempt kept under
``attempts/``. A failing job never stops the others: the failure is recorded, and after the last job the
:class:`SweepStatus` callback prints a status table and makes the command exit with status 1.
"""

from __future__ import annotations

import logging
import math
import os
import shutil
import socket
import signal
import sys
import time
import traceback
from pathlib import Path
from typing import Any, Optional

from hydra.experimental.callback import Callback
from omegaconf import DictConfig

from regbench.errors import RegbenchError
from regbench.io import read_json, write_json
# What a job does with its folder is regbench.job_plan's; MARKER and keeps_record stay importable from here.
from regbench.job_plan import MARKER, checked_plan, job_plan, keeps_record  # noqa: F401
from regbench.records import Summary
from regbench.sweep_names import NAMING_KEY

log = logging.getLogger(__name__)

OUTCOME = "sweep_job.json"
# Outcomes of a job that stopped before the end (a SLURM preemption or time limit, another deliberate exit):
# not failed, the next run of the sweep resumes it.
STOPPED = ("preempted", "timed-out", "interrupted")


# The task function of regbench's sweeps (regbench.cli's Hydra app, by name: this module sits below the command
# line). A launcher that does more than call it checks for it: hydra/launcher=stacked trains the jobs itself (another
# app's task would never be called), hydra/launcher=slurm reads regbench's folders before submitting.
REGBENCH_TASK = ("regbench.cli", "app")


def is_regbench_task(task_function: Any) -> bool:
    return (getattr(task_function, "__module__", None), getattr(task_function, "__qualname__", None)) == REGBENCH_TASK


def archive_failed(run_dir: Path) -> Path:
    """Move a failed attempt's results to attempts/<k>/ (summary, metrics, log); drop its curves and checkpoints."""
    attempts = run_dir / "attempts"
    k = 1 + max((int(p.name) for p in attempts.glob("*") if p.name.isdigit()), default=0)
    dest = attempts / str(k)
    dest.mkdir(parents=True)
    for name in ("summary.json", "metrics.csv", "regbench.log", OUTCOME):
        if (run_dir / name).exists():
            shutil.move(str(run_dir / name), dest / name)
    for name in ("tb", "checkpoints"):
        shutil.rmtree(run_dir / name, ignore_errors=True)
    return dest


def run_job(cfg: DictConfig, run_dir: Path, fit, default_threads: Optional[int]) -> float:
    """One job of a multirun: skip, resume, retry or start it, and record the outcome; never raises (except
    KeyboardInterrupt and SystemExit), so one failure does not stop the sweep. Returns the monitored value or NaN.

    Under submitit (hydra/launcher=slurm|processes) a preemption or time limit ends the job through submitit's
    signal handler: it checkpoints the launcher call, requeues the job and raises SystemExit, which must reach
    submitit (the requeued job resumes this run folder); the outcome says why it stopped."""
    try:
        action, reason = checked_plan(run_dir)  # before anything is moved or written: never through a link
    except RegbenchError as e:
        log.error("job failed: %s", e)
        print(f"regbench: error: {e}", file=sys.stderr)
        _record(run_dir, "failed", str(e), None)
        return math.nan
    if action == "skip":
        value = _monitored(run_dir, cfg.trainer.monitor)
        _record(run_dir, "skipped", reason, value)
        log.info("skipping %s: %s", run_dir, reason)
        return value
    if action == "retry":
        dest = archive_failed(run_dir)
        log.info("retrying %s (the failed attempt is kept in %s)", run_dir, dest)
    _tag_requeue_signal()
    _record(run_dir, "not run", "started by this command; no outcome recorded (the job was killed?)", None)
    try:
        value = fit(cfg, run_dir, resume=action == "resume", default_threads=default_threads)
    except KeyboardInterrupt:
        raise
    except BaseException as e:  # noqa: BLE001 - a failing job must not stop the sweep
        stopped = getattr(e, "regbench_status", None)
        if stopped is not None or isinstance(e, SystemExit):
            _record(run_dir, stopped or "interrupted", getattr(e, "regbench_reason", "the process was ended"), None)
            if isinstance(e, SystemExit):
                raise  # submitit's requeue (or another deliberate exit): the process ends here
            log.error("job stopped: %s", e)
            return math.nan  # submitit did not requeue it (max_num_timeout reached): re-running the sweep resumes it
        first = (str(e).strip().splitlines() or [type(e).__name__])[0]
        # A user-fixable failure (RegbenchError: bad data, a divergence) is its one line; a bug keeps its traceback.
        log.error("job failed: %s%s", first, "" if isinstance(e, RegbenchError) else "\n" + traceback.format_exc())
        print(f"regbench: error: {first}", file=sys.stderr)
        _record(run_dir, "failed", first, None)
        return math.nan
    _record(run_dir, "resumed" if action == "resume" else "ok", reason if action == "resume" else "", value)
    return value


def _tag_requeue_signal() -> None:
    """Under submitit, wrap its checkpoint-and-requeue signal handler (USR2) so that the exception it raises says
    why the job stopped: ``regbench_status`` is "timed-out" or "preempted", by submitit's own test. fit writes
    it to summary.json, run_job to the sweep's outcome."""
    if "submitit" not in sys.modules:
        return
    from submitit.core.job_environment import JobEnvironment, SignalHandler
    from submitit.core.utils import UncompletedJobError

    try:
        sig = JobEnvironment._usr_sig()
        handler = signal.getsignal(sig)
        owner = getattr(handler, "__self__", None)
        if not isinstance(owner, SignalHandler) or handler.__name__ != "checkpoint_and_try_requeue":
            return

        def tagged(signum, frame):
            status = "timed-out" if owner.has_timed_out() else "preempted"
            name = signal.Signals(signum).name
            try:
                handler(signum, frame)
            except UncompletedJobError as e:  # submitit does not requeue it (max_num_timeout reached)
                _tag(e, status, f"{status} and not requeued ({e}); re-run the sweep to resume it")
                raise
            except SystemExit as e:  # checkpointed and requeued: the process ends, the requeued job resumes
                _tag(e, status, f"{status} (SLURM sent {name}); requeued, it resumes from its last checkpoint")
                raise
            except Exception as e:  # noqa: BLE001 - e.g. `scontrol requeue` refused while SLURM requeues it itself
                # The process must end without a result all the same: a result would tell the sweep the job is
                # done while SLURM's own requeue (preemption) runs it again; without one, SLURM's requeue or a
                # re-run of the sweep resumes it.
                first = (str(e).strip().splitlines() or [type(e).__name__])[0]
                log.warning("warning: submitit could not requeue the job (%s); ending it without a result", first)
                stop = SystemExit(-1)
                _tag(stop, status, f"{status} (SLURM sent {name}); submitit's requeue failed ({first}); a requeue "
                                   "by SLURM or a re-run of the sweep resumes it")
                raise stop from e

        signal.signal(sig, tagged)
    except (AttributeError, ValueError, RuntimeError) as e:  # another submitit, or not the main thread
        log.warning("warning: cannot watch submitit's requeue signal (%s); an interrupted job is reported as "
                    "'interrupted'", e)


def skip_if_completed(run_dir: Path, monitor: str) -> tuple[bool, float]:
    """(skipped, value): what run_job does first, for a launcher that decides before submitting a job (a re-run
    of a cluster sweep queues only the jobs that still have work)."""
    action, reason = job_plan(run_dir)
    if action != "skip":
        return False, math.nan
    value = _monitored(run_dir, monitor)
    _record(run_dir, "skipped", reason, value)
    return True, value


def _tag(e: BaseException, status: str, reason: str) -> None:
    e.regbench_status = status  # type: ignore[attr-defined]
    e.regbench_reason = reason  # type: ignore[attr-defined]


def record_outcome(run_dir: Path, outcome: str, reason: str, value: Optional[float],
                   stack: Optional[dict] = None) -> None:
    """The outcome of a job as the sweep's status table shows it (also for the launcher: a job that ended
    without a result); ``stack``: its stack and place in it (hydra/launcher=stacked)."""
    _record(run_dir, outcome, reason, value, stack)


def _monitored(run_dir: Path, monitor: str) -> float:
    try:
        return float(Summary.load(run_dir / "summary.json").best_value(monitor))
    except (OSError, ValueError, KeyError, TypeError):
        return math.nan


# Which command a job's outcome belongs to: set by SweepStatus when the sweep starts, inherited by the jobs
# (also in the launchers' worker processes), recorded in sweep_job.json.
SWEEP_ID = "REGBENCH_SWEEP_ID"


def _record(run_dir: Path, outcome: str, reason: str, value: Optional[float], stack: Optional[dict] = None) -> None:
    run_dir.mkdir(parents=True, exist_ok=True)
    record = {"outcome": outcome, "reason": reason,
              "value": value if value is not None and math.isfinite(value) else None,
              "sweep_id": os.environ.get(SWEEP_ID)}
    if stack is not None:
        record["stack"] = stack
    write_json(run_dir / OUTCOME, record)


def collect(sweep_dir: Path, sweep_id: Optional[str] = None, since: Optional[float] = None) -> list[dict[str, Any]]:
    """Outcome of every job folder below a sweep folder (those with a .hydra/ folder). With ``sweep_id`` (and
    ``since``, the command's start time), each job says whether it belongs to that command (``current``)."""
    jobs = []
    for hydra_dir in sorted(sweep_dir.rglob(".hydra")):
        run_dir = hydra_dir.parent
        if "attempts" in run_dir.relative_to(sweep_dir).parts:
            continue
        info = {"run": str(run_dir.relative_to(sweep_dir)), "outcome": "not run", "reason": ""}
        try:
            record = read_json(run_dir / OUTCOME, root=sweep_dir)
            if isinstance(record, dict):
                info.update({k: record.get(k) for k in ("outcome", "reason", "value", "sweep_id") if k in record})
                stack = record.get("stack")
                if isinstance(stack, dict) and all(isinstance(stack.get(k), t) for k, t in
                                                   (("group", str), ("index", int), ("members", int))):
                    info["stack"] = {k: stack[k] for k in ("group", "index", "members")}
        except (OSError, ValueError):
            pass
        info["current"] = sweep_id is None or _belongs(run_dir, info.get("sweep_id"), sweep_id, since)
        if info["current"] and sweep_id is not None and info.get("sweep_id") not in (None, sweep_id):
            # set up by this command but killed before it recorded an outcome: the record is an earlier one's
            info.update(outcome="not run", reason="no outcome recorded (the job was killed?)", value=None)
        jobs.append(info)
    return jobs


def _belongs(run_dir: Path, recorded: Optional[str], sweep_id: str, since: Optional[float]) -> bool:
    """A job of this command: it recorded this command's id; or Hydra set its folder up (.hydra/) after the
    command started (a job killed before its record, or a launcher that does not pass the environment on)."""
    if recorded == sweep_id:
        return True
    if since is None:
        return recorded is None
    try:
        mtime = os.lstat(run_dir / ".hydra" / "overrides.yaml").st_mtime
    except OSError:
        return False
    return mtime >= since - 2.0  # 2 s: coarse file-system clocks


def status_table(jobs: list[dict[str, Any]]) -> str:
    width = max([len(j["run"]) for j in jobs] + [3])
    stacked = any("stack" in j for j in jobs)  # hydra/launcher=stacked: which stack, which member
    lines = [f"{'run':<{width}}  {'status':<9}  " + ("stack      " if stacked else "") + "reason"]
    for j in jobs:
        where = ""
        if stacked:
            s = j.get("stack")
            where = f"{s['group'].removeprefix('stack-')}:{s['index'] + 1}/{s['members']}" if s else "-"
            where = f"{where:<11}"
        lines.append(f"{j['run']:<{width}}  {j['outcome']:<9}  {where}{j['reason']}")
    counts = {k: sum(j["outcome"] == k for j in jobs) for k in ("ok", "resumed", "skipped", "failed")}
    counts.update({k: n for k in STOPPED if (n := sum(j["outcome"] == k for j in jobs))})
    lines.append(", ".join(f"{v} {k}" for k, v in counts.items()))
    if stacked:
        groups = {j["stack"]["group"] for j in jobs if "stack" in j}
        members = sum(1 for j in jobs if "stack" in j)
        lines.append(f"{len(groups)} stacks, {members} members, {len(jobs) - members} jobs not in a stack")
    return "\n".join(lines)


class SweepStatus(Callback):
    """Hydra callback: after the last job of a multirun, print the status table of THIS command's jobs, save it
    as sweep_status.json, and exit with status 1 if any of them failed. Job folders that earlier commands left in
    the same sweep folder (other overrides) are listed apart and do not count."""

    def on_multirun_start(self, config: DictConfig, **kwargs: Any) -> None:
        self.started = time.time()
        self.sweep_id = f"{socket.gethostname()}:{os.getpid()}:{self.started:.6f}"
        os.environ[SWEEP_ID] = self.sweep_id

    def on_multirun_end(self, config: DictConfig, **kwargs: Any) -> None:
        sweep_dir = Path(config.hydra.sweep.dir)
        everything = collect(sweep_dir, getattr(self, "sweep_id", None), getattr(self, "started", None))
        jobs = [j for j in everything if j["current"]]
        stale = [j for j in everything if not j["current"]]
        if not everything:
            return
        write_json(sweep_dir / "sweep_status.json", everything)
        print(f"\nsweep {sweep_dir.resolve()}\n{status_table(jobs)}")
        if stale:
            print(f"\nnot part of this command ({len(stale)} job folders an earlier command left here; not counted):"
                  f"\n{status_table(stale)}")
        print(f"report: regbench report {sweep_dir.resolve()}")
        failed = [j for j in jobs if j["outcome"] in ("failed", "not run", *STOPPED)]
        if failed:
            print(f"regbench: error: {len(failed)} of {len(jobs)} sweep jobs failed; to retry them (finished jobs are "
                  f"skipped, interrupted ones resume), run: {retry_command(sweep_dir)}", file=sys.stderr)
            sys.exit(1)


def retry_command(sweep_dir: Path) -> str:
    """The exact command that re-runs this sweep into the same folder (an ad-hoc sweep's folder is named by the
    time it started, so "the same command" would start a new one)."""
    import shlex

    args = [a for a in sys.argv[1:] if not a.startswith(("hydra.sweep.dir=", NAMING_KEY + "="))]
    return shlex.join(["regbench", *args, f"hydra.sweep.dir={sweep_dir.resolve()}"])
