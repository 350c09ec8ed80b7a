"""``hydra/launcher=stacked``: a sweep's jobs grouped into stacks, each stack trained in this process at once.

Every job is first set up by Hydra's own ``run_job`` exactly as the basic launcher sets it up (its folder, .hydra/
with config.yaml / hydra.yaml / overrides.yaml, its log file), with a task function that decides what the job
needs (regbench.job_plan: skip a completed one, retry a failed one, resume an unfinished one) and, instead of
training it, collects it. Jobs that cannot be stacked (regbench.stacked.grouping) train there and then, the
ordinary way. The collected jobs are grouped by their stack key into stacks of at most
``hydra.launcher.max_members`` and each stack is trained by :func:`regbench.train.fit_stack`; every
member's outcome (with its stack and place in it) is recorded for the sweep's status table.

Hydra's callbacks see each job as a Hydra launcher shows it: ``on_job_start`` when it starts training (a
member: right before its stack), ``on_job_end`` after it trained, with its best monitored value (a failed
member: ``JobStatus.FAILED``, the exception :class:`MemberFailed` saying why). Errors of the launcher's own
set-up reach the user as themselves: regbench's one line, or Hydra's usual report of any other exception.
Only regbench's own task trains here: another Hydra app gets one line (it would silently train regbench runs).
"""

from __future__ import annotations

import copy
import logging
import math
import os
import sys
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, NoReturn, Optional, Sequence

from hydra.core.hydra_config import HydraConfig
from hydra.core.utils import (JobReturn, JobStatus, configure_log, env_override, filter_overrides, run_job,
                              setup_globals)
from hydra.plugins.launcher import Launcher
from hydra.types import HydraContext
from omegaconf import DictConfig, open_dict

from regbench.errors import RegbenchError
from regbench.job_plan import checked_plan
from regbench.records import Summary
from regbench.sweep import archive_failed, is_regbench_task, record_outcome

# regbench.train (the dispatcher: the stacked engine) and stacked.grouping are imported when a sweep launches, not here: Hydra imports every module
# of hydra_plugins at its start (also for `regbench --help`), and they import torch and the regularizers.

log = logging.getLogger(__name__)


class MemberFailed(Exception):
    """A stack member that failed, as Hydra's callbacks see it (the return value of its ``JobStatus.FAILED``):
    the reason its summary.json records; the full error is in the member's regbench.log."""

    def __init__(self, run_dir: Path, reason: str):
        super().__init__(f"{run_dir}: {reason}")
        self.run_dir, self.reason = run_dir, reason


def check_max_members(value: Any) -> None:
    """``hydra.launcher.max_members``: an integer >= 1 (RegbenchError otherwise); checked before launch
    (regbench.slurm.check_launcher) and by the launcher itself (another app's Hydra)."""
    if not isinstance(value, int) or isinstance(value, bool) or value < 1:
        raise RegbenchError(f"hydra.launcher.max_members={value!r}: expected an integer >= 1 (members per stack); "
                            "fix: e.g. hydra.launcher.max_members=16")


def _fail(e: RegbenchError) -> NoReturn:
    """regbench's one line for an error of the launcher's set-up (as the command line prints its own)."""
    print(f"regbench: error: {e}", file=sys.stderr)
    sys.exit(2)


@dataclass
class _Job:
    index: int
    overrides: list[str]
    callbacks: "_Deferred"
    action: str = ""  # skip | ordinary (both done in the set-up) | new | resume (collected for a stack)
    cfg: Optional[DictConfig] = None
    run_dir: Optional[Path] = None
    key: Optional[str] = None
    ret: Optional[JobReturn] = None  # the set-up's JobReturn; a collected job's is completed after its stack


class _Deferred:
    """Hydra's callbacks as ``run_job`` calls them while a job is set up: held back until the launcher knows
    what the job does. A job done in the set-up (skipped, trained the ordinary way) has them called then, in
    run_job's own context; a collected job has them called around its stack (:meth:`StackedLauncher._as_job`)."""

    def __init__(self, callbacks: Any):
        self.callbacks, self.passing, self.config = callbacks, False, None

    def on_job_start(self, config: DictConfig, **kwargs: Any) -> None:
        self.config = config  # the job's whole config (hydra node included), as the callbacks get it
        if self.passing:
            self.callbacks.on_job_start(config=config, **kwargs)

    def on_job_end(self, config: DictConfig, job_return: JobReturn, **kwargs: Any) -> None:
        if self.passing:
            self.callbacks.on_job_end(config=config, job_return=job_return, **kwargs)


class StackedLauncher(Launcher):
    def __init__(self, max_members: int = 16) -> None:
        super().__init__()
        try:
            check_max_members(max_members)
        except RegbenchError as e:
            _fail(e)
        self.max_members = max_members
        self.config: Optional[DictConfig] = None
        self.task_function: Any = None
        self.hydra_context: Optional[HydraContext] = None

    def setup(self, *, hydra_context: HydraContext, task_function: Any, config: DictConfig) -> None:
        self.config, self.hydra_context, self.task_function = config, hydra_context, task_function

    def launch(self, job_overrides: Sequence[Sequence[str]], initial_job_idx: int) -> Sequence[JobReturn]:
        assert self.config is not None and self.hydra_context is not None
        if not is_regbench_task(self.task_function):
            name = getattr(self.task_function, "__qualname__", type(self.task_function).__name__)
            _fail(RegbenchError(
                f"hydra/launcher=stacked trains regbench runs; the task function {name} is another app's (a stack "
                "trains regbench's models itself and would never call it); fix: choose another hydra/launcher "
                "(basic, joblib, submitit_local, ...) for this app"))
        setup_globals()
        configure_log(self.config.hydra.hydra_logging, self.config.hydra.verbose)
        Path(str(self.config.hydra.sweep.dir)).mkdir(parents=True, exist_ok=True)
        jobs = [self._set_up(initial_job_idx + i, list(overrides)) for i, overrides in enumerate(job_overrides)]
        collected = [j for j in jobs if j.action in ("new", "resume")]
        from regbench.stacked.grouping import group_jobs

        stacks = group_jobs([j.key for j in collected], self.max_members)
        log.info("stacked launcher: %d jobs -> %d stacks (%s members), %d trained the ordinary way, %d skipped",
                 len(jobs), len(stacks), "+".join(str(len(s)) for s in stacks) or "0",
                 sum(j.action == "ordinary" for j in jobs), sum(j.action == "skip" for j in jobs))
        for number, members in enumerate(stacks):
            self._train([collected[i] for i in members], f"{number + 1}/{len(stacks)}")
        return [j.ret for j in jobs]

    # ------------------------------------------------------------------------------------ one job
    def _set_up(self, idx: int, overrides: list[str]) -> _Job:
        """Hydra's set-up of job ``idx``; it is collected for a stack, trained (not stackable) or skipped."""
        log.info("\t#%d : %s", idx, " ".join(filter_overrides(overrides)))
        sweep_config = self.hydra_context.config_loader.load_sweep_config(self.config, overrides)
        with open_dict(sweep_config):
            sweep_config.hydra.job.id = idx
            sweep_config.hydra.job.num = idx
        job = _Job(idx, overrides, _Deferred(self.hydra_context.callbacks))
        context = HydraContext(config_loader=self.hydra_context.config_loader, callbacks=job.callbacks)
        job.ret = run_job(hydra_context=context, task_function=lambda cfg: self._decide(cfg, job),
                          config=sweep_config, job_dir_key="hydra.sweep.dir", job_subdir_key="hydra.sweep.subdir")
        configure_log(self.config.hydra.hydra_logging, self.config.hydra.verbose)  # as the basic launcher does
        if not job.action:  # the set-up itself failed: that error, as itself
            error = job.ret._return_value
            if isinstance(error, RegbenchError):
                _fail(error)
            raise error
        return job

    def _decide(self, cfg: DictConfig, job: _Job) -> float:
        """run_job's task: what job ``job`` needs. A job done here (skipped, not stackable, or its folder refused:
        the sweep's own job reports that alone) gets Hydra's callbacks now; a collected one after its stack."""
        from regbench.stacked.grouping import stack_key

        run_dir = Path(HydraConfig.get().runtime.output_dir)
        key, why = stack_key(cfg)
        try:
            action, _ = checked_plan(run_dir)
        except RegbenchError:
            action = "refused"  # the ordinary job refuses the folder in one line and records it, failing alone
        if key is None or action in ("skip", "refused"):
            job.action = "skip" if action == "skip" else "ordinary"
            if key is None:
                log.info("not stacked (%s): %s trains the ordinary way", why, run_dir)
            job.callbacks.passing = True
            job.callbacks.on_job_start(config=job.callbacks.config, task_function=self.task_function)
            return self.task_function(cfg)  # the basic launcher's path (a skip is recorded there)
        if action == "retry":
            dest = archive_failed(run_dir)
            log.info("retrying %s (the failed attempt is kept in %s)", run_dir, dest)
            action = "new"
        job.action, job.cfg, job.run_dir, job.key = action, cfg, run_dir, key
        return math.nan  # a placeholder: the job's JobReturn is completed after its stack trained

    # ------------------------------------------------------------------------------------ one stack
    def _train(self, members: list[_Job], name: str) -> None:
        from regbench.train import fit_stack  # the dispatcher (the engine lazily: see tests/test_structure.py LAZY)

        group = f"stack-{members[0].index}"
        log.info("stack %s (%d members): %s", name, len(members), ", ".join(str(m.run_dir) for m in members))
        for m in members:
            with self._as_job(m, env=True):
                m.callbacks.callbacks.on_job_start(config=m.callbacks.config, task_function=self.task_function)
        try:
            values = fit_stack([m.cfg for m in members], [m.run_dir for m in members],
                               resume=[m.action == "resume" for m in members], group=group)
        except RegbenchError as e:  # the stack as a whole refused before training: each started job ends, failed
            for m in members:
                ended = copy.copy(m.ret)
                ended.status, ended.return_value = JobStatus.FAILED, e
                with self._as_job(m, env=False):
                    m.callbacks.callbacks.on_job_end(config=m.callbacks.config, job_return=ended)
            _fail(e)
        for i, (m, value) in enumerate(zip(members, values)):
            stack = {"group": group, "index": i, "members": len(members)}
            seen = m.ret  # the JobReturn of its set-up: overrides, configs, folder, task name
            seen.status, seen.return_value = JobStatus.COMPLETED, value
            if math.isnan(value):
                try:
                    reason = Summary.load(m.run_dir / "summary.json").error or "failed"
                except (OSError, ValueError):
                    reason = "failed (no readable summary.json)"
                record_outcome(m.run_dir, "failed", reason, None, stack=stack)
                print(f"regbench: error: {reason}", file=sys.stderr)
                # The callbacks get its real status; the sweeper gets NaN, as regbench's task returns for a failed
                # job under every launcher: one failure never ends the sweep before its status table.
                seen = copy.copy(m.ret)
                seen.status, seen.return_value = JobStatus.FAILED, MemberFailed(m.run_dir, reason)
            else:
                record_outcome(m.run_dir, "resumed" if m.action == "resume" else "ok", "", value, stack=stack)
            with self._as_job(m, env=False):
                m.callbacks.callbacks.on_job_end(config=m.callbacks.config, job_return=seen)

    @contextmanager
    def _as_job(self, m: _Job, env: bool):
        """The context run_job calls a job's callbacks in: Hydra's config of the job (HydraConfig.get()), its
        working folder (hydra.job.chdir), its log file, and around on_job_start its hydra.job.env_set."""
        config = m.callbacks.config
        before, cwd = HydraConfig.instance().cfg, os.getcwd()  # None between jobs, as run_job leaves it
        HydraConfig.instance().set_config(config)
        try:
            if config.hydra.job.chdir:
                os.chdir(config.hydra.runtime.output_dir)
            configure_log(config.hydra.job_logging, config.hydra.verbose)
            if env:
                with env_override(config.hydra.job.env_set):
                    yield
            else:
                yield
        finally:
            HydraConfig.instance().cfg = before  # run_job's own restore (None is no config set_config takes)
            os.chdir(cwd)
            configure_log(self.config.hydra.hydra_logging, self.config.hydra.verbose)
