"""Sweeps that survive failures and re-runs.

Each job of a multirun decides from its run folder what to do: a folder with a ``COMPLETED`` marker (written
atomically at the very end of a run) is skipped; an unfinished one (killed, preempted, requeued) is resumed
from its checkpoint; a failed one is tried again from scratch, its failed attempt kept under ``attempts/``.
A failing job never stops the others: the failure is recorded, and after the last job the
:class:`SweepStatus` callback prints a status table and makes the command exit with status 1.
"""

from __future__ import annotations

import json
import logging
import math
import shutil
import sys
import traceback
from pathlib import Path
from typing import Any, Optional

from hydra.experimental.callback import Callback
from omegaconf import DictConfig

from regbench.logs import write_json

log = logging.getLogger(__name__)

MARKER = "COMPLETED"
OUTCOME = "sweep_job.json"


def job_plan(run_dir: Path) -> tuple[str, str]:
    """(action, reason) for a sweep job: skip | resume | retry | new."""
    if (run_dir / MARKER).exists():
        return "skip", "completed earlier"
    summary = run_dir / "summary.json"
    status = None
    if summary.exists():
        try:
            status = json.loads(summary.read_text()).get("status")
        except (OSError, ValueError):
            status = "unreadable"
    if status == "failed":
        return "retry", "failed earlier"
    if status is not None or (run_dir / "metrics.csv").exists():
        return "resume", f"unfinished ({status or 'no summary'})"
    return "new", ""


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
    """One job of a multirun: skip, resume, retry or start it, and record the outcome; never raises
    (except KeyboardInterrupt), so one failure does not stop the sweep. Returns the monitored value or NaN."""
    action, reason = job_plan(run_dir)
    if action == "skip":
        value = _monitored(run_dir, cfg.trainer.monitor)
        _record(run_dir, "skipped", reason, value)
        log.info("skipping %s: %s", run_dir, reason)
        return value
    if action == "retry":
        dest = archive_failed(run_dir)
        log.info("retrying %s (the failed attempt is kept in %s)", run_dir, dest)
    try:
        value = fit(cfg, run_dir, resume=action == "resume", default_threads=default_threads)
    except KeyboardInterrupt:
        raise
    except BaseException as e:  # noqa: BLE001 - a failing job must not stop the sweep
        first = (str(e).strip().splitlines() or [type(e).__name__])[0]
        log.error("job failed: %s\n%s", first, traceback.format_exc())
        print(f"regbench: error: {first}", file=sys.stderr)
        _record(run_dir, "failed", first, None)
        return math.nan
    _record(run_dir, "resumed" if action == "resume" else "ok", reason if action == "resume" else "", value)
    return value


def _monitored(run_dir: Path, monitor: str) -> float:
    try:
        return float(json.loads((run_dir / "summary.json").read_text())["best"][monitor])
    except (OSError, ValueError, KeyError, TypeError):
        return math.nan


def _record(run_dir: Path, outcome: str, reason: str, value: Optional[float]) -> None:
    run_dir.mkdir(parents=True, exist_ok=True)
    write_json(run_dir / OUTCOME, {"outcome": outcome, "reason": reason,
                                   "value": value if value is not None and math.isfinite(value) else None})


def collect(sweep_dir: Path) -> list[dict[str, Any]]:
    """Outcome of every job folder below a sweep folder (those with a .hydra/ folder)."""
    jobs = []
    for hydra_dir in sorted(sweep_dir.rglob(".hydra")):
        run_dir = hydra_dir.parent
        if "attempts" in run_dir.relative_to(sweep_dir).parts:
            continue
        info = {"run": str(run_dir.relative_to(sweep_dir)), "outcome": "not run", "reason": ""}
        try:
            info.update(json.loads((run_dir / OUTCOME).read_text()))
        except (OSError, ValueError):
            pass
        jobs.append(info)
    return jobs


def status_table(jobs: list[dict[str, Any]]) -> str:
    width = max([len(j["run"]) for j in jobs] + [3])
    lines = [f"{'run':<{width}}  {'status':<8}  reason"]
    for j in jobs:
        lines.append(f"{j['run']:<{width}}  {j['outcome']:<8}  {j['reason']}")
    counts = {k: sum(j["outcome"] == k for j in jobs) for k in ("ok", "resumed", "skipped", "failed")}
    lines.append(", ".join(f"{v} {k}" for k, v in counts.items()))
    return "\n".join(lines)


class SweepStatus(Callback):
    """Hydra callback: after the last job of a multirun, print the status table, save it as sweep_status.json,
    and exit with status 1 if any job failed."""

    def on_multirun_end(self, config: DictConfig, **kwargs: Any) -> None:
        sweep_dir = Path(config.hydra.sweep.dir)
        jobs = collect(sweep_dir)
        if not jobs:
            return
        write_json(sweep_dir / "sweep_status.json", jobs)
        print(f"\nsweep {sweep_dir.resolve()}\n{status_table(jobs)}")
        print(f"report: regbench report {sweep_dir.resolve()}")
        failed = [j for j in jobs if j["outcome"] in ("failed", "not run")]
        if failed:
            print(f"regbench: error: {len(failed)} of {len(jobs)} sweep jobs failed; re-run the same command to "
                  "retry them (finished jobs are skipped, interrupted ones resume)", file=sys.stderr)
            sys.exit(1)
