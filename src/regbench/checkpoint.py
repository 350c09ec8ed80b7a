"""Crash-safe checkpoints and exact resume.

Layout of ``<run>/checkpoints/``: ``epoch_NNNN.pt`` (the last ``trainer.keep_last`` kept), ``last.pt`` and
``best.pt`` (hard links to epoch files, so nothing is written twice). Every file is written atomically (temp
file + fsync + rename), so a SIGKILL at any moment leaves the previous checkpoint intact. A checkpoint holds
everything the next epoch depends on — model, optimizer, schedule, AMP scaler, regularizer state (early
stopping, snapshots), best-so-far, every RNG state (as tensors and primitives), the resolved config — and is
loaded with ``torch.load(weights_only=True)`` only.
"""

from __future__ import annotations

import io
import logging
import os
import pickle
import random
import re
import shutil
import signal
import time
import warnings
import zipfile
from pathlib import Path
from typing import Any, Callable, Optional

import numpy as np
import torch

from regbench.errors import RegbenchError
from regbench.io import LogWriteError, atomic_write, write_bytes

log = logging.getLogger(__name__)

EPOCH_FILE = re.compile(r"^epoch_(\d+)\.pt$")


def fault_point(name: str, epoch: int, settle: Optional[Callable[[], None]] = None) -> None:
    """Testing hooks: ``REGBENCH_FAULT=<name>:<epoch>`` SIGKILLs this process here (crash-safety tests);
    ``REGBENCH_PAUSE=<epoch>:<seconds>`` sleeps after that epoch's summary, so the SLURM tests can interrupt a
    run at a known epoch (a resumed run does not repeat the epoch, so it does not pause again; a sleep changes
    nothing a run computes). ``settle`` (a background writer's wait) runs first when a hook acts here, so the
    disk holds what a synchronous run would have written by this point."""
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
    """The bytes of ``state`` as torch.save writes them (encoded now; written later by a background writer)."""
    buf = io.BytesIO()
    torch.save(state, buf)
    return buf.getvalue()


def save_checkpoint(path: Path, state: dict | bytes) -> None:
    """Write a checkpoint atomically: a state dict, or the bytes :func:`encode_checkpoint` made of one."""
    if isinstance(state, bytes):
        atomic_write(path, lambda f: f.write(state))
    else:
        atomic_write(path, lambda f: torch.save(state, f))


def load_checkpoint(path: Path, map_location: str | torch.device = "cpu") -> dict:
    """Load a checkpoint with the safe unpickler only (tensors and primitives); never runs code from the file."""
    try:
        with warnings.catch_warnings():  # torch warns about the pickle protocol of a raw pickle before refusing it
            warnings.simplefilter("ignore", UserWarning)
            return torch.load(path, map_location=map_location, weights_only=True)
    except FileNotFoundError:
        raise RegbenchError(f"checkpoint {path}: no such file") from None
    except pickle.UnpicklingError as e:  # the safe unpickler refused something: code, or a foreign object
        path = Path(path)
        if not zipfile.is_zipfile(path) and path.read_bytes()[:1] == b"\x80":  # a bare pickle stream (PROTO)
            raise RegbenchError(f"checkpoint {path}: cannot be loaded safely (it is a raw pickle file, not a "
                                "torch.save checkpoint; regbench never unpickles files, which could run code); fix: "
                                "use a checkpoint written by regbench") from None
        found = re.search(r"GLOBAL ([\w.]+)", str(e))
        what = f"it references {found.group(1)}" if found else str(e).strip().splitlines()[-1][:160]
        raise RegbenchError(f"checkpoint {path}: cannot be loaded safely ({what}, which the weights-only loader "
                            "refuses; regbench never loads checkpoints unsafely); fix: use a checkpoint written by "
                            "regbench from a source you trust") from None
    except Exception as e:  # truncated or corrupt file
        reason = str(e).strip().splitlines()[0].split(". This is an internal")[0][:160]
        raise RegbenchError(f"checkpoint {path}: cannot be loaded safely (truncated or corrupt: {reason}); "
                            "fix: delete it, or use another checkpoint written by regbench") from None


def write_epoch(ckpts: "Checkpoints", epoch: int, checkpoint: Optional[bytes], best: bool, summary_path: Path,
                summary: bytes) -> None:
    """An epoch's files in their crash-safe order: its checkpoint (then last.pt/best.pt links, pruning), then
    summary.json (run by a run's background writer, or at once)."""
    if checkpoint is not None:
        ckpts.save(epoch, checkpoint, best=best)
    write_bytes(summary_path, summary)


# ---------------------------------------------------------------------------------------------- RNG


def capture_rng(order: torch.Generator) -> dict[str, Any]:
    """Every RNG the next epoch draws from, as tensors and primitives (loadable with weights_only=True)."""
    py_version, py_state, py_gauss = random.getstate()
    np_kind, np_keys, np_pos, np_has_gauss, np_cached = np.random.get_state()
    state = {
        "python": {"version": py_version, "state": list(py_state), "gauss": py_gauss},
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
    random.setstate((p["version"], tuple(p["state"]), p["gauss"]))
    n = state["numpy"]
    np.random.set_state((n["kind"], n["keys"].numpy().astype(np.uint32), n["pos"], n["has_gauss"], n["cached"]))
    torch.set_rng_state(state["torch"])
    order.set_state(state["order"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


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
