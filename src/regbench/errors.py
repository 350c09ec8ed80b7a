"""User-facing errors: one line naming the key or file, what was expected and how to fix it.

Anything raised as a :class:`RegbenchError` is printed by the CLI as a single line (no traceback) and the
process exits with status 2; every other exception is a bug and keeps its traceback. Also here: the fix of a
failed write by its cause (EFBIG: the file-size limit), and the words summary.json uses for how a run ended.
"""

from __future__ import annotations

import errno
import math
from typing import Optional


class RegbenchError(Exception):
    """A mistake in the user's input (config, files, environment) that they can fix."""

    exit_code = 2


class ConfigError(RegbenchError):
    """A config value is missing, mistyped or out of range."""

    def __init__(self, key: str, value: object, expected: str, fix: str | None = None):
        self.key, self.value, self.expected = key, value, expected
        msg = f"{key}={value!r}: expected {expected}"
        if fix:
            msg += f"; {fix}"
        super().__init__(msg)


class DataError(RegbenchError):
    """A dataset cannot be found, read or downloaded."""


# Range checks: each raises ConfigError naming the key, so a schema's check function reads as a list of rules.

INT64 = (-2**63, 2**63 - 1)


def check(ok: bool, key: str, value: object, expected: str, fix: str | None = None) -> None:
    if not ok:
        raise ConfigError(key, value, expected, fix)


def choice(value: object, key: str, choices: tuple[str, ...]) -> None:
    check(value in choices, key, value, "one of " + ", ".join(choices))


def positive(value, key: str, fix: str | None = None) -> None:
    check(value is not None and value > 0 and math.isfinite(value), key, value, "a number > 0", fix)


def in_unit(value, key: str, closed_low: bool = True) -> None:
    """``value`` in [0, 1) (``closed_low``) or (0, 1)."""
    lo = "[0" if closed_low else "(0"
    ok = (0 <= value < 1) if closed_low else (0 < value < 1)
    check(ok, key, value, f"a number in {lo}, 1)")


# A write that failed: the fix that fits its cause (found in the exception's chain, whatever wraps it).


def os_error_in(e: BaseException) -> Optional[OSError]:
    """The OSError behind ``e`` (itself, or its cause/context, however deep: torch.save wraps one in a
    RuntimeError, regbench's one-line errors keep it as their context), or None."""
    seen: set[int] = set()
    stack = [e]
    while stack:
        x = stack.pop()
        if x is None or id(x) in seen:
            continue
        seen.add(id(x))
        if isinstance(x, OSError) and x.errno is not None:
            return x
        stack += [x.__cause__, x.__context__]
    return None


def file_size_fix() -> str:
    """The fix of a write refused with EFBIG: the process's file-size limit (``ulimit -f``), named with its value."""
    import resource

    soft = resource.getrlimit(resource.RLIMIT_FSIZE)[0]
    now = "unlimited" if soft == resource.RLIM_INFINITY else f"{soft // 1024} KiB"
    return (f"fix: raise the file-size limit of the shell that runs regbench (`ulimit -f`, now {now}; e.g. "
            "`ulimit -f unlimited`)")


def with_write_fix(e: BaseException) -> None:
    """Give the one-line error ``e`` of a failed write the fix of its cause where the generic one (free disk space,
    make the folder writable) is wrong: EFBIG is the file-size limit. Changes ``e``'s text in place."""
    cause = os_error_in(e)
    if cause is None or cause.errno != errno.EFBIG or not e.args or not isinstance(e.args[0], str):
        return
    e.args = (e.args[0].split("; fix:")[0] + "; " + file_size_fix(), *e.args[1:])


# How a run ended, in summary.json's words (regbench.run.Run.fail, a bagging run's end).


def stopped_status(e: BaseException) -> str:
    """summary.json's status when a run ends by ``e``: "preempted" / "timed-out" when SLURM's signal stopped it
    (set by regbench.sweep's watch on submitit's requeue handler; the requeued job resumes), "interrupted" for
    Ctrl-C or another deliberate exit, else "failed" (a sweep runs a failed job again from scratch)."""
    status = getattr(e, "regbench_status", None)
    if status is not None:
        return status
    return "interrupted" if isinstance(e, (KeyboardInterrupt, SystemExit)) else "failed"


def stopped_reason(e: BaseException) -> str:
    """summary.json's error when a run ends by ``e``: its one line (Ctrl-C has none of its own)."""
    reason = getattr(e, "regbench_reason", None)
    if reason:
        return reason
    if str(e):
        return str(e).splitlines()[0]
    return "interrupted by Ctrl-C (SIGINT)" if type(e) is KeyboardInterrupt else type(e).__name__


def unrecorded(e: BaseException, status: str, write_error: BaseException) -> str:
    """The note that summary.json could not record the end ``status`` (``write_error``), added to ``e``'s one
    line (a KeyboardInterrupt keeps it as ``regbench_unrecorded``: the interrupt line says it). Returns it."""
    cause = os_error_in(write_error)
    note = (f"the run's status ({status}) could not be recorded: summary.json still says 'running' "
            f"({cause.strerror if cause is not None and cause.strerror else write_error})")
    if isinstance(e, RegbenchError) and e.args and isinstance(e.args[0], str):
        e.args = (f"{e.args[0]}; {note}", *e.args[1:])
    else:
        e.regbench_unrecorded = note  # type: ignore[attr-defined]
    return note
