"""Transfer learning: start from another run's weights, freeze the first k layers and/or parameters matching
name patterns, fine-tune the rest. Layers whose shapes differ must be named in ``skip`` (e.g. a new head).
Checkpoints load with :func:`regbench.checkpoint.load_checkpoint` only: a regular file (not a link, FIFO or device)
of bounded size, uncompressed zip records, then ``torch.load(weights_only=True)``.
"""

from __future__ import annotations

import fnmatch
import logging
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional

from omegaconf import MISSING, OmegaConf
from torch import nn

from regbench.errors import ConfigError, RegbenchError
from regbench.checkpoint import load_checkpoint
from regbench.models import weight_layer_count
from regbench.regularizers.base import REGISTRY, Context, Regularizer, Stacking, overrides, register


log = logging.getLogger(__name__)


@dataclass
class TransferConfig:
    init_from: str = MISSING  # a run folder (its checkpoints/<checkpoint>.pt) or a checkpoint file
    checkpoint: str = "best"  # best | last, when init_from is a run folder
    freeze_layers: int = 0  # freeze the first k dense/conv layers (weights and biases)
    freeze: list[str] = field(default_factory=list)  # and parameters matching these glob patterns
    skip: list[str] = field(default_factory=list)  # parameters/buffers not loaded (kept freshly initialised)


def _matches(name: str, patterns) -> bool:
    return any(fnmatch.fnmatchcase(name, p) or fnmatch.fnmatchcase(name, p.rstrip(".*") + ".*") for p in patterns)


def _list(values) -> str:
    return "[" + ",".join(values) + "]"


@register
class Transfer(Regularizer):
    name, schema = "transfer", TransferConfig
    stacking = Stacking(refused="it loads pretrained weights and freezes layers per run")

    def check(self, ctx: Context) -> None:
        if OmegaConf.is_missing(self.cfg, "init_from"):
            raise ConfigError(f"{self.key}.init_from", "???", "a run folder or checkpoint file to start from",
                              f"add {self.key}.init_from=outputs/runs/<date>/<time>")
        if self.cfg.checkpoint not in ("best", "last"):
            raise ConfigError(f"{self.key}.checkpoint", self.cfg.checkpoint, "best or last")
        if self.cfg.freeze_layers < 0:
            raise ConfigError(f"{self.key}.freeze_layers", self.cfg.freeze_layers, "an integer >= 0")
        layers = weight_layer_count(ctx.cfg.model)  # the model family counts its own layers
        if layers is None and self.cfg.freeze_layers:
            raise ConfigError(f"{self.key}.freeze_layers", self.cfg.freeze_layers, f"0 with model="
                              f"{ctx.cfg.model.name} (its layers are not counted from the config)",
                              f"name the parameters to freeze with {self.key}.freeze=[...]")
        norms = {"batchnorm", "group_norm", "layer_norm"} & set(ctx.cfg.regularizer)
        if layers is not None and (self.cfg.freeze_layers > layers or (self.cfg.freeze_layers == layers
                                                                         and not norms)):
            raise ConfigError(f"{self.key}.freeze_layers", self.cfg.freeze_layers,
                              f"fewer than the model's {layers} dense/conv layers (freezing all of them leaves "
                              "nothing to train)", "lower it, or leave the last layers (the head) trainable")

    def source(self) -> Path:
        path = Path(self.cfg.init_from).expanduser()
        if path.is_dir():
            path = path / "checkpoints" / f"{self.cfg.checkpoint}.pt"
        if not os.path.lexists(path):  # a link, FIFO or device there: load_checkpoint refuses it by name
            raise RegbenchError(f"{self.key}.init_from={self.cfg.init_from!r}: no checkpoint at {path}; fix: give a "
                                "run folder that has checkpoints/ or a .pt file written by regbench")
        return path

    def setup(self, model: nn.Module, ctx: Context) -> None:
        path = self.source()
        ckpt = load_checkpoint(path)
        if not isinstance(ckpt, dict) or not isinstance(ckpt.get("model"), dict):
            raise RegbenchError(f"checkpoint {path}: has no 'model' state; fix: use a checkpoint written by regbench")
        theirs = ckpt["model"]
        # A source run that evaluated another model than it trained (weight averaging's average) chose its best.pt
        # and reported its results by that model, which its checkpoint keeps apart from "model": say which is loaded.
        others = [n for n in (ckpt.get("regularizers") or {}) if n in REGISTRY and overrides(REGISTRY[n], "eval_model")]
        if others:
            log.warning("warning: %s was trained with %s, which evaluated another model than the one it trained (its "
                        "results and best.pt are that model's); transfer loads the trained weights, not that model",
                        path, ", ".join(others))
        ours = model.state_dict()
        keys = [k for k in ours if not _matches(k, self.cfg.skip)]
        if not keys:
            raise self.nothing(f"{self.key}.skip={_list(self.cfg.skip)} skips every parameter and buffer: "
                               "nothing is loaded", f"narrow {self.key}.skip (e.g. to the head: [head.*])")
        missing = [k for k in keys if k not in theirs]
        mismatched = [f"{k} {tuple(theirs[k].shape)} -> {tuple(ours[k].shape)}" for k in keys
                      if k in theirs and theirs[k].shape != ours[k].shape]
        if missing or mismatched:
            problems = ([f"shapes differ: {', '.join(mismatched)}"] if mismatched else []) + (
                [f"missing in the checkpoint: {', '.join(missing)}"] if missing else [])
            layers = sorted({k.rsplit(".", 1)[0] + ".*" for k in [m.split(" ")[0] for m in mismatched] + missing})
            raise RegbenchError(f"{self.key}.init_from={path}: {'; '.join(problems)}; fix: use the same model "
                                f"config, or skip these layers: {self.key}.skip=[{','.join(layers)}]")
        model.load_state_dict({k: theirs[k] for k in keys}, strict=False)

        weight_layers = [m for m in model.modules() if isinstance(m, (nn.Linear, nn.Conv2d))]
        if self.cfg.freeze_layers > len(weight_layers):
            raise ConfigError(f"{self.key}.freeze_layers", self.cfg.freeze_layers,
                              f"at most {len(weight_layers)} (the model's dense/conv layers)")
        frozen = {id(p) for m in weight_layers[:self.cfg.freeze_layers] for p in m.parameters()}
        for pattern in self.cfg.freeze:
            hits = [p for n, p in model.named_parameters() if _matches(n, [pattern])]
            if not hits:
                raise ConfigError(f"{self.key}.freeze", pattern, "a pattern matching parameter names ("
                                  + ", ".join(n for n, _ in model.named_parameters()) + ")")
            frozen |= {id(p) for p in hits}
        if all(id(p) in frozen for p in model.parameters()):
            raise ConfigError(f"{self.key}.freeze", list(self.cfg.freeze), "patterns that leave at least one "
                              f"parameter trainable (with freeze_layers={self.cfg.freeze_layers} they freeze all "
                              "of them: nothing to train)", "narrow the patterns, e.g. leave head.* out")
        names = []
        for n, p in model.named_parameters():
            if id(p) in frozen:
                p.requires_grad_(False)
                names.append(n)
        self.facts = {"init_from": str(path), "loaded": len(keys), "skipped": len(ours) - len(keys),
                      "frozen": names, "frozen_elements": sum(p.numel() for p in model.parameters()
                                                              if not p.requires_grad)}

    def info(self) -> dict:
        return self.facts


# ------------------------------------------------------------------------------------ fine_tune


@dataclass
class FineTuneConfig:
    freeze_base_epochs: int = 5  # stage 1: train only the head for this many epochs (the base frozen)
    unfreeze_top: Optional[int] = None  # stage 2: unfreeze the base's top n blocks; null = all; 0 = never
    finetune_lr_scale: float = 0.1  # the unfrozen blocks' lr = optimizer.lr * this (their own param group)


def base_and_head(model: nn.Module) -> tuple[list[nn.Module], nn.Module]:
    """(the base's blocks in forward order, the head) of a model regbench can fine-tune."""
    if hasattr(model, "blocks") and hasattr(model, "head"):  # model=torchvision
        return model.blocks, model.head
    if hasattr(model, "features") and hasattr(model, "head"):  # lecture_cnn: conv blocks | dense head
        return list(model.features), model.head
    if hasattr(model, "hidden") and hasattr(model, "head"):  # mlp: hidden layers | output layer
        return list(model.hidden), model.head
    raise ConfigError("model.name", type(model).__name__, "a model with a base and a head for fine_tune")


@register
class FineTune(Regularizer):
    """The lecture's two stages: train a new head on a frozen base, then unfreeze the base's top blocks at a
    lower learning rate. BatchNorm layers of frozen blocks stay in inference mode (see docs/regularizers.md).

    The unfrozen blocks' parameter group exists from the start (frozen parameters get no gradient, so the
    optimizer leaves them and their state alone); stage 2 only flips ``requires_grad``, so the optimizer's state
    and the schedule carry over, and a resume restores the stage from the checkpoint.
    """

    name, schema = "fine_tune", FineTuneConfig
    stacking = Stacking(refused="it freezes and unfreezes layers during the run")

    def check(self, ctx: Context) -> None:
        c = self.cfg
        if c.freeze_base_epochs < 0:
            raise ConfigError(f"{self.key}.freeze_base_epochs", c.freeze_base_epochs, "an integer >= 0")
        if c.unfreeze_top is not None and c.unfreeze_top < 0:
            raise ConfigError(f"{self.key}.unfreeze_top", c.unfreeze_top, "an integer >= 0, or null (all blocks)")
        if not c.finetune_lr_scale > 0:
            raise ConfigError(f"{self.key}.finetune_lr_scale", c.finetune_lr_scale, "a number > 0")
        stack = ctx.cfg.regularizer
        if "weight_decay" in stack:
            raise ConfigError("regularizer", list(stack), "fine_tune without the weight_decay member (both set the "
                              "optimizer's parameter groups)", "use optimizer=adamw optimizer.weight_decay=<rate>")
        if "transfer" in stack and (stack.transfer.freeze_layers or stack.transfer.freeze):
            raise ConfigError("regularizer.transfer.freeze_layers", stack.transfer.freeze_layers,
                              "0 and no regularizer.transfer.freeze patterns with fine_tune (it freezes the base)",
                              "drop them: fine_tune freezes and unfreezes the base itself")

    def setup(self, model: nn.Module, ctx: Context) -> None:
        blocks, head = base_and_head(model)
        n = len(blocks) if self.cfg.unfreeze_top is None else self.cfg.unfreeze_top
        if n > len(blocks):
            raise ConfigError(f"{self.key}.unfreeze_top", n, f"at most {len(blocks)} (the base's blocks)")
        self.model, self.stage = model, 1
        head_ids = {id(p) for p in head.parameters()}
        self.base = [p for p in model.parameters() if id(p) not in head_ids]
        if not self.base:
            raise self.nothing("the model has no base to freeze (all its layers are the head, e.g. "
                               "model.hidden=[])", "drop fine_tune, or give the model hidden layers / a conv base")
        self.top = [p for b in blocks[len(blocks) - n:] for p in b.parameters()]
        self.head = [p for p in model.parameters() if id(p) in head_ids]
        self.blocks = blocks
        self.n_top = n
        for p in self.base:
            p.requires_grad_(False)
        for m in model.modules():  # the BN-eval rule, applied at every forward in training
            if isinstance(m, nn.modules.batchnorm._BatchNorm) and not any(m is h for h in head.modules()):
                m.register_forward_pre_hook(self._bn_hook)
        self.stage2_from_epoch: Optional[int] = None
        if self.cfg.freeze_base_epochs == 0 and n:
            self._unfreeze()
            self.stage2_from_epoch = 1

    def info(self) -> dict:
        return {
            "blocks": len(self.blocks), "unfrozen_blocks": self.n_top,
            "head_parameters": sum(p.numel() for p in self.head), "base_parameters": sum(p.numel() for p in self.base),
            "unfrozen_parameters": sum(p.numel() for p in self.top), "stage2_from_epoch": self.stage2_from_epoch,
        }

    @staticmethod
    def _bn_hook(module: nn.Module, args) -> None:
        # A BN layer whose parameters are frozen normalises with its pretrained running statistics and does not
        # update them: batch statistics of a small new dataset would overwrite what the base was trained with.
        if module.training and not any(p.requires_grad for p in module.parameters(recurse=False)):
            module.train(False)

    def param_groups(self, model: nn.Module, optimizer_cfg, ctx: Context) -> list[dict]:
        return [{"params": self.head}, {"params": self.top, "lr": optimizer_cfg.lr * self.cfg.finetune_lr_scale}]

    def _unfreeze(self) -> None:
        for p in self.top:
            p.requires_grad_(True)
        self.stage = 2

    def on_epoch_end(self, epoch: int, row: dict, model: nn.Module) -> bool:
        if self.stage == 1 and epoch >= self.cfg.freeze_base_epochs and self.n_top:
            self._unfreeze()
            self.stage2_from_epoch = epoch + 1
        return False

    def state_dict(self) -> dict:
        return {"stage": self.stage, "stage2_from_epoch": self.stage2_from_epoch}

    def load_state_dict(self, state: dict) -> None:
        if state.get("stage") == 2 and self.stage == 1:
            self._unfreeze()
        self.stage2_from_epoch = state.get("stage2_from_epoch", self.stage2_from_epoch)
