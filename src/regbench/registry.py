"""Name -> entry tables for the config groups whose options are alternatives (model, optimizer, scheduler, data).

Each option registers itself beside its code, timm-style::

    @MODELS.register("resnet", schema=ResNetConfig, check=_check)
    def build_resnet(cfg, input_shape, num_classes, slots): ...

``schema`` is the option's typed dataclass (stored in Hydra's ConfigStore as ``schema/<group>/<name>``, so a
typo'd key fails at composition); ``check(node, cfg)`` holds the range checks the schema cannot express and
raises :class:`~regbench.errors.ConfigError` naming the key (``node`` is the group's node, ``cfg`` the whole
config for cross-group rules); ``obj`` is what the option builds from (a builder function, a class, a dataset
description). Validation, the CLI and the tests loop over these tables instead of naming options by hand.

This module imports nothing of regbench but the error type, so any module may register into it;
:func:`load_all` imports the modules that register (the only list of them).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable, Iterator, Optional

from regbench.errors import ConfigError

Check = Callable[[Any, Any], None]


@dataclass(frozen=True)
class Entry:
    name: str
    schema: type
    obj: Any
    check: Optional[Check] = None


class Registry:
    """The options of one config group (``group`` is the key users write, e.g. ``model``)."""

    def __init__(self, group: str):
        self.group = group
        self._entries: dict[str, Entry] = {}

    def register(self, name: str, *, schema: type, check: Optional[Check] = None) -> Callable[[Any], Any]:
        """Decorator: register the decorated builder/class under ``name``; returns it unchanged."""

        def add(obj: Any) -> Any:
            self.add(name, schema=schema, obj=obj, check=check)
            return obj

        return add

    def add(self, name: str, *, schema: type, obj: Any, check: Optional[Check] = None) -> None:
        if name in self._entries:
            raise ValueError(f"{self.group} option {name!r} is registered twice")  # a programming error
        self._entries[name] = Entry(name, schema, obj, check)

    def __contains__(self, name: object) -> bool:
        return name in self._entries

    def __iter__(self) -> Iterator[str]:
        return iter(self._entries)

    def __len__(self) -> int:
        return len(self._entries)

    def names(self) -> list[str]:
        return list(self._entries)

    def entries(self) -> list[Entry]:
        return list(self._entries.values())

    def __getitem__(self, name: str) -> Entry:
        """The entry of ``name``; an unknown name is a user's mistake, named with the choices."""
        if name not in self._entries:
            raise ConfigError(f"{self.group}.name", name, "one of " + ", ".join(self._entries),
                              f"pick one with {self.group}=<name>")
        return self._entries[name]

    def check(self, node: Any, cfg: Any) -> None:
        """Run the range checks of the option ``node.name`` (its schema checked the keys and types already)."""
        entry = self[node.name]
        if entry.check is not None:
            entry.check(node, cfg)


MODELS = Registry("model")
OPTIMIZERS = Registry("optimizer")
SCHEDULERS = Registry("scheduler")
DATASETS = Registry("data")


def load_all() -> None:
    """Import every module that registers options (model families, optimizers, schedules, datasets,
    regularizer members), so the tables are complete. Cheap after the first call."""
    import regbench.data  # noqa: F401
    import regbench.models  # noqa: F401
    import regbench.optim  # noqa: F401
    import regbench.regularizers  # noqa: F401
