"""Where a run came from, for summary.json: the software it ran (versions, git commit), when, and which command
and run folder it came from. ``regbench rerun`` / ``regbench resume`` turn the user's command into Hydra
arguments (a temporary config folder that is gone after the run), so what the user typed and the run folder it
came from are kept here instead."""

from __future__ import annotations

import os
import platform
import subprocess
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Optional

from regbench import __version__
from regbench.records import Summary

_origin: dict = {}


def set_origin(verb: str, run_dir: Path, argv: list[str]) -> None:
    """Record that this process runs ``regbench <verb> <run_dir> ...`` (``argv``: the command as typed)."""
    _origin.clear()
    _origin.update(verb=verb, run_dir=str(run_dir), command=list(argv))


def clear() -> None:
    _origin.clear()


def origin_dir() -> Optional[Path]:
    """The run folder this process reruns or resumes (``regbench rerun|resume <run dir>``), else None."""
    return Path(_origin["run_dir"]) if "run_dir" in _origin else None


def command() -> Optional[list[str]]:
    """The command as the user typed it, when a subcommand rewrote it; else None (sys.argv is the command)."""
    return _origin.get("command")


def rerun_of() -> Optional[str]:
    """The run folder whose saved config this run was started from (``regbench rerun``), else None."""
    return _origin["run_dir"] if _origin.get("verb") == "rerun" else None


def versions() -> dict[str, str]:
    import torch
    import torchvision


    return {"regbench": __version__, "torch": torch.__version__, "torchvision": torchvision.__version__,
            "cuda": torch.version.cuda or "none", "python": platform.python_version()}


def git_state() -> dict[str, Any]:
    """Commit and dirty flag of the source tree regbench runs from (null when it is not a git checkout).

    git runs with an environment and config nothing else chose: no GIT_* variables (a config's
    hydra.job.env_set, or the shell, could point git at another repository or inject config such as
    core.fsmonitor, which git runs as a command), no system or global config, and the commands git could
    run from config switched off; from the source folder, not the run folder."""
    src = Path(__file__).resolve().parent
    env = {k: v for k, v in os.environ.items() if not k.startswith("GIT_")}
    env.update(GIT_CONFIG_NOSYSTEM="1", GIT_CONFIG_GLOBAL=os.devnull, GIT_TERMINAL_PROMPT="0", LC_ALL="C")
    git = ["git", "--no-optional-locks", "-c", "core.fsmonitor=false", "-c", f"core.hooksPath={os.devnull}",
           "-c", "core.untrackedCache=false", "-c", "diff.external=", "-c", "core.pager=cat"]

    def run(*args: str) -> subprocess.CompletedProcess:
        return subprocess.run([*git, *args], cwd=src, env=env, capture_output=True, text=True, timeout=10,
                              stdin=subprocess.DEVNULL)

    try:
        commit = run("rev-parse", "HEAD")
        if commit.returncode != 0:
            return {"commit": None, "dirty": None}
        status = run("status", "--porcelain", "--untracked-files=no")
        return {"commit": commit.stdout.strip(), "dirty": bool(status.stdout.strip())}
    except (OSError, subprocess.SubprocessError):
        return {"commit": None, "dirty": None}


def lineage(run_dir: Path, resuming: bool) -> dict:
    """Which run this one came from: ``rerun_of`` (the folder whose saved config ``regbench rerun`` started it
    from; kept when the rerun is later resumed) and ``resumed_from`` (the run folder continued in place)."""
    origin = rerun_of()
    if resuming and origin is None:

        try:  # the earlier attempt's record; a value that is not a path string is not carried over
            origin = Summary.load(run_dir / "summary.json").rerun_of()
        except (OSError, ValueError):
            origin = None
    return {"rerun_of": origin, "resumed_from": str(run_dir.resolve()) if resuming else None}


def now() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="seconds")
