"""Speed without changing the experiment: the fastest torch.optim implementation per optimizer and device
(``trainer.fused``), torch.compile with a persistent cache (``trainer.compile``; CUDA graphs for the compiled
step on a GPU), and channels_last memory for convolutional models on CUDA. ``accelerate`` is fit's one call.

Optimizer implementations (torch.optim has up to three per optimizer):
- ``fused``: one kernel per parameter group and step (torch's ``fused=True``), where the optimizer class takes
  ``fused`` and torch has fused kernels for the parameters' device (torch 2.14: Adam, AdamW, SGD, Adagrad on
  CPU and CUDA; RMSprop has none);
- ``foreach``: one multi-tensor op per update term, on the devices torch has foreach kernels for (CUDA);
- ``for-loop``: torch's single-tensor path (its default on CPU).
``trainer.fused=true`` (the default) takes the first that applies, ``false`` leaves torch's own default choice
(foreach on CUDA, for-loop on CPU: what regbench ran before). The implementations compute the same update
rule; on CPU fused SGD without momentum is bitwise equal to the for-loop, the others agree to float32
rounding (see docs/benchmarks.md), so summary.json records the one that ran (``optimizer_impl``).
"""

from __future__ import annotations

import inspect
import logging
import os
import shutil
import sys
from pathlib import Path
from typing import Iterable, Optional

import torch
from torch import nn

from regbench import compile_cache
from regbench.speed import FastPath, failure

log = logging.getLogger(__name__)


# ------------------------------------------------------------------------------ optimizer implementation


def _device_types(params: Iterable) -> set[str]:
    types = set()
    for p in params:
        for t in (p["params"] if isinstance(p, dict) else [p]):
            types.add(t.device.type)
    return types


def _all_float(params: Iterable) -> bool:
    return all(torch.is_floating_point(t) and not t.is_sparse
               for p in params for t in (p["params"] if isinstance(p, dict) else [p]))


def has_fused(cls: type, device_type: str) -> bool:
    """Whether torch has a fused implementation of optimizer class ``cls`` on ``device_type``."""
    return "fused" in inspect.signature(cls.__init__).parameters and _supported("fused", device_type)


def has_foreach(cls: type, device_type: str) -> bool:
    return "foreach" in inspect.signature(cls.__init__).parameters and _supported("foreach", device_type)


_probe: Optional[FastPath] = None  # this process's use of torch's private lists of kernel devices


def _supported(kind: str, device_type: str) -> bool:
    """Whether torch has ``kind`` ("fused" / "foreach") optimizer kernels on ``device_type``, by torch's own
    (private) list; False — torch's default implementation — outside regbench.speed's gate or where the list is
    gone (a fast path of regbench.speed: "fused-kernel probe")."""
    global _probe
    if _probe is None:
        _probe = FastPath("fused-kernel probe", "torch's default optimizer implementation")
    if not _probe.on:
        return False
    try:
        from torch.utils import _foreach_utils

        return device_type in getattr(_foreach_utils, f"_get_{kind}_kernels_supported_devices")()
    except Exception as e:  # noqa: BLE001
        _probe.off(failure(e))
        return False


def implementation(cls: type, params: list, fused: bool) -> dict:
    """The constructor keywords that pick ``cls``'s fastest implementation for ``params`` (a list of tensors or
    parameter groups, all on one device); {} (torch's own choice) when ``fused`` is False."""
    devices = _device_types(params)
    if not fused or len(devices) != 1 or not _all_float(params):
        return {}
    device = devices.pop()
    if has_fused(cls, device):
        return {"fused": True}
    if has_foreach(cls, device):
        return {"foreach": True}
    return {}


def optimizer_impl(optimizer: torch.optim.Optimizer) -> str:
    """The implementation ``optimizer`` runs: fused, foreach or for-loop (what summary.json records)."""
    group = optimizer.param_groups[0]
    if group.get("fused"):
        return "fused"
    if group.get("foreach"):
        return "foreach"
    if group.get("foreach") is None and "foreach" in group:  # torch decides per step: foreach iff all on CUDA
        from torch.optim.optimizer import _default_to_fused_or_foreach

        _, foreach = _default_to_fused_or_foreach(list(group["params"]), differentiable=False, use_fused=False)
        return "foreach" if foreach else "for-loop"
    return "for-loop"


def keep_implementation(optimizer: torch.optim.Optimizer) -> torch.optim.Optimizer:
    """Make ``optimizer.load_state_dict`` keep this optimizer's implementation.

    torch's load_state_dict replaces each parameter group's settings with the saved ones, ``fused`` and
    ``foreach`` included, so a checkpoint written unfused would silently resume unfused (and vice versa). The
    hook puts the current choice into the loaded groups, and moves each ``step`` counter to where the
    current implementation keeps it (fused: a float32 tensor on the parameter's device; else on the host).
    """
    current = [{k: g[k] for k in ("fused", "foreach", "capturable") if k in g} for g in optimizer.param_groups]

    def hook(opt: torch.optim.Optimizer, state_dict: dict) -> dict:
        state_dict = dict(state_dict)
        state_dict["param_groups"] = [{**saved, **now} for saved, now in zip(state_dict["param_groups"], current)]
        on_device = {i for g in state_dict["param_groups"] if g.get("fused") or g.get("capturable")
                     for i in g["params"]}
        state = {}
        for i, s in state_dict["state"].items():
            s = dict(s)
            if isinstance(s.get("step"), torch.Tensor) and i not in on_device:
                s["step"] = s["step"].detach().to("cpu", torch.float32)
            state[i] = s
        state_dict["state"] = state
        return state_dict

    optimizer.register_load_state_dict_pre_hook(hook)
    return optimizer


# ----------------------------------------------------------------------------------------- compile


def use_cache() -> tuple[Optional[Path], Optional[str]]:
    """Point inductor's on-disk caches (FX graph cache, AOT-autograd cache, compiled kernels, precompiled headers)
    at the checked cache folder (regbench.compile_cache). Returns (the folder, None) or (None, why nothing may be
    compiled: the one-line warning's reason)."""
    where, reason = compile_cache.folder()
    if where is None:
        return None, reason
    _keep_torch_inside(where)
    import torch._functorch.config as functorch_config
    import torch._inductor.config as inductor_config

    inductor_config.fx_graph_cache = True
    functorch_config.enable_autograd_cache = True
    return where, None


def _keep_torch_inside(folder: Path) -> None:
    """torch 2.14 keeps some caches at ``default_cache_dir()`` (``<tempdir>/torchinductor_<user>``) whatever
    TORCHINDUCTOR_CACHE_DIR says: the precompiled C++ headers of CPU kernels (``codecache._HEADER_DIR``, fixed
    when codecache is imported) and the caching module's on-disk caches (looked up when made). Both are pointed
    into ``folder``; a torch without these names gets its header precompilation turned off instead."""
    import torch._inductor.codecache as codecache
    import torch._inductor.config as inductor_config
    import torch._inductor.runtime.cache_dir_utils as cache_dir_utils
    import torch._inductor.runtime.runtime_utils as runtime_utils

    def inside() -> str:
        return str(folder)

    for module in (cache_dir_utils, runtime_utils, codecache):
        if hasattr(module, "default_cache_dir"):
            module.default_cache_dir = inside
    if hasattr(codecache, "_HEADER_DIR") and hasattr(codecache, "_HEADER_LOCK_DIR"):
        codecache._HEADER_DIR = os.path.join(folder, "precompiled_headers")
        codecache._HEADER_LOCK_DIR = os.path.join(codecache._HEADER_DIR, "locks")
    else:
        inductor_config.cpp_cache_precompile_headers = False


def compiler_missing(device: torch.device) -> Optional[str]:
    """Why torch.compile cannot run here (None when it can): the reason of the one-line warning."""
    if not torch._dynamo.is_dynamo_supported():
        return f"torch.compile does not support this platform (Python {sys.version.split()[0]}, {sys.platform})"
    if device.type == "cuda":
        from torch.utils._triton import has_triton

        return None if has_triton() else "Triton is not installed (torch.compile needs it on CUDA)"
    cxx = _cxx()
    if not cxx:
        return "no C++ compiler found (torch.compile needs one on CPU: install g++ or clang, or set CXX)"
    return _cxx_fails(cxx)


def _cxx() -> Optional[str]:
    """The C++ compiler inductor would use, or None."""
    import torch._inductor.config as inductor_config

    names = [os.environ.get("CXX")] + [c for c in inductor_config.cpp.cxx if c]
    return next((shutil.which(n) for n in names if n and shutil.which(n)), None)


_CXX_WORKS: dict[str, Optional[str]] = {}  # compiler path -> why it fails (None: it works); probed once


def _cxx_fails(cxx: str) -> Optional[str]:
    """Why the C++ compiler ``cxx`` cannot build a shared library (None when it can): inductor's own check runs
    ``--version``, then a one-line library is built, in a private temporary folder."""
    import subprocess
    import tempfile

    if cxx not in _CXX_WORKS:
        reason = None
        with tempfile.TemporaryDirectory(prefix="regbench-cxx-") as tmp:
            source = Path(tmp) / "probe.cpp"
            source.write_text("extern \"C\" int regbench_probe() { return 0; }\n")
            for args in ([cxx, "--version"], [cxx, "-shared", "-fPIC", str(source), "-o", str(Path(tmp) / "probe.so")]):
                try:
                    done = subprocess.run(args, capture_output=True, text=True, timeout=120)
                    failed = done.returncode != 0
                    said = (done.stderr.strip().splitlines() or [f"exit status {done.returncode}"])[-1] if failed else ""
                except (OSError, subprocess.TimeoutExpired) as e:
                    failed, said = True, str(e).splitlines()[0] if str(e) else type(e).__name__
                if failed:
                    reason = (f"the C++ compiler {cxx} does not work (`{' '.join(args[1:2])}`: {said[:200]}); fix: "
                              "repair it, or set CXX to a working one (g++ or clang)")
                    break
        _CXX_WORKS[cxx] = reason
    return _CXX_WORKS[cxx]


def _inductor_fails(cxx: Optional[str]) -> Optional[str]:
    """Why inductor cannot compile a tiny function on the CPU (None when it can), probed once per compiler: a
    compiler that builds a plain library may still refuse inductor's own flags (-O3, -march=native, -fopenmp:
    e.g. clang without OpenMP), which would end the run at its first step."""
    key = f"inductor:{cxx}"
    if key not in _CXX_WORKS:
        try:
            torch.compile(lambda x: (x * 2.0).sin() + 1.0)(torch.ones(8))
            _CXX_WORKS[key] = None
        except Exception as e:  # noqa: BLE001 - any failure of the build means: run eagerly
            said = next((ln.strip() for ln in str(e).splitlines() if ln.strip()), type(e).__name__)
            _CXX_WORKS[key] = (f"inductor could not build a kernel with {cxx} ({type(e).__name__}: {said[:200]}); "
                               "fix: repair the compiler, or set CXX to a working one (g++ or clang)")
        finally:
            torch._dynamo.reset()
    return _CXX_WORKS[key]


def compile_mode(device: torch.device, what: str) -> Optional[str]:
    """torch.compile's mode: CUDA graphs (``reduce-overhead``) for the whole step on a GPU, else the default."""
    return "reduce-overhead" if what == "step" and device.type == "cuda" else None


def accelerate(compile: str, model: nn.Module, optimizer: torch.optim.Optimizer,
               device: torch.device) -> tuple[dict, Optional[str]]:
    """Everything regbench does for speed once model and optimizer exist: channels_last where it pays, then
    ``trainer.compile``. Returns (facts for summary.json: optimizer_impl, compile, channels_last; a warning)."""
    last = wants_channels_last(model, device)
    if last:
        model.to(memory_format=torch.channels_last)  # in place: the optimizer keeps the same parameters
    compiled, warning = compile_run(compile, model, optimizer, device)
    return {"optimizer_impl": optimizer_impl(optimizer), "compile": compiled, "channels_last": last}, warning


def wants_channels_last(model: nn.Module, device: torch.device) -> bool:
    """channels_last (NHWC) memory for convolutional models on CUDA, where cuDNN's NHWC kernels (tensor cores
    under AMP) are the fast ones. Not on CPU: the runs there stay bitwise what they were."""
    return device.type == "cuda" and any(isinstance(m, nn.Conv2d) for m in model.modules())


def compile_run(what: str, model: nn.Module, optimizer: torch.optim.Optimizer,
                device: torch.device) -> tuple[str, Optional[str]]:
    """Apply ``trainer.compile``; returns (what ran: none|model|step, a warning or None).

    ``model`` compiles the module in place (``nn.Module.compile``: its forward and, through AOT autograd, its
    backward; state_dict keys and checkpoints stay as they are); ``step`` also compiles the optimizer's
    update. Where compilation is unavailable (no working compiler, no cache folder that only this user can
    write: regbench.compile_cache) it warns in one line and runs eagerly.
    """
    if what == "none":
        return "none", None
    folder, missing = None, compiler_missing(device)
    if missing is None:
        folder, missing = use_cache()
    if missing is None and device.type == "cpu":  # once the cache is known to be private: inductor's own build
        missing = _inductor_fails(_cxx())
    if missing is not None:
        warning = f"trainer.compile={what} falls back to eager: {missing}"
        log.warning("warning: %s", warning)
        return "none", warning
    # A fresh start per run: a process that trains several runs (a sweep's jobs) would otherwise pile up
    # recompilations until dynamo's cache limit silently drops back to eager; the on-disk cache keeps it cheap.
    torch._dynamo.reset()
    log.info("torch.compile (%s), cache %s", what, folder)
    mode = compile_mode(device, what)
    model.compile(mode=mode)
    if what == "step":
        # Instance attribute: GradScaler.step and LR schedulers call optimizer.step through it.
        optimizer.step = torch.compile(optimizer.step, mode=mode)
    return what, None
