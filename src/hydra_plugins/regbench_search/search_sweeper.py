"""``hydra/sweeper=search``: Hydra's Optuna sweeper (hydra-optuna-sweeper), made resumable for regbench sweeps.

Hydra's plugin asks Optuna for ``n_jobs`` trials at a time, hands them to the launcher as one batch (with
``hydra/launcher=stacked`` the batch trains as one stack) and tells Optuna each job's return value (regbench's
monitored best value). What regbench adds (configs/hydra/sweeper/search.yaml):

- the study lives in the sweep folder (``storage: sqlite:///<hydra.sweep.dir>/search.db``), so the same command run
  again continues it: ``n_trials`` counts the trials the study has *finished*, not the ones this process starts
  (Hydra's plugin would start ``n_trials`` more each time);
- a trial a kill left RUNNING in the storage is marked failed and its parameters are asked again first
  (``enqueue_trial``): the new trial names the same run folder, so regbench resumes that run from its last
  checkpoint instead of training it from scratch (the basic sweeper's rerun does the same for its jobs);
- the direction must agree with ``trainer.monitor`` (val_loss: minimize, val_acc: maximize): one line otherwise.
"""

from __future__ import annotations

import logging
import os
import warnings
from typing import Any, List

from hydra_plugins.hydra_optuna_sweeper.optuna_sweeper import OptunaSweeper
from regbench.errors import RegbenchError
from regbench.search import SIGNATURE, quiet_optuna, search_problem, signature

log = logging.getLogger(__name__)
# optuna 2.10 (what hydra-optuna-sweeper allows) uses SQLAlchemy 1.4 APIs that 2.0 removed (pinned below 2 in
# pyproject.toml); its one-time "MovedIn20Warning" banner says nothing a regbench user can act on.
os.environ.setdefault("SQLALCHEMY_SILENCE_UBER_WARNING", "1")
# Hydra's OptunaSweeper imports optuna (and alembic, which logs a "setup plugin" line per plugin) when it is built,
# before sweep() runs: quiet from here (regbench.search.quiet_optuna says why).
logging.getLogger("alembic").setLevel(logging.WARNING)


class SearchSweeper(OptunaSweeper):
    """Hydra's OptunaSweeper whose ``n_trials`` is the study's total of finished trials (see the module)."""

    def sweep(self, arguments: List[str]) -> None:
        optuna = quiet_optuna()
        impl = self.sweeper
        problem = search_problem(impl.config, arguments)  # the pre-check said it already (regbench.cli_check)
        if problem:
            raise RegbenchError(problem)
        if impl.storage:
            study = _existing_study(impl.storage, impl.study_name)
            if study is None:  # a new search: remember the command that started it (search_problem compares)
                study = optuna.create_study(study_name=impl.study_name, storage=impl.storage,
                                            direction=str(getattr(impl.direction, "name", impl.direction)))
                study.set_user_attr(SIGNATURE, signature(arguments, impl.config.hydra.sweeper.params))
            finished = [t for t in study.trials if t.state == optuna.trial.TrialState.COMPLETE]
            stale = [t for t in study.trials if t.state == optuna.trial.TrialState.RUNNING]
            for t in stale:  # killed with the process that ran it: failed, and asked again (same folder)
                study.tell(t.number, state=optuna.trial.TrialState.FAIL)
                with warnings.catch_warnings():  # enqueue_trial is "experimental" in optuna 2.10
                    warnings.simplefilter("ignore")
                    study.enqueue_trial(_plain(t.params))
            if study.trials:
                left = max(0, impl.n_trials - len(finished))
                log.info("search %s: %d of %d trials finished%s; %d to go", impl.study_name, len(finished),
                         impl.n_trials, f", {len(stale)} interrupted (asked again)" if stale else "", left)
                impl.n_trials = left
                if left == 0:
                    _log_best(study)
                    return None
        return super().sweep(arguments)


def _existing_study(storage: Any, name: str):
    import optuna

    try:
        return optuna.load_study(study_name=name, storage=storage)
    except KeyError:  # no such study in the storage yet: a new search
        return None


def _plain(params: dict) -> dict:
    return {k: (v.item() if hasattr(v, "item") else v) for k, v in params.items()}


def _log_best(study) -> None:
    best = study.best_trial
    log.info("Best parameters: %s", best.params)
    log.info("Best value: %s", best.value)
