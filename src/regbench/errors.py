"""User-facing errors: one line naming the key or file, what was expected and how to fix it.

Anything raised as a :class:`RegbenchError` is printed by the CLI as a single line (no traceback) and the
process exits with status 2; every other exception is a bug and keeps its traceback.
"""

from __future__ import annotations

import math


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
