"""The ``regbench`` command: a thin Hydra app around :func:`regbench.train.fit`.

Before Hydra starts, the command line is composed once per swept value and validated, so a typo'd key, a
wrong type, an unknown option or an out-of-range value fails with one line (exit status 2) before any run
folder is written or any job of a sweep is launched.
"""

from __future__ import annotations

import dataclasses
import difflib
import json
import os
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
    """``--help`` lists every config group, including the typed schemas (``schema/<group>/<name>``) that the
    YAML options extend and users never pick. Hydra 1.3 has no setting to hide a group, so its group listing
    is wrapped to drop them (and left alone if Hydra's internals change: the help then shows them again)."""
    from hydra._internal.hydra import Hydra

    original = getattr(Hydra, "format_config_groups", None)
    if original is None or getattr(original, "_regbench", False):
        return

    def format_config_groups(self, predicate, *args, **kwargs):
        return original(self, lambda g: predicate(g) and g.split("/")[0] != "schema", *args, **kwargs)

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
    ``runs``: the command will train (so the run folder must not hold an earlier run's results)."""
    from hydra import compose, initialize_config_dir

    from regbench.config import validate

    cfgs = []
    try:
        jobs = _jobs(overrides, multirun)
    except RegbenchError:
        raise
    except Exception as e:
        raise RegbenchError(describe(e)) from None
    with initialize_config_dir(config_dir=str(Path(config_dir or CONFIG_DIR).resolve()), version_base="1.3"):
        if multirun:  # a named study's hydra.sweeper.params sweep too (the command line wins for a key)
            try:
                base = compose(config_name=config_name, overrides=jobs[0], return_hydra_config=True)
                params = base.hydra.sweeper.get("params") or {}
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
            validate(OmegaConf.masked_copy(cfg, [k for k in cfg if k != "hydra"]))  # what the task sees
            cfgs.append(cfg)
    if multirun and runs and cfgs:
        _check_sweep(overrides, cfgs)
    if runs and not multirun and cfgs:  # before Hydra writes .hydra/ into the folder of an earlier run
        from regbench.train import prepare_run_dir

        prepare_run_dir(Path(cfgs[0].hydra.run.dir), cfgs[0].trainer.resume)
    return cfgs


def _sweep_params(cfg: DictConfig) -> dict:
    return dict(cfg.hydra.sweeper.get("params") or {})


SUBDIR = "${rb_run_name:${hydra.job.override_dirname}}/seed=${seed}"  # configs/hydra/default.yaml


def _regbench_names(cfg: DictConfig) -> bool:
    """The sweep's folders are named by regbench (basic sweeper, the default subdir), so it can plan them."""
    sweeper = OmegaConf.select(cfg, "hydra.sweeper._target_", default="")
    subdir = OmegaConf.to_container(cfg.hydra.sweep, resolve=False).get("subdir")
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
    if isinstance(e, OverrideParseException):
        return f"cannot parse override: {_first_line(e)}; see https://hydra.cc/docs/1.3/advanced/override_grammar/basic"
    cause = e
    while cause is not None and not isinstance(cause, OmegaConfBaseException):
        cause = cause.__cause__ or cause.__context__
    if isinstance(cause, (ConfigKeyError, ConfigAttributeError)) and getattr(cause, "full_key", None):
        key = cause.full_key
        parts = key.split(".")
        if parts[0] == "regularizer" and len(parts) >= 2 and _schema_keys(getattr(cause, "object_type", None)) == []:
            members = sorted(p.stem for p in (CONFIG_DIR / "regularizer").glob("*.yaml"))
            if parts[1] in members:
                return (f"{key}: {parts[1]} is not in the regularizer stack; add it first: "
                        f"regularizer=[{parts[1]}] (or append it to the list you already use)")
            hint = difflib.get_close_matches(parts[1], members, n=1)
            return (f"{key}: no regularizer named '{parts[1]}'; available: {', '.join(members)}"
                    + (f"; did you mean {hint[0]}?" if hint else ""))
        leaf = key.rsplit(".", 1)[-1]
        known = _schema_keys(getattr(cause, "object_type", None))
        hint = difflib.get_close_matches(leaf, known, n=1)
        msg = f"{key}: no such key"
        if known:
            msg += f" (valid keys here: {', '.join(known)})"
        if hint:
            msg += f"; did you mean {key.rsplit('.', 1)[0] + '.' if '.' in key else ''}{hint[0]}?"
        return msg
    if isinstance(cause, ValidationError) and getattr(cause, "full_key", None):
        return f"{cause.full_key}: {_first_line(cause)}"
    if isinstance(cause, OmegaConfBaseException) and getattr(cause, "full_key", None):
        return f"{cause.full_key}: {_first_line(cause)}"
    return _first_line(e)


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
}


def saved_config_dir(run_dir: Path) -> Path:
    """A config folder whose primary config ``rerun`` is the run's saved config, typed by regbench's schemas.

    ``<run>/.hydra/config.yaml`` holds the composed config; it is wrapped with the schemas (so overrides are
    still checked) and regbench's Hydra settings (run folders, log name) in a temporary folder.
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
        defaults = ["train_schema"]
        for group, schema in _SCHEMA_OF.items():
            node = cfg[group]
            defaults.append(f"/schema/{group}/{schema(node.name if 'name' in node else group)}@{group}")
        members = cfg.regularizer if "regularizer" in cfg else {}  # runs saved before the stack existed
        defaults += [f"/schema/regularizer/{m}@regularizer.{m}" for m in members]
    except Exception as e:
        raise RegbenchError(f"{saved}: cannot be read as a regbench config ({_first_line(e)})") from None
    folder = Path(tempfile.mkdtemp(prefix="regbench-rerun-"))
    atexit.register(shutil.rmtree, folder, ignore_errors=True)
    shutil.copytree(CONFIG_DIR / "hydra", folder / "hydra")
    body = OmegaConf.to_yaml(cfg)
    (folder / "rerun.yaml").write_text(
        "# The saved config of " + str(run_dir) + ", typed by regbench's schemas.\ndefaults:\n"
        + "".join(f"  - {d}\n" for d in defaults) + "  - hydra: default\n  - _self_\n\n" + body)
    return folder


def _finished(run_dir: Path) -> bool:
    """``regbench resume`` of a finished run prints one line and exits 0: there is nothing left to do."""
    try:
        done = ((run_dir / "COMPLETED").is_file()
                or json.loads((run_dir / "summary.json").read_text())["status"] == "completed")
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
        args += [f"hydra.run.dir={run_dir}", "trainer.resume=true"]
    return args


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
    provenance.clear()
    try:
        if argv and argv[0] in ("rerun", "resume"):
            argv = _subcommand(argv)
            if argv is None:
                return
        args = get_args_parser().parse_args(argv)
        # --help and --cfg show the config the overrides compose, so the overrides get the same one-line
        # checks as a run; Hydra's own inspection (--hydra-help, --info, completion) takes none.
        hydra_only = args.hydra_help or args.info or args.shell_completion or args.experimental_rerun
        cfgs = []
        if not hydra_only:
            cfgs = check(args.overrides, multirun=args.multirun, config_dir=args.config_dir,
                         config_name=args.config_name or CONFIG_NAME, runs=not (args.help or args.cfg))
            if args.multirun and not (args.help or args.cfg):
                argv = [*argv, *_naming(args.overrides, cfgs)]
    except RegbenchError as e:
        fail(e)
    sys.argv = [sys.argv[0], *argv]
    if not (args.multirun and cfgs):
        try:
            app()
        finally:
            provenance.clear()  # an in-process caller's next run is not a rerun
        return
    # Every job of the sweep learns which keys the sweep varies (its TensorBoard HParams columns); the launchers
    # (in-process, joblib, submitit/SLURM) all pass the environment on to the jobs.
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
