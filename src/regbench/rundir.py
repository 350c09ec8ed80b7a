"""One folder belongs to one run: claiming run and sweep folders atomically, locking live ones, undoing a start;
whether a folder's records allow a new run or a resume (the rows a resumed run continues from: regbench.state).

A folder is claimed before anything is written into it: a time-stamped name (``${now:...}``, the default) is
created with an exclusive ``mkdir`` (``_2``, ``_3``... on a collision), and every claimed folder gets a lock,
``.regbench.lock``, held with ``flock`` for as long as the process lives and naming its PID and host. A
command that is refused, or a run that fails before it starts training, leaves the folder as it found it.
"""

from __future__ import annotations

import json
import os
import shutil
import socket
import stat
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Optional

from regbench.errors import RegbenchError
from regbench.io import JSON_LIMIT, read_folder_bytes
from regbench.records import MARKER, Summary

try:
    import fcntl
except ImportError:  # Windows: no flock; the lock file's PID and host decide
    fcntl = None

LOCK = ".regbench.lock"
# Everything regbench writes into a run folder: none of them, nor anything inside its folders, may be a symbolic
# link (we would write through it) or a FIFO, device or socket (reading or appending to it would hang or worse).
RECORD_DIRS = (".hydra", "tb", "checkpoints", "attempts")
RECORD = (*RECORD_DIRS, "metrics.csv", "summary.json", "regbench.log", MARKER, "sweep_job.json", LOCK)
HOST = socket.gethostname()

_held: dict[str, "Lock"] = {}  # folders this process holds, by resolved path (claims are re-entrant)


class FolderInUse(RegbenchError):
    """Another live process holds the folder's lock."""


# ------------------------------------------------------------------------------------------- locks


def _me(kind: str) -> dict:
    return {"kind": kind, "pid": os.getpid(), "host": HOST, "slurm_job": os.environ.get("SLURM_JOB_ID"),
            "since": datetime.now(timezone.utc).isoformat(timespec="seconds")}


def _parse(raw: bytes) -> dict:
    try:
        info = json.loads(raw.decode())
        return info if isinstance(info, dict) else {}
    except (UnicodeDecodeError, ValueError):
        return {}


def _in_use(folder: Path, info: dict, path: Path) -> FolderInUse:
    kind = info.get("kind") if info.get("kind") in ("run", "sweep") else "run"
    who = f"pid {info.get('pid', '?')} on host {info.get('host', '?')}, since {info.get('since', '?')}"
    key = "hydra.sweep.dir" if kind == "sweep" else "hydra.run.dir"
    return FolderInUse(f"{folder} is in use by a live {kind} ({who}); refusing to write into it; fix: wait for it "
                       f"to finish, or choose another folder with {key}=... (if that process is gone, delete {path})")


@dataclass
class Lock:
    """The lock of one folder, held by this process (flock on an open descriptor)."""

    folder: Path
    fd: int
    previous: Optional[bytes]  # the lock file's bytes before we took it (None: we created it)

    def release(self, restore: bool = False) -> None:
        """Unlock; ``restore``: put back what was there before (a refused command leaves no trace)."""
        path = self.folder / LOCK
        _held.pop(str(self.folder.resolve()), None)
        try:
            if restore and self.previous is not None:
                os.ftruncate(self.fd, 0)
                os.pwrite(self.fd, self.previous, 0)
            else:
                path.unlink(missing_ok=True)
        except OSError:
            pass  # the folder went away or became unwritable: the kernel drops the flock with the descriptor
        finally:
            os.close(self.fd)


def lock(folder: Path, kind: str = "run") -> Optional[Lock]:
    """Lock ``folder`` for this process; None if this process holds it already.

    A lock whose process is gone is taken over: the kernel released its flock. A lock file naming another host
    is refused even then (flock may not reach across hosts on a shared file system), unless it names this
    SLURM job (a requeued job continues on another node).
    """
    if str(folder.resolve()) in _held:
        return None
    path = folder / LOCK
    nofollow = getattr(os, "O_NOFOLLOW", 0) | getattr(os, "O_CLOEXEC", 0)
    for _ in range(5):  # the holder may unlink the file between our open and our flock: try again
        try:
            try:
                fd, previous = os.open(path, os.O_RDWR | os.O_CREAT | os.O_EXCL | nofollow, 0o644), None
            except FileExistsError:
                fd = os.open(path, os.O_RDWR | nofollow)
                previous = b""
        except OSError as e:
            raise _unwritable(folder, e) from None
        flocked = fcntl is not None
        try:
            if flocked:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            info = _parse(os.pread(fd, 4096, 0))
            os.close(fd)
            raise _in_use(folder, info, path) from None
        except OSError:
            flocked = False  # no flock on this file system: the lock file's content decides below
        try:
            same = os.path.samestat(os.fstat(fd), os.stat(path, follow_symlinks=False))
        except FileNotFoundError:
            same = False
        if not same:
            os.close(fd)
            continue
        if previous is not None:
            previous = os.pread(fd, 4096, 0)
            info = _parse(previous)
            if info and not _stale(info, flocked):
                os.close(fd)
                raise _in_use(folder, info, path)
        try:
            os.ftruncate(fd, 0)
            os.pwrite(fd, (json.dumps(_me(kind)) + "\n").encode(), 0)
            os.fsync(fd)
        except OSError as e:
            os.close(fd)
            raise _unwritable(folder, e) from None
        held = Lock(folder, fd, previous)
        _held[str(folder.resolve())] = held
        return held
    raise _in_use(folder, {}, path)


def _stale(info: dict, flocked: bool) -> bool:
    """Whether a lock file was left by a process that is gone. On this host, holding its flock proves it (a
    live holder keeps it; a reused PID does not); without flock, the PID is asked."""
    if info.get("host") != HOST:
        return bool(info.get("slurm_job")) and info.get("slurm_job") == os.environ.get("SLURM_JOB_ID")
    if flocked:
        return True
    pid = info.get("pid")
    if not isinstance(pid, int) or pid == os.getpid():
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return True
    except PermissionError:
        pass  # alive, another user's
    return False


def live_ancestor(folder: Path) -> Optional[FolderInUse]:
    """The refusal for a folder inside a live sweep (or run) that another process holds, if any."""
    for parent in folder.resolve().parents:
        path = parent / LOCK
        if fcntl is None or str(parent) in _held or path.is_symlink() or not path.is_file():
            continue
        try:
            fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC)
        except OSError:
            continue
        try:
            fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
        except BlockingIOError:
            return _in_use(parent, _parse(os.pread(fd, 4096, 0)), path)
        except OSError:
            pass
        finally:
            os.close(fd)
    return None


# ------------------------------------------------------------------------------------------ claims


def refuse_links(folder: Path) -> None:
    """Refuse (one line) a run folder in which something regbench writes or reads — a RECORD entry, or anything
    below its folders (.hydra/, tb/, checkpoints/, attempts/) — is a symbolic link (it would be written or read
    through) or neither a regular file nor a folder (a FIFO, a device, a socket: reading or appending to it hangs
    or worse). Usable on any folder regbench is about to write into (a bagging run's members/ folders too)."""
    for name in RECORD:
        _check_entry(folder / name)
    for name in RECORD_DIRS:
        top = folder / name
        if os.path.isdir(top) and not os.path.islink(top):
            for parent, dirs, files in os.walk(top):  # a linked folder is listed in dirs, never entered
                for n in [*dirs, *files]:
                    _check_entry(Path(parent) / n)


def _check_entry(p: Path) -> None:
    try:
        mode = os.lstat(p).st_mode
    except FileNotFoundError:
        return
    if stat.S_ISLNK(mode):
        raise RegbenchError(f"{p} is a symbolic link; regbench never writes through links in a run folder; fix: "
                            "replace it with the real file or folder (or choose another run folder)")
    if not (stat.S_ISDIR(mode) or stat.S_ISREG(mode)):
        raise RegbenchError(f"{p} is not a regular file (a FIFO, device or socket); regbench never reads or writes "
                            "such files in a run folder; fix: remove it (or choose another run folder)")


def _unwritable(folder: Path, e: OSError) -> RegbenchError:
    blocker = next((p for p in [*reversed(folder.parents), folder] if _is_file(p)), None)
    why = f"{e.strerror or e}" + (f"; {blocker} is a file, not a folder" if blocker is not None else "")
    return RegbenchError(f"cannot create run folder {folder}: {why}; fix: choose a writable place with "
                         "hydra.run.dir=... (hydra.sweep.dir=... for a sweep), with a shorter name if it is too long")


def _is_file(p: Path) -> bool:
    try:
        return p.exists() and not p.is_dir()
    except OSError:  # e.g. a name too long to look up
        return False


@dataclass
class Claim:
    """A claimed folder and what it looked like before, so that a failed start can be undone."""

    folder: Path
    lock: Optional[Lock]
    kind: str = "run"
    created: list[Path] = field(default_factory=list)  # folders this claim made, outermost first
    names: set[str] = field(default_factory=set)       # the folder's entries before
    summary: Optional[bytes] = None
    log_size: Optional[int] = None

    def started(self) -> bool:
        """Whether a run wrote its summary (it then records its own outcome, failed or not)."""
        now = _summary_bytes(self.folder)
        return now is not None and now != self.summary

    def undo(self) -> None:
        """Remove what the command created, restore the run log's length, and unlock."""
        if self.folder in self.created:
            shutil.rmtree(self.folder, ignore_errors=True)
        else:
            for p in self.folder.iterdir() if self.folder.is_dir() else []:
                if p.name not in self.names and p.name != LOCK:
                    shutil.rmtree(p) if p.is_dir() and not p.is_symlink() else p.unlink(missing_ok=True)
            log = self.folder / "regbench.log"
            if self.log_size is not None and not log.is_symlink() and log.is_file():
                os.truncate(log, self.log_size)
        if self.lock is not None:
            self.lock.release(restore=True)
        for d in reversed(self.created[:-1] if self.folder in self.created else self.created):
            try:
                d.rmdir()  # only if empty: another run may have put its folder there meanwhile
            except OSError:
                break

    def finish(self, ok: bool) -> None:
        """Unlock at the end; a run that failed before it started leaves the folder as it was (a sweep folder
        keeps what its jobs recorded)."""
        if not ok and self.kind == "run" and not self.started():
            self.undo()
        elif self.lock is not None:
            self.lock.release()


def _summary_bytes(folder: Path) -> Optional[bytes]:

    try:
        return read_folder_bytes(folder / "summary.json", JSON_LIMIT, "summary.json")
    except (OSError, ValueError):
        return None


def _make_parents(folder: Path) -> list[Path]:
    missing = [p for p in [*reversed(folder.parents)] if not p.exists()]
    made = []
    for p in missing:
        try:
            os.mkdir(p)
            made.append(p)
        except FileExistsError:
            pass  # another run made it meanwhile
        except OSError as e:
            _rmdirs(made)
            raise _unwritable(folder, e) from None
    return made


def _rmdirs(made: list[Path]) -> None:
    for d in reversed(made):
        try:
            d.rmdir()
        except OSError:
            break


def claim(folder: Path, fresh: bool, kind: str = "run") -> Claim:
    """Claim ``folder`` for this process: ``fresh`` (a time-stamped name) makes a new folder, never an
    existing one (adding ``_2``, ``_3``... on a collision); otherwise the folder may exist (a resume, a sweep
    run again) and is locked. Raises RegbenchError with one line (folder unwritable, in use)."""
    made = _make_parents(folder)
    base, n = folder, 1
    while True:
        try:
            os.mkdir(folder)
            made.append(folder)
            break
        except FileExistsError:
            if fresh:
                n += 1
                folder = base.with_name(f"{base.name}_{n}")
                continue
            if folder.is_dir():
                break
            _rmdirs(made)
            raise RegbenchError(f"{folder} is a file, not a folder; fix: choose a run folder with "
                                "hydra.run.dir=...") from None
        except OSError as e:
            _rmdirs(made)
            raise _unwritable(folder, e) from None
    try:
        refuse_links(folder)  # e.g. a planted .regbench.lock link: the lock itself is never written through one
    except RegbenchError:
        _rmdirs(made)
        raise
    names = set(os.listdir(folder))
    summary = _summary_bytes(folder)
    log = folder / "regbench.log"
    log_size = log.stat().st_size if log.is_file() and not log.is_symlink() else None
    try:
        held = lock(folder, kind)
    except RegbenchError:
        _rmdirs(made)
        raise
    return Claim(folder, held, kind, made, names, summary, log_size)


# ------------------------------------------------------------------------------------ the run's records
# Bookkeeping keys: where the data lies and whether it may be downloaded, threads, progress bar, device, the resume
# switch. They do not change what a run computes (threads and device at most its float rounding): a resume, and a
# re-run of a sweep that skips or resumes an earlier job's folder, may differ in them (README, "Sweeps").
BOOKKEEPING = ("data.root", "data.download", "trainer.num_threads", "trainer.progress_bar", "trainer.device",
               "trainer.resume")
# Keys that may differ between a run and its resumption: the bookkeeping keys, the optimizer implementation,
# compilation and the fast step (only the float rounding changes: resuming across them is exact to that, see
# regbench.accel), and how often validation runs.
RESUME_MAY_DIFFER = (*BOOKKEEPING, "trainer.fused", "trainer.compile", "trainer.fast_step", "trainer.eval_every")


def prepare_run_dir(run_dir: Path, resume: bool) -> bool:
    """Refuse to overwrite an earlier run (or to write through a planted link); return True if this call resumes
    one."""
    refuse_links(run_dir)
    summary_path = run_dir / "summary.json"
    has_results = summary_path.exists() or (run_dir / "metrics.csv").exists()
    if not has_results:
        return False
    status = None
    try:

        status = Summary.load(summary_path).status
    except (OSError, ValueError) as e:
        if isinstance(e, RegbenchError):
            raise  # a FIFO, a huge file: one line
        status = None
    if status == "completed":
        raise RegbenchError(f"{run_dir} already holds the results of a completed run; refusing to overwrite them; "
                            "fix: choose a new folder with hydra.run.dir=...")
    if not resume:
        raise RegbenchError(f"{run_dir} already holds the results of an unfinished run (status {status}); "
                            "refusing to overwrite them; fix: continue it with trainer.resume=true "
                            f"(or `regbench resume {run_dir}`), or choose a new folder with hydra.run.dir=...")
    return True
