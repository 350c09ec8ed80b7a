"""``hydra/launcher=stacked``: a sweep's jobs grouped into stacks, each stack trained in this process at once.

Every job is first set up by Hydra's own ``run_job`` exactly as the basic launcher sets it up (its folder, .hydra/
with config.yaml / hydra.yaml / overrides.yaml, its log file, the callbacks), with a task function that decides
what the job needs (regbench.sweep.job_plan: skip a completed one, retry a failed one, resume an unfinished one)
and, instead of training it, collects it. Jobs that cannot be stacked (regbench.stacked.grouping) train there and
then, the ordinary way. The collected jobs are grouped by their stack key into stacks of at most
``hydra.launcher.max_members`` and each stack is trained by :func:`regbench.stacked.engine.fit_stack`; every
member's outcome (with its stack and place in it) is recorded for the sweep's status table.
"""

from __future__ import annotations

import logging
import math
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional, Sequence

from hydra.core.hydra_config import HydraConfig
from hydra.core.utils import JobReturn, JobStatus, configure_log, filter_overrides, run_job, setup_globals
from hydra.plugins.launcher import Launcher
from omegaconf import DictConfig, open_dict

from regbench.errors import RegbenchError

log = logging.getLogger(__name__)


@dataclass
class _Job:
    index: int
    cfg: DictConfig
    run_dir: Path
    action: str  # new | resume
    key: Optional[str]
    why: str
    ret: Optional[JobReturn] = None
    stack_action: str = ""  # a collected job: new | resume
    ret_template: Any = None  # a collected job: Hydra's JobReturn of its set-up, completed after its stack


class StackedLauncher(Launcher):
    def __init__(self, max_members: int = 16) -> None:
        super().__init__()
        if not isinstance(max_members, int) or max_members < 1:
            print(f"regbench: error: hydra.launcher.max_members={max_members!r}: expected an integer >= 1; fix: e.g. "
                  "hydra.launcher.max_members=16", file=sys.stderr)
            sys.exit(2)
        self.max_members = max_members
        self.config = self.task_function = self.hydra_context = None

    def setup(self, *, hydra_context, task_function, config: DictConfig) -> None:
        self.config, self.hydra_context, self.task_function = config, hydra_context, task_function

    def launch(self, job_overrides: Sequence[Sequence[str]], initial_job_idx: int) -> Sequence[JobReturn]:
        setup_globals()
        configure_log(self.config.hydra.hydra_logging, self.config.hydra.verbose)
        Path(str(self.config.hydra.sweep.dir)).mkdir(parents=True, exist_ok=True)
        jobs = [self._set_up(initial_job_idx + i, overrides) for i, overrides in enumerate(job_overrides)]
        collected = [j for j in jobs if j.ret is None]
        from regbench.stacked.grouping import group_jobs

        stacks = group_jobs([j.key for j in collected], self.max_members)
        log.info("stacked launcher: %d jobs -> %d stacks (%s members), %d trained the ordinary way, %d skipped",
                 len(jobs), len(stacks), "+".join(str(len(s)) for s in stacks) or "0",
                 sum(1 for j in jobs if j.ret is not None and j.action == "ordinary"),
                 sum(1 for j in jobs if j.action == "skip"))
        for number, members in enumerate(stacks):
            self._train([collected[i] for i in members], f"{number + 1}/{len(stacks)}")
        return [j.ret for j in jobs]

    # ------------------------------------------------------------------------------------ one job
    def _set_up(self, idx: int, overrides: Sequence[str]) -> _Job:
        """Hydra's set-up of job ``idx``; it is collected for a stack, trained (not stackable) or skipped."""
        log.info("\t#%d : %s", idx, " ".join(filter_overrides(overrides)))
        sweep_config = self.hydra_context.config_loader.load_sweep_config(self.config, list(overrides))
        with open_dict(sweep_config):
            sweep_config.hydra.job.id = idx
            sweep_config.hydra.job.num = idx
        job: dict[str, Any] = {}

        def collect(cfg: DictConfig) -> float:
            return self._decide(cfg, job)

        ret = run_job(hydra_context=self.hydra_context, task_function=collect, config=sweep_config,
                      job_dir_key="hydra.sweep.dir", job_subdir_key="hydra.sweep.subdir")
        configure_log(self.config.hydra.hydra_logging, self.config.hydra.verbose)  # as the basic launcher does
        j = job["job"]
        j.index = idx
        if j.action != "collect":
            j.ret = ret  # skipped, or trained the ordinary way
        else:
            j.action, j.ret_template = j.stack_action, ret
        return j

    def _decide(self, cfg: DictConfig, job: dict) -> float:
        from regbench.stacked.grouping import stack_key
        from regbench.sweep import archive_failed, job_plan

        run_dir = Path(HydraConfig.get().runtime.output_dir)
        key, why = stack_key(cfg)
        action, _ = job_plan(run_dir)
        if key is None or action == "skip":
            job["job"] = _Job(0, cfg, run_dir, "ordinary" if action != "skip" else "skip", key, why)
            if key is None:
                log.info("not stacked (%s): %s trains the ordinary way", why, run_dir)
            return self.task_function(cfg)  # the basic launcher's path (a skip is recorded there)
        if action == "retry":
            dest = archive_failed(run_dir)
            log.info("retrying %s (the failed attempt is kept in %s)", run_dir, dest)
            action = "new"
        job["job"] = _Job(0, cfg, run_dir, "collect", key, why, stack_action=action)
        return math.nan

    # ------------------------------------------------------------------------------------ one stack
    def _train(self, members: list[_Job], name: str) -> None:
        from regbench.records import Summary
        from regbench.stacked.engine import fit_stack
        from regbench.sweep import record_outcome

        group = f"stack-{members[0].index}"
        log.info("stack %s (%d members): %s", name, len(members), ", ".join(str(m.run_dir) for m in members))
        try:
            values = fit_stack([m.cfg for m in members], [m.run_dir for m in members],
                               resume=[m.action == "resume" for m in members], group=group)
        except RegbenchError as e:
            print(f"regbench: error: {e}", file=sys.stderr)
            sys.exit(2)
        for i, (m, value) in enumerate(zip(members, values)):
            stack = {"group": group, "index": i, "members": len(members)}
            if math.isnan(value):
                try:
                    reason = Summary.load(m.run_dir / "summary.json").error or "failed"
                except (OSError, ValueError):
                    reason = "failed (no readable summary.json)"
                record_outcome(m.run_dir, "failed", reason, None, stack=stack)
                print(f"regbench: error: {reason}", file=sys.stderr)
            else:
                record_outcome(m.run_dir, "resumed" if m.action == "resume" else "ok", "", value, stack=stack)
            ret = m.ret_template
            ret.status, ret.return_value = JobStatus.COMPLETED, value
            m.ret = ret
