"""The ``regbench`` command: a thin Hydra app around :func:`regbench.train.fit`.

Before Hydra starts, the command line is composed once per swept value and validated, so a typo'd key, a
wrong type, an unknown option or an out-of-range value fails with one line (exit status 2) before any run
folder is written or any job of a sweep is launched.
"""

from __future__ import annotations

import contextlib
import dataclasses
import difflib
import json
import os
import re
import sys
from pathlib import Path
from typing import Optional, Sequence

import hydra
from hydra.core.hydra_config import HydraConfig
from omegaconf import DictConfig, OmegaConf

from regbench import provenance
from regbench.config import register_configs
from regbench.errors import RegbenchError

CONFIG_DIR = Path(__file__).resolve().parent / "configs"
CONFIG_NAME = "train"

register_configs()
# Sweep sub-folders are named after the overrides that differ between the sweep's jobs (seed excluded, so the
# seeds of one configuration sit side by side below it; see regbench.sweep.naming), the stack in its fixed
# order; a sweep that varies nothing else gets "default".


def _run_name(name: str) -> str:
    from regbench.sweep import canonical_name

    return canonical_name(name)


OmegaConf.register_new_resolver("rb_run_name", _run_name, replace=True)


def _hide_schema_groups_in_help() -> None:
    """``--help`` lists every config group, including nested ones users never pick: the typed schemas the YAML
    options extend (``schema/<group>/<name>``) and the files a convention selects per model and optimizer
    (``convention/model``, ``convention/optimizer``). Hydra 1.3 has no setting to hide a group, so its group listing
    is wrapped to drop them (and left alone if Hydra's internals change: the help then shows them again)."""
    from hydra._internal.hydra import Hydra

    original = getattr(Hydra, "format_config_groups", None)
    if original is None or getattr(original, "_regbench", False):
        return

    def format_config_groups(self, predicate, *args, **kwargs):
        return original(self, lambda g: predicate(g) and "/" not in g, *args, **kwargs)

    format_config_groups._regbench = True  # type: ignore[attr-defined]
    Hydra.format_config_groups = format_config_groups  # type: ignore[method-assign]


_hide_schema_groups_in_help()


@hydra.main(config_path=str(CONFIG_DIR), config_name=CONFIG_NAME, version_base="1.3")
def app(cfg: DictConfig) -> float:
    from hydra.types import RunMode

    from regbench.train import fit  # lazy: keeps `regbench --help` fast

    hc = HydraConfig.get()
    run_dir = Path(hc.runtime.output_dir)
    if hc.mode == RunMode.MULTIRUN:
        from regbench.sweep import run_job

        return run_job(cfg, run_dir, fit, _threads_per_job(hc))
    try:
        value = fit(cfg, run_dir)
    except RegbenchError as e:
        fail(e)
    print(f"run dir: {run_dir.resolve()}")
    print(f"view it: {tensorboard_command()} --logdir {run_dir.resolve()}")
    return value


def tensorboard_command() -> str:
    """``tensorboard`` when that runs it from the user's shell; else the path next to this Python (a venv that
    is not activated, as after `make run`), so the printed hint runs as printed."""
    import shlex
    import shutil

    beside = Path(sys.executable).parent / "tensorboard"
    found = shutil.which("tensorboard")
    if found and (not beside.exists() or Path(found).resolve() == beside.resolve()):
        return "tensorboard"
    if beside.exists():
        return shlex.quote(str(beside))
    return f"{shlex.quote(sys.executable)} -m tensorboard.main"


def _threads_per_job(hc) -> Optional[int]:
    """Torch threads for one job of a parallel sweep, so jobs together use the cores once (not n times)."""
    from regbench.train import default_num_threads

    launcher = hc.launcher
    if "cpus_per_task" in launcher and launcher.cpus_per_task:
        return int(launcher.cpus_per_task)
    if "n_jobs" in launcher and launcher.n_jobs:
        cores = default_num_threads()
        n = cores if launcher.n_jobs < 0 else min(int(launcher.n_jobs), cores)
        return max(1, cores // n)
    return None


def fail(e: BaseException, code: int = 2) -> None:
    print(f"regbench: error: {e}", file=sys.stderr)
    sys.exit(code)


# ---------------------------------------------------------------------------------------- precheck


def _jobs(overrides: Sequence[str], multirun: bool) -> list[list[str]]:
    """The override lists to check: the first job, plus one job per further value of each swept key."""
    from hydra.core.override_parser.overrides_parser import OverridesParser

    parsed = OverridesParser.create().parse_overrides(list(overrides))
    choices: list[list[str]] = []
    for o in parsed:
        key = o.get_key_element()
        if o.is_sweep_override():
            if not multirun:
                raise RegbenchError(f"{o.input_line}: a sweep (several values) needs multirun; fix: add -m")
            values = list(o.sweep_string_iterator()) if o.is_discrete_sweep() else []
            choices.append([f"{key}={v}" for v in values] or [o.input_line])
        else:
            choices.append([o.input_line])
    first = [c[0] for c in choices]
    jobs = [first]
    for i, c in enumerate(choices):
        for alt in c[1:]:
            jobs.append(first[:i] + [alt] + first[i + 1:])
    return jobs


def check(overrides: Sequence[str], multirun: bool = False, config_dir: Optional[str] = None,
          config_name: str = CONFIG_NAME, runs: bool = True) -> list[DictConfig]:
    """Compose and validate every job the command line describes. Raises RegbenchError with one line.
    ``runs``: the command will train (a sweep's folders and data are checked too). The run or sweep folder
    itself is claimed apart, by :func:`claim_folder`, just before Hydra starts."""
    from hydra import compose

    from regbench.config import validate

    cfgs = []
    try:
        jobs = _jobs(overrides, multirun)
    except RegbenchError:
        raise
    except Exception as e:
        raise RegbenchError(describe(e)) from None
    with _config_search(config_dir):
        if multirun:  # a named study's hydra.sweeper.params sweep too (the command line wins for a key)
            try:
                base = compose(config_name=config_name, overrides=jobs[0], return_hydra_config=True)
                params = _sweep_params(base)
                given = {o.split("=", 1)[0].lstrip("+~") for o in overrides}
                extra = [f"{k}={v}" for k, v in params.items() if k not in given]
                if extra:
                    jobs = _jobs([*extra, *overrides], multirun)
            except Exception as e:
                raise RegbenchError(describe(e)) from None
        for job in jobs:
            try:
                cfg = compose(config_name=config_name, overrides=job, return_hydra_config=True)
            except Exception as e:
                raise RegbenchError(describe(e)) from None
            _refuse_added_keys(job, cfg)
            validate(OmegaConf.masked_copy(cfg, [k for k in cfg if k != "hydra"]))  # what the task sees
            cfgs.append(cfg)
    if multirun and runs and cfgs:
        _check_sweep(overrides, cfgs)
    if runs and multirun and cfgs:  # before a job array no node can run is submitted (it would pend forever)
        from regbench.slurm import check_launcher

        check_launcher(cfgs[0].hydra.launcher)
    return cfgs


def _sweep_params(cfg: DictConfig) -> dict:
    """A named study's ``hydra.sweeper.params`` (Hydra's basic sweeper: null where no study sets any)."""
    return dict(cfg.hydra.sweeper.params or {})


SUBDIR = "${rb_run_name:${hydra.job.override_dirname}}/seed=${seed}"  # configs/hydra/default.yaml


def _regbench_names(cfg: DictConfig) -> bool:
    """The sweep's folders are named by regbench (basic sweeper, the default subdir), so it can plan them."""
    sweeper = OmegaConf.select(cfg, "hydra.sweeper._target_", default="")
    subdir = OmegaConf.to_container(cfg.hydra.sweep, resolve=False)["subdir"]
    return sweeper.endswith("BasicSweeper") and subdir == SUBDIR


def _check_sweep(overrides: Sequence[str], cfgs: list[DictConfig]) -> None:
    """Before any job of a sweep starts: one folder per job, no earlier command's job taken over."""
    from regbench.sweep import check_folders

    if _regbench_names(cfgs[0]):
        check_folders(list(overrides), _sweep_params(cfgs[0]), Path(cfgs[0].hydra.sweep.dir), cfgs[0].seed)
    _check_data(cfgs)


def _check_data(cfgs: list[DictConfig]) -> None:
    """Each distinct dataset of a sweep is loaded once before any job starts: a missing dataset (offline) is one
    line instead of one failed job (and download attempt) per job."""
    from regbench.data import DATASETS

    seen = set()
    for cfg in cfgs:
        d = cfg.data
        if DATASETS[d.name].embedded:
            continue
        key = (d.name, d.root, d.download)
        if key not in seen:
            seen.add(key)
            DATASETS[d.name].load(d)  # raises DataError with the one line


def _naming(overrides: Sequence[str], cfgs: list[DictConfig]) -> list[str]:
    """The override that names a sweep's job folders by what its jobs vary (regbench.sweep.naming)."""
    from regbench.sweep import naming_override

    extra = naming_override(list(overrides), _sweep_params(cfgs[0])) if cfgs and _regbench_names(cfgs[0]) else None
    return [extra] if extra else []


@contextlib.contextmanager
def _config_search(config_dir: Optional[str]):
    """Hydra's search path as the real command builds it: regbench's configs are the primary folder and
    ``--config-dir DIR`` (Hydra 1.3: "an additional config dir") is put in front of them, so DIR's files add
    config options (an experiment of your own) or replace regbench's, while ``train`` stays the primary config."""
    from hydra import version
    from hydra._internal.hydra import Hydra
    from hydra._internal.utils import create_config_search_path
    from hydra.core.config_search_path import SearchPathQuery
    from hydra.initialize import get_gh_backup, restore_gh_from_backup

    search_path = create_config_search_path(str(CONFIG_DIR))
    if config_dir is not None:
        extra = Path(config_dir).expanduser().resolve()
        if not extra.is_dir():
            raise RegbenchError(f"--config-dir {config_dir}: no such folder; fix: give a folder that holds config "
                                "groups, e.g. <dir>/experiment/<name>.yaml")
        search_path.prepend(provider="command-line", path=f"file://{extra}", anchor=SearchPathQuery(provider="schema"))
    backup = get_gh_backup()
    version.setbase("1.3")
    Hydra.create_main_hydra2(task_name="regbench", config_search_path=search_path)
    try:
        yield
    finally:
        restore_gh_from_backup(backup)


def _refuse_added_keys(job: Sequence[str], cfg: DictConfig) -> None:
    """``+key=value`` adds a key the schemas lack (``+trainer.max_epoch=1``, ``+foo=bar``): regbench never reads
    it, so the run would silently ignore it. Config-group selections (``+experiment=x``) and ``hydra.*`` pass."""
    from hydra.core.override_parser.overrides_parser import OverridesParser

    groups = set(cfg.hydra.runtime.choices)
    for o in OverridesParser.create().parse_overrides(list(job)):
        key = o.key_or_group
        if not (o.is_add() or o.is_force_add()) or key in groups or key.split(".")[0] in ("hydra", "hydra/"):
            continue
        parent_key, _, leaf = key.rpartition(".")
        parent = OmegaConf.select(cfg, parent_key) if parent_key else cfg
        schema = OmegaConf.get_type(parent) if isinstance(parent, DictConfig) else None
        if dataclasses.is_dataclass(schema) and leaf in _schema_keys(schema):
            continue  # ++key=value on a key that exists: a plain override
        if o.is_force_add() and not dataclasses.is_dataclass(schema):
            continue
        raise RegbenchError(_no_such_key(key, schema))


def claim_folder(cfg: DictConfig, multirun: bool):
    """Claim the run (or sweep) folder ``cfg`` names before Hydra writes anything into it; returns the claim and
    the overrides that hand Hydra the claimed folder. The folder name is resolved once, here: a time-stamped one
    (``${now:...}``, the default) is always a new folder; any other may exist (a resume, a sweep run again), is
    locked, and is refused if it holds an earlier run's results (unless resumed)."""
    from regbench import rundir
    from regbench.train import prepare_run_dir

    key, node = ("hydra.sweep.dir", cfg.hydra.sweep) if multirun else ("hydra.run.dir", cfg.hydra.run)
    try:
        folder = Path(str(node.dir))
    except Exception as e:
        raise RegbenchError(f"{key}: {describe(e)}") from None
    fresh = "${now:" in str(node._get_node("dir")._value())
    if not multirun and (inside := rundir.live_ancestor(folder)) is not None:
        raise inside  # e.g. resuming one job of a sweep that is still running
    claim = rundir.claim(folder, fresh, "sweep" if multirun else "run")
    try:
        extra = [f"{key}={_quoted(claim.folder, key)}"]
        if not multirun and prepare_run_dir(claim.folder, cfg.trainer.resume) and (
                claim.folder / ".hydra" / "config.yaml").is_file():
            extra.append("hydra.output_subdir=null")  # a resumed run keeps the record it was started with
    except BaseException:
        claim.undo()
        raise
    return claim, extra


def _quoted(folder: Path, key: str) -> str:
    """``folder`` as a quoted override value that Hydra reads back as exactly that path."""
    from hydra.core.override_parser.overrides_parser import OverridesParser

    text = str(folder)
    value = "'" + text.replace("'", "\\'") + "'"
    try:
        ok = "${" not in text and OverridesParser.create().parse_override(f"{key}={value}").value() == text
    except Exception:
        ok = False
    if not ok:
        raise RegbenchError(f"{key}={text!r}: a folder name Hydra cannot be given back exactly (quotes, "
                            "'${', control characters); fix: choose a plainer folder name")
    return value


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
    if isinstance(e, OverrideParseException):
        return f"cannot parse override: {_first_line(e)}; see https://hydra.cc/docs/1.3/advanced/override_grammar/basic"
    if _yaml_error(e):
        return _yaml_error(e)
    cause = e
    while cause is not None and not isinstance(cause, OmegaConfBaseException):
        cause = cause.__cause__ or cause.__context__
    if isinstance(cause, (ConfigKeyError, ConfigAttributeError)) and getattr(cause, "full_key", None):
        return _no_such_key(cause.full_key, getattr(cause, "object_type", None))
    if isinstance(cause, ValidationError) and getattr(cause, "full_key", None):
        return f"{cause.full_key}: {_first_line(cause)}"
    if isinstance(cause, OmegaConfBaseException) and getattr(cause, "full_key", None):
        return f"{cause.full_key}: {_first_line(cause)}"
    return _first_line(e)


def _unquoted_non_ascii(override: str) -> str:
    """The first non-ASCII character of an unquoted value (Hydra's lexer accepts them only in quotes), or ''."""
    value = override.partition("=")[2]
    if value[:1] in ("'", '"'):
        return ""
    return next((c for c in value if ord(c) > 127), "")


def _yaml_error(e: BaseException) -> str:
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


def _no_such_key(key: str, object_type) -> str:
    """One line for a key no schema has (``object_type``: the dataclass of the node it was looked up in)."""
    parts = key.split(".")
    if parts[0] == "regularizer" and len(parts) >= 2 and _schema_keys(object_type) == []:
        members = sorted(p.stem for p in (CONFIG_DIR / "regularizer").glob("*.yaml"))
        if parts[1] in members:
            return (f"{key}: {parts[1]} is not in the regularizer stack; add it first: "
                    f"regularizer=[{parts[1]}] (or append it to the list you already use)")
        hint = difflib.get_close_matches(parts[1], members, n=1)
        return (f"{key}: no regularizer named '{parts[1]}'; available: {', '.join(members)}"
                + (f"; did you mean {hint[0]}?" if hint else ""))
    leaf = key.rsplit(".", 1)[-1]
    known = _schema_keys(object_type)
    hint = difflib.get_close_matches(leaf, known, n=1)
    msg = f"{key}: no such key"
    if known:
        msg += f" (valid keys here: {', '.join(known)})"
    if hint:
        msg += f"; did you mean {key.rsplit('.', 1)[0] + '.' if '.' in key else ''}{hint[0]}?"
    return msg


def _schema_keys(object_type) -> list[str]:
    if object_type is not None and dataclasses.is_dataclass(object_type):
        return [f.name for f in dataclasses.fields(object_type)]
    return []


def _first_line(e: BaseException) -> str:
    return (str(e).strip().splitlines() or [type(e).__name__])[0]


# ------------------------------------------------------------------------------------ rerun / resume

# Which schema types a group of a saved config, by the option's `name` (see config.SCHEMAS).
_SCHEMA_OF = {
    "data": lambda name: "embedded" if name == "mnist5k" else "torchvision",
    "model": lambda name: name,
    "optimizer": lambda name: "adam" if name == "adamw" else name,
    "scheduler": lambda name: name,
    "trainer": lambda name: "trainer",
    "augmentation": lambda name: "policy",
}


def saved_config_dir(run_dir: Path) -> Path:
    """A config folder whose primary config ``rerun`` is the run's saved config, typed by regbench's schemas.

    ``<run>/.hydra/config.yaml`` holds the composed config. A run folder is data, not code: only the keys of
    regbench's root schema are taken from it (no ``hydra:`` node, no ``defaults``), each group is typed by its
    schema (so a key the schemas lack fails, and overrides are still checked), and nothing in it is pasted into
    the generated file unescaped. Hydra's settings come from regbench's own configs, never from the folder.
    """
    import atexit
    import json
    import shutil
    import tempfile

    saved = run_dir / ".hydra" / "config.yaml"
    if not saved.is_file():
        raise RegbenchError(f"{run_dir}: not a regbench run folder (no .hydra/config.yaml); fix: give the folder "
                            "printed as 'run dir:' by the run")
    try:
        cfg = OmegaConf.load(saved)
    except Exception as e:
        raise RegbenchError(_yaml_error(e) or f"{saved}: cannot be read as a regbench config ({_first_line(e)})"
                            ) from None
    defaults = ["train_schema", *_saved_schemas(cfg, saved), {"hydra": "default"}, "_self_"]
    folder = Path(tempfile.mkdtemp(prefix="regbench-rerun-"))
    atexit.register(shutil.rmtree, folder, ignore_errors=True)
    # json.dumps: a folder name with a newline or a quote stays inside the comment.
    (folder / "rerun.yaml").write_text(
        f"# The saved config of {json.dumps(str(run_dir))}, typed by regbench's schemas.\n"
        + OmegaConf.to_yaml({"defaults": defaults}) + "\n" + OmegaConf.to_yaml(cfg))
    return folder


def _saved_schemas(cfg, saved: Path) -> list[str]:
    """The schema defaults that type a saved config; refuses any key regbench does not write itself."""
    from regbench.config import SCHEMAS, TrainConfig

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
    for group, schema_of in _SCHEMA_OF.items():
        node = cfg[group] if group in cfg else None
        name = node["name"] if isinstance(node, DictConfig) and "name" in node else group
        schema = schema_of(name) if isinstance(name, str) else None
        if not isinstance(node, DictConfig) or schema not in SCHEMAS[group]:
            raise RegbenchError(f"{saved}: {group} is not a regbench {group} config (name {name!r}; expected one of "
                                f"{', '.join(SCHEMAS[group])}); fix: rerun a folder regbench wrote")
        schemas.append(f"/schema/{group}/{schema}@{group}")
    members = cfg.regularizer if "regularizer" in cfg else {}  # runs saved before the stack existed
    if not isinstance(members, (dict, DictConfig)) or any(m not in SCHEMAS["regularizer"] for m in members):
        raise RegbenchError(f"{saved}: regularizer must map regbench's members ({', '.join(SCHEMAS['regularizer'])})"
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


def _subcommand(argv: list[str]) -> Optional[list[str]]:
    """``rerun <run> [overrides]`` / ``resume <run> [overrides]`` -> plain Hydra arguments (None: nothing to do)."""
    verb, rest = argv[0], argv[1:]
    if not rest or "=" in rest[0]:
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


def _expand_home(arg: str) -> str:
    """``data.root=~/datasets`` -> ``data.root='/home/me/datasets'`` (other arguments unchanged)."""
    m = _HOME_PATH.match(arg)
    return f"{m.group(1)}={_hydra_quoted(os.path.expanduser(m.group(2)))}" if m else arg


def _first_job_argv(argv: list[str], args, first: DictConfig) -> list[str]:
    """``-m ... --cfg job``: Hydra shows one config at a time, so show the first job's (the note says so)."""
    job = list(first.hydra.overrides.task)
    print(f"regbench: note: -m with --cfg shows the config of the first job: {' '.join(job) or '(no overrides)'}",
          file=sys.stderr)
    flags = [a for a in argv if a not in ("-m", "--multirun") and a not in args.overrides]
    return [*flags, *job]


def main(argv: Optional[Sequence[str]] = None) -> None:
    """Console-script entry point: ``regbench [-m] [overrides...]``, ``regbench rerun|resume <run dir>``,
    ``regbench report <sweep dir>``."""
    from hydra._internal.utils import get_args_parser

    argv = list(sys.argv[1:] if argv is None else argv)
    if argv and argv[0] == "report":
        from regbench.report import main as report_main

        try:
            report_main(argv[1:])
        except RegbenchError as e:
            fail(e)
        return
    claim = None
    provenance.clear()
    try:
        argv = [_expand_home(a) for a in argv]
        if argv and argv[0] in ("rerun", "resume"):
            argv = _subcommand(argv)
            if argv is None:
                return
        args = get_args_parser().parse_args(argv)
        if args.experimental_rerun is not None:  # Hydra's flag unpickles the file: code from a run folder
            raise RegbenchError(f"--experimental-rerun {args.experimental_rerun}: refused (it unpickles the file, "
                                "which can run code); fix: regbench rerun <run dir> (reads the run's saved config "
                                "as data)")
        # --help and --cfg show the config the overrides compose, so the overrides get the same one-line
        # checks as a run; Hydra's own inspection (--hydra-help, --info, completion) takes none.
        hydra_only = args.hydra_help or args.info or args.shell_completion
        cfgs = []
        if not hydra_only:
            cfgs = check(args.overrides, multirun=args.multirun, config_dir=args.config_dir,
                         config_name=args.config_name or CONFIG_NAME, runs=not (args.help or args.cfg))
            if args.multirun and args.cfg and cfgs:  # Hydra refuses -m with --cfg (a traceback): show one job
                argv, cfgs = _first_job_argv(argv, args, cfgs[0]), []
            if not (args.help or args.cfg):  # it will train: one folder for this command alone
                if args.multirun:
                    argv = [*argv, *_naming(args.overrides, cfgs)]
                claim, handed = claim_folder(cfgs[0], args.multirun)
                argv = [*argv, *handed]
    except RegbenchError as e:
        fail(e)
    sys.argv = [sys.argv[0], *argv]
    ok = False
    try:
        if args.multirun and cfgs:
            _sweep_app(cfgs)
        else:
            app()
        ok = True
    except SystemExit as e:
        ok = e.code in (0, None)
        raise
    finally:
        provenance.clear()  # an in-process caller's next run is not a rerun
        if claim is not None:
            claim.finish(ok)  # unlock; a run that failed before it started leaves no folder behind


def _sweep_app(cfgs: list[DictConfig]) -> None:
    """Hydra's multirun, every job of which learns which keys the sweep varies (its TensorBoard HParams
    columns); the launchers (in-process, joblib, submitit/SLURM) all pass the environment on to the jobs."""
    from regbench.logs import SWEEP_HPARAMS_ENV, sweep_hparams

    before = os.environ.get(SWEEP_HPARAMS_ENV)
    try:
        os.environ[SWEEP_HPARAMS_ENV] = json.dumps(sweep_hparams(cfgs))
    except Exception as e:  # noqa: BLE001 - a display detail must not stop a sweep; say what is lost
        print(f"regbench: warning: TensorBoard's HParams tab will not know what this sweep varies ({e})",
              file=sys.stderr)
    try:
        app()
    finally:  # main() may run again in this process (tests): no stale plan for the next command
        provenance.clear()
        if before is None:
            os.environ.pop(SWEEP_HPARAMS_ENV, None)
        else:
            os.environ[SWEEP_HPARAMS_ENV] = before
