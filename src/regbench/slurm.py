"""``hydra/launcher=slurm``: hydra-submitit-launcher's SlurmLauncher with regbench's sweep guarantees.

What it adds to the plugin's launcher (whose ``launch`` waits for every job with ``job.results()`` and lets the
first error end the sweep with a traceback):

- before anything is submitted, ``cpus_per_task``, ``mem_gb`` and ``gpus_per_node`` are checked against the
  partition's nodes (``sinfo``): a request no node can satisfy would leave the job array PENDING forever on a
  cluster without ``EnforcePartLimits``; here it is one line naming the key;
- ``sbatch`` refusing the array (partition limits, unknown partition or account) is one line, not a traceback;
- a job that ends without a result (``scancel``, node failure, out of memory) is recorded as failed in its run
  folder, and the sweep goes on to its status table; re-running the sweep runs it again (it resumes from its
  last checkpoint).

Preemption and time limits are handled in the job itself (:func:`regbench.sweep.run_job`): submitit's USR2
handler checkpoints the launcher call, requeues the job and exits; the requeued job resumes the run folder.
"""

from __future__ import annotations

import contextlib
import io
import logging
import math
import re
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any, Optional, Sequence

from hydra.core.singleton import Singleton
from hydra.core.utils import JobReturn, JobStatus, filter_overrides
from hydra_plugins.hydra_submitit_launcher.config import BaseQueueConf
from hydra_plugins.hydra_submitit_launcher.submitit_launcher import SlurmLauncher as PluginSlurmLauncher
from omegaconf import OmegaConf, open_dict

from regbench.errors import RegbenchError
from regbench.stacked.launcher import check_max_members
from regbench.sweep import is_regbench_task, record_outcome, skip_if_completed

log = logging.getLogger(__name__)


class SlurmLauncher(PluginSlurmLauncher):
    def launch(self, job_overrides: Sequence[Sequence[str]], initial_job_idx: int) -> Sequence[JobReturn]:
        runs, job_params, done = self._jobs(job_overrides, initial_job_idx)
        todo = [i for i in range(len(runs)) if i not in done]
        jobs = {}
        if todo:
            try:
                submitted = _submit(self._executor(), self, [job_params[i] for i in todo])
            except RegbenchError as e:
                print(f"regbench: error: {e}", file=sys.stderr)
                sys.exit(2)
            jobs = dict(zip(todo, submitted))
        return [done[i] if i in done else self._result(jobs[i], runs[i], job_overrides[i]) for i in range(len(runs))]

    def _executor(self):
        """The plugin's executor set-up (hydra-submitit-launcher 1.2's ``launch``, up to the submission)."""
        import submitit

        params = self.params
        init_keys = {"max_num_timeout", "submitit_folder"}
        executor = submitit.AutoExecutor(cluster=self._EXECUTOR, folder=params["submitit_folder"],
                                         **{f"{self._EXECUTOR}_max_num_timeout": params["max_num_timeout"]})
        base = set(OmegaConf.structured(BaseQueueConf).keys())
        executor.update_parameters(**{k if k in base else f"{self._EXECUTOR}_{k}": v
                                      for k, v in params.items() if k not in init_keys})
        return executor

    def _jobs(self, job_overrides, initial_job_idx) -> tuple[list[Path], list[tuple], dict[int, JobReturn]]:
        """Each job's run folder, the plugin's call arguments for it, and the results of the jobs completed in an
        earlier run of the sweep (skipped here, not submitted)."""
        assert self.config is not None and self.hydra_context is not None
        ours = is_regbench_task(self.task_function)  # another app's jobs: the plugin's behaviour, all submitted
        sweep_dir = Path(str(self.config.hydra.sweep.dir))
        sweep_dir.mkdir(parents=True, exist_ok=True)
        runs, params, done = [], [], {}
        for i, overrides in enumerate(job_overrides):
            idx = initial_job_idx + i
            sweep_config = self.hydra_context.config_loader.load_sweep_config(self.config, list(overrides))
            with open_dict(sweep_config.hydra.job):
                sweep_config.hydra.job.num = idx
            runs.append(Path(str(sweep_config.hydra.sweep.dir)) / str(sweep_config.hydra.sweep.subdir))
            params.append((list(overrides), "hydra.sweep.dir", idx, f"job_id_for_{idx}", Singleton.get_state()))
            skipped, value = skip_if_completed(runs[-1], sweep_config.trainer.monitor) if ours else (False, 0.0)
            note = " (completed earlier: not submitted)" if skipped else ""
            log.info(f"\t#{idx} : {' '.join(filter_overrides(overrides))}{note}")
            if skipped:
                done[i] = JobReturn(overrides=list(overrides), status=JobStatus.COMPLETED, _return_value=value)
        return runs, params, done

    def _result(self, job, run_dir: Path, overrides: Sequence[str]) -> JobReturn:
        """The job's JobReturn; a regbench job that ended without one is recorded as failed, not raised (another
        app's job: raised, as the plugin does)."""
        from submitit.core.utils import FailedJobError, UncompletedJobError

        if not is_regbench_task(self.task_function):
            return job.results()[0]
        try:
            return job.results()[0]
        except (UncompletedJobError, FailedJobError) as e:
            state = _state(job)
            reason = (f"SLURM job {job.job_id} ended without a result (state {state}); its log: {job.paths.stderr}"
                      if isinstance(e, UncompletedJobError) else
                      f"SLURM job {job.job_id} failed: {_last_line(str(e))}")
            print(f"regbench: error: {run_dir}: {reason}", file=sys.stderr)
            record_outcome(run_dir, "failed", reason, None)
            return JobReturn(overrides=list(overrides), status=JobStatus.COMPLETED, _return_value=math.nan)


def _submit(executor, launcher, job_params) -> list:
    """executor.map_array with sbatch's refusal as one RegbenchError (submitit prints sbatch's stderr itself
    before raising: that is kept out of the way, the line says it all)."""
    from submitit.core.utils import FailedJobError

    printed = io.StringIO()
    try:
        with contextlib.redirect_stderr(printed):
            return executor.map_array(launcher, *zip(*job_params))
    except FailedJobError as e:
        lines = [ln.removeprefix("sbatch: error: ").strip() for ln in str(e).splitlines() if ln.strip()]
        raise RegbenchError(f"hydra.launcher: sbatch refused the job array: {'; '.join(lines) or 'no message'}; "
                            f"fix: {_fix_for(' '.join(lines))}") from None


def _fix_for(message: str) -> str:
    low = message.lower()
    if "partition" in low:
        return "set hydra.launcher.partition to one that `sinfo` lists"
    if "time limit" in low:
        return "lower hydra.launcher.timeout_min to the partition's limit (`sinfo -o '%P %l'`)"
    if "memory" in low:
        return "lower hydra.launcher.mem_gb"
    if "processor" in low or "cpu" in low:
        return "lower hydra.launcher.cpus_per_task"
    return "adjust hydra.launcher's keys (or additional_parameters) to what the cluster accepts"


# ------------------------------------------------------------------------------------------ resources


def check_launcher(launcher) -> None:
    """The checks of a composed ``hydra.launcher`` before anything is written: SLURM's resources, the stacked
    launcher's size."""
    if "_target_" in launcher and str(launcher._target_).endswith("StackedLauncher"):
        check_max_members(launcher.get("max_members"))
    if "_target_" in launcher and str(launcher._target_).endswith("SlurmLauncher"):
        missing = [tool for tool in ("sbatch", "srun") if shutil.which(tool) is None]
        if missing:
            raise RegbenchError(f"hydra/launcher=slurm: {' and '.join(missing)} not found; fix: run the sweep on a "
                                "SLURM login node (sbatch and srun on PATH)")
        check_resources({k: launcher[k] for k in ("partition", "cpus_per_task", "mem_gb", "gpus_per_node")
                         if k in launcher})


def check_resources(params: dict[str, Any]) -> None:
    """Refuse cpus_per_task / mem_gb / gpus_per_node that no node of the partition has (one line, the key
    named), and a cluster that ``sinfo`` cannot reach (before Hydra writes multirun.yaml or submitit its pickles).
    A partition sinfo lists no node of is left to sbatch."""
    nodes = _partition_nodes(params.get("partition"))
    if not nodes:
        return
    where = f"partition {params.get('partition') or '(default)'}"
    asks = {"cpus_per_task": (params.get("cpus_per_task"), "cpus", ""),
            "mem_gb": (params.get("mem_gb"), "mem_gb", " GB"),
            "gpus_per_node": (params.get("gpus_per_node"), "gpus", "")}
    for key, (wanted, field, unit) in asks.items():
        best = max(n[field] for n in nodes)
        if wanted and wanted > best:
            raise RegbenchError(
                f"hydra.launcher.{key}={wanted}: no node of {where} has that many (at most {_fmt(best)}{unit} per "
                f"node); fix: hydra.launcher.{key}={_fmt(best) if field != 'mem_gb' else int(best)} or less, or "
                "another hydra.launcher.partition")


def _fmt(x: float) -> str:
    return f"{x:g}"


SINFO_TIMEOUT_S = 30


def _partition_nodes(partition: Optional[str]) -> list[dict[str, float]]:
    """[{cpus, mem_gb, gpus}] per node of the partition (the default one when None), from sinfo."""
    cmd = ["sinfo", "-h", "-N", "-o", "%P|%c|%m|%G"]
    try:
        out = subprocess.run(cmd, capture_output=True, text=True, timeout=SINFO_TIMEOUT_S)
        failed = "" if out.returncode == 0 else \
            f"exited with status {out.returncode}: {_last_line(out.stderr or out.stdout)}"
    except subprocess.TimeoutExpired:
        failed = f"gave no answer in {SINFO_TIMEOUT_S} s"
    except OSError as e:
        failed = "not found" if isinstance(e, FileNotFoundError) else f"cannot run: {e.strerror or e}"
    if failed:
        raise RegbenchError(f"hydra/launcher=slurm: no SLURM cluster reachable (`sinfo` {failed}); fix: run the sweep "
                            "on a SLURM login node where `sinfo` answers (is slurmctld up, SLURM_CONF right?), or "
                            "choose another hydra/launcher")
    nodes = []
    for line in out.stdout.splitlines():
        try:
            part, cpus, mem, gres = line.split("|")
            default = part.endswith("*")
            if (partition is None and not default) or (partition is not None and part.rstrip("*") != partition):
                continue
            nodes.append({"cpus": float(cpus.rstrip("+")), "mem_gb": float(mem.rstrip("+")) / 1024,
                          "gpus": float(sum(int(n) for n in re.findall(r"gpu(?::[^:(,]+)?:(\d+)", gres)))})
        except ValueError:
            continue
    return nodes


def _state(job) -> str:
    try:
        return job.state
    except Exception:  # noqa: BLE001 - a state is only for the message
        return "UNKNOWN"


def _last_line(text: str) -> str:
    lines = [ln.strip() for ln in text.splitlines() if ln.strip() and not set(ln.strip()) <= {"-"}]
    return lines[-1] if lines else "no message"
