"""Crash-safe checkpoints and exact resume.

Layout of ``<run>/checkpoints/``: ``epoch_NNNN.pt`` (the last ``trainer.keep_last`` kept), ``last.pt`` and
``best.pt`` (hard links to epoch files, so nothing is written twice). Every file is written atomically (temp
file + fsync + rename), so a SIGKILL at any moment leaves the previous checkpoint intact. A checkpoint holds
everything the next epoch depends on — model, optimizer, schedule, AMP scaler, regularizer state (early
stopping, snapshots), best-so-far, every RNG state (as tensors and primitives), the resolved config — and is
loaded with ``torch.load(weights_only=True)`` only.
"""

from __future__ import annotations

import logging
import os
import random
import re
import shutil
import signal
import time
from pathlib import Path
from typing import Any, Optional

import numpy as np
import torch

from regbench.errors import RegbenchError
from regbench.logs import LogWriteError, load_checkpoint, save_checkpoint

log = logging.getLogger(__name__)

EPOCH_FILE = re.compile(r"^epoch_(\d+)\.pt$")


def fault_point(name: str, epoch: int) -> None:
    """Testing hooks: ``REGBENCH_FAULT=<name>:<epoch>`` SIGKILLs this process here (crash-safety tests);
    ``REGBENCH_PAUSE=<epoch>:<seconds>`` sleeps after that epoch's summary, so the SLURM tests can interrupt a
    run at a known epoch (a resumed run does not repeat the epoch, so it does not pause again; a sleep changes
    nothing a run computes)."""
    if os.environ.get("REGBENCH_FAULT") == f"{name}:{epoch}":
        os.kill(os.getpid(), signal.SIGKILL)
    pause = os.environ.get("REGBENCH_PAUSE", "").split(":")
    if name == "after_summary" and len(pause) == 2 and pause[0] == str(epoch):
        time.sleep(float(pause[1]))


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


# -------------------------------------------------------------------------------------------- files


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

    def save(self, epoch: int, state: dict, best: bool) -> None:
        path = self.folder / f"epoch_{epoch:04d}.pt"
        save_checkpoint(path, state)
        fault_point("after_checkpoint", epoch)
        self._link(path, "last.pt")
        if best:
            self._link(path, "best.pt")
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

    def load_latest(self, map_location) -> tuple[Optional[dict], list[str]]:
        """The newest checkpoint that loads, falling back to older ones; plus a warning per unreadable file."""
        warnings = []
        for epoch, path in self.epoch_files():
            try:
                state = load_checkpoint(path, map_location)
            except RegbenchError as e:
                warnings.append(f"{e} — falling back to the previous checkpoint")
                continue
            if not isinstance(state, dict) or state.get("epoch") != epoch:
                warnings.append(f"checkpoint {path}: not a regbench checkpoint of epoch {epoch} — falling back")
                continue
            return state, warnings
        return None, warnings


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
