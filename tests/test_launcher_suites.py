"""Hydra's own launcher test suites (hydra/test_utils/launcher_common_tests.py: LauncherTestSuite,
BatchedSweeperTestSuite, IntegrationTestSuite), instantiated as Hydra's plugins instantiate them
(plugins/hydra_joblib_launcher/tests, plugins/hydra_submitit_launcher/tests), against regbench's launchers
``parallel`` (joblib), ``processes`` (submitit_local), ``slurm`` (on tests/slurm_cluster.py's throwaway cluster,
started once for this module) and ``stacked``. regbench's launcher configs are found through ``hydra.searchpath``;
the suites' apps and task functions are Hydra's test apps, not regbench.

What runs, per launcher (``pytest -rs`` prints each skip's reason):
- slurm (regbench's own launcher around submitit's): every case of the three suites, except
  test_sweep_1_job_strict (the same body as test_sweep_1_job in hydra-core 1.3).
- parallel (Hydra's joblib plugin, regbench adds YAML only): LauncherTestSuite and BatchedSweeperTestSuite whole;
  of IntegrationTestSuite (a subprocess app per case) only test_get_orig_dir_multirun.
- processes (Hydra's submitit plugin, YAML only; a process per job, ~6-30 s a case): LauncherTestSuite's
  test_sweep_1_job, test_sweep_2_jobs, test_sweep_with_custom_resolver and the two that end before launch;
  IntegrationTestSuite's test_get_orig_dir_multirun. Skipped: the config-composition cases and the batched one
  (the plugin's code, which slurm runs in full here and Hydra's CI runs for the plugin) and the duplicate above.
- stacked: it trains regbench runs itself and never calls a task function, so another app is refused with one
  line (``hydra/launcher=stacked trains regbench runs; ...``, exit 2). Each suite case that reaches the launcher
  asserts that line instead of the suite's checks (:class:`_RefusedAsForeign`); the two that end before any
  launch (test_not_sweeping_hydra_overrides, test_sweep_1_job_strict_and_bad_key) run unchanged.
  IntegrationTestSuite is not instantiated for it (its apps would all get the same line; tested once in
  tests/test_stacked_launcher.py). What the suites check of each job's JobReturn (overrides, config, job name /
  id / num, the .hydra/ record and log file) is checked with regbench's task in
  :func:`test_stacked_job_returns_as_hydra_s_suites_check_them`, with each job's status and real return value.

Time on 2 shared cores: the fast part (parallel's in-process suites, stacked) ~15-22 s; the slow part (slurm,
processes, the subprocess apps) ~110-120 s, mostly waiting on the cluster and submitit (~40 s of CPU).
"""

from __future__ import annotations

import functools
from pathlib import Path
from typing import Any

import pytest
from hydra.test_utils.launcher_common_tests import (
    BatchedSweeperTestSuite,
    IntegrationTestSuite,
    LauncherTestSuite,
)

from tests.conftest import REPO, TINY

# The suites check each job's files in its working folder: written for Hydra's jobs that chdir into their folder
# (the default before version_base 1.2; this process has 1.3's, set by regbench's own Hydra app).
SEARCH = f"hydra.searchpath=[file://{REPO / 'configs'}]"
CHDIR = "hydra.job.chdir=true"
BATCHED = ["hydra/sweeper=basic", "hydra.sweeper.max_batch_size=2"]  # as Hydra's basic launcher's tests run it
LOCAL = ["hydra.launcher.timeout_min=1", "hydra.launcher.cpus_per_task=1"]




def skipped(suite: type, reason: str, *names: str) -> dict[str, Any]:
    """Suite cases left out for one launcher, with the reason (pytest -rs lists them)."""
    def skip(name: str):
        case = getattr(suite, name)
        return pytest.mark.skip(reason=reason)(functools.wraps(case)(lambda *a, **k: case(*a, **k)))

    return {name: skip(name) for name in names}


DUPLICATE = "the same body as test_sweep_1_job in hydra-core 1.3 (which runs on this launcher)"
PLUGIN_ONLY = ("Hydra's plugin, unchanged by regbench (which adds only YAML): its own CI runs this case; the same "
               "submitit code runs it here on slurm, and every case runs on parallel")
SUBPROCESS_APPS = ("Hydra's plugin, unchanged by regbench: a subprocess app per case (~6 s each on 2 cores); its own "
                   "CI runs them; here every case runs on slurm, and test_get_orig_dir_multirun on each launcher")
APP_CASES = ("test_custom_task_name", "test_custom_sweeper_run_workdir", "test_to_absolute_path_multirun")


# ------------------------------------------------------------------------------------------ parallel (joblib)
@pytest.mark.parametrize("launcher_name, overrides", [("parallel", [SEARCH, CHDIR])])
class TestParallelLauncher(LauncherTestSuite):
    pass


@pytest.mark.parametrize("launcher_name, overrides", [("parallel", [SEARCH, CHDIR, *BATCHED])])
class TestParallelLauncherBatched(BatchedSweeperTestSuite):
    pass


@pytest.mark.slow
@pytest.mark.parametrize("task_launcher_cfg, extra_flags", [({}, ["-m", "hydra/launcher=parallel", SEARCH])])
class TestParallelLauncherIntegration(IntegrationTestSuite):
    locals().update(skipped(IntegrationTestSuite, SUBPROCESS_APPS, *APP_CASES))


# ------------------------------------------------------------------------------------------ processes (submitit_local)
@pytest.mark.slow
@pytest.mark.parametrize("launcher_name, overrides", [("processes", [SEARCH, CHDIR, *LOCAL])])
class TestProcessesLauncher(LauncherTestSuite):
    locals().update(skipped(LauncherTestSuite, DUPLICATE, "test_sweep_1_job_strict"))
    locals().update(skipped(LauncherTestSuite, PLUGIN_ONLY, "test_sweep_2_optimizers",
                            "test_sweep_over_unspecified_mandatory_default", "test_sweep_and_override"))


@pytest.mark.slow
@pytest.mark.parametrize("launcher_name, overrides", [("processes", [SEARCH, CHDIR, *LOCAL, *BATCHED])])
class TestProcessesLauncherBatched(BatchedSweeperTestSuite):
    locals().update(skipped(BatchedSweeperTestSuite, PLUGIN_ONLY + " (6 jobs, a process each: ~30 s)",
                            "test_sweep_2_jobs_2_batches"))


@pytest.mark.slow
@pytest.mark.parametrize("task_launcher_cfg, extra_flags", [({}, ["-m", "hydra/launcher=processes", SEARCH, *LOCAL])])
class TestProcessesLauncherIntegration(IntegrationTestSuite):
    locals().update(skipped(IntegrationTestSuite, SUBPROCESS_APPS, *APP_CASES))


# ------------------------------------------------------------------------------------------ slurm (test cluster)
@pytest.fixture(scope="module")
def cluster():
    from tests.slurm_cluster import for_tests

    yield from for_tests()


@pytest.fixture
def on_cluster(cluster, monkeypatch):
    """This process (the in-process suites submit from here) and its subprocesses talk to the test cluster."""
    for key in ("SLURM_CONF", "PATH"):
        monkeypatch.setenv(key, cluster.env[key])


SLURM = ["hydra.launcher.cpus_per_task=1", "hydra.launcher.mem_gb=1"]  # the default time limit: SIGUSR2 comes 2 min before it


@pytest.mark.slow
@pytest.mark.usefixtures("on_cluster")
@pytest.mark.parametrize("launcher_name, overrides", [("slurm", [SEARCH, CHDIR, *SLURM])])
class TestSlurmLauncher(LauncherTestSuite):
    locals().update(skipped(LauncherTestSuite, DUPLICATE, "test_sweep_1_job_strict"))


@pytest.mark.slow
@pytest.mark.usefixtures("on_cluster")
@pytest.mark.parametrize("launcher_name, overrides", [("slurm", [SEARCH, CHDIR, *SLURM, *BATCHED])])
class TestSlurmLauncherBatched(BatchedSweeperTestSuite):
    pass


@pytest.mark.slow
@pytest.mark.usefixtures("on_cluster")
@pytest.mark.parametrize("task_launcher_cfg, extra_flags", [({}, ["-m", "hydra/launcher=slurm", SEARCH, *SLURM])])
class TestSlurmLauncherIntegration(IntegrationTestSuite):
    pass


# ------------------------------------------------------------------------------------------ stacked
class _RefusedAsForeign:
    """Each suite case that launches Hydra's test app: the stacked launcher's one line (exit 2), nothing run."""

    REFUSED = "regbench: error: hydra/launcher=stacked trains regbench runs; the task function "

    def _refused(self, case: Any, capsys, *args: Any, **kwargs: Any) -> None:
        with pytest.raises(SystemExit) as e:
            case(self, *args, **kwargs)
        assert e.value.code == 2
        err = capsys.readouterr().err
        assert err.count("\n") == 1 and err.startswith(self.REFUSED), err


def _refusing(name: str, suite: type):
    case = getattr(suite, name)

    def test(self, capsys, hydra_sweep_runner, launcher_name, overrides, tmpdir):
        self._refused(case, capsys, hydra_sweep_runner, launcher_name, overrides, tmpdir)

    test.__name__ = name
    return test


LAUNCHING = ["test_sweep_1_job", "test_sweep_2_jobs", "test_sweep_1_job_strict", "test_sweep_2_optimizers",
             "test_sweep_over_unspecified_mandatory_default", "test_sweep_and_override", "test_sweep_with_custom_resolver"]


@pytest.mark.parametrize("launcher_name, overrides", [("stacked", [SEARCH])])
class TestStackedLauncher(_RefusedAsForeign, LauncherTestSuite):
    locals().update({name: _refusing(name, LauncherTestSuite) for name in LAUNCHING})


@pytest.mark.parametrize("launcher_name, overrides", [("stacked", [SEARCH, *BATCHED])])
class TestStackedLauncherBatched(_RefusedAsForeign, BatchedSweeperTestSuite):
    test_sweep_2_jobs_2_batches = _refusing("test_sweep_2_jobs_2_batches", BatchedSweeperTestSuite)


def test_stacked_job_returns_as_hydra_s_suites_check_them(tmp_path, hydra_restore_singletons):
    """regbench's task on hydra/launcher=stacked, in Hydra's multirun as the suites drive it: one JobReturn per
    job, in job order, with its overrides, its config, Hydra's config of the job (name, id, num), the .hydra/
    record and the log file in its folder (hydra.runtime.output_dir: regbench does not chdir), and the real
    status and return value of a trained member (its best monitored value)."""
    import json
    import math

    from hydra._internal.hydra import Hydra
    from hydra._internal.utils import create_config_search_path
    from hydra.core.global_hydra import GlobalHydra
    from hydra.core.utils import JobStatus
    from omegaconf import OmegaConf

    from regbench.cli import app
    from regbench.config import CONFIG_DIR

    sweep = tmp_path / "sweep"
    overrides = ["hydra/launcher=stacked", "seed=0,1", *TINY, f"hydra.sweep.dir={sweep}"]
    try:
        hydra = Hydra.create_main_hydra2("regbench", create_config_search_path(str(CONFIG_DIR)))
        returns = hydra.multirun(config_name="train", task_function=app.__wrapped__, overrides=overrides)
    finally:
        GlobalHydra().clear()
    assert len(returns) == 1 and len(returns[0]) == 2
    for seed, ret in enumerate(returns[0]):
        assert ret.overrides[0] == f"seed={seed}" and len(ret.overrides) == 1 + len(TINY)  # as the sweeper spells them
        assert ret.cfg.seed == seed and "hydra" not in ret.cfg
        job = ret.hydra_cfg.hydra.job
        assert job.name == "regbench" and job.id == str(seed) and job.num == seed  # as the basic launcher sets them
        run_dir = Path(ret.hydra_cfg.hydra.runtime.output_dir)
        assert ret.task_name == "regbench" and (run_dir / f"{ret.task_name}.log").is_file()
        assert OmegaConf.load(run_dir / ".hydra" / "overrides.yaml") == OmegaConf.create(ret.overrides)
        assert (run_dir / ".hydra" / "config.yaml").is_file()
        outcome = json.loads((run_dir / "sweep_job.json").read_text())
        assert ret.status == JobStatus.COMPLETED and outcome["outcome"] == "ok" and outcome["stack"]["members"] == 2
        assert math.isfinite(ret.return_value) and ret.return_value == outcome["value"]
        assert run_dir.parent.parent == sweep
