"""One line for each way composing a config can fail: the key or file, what is wrong, how to fix it.

Hydra and OmegaConf raise long multi-line errors (with the config's defaults tree and a traceback hint); the
command prints ``regbench: error: <one line>`` instead, built here from the error's fields.
"""

from __future__ import annotations

import dataclasses
import difflib
import unicodedata
from typing import Optional

from regbench.config import CONFIG_DIR


def describe(e: BaseException) -> str:
    """One line for a Hydra / OmegaConf composition error: the key, what is wrong, how to fix it."""
    from hydra.errors import MissingConfigException, OverrideParseException
    from omegaconf.errors import ConfigAttributeError, ConfigKeyError, OmegaConfBaseException, ValidationError

    if isinstance(e, MissingConfigException) and e.missing_cfg_file and "/" in e.missing_cfg_file:
        group, _, name = e.missing_cfg_file.rpartition("/")
        options = list(e.options or []) or sorted(p.stem for p in (CONFIG_DIR / group).glob("*.yaml"))
        hint = difflib.get_close_matches(name, options, n=1)
        return (f"{group}={name}: no such option in config group '{group}'; available: {', '.join(options)}"
                + (f"; did you mean {group}={hint[0]}?" if hint else ""))
    if isinstance(e, OverrideParseException) and _unquoted_non_ascii(e.override):
        key, _, value = e.override.partition("=")
        return (f"{e.override}: unquoted non-ASCII character {_unquoted_non_ascii(e.override)!r} in the value; fix: "
                f"quote the value, e.g. \"{key}='{value}'\" (the outer quotes are for the shell)")
    if isinstance(e, OverrideParseException) and _non_ascii_key(e.override):
        key = e.override.partition("=")[0]
        ascii_key = unicodedata.normalize("NFKD", key).encode("ascii", "ignore").decode()
        return (f"{e.override}: non-ASCII character {_non_ascii_key(e.override)!r} in the key '{key}' (config keys are "
                f"ASCII names); fix: spell the key in ASCII, e.g. {ascii_key}=...")
    if isinstance(e, OverrideParseException):
        return f"cannot parse override: {first_line(e)}; see https://hydra.cc/docs/1.3/advanced/override_grammar/basic"
    if yaml_error(e):
        return yaml_error(e)
    cause = e
    while cause is not None and not isinstance(cause, OmegaConfBaseException):
        cause = cause.__cause__ or cause.__context__
    if isinstance(cause, (ConfigKeyError, ConfigAttributeError)) and getattr(cause, "full_key", None):
        return no_such_key(cause.full_key, getattr(cause, "object_type", None))
    if isinstance(cause, ValidationError) and getattr(cause, "full_key", None):
        return f"{cause.full_key}: {first_line(cause)}"
    if isinstance(cause, OmegaConfBaseException) and getattr(cause, "full_key", None):
        return f"{cause.full_key}: {first_line(cause)}"
    return first_line(e)


def _non_ascii_key(override: str) -> str:
    """The first non-ASCII character of an override's key (Hydra's keys are ASCII names), or ''."""
    return next((c for c in override.partition("=")[0] if ord(c) > 127), "") if "=" in override else ""


def _unquoted_non_ascii(override: str) -> str:
    """The first non-ASCII character of an unquoted value (Hydra's lexer accepts them only in quotes), or ''."""
    value = override.partition("=")[2]
    if value[:1] in ("'", '"'):
        return ""
    return next((c for c in value if ord(c) > 127), "")


def yaml_error(e: BaseException) -> str:
    """'<file>, line N: YAML syntax error ...' for a YAML error anywhere in ``e``'s chain, else ''."""
    import yaml

    cause: Optional[BaseException] = e
    while cause is not None and not isinstance(cause, yaml.MarkedYAMLError):
        cause = cause.__cause__ or cause.__context__
    if cause is None or cause.problem_mark is None:
        return ""
    mark, context = cause.problem_mark, cause.context_mark
    what = cause.problem or "invalid YAML"
    if cause.context and context is not None:
        what = f"{cause.context} (opened on line {context.line + 1}, column {context.column + 1}): {what}"
    return (f"{mark.name}, line {mark.line + 1}, column {mark.column + 1}: YAML syntax error: {what}; "
            "fix: correct the YAML in that file")


def no_such_key(key: str, object_type) -> str:
    """One line for a key no schema has (``object_type``: the dataclass of the node it was looked up in)."""
    parts = key.split(".")
    if parts[0] == "regularizer" and len(parts) >= 2 and schema_keys(object_type) == []:
        members = sorted(p.stem for p in (CONFIG_DIR / "regularizer").glob("*.yaml"))
        if parts[1] in members:
            return (f"{key}: {parts[1]} is not in the regularizer stack; add it first: "
                    f"regularizer=[{parts[1]}] (or append it to the list you already use)")
        hint = difflib.get_close_matches(parts[1], members, n=1)
        return (f"{key}: no regularizer named '{parts[1]}'; available: {', '.join(members)}"
                + (f"; did you mean {hint[0]}?" if hint else ""))
    leaf = key.rsplit(".", 1)[-1]
    known = schema_keys(object_type)
    hint = difflib.get_close_matches(leaf, known, n=1)
    msg = f"{key}: no such key"
    if known:
        msg += f" (valid keys here: {', '.join(known)})"
    if hint:
        msg += f"; did you mean {key.rsplit('.', 1)[0] + '.' if '.' in key else ''}{hint[0]}?"
    return msg


def schema_keys(object_type) -> list[str]:
    if object_type is not None and dataclasses.is_dataclass(object_type):
        return [f.name for f in dataclasses.fields(object_type)]
    return []


def first_line(e: BaseException) -> str:
    return (str(e).strip().splitlines() or [type(e).__name__])[0]
