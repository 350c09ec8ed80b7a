"""Host-sync detection on CPU, for the "no host sync per step" rule that matters on CUDA.

Whether an op makes the host wait for the GPU is a property of the *operator*, so it can be seen on CPU with
a ``TorchDispatchMode``: reading a value back (``.item()``, ``bool(t)``, ``float(t)`` ->
``aten._local_scalar_dense``), data-dependent shapes (``nonzero``, ``masked_select``, indexing with a boolean
mask), and tensors made from Python data inside the step (``torch.tensor([...])`` -> ``aten.lift_fresh``:
on CUDA a blocking host -> GPU copy). Writing a scalar through a boolean mask is allowed: ATen turns it into
``masked_fill_``, which does not sync.

Not visible on CPU: an explicit ``.to("cuda")`` of a CPU tensor (a no-op here). Exempt: torch.optim's step
counters, which live on the CPU unless ``capturable=True``, so their ``.item()`` never waits for a GPU.
"""

from __future__ import annotations

import traceback
from contextlib import contextmanager

import torch
from torch.utils._python_dispatch import TorchDispatchMode

aten = torch.ops.aten
SYNCING = {aten._local_scalar_dense.default, aten.nonzero.default, aten.masked_select.default,
           aten.lift_fresh.default}
INDEXING = {aten.index.Tensor, aten.index_put.default, aten.index_put_.default, aten._index_put_impl_.default}


class SyncCheck(TorchDispatchMode):
    """Records every op that would make the host wait for the device, with where it was called from."""

    def __init__(self):
        super().__init__()
        self.found: list[str] = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        what = None
        if func in SYNCING:
            # A 0-dim tensor from a Python number (``t[mask] = 0.0``) stays on the CPU as a scalar: no copy.
            if not (func is aten.lift_fresh.default and args[0].dim() == 0):
                what = str(func)
        elif func in INDEXING and any(i is not None and i.dtype in (torch.bool, torch.uint8) for i in args[1]):
            if func is aten.index.Tensor or args[2].numel() != 1:
                what = f"{func} with a boolean mask"
        if what is not None:
            frames = [f for f in traceback.extract_stack()[:-1] if "torch/utils/" not in f.filename]
            if not any("torch/optim/" in f.filename for f in frames[-4:]):
                self.found.append(what + " at " + " <- ".join(f"{f.filename.rsplit('/', 1)[-1]}:{f.lineno}"
                                                              for f in reversed(frames[-4:])))
        return func(*args, **kwargs)


@contextmanager
def cuda_sync_errors():
    """On CUDA: any host sync inside raises (torch.cuda.set_sync_debug_mode("error"))."""
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        yield None
    finally:
        torch.cuda.set_sync_debug_mode(0)
