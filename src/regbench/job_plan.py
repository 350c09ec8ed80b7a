"""What a sweep job (or a resumed run) does with the folder it finds: skip, resume, retry or start it.

Read from the folder alone, as data: a ``COMPLETED`` marker (written atomically at the very end of a run) means
skip; a summary.json that says completed gets its missing marker and is skipped too; a failed one is tried again
from scratch; anything else a run left (a summary, metrics.csv) is resumed from its checkpoint. Every launcher
(regbench.sweep's job, hydra/launcher=stacked and =slurm) and the checks of a sweep's folders before launch
(regbench.sweep_names) ask this module; it asks nothing of theirs.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Optional

from regbench.io import FolderFileError, write_json
from regbench.records import MARKER, Summary
from regbench.rundir import refuse_links


def job_plan(run_dir: Path) -> tuple[str, str]:
    """(action, reason) for a sweep job: skip | resume | retry | new.

    A run is complete once its summary.json says so (written atomically, last); a job killed between that and
    its COMPLETED marker gets the marker now, made from the summary, and is skipped like any completed one."""
    action, reason, summary = _plan(run_dir)
    if summary is not None:
        try:  # the same marker train.fit writes last
            marker = summary.marker()
        except (KeyError, TypeError):
            return "retry", "its summary.json says completed but lacks the results"
        write_json(run_dir / MARKER, marker)
    return action, reason


def checked_plan(run_dir: Path) -> tuple[str, str]:
    """:func:`job_plan` of a folder that is refused first (RegbenchError, one line) if any part of it is a link or a
    special file: what a launcher does before it moves or writes anything in a job's folder."""
    refuse_links(run_dir)
    return job_plan(run_dir)


def _plan(run_dir: Path) -> tuple[str, str, Optional[Summary]]:
    """job_plan without writing anything (the summary: a completed run's that lacks its marker). A summary.json
    that is a link, a FIFO or far too large is refused with one line (FolderFileError)."""
    if os.path.lexists(run_dir / MARKER):
        return "skip", "completed earlier", None
    path = run_dir / "summary.json"
    status = None
    if os.path.lexists(path):
        try:
            summary = Summary.load(path)
            status = summary.status
        except FolderFileError:
            raise
        except (OSError, ValueError):
            status = "unreadable"
    if status == "completed":
        return "skip", "completed earlier (its COMPLETED marker was missing and is now written)", summary
    if status == "failed":
        return "retry", "failed earlier", None
    if status is not None or os.path.lexists(run_dir / "metrics.csv"):
        return "resume", f"unfinished ({status or 'no summary'})", None
    return "new", "", None


def keeps_record(run_dir: Path) -> bool:
    """Whether the job (or run) in ``run_dir`` continues what the folder holds — skipped or resumed — so that
    its ``.hydra/`` record (config, overrides, Hydra settings) is left as it was started: a re-run of the sweep
    with a bookkeeping key added (trainer.num_threads...) never rewrites it. A failed job runs again from scratch
    and gets this command's record; so does a new one. (configs/hydra/default.yaml: hydra.output_subdir.)"""
    if not os.path.lexists(run_dir / ".hydra" / "config.yaml"):
        return False
    try:
        return _plan(run_dir)[0] in ("skip", "resume")
    except FolderFileError:
        return True  # the job refuses the folder in one line; its record stays as it is
