"""The schemas of the config groups that are one dataclass (trainer, augmentation, the root), with their checks.

The groups whose options are alternatives (data, model, optimizer, scheduler) keep each option's schema and
checks beside its code, in the tables of :mod:`regbench.registry`; regularizer members keep theirs on their
class. :mod:`regbench.validation` stores every schema in Hydra's ConfigStore (``schema/<group>/<name>``) and
runs every check. This module imports nothing of regbench but the error helpers.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional

from omegaconf import MISSING, DictConfig, OmegaConf

from regbench.errors import INT64, check, choice

CONFIG_DIR = Path(__file__).resolve().parent / "configs"  # the YAML config groups shipped with the package
CONFIG_NAME = "train"  # the primary config

# -------------------------------------------------------------------------------------------- model

ACTIVATIONS = ("relu", "leaky_relu", "elu", "sigmoid", "tanh")
INITS = ("default", "xavier_uniform", "xavier_normal", "kaiming_uniform", "kaiming_normal", "glorot_uniform",
         "he_normal")
BIAS_INITS = ("zeros", "torch")
POOLINGS = ("max", "avg", "none")


@dataclass
class MLPConfig:
    name: str = "mlp"
    hidden: list[int] = field(default_factory=lambda: [256, 128])  # widths of the hidden layers
    activation: str = "relu"  # relu | leaky_relu | elu | sigmoid | tanh
    negative_slope: float = 0.01  # slope of leaky_relu for x < 0 (used only by leaky_relu)
    init: str = "default"  # default (torch's) | xavier_uniform | xavier_normal | kaiming_uniform | kaiming_normal
    #                        | glorot_uniform (Keras' default) | he_normal (Keras': truncated normal)
    bias_init: Optional[str] = None  # zeros | torch (uniform ±1/√fan_in); null = torch's with init=default, else zeros


@dataclass
class LectureCNNConfig:
    name: str = "lecture_cnn"
    widths: list[int] = field(default_factory=lambda: [32, 64, 128])  # channels of each conv block
    convs_per_block: int = 2  # 3x3 'same' convs per block
    dense: int = 64  # width of the hidden dense layer of the head
    pooling: str = "max"  # after each block: max | avg | none (max pooling is one of the lecture's regularizers)
    global_pool: str = "max"  # before the head: max | avg
    activation: str = "relu"
    negative_slope: float = 0.01
    init: str = "default"
    bias_init: Optional[str] = None


@dataclass
class TorchvisionModelConfig:
    """A torchvision classification model with a new head (regbench/backbones.py)."""

    name: str = "torchvision"
    arch: str = "resnet18"  # any of torchvision.models.list_models(module=torchvision.models) with fc or features
    weights: Optional[str] = "DEFAULT"  # DEFAULT | IMAGENET1K_V1 | ... | null (random init) | path of a state dict
    head_hidden: Optional[int] = None  # width of a Dense+ReLU between global pooling and the classes; null = none
    input_size: Optional[int] = None  # resize inputs to this square size; null = the weights' size (none if null)
    download: bool = "${oc.decode:${oc.env:REGBENCH_DOWNLOAD,true}}"  # fetch missing weights into torch hub's cache


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
    clean_subset: int = 1000  # training images for the clean (eval-mode, plain CE) train metric each epoch; 0 = off
    progress_bar: Optional[bool] = None  # null = only when stdout is a terminal
    fused: bool = True  # the optimizer's fastest torch.optim implementation (fused/foreach); false = torch's default
    compile: str = "none"  # none | model | step: torch.compile the model (forward+backward) / also the optimizer step


def check_trainer(t: DictConfig, cfg: DictConfig) -> None:
    """The trainer's keys (``cfg``: the whole config, for rules across groups)."""
    check(t.max_epochs >= 1, "trainer.max_epochs", t.max_epochs, "an integer >= 1")
    dev = t.device
    check(dev in ("auto", "cpu", "cuda") or (dev.startswith("cuda:") and dev[5:].isdigit()), "trainer.device",
          dev, "auto, cpu, cuda or cuda:N")
    choice(t.amp, "trainer.amp", ("none", "bf16", "fp16"))
    check(t.num_threads is None or t.num_threads >= 1, "trainer.num_threads", t.num_threads,
          "an integer >= 1 or null (all cores this process may use)")
    choice(t.monitor, "trainer.monitor", ("val_loss", "val_acc"))
    check(t.clean_subset >= 0, "trainer.clean_subset", t.clean_subset, "an integer >= 0 (0 = off)")
    check(t.checkpoint_every >= 1, "trainer.checkpoint_every", t.checkpoint_every, "an integer >= 1 (epochs)")
    check(t.keep_last >= 1, "trainer.keep_last", t.keep_last, "an integer >= 1")
    choice(t.compile, "trainer.compile", ("none", "model", "step"))
    check(t.compile != "step" or cfg.scheduler.name == "constant", "trainer.compile", t.compile, "model or none "
          f"with scheduler={cfg.scheduler.name} (a compiled optimizer step is recompiled whenever the learning rate "
          "changes)", "use trainer.compile=model, or scheduler=constant")
    check(t.compile != "step" or t.amp != "fp16", "trainer.compile", t.compile, "model or none with "
          "trainer.amp=fp16 (the GradScaler steps the optimizer itself)", "use trainer.compile=model")


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


# The model checks below move into the model package with the model schemas (issue 13, item 5).
def _check(ok: bool, key: str, value: Any, expected: str, fix: str | None = None) -> None:
    check(ok, key, value, expected, fix)


def _choice(cfg: DictConfig, key: str, choices: tuple[str, ...]) -> None:
    choice(cfg[key.rsplit(".", 1)[-1]], key, choices)


def _validate_own_model(m: DictConfig) -> None:
    """regbench's own families (mlp, lecture_cnn)."""
    _choice(m, "model.activation", ACTIVATIONS)
    _choice(m, "model.init", INITS)
    _check(m.bias_init is None or m.bias_init in BIAS_INITS, "model.bias_init", m.bias_init,
           "zeros, torch or null (torch's with model.init=default, zeros otherwise)")
    _check(m.negative_slope >= 0, "model.negative_slope", m.negative_slope, "a number >= 0")
    _check(m.activation == "leaky_relu" or m.negative_slope == 0.01, "model.negative_slope", m.negative_slope,
           "to be left alone unless model.activation=leaky_relu (it is only used there)",
           "add model.activation=leaky_relu")
    if m.name == "mlp":
        _check(all(h >= 1 for h in m.hidden), "model.hidden", list(m.hidden), "a list of widths >= 1")
    elif m.name == "lecture_cnn":
        _check(len(m.widths) >= 1 and all(w >= 1 for w in m.widths), "model.widths", list(m.widths),
               "a non-empty list of channel counts >= 1")
        _check(m.convs_per_block >= 1, "model.convs_per_block", m.convs_per_block, "an integer >= 1")
        _check(m.dense >= 1, "model.dense", m.dense, "an integer >= 1")
        _choice(m, "model.pooling", POOLINGS)
        _choice(m, "model.global_pool", ("max", "avg"))
    else:
        _check(False, "model.name", m.name, "one of mlp, lecture_cnn, torchvision")
