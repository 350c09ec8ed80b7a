"""User-facing errors: one line naming the key or file, what was expected and how to fix it.

Anything raised as a :class:`RegbenchError` is printed by the CLI as a single line (no traceback) and the
process exits with status 2; every other exception is a bug and keeps its traceback.
"""

from __future__ import annotations


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
