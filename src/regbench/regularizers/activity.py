"""Keras' ``activity_regularizer``: an L1/L2 penalty on chosen layers' outputs, added to the training loss.

Keras 3 (keras-team/keras) applies it in keras/src/layers/layer.py ``Layer.__call__`` ("Record activity regularizer
loss"): for each output tensor, ``loss = self.activity_regularizer(output)``, then — since Keras 3.14.0 (PR #22021,
fixing issue #22018) — ``loss = ops.divide_no_nan(loss, batch_size)`` with ``batch_size = ops.shape(output)[0]``,
then ``self.add_loss(loss)``; the trainer (keras/src/trainers/trainer.py ``Trainer.compute_loss``) sums the layers'
losses into the training loss. So the term IS divided by the batch size, as Keras 2 / tf.keras did ("divided by
batch size") and as keras/src/regularizers/regularizers.py documents; Keras 3.0–3.13 did not divide (their code
was ``self.add_loss(self.activity_regularizer(output))``: issue #22018). regbench follows Keras >= 3.14. With Keras'
``L1L2(l1, l2).__call__`` (keras/src/regularizers/regularizers.py), per chosen layer with output a [B, ...]:

    (l1 · Σ|a| + l2 · Σa²) / B          summed over the chosen layers; the sums run over the batch and every unit

"A layer's output" is Keras' Dense(activation=...) / Conv2D(activation=...) output: after the activation, before
a Dropout layer that follows it. In regbench's models: the output of each hidden layer's activation module —
the MLP's ``hidden.<i>.act`` (after the norm where a norm member adds one; with ``dropout.placement=
before_activation`` the dropout sits before the activation, so its output is dropped-out), the lecture CNN's
``features.<b>.act<i>`` after every conv (before pooling) and ``head.act`` of its dense layer, the ResNet's stem
activation and every residual block's output. The output layer (logits) is not a hidden layer and never chosen.
``layers`` narrows them with glob patterns on those names (``hidden.0`` chooses ``hidden.0.act``); null: all.

Only the training step's forward is read: forward hooks registered in setup keep each chosen layer's latest
output while the model is training with gradients enabled (evaluation runs under no_grad and adds nothing), one
tensor per layer (a later forward replaces it), and the penalty takes them out — no graph outlives its step. The
hooks make the direct step (regbench.faststep) step aside: the run trains through autograd (step_impl says so).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Callable, Optional

import torch
from torch import nn

from regbench.errors import ConfigError
from regbench.models.common import ACTIVATIONS, make_activation
from regbench.models.resnet import BasicBlock
from regbench.regularizers.base import Context, Regularizer, Stacking, register
from regbench.regularizers.penalties import _list, _match

log = logging.getLogger(__name__)

# A hidden layer's output: what an activation module returns (every family builds its activations with
# make_activation), and a residual block's (its last op is the activation, or the sum for pre-activation).
OUTPUT_LAYERS = tuple({type(make_activation(a)) for a in ACTIVATIONS}) + (BasicBlock,)
UNSUPPORTED_MODELS = {"torchvision": "its activations are torchvision's own modules, some shared by several layers "
                                     "and in place, so no module's output is one layer's"}


@dataclass
class ActivityConfig:
    l1: float = 0.0  # Keras' L1L2(l1=0.0, l2=0.0) defaults; configs/regularizer/activity.yaml sets l2
    l2: float = 0.0
    layers: Optional[list[str]] = None  # glob patterns on the hidden layers' names, e.g. ["hidden.0"]; null = all


def activity_term(a: torch.Tensor, l1: float, l2: float) -> torch.Tensor:
    """Keras' L1L2(l1, l2)(a) divided by the batch size a.shape[0] (Layer.__call__), in at least float32."""
    if a.dtype in (torch.float16, torch.bfloat16):
        a = a.float()  # under autocast: Σa² over a batch's units overflows float16 (Keras would sum in float16)
    term = torch.zeros((), dtype=a.dtype, device=a.device)  # ops.convert_to_tensor(0.0, dtype=x.dtype)
    if l1 != 0:
        term = term + l1 * a.abs().sum()
    if l2 != 0:
        term = term + l2 * a.square().sum()
    return term / a.shape[0]  # divide_no_nan(loss, batch_size); a batch is never empty


def hidden_outputs(model: nn.Module) -> list[tuple[str, nn.Module]]:
    """The modules whose outputs are the model's hidden layers' outputs, in forward order."""
    return [(n, m) for n, m in model.named_modules() if isinstance(m, OUTPUT_LAYERS)]


@register
class Activity(Regularizer):
    name, schema = "activity", ActivityConfig
    stacking = Stacking(refused="reads each layer's output through forward hooks on its own model, which a stack's "
                                "batched model does not run")

    @property
    def active(self) -> bool:
        return self.cfg.l1 != 0 or self.cfg.l2 != 0  # both 0: no term (a sweep's baseline point), no hooks

    def check(self, ctx: Context) -> None:
        for k in ("l1", "l2"):
            if not self.cfg[k] >= 0:
                raise ConfigError(f"{self.key}.{k}", self.cfg[k], "a number >= 0")
        model = ctx.cfg.model.name
        if model in UNSUPPORTED_MODELS:
            raise ConfigError("model", model, f"a model of regbench's own layers with {self.key} (mlp, lecture_cnn, "
                              f"resnet: {UNSUPPORTED_MODELS[model]})", "use model=mlp, lecture_cnn or resnet, or drop "
                              "activity from the regularizer list")

    def setup(self, model: nn.Module, ctx: Context) -> None:
        candidates = hidden_outputs(model)
        chosen = candidates
        if self.cfg.layers is not None:
            for pattern in self.cfg.layers:
                if not any(_match(n, pattern) for n, _ in candidates):
                    raise ConfigError(f"{self.key}.layers", pattern, "a pattern matching a hidden layer's output of "
                                      f"this model ({', '.join(n for n, _ in candidates) or 'it has none'})")
            chosen = [(n, m) for n, m in candidates if any(_match(n, p) for p in self.cfg.layers)]
        if not chosen:
            raise self.nothing(f"{self.key}.layers={_list(self.cfg.layers)} chooses no hidden layer's output (the "
                               "model has no hidden layer)", "give the model hidden layers, e.g. model.hidden=[256]")
        self.names = [n for n, _ in chosen]
        self.outputs: dict[str, torch.Tensor] = {}
        if self.active:
            for n, m in chosen:
                m.register_forward_hook(_keeper(self.outputs, n, m))

    def penalty(self, model: nn.Module) -> Optional[torch.Tensor]:
        if not self.active:
            return None
        missing = [n for n in self.names if n not in self.outputs]
        if missing:  # the step's forward always runs every chosen layer: a bug, never a silent partial term
            self.outputs.clear()
            raise RuntimeError(f"activity: no training output of {', '.join(missing)} before the penalty")
        terms = [activity_term(self.outputs.pop(n), self.cfg.l1, self.cfg.l2) for n in self.names]
        return torch.stack(terms).sum()

    def info(self) -> dict:
        return {"layers": self.names}

    def log_info(self, model: nn.Module) -> None:
        log.info("activity penalty (l1=%g, l2=%g, divided by the batch size): outputs of %s", self.cfg.l1,
                 self.cfg.l2, ", ".join(self.names))


def _keeper(outputs: dict, name: str, module: nn.Module) -> Callable:
    """A forward hook keeping ``module``'s output of a training forward with gradients in ``outputs[name]``. A
    closure over the dict and the module, not a bound method: a deep copy of the model (an averaged model) shares
    the function but not the module, and its forwards are not kept."""

    def keep(m: nn.Module, inputs, output: torch.Tensor) -> None:
        if m is module and m.training and torch.is_grad_enabled():
            outputs[name] = output

    return keep
