"""Crash-safe checkpoints and exact resume.

Layout of ``<run>/checkpoints/``: ``epoch_NNNN.pt`` (the last ``trainer.keep_last`` kept), ``last.pt`` and
``best.pt`` (hard links to epoch files, so nothing is written twice). Every file is written atomically (temp
file + fsync + rename), so a SIGKILL at any moment leaves the previous checkpoint intact. A checkpoint holds
everything the next epoch depends on — model, optimizer, schedule, AMP scaler, regularizer state (early
stopping, snapshots), best-so-far, every RNG state (as tensors and primitives), the resolved config — and is
loaded with ``torch.load(weights_only=True)`` only, after :mod:`regbench.safe_load`'s checks (a regular file of at
most CHECKPOINT_LIMIT bytes, uncompressed zip records, no refused global in its pickle).
"""

from __future__ import annotations

import io
import logging
import os
import random
import re
import shutil
import signal
import struct
import time
import zipfile
import zlib
from pathlib import Path
from typing import Any, Callable, Optional

import numpy as np
import torch

from regbench.errors import ConfigError, RegbenchError
from regbench.io import LogWriteError, atomic_write, write_bytes
from regbench.safe_load import CHECKPOINT, UnsafeFileError, load_weights_only
from regbench.speed import FastPath, failure

log = logging.getLogger(__name__)

EPOCH_FILE = re.compile(r"^epoch_(\d+)\.pt$")
# The most bytes regbench reads from one checkpoint file: a generous fixed bound (the checkpoint's model is not
# known when a transfer source is read). torchvision's largest model, regnet_y_128gf, is 2.6 GB of float32; with
# Adam's two moments 7.8 GB; 32 GiB leaves room for snapshot ensembles and bagging members, and refuses sparse or
# runaway files far beyond anything regbench writes.
CHECKPOINT_LIMIT = 32 << 30


# The test hooks' forms: REGBENCH_FAULT=<point>:<epoch> (the points are fault_point's names: after_metrics, ...,
# after_member_record_<id>, after_ensemble_row, ...) or during_write:<file name> (io.py); REGBENCH_PAUSE=<epoch>:<s>.
_HOOK_FORMS = {"REGBENCH_FAULT": re.compile(r"^(?:[a-z][a-z0-9_]*:\d+|during_write:[^/\x00]+)$"),
               "REGBENCH_PAUSE": re.compile(r"^\d{1,9}:\d{1,6}(?:\.\d{1,6})?$")}  # at most ~11 days of sleep


def check_test_hooks() -> None:
    """ConfigError (one line) for a set test-hook variable whose value is malformed: it would be ignored, or end
    in a traceback at the hook. Called before a command writes anything, and by :func:`fault_point` itself."""
    for var, form in _HOOK_FORMS.items():
        value = os.environ.get(var)
        if value and not form.match(value):
            expected = ("<point>:<epoch> (e.g. after_checkpoint:2) or during_write:<file name> (a crash-safety "
                        "test hook: regbench SIGKILLs itself there)" if var == "REGBENCH_FAULT" else
                        "<epoch>:<seconds>, e.g. 1:30 (a test hook: regbench sleeps after that epoch)")
            raise ConfigError(var, value, expected, f"unset it (unset {var}): it is for regbench's own tests")


def fault_point(name: str, epoch: int, settle: Optional[Callable[[], None]] = None) -> None:
    """Testing hooks: ``REGBENCH_FAULT=<name>:<epoch>`` SIGKILLs this process here (crash-safety tests);
    ``REGBENCH_PAUSE=<epoch>:<seconds>`` sleeps after that epoch's summary, so the SLURM tests can interrupt a
    run at a known epoch (a resumed run does not repeat the epoch, so it does not pause again; a sleep changes
    nothing a run computes). ``settle`` (a background writer's wait) runs first when a hook acts here, so the
    disk holds what a synchronous run would have written by this point. A malformed value is a ConfigError."""
    if not (os.environ.get("REGBENCH_FAULT") or os.environ.get("REGBENCH_PAUSE")):
        return
    check_test_hooks()
    pause = os.environ.get("REGBENCH_PAUSE", "").split(":")
    kill = os.environ.get("REGBENCH_FAULT") == f"{name}:{epoch}"
    sleep = name == "after_summary" and len(pause) == 2 and pause[0] == str(epoch)
    if settle is not None and (kill or sleep):
        settle()
    if kill:
        os.kill(os.getpid(), signal.SIGKILL)
    if sleep:
        time.sleep(float(pause[1]))


# -------------------------------------------------------------------------------------------- files


def encode_checkpoint(state: dict) -> bytes:
    """The bytes of ``state`` as torch.save writes them, but with the zip's CRC-32 fields left zero (encoded now,
    in the training thread; :func:`save_checkpoint` fills them in the background writer before the write).

    Why: torch's zip writer computes each record's CRC-32 with miniz's table loop, ~0.5 GB/s — 3 of the 4.3 ms a
    lecture-MLP checkpoint takes to encode, on the thread that trains; zlib.crc32 in the writer thread costs the
    training nothing (it runs without the GIL). The written file is byte for byte what torch.save writes
    (tests/test_background_writer.py), ``.data/serialization_id`` included (its second half combines the CRCs).
    The CRC switch is torch's process-wide setting, off only during this call: a torch.save on another thread
    at the same moment would write zero CRCs too (regbench saves from one thread at a time)."""
    from torch.utils.serialization import config

    buf = io.BytesIO()
    was = config.save.compute_crc32
    config.save.compute_crc32 = False
    try:
        torch.save(state, buf)
    finally:
        config.save.compute_crc32 = was
    return buf.getvalue()


def fill_zip_crc(data: bytes) -> bytearray:
    """``data`` (a torch.save zip of stored, uncompressed records) with every record's CRC-32 computed: in its
    data descriptor (or local header) and its central-directory entry, and torch's serialization id made of
    them. Idempotent."""
    buf, view, combined = bytearray(data), memoryview(data), 0
    with zipfile.ZipFile(io.BytesIO(data)) as z:
        infos, pos = z.infolist(), z.start_dir
    for info in infos:
        head = info.header_offset
        if data[head:head + 4] != b"PK\x03\x04" or data[pos:pos + 4] != b"PK\x01\x02" or info.compress_type:
            raise ValueError(f"unexpected zip layout at record {info.filename}")
        name_len, extra_len = struct.unpack_from("<HH", data, head + 26)
        start = head + 30 + name_len + extra_len
        record = view[start:start + info.compress_size]
        if info.filename.endswith("/.data/serialization_id") and len(record) == 40 and bytes(record).isdigit():
            # torch's id: 20 digits hashing the record names, 20 combining the records' CRCs as c10::hash_combine
            buf[start + 20:start + 40] = b"%020d" % combined
            record = memoryview(buf)[start:start + 40]
        crc = zlib.crc32(record)
        if len(record):  # torch combines the CRCs of non-empty records
            combined = _hash_combine(combined, crc)
        if info.flag_bits & 0x08:  # a data descriptor after the data holds it (optionally after its signature)
            at = start + info.compress_size
            struct.pack_into("<I", buf, at + 4 if data[at:at + 4] == b"PK\x07\x08" else at, crc)
        else:
            struct.pack_into("<I", buf, head + 14, crc)
        struct.pack_into("<I", buf, pos + 16, crc)
        name_len, extra_len, comment_len = struct.unpack_from("<HHH", data, pos + 28)
        pos += 46 + name_len + extra_len + comment_len
    return buf  # written as it is: a second copy of a large checkpoint would only cost memory


class Complete(bytes):
    """A checkpoint file's complete bytes (torch.save's own, or with the CRCs filled): written as they are."""


def _torch_save_bytes(state: dict) -> Complete:
    buf = io.BytesIO()
    torch.save(state, buf)
    return Complete(buf.getvalue())


class CheckpointEncoder:
    """``encoder(state) -> bytes`` for :func:`save_checkpoint`, in the training thread: :func:`encode_checkpoint`'s
    bytes (CRCs filled by the writer), or torch.save's complete bytes once the encoder is off.

    A fast path of regbench.speed ("checkpoint encoder", summary.json ``checkpoint_impl``: ``encoder`` /
    ``torch.save``): only on the torch versions it was tested on; its first file is filled at once and compared
    byte for byte with torch.save's (one extra torch.save per run); any exception or difference turns it off for
    the rest of the run."""

    def __init__(self) -> None:
        self.path = FastPath("checkpoint encoder", "torch.save", key="checkpoint_impl",
                             impls=("encoder", "torch.save"), used=False)
        self.checked = False

    def speed_paths(self) -> list[FastPath]:
        return [self.path]

    def __call__(self, state: dict) -> bytes:
        self.path.used = True
        if self.path.on:
            try:
                data = encode_checkpoint(state)
                if self.checked:
                    return data
                filled, plain = fill_zip_crc(data), _torch_save_bytes(state)
                if filled == plain:
                    self.checked = True
                    return plain
                self.path.off("its first file is not torch.save's, byte for byte")
                return plain
            except Exception as e:  # noqa: BLE001 — torch.save (a state it cannot save raises there too)
                self.path.off(failure(e))
        return _torch_save_bytes(state)


def _hash_combine(seed: int, value: int) -> int:
    """c10::hash_combine on 64-bit size_t (torch's serialization id)."""
    mask = (1 << 64) - 1
    return seed ^ ((value + 0x9E3779B9 + ((seed << 6) & mask) + (seed >> 2)) & mask)


def save_checkpoint(path: Path, state: dict | bytes | bytearray) -> None:
    """Write a checkpoint atomically: a state dict, the bytes :func:`encode_checkpoint` made of one (their
    CRC-32 fields are filled here), or :class:`Complete` bytes (written as they are)."""
    if isinstance(state, (bytes, bytearray)):
        data = state if isinstance(state, Complete) else fill_zip_crc(state)
        atomic_write(path, lambda f: f.write(data))
    else:
        atomic_write(path, lambda f: torch.save(state, f))


def load_checkpoint(path: Path, map_location: str | torch.device = "cpu", limit: int = CHECKPOINT_LIMIT) -> dict:
    """Load a checkpoint with the safe unpickler only (tensors and primitives); never runs code from the file.
    Before torch reads it (:func:`regbench.safe_load.load_weights_only`): a regular file, not a link, at most
    ``limit`` bytes, a torch.save zip of uncompressed records whose pickle references no refused global."""
    return load_weights_only(Path(path), f"checkpoint {path}", CHECKPOINT, limit, map_location,
                             why="regbench's bound for one checkpoint" if limit == CHECKPOINT_LIMIT else "")


def write_epoch(ckpts: "Checkpoints", epoch: int, checkpoint: Optional[bytes], best: bool, summary_path: Path,
                summary: bytes, flush_events: Callable[[], None] = lambda: None) -> None:
    """An epoch's files in their crash-safe order: its TensorBoard events (``flush_events``: before its checkpoint,
    so a resume from that checkpoint never lacks them), its checkpoint (then last.pt/best.pt links, pruning), then
    summary.json (run by a run's background writer, or at once)."""
    flush_events()
    if checkpoint is not None:
        ckpts.save(epoch, checkpoint, best=best)
    write_bytes(summary_path, summary)


# ---------------------------------------------------------------------------------------------- RNG


def capture_rng(order: torch.Generator) -> dict[str, Any]:
    """Every RNG the next epoch draws from, as tensors and primitives (loadable with weights_only=True)."""
    py_version, py_state, py_gauss = random.getstate()
    np_kind, np_keys, np_pos, np_has_gauss, np_cached = np.random.get_state()
    state = {
        # Mersenne Twister words (< 2**32) and its position, as one tensor: a list of 625 ints costs torch.save's
        # pickler a Python call per int (~0.2 ms per checkpoint). Earlier checkpoints hold the list.
        "python": {"version": py_version, "state": torch.from_numpy(np.array(py_state, dtype=np.int64)),
                   "gauss": py_gauss},
        "numpy": {"kind": np_kind, "keys": torch.from_numpy(np_keys.astype(np.int64)), "pos": int(np_pos),
                  "has_gauss": int(np_has_gauss), "cached": float(np_cached)},
        "torch": torch.get_rng_state(),
        "order": order.get_state(),
        "order_device": str(order.device),
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def restore_rng(state: dict[str, Any], order: torch.Generator) -> None:
    p = state["python"]
    words = p["state"].tolist() if isinstance(p["state"], torch.Tensor) else p["state"]
    random.setstate((p["version"], tuple(words), p["gauss"]))
    n = state["numpy"]
    # .cpu(): a checkpoint is loaded onto the run's device, and the generators' states are CPU byte tensors.
    np.random.set_state((n["kind"], n["keys"].cpu().numpy().astype(np.uint32), n["pos"], n["has_gauss"],
                         n["cached"]))
    torch.set_rng_state(state["torch"].cpu())
    order.set_state(state["order"].cpu())
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all([s.cpu() for s in state["cuda"]])


# -------------------------------------------------------------------------------------------- folder


class Checkpoints:
    """Writes, links, prunes and finds the checkpoints of one run folder."""

    def __init__(self, folder: Path, keep_last: int):
        self.folder = folder
        self.keep_last = keep_last

    def epoch_files(self) -> list[tuple[int, Path]]:
        if not self.folder.is_dir():
            return []
        found = [(int(m.group(1)), p) for p in self.folder.iterdir() if (m := EPOCH_FILE.match(p.name))]
        return sorted(found, reverse=True)

    def save(self, epoch: int, state: dict | bytes, best: bool, prune: bool = True) -> None:
        """Write epoch ``epoch``'s checkpoint, link last.pt (and best.pt); with ``prune``, drop the epochs beyond
        keep_last (a stack prunes only once every member has written the epoch: :meth:`prune`)."""
        path = self.folder / f"epoch_{epoch:04d}.pt"
        save_checkpoint(path, state)
        fault_point("after_checkpoint", epoch)
        self._link(path, "last.pt")
        if best:
            self._link(path, "best.pt")
        if prune:
            self.prune()

    def prune(self) -> None:
        for _, old in self.epoch_files()[self.keep_last:]:
            old.unlink(missing_ok=True)  # best.pt keeps its own link to the data

    def _link(self, target: Path, name: str) -> None:
        tmp = self.folder / f".{name}.tmp-{os.getpid()}"
        tmp.unlink(missing_ok=True)
        try:
            try:
                os.link(target, tmp)
            except OSError:  # a file system without hard links: copy instead
                shutil.copyfile(target, tmp)
            os.replace(tmp, self.folder / name)
        except OSError as e:
            tmp.unlink(missing_ok=True)
            raise LogWriteError(f"cannot write {self.folder / name}: {e.strerror or e}; fix: make the run folder "
                                "writable and free disk space") from None

    def clean_temporaries(self) -> None:
        """Remove half-written temp files a killed process left behind (the real files are intact)."""
        for p in self.folder.glob(".*.tmp-*"):
            p.unlink(missing_ok=True)

    def load_latest(self, map_location, at_most: Optional[int] = None) -> tuple[Optional[dict], list[str]]:
        """The newest checkpoint that loads (not after epoch ``at_most`` when given), falling back to older ones;
        plus a warning per unreadable file."""
        problems = []
        for epoch, path in self.epoch_files():
            if at_most is not None and epoch > at_most:
                continue
            try:
                state = load_checkpoint(path, map_location)
            except UnsafeFileError as e:  # made to run code, not torn by a crash: no quiet fall-back past it
                raise RegbenchError(f"{e}; refusing to resume a run folder that holds it (remove {path} to resume "
                                    "from the checkpoint before it)") from None
            except RegbenchError as e:
                problems.append(f"{e} — falling back to the previous checkpoint")
                continue
            if not isinstance(state, dict) or state.get("epoch") != epoch:
                problems.append(f"checkpoint {path}: not a regbench checkpoint of epoch {epoch} — falling back")
                continue
            return state, problems
        return None, problems


def config_differences(saved: dict, current: dict, ignore: tuple[str, ...], prefix: str = "") -> list[str]:
    """Dotted keys whose values differ between two resolved configs (ignoring ``ignore``)."""
    out = []
    for key in sorted(set(saved) | set(current)):
        dotted = f"{prefix}{key}"
        if dotted in ignore:
            continue
        a, b = saved.get(key, "<absent>"), current.get(key, "<absent>")
        if isinstance(a, dict) and isinstance(b, dict):
            out.extend(config_differences(a, b, ignore, dotted + "."))
        elif a != b:
            out.append(f"{dotted} ({a!r} in the checkpoint, {b!r} now)")
    return out
