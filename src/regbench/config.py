"""The schemas of the config groups that are one dataclass (trainer, augmentation, the root), with their checks.

The groups whose options are alternatives (data, model, optimizer, scheduler) keep each option's schema and
checks beside its code, in the tables of :mod:`regbench.registry`; regularizer members keep theirs on their
class. :mod:`regbench.validation` stores every schema in Hydra's ConfigStore (``schema/<group>/<name>``) and
runs every check. This module imports nothing of regbench but the error helpers.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional

from omegaconf import MISSING, DictConfig, OmegaConf

from regbench.errors import INT64, check, choice

CONFIG_DIR = Path(__file__).resolve().parent / "configs"  # the YAML config groups shipped with the package
CONFIG_NAME = "train"  # the primary config

# ------------------------------------------------------------------------------------- augmentation


@dataclass
class TTAConfig:
    enabled: bool = False  # test-time augmentation in the final evaluation, reported beside the plain one
    hflip: bool = True  # a mirrored view (only where the dataset is label-safe for flips)
    vflip: bool = False
    shift: int = 2  # views shifted by ±shift pixels horizontally and vertically (reflect padding); 0 = none
    bins: int = 15  # ECE bins


@dataclass
class AugmentationConfig:
    name: str = "none"
    ops: list[Any] = field(default_factory=list)  # the policy: [{op: hflip, p: 0.5}, {op: crop, padding: 4}, ...]
    allow_label_unsafe: bool = False  # flips on a dataset whose labels they change (digits) without a warning
    preview: int = 16  # training images shown before/after augmentation in TensorBoard (0 = none)
    tta: TTAConfig = field(default_factory=TTAConfig)


def check_augmentation(a: DictConfig, cfg: DictConfig) -> None:
    """The policy's own keys; each op checks its keys when the policy is built (regbench.validation)."""
    check(a.preview >= 0, "augmentation.preview", a.preview, "an integer >= 0")
    check(a.tta.shift >= 0 and a.tta.bins >= 1, "augmentation.tta", OmegaConf.to_container(a.tta),
          "shift >= 0 and bins >= 1")


# ------------------------------------------------------------------------------------------ trainer


@dataclass
class TrainerConfig:
    max_epochs: int = 20
    device: str = "auto"  # auto (cuda if available) | cpu | cuda | cuda:N
    amp: str = "none"  # none | bf16 | fp16 (fp16 needs CUDA; uses a GradScaler)
    num_threads: Optional[int] = None  # CPU threads for torch; null = the cores this process may use
    monitor: str = "val_loss"  # val_loss | val_acc: picks the best epoch/checkpoint; the value the app returns
    save_checkpoints: bool = True  # checkpoints/epoch_NNNN.pt (+ last.pt, best.pt links); false = none
    checkpoint_every: int = 1  # epochs between checkpoints (the last epoch is always saved)
    keep_last: int = 2  # epoch checkpoints kept (older ones are deleted; best.pt always stays)
    resume: bool = False  # continue the run in hydra.run.dir from its newest checkpoint (see `regbench resume`)
    deterministic: bool = False  # torch deterministic algorithms (+ CUBLAS_WORKSPACE_CONFIG, no cudnn benchmark)
    clean_subset: int = 1000  # training images for the clean (eval-mode, plain CE) train metric; 0 = off
    eval_every: int = 1  # epochs between evaluations (validation, clean subset); the last epoch is always evaluated
    progress_bar: Optional[bool] = None  # null = only when stdout is a terminal
    fused: bool = True  # the optimizer's fastest torch.optim implementation (fused/foreach); false = torch's default
    compile: str = "none"  # none | model | step: torch.compile the model (forward+backward) / also the optimizer step
    fast_step: bool = True  # plain MLPs on CPU: the direct step (bitwise equal to autograd, faster); false = autograd


def check_trainer(t: DictConfig, cfg: DictConfig) -> None:
    """The trainer's keys (``cfg``: the whole config, for rules across groups)."""
    check(t.max_epochs >= 1, "trainer.max_epochs", t.max_epochs, "an integer >= 1")
    dev = t.device
    check(dev in ("auto", "cpu", "cuda") or (dev.startswith("cuda:") and dev[5:].isdigit()), "trainer.device",
          dev, "auto, cpu, cuda or cuda:N")
    choice(t.amp, "trainer.amp", ("none", "bf16", "fp16"))
    most = max_threads()
    check(t.num_threads is None or 1 <= t.num_threads <= most, "trainer.num_threads", t.num_threads,
          f"an integer in [1, {most}] or null (all cores this process may use)", f"more threads than "
          f"{THREADS_PER_CORE}x this machine's {os.cpu_count() or 1} cores only slow torch down (very many crash it)")
    choice(t.monitor, "trainer.monitor", ("val_loss", "val_acc"))
    check(t.clean_subset >= 0, "trainer.clean_subset", t.clean_subset, "an integer >= 0 (0 = off)")
    check(t.eval_every >= 1, "trainer.eval_every", t.eval_every, "an integer >= 1 (epochs)")
    check(t.checkpoint_every >= 1, "trainer.checkpoint_every", t.checkpoint_every, "an integer >= 1 (epochs)")
    check(t.keep_last >= 1, "trainer.keep_last", t.keep_last, "an integer >= 1")
    choice(t.compile, "trainer.compile", ("none", "model", "step"))
    check(t.compile != "step" or cfg.scheduler.name == "constant", "trainer.compile", t.compile, "model or none "
          f"with scheduler={cfg.scheduler.name} (a compiled optimizer step is recompiled whenever the learning rate "
          "changes)", "use trainer.compile=model, or scheduler=constant")
    check(t.compile != "step" or t.amp != "fp16", "trainer.compile", t.compile, "model or none with "
          "trainer.amp=fp16 (the GradScaler steps the optimizer itself)", "use trainer.compile=model")


THREADS_PER_CORE = 4  # trainer.num_threads' bound: this many threads per core, at least MIN_THREAD_BOUND
MIN_THREAD_BOUND = 1024  # (a login node checks the config of jobs that run on bigger nodes)


def max_threads() -> int:
    """The most torch threads a run may ask for: trainer.num_threads=100000 crashed torch's OpenMP pool."""
    return max(MIN_THREAD_BOUND, THREADS_PER_CORE * (os.cpu_count() or 1))


def evaluated(t: DictConfig, epoch: int) -> bool:
    """Whether ``epoch`` evaluates the validation split and the clean subset (``trainer.eval_every``; the last
    epoch always does, so a finished run's final row and best epoch have validation metrics)."""
    return epoch % t.eval_every == 0 or epoch == t.max_epochs


def evaluations(t: DictConfig) -> int:
    """How many epochs of a full run are evaluated."""
    return -(-t.max_epochs // t.eval_every)  # the multiples of eval_every, and the last epoch when it is none


@dataclass
class TrainConfig:
    seed: int = 0
    data: Any = MISSING
    model: Any = MISSING
    optimizer: Any = MISSING
    scheduler: Any = MISSING
    trainer: Any = MISSING
    regularizer: Any = field(default_factory=dict)  # the stack: one entry per selected member
    augmentation: Any = MISSING
    convention: str = "torch"  # torch | keras: whose defaults the run uses (set by the convention/ group)


def check_root(cfg: DictConfig) -> None:
    """The root's own keys (the groups are checked by their own schemas' checks)."""
    check(INT64[0] <= cfg.seed <= INT64[1], "seed", cfg.seed, "an integer in [-2**63, 2**63-1] (torch seeds "
          "are 64-bit)")
    check(cfg.convention in ("torch", "keras"), "convention", cfg.convention, "torch or keras",
          "pick it with convention=torch or convention=keras")
