"""The ``regbench`` command: a thin Hydra app around :func:`regbench.train.fit`.

Before Hydra starts, every job the command line describes is composed and validated (regbench/cli_check.py),
so bad input fails with one line (regbench/cli_errors.py) before any run folder is written; then the run or
sweep folder is claimed and Hydra runs. ``rerun``/``resume`` read a run folder's saved config as data
(regbench/cli_saved.py).
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path
from typing import Optional, Sequence

import hydra
from hydra.core.hydra_config import HydraConfig
from omegaconf import DictConfig, OmegaConf

from regbench import provenance, rundir
from regbench.cli_check import check, master_safe, naming_overrides
from regbench.cli_errors import describe
from regbench.cli_saved import expand_home, subcommand
from regbench.config import CONFIG_DIR, CONFIG_NAME
from regbench.errors import RegbenchError
from regbench.hparams import SWEEP_HPARAMS_ENV, sweep_hparams
from regbench.io import JSON_LIMIT, read_folder_bytes
from regbench.records import Summary
from regbench.rundir import prepare_run_dir
from regbench.runtime import default_num_threads
from regbench.sweep_names import canonical_name
from regbench.validation import register_configs

__all__ = ["CONFIG_DIR", "CONFIG_NAME", "app", "check", "claim_folder", "main", "tensorboard_command"]

register_configs()
# Sweep sub-folders are named after the overrides that differ between the sweep's jobs (seed excluded, so the
# seeds of one configuration sit side by side below it; see regbench.sweep_names.naming), the stack in its fixed
# order; a sweep that varies nothing else gets "default".


def _run_name(name: str) -> str:

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
        value = _fit_stacked_member(cfg, run_dir) if _stacked_origin() else fit(cfg, run_dir)
    except RegbenchError as e:
        fail(e)
    print(f"run dir: {run_dir.resolve()}")
    print(f"view it: {tensorboard_command()} --logdir {run_dir.resolve()}")
    return value


def _stacked_origin() -> bool:
    """``regbench rerun|resume`` of a run trained in a stack (hydra/launcher=stacked): it runs as a stack of one,
    so it computes what the stack computed for it (a member does not depend on its group-mates)."""

    source = provenance.origin_dir()
    try:
        return source is not None and Summary.load(source / "summary.json").stacked is not None
    except (OSError, ValueError):
        return False


def _fit_stacked_member(cfg: DictConfig, run_dir: Path) -> float:
    import math

    from regbench.train import (
        fit_stack,  # the dispatcher: a stack of one, as it was trained
    )

    value = fit_stack([cfg], [run_dir], resume=bool(cfg.trainer.resume))[0]
    if math.isnan(value):
        error = Summary.load(run_dir / "summary.json").error
        if error:
            raise RegbenchError(error)
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


def claim_folder(cfg: DictConfig, multirun: bool):
    """Claim the run (or sweep) folder ``cfg`` names before Hydra writes anything into it; returns the claim and
    the overrides that hand Hydra the claimed folder. The folder name is resolved once, here: a time-stamped one
    (``${now:...}``, the default) is always a new folder; any other may exist (a resume, a sweep run again), is
    locked, and is refused if it holds an earlier run's results (unless resumed)."""

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


def _first_job_argv(argv: list[str], args, first: DictConfig) -> list[str]:
    """``-m ... --cfg job``: Hydra shows one config at a time, so show the first job's (the note says so)."""
    job = list(first.hydra.overrides.task)
    print(f"regbench: note: -m with --cfg shows the config of the first job: {' '.join(job) or '(no overrides)'}",
          file=sys.stderr)
    flags = [a for a in argv if a not in ("-m", "--multirun") and a not in args.overrides]
    return [*flags, *job]


def main(argv: Optional[Sequence[str]] = None) -> None:
    """Console-script entry point: ``regbench [-m] [overrides...]``, ``regbench rerun|resume <run dir>``,
    ``regbench report <sweep dir>``. Ctrl-C and SIGTERM end it with one line saying how to continue."""
    claimed: list = []
    previous = _handle_sigterm()
    try:
        _main(list(sys.argv[1:] if argv is None else argv), claimed)
    except KeyboardInterrupt as e:
        previous = None  # exiting: a further Ctrl-C or SIGTERM stays ignored through the interpreter's exit
        print(f"regbench: {_interrupted(e, claimed[0] if claimed else None)}", file=sys.stderr)
        sys.exit(143 if isinstance(e, Terminated) else 130)
    finally:
        if previous is not None:  # back to the embedding program's handlers (tests call main in-process)
            import signal

            signal.signal(signal.SIGTERM, previous)
            signal.signal(signal.SIGINT, signal.default_int_handler)


class Terminated(KeyboardInterrupt):
    """SIGTERM (``kill``, a scheduler's stop), handled as Ctrl-C is: the run's summary.json says "interrupted"."""

    regbench_reason = "terminated by SIGTERM"


def _handle_sigterm():
    """Make SIGTERM raise :class:`Terminated` in the main thread, where nothing else handles it (submitit does in
    a SLURM job; an embedding program may). Returns the handler to restore, or None. A second SIGTERM is ignored
    while the first one's records are written (SIGKILL still ends the process at once)."""
    import signal
    import threading

    if threading.current_thread() is not threading.main_thread() or \
            signal.getsignal(signal.SIGTERM) is not signal.SIG_DFL:
        return None

    def terminate(signum, frame):
        signal.signal(signal.SIGTERM, signal.SIG_IGN)
        raise Terminated()

    def interrupt(signum, frame):  # Ctrl-C: a second one (or a third) while the first's records are written, and
        signal.signal(signal.SIGINT, signal.SIG_IGN)  # at exit, would end in a traceback; it is ignored instead
        raise KeyboardInterrupt()

    if signal.getsignal(signal.SIGINT) is signal.default_int_handler:
        signal.signal(signal.SIGINT, interrupt)
    return signal.signal(signal.SIGTERM, terminate)


def _interrupted(e: KeyboardInterrupt, claim) -> str:
    """The one line of a command ended by Ctrl-C or SIGTERM: where the run stopped and how to continue it."""
    import shlex

    what = "terminated (SIGTERM)" if isinstance(e, Terminated) else "interrupted"
    if getattr(e, "regbench_unrecorded", None):  # summary.json could not be written (run.Run.fail)
        what += f" ({e.regbench_unrecorded})"
    if claim is None:
        return f"{what}; nothing was started"
    folder = shlex.quote(str(claim.folder))
    if claim.kind == "sweep":
        return (f"{what}; continue with the same command and hydra.sweep.dir={folder} (completed jobs are skipped, "
                "unfinished ones resume from their checkpoints)")

    try:
        epochs = json.loads(read_folder_bytes(claim.folder / "summary.json", JSON_LIMIT, "summary.json"))[
            "epochs_completed"]
    except (OSError, ValueError, KeyError, TypeError):
        return f"{what} before training started; nothing was kept"
    if not isinstance(epochs, int) or isinstance(epochs, bool):
        return f"{what}; its summary.json is not regbench's; see {folder}"
    done = f"after epoch {epochs}" if epochs else "in its first epoch"
    return f"{what} {done}; continue with: regbench resume {folder}"


def _main(argv: list[str], claimed: list) -> None:
    """:func:`main`'s work; the claimed run or sweep folder is appended to ``claimed`` (for the interrupt line)."""
    from hydra._internal.utils import get_args_parser

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
        argv = [expand_home(a) for a in argv]
        if argv and argv[0] in ("rerun", "resume"):
            argv = subcommand(argv)
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
                    argv = [*master_safe(argv, args.overrides), *naming_overrides(args.overrides, cfgs)]
                claim, handed = claim_folder(cfgs[0], args.multirun)
                claimed.append(claim)
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
