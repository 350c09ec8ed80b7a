"""What regbench checks of a search (an Optuna sweep, ``hydra/sweeper=search`` or Hydra's ``optuna``) before it
starts; the sweeper itself is hydra_plugins/regbench_search/search_sweeper.py. No optuna import here: the pre-check
of every sweep asks it."""

from __future__ import annotations

from typing import Any, Optional

from omegaconf import OmegaConf

from regbench.records import MONITOR_SIGN


def direction_problem(cfg: Any) -> Optional[str]:
    """The one line for an Optuna sweep whose direction disagrees with what its jobs return (regbench's monitored
    best value: val_loss is better lower, val_acc higher), or None."""
    target = str(OmegaConf.select(cfg, "hydra.sweeper._target_", default=""))
    if not target.endswith(("OptunaSweeper", "SearchSweeper")):
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
