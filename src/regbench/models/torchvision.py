"""The torchvision family: a torchvision classification model as a (pretrained) base with a new head.

``model=torchvision model.arch=<any name of torchvision.models.list_models(module=torchvision.models)>``. The
arch's own classifier is dropped; the base ends in a feature map (or its pooled vector), and the new head is
global average pooling -> optional Dense(``head_hidden``) + ReLU -> Dense(classes), freshly initialised.

Inputs are adapted on the device, in batches, inside the model (so augmentation, evaluation and TTA all see the
same thing): grayscale repeated to 3 channels; resized with ``F.interpolate`` (bilinear, antialiased like
torchvision's ``Resize``) to the weights' input size (``weights.transforms().crop_size``), or to
``model.input_size``; then normalised with the weights' mean/std. The dataset images are whole objects, so they
are resized straight to the crop size (torchvision's resize-to-``resize_size``-then-centre-crop would cut off
their borders). Pretrained weights therefore need ``data.normalize=none`` (pixels in [0, 1]), which
``model=torchvision`` sets itself (configs/model/torchvision.yaml); another value is refused with them.

Weights: ``DEFAULT`` / ``IMAGENET1K_V1`` / ... (the arch's torchvision weights enum), read from torch hub's
checkpoints folder (downloaded there only when ``model.download`` is true); ``null`` (random init); or the path
of a state dict of the arch (loaded with ``weights_only=True``; its classifier keys are ignored; input size and
mean/std are those of the arch's DEFAULT weights).
"""

from __future__ import annotations

import difflib
import os
from pathlib import Path
from dataclasses import dataclass
from typing import Any, Optional, Sequence

import torch
import torch.nn.functional as F
from omegaconf import DictConfig
from torch import nn

from regbench.errors import ConfigError, DataError, RegbenchError
from regbench.models.slots import SLOT_NAMES, LayerSlots
from regbench.registry import MODELS
from regbench.safe_load import WEIGHTS, check_regular, load_weights_only


@dataclass
class TorchvisionModelConfig:
    """A torchvision classification model with a new head (regbench/models/torchvision.py)."""

    name: str = "torchvision"
    arch: str = "resnet18"  # any of torchvision.models.list_models(module=torchvision.models) with fc or features
    weights: Optional[str] = "DEFAULT"  # DEFAULT | IMAGENET1K_V1 | ... | null (random init) | path of a state dict
    head_hidden: Optional[int] = None  # width of a Dense+ReLU between global pooling and the classes; null = none
    input_size: Optional[int] = None  # resize inputs to this square size; null = the weights' size (none if null)
    download: bool = "${oc.decode:${oc.env:REGBENCH_DOWNLOAD,true}}"  # fetch missing weights into torch hub's cache


def _models():
    import torchvision.models as tvm

    return tvm


def architectures() -> list[str]:
    tvm = _models()
    return sorted(tvm.list_models(module=tvm))


def is_path(weights: str) -> bool:
    return "/" in weights or os.sep in weights or weights.endswith((".pt", ".pth"))


def weights_enum(arch: str, name: str):
    """The torchvision weights object ``name`` (DEFAULT, IMAGENET1K_V1, ...) of ``arch``; ConfigError if none."""
    enum = _models().get_model_weights(arch)
    members = list(enum.__members__)
    if name not in members:
        hint = difflib.get_close_matches(name, members, n=1)
        raise ConfigError("model.weights", name, f"one of {', '.join(members)} (the weights torchvision has for "
                          f"{arch}), null or the path of a state dict" + (f"; did you mean {hint[0]}?" if hint else ""))
    return enum[name]


def hub_file(weights) -> Path:
    """Where torch hub keeps ``weights``: <torch.hub.get_dir()>/checkpoints/<file name of weights.url>."""
    return Path(torch.hub.get_dir()) / "checkpoints" / os.path.basename(weights.url)


def check(m: DictConfig, cfg: DictConfig) -> None:
    """The family's keys, and the data's normalisation that pretrained weights need."""
    check_config(m)
    if m.weights is not None and cfg.data.normalize != "none":
        raise ConfigError("data.normalize", cfg.data.normalize, f"none with pretrained weights (model.weights="
                          f"{m.weights}): the model normalises [0, 1] pixels with the weights' own mean/std",
                          "drop the data.normalize override (model=torchvision sets none), or use model.weights=null")


def check_config(m: DictConfig) -> None:
    """The family's keys: arch known, weights resolvable, offline weights present."""
    archs = architectures()
    if m.arch not in archs:
        hint = difflib.get_close_matches(m.arch, archs, n=1)
        raise ConfigError("model.arch", m.arch, "a torchvision classification model (torchvision.models."
                          "list_models(module=torchvision.models), e.g. resnet18, mobilenet_v3_small)"
                          + (f"; did you mean model.arch={hint[0]}?" if hint else ""))
    if m.head_hidden is not None and m.head_hidden < 1:
        raise ConfigError("model.head_hidden", m.head_hidden, "an integer >= 1, or null for no hidden Dense layer")
    if m.input_size is not None and m.input_size < 1:
        raise ConfigError("model.input_size", m.input_size, "an integer >= 1, or null (the weights' input size)")
    if m.weights is None:
        return
    if is_path(m.weights):
        path = Path(m.weights).expanduser()
        if not os.path.lexists(path):
            raise ConfigError("model.weights", m.weights, "a state dict file of " + m.arch + " (no file there)",
                              "give the path of a .pt/.pth state dict, a torchvision weights name or null")
        check_regular(path, f"model.weights={m.weights}", WEIGHTS)  # a link, FIFO or device: refused up front
        return
    w = weights_enum(m.arch, m.weights)
    if os.path.lexists(hub_file(w)):
        check_regular(hub_file(w), f"model.weights={m.weights}: the cached file {hub_file(w)}", WEIGHTS)
    elif not _download(m):
        raise missing_weights(m.arch, m.weights, w, "model.download=false")


def _download(m: DictConfig) -> bool:
    """model.download, whose default comes from $REGBENCH_DOWNLOAD: a value that is no boolean is one line."""
    from omegaconf.errors import OmegaConfBaseException

    try:
        return bool(m.download)
    except OmegaConfBaseException:
        raise ConfigError("REGBENCH_DOWNLOAD", os.environ.get("REGBENCH_DOWNLOAD"), "true or false (the "
                          "environment variable sets model.download's default)",
                          "export REGBENCH_DOWNLOAD=false (offline) or unset it, or set model.download=false") from None


def missing_weights(arch: str, name: str, w, reason: str) -> DataError:
    path = hub_file(w)
    return DataError(f"model.weights={name}: the {arch} weights file {path.name} is not in {path.parent} ({reason}); "
                     f"fix: download {w.url} into {path.parent} (torch hub's checkpoints folder), set "
                     "model.download=true with network access, or use model.weights=null")


# ------------------------------------------------------------------------------------------ model


def _replace_classifier(net: nn.Module, arch: str) -> tuple[nn.Module, list[nn.Module]]:
    """(base, blocks): the base without its classifier, and its parameterised top-level blocks in order."""
    if isinstance(getattr(net, "fc", None), nn.Linear):  # resnet, resnext, regnet, inception, googlenet, shufflenet
        net.fc = nn.Identity()  # forward keeps the arch's own global average pooling and flatten
        if getattr(net, "aux_logits", False) or getattr(net, "AuxLogits", None) is not None:
            net.aux_logits, net.AuxLogits = False, None
        if hasattr(net, "aux1"):
            net.aux1 = net.aux2 = None
        blocks = [c for n, c in net.named_children() if n != "fc" and any(True for _ in c.parameters())]
        return net, blocks
    features = getattr(net, "features", None) or getattr(net, "layers", None)  # mobilenet, efficientnet, vgg...
    if isinstance(features, nn.Sequential) and arch.split("_")[0] not in ("convnext", "squeezenet", "swin"):
        base = nn.Sequential(features, nn.ReLU()) if arch.startswith("densenet") else features  # densenet's ReLU
        blocks = [c for c in features.children() if any(True for _ in c.parameters())]
        return base, blocks
    raise ConfigError("model.arch", arch, "an arch whose classifier regbench can replace: one with an `fc` "
                      "layer (resnet*, resnext*, wide_resnet*, regnet*, inception_v3, googlenet, shufflenet*) or a "
                      "`features` stack (mobilenet*, efficientnet*, mnasnet*, vgg*, densenet*, alexnet)")


def _classifier_keys(arch: str) -> tuple[str, ...]:
    return ("fc.", "AuxLogits.", "aux1.", "aux2.", "classifier.")


def weights_limit(net: nn.Module) -> int:
    """The most bytes regbench reads from a weights file of ``net``'s arch: twice its state dict (float32, with
    its ImageNet classifier; room for a float64 copy or a larger classifier, whose keys are ignored) + 64 MiB.
    (torchvision's largest, regnet_y_128gf, is 2.6 GB: its bound is 5.2 GB; mobilenet_v3_small's is 84 MB.)"""
    return 2 * sum(t.numel() * t.element_size() for t in net.state_dict().values()) + (64 << 20)


def load_state(arch: str, weights: str, download: bool, limit: int) -> dict[str, torch.Tensor]:
    """The arch's full state dict from torch hub's cache (or a download), or from a state dict file: either file
    read by :func:`regbench.safe_load.load_weights_only` (a regular file of at most ``limit`` bytes, uncompressed
    zip records, no refused global; then torch's weights-only loader)."""
    if is_path(weights):
        state = load_weights_only(Path(weights).expanduser(), f"model.weights={weights}", WEIGHTS, limit,
                                  why=f"twice a {arch} state dict + 64 MiB")
        if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
            raise RegbenchError(f"model.weights={weights}: not a state dict (a mapping of names to tensors); fix: "
                                "save it with torch.save(model.state_dict(), path)")
        return state
    w = weights_enum(arch, weights)
    path = hub_file(w)
    if os.path.lexists(path):
        return load_weights_only(path, f"model.weights={weights}: the cached file {path}", WEIGHTS, limit,
                                 why=f"twice a {arch} state dict + 64 MiB")
    if not download:
        raise missing_weights(arch, weights, w, "model.download=false")
    try:
        return torch.hub.load_state_dict_from_url(w.url, progress=False, check_hash=True, weights_only=True)
    except Exception as e:  # noqa: BLE001 - URLError, OSError, hash mismatch...
        raise missing_weights(arch, weights, w, f"download failed: {str(e).splitlines()[0][:160] if str(e) else e}")


@MODELS.register("torchvision", schema=TorchvisionModelConfig, check=check)
class TorchvisionNet(nn.Module):
    """Input adapter -> torchvision base -> new head. ``blocks`` lists the base's blocks (for fine-tuning)."""

    def __init__(self, arch: str, num_classes: int, in_shape: Sequence[int], weights: Optional[str] = None,
                 head_hidden: Optional[int] = None, input_size: Optional[int] = None, download: bool = False):
        super().__init__()
        tvm = _models()
        kwargs: dict[str, Any] = {}
        if arch in ("inception_v3", "googlenet"):
            kwargs = {"aux_logits": False, "init_weights": True}
            if weights is not None:  # the pretrained nets expect ImageNet-normalised input, remapped inside
                kwargs["transform_input"] = True
        net = tvm.get_model(arch, weights=None, **kwargs)
        self.arch, self.weights = arch, weights
        meta = None
        if weights is not None:
            meta = weights_enum(arch, "DEFAULT" if is_path(weights) else weights).transforms()
            state = load_state(arch, weights, download, weights_limit(net))
            ours = net.state_dict()
            theirs = {k: v for k, v in state.items() if not k.startswith(_classifier_keys(arch)) or k in ours}
            missing = [k for k in ours if k not in theirs and not k.startswith(_classifier_keys(arch))]
            wrong = [k for k in ours if k in theirs and theirs[k].shape != ours[k].shape
                     and not k.startswith(_classifier_keys(arch))]
            if missing or wrong:
                raise RegbenchError(f"model.weights={weights}: not a state dict of {arch} (missing: "
                                    f"{', '.join(missing[:3]) or 'none'}; other shapes: {', '.join(wrong[:3]) or 'none'})"
                                    f"; fix: give weights saved from torchvision.models.{arch}()")
            net.load_state_dict({k: v for k, v in theirs.items() if k in ours and theirs[k].shape == ours[k].shape},
                                strict=False)
        base, blocks = _replace_classifier(net, arch)
        self.base = base
        self._blocks = blocks
        size = input_size if input_size is not None else (meta.crop_size[0] if meta is not None else None)
        self.input_size = size
        mean = torch.tensor(meta.mean if meta is not None else [0.0] * 3).view(1, 3, 1, 1)
        std = torch.tensor(meta.std if meta is not None else [1.0] * 3).view(1, 3, 1, 1)
        self.normalise = meta is not None
        self.register_buffer("mean", mean, persistent=False)
        self.register_buffer("std", std, persistent=False)
        out = self._probe(in_shape)
        features = out.shape[1]
        head = nn.Sequential()
        head.add_module("pool", nn.AdaptiveAvgPool2d(1) if out.ndim == 4 else nn.Identity())
        head.add_module("flatten", nn.Flatten())
        width = features
        if head_hidden is not None:
            head.add_module("dense", nn.Linear(features, head_hidden))
            head.add_module("act", nn.ReLU())
            width = head_hidden
        head.add_module("out", nn.Linear(width, num_classes))
        self.head = head

    @torch.no_grad()
    def _probe(self, in_shape: Sequence[int]) -> torch.Tensor:
        """The base's output for one input of the run's shape (its width sizes the head; too small an input for
        the arch is a config error here, not a traceback in the first step)."""
        self.base.eval()
        try:
            return self.base(self.adapt(torch.zeros(1, *in_shape)))
        except RuntimeError as e:
            raise ConfigError("model.input_size", self.input_size, f"an input size {self.arch} accepts (the "
                              f"{'x'.join(map(str, in_shape[1:]))} images fail: {str(e).splitlines()[0][:120]})",
                              "set model.input_size to a larger size, e.g. 224") from None
        finally:
            self.base.train()

    @property
    def blocks(self) -> list[nn.Module]:
        return list(self._blocks)

    def adapt(self, x: torch.Tensor) -> torch.Tensor:
        """Batched input adaptation on x's device: 1 -> 3 channels, resize, the weights' mean/std."""
        if x.shape[1] == 1:
            x = x.expand(-1, 3, -1, -1)
        if self.input_size is not None and tuple(x.shape[-2:]) != (self.input_size, self.input_size):
            x = F.interpolate(x, size=(self.input_size, self.input_size), mode="bilinear", align_corners=False,
                              antialias=True)
        if self.normalise:
            x = (x - self.mean) / self.std
        return x

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.base(self.adapt(x)))

    @staticmethod
    def check_slots(m: DictConfig, slots: LayerSlots) -> None:
        """The arch has its own layers: regbench's layer slots have no place in them."""
        if slots.filled("drop_path"):
            raise ConfigError(slots.key("drop_path"), slots.drop_path, "a model with residual branches regbench "
                              f"builds (model=torchvision: {m.arch}'s blocks are torchvision's own; efficientnet, "
                              "convnext and swin draw their own stochastic depth)",
                              f"use model=resnet, or drop {slots.member('drop_path')} from the stack")
        members = sorted({slots.member(s) for s in SLOT_NAMES if slots.filled(s)})
        if members:
            raise ConfigError("regularizer", members, "no member that changes the model's layers with "
                              "model=torchvision (the torchvision arch has its own)", "drop dropout/norm members")

    @classmethod
    def from_config(cls, m: DictConfig, input_shape: Sequence[int], num_classes: int,
                    slots: LayerSlots) -> "TorchvisionNet":
        check_config(m)
        return cls(m.arch, num_classes, input_shape, m.weights, m.head_hidden, m.input_size, m.download)

    @staticmethod
    def weight_layers(m: DictConfig) -> Optional[int]:
        """Unknown from the config alone (the arch's layers): transfer's freeze_layers cannot count them."""
        return None
