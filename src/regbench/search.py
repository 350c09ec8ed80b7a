"""What regbench checks of a search (an Optuna sweep, ``hydra/sweeper=search`` or Hydra's ``optuna``) before it
starts; the sweeper itself is hydra_plugins/regbench_search/search_sweeper.py. No optuna import here: the pre-check
of every sweep asks it."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Optional, Sequence

from omegaconf import OmegaConf

from regbench.records import MONITOR_SIGN


SIGNATURE = "regbench_search"  # the study's user attribute: the command that started it (signature below)


def _target(cfg: Any) -> str:
    return str(OmegaConf.select(cfg, "hydra.sweeper._target_", default=""))


def search_problem(cfg: Any, overrides: Sequence[str]) -> Optional[str]:
    """The one line for an Optuna sweep (``hydra/sweeper=search`` or Hydra's ``optuna``) that cannot run as asked,
    or None: its direction, its trial counts, and (``search``) a study in the sweep folder that another command
    started. ``cfg``: the sweep's first job (with its hydra node); ``overrides``: the command line."""
    if not _target(cfg).endswith(("OptunaSweeper", "SearchSweeper")):
        return None
    for key in ("n_trials", "n_jobs"):
        value = OmegaConf.select(cfg, f"hydra.sweeper.{key}")
        if not isinstance(value, int) or isinstance(value, bool) or value < 1:
            what = "trials the study ends with" if key == "n_trials" else "trials per batch"
            return (f"hydra.sweeper.{key}={value}: expected a whole number >= 1 ({what}); "
                    f"fix: hydra.sweeper.{key}={2 if key == 'n_jobs' else 20}")
    return direction_problem(cfg) or stored_study_problem(cfg, overrides)


def signature(task_overrides: Sequence[str], params: Any) -> str:
    """What a search was started with: the task's overrides (sorted) and the search space of hydra.sweeper.params
    (``n_trials``, ``n_jobs``, the sampler and the launcher may change when it continues)."""
    params = OmegaConf.to_container(params, resolve=False) if OmegaConf.is_config(params) else (params or {})
    return json.dumps({"overrides": sorted(task_overrides), "params": params}, sort_keys=True, default=str)


def task_overrides(overrides: Sequence[str]) -> list[str]:
    """The command line's overrides of the task (Hydra's own, hydra.* and hydra/..., left out), as the sweeper
    receives them."""
    return [o for o in overrides if not o.lstrip("+~").startswith(("hydra.", "hydra/"))]


def stored_study_problem(cfg: Any, overrides: Sequence[str]) -> Optional[str]:
    """``hydra/sweeper=search`` continuing a study in the sweep folder that another command started (other fixed
    overrides or another search space): its finished trials would be counted for a search they are not part of."""
    storage = str(OmegaConf.select(cfg, "hydra.sweeper.storage", default="") or "")
    if not _target(cfg).endswith("SearchSweeper") or not storage.startswith("sqlite:///"):
        return None
    if not Path(storage[len("sqlite:///"):]).is_file():
        return None
    optuna = quiet_optuna()  # only here: a search continuing in this folder
    try:
        study = optuna.load_study(study_name=cfg.hydra.sweeper.study_name, storage=storage)
    except KeyError:
        return None
    started = study.user_attrs.get(SIGNATURE)
    now = signature(task_overrides(overrides), cfg.hydra.sweeper.params)
    if started is None or started == now:
        return None
    was = json.loads(started)
    return (f"hydra.sweep.dir={cfg.hydra.sweep.dir}: its search ({len(study.trials)} trials) was started by another "
            f"command (overrides {' '.join(was['overrides']) or '(none)'}; search space {was['params'] or '(none)'}), "
            "whose trials would be counted for this one; fix: the same command to continue it, or another "
            "hydra.sweep.dir for a new search")


def quiet_optuna():
    """optuna, imported with its INFO chatter off: alembic (its RDB storage's migrations) logs a "setup plugin"
    line per plugin when it is imported, and optuna one per study it creates or loads."""
    import logging

    logging.getLogger("alembic").setLevel(logging.WARNING)
    import optuna

    optuna.logging.set_verbosity(optuna.logging.WARNING)
    return optuna


def direction_problem(cfg: Any) -> Optional[str]:
    """The one line for an Optuna sweep whose direction disagrees with what its jobs return (regbench's monitored
    best value: val_loss is better lower, val_acc higher), or None."""
    if not _target(cfg).endswith(("OptunaSweeper", "SearchSweeper")):
        return None
    monitor = OmegaConf.select(cfg, "trainer.monitor", default="val_loss")
    direction = OmegaConf.select(cfg, "hydra.sweeper.direction", default="minimize")
    if OmegaConf.is_list(direction):  # a multi-objective study, which regbench's jobs cannot answer
        return (f"hydra.sweeper.direction={[getattr(d, 'name', d) for d in direction]}: regbench's jobs return one "
                "value (the best trainer.monitor); fix: one direction, minimize or maximize")
    direction = str(getattr(direction, "name", direction)).lower()  # (the plugin's schema types it as an Enum)
    want = "minimize" if MONITOR_SIGN.get(monitor, 1.0) > 0 else "maximize"
    if direction != want:
        return (f"hydra.sweeper.direction={direction}: the jobs return the best trainer.monitor={monitor}, which is "
                f"better {'lower' if want == 'minimize' else 'higher'}; fix: hydra.sweeper.direction={want}")
    return None
