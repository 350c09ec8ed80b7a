"""Each stack member's log lines in its own ``<run>/regbench.log``; on the console, prefixed by the member.

While the stack works on member k (``logs.member(k)``), what is logged goes to member k's file only; lines of
the stack as a whole go to every member's file. On the console every line of the stack is formatted as a single
run's job prints it (``[time][regbench.run][INFO] - ...``, Hydra's job-logging format), not in the launcher's
``[HYDRA]`` format that a stacked sweep's console handler has (issue 25).
"""

from __future__ import annotations

import contextlib
import contextvars
import logging
from pathlib import Path
from typing import Iterator, Optional, Sequence

from regbench.logs import RunLogHandler

_CURRENT: contextvars.ContextVar[Optional[int]] = contextvars.ContextVar("regbench_stack_member", default=None)
# A job's log line, as Hydra's job logging writes it (its "simple" formatter) to a single run's console and file.
JOB_FORMAT = "[%(asctime)s][%(name)s][%(levelname)s] - %(message)s"


class _OnlyMember(logging.Filter):
    def __init__(self, k: int):
        super().__init__()
        self.k = k

    def filter(self, record: logging.LogRecord) -> bool:
        current = _CURRENT.get()
        return current is None or current == self.k


class _Prefix(logging.Formatter):
    """Console lines of the stack in a job's format, a member's starting with its name in the stack (the record
    itself is not changed, so the member's file gets the plain line)."""

    def __init__(self, names: Sequence[str]):
        super().__init__(JOB_FORMAT)
        self.names = names

    def format(self, record: logging.LogRecord) -> str:
        line = super().format(record)
        current = _CURRENT.get()
        return line if current is None else f"[{self.names[current]}] {line}"


class MemberLogs:
    def __init__(self, run_dirs: Sequence[Path]):
        self.run_dirs = [Path(d) for d in run_dirs]
        self.added: list[logging.Handler] = []
        self.filtered: list[tuple[logging.Handler, logging.Filter]] = []
        self.formatted: list[tuple[logging.Handler, Optional[logging.Formatter]]] = []

    def open(self) -> None:
        root = logging.getLogger()
        files = {Path(h.baseFilename).resolve(): h for h in root.handlers if isinstance(h, logging.FileHandler)}
        for k, d in enumerate(self.run_dirs):
            path = (d / "regbench.log").resolve()
            handler = files.pop(path, None)
            if handler is None:
                handler = RunLogHandler(str(path), encoding="utf-8")
                handler.setFormatter(logging.Formatter(JOB_FORMAT))
                root.addHandler(handler)
                self.added.append(handler)
            self._filter(handler, _OnlyMember(k))
        names = [d.name if d.name not in ("", ".") else str(k) for k, d in enumerate(self.run_dirs)]
        names = [f"{d.parent.name}/{n}" if n.startswith("seed=") else n for d, n in zip(self.run_dirs, names)]
        for h in root.handlers:
            if h not in self.added and not any(h is f for f, _ in self.filtered):
                self.formatted.append((h, h.formatter))  # the console, and any other file the launcher opened
                h.setFormatter(_Prefix(names))

    def _filter(self, handler: logging.Handler, f: logging.Filter) -> None:
        handler.addFilter(f)
        self.filtered.append((handler, f))

    def close(self) -> None:
        root = logging.getLogger()
        for handler, f in self.filtered:
            handler.removeFilter(f)
        for handler, formatter in self.formatted:
            handler.setFormatter(formatter)
        for handler in self.added:
            root.removeHandler(handler)
            handler.close()

    @contextlib.contextmanager
    def member(self, k: int) -> Iterator[None]:
        token = _CURRENT.set(k)
        try:
            yield
        finally:
            _CURRENT.reset(token)


@contextlib.contextmanager
def member_logs(run_dirs: Sequence[Path]) -> Iterator[MemberLogs]:
    logs = MemberLogs(run_dirs)
    logs.open()
    try:
        yield logs
    finally:
        logs.close()
