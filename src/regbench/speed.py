"""The speed wing's one policy: where regbench calls torch internals to save time, which torch versions that was
tested on, and what a run does anywhere else or when such a call misbehaves. A fast path can only make a run
faster; it never changes a result and never fails a run.

The fast paths (each replaces a public path and is bitwise equal to it where it runs):

========================  ======================================================  ============================
fast path                 torch internals it calls                                public path it falls back to
========================  ======================================================  ============================
direct step               ATen backward kernels by name (regbench.faststep)       autograd (``step_impl``)
direct optimizer step     ``torch._fused_adam_/_fused_adamw_/_fused_sgd_``        ``optimizer.step()``
                          (regbench.fastoptim; also the stacked shared step)
checkpoint encoder        torch.save's CRC switch; the zip CRCs and serialization  ``torch.save``
                          id filled by regbench (regbench.checkpoint)              (``checkpoint_impl``)
TensorBoard batch write   ``SummaryWriter._get_file_writer()`` (regbench.logs)    ``SummaryWriter.add_scalar``
fused-kernel probe        ``torch.utils._foreach_utils`` (regbench.accel)         torch's default implementation
========================  ======================================================  ============================

The policy, the same for each:

1. **The gate.** A fast path runs only on the torch versions in :data:`TESTED` (the minor versions the test
   suite ran it on; any patch release of one). Elsewhere its public path runs, and ONE warning line per process
   names the torch version and the tested ones (:func:`gate`).
2. **A first-use self-check** where it is cheap: the direct step's first step is compared bit for bit with
   autograd's, the direct optimizer step's first direct call with ``optimizer.step()``, the checkpoint encoder's
   first file with torch.save's bytes. The fast path takes over only after its check passed.
3. **A fall-back, never a failure.** Any exception in a fast path, or a failed check, turns it off for the rest
   of the run (:meth:`FastPath.off`): its public path redoes the work from the state before the failed call, one
   warning line says which path and why, and summary.json records the path that ran (``step_impl``,
   ``checkpoint_impl``) and the line (``warnings``).
"""

from __future__ import annotations

import logging
import re
from typing import Any, Callable, Iterable, Optional

import torch

log = logging.getLogger(__name__)

# Fast path -> the torch minor versions regbench's suite ran it on (CI: tests/test_faststep.py, test_accel.py,
# test_background_writer.py, test_speed.py). A new torch minor is added here once the suite passed on it.
TESTED: dict[str, tuple[str, ...]] = {
    "direct step": ("2.10", "2.14"),
    "direct optimizer step": ("2.10", "2.14"),
    "checkpoint encoder": ("2.10", "2.14"),
    "TensorBoard batch write": ("2.10", "2.14"),
    "fused-kernel probe": ("2.10", "2.14"),
}

_gate_logged: set[str] = set()  # torch versions whose gate line this process has logged


def torch_version() -> str:
    """torch's version as it reports it (read at each call: tests fake it)."""
    return str(torch.__version__)


def _minor(version: str) -> Optional[str]:
    m = re.match(r"(\d+)\.(\d+)", version)
    return f"{m.group(1)}.{m.group(2)}" if m else None


def gate(path: str) -> Optional[str]:
    """None where fast path ``path`` may run on this torch; else why not (the first time in this process, also
    logged as one warning line naming every fast path)."""
    version = torch_version()
    tested = TESTED[path]
    if _minor(version) in tested:
        return None
    why = (f"torch {version} is not a version regbench's fast paths were tested on "
           f"({', '.join(t + '.x' for t in tested)})")
    if version not in _gate_logged:
        _gate_logged.add(version)
        log.warning("warning: %s: the %s run torch's public paths instead (slower, same results)", why,
                    ", ".join(TESTED))
    return why


def failure(e: BaseException) -> str:
    """An exception as one short phrase for a fall-back's warning line."""
    text = str(e).strip().splitlines()[0] if str(e).strip() else ""
    return f"{type(e).__name__}: {text[:160]}" if text else type(e).__name__


class FastPath:
    """One run's use of one fast path: on from its start (unless the gate keeps it off) until :meth:`off` turns
    it off for the rest of the run. ``key``: its summary.json key, which holds ``impls[0]`` while it runs and
    ``impls[1]`` once it is off (None before its first use when ``used`` starts False)."""

    def __init__(self, name: str, plain: str, key: Optional[str] = None, impls: tuple[str, str] = ("", ""),
                 used: bool = True):
        self.name, self.plain, self.key, self.impls, self.used = name, plain, key, impls, used
        self.why_off: Optional[str] = gate(name)
        self.note: Optional[str] = None  # the warning line of a fall-back

    @property
    def on(self) -> bool:
        return self.why_off is None

    @property
    def impl(self) -> Optional[str]:
        return (self.impls[0] if self.on else self.impls[1]) if self.used else None

    def off(self, why: str, plain: Optional[str] = None) -> None:
        """Turn the fast path off for the rest of the run; one warning line (the first time). ``plain``: what
        runs instead, where not the path's own public path."""
        if not self.on:
            return
        self.why_off = why
        self.note = (f"the {self.name} failed ({why}); {plain or self.plain} runs instead for the rest of the "
                     f"run ({'slower, same results' if plain is None else 'results equal to float rounding'})")
        log.warning("warning: %s", self.note)


def paths_of(*holders: Any) -> list[FastPath]:
    """The fast paths of objects that keep some (their ``speed_paths()``); None is skipped."""
    return [p for h in holders if h is not None for p in h.speed_paths()]


def record(summary: Any, paths: Iterable[FastPath]) -> None:
    """Write the fast paths' state into summary.json's fields: each keyed path's implementation as of now, and
    each fall-back's warning line once in ``warnings``."""
    for p in paths:
        if p.key is not None and p.used:
            summary.update(**{p.key: p.impl})
        if p.note is not None and p.note not in summary.warnings:
            summary.warnings.append(p.note)


def same_bits(a: Any, b: Any) -> bool:
    """Whether two tensors (or None, or numbers) hold the very same bits: dtype, shape and every byte (NaN == NaN
    where the bits are equal; -0.0 != 0.0)."""
    if a is None or b is None:
        return a is None and b is None
    if not isinstance(a, torch.Tensor) or not isinstance(b, torch.Tensor):
        return type(a) is type(b) and a == b
    if a.dtype != b.dtype or a.shape != b.shape or a.device != b.device:
        return False
    return torch.equal(a.detach().reshape(-1).contiguous().view(torch.uint8),
                       b.detach().reshape(-1).contiguous().view(torch.uint8))


def attempt(path: FastPath, fast: Callable[[], Any], plain: Callable[[], Any]) -> Any:
    """``fast()`` while ``path`` is on; on an exception in it (which must leave nothing half done, e.g. one write
    call), the path off for the rest of the run and ``plain()``."""
    if path.on:
        try:
            return fast()
        except Exception as e:  # noqa: BLE001 — torch's internals changed: its public path from now on
            path.off(failure(e))
    return plain()
