"""Where a run's command came from, when a subcommand built it: ``regbench rerun`` / ``regbench resume`` turn
the user's command into Hydra arguments (a temporary config folder that is gone after the run), so what the
user typed and the run folder it came from are kept here for summary.json instead."""

from __future__ import annotations

from pathlib import Path
from typing import Optional

_origin: dict = {}


def set_origin(verb: str, run_dir: Path, argv: list[str]) -> None:
    """Record that this process runs ``regbench <verb> <run_dir> ...`` (``argv``: the command as typed)."""
    _origin.clear()
    _origin.update(verb=verb, run_dir=str(run_dir), command=list(argv))


def clear() -> None:
    _origin.clear()


def command() -> Optional[list[str]]:
    """The command as the user typed it, when a subcommand rewrote it; else None (sys.argv is the command)."""
    return _origin.get("command")


def rerun_of() -> Optional[str]:
    """The run folder whose saved config this run was started from (``regbench rerun``), else None."""
    return _origin["run_dir"] if _origin.get("verb") == "rerun" else None
