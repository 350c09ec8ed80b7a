"""Name -> entry tables for the config groups whose options are alternatives (model, optimizer, scheduler, data).

Each option registers itself beside its code, timm-style::

    @MODELS.register("resnet", schema=ResNetConfig, check=_check)
    def build_resnet(cfg, input_shape, num_classes, slots): ...

``schema`` is the option's typed dataclass (stored in Hydra's ConfigStore as ``schema/<group>/<schema_name>``,
``schema_name`` defaulting to the option's name, so a typo'd key fails at composition; options that share one
schema share its name: ``adamw`` extends ``schema/optimizer/adam``, every torchvision dataset
``schema/data/torchvision``); ``check(node, cfg)`` holds the range checks the schema cannot express and
raises :class:`~regbench.errors.ConfigError` naming the key (``node`` is the group's node, ``cfg`` the whole
config for cross-group rules); ``obj`` is what the option builds from (a builder function, a class, a dataset
description). Validation, the CLI and the tests loop over these tables instead of naming options by hand.

This module imports nothing of regbench but the error type, so any module may register into it;
:mod:`regbench.validation` (above every module that registers) imports them: the only list of them.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any, Callable, Iterator, Mapping, Optional

from omegaconf import OmegaConf

from regbench.errors import ConfigError

Check = Callable[[Any, Any], None]


@dataclass(frozen=True)
class Entry:
    name: str
    schema: type
    obj: Any
    check: Optional[Check] = None
    schema_name: str = ""  # the ConfigStore name its YAML extends (``schema/<group>/<schema_name>``); "" = name

    def __post_init__(self) -> None:
        if not self.schema_name:
            object.__setattr__(self, "schema_name", self.name)


class Registry:
    """The options of one config group (``group`` is the key users write, e.g. ``model``)."""

    def __init__(self, group: str):
        self.group = group
        self._entries: dict[str, Entry] = {}

    def register(self, name: str, *, schema: type, check: Optional[Check] = None,
                 schema_name: str = "") -> Callable[[Any], Any]:
        """Decorator: register the decorated builder/class under ``name``; returns it unchanged."""

        def add(obj: Any) -> Any:
            self.add(name, schema=schema, obj=obj, check=check, schema_name=schema_name)
            return obj

        return add

    def add(self, name: str, *, schema: type, obj: Any, check: Optional[Check] = None,
            schema_name: str = "") -> None:
        """Register ``obj`` (a builder, a class, a description) under ``name``."""
        entry = Entry(name, schema, obj, check, schema_name)
        if name in self._entries:
            raise ValueError(f"{self.group} option {name!r} is registered twice")  # a programming error
        shared = self.schemas().get(entry.schema_name)
        if shared is not None and shared is not schema:  # one ConfigStore name, one dataclass
            raise ValueError(f"{self.group} schema {entry.schema_name!r} names two dataclasses")
        self._entries[name] = entry

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

    def schemas(self) -> dict[str, type]:
        """ConfigStore name -> schema dataclass, each once (options may share a schema)."""
        return {e.schema_name: e.schema for e in self._entries.values()}

    def objects(self) -> Mapping[str, Any]:
        """A read-only live view ``name -> obj`` (e.g. ``data.DATASETS[name]`` is the DatasetInfo)."""
        return _Objects(self)

    def __getitem__(self, name: str) -> Entry:
        """The entry of ``name``; an unknown name is a user's mistake, named with the choices."""
        if name not in self._entries:
            raise ConfigError(f"{self.group}.name", name, "one of " + ", ".join(self._entries),
                              f"pick one with {self.group}=<name>")
        return self._entries[name]

    def check(self, node: Any, cfg: Any) -> None:
        """Run the range checks of the option ``node.name`` (its schema checked the keys and types already)."""
        entry = self[node.name]
        typed = OmegaConf.get_type(node)
        if dataclasses.is_dataclass(typed) and typed is not entry.schema:  # ``optimizer.name=adam`` on sgd's keys
            same = [e.name for e in self._entries.values() if e.schema is typed]
            raise ConfigError(f"{self.group}.name", node.name, f"{' or '.join(same)} (the options whose keys this "
                              f"{self.group} node has)", f"pick the option itself with {self.group}=<option>")
        if entry.check is not None:
            entry.check(node, cfg)


class _Objects(Mapping):
    def __init__(self, registry: Registry):
        self._registry = registry

    def __getitem__(self, name: str) -> Any:
        if name not in self._registry:
            raise KeyError(name)  # a Mapping's contract (``in``, ``get``); Registry[name] names the choices
        return self._registry[name].obj

    def __iter__(self) -> Iterator[str]:
        return iter(self._registry)

    def __len__(self) -> int:
        return len(self._registry)


MODELS = Registry("model")
OPTIMIZERS = Registry("optimizer")
SCHEDULERS = Registry("scheduler")
DATASETS = Registry("data")

# The config groups whose options are tables, in the order validation checks them (the first bad key wins).
GROUPS: dict[str, Registry] = {r.group: r for r in (DATASETS, MODELS, OPTIMIZERS, SCHEDULERS)}
