"""Writing files safely: every file regbench rewrites (summary.json, checkpoints, metrics.csv, reports) is written
atomically — a temporary file in the same folder, flushed and fsynced, then renamed over the old one, so a crash
never leaves a half-written file — and never through a symbolic link planted in a run folder."""

from __future__ import annotations

import contextlib
import io
import json
import os
import signal
from pathlib import Path
from typing import Any, Callable

import torch

from regbench.errors import RegbenchError

# Files in a run folder are opened without following a symbolic link (where the platform can: not Windows).
NOFOLLOW = getattr(os, "O_NOFOLLOW", 0) | getattr(os, "O_CLOEXEC", 0)


class LogWriteError(RegbenchError):
    """A log or checkpoint file could not be written (read-only folder, full disk...)."""


def atomic_write(path: Path, write: Callable[[io.BufferedWriter], None]) -> None:
    """Write ``path`` via a temp file in the same folder + fsync + rename (the old file survives any crash)."""
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    try:
        tmp.unlink(missing_ok=True)  # a killed earlier process's (same PID), or a planted link: never written through
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | NOFOLLOW, 0o644)
        with os.fdopen(fd, "wb") as f:
            write(f)
            f.flush()
            if os.environ.get("REGBENCH_FAULT") == f"during_write:{path.name}":  # crash-safety tests only
                f.truncate(f.tell() // 2)
                os.kill(os.getpid(), signal.SIGKILL)
            os.fsync(f.fileno())
        os.replace(tmp, path)
        dir_fd = os.open(path.parent, os.O_RDONLY)
        try:
            os.fsync(dir_fd)
        finally:
            os.close(dir_fd)
    except BaseException as e:
        with contextlib.suppress(OSError):
            tmp.unlink(missing_ok=True)  # never leave a half-written file behind (a full disk stays full otherwise)
        # torch.save reports a failed write (full disk...) as a RuntimeError around the OSError
        cause = e if isinstance(e, OSError) else e.__cause__ or e.__context__
        if not isinstance(e, (OSError, RuntimeError)) or not isinstance(cause, OSError):
            raise
        raise LogWriteError(f"cannot write {path}: {cause.strerror or cause}; fix: make the run folder writable "
                            "(or choose another with hydra.run.dir=...) and free disk space") from None


def encode_json(obj: Any) -> bytes:
    """The bytes :func:`write_json` writes."""
    return (json.dumps(obj, indent=2, default=_jsonable) + "\n").encode()


def write_json(path: Path, obj: Any) -> None:
    data = encode_json(obj)
    atomic_write(path, lambda f: f.write(data))


def write_bytes(path: Path, data: bytes) -> None:
    atomic_write(path, lambda f: f.write(data))


class BackgroundWriter:
    """Performs a run's per-epoch file writes (its checkpoint, summary.json) on one background thread while the
    next epoch trains: those writes wait on the disk (write, fsync, rename), not on the CPU.

    The caller encodes the files' bytes first (the tensors change with the next step), and calls :meth:`wait`
    before anything that must follow them — the next epoch's metrics row, a final or failed summary.json, reading
    the checkpoints folder. At most one job is pending (``submit`` waits for the previous one), so files reach the
    disk in the same order as synchronous writes would and a crash leaves the same states behind. A write's error
    (full disk...) is raised by the next ``submit``/``wait``.
    """

    def __init__(self) -> None:
        self._pool: Any = None
        self._pending: Any = None

    def submit(self, job: Callable[[], None]) -> None:
        self.wait()
        if self._pool is None:
            from concurrent.futures import ThreadPoolExecutor

            self._pool = ThreadPoolExecutor(1, thread_name_prefix="regbench-writer")
        self._pending = self._pool.submit(job)

    def wait(self) -> None:
        pending = self._pending
        if pending is None:
            return
        try:
            pending.result()
        finally:
            if pending.done():  # still pending when a signal (Ctrl-C, SLURM) interrupted the wait: wait again later
                self._pending = None

    def close(self) -> None:
        """Wait for the pending job and stop the thread (a pending job's error is raised)."""
        try:
            self.wait()
        finally:
            if self._pool is not None:
                self._pool.shutdown()
                self._pool = None


def read_json(path: Path) -> Any:
    """A JSON file of a run folder (data, never followed through a symbolic link). Raises OSError or ValueError."""
    if path.is_symlink():
        raise ValueError(f"{path.name} is a symbolic link (not followed)")
    return json.loads(path.read_text())


def _jsonable(v: Any) -> Any:
    if isinstance(v, torch.Tensor):
        return v.tolist()
    if isinstance(v, Path):
        return str(v)
    raise TypeError(f"not JSON serialisable: {type(v).__name__}")


def open_append(path: Path, **kwargs):
    """``open(path, "a")`` that never follows a symbolic link (a link planted in a run folder is refused)."""
    flags = os.O_WRONLY | os.O_CREAT | os.O_APPEND | NOFOLLOW
    return os.fdopen(os.open(path, flags, 0o644), "a", **kwargs)
