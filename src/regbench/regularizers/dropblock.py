"""DropBlock (Ghiasi, Lin & Le 2018) as timm implements it (timm/layers/drop.py ``drop_block_2d`` and ``DropBlock2d``,
timm 1.0.31): in training, drop contiguous block_size×block_size squares of a conv feature map, the same squares in
every channel of a sample, and scale what is kept by count/kept over the batch; evaluation is the identity.

Block centres are drawn with probability γ = gamma_scale·p·H·W / (k_h·k_w) / ((H − k_h + 1)(W − k_w + 1)),
k = min(block_size, map side) (the block clipped to the map); each centre drops the k_h×k_w square around it, cut
at the border. The member fills the ``drop_block`` slot: model=resnet puts a DropBlock in every block of its last
two stages (after the first conv's norm, before its ReLU: timm's BasicBlock, in timm's ResNet's last two stages),
model=lecture_cnn one at the end of each of its last two conv blocks (before the pooling); the MLP refuses it.

``block_size`` / ``gamma_scale``: one value, or a list with one per place (shallow to deep): timm's ImageNet ResNet
uses [5, 3] and [0.25, 1.0] (timm/models/resnet.py ``drop_blocks``); the paper and DropBlock2d's default is 7.

``schedule``: ``constant`` (timm: train.py passes --drop-block to the model once; nothing changes it during
training) or ``linear`` (the paper, §3: "linearly decreasing keep_prob from 1.0 to the target value" over training):
epoch n of N trains with rate·(n − 1)/(N − 1), 0 in the first epoch and ``rate`` in the last (N = 1: ``rate``). The
paper's code ramps per step; regbench per epoch (a member does not know the number of steps before training).

Stacks: refused (the stacked model does not draw DropBlock's masks per member). The direct step does not cover conv
models, so such a run trains through autograd anyway.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from torch import nn

from regbench.errors import ConfigError
from regbench.models.common import DropBlock2d
from regbench.models.slots import DropBlockSpec, LayerSlots
from regbench.regularizers.base import Context, Regularizer, Stacking, register

SCHEDULES = ("constant", "linear")


@dataclass
class DropBlockConfig:
    rate: float = 0.1  # drop_prob: the target fraction of a feature map to drop (timm's drop_block_rate)
    block_size: Any = 7  # side of a dropped square, clipped to the map; or a list, one per place (shallow to deep)
    gamma_scale: Any = 1.0  # scales γ (timm's gamma_scale); or a list, one per place
    schedule: str = "constant"  # constant (timm) | linear: from 0 in the first epoch to rate in the last (the paper)


def _values(value: Any) -> list:
    return [value] if isinstance(value, (int, float)) else list(value)


@register
class DropBlock(Regularizer):
    name, schema = "dropblock", DropBlockConfig
    stacking = Stacking(refused="it draws its block masks inside the forward pass, which a stack does not draw per "
                                "member (only dropout's masks)")

    def __init__(self, cfg: Any):
        super().__init__(cfg)
        self.layers: list[DropBlock2d] = []
        self.epochs = 1  # trainer.max_epochs, set in setup
        self.done = 0  # epochs completed (the schedule's clock; in the checkpoint)

    def check(self, ctx: Context) -> None:
        c = self.cfg
        if not (isinstance(c.rate, (int, float)) and 0 <= c.rate < 1):
            raise ConfigError(f"{self.key}.rate", c.rate, "a rate in [0, 1)")
        sizes = _values(c.block_size)
        if not sizes or not all(isinstance(b, int) and not isinstance(b, bool) and b >= 1 for b in sizes):
            raise ConfigError(f"{self.key}.block_size", c.block_size, "an integer >= 1 or a list of them")
        scales = _values(c.gamma_scale)
        if not scales or not all(isinstance(g, (int, float)) and 0 < g <= 1 for g in scales):
            raise ConfigError(f"{self.key}.gamma_scale", c.gamma_scale, "a number in (0, 1] or a list of them "
                              "(γ stays a probability: at most the rate)")
        if c.schedule not in SCHEDULES:
            raise ConfigError(f"{self.key}.schedule", c.schedule, " or ".join(SCHEDULES))

    def fill_slots(self, slots: LayerSlots, ctx: Context) -> None:
        c = self.cfg
        sizes, scales = _values(c.block_size), _values(c.gamma_scale)
        spec = DropBlockSpec(float(c.rate), sizes[0] if isinstance(c.block_size, int) else tuple(sizes),
                             float(scales[0]) if isinstance(c.gamma_scale, (int, float)) else
                             tuple(float(g) for g in scales))
        slots.set("drop_block", spec, f"{self.key}.rate")

    def setup(self, model: nn.Module, ctx: Context) -> None:
        self.layers = [m for m in model.modules() if isinstance(m, DropBlock2d)]
        self.epochs = int(ctx.cfg.trainer.max_epochs)
        self._apply()

    def rate_for(self, epoch: int) -> float:
        """The drop rate epoch ``epoch`` (1-based) trains with."""
        if self.cfg.schedule == "constant" or self.epochs <= 1:
            return float(self.cfg.rate)
        return float(self.cfg.rate) * min(epoch - 1, self.epochs - 1) / (self.epochs - 1)

    def _apply(self) -> None:
        rate = self.rate_for(self.done + 1)
        for layer in self.layers:
            layer.drop_prob = rate

    def on_epoch_end(self, epoch: int, row: dict, model: nn.Module) -> bool:
        self.done = epoch
        self._apply()  # the next epoch's rate
        return False

    def info(self) -> dict[str, Any]:
        return {"layers": len(self.layers), "schedule": self.cfg.schedule, "rate_now": self.rate_for(self.done + 1)}

    def state_dict(self) -> dict[str, Any]:
        return {"done": self.done}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.done = int(state.get("done", 0))
        self._apply()
