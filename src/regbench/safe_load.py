"""Loading binary files someone else may have written — checkpoints, ``model.weights`` state dicts — with checks
torch's weights-only loader does not make, done before torch reads a byte of them.

:func:`read_regular` reads a regular file only: never through a symbolic link (``lstat`` + ``O_NOFOLLOW``),
never a FIFO or device (opened non-blocking, checked with ``fstat``), never more than a size bound. The bytes
are then checked and loaded from memory, so what was checked is what torch reads. A torch.save zip must hold
uncompressed (stored) records only, as torch.save writes them: a deflated record lets a 1 MB file inflate to
gigabytes inside torch. The pickle in it (or torch's pre-1.6 non-zip layout, where accepted) is scanned without
running it (:mod:`pickletools`): a global the weights-only loader does not allow is refused by name, whatever
the pickle protocol (torch's own refusal names none for protocols 0, 4 and 5), and its storages may not claim
more bytes than the file holds. Only then does ``torch.load(weights_only=True)`` run — still the gate; the scan
only names what it refuses and keeps torch from reading hostile bytes at all.
"""

from __future__ import annotations

import _compat_pickle
import io
import os
import pickle
import pickletools
import stat
import struct
import warnings
import zipfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional

from regbench.errors import RegbenchError

PICKLE_LIMIT = 64 << 20  # bytes of a zip's data.pkl: a 300-epoch checkpoint's is ~0.5 MB, torchvision's < 0.1 MB
LEGACY_MAGIC = 0x1950A86A20F9469CFC6C  # the first pickle of torch's pre-1.6 (non-zip) torch.save layout
_ELEMENT_BYTES = {"Double": 8, "Float": 4, "Half": 2, "BFloat16": 2, "Long": 8, "Int": 4, "Short": 2, "Char": 1,
                  "Byte": 1, "Bool": 1, "ComplexDouble": 16, "ComplexFloat": 8, "Untyped": 1}


@dataclass(frozen=True)
class Kind:
    """What a file is to regbench: how the one-line refusals name it and how to fix them."""

    noun: str  # "checkpoints": "regbench never loads checkpoints unsafely"
    one: str  # "checkpoint": "it is a raw pickle file, not a torch.save checkpoint"
    fix: str  # the fix of a file that is not what regbench (or torch.save of a state dict) writes
    legacy: bool  # torch's pre-1.6 non-zip layout accepted (torchvision's older weights files use it)


CHECKPOINT = Kind("checkpoints", "checkpoint", "use a checkpoint written by regbench from a source you trust", legacy=False)
WEIGHTS = Kind("weights files", "state dict", "use a state dict saved with torch.save(model.state_dict(), path) from a source "
               "you trust", legacy=True)


def check_regular(path: Path, subject: str, kind: Kind, limit: Optional[int] = None, why: str = "") -> None:
    """RegbenchError (one line) unless ``path`` is a regular file, not a link (of at most ``limit`` bytes)."""
    try:
        st = os.lstat(path)
    except FileNotFoundError:
        raise RegbenchError(f"{subject}: no such file") from None
    except OSError as e:
        raise RegbenchError(f"{subject}: cannot be read ({e.strerror or e}); fix: {kind.fix}") from None
    _check_stat(st, path, limit, subject, kind, why)


def read_regular(path: Path, limit: int, subject: str, kind: Kind, why: str = "") -> bytes:
    """The bytes of the regular file ``path`` (not a link, FIFO, device or folder; at most ``limit`` bytes;
    ``why``: what the bound is, for the refusal)."""
    check_regular(path, subject, kind, limit, why)
    flags = os.O_RDONLY | getattr(os, "O_NOFOLLOW", 0) | getattr(os, "O_NONBLOCK", 0) | getattr(os, "O_CLOEXEC", 0)
    try:
        fd = os.open(path, flags)  # a link or FIFO put there since the lstat: ELOOP, or no blocking open
    except OSError as e:
        raise RegbenchError(f"{subject}: cannot be read ({e.strerror or e}); fix: {kind.fix}") from None
    with os.fdopen(fd, "rb") as f:
        st = os.fstat(f.fileno())
        _check_stat(st, path, limit, subject, kind, why)
        data = f.read(st.st_size + 1)  # a file that grows meanwhile: at most one byte more than the bound
    if len(data) > limit:
        raise _too_large(len(data), limit, subject, kind, why)
    return data


def _check_stat(st: os.stat_result, path: Path, limit: Optional[int], subject: str, kind: Kind, why: str) -> None:
    mode = st.st_mode
    if stat.S_ISLNK(mode):
        raise RegbenchError(f"{subject}: is a symbolic link (to {os.readlink(path)}); regbench reads {kind.noun} "
                            "only from regular files, never through a link; fix: give the file itself")
    if not stat.S_ISREG(mode):
        what = ("a folder" if stat.S_ISDIR(mode) else "a FIFO" if stat.S_ISFIFO(mode) else "a socket"
                if stat.S_ISSOCK(mode) else "a device" if stat.S_ISCHR(mode) or stat.S_ISBLK(mode) else "special")
        raise RegbenchError(f"{subject}: is {what}, not a regular file; regbench reads {kind.noun} only from "
                            f"regular files; fix: {kind.fix}")
    if limit is not None and st.st_size > limit:
        raise _too_large(st.st_size, limit, subject, kind, why)


def _too_large(size: int, limit: int, subject: str, kind: Kind, why: str) -> RegbenchError:
    return RegbenchError(f"{subject}: is {size:,} bytes, more than the {limit:,} regbench reads from one of its "
                         f"{kind.noun}{f' ({why})' if why else ''}; fix: {kind.fix}")


# --------------------------------------------------------------------------------------- the one line


class UnsafeFileError(RegbenchError):
    """A file whose pickle references a global the weights-only loader refuses: made to run code, not damaged."""


def refused(subject: str, kind: Kind, names: list[str], reason: str = "") -> RegbenchError:
    """The one line refusing a file whose pickle the weights-only loader does not load: it names the refused
    globals (the first three, in the pickle's order) when it references any, else torch's reason (cut before any
    advice torch gives)."""
    if names:
        more = f" and {len(names) - 3} more" if len(names) > 3 else ""
        why = f"it references {', '.join(names[:3])}{more}, which the weights-only loader refuses"
    else:
        reason = reason.split("WeightsUnpickler error:")[-1].strip()
        reason = (reason.splitlines() or [""])[0].split(" Please ")[0].split("weights_only")[0].strip(" .;(")
        why = f"the weights-only loader refuses it: {reason[:160] or 'an object it cannot load'}"
    error = UnsafeFileError if names else RegbenchError
    return error(f"{subject}: cannot be loaded safely ({why}; regbench never loads {kind.noun} unsafely); "
                 f"fix: {kind.fix}")


def corrupt(subject: str, kind: Kind, reason: str) -> RegbenchError:
    reason = (reason.strip().splitlines() or ["unreadable"])[0].split(". This is an internal")[0][:160]
    return RegbenchError(f"{subject}: cannot be loaded safely (truncated or corrupt: {reason}); fix: {kind.fix}")


# --------------------------------------------------------------------------------------------- loading


def load_weights_only(path: Path, subject: str, kind: Kind, limit: int, map_location: Any = "cpu",
                      why: str = "") -> Any:
    """``torch.load(weights_only=True)`` of ``path`` after every check above; RegbenchError (one line) if refused.
    ``subject`` starts each line; ``limit`` bounds the file's size (``why``: what that bound is)."""
    import torch

    data = read_regular(Path(path), limit, subject, kind, why)
    if zipfile.is_zipfile(io.BytesIO(data)):
        scan = scan_pickles(io.BytesIO(_zip_pickle(data, subject, kind)), 1)
    else:
        scan = scan_pickles(io.BytesIO(data), 5)
        if scan.refused:
            raise refused(subject, kind, scan.refused)
        if not scan.results or scan.results[0] != LEGACY_MAGIC:
            if data[:1] == b"\x80" or scan.results:
                raise RegbenchError(f"{subject}: cannot be loaded safely (it is a raw pickle file, not a torch.save "
                                    f"{kind.one}; regbench never unpickles files, which could run code); fix: {kind.fix}")
            raise corrupt(subject, kind, "not a torch.save file (no zip archive)")
        if not kind.legacy:
            raise RegbenchError(f"{subject}: cannot be loaded safely (it is in torch's pre-1.6 non-zip format, which "
                                f"regbench never writes); fix: {kind.fix}")
    if scan.refused:
        raise refused(subject, kind, scan.refused)
    if scan.storage_bytes > len(data):
        raise corrupt(subject, kind, f"its tensors claim {scan.storage_bytes:,} bytes, the file holds {len(data):,}")
    try:
        with warnings.catch_warnings():  # torch warns about a raw pickle's protocol before refusing it
            warnings.simplefilter("ignore", UserWarning)
            return torch.load(io.BytesIO(data), map_location=map_location, weights_only=True)
    except pickle.UnpicklingError as e:
        raise refused(subject, kind, [], str(e)) from None
    except Exception as e:  # noqa: BLE001 - truncated or corrupt: torch's zip reader and rebuilders raise anything
        raise corrupt(subject, kind, str(e) or type(e).__name__) from None


def _zip_pickle(data: bytes, subject: str, kind: Kind) -> bytes:
    """The data.pkl record of a torch.save zip, after checking every record is stored (uncompressed), unique,
    where its local header says, and that the records fit in the file."""
    try:
        with zipfile.ZipFile(io.BytesIO(data)) as z:
            infos = z.infolist()
    except (zipfile.BadZipFile, ValueError, OSError, EOFError, struct.error) as e:
        raise corrupt(subject, kind, f"bad zip archive: {e}") from None
    names, total, pickle_at = set(), 0, None
    for info in infos:
        if info.compress_type != zipfile.ZIP_STORED:
            raise RegbenchError(f"{subject}: cannot be loaded safely (its record {info.filename} is compressed "
                                f"(zip method {info.compress_type}); torch.save writes uncompressed records only, "
                                f"and a compressed one can inflate to gigabytes); fix: {kind.fix}")
        head = info.header_offset
        if (info.filename in names or info.compress_size != info.file_size or data[head:head + 4] != b"PK\x03\x04"
                or struct.unpack_from("<H", data, head + 8)[0] != 0):
            raise corrupt(subject, kind, f"inconsistent zip record {info.filename}")
        names.add(info.filename)
        total += info.file_size
        if info.filename.endswith("/data.pkl") and pickle_at is None:
            name_len, extra_len = struct.unpack_from("<HH", data, head + 26)
            pickle_at = (head + 30 + name_len + extra_len, info.file_size)
    if total > len(data):
        raise corrupt(subject, kind, f"its zip records claim {total:,} bytes, the file holds {len(data):,}")
    if pickle_at is None:
        raise corrupt(subject, kind, "no data.pkl record in its zip archive")
    if pickle_at[1] > PICKLE_LIMIT:
        raise corrupt(subject, kind, f"its data.pkl is {pickle_at[1]:,} bytes (at most {PICKLE_LIMIT:,})")
    return data[pickle_at[0]:pickle_at[0] + pickle_at[1]]


# ------------------------------------------------------------------------------------ the pickle scan


class Global(str):
    """A ``module.name`` a pickle references."""


_MARK = object()
_VALUE_OPS = {"INT", "BININT", "BININT1", "BININT2", "LONG", "LONG1", "LONG4", "FLOAT", "BINFLOAT", "STRING",
              "BINSTRING", "SHORT_BINSTRING", "UNICODE", "BINUNICODE", "SHORT_BINUNICODE", "BINUNICODE8",
              "BINBYTES", "SHORT_BINBYTES", "BINBYTES8"}
_CONSTANTS = {"NONE": None, "NEWTRUE": True, "NEWFALSE": False, "EMPTY_TUPLE": ()}


@dataclass
class Scan:
    refused: list[str]  # globals the weights-only loader does not allow, in order
    results: list[Any]  # each complete pickle's value, where a constant (ints, strings, tuples of them)
    storage_bytes: int  # bytes the tensors' storages claim (persistent ids), each storage once


def allowed_globals() -> set[str]:
    """What torch's weights-only loader allows (its own table; a prefix rule if a torch version lacks it)."""
    try:
        from torch import _weights_only_unpickler as w

        return set(w._get_allowed_globals()) | set(w._get_user_allowed_globals())
    except (ImportError, AttributeError):  # pragma: no cover - another torch's internals
        return set()


def _global(module: Any, name: Any) -> Global:
    if not isinstance(module, str) or not isinstance(name, str):
        return Global("an object built at load time")
    if (module, name) in _compat_pickle.NAME_MAPPING:  # Python 2 names (protocols 0-2), as torch maps them
        module, name = _compat_pickle.NAME_MAPPING[(module, name)]
    module = _compat_pickle.IMPORT_MAPPING.get(module, module)
    return Global(f"{module}.{name}")


def scan_pickles(stream: io.BytesIO, count: int) -> Scan:
    """Walk up to ``count`` consecutive pickles of ``stream`` without running them (a stack of constants and
    placeholders); stops quietly at bytes that are no pickle (torch's raw storage data after the pickles)."""
    allowed = allowed_globals()
    ok = (lambda g: g in allowed) if allowed else (lambda g: g.startswith("torch.") or g == "collections.OrderedDict")
    scan, storages = Scan([], [], 0), {}
    for _ in range(count):
        stack: list[Any] = []
        memo: dict[Any, Any] = {}
        try:
            for op, arg, _pos in pickletools.genops(stream):
                _step(op, arg, stack, memo, scan, storages, ok)
        except Exception:  # noqa: BLE001 - not a pickle (any more): what was found so far stands
            break
        scan.results.append(stack[-1] if stack else None)
    scan.storage_bytes = sum(storages.values())
    return scan


def _step(op, arg, stack: list, memo: dict, scan: Scan, storages: dict, ok) -> None:
    name = op.name
    if name in ("GLOBAL", "INST", "STACK_GLOBAL"):
        if name == "STACK_GLOBAL":
            qualname, module = stack.pop(), stack.pop()
        else:
            module, qualname = arg.split(" ", 1)
            if name == "INST":
                _pop_mark(stack)
        g = _global(module, qualname)
        if not ok(g) and len(scan.refused) < 8 and g not in scan.refused:  # a bounded list: linear in the pickle
            scan.refused.append(g)
        stack.append(g)
    elif name == "MARK":
        stack.append(_MARK)
    elif name in _VALUE_OPS:
        stack.append(arg)
    elif name in _CONSTANTS:
        stack.append(_CONSTANTS[name])
    elif name in ("PUT", "BINPUT", "LONG_BINPUT"):
        memo[arg] = stack[-1]
    elif name == "MEMOIZE":
        memo[len(memo)] = stack[-1]
    elif name in ("GET", "BINGET", "LONG_BINGET"):
        stack.append(memo.get(arg))
    elif name == "TUPLE":
        stack.append(tuple(_pop_mark(stack)))
    elif name in ("TUPLE1", "TUPLE2", "TUPLE3"):
        n = int(name[-1])
        items = tuple(stack[-n:])
        del stack[-n:]
        stack.append(items)
    elif name in ("PERSID", "BINPERSID"):
        _storage(arg if name == "PERSID" else stack.pop(), storages)
        stack.append(None)
    elif name != "STOP":
        before = op.stack_before
        if pickletools.markobject in before:
            _pop_mark(stack)
            before = before[:before.index(pickletools.markobject)]
        if before:
            del stack[-len(before):]
        stack.extend([None] * len(op.stack_after))


def _pop_mark(stack: list) -> list:
    """The items above the topmost MARK (popped with it). Searched from the top: every item passed over is popped
    too, so a whole scan stays linear in the pickle's length (a search from the bottom made a hostile pickle of
    many MARK-closing ops quadratic: minutes for a 1 MB file)."""
    at = len(stack) - 1
    while at >= 0 and stack[at] is not _MARK:
        at -= 1
    if at < 0:
        raise ValueError("a MARK-closing opcode without a MARK")
    items = stack[at + 1:]
    del stack[at:]
    return items


def _storage(pid: Any, storages: dict) -> None:
    """A tensor storage's bytes from its persistent id: ('storage', <type>, key, location, numel[, view])."""
    if isinstance(pid, tuple) and len(pid) in (5, 6) and pid[0] in ("storage", b"storage"):
        kind, numel = pid[1], pid[4]
        if isinstance(numel, int) and not isinstance(numel, bool) and numel >= 0:
            dtype = kind.rsplit(".", 1)[-1].removesuffix("Storage") if isinstance(kind, str) else ""
            key = pid[2] if isinstance(pid[2], (str, bytes, int)) else id(pid)
            storages[key] = max(storages.get(key, 0), numel * _ELEMENT_BYTES.get(dtype, 16))
