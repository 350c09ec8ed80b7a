"""``regbench rerun|resume <run dir>``: a run folder's saved config, read as data and typed by the schemas.

A run folder is data, never code: only the keys of regbench's root schema are taken from its
``.hydra/config.yaml``, each group typed by the schema its option's registration names
(:func:`regbench.validation.schema_name`), and Hydra's settings come from regbench's own configs.
"""

from __future__ import annotations

import dataclasses
import json
import os
import re
from pathlib import Path
from typing import Optional

from omegaconf import DictConfig, OmegaConf

from regbench import provenance
from regbench.cli_errors import first_line, yaml_error
from regbench.errors import RegbenchError


def saved_config_dir(run_dir: Path) -> Path:
    """A config folder whose primary config ``rerun`` is the run's saved config, typed by regbench's schemas.

    ``<run>/.hydra/config.yaml`` holds the composed config. A run folder is data, not code: only the keys of
    regbench's root schema are taken from it (no ``hydra:`` node, no ``defaults``), each group is typed by its
    schema (so a key the schemas lack fails, and overrides are still checked), and nothing in it is pasted into
    the generated file unescaped. Hydra's settings come from regbench's own configs, never from the folder.
    """
    import atexit
    import shutil
    import tempfile

    saved = run_dir / ".hydra" / "config.yaml"
    if not saved.is_file():
        raise RegbenchError(f"{run_dir}: not a regbench run folder (no .hydra/config.yaml); fix: give the folder "
                            "printed as 'run dir:' by the run")
    try:
        cfg = OmegaConf.load(saved)
    except Exception as e:
        raise RegbenchError(yaml_error(e) or f"{saved}: cannot be read as a regbench config ({first_line(e)})"
                            ) from None
    defaults = ["train_schema", *_saved_schemas(cfg, saved), {"hydra": "default"}, "_self_"]
    if "trainer" in cfg and "fused" not in cfg.trainer:  # saved before trainer.fused: it ran torch's default
        cfg.trainer.fused = False  # implementation, so a rerun/resume computes what the run did, bitwise
    folder = Path(tempfile.mkdtemp(prefix="regbench-rerun-"))
    atexit.register(shutil.rmtree, folder, ignore_errors=True)
    # json.dumps: a folder name with a newline or a quote stays inside the comment.
    (folder / "rerun.yaml").write_text(
        f"# The saved config of {json.dumps(str(run_dir))}, typed by regbench's schemas.\n"
        + OmegaConf.to_yaml({"defaults": defaults}) + "\n" + OmegaConf.to_yaml(cfg))
    return folder


def _saved_schemas(cfg, saved: Path) -> list[str]:
    """The schema defaults that type a saved config; refuses any key regbench does not write itself."""
    from regbench.config import TrainConfig
    from regbench.validation import group_schemas, option_names, schema_name

    allowed = [f.name for f in dataclasses.fields(TrainConfig)]
    if not isinstance(cfg, DictConfig):
        raise RegbenchError(f"{saved}: not a regbench config (expected a mapping with keys {', '.join(allowed)})")
    for key in cfg:
        if key not in allowed:
            raise RegbenchError(
                f"{saved}: key '{key}' is not part of a regbench config (a run saves only {', '.join(allowed)}); "
                "refusing it: a run folder is data and may not configure Hydra or anything else; fix: delete the "
                "key from the file, or rerun a folder regbench wrote")
    schemas = []
    for group in option_names():
        node = cfg[group] if group in cfg else None
        name = node["name"] if isinstance(node, DictConfig) and "name" in node else group
        schema = schema_name(group, name) if isinstance(node, DictConfig) else None
        if schema is None:
            raise RegbenchError(f"{saved}: {group} is not a regbench {group} config (name {name!r}; expected one of "
                                f"{', '.join(option_names()[group])}); fix: rerun a folder regbench wrote")
        schemas.append(f"/schema/{group}/{schema}@{group}")
    members = cfg.regularizer if "regularizer" in cfg else {}  # runs saved before the stack existed
    known = group_schemas()["regularizer"]
    if not isinstance(members, (dict, DictConfig)) or any(m not in known for m in members):
        raise RegbenchError(f"{saved}: regularizer must map regbench's members ({', '.join(known)})"
                            " to their keys; fix: rerun a folder regbench wrote")
    return schemas + [f"/schema/regularizer/{m}@regularizer.{m}" for m in members]


def _hydra_quoted(value: str) -> str:
    """``value`` as a single-quoted Hydra override value that means exactly ``value`` (no sweep, no
    interpolation): quotes and the backslashes before them escaped, ``${`` escaped."""
    value = re.sub(r"(\\*)'", lambda m: m.group(1) * 2 + "\\'", value)
    value = re.sub(r"(\\+)$", lambda m: m.group(1) * 2, value)
    return "'" + value.replace("${", "\\${") + "'"


def _finished(run_dir: Path) -> bool:
    """``regbench resume`` of a finished run prints one line and exits 0: there is nothing left to do."""
    try:
        done = json.loads((run_dir / "summary.json").read_text())["status"] == "completed"  # the record decides
    except (OSError, ValueError, TypeError, KeyError):
        return False
    if done:
        print(f"regbench: {run_dir} is already finished (completed); nothing to resume")
    return done


def subcommand(argv: list[str]) -> Optional[list[str]]:
    """``rerun <run> [overrides]`` / ``resume <run> [overrides]`` -> plain Hydra arguments (None: nothing to do)."""
    verb, rest = argv[0], argv[1:]
    # a run folder of a sweep has "=" in its name (seed=0): an existing path is a run folder, not an override
    if not rest or ("=" in rest[0] and not Path(rest[0]).expanduser().exists()):
        raise RegbenchError(f"usage: regbench {verb} <run dir> [overrides...]")
    run_dir = Path(rest[0]).expanduser().resolve()
    if verb == "resume" and _finished(run_dir):
        return None
    provenance.set_origin(verb, run_dir, ["regbench", *argv])
    args = ["--config-dir", str(saved_config_dir(run_dir)), "--config-name", "rerun", *rest[1:]]
    if verb == "resume":
        args += [f"hydra.run.dir={_hydra_quoted(str(run_dir))}", "trainer.resume=true"]
    return args


# Keys that hold a path: an unquoted leading ~ there is expanded (Hydra's lexer refuses it, and shells leave
# it alone after "key=" because a dotted key is no shell variable).
_HOME_PATH = re.compile(r"^([+~]{0,2}(?:data\.root|regularizer\.transfer\.init_from|hydra\.(?:run|sweep)\.dir))"
                        r"=(~[^,'\"\[\]{}()]*)$")


def expand_home(arg: str) -> str:
    """``data.root=~/datasets`` -> ``data.root='/home/me/datasets'`` (other arguments unchanged)."""
    m = _HOME_PATH.match(arg)
    return f"{m.group(1)}={_hydra_quoted(os.path.expanduser(m.group(2)))}" if m else arg
