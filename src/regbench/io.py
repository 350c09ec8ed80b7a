"""Files of a run folder. Writing: every file regbench rewrites (summary.json, checkpoints, metrics.csv, reports)
is written atomically — a temporary file in the same folder, flushed and fsynced, then renamed over the old one,
so a crash never leaves a half-written file — and never through a symbolic link planted in a run folder.
Reading (:func:`read_folder_bytes`, :func:`read_folder_text`, :func:`load_folder_yaml`): a run or sweep folder is
data — only regular files, never through a symbolic link, never blocking on a FIFO, within a size bound that fits
what regbench writes there, YAML without anchors or deep nesting."""

from __future__ import annotations

import contextlib
import errno
import io
import json
import os
import shutil
import signal
import stat
from pathlib import Path
from typing import Any, Callable, Optional

import yaml

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


def _jsonable(v: Any) -> Any:
    import torch  # lazy: reading and writing JSON does not need torch (`regbench --help` stays fast)

    if isinstance(v, torch.Tensor):
        return v.tolist()
    if isinstance(v, Path):
        return str(v)
    raise TypeError(f"not JSON serialisable: {type(v).__name__}")


def open_append(path: Path, **kwargs):
    """``open(path, "a")`` that never follows a symbolic link (a link planted in a run folder is refused, OSError
    ELOOP) and never blocks on, or appends to, anything but a regular file (a FIFO, a device: FolderFileError).
    A file with other hard links (a run folder copied with ``cp -al``, a planted link to a file elsewhere) is
    first replaced by a copy of its own (written aside, renamed over it), so appending never changes the other
    names' file."""
    fd = _open_append(path)
    if os.fstat(fd).st_nlink > 1:
        try:
            with os.fdopen(os.open(path, os.O_RDONLY | NOFOLLOW), "rb") as shared:
                atomic_write(path, lambda f: shutil.copyfileobj(shared, f))
        finally:
            os.close(fd)
        fd = _open_append(path)
    try:
        return os.fdopen(fd, "a", **kwargs)
    except BaseException:
        os.close(fd)
        raise


def _open_append(path: Path) -> int:
    flags = os.O_WRONLY | os.O_CREAT | os.O_APPEND | NOFOLLOW | NONBLOCK
    try:
        fd = os.open(path, flags, 0o644)
    except OSError as e:
        if e.errno == errno.ENXIO:  # a FIFO nobody reads
            raise FolderFileError(_refusal(path, "is a FIFO, not a regular file", "a file regbench appends to")
                                  ) from None
        raise
    try:
        kind = _special(os.fstat(fd))
        if kind:
            raise FolderFileError(_refusal(path, f"is {kind}, not a regular file", "a file regbench appends to"))
        if NONBLOCK:
            import fcntl

            fcntl.fcntl(fd, fcntl.F_SETFL, fcntl.fcntl(fd, fcntl.F_GETFL) & ~NONBLOCK)
        return fd
    except BaseException:
        os.close(fd)
        raise


# ------------------------------------------------------------------------------ reading a folder (data)
# Size bounds of what regbench reads back from a run or sweep folder, far above what it writes there (measured:
# a run's .hydra/config.yaml ~1 KB, hydra.yaml ~6 KB, overrides.yaml < 1 KB; summary.json ~4 KB whatever the
# number of epochs; sweep_job.json < 1 KB; sweep_status.json ~300 B a job; metrics.csv ~150-300 B an epoch),
# small enough that a planted huge file (or /dev/zero behind a link) cannot exhaust memory.
YAML_LIMIT = 1 << 20      # .hydra/*.yaml
JSON_LIMIT = 4 << 20      # summary.json, sweep_job.json, COMPLETED, sweep_status.json (~13,000 jobs)
METRICS_LIMIT = 64 << 20  # metrics.csv (~200,000 epochs)
YAML_DEPTH = 32           # regbench's configs nest 4 levels, Hydra's hydra.yaml 6
NONBLOCK = getattr(os, "O_NONBLOCK", 0)


class FolderFileError(RegbenchError, ValueError):
    """A file of a run or sweep folder that is not data regbench wrote (a link, a FIFO or device, a file far
    larger than regbench writes there, YAML with anchors or deep nesting): one line naming it. A ValueError
    too, so every reader that treats an unreadable record as unusable treats this one so."""


def _refusal(path: Path, problem: str, what: str) -> str:
    return (f"{path} {problem}; regbench reads only the regular files it wrote into a run or sweep folder "
            f"({what}), never through a link; fix: replace it with the file regbench wrote, or use another folder")


def _special(st: os.stat_result) -> Optional[str]:
    """What a file is when it is not a regular file (None for one)."""
    mode = st.st_mode
    if stat.S_ISREG(mode):
        return None
    for test, kind in ((stat.S_ISLNK, "a symbolic link"), (stat.S_ISFIFO, "a FIFO"), (stat.S_ISDIR, "a folder"),
                       (stat.S_ISCHR, "a device"), (stat.S_ISBLK, "a device"), (stat.S_ISSOCK, "a socket")):
        if test(mode):
            return kind
    return "a special file"


def refuse_linked_parts(path: Path, root: Path) -> None:
    """Refuse ``path`` when a folder between ``root`` (excluded) and it is a symbolic link (one line)."""
    part = root
    for name in path.relative_to(root).parts[:-1]:
        part = part / name
        if os.path.islink(part):
            raise FolderFileError(_refusal(part, "is a symbolic link", "a folder of its own"))


def read_folder_bytes(path: Path, limit: int, what: str, root: Optional[Path] = None) -> bytes:
    """The bytes of ``path``, a file regbench wrote into a run or sweep folder (``what`` names it for the error).

    Refused with one line (FolderFileError) unless it is a regular file — not a symbolic link (not followed:
    lstat, then O_NOFOLLOW), not a FIFO (opened non-blocking, so one cannot hang the command), not a device —
    of at most ``limit`` bytes; with ``root``, no folder between ``root`` and it may be a link either. A missing
    file raises FileNotFoundError (the caller decides what its absence means)."""
    path = Path(path)
    if root is not None:
        refuse_linked_parts(path, Path(root))
    kind = _special(os.lstat(path))  # nothing but a regular file is even opened (a device's open has effects)
    if kind:
        raise FolderFileError(_refusal(path, f"is {kind}, not a regular file", what))
    try:
        fd = os.open(path, os.O_RDONLY | NOFOLLOW | NONBLOCK)
    except OSError as e:
        if e.errno in (errno.ELOOP, errno.EMLINK):  # replaced by a link since the lstat
            raise FolderFileError(_refusal(path, "is a symbolic link", what)) from None
        raise
    with os.fdopen(fd, "rb") as f:
        st = os.fstat(fd)
        kind = _special(st)
        if kind:
            raise FolderFileError(_refusal(path, f"is {kind}, not a regular file", what))
        data = f.read(limit + 1) if st.st_size <= limit else b""
    if st.st_size > limit or len(data) > limit:
        size = max(st.st_size, len(data))
        raise FolderFileError(_refusal(path, f"is {size:,} bytes, more than regbench writes there (at most "
                                             f"{limit:,} bytes)", what))
    return data


def read_folder_text(path: Path, limit: int, what: str, root: Optional[Path] = None) -> str:
    """:func:`read_folder_bytes` as UTF-8 text (one line if it is not)."""
    data = read_folder_bytes(path, limit, what, root)
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as e:
        raise FolderFileError(_refusal(path, f"is not UTF-8 text (byte {e.start})", what)) from None


def read_json(path: Path, limit: int = JSON_LIMIT, root: Optional[Path] = None) -> Any:
    """A JSON file of a run folder (:func:`read_folder_text`'s checks). Raises OSError or ValueError."""
    return json.loads(read_folder_text(path, limit, f"{Path(path).name}, JSON", root))


def load_folder_yaml(path: Path, what: str, limit: int = YAML_LIMIT, root: Optional[Path] = None) -> Any:
    """A YAML file of a run or sweep folder as plain data (:func:`read_folder_text`'s checks), parsed by a
    bounded safe loader: anchors and aliases (&a / *a: a few lines can expand to gigabytes) and nesting deeper
    than YAML_DEPTH are refused, as are duplicate keys; regbench writes none of them. Raises FolderFileError
    (one line) for those and for malformed YAML; FileNotFoundError when it is missing."""
    text = read_folder_text(path, limit, what, root)
    try:
        return yaml.load(text, Loader=_BoundedLoader)  # noqa: S506 - a SafeLoader, bounded
    except _Unbounded as e:
        raise FolderFileError(_refusal(path, f"is not YAML regbench writes (line {e.problem_mark.line + 1}): "
                                             f"{e.problem}", what)) from None
    except yaml.YAMLError as e:  # as regbench.cli_errors.yaml_error words a syntax error in a config file
        mark, context = getattr(e, "problem_mark", None), getattr(e, "context_mark", None)
        why = getattr(e, "problem", None) or "invalid YAML"
        if getattr(e, "context", None) and context is not None:
            why = f"{e.context} (opened on line {context.line + 1}, column {context.column + 1}): {why}"
        where = f", line {mark.line + 1}, column {mark.column + 1}" if mark is not None else ""
        raise FolderFileError(f"{path}{where}: YAML syntax error: {why}; fix: correct the YAML in that file"
                              .replace("\n", " ")) from None


class _Unbounded(yaml.MarkedYAMLError):
    """YAML regbench never writes: an anchor or alias, nesting deeper than YAML_DEPTH, a duplicate key."""


class _BoundedLoader(yaml.SafeLoader):
    """PyYAML's safe loader without anchors/aliases, duplicate keys or nesting deeper than YAML_DEPTH."""

    _depth = 0

    def compose_node(self, parent, index):
        event = self.peek_event()
        if isinstance(event, yaml.AliasEvent) or getattr(event, "anchor", None) is not None:
            raise _Unbounded(problem="an anchor or alias (&name / *name), which regbench never writes",
                                       problem_mark=event.start_mark)
        if self._depth >= YAML_DEPTH:
            raise _Unbounded(problem=f"nested more than {YAML_DEPTH} levels deep",
                                       problem_mark=event.start_mark)
        self._depth += 1
        try:
            return super().compose_node(parent, index)
        finally:
            self._depth -= 1

    def construct_mapping(self, node, deep=False):
        keys = [self.construct_object(k, deep=deep) for k, _ in node.value]
        seen = set()
        for key, (knode, _) in zip(keys, node.value):
            try:
                dup = key in seen
                seen.add(key)
            except TypeError:  # an unhashable key ([a]: 1)
                raise _Unbounded(problem="a key that is not a scalar", problem_mark=knode.start_mark
                                           ) from None
            if dup:
                raise _Unbounded(problem=f"the key {key!r} twice", problem_mark=knode.start_mark)
        return super().construct_mapping(node, deep=deep)
