"""The pre-check of a command line: every job it describes composed and validated before anything runs.

Before Hydra starts, the command line is composed once per swept value and validated, so a typo'd key, a
wrong type, an unknown option or an out-of-range value fails with one line (exit status 2) before any run
folder is written or any job of a sweep is launched.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
from pathlib import Path
from typing import Optional, Sequence

from omegaconf import DictConfig, OmegaConf

from regbench.checkpoint import check_test_hooks
from regbench.cli_errors import describe, no_such_key, schema_keys
from regbench.config import CONFIG_DIR, CONFIG_NAME
from regbench.datasets import DATASETS
from regbench.errors import RegbenchError
from regbench.search import search_problem
from regbench.slurm import check_launcher
from regbench.sweep_names import check_folders, naming_override
from regbench.validation import validate


def _jobs(overrides: Sequence[str], multirun: bool) -> list[list[str]]:
    """The override lists to check: the first job, plus one job per further value of each swept key (an interval a
    search samples from: both of its ends)."""
    from hydra.core.override_parser.overrides_parser import OverridesParser

    parsed = OverridesParser.create().parse_overrides(list(overrides))
    choices: list[list[str]] = []
    for o in parsed:
        key = o.get_key_element()
        if o.is_sweep_override():
            if not multirun:
                raise RegbenchError(f"{o.input_line}: a sweep (several values) needs multirun; fix: add -m")
            if o.is_discrete_sweep():
                values = list(o.sweep_string_iterator())
            elif o.is_interval_sweep():  # a search's range (Optuna, Ax, Nevergrad): both ends must be valid values
                interval = o.value()
                if "log" in interval.tags and not interval.start > 0:
                    raise RegbenchError(f"{o.input_line}: a log-scale interval starts above 0 (got {interval.start}); "
                                        f"fix: e.g. {key}=tag(log,interval(1e-6,{interval.end}))")
                values = [repr(interval.start), repr(interval.end)]
            else:
                values = []
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


    cfgs = []
    try:
        jobs = _jobs(overrides, multirun)
    except RegbenchError:
        raise
    except Exception as e:
        raise RegbenchError(describe(e)) from None
    with _config_search(config_dir):
        if multirun:  # a named study's hydra.sweeper.params sweep too (the command line wins for a key)
            _refuse_bad_choices(jobs[0], config_dir)
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
            _refuse_bad_choices(job, config_dir)
            try:
                cfg = compose(config_name=config_name, overrides=job, return_hydra_config=True)
            except Exception as e:
                raise RegbenchError(describe(e)) from None
            _refuse_added_keys(job, cfg)
            validate(OmegaConf.masked_copy(cfg, [k for k in cfg if k != "hydra"]))  # what the task sees
            cfgs.append(cfg)
    if runs:  # a malformed test-hook variable is one line before anything is written (not at the first hook)

        check_test_hooks()
    if multirun and runs and cfgs:
        _check_sweep(overrides, cfgs)
    if runs and multirun and cfgs:  # before a job array no node can run is submitted (it would pend forever)

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

    problem = search_problem(cfgs[0], overrides)
    if problem:
        raise RegbenchError(problem)
    if _regbench_names(cfgs[0]):
        check_folders(list(overrides), _sweep_params(cfgs[0]), Path(cfgs[0].hydra.sweep.dir), cfgs[0].seed)
    _check_data(cfgs)


def _check_data(cfgs: list[DictConfig]) -> None:
    """Each distinct dataset of a sweep is loaded once before any job starts: a missing dataset (offline) is one
    line instead of one failed job (and download attempt) per job."""

    seen = set()
    for cfg in cfgs:
        d = cfg.data
        if DATASETS[d.name].embedded:
            continue
        key = (d.name, d.root, d.download)
        if key not in seen:
            seen.add(key)
            DATASETS[d.name].load(d)  # raises DataError with the one line


def naming_overrides(overrides: Sequence[str], cfgs: list[DictConfig]) -> list[str]:
    """The override that names a sweep's job folders by what its jobs vary (regbench.sweep_names.naming)."""

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


def _refuse_bad_choices(job: Sequence[str], config_dir: Optional[str]) -> None:
    """A config group is chosen by option names: ``regularizer=[null]``, ``model=null``, ``regularizer=[l2,7]`` end
    in Hydra's internals (a TypeError) otherwise. ``~group`` (delete) has no value and passes."""
    from hydra.core.override_parser.overrides_parser import OverridesParser

    roots = [CONFIG_DIR] + ([Path(config_dir).expanduser()] if config_dir else [])
    for o in OverridesParser.create().parse_overrides(list(job)):
        group = o.key_or_group
        if o.is_delete() or group.startswith("hydra") or not any((r / group).is_dir() for r in roots):
            continue
        value = o.value()
        names = value if isinstance(value, list) else [value]
        if all(isinstance(n, str) and n for n in names):
            continue
        options = sorted({p.stem for r in roots for p in (r / group).glob("*.yaml")})
        bad = next(n for n in names if not (isinstance(n, str) and n))
        shown = "null" if bad is None else repr(bad) if isinstance(bad, str) else json.dumps(bad, default=str)
        example = [n for n in ("l2", "dropout") if n in options] or options[:2]
        fix = (f"list members by name, e.g. {group}=[{','.join(example)}] ({group}=[] for none)"
               if isinstance(value, list) else f"pick one, e.g. {group}={options[0] if options else '<option>'}")
        raise RegbenchError(f"{o.input_line}: {shown} is not an option of config group '{group}' (available: "
                            f"{', '.join(options)}); fix: {fix}")


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
        if dataclasses.is_dataclass(schema) and leaf in schema_keys(schema):
            continue  # ++key=value on a key that exists: a plain override
        if o.is_force_add() and not dataclasses.is_dataclass(schema):
            continue
        raise RegbenchError(no_such_key(key, schema))


def master_safe(argv: list[str], overrides: Sequence[str]) -> list[str]:
    """``argv`` with each plain override of a key inside a swept config group (``regularizer.l2.lam=0.1`` next to
    ``regularizer=[l2],[dropout,l2]``; ``regularizer.*`` always, its default stack being empty) handed to Hydra as
    a force-add (``++regularizer.l2.lam=0.1``).

    Why: Hydra 1.3 composes a multirun's master config from the groups' defaults, leaving the swept groups out, so
    such an override fails there ("Could not override ... not in struct") although every job has the key. The
    jobs were each composed and validated with the plain override already (:func:`check`), and a force-add sets
    an existing key exactly as a plain override does; only the master config (which no job trains on) differs.
    """
    from hydra.core.override_parser.overrides_parser import OverridesParser
    from hydra.core.override_parser.types import OverrideType

    parsed = OverridesParser.create().parse_overrides(list(overrides))
    swept = {"regularizer"} | {o.key_or_group for o in parsed if o.is_sweep_override()}
    rewrite = {o.input_line: f"++{o.input_line}" for o in parsed
               if o.type == OverrideType.CHANGE and not o.is_sweep_override() and o.package is None
               and any(o.key_or_group.startswith(g + ".") for g in swept)}
    return [rewrite.get(a, a) for a in argv]
