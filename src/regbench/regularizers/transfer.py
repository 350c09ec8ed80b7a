"""Transfer learning: start from another run's weights, freeze the first k layers and/or parameters matching
name patterns, fine-tune the rest. Layers whose shapes differ must be named in ``skip`` (e.g. a new head).
Checkpoints load with ``torch.load(weights_only=True)`` only.
"""

from __future__ import annotations

import fnmatch
from dataclasses import dataclass, field
from pathlib import Path

from omegaconf import MISSING, OmegaConf
from torch import nn

from regbench.errors import ConfigError, RegbenchError
from regbench.logs import load_checkpoint
from regbench.regularizers.base import Context, Regularizer, register


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


def weight_layer_count(model_cfg) -> int:
    """Dense and conv layers of the configured model (what freeze_layers counts), from its config alone."""
    if model_cfg.name == "mlp":
        return len(model_cfg.hidden) + 1
    return len(model_cfg.widths) * model_cfg.convs_per_block + 2  # convs, then the head's two dense layers


@register
class Transfer(Regularizer):
    name, schema, order = "transfer", TransferConfig, 5

    def check(self, ctx: Context) -> None:
        if OmegaConf.is_missing(self.cfg, "init_from"):
            raise ConfigError(f"{self.key}.init_from", "???", "a run folder or checkpoint file to start from",
                              f"add {self.key}.init_from=outputs/runs/<date>/<time>")
        if self.cfg.checkpoint not in ("best", "last"):
            raise ConfigError(f"{self.key}.checkpoint", self.cfg.checkpoint, "best or last")
        if self.cfg.freeze_layers < 0:
            raise ConfigError(f"{self.key}.freeze_layers", self.cfg.freeze_layers, "an integer >= 0")
        layers = weight_layer_count(ctx.cfg.model)
        norms = {"batchnorm", "group_norm", "layer_norm"} & set(ctx.cfg.regularizer)
        if self.cfg.freeze_layers > layers or (self.cfg.freeze_layers == layers and not norms):
            raise ConfigError(f"{self.key}.freeze_layers", self.cfg.freeze_layers,
                              f"fewer than the model's {layers} dense/conv layers (freezing all of them leaves "
                              "nothing to train)", "lower it, or leave the last layers (the head) trainable")

    def source(self) -> Path:
        path = Path(self.cfg.init_from).expanduser()
        if path.is_dir():
            path = path / "checkpoints" / f"{self.cfg.checkpoint}.pt"
        if not path.is_file():
            raise RegbenchError(f"{self.key}.init_from={self.cfg.init_from!r}: no checkpoint at {path}; fix: give a "
                                "run folder that has checkpoints/ or a .pt file written by regbench")
        return path

    def setup(self, model: nn.Module, ctx: Context) -> None:
        path = self.source()
        ckpt = load_checkpoint(path)
        if not isinstance(ckpt, dict) or not isinstance(ckpt.get("model"), dict):
            raise RegbenchError(f"checkpoint {path}: has no 'model' state; fix: use a checkpoint written by regbench")
        theirs = ckpt["model"]
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
        ctx.info[self.name] = {"init_from": str(path), "loaded": len(keys), "skipped": len(ours) - len(keys),
                               "frozen": names, "frozen_elements": sum(p.numel() for p in model.parameters()
                                                                       if not p.requires_grad)}
