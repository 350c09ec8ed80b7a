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
from regbench.config import TrainConfig
from regbench.errors import RegbenchError
from regbench.io import FolderFileError, load_folder_yaml
from regbench.records import Summary
from regbench.sweep import keeps_record
from regbench.validation import group_schemas, option_names, schema_name


def record_subdir() -> Optional[str]:
    """``hydra.output_subdir`` (configs/hydra/default.yaml, resolver ``rb_record_subdir``): ``.hydra``, or None —
    Hydra then writes no record — for a folder whose run is resumed or skipped (regbench.sweep.keeps_record): a
    saved record is never rewritten, whatever a bookkeeping key says now."""
    from hydra.core.hydra_config import HydraConfig


    try:
        folder = Path(HydraConfig.get().runtime.output_dir)
    except Exception:  # noqa: BLE001 - not inside a job (e.g. --cfg hydra --resolve): Hydra's default
        return ".hydra"
    return None if keeps_record(folder) else ".hydra"


OmegaConf.register_new_resolver("rb_record_subdir", record_subdir, replace=True)


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
    if not os.path.lexists(saved):
        raise RegbenchError(f"{run_dir}: not a regbench run folder (no .hydra/config.yaml); fix: give the folder "
                            "printed as 'run dir:' by the run")
    data = load_folder_yaml(saved, "the run's saved config", root=run_dir)
    refuse_interpolations(data, saved)
    try:
        cfg = OmegaConf.create(data)
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


_REFERENCE = re.compile(r"\$\{([A-Za-z_][A-Za-z0-9_]*)\}")


def refuse_interpolations(data, saved: Path) -> None:
    """A saved config is read as data: an interpolation in it (``${oc.env:VAR}`` would copy the re-running user's
    environment into the new run; a resolver, a self-reference, a string with ``${`` inside) is refused with one
    line naming the key and the file. Accepted are only those regbench's own configs write (Hydra saves the
    composed config unresolved): a default of regbench's schemas at its own key, exactly as the schema has it
    (``data.root: ${oc.env:REGBENCH_DATA,data}``, the download switches: bookkeeping keys, read from the
    environment as a new run reads them), and a value that is exactly ``${<root key>}`` naming a root key that
    holds a plain string or number (``regularizer.batchnorm.convention: ${convention}``), evaluated by no
    resolver and unable to refer to itself."""
    root = data if isinstance(data, dict) else {}
    written = _schema_interpolations()

    def walk(node, key: str) -> None:
        items = node.items() if isinstance(node, dict) else enumerate(node) if isinstance(node, list) else ()
        for k, v in items:
            dotted = f"{key}.{k}" if key else str(k)
            if "${" in str(k):
                _refused(saved, dotted, k)
            if isinstance(v, str) and "${" in v and (dotted, v) not in written:
                m = _REFERENCE.fullmatch(v)
                target = root.get(m.group(1)) if m else None
                if target is None or isinstance(target, (dict, list, bool)) or "${" in str(target):
                    _refused(saved, dotted, v)
            walk(v, dotted)

    walk(data, "")


def _schema_interpolations() -> set[tuple[str, str]]:
    """(key, value) of every default of regbench's schemas that is an interpolation, at its key in a config."""

    out = set()
    for group, schemas in group_schemas().items():
        for name, schema in schemas.items():
            prefix = f"regularizer.{name}" if group == "regularizer" else group
            out.update((f"{prefix}.{f.name}", f.default) for f in dataclasses.fields(schema)
                       if isinstance(f.default, str) and "${" in f.default)
    return out


def _refused(saved: Path, key: str, value) -> None:
    text = repr(value) if len(repr(value)) <= 60 else repr(value)[:57] + "..."
    raise RegbenchError(f"{saved}: {key}: {text} is an interpolation; a saved config holds resolved values, and "
                        "regbench evaluates nothing from a run folder (no ${oc.env:...}, no resolvers, no references "
                        "but a root key's plain value); fix: replace it with the value itself, or rerun a folder "
                        "regbench wrote")


def _saved_schemas(cfg, saved: Path) -> list[str]:
    """The schema defaults that type a saved config; refuses any key regbench does not write itself."""

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
        done = Summary.load(run_dir / "summary.json").status == "completed"  # the record decides
    except FolderFileError:
        raise  # a link, a FIFO, a huge file: one line
    except (OSError, ValueError):
        return False  # no summary yet, or a malformed one: the resume itself says what it finds
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
    if not run_dir.is_dir():
        what = "no such folder" if not os.path.lexists(run_dir) else "not a folder"
        raise RegbenchError(f"{run_dir}: {what}; fix: give the run folder printed as 'run dir:' by the run "
                            f"(regbench {verb} <run dir>)")
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
