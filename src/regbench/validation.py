"""Every schema in Hydra's ConfigStore, and the validation of a composed config: a loop over the tables.

Each YAML file names its schema in its defaults list (``- /schema/<group>/<name>@_here_``), so a typo'd key
or a wrong type fails when the config is composed; :func:`validate` then runs each group's range checks
(each beside its schema: the option's registration in :mod:`regbench.registry`, the trainer's and
augmentation's in :mod:`regbench.config`, each regularizer member's on its class). The CLI learns from
:func:`group_schemas` / :func:`schema_name` which schemas type a saved config.
"""

from __future__ import annotations

import math
from typing import Optional

from hydra.core.config_store import ConfigStore
from omegaconf import DictConfig, OmegaConf

# Every module that registers options (datasets, model families, optimizers and schedules, regularizer members),
# imported here, above them and the registry: the tables are complete wherever a config is validated.
import regbench.models  # noqa: F401
import regbench.optim  # noqa: F401
from regbench import config, registry
from regbench.augment import build_policy
from regbench.datasets import DATASETS
from regbench.errors import ConfigError
from regbench.regularizers import REGISTRY, Context, build_stack

# The groups that are one dataclass, not a table of options: group -> its one entry (ConfigStore name, schema,
# check), checked after the tables' options.
FIXED: dict[str, registry.Entry] = {
    "trainer": registry.Entry("trainer", config.TrainerConfig, None, config.check_trainer),
    "augmentation": registry.Entry("policy", config.AugmentationConfig, None, config.check_augmentation),
}


def group_schemas() -> dict[str, dict[str, type]]:
    """group -> ConfigStore name -> schema: the tables' options, the fixed groups, the regularizer members."""

    schemas = {group: table.schemas() for group, table in registry.GROUPS.items()}
    schemas.update({group: {entry.name: entry.schema} for group, entry in FIXED.items()})
    schemas["regularizer"] = {name: cls.schema for name, cls in REGISTRY.items()}
    return schemas


def register_configs() -> None:
    """Store every schema under ``schema/<group>/<name>`` and the root schema as ``train_schema``."""
    cs = ConfigStore.instance()
    cs.store(name="train_schema", node=config.TrainConfig)
    for group, schemas in group_schemas().items():
        for name, node in schemas.items():
            cs.store(group=f"schema/{group}", name=name, node=node)


def option_names() -> dict[str, list[str]]:
    """group -> the ``name`` values its node may have, for every group typed by one schema per node (the tables'
    options, then the fixed groups), in the root schema's order."""
    names = {group: table.names() for group, table in registry.GROUPS.items()}
    names.update({group: [entry.name] for group, entry in FIXED.items()})
    return names


def schema_name(group: str, option: object) -> Optional[str]:
    """The ConfigStore name that types a ``group`` node whose ``name`` is ``option`` (None: no such option).
    ``group`` is one of :func:`option_names`; a fixed group's node may have any name (augmentation's is free)."""
    if group in FIXED:
        return FIXED[group].schema_name
    table = registry.GROUPS[group]
    return table[option].schema_name if isinstance(option, str) and option in table else None


def validate(cfg: DictConfig) -> None:
    """Check value ranges the schemas cannot express. Raises ConfigError naming the first bad key."""
    config.check_root(cfg)
    for group, table in registry.GROUPS.items():
        table.check(cfg[group], cfg)
    for group, entry in FIXED.items():
        entry.check(cfg[group], cfg)

    build_policy(cfg.augmentation, DATASETS[cfg.data.name])  # every op checks its own keys


    build_stack(cfg, Context(cfg))  # each member checks its own keys and whether it fits the model/optimizer
    _refuse_non_finite(OmegaConf.to_container(cfg, resolve=False))


def _refuse_non_finite(node: object, prefix: str = "") -> None:
    """No key of regbench's takes an infinite or NaN number (a strength, a rate, a bound): each group's range
    checks above name their own keys first; this catches what a ``>= 0`` rule lets through (``inf >= 0``).
    ``node`` is the config as plain containers (interpolations unresolved: they are strings here)."""
    items = node.items() if isinstance(node, dict) else enumerate(node) if isinstance(node, list) else ()
    for key, value in items:
        name = f"{prefix}[{key}]" if isinstance(node, list) else f"{prefix}.{key}" if prefix else str(key)
        if isinstance(value, float) and not math.isfinite(value):
            raise ConfigError(name, value, "a finite number", f"set {name} to a finite value")
        _refuse_non_finite(value, name)
