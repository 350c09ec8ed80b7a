"""Test-time augmentation: the softmax averaged over views of the (already normalised) test images."""

from __future__ import annotations

from typing import Callable

import torch

from regbench.augment.functional import shifted_crop
from regbench.evaluation import probabilities
from regbench.metrics import summarize_probs

View = Callable[[torch.Tensor], torch.Tensor]


def views(cfg, flips_ok: bool) -> list[tuple[str, View]]:
    """(name, view) of ``augmentation.tta``: identity, flips where label-safe (``flips_ok``), and
    ±``shift``-pixel shifted crops with reflect padding."""
    k = cfg.shift
    found: list[tuple[str, View]] = [("identity", lambda b: b)]
    if cfg.hflip and flips_ok:
        found.append(("hflip", lambda b: b.flip(-1)))
    if cfg.vflip and flips_ok:
        found.append(("vflip", lambda b: b.flip(-2)))
    if k > 0:
        for name, dx, dy in (("left", -k, 0), ("right", k, 0), ("up", 0, -k), ("down", 0, k)):
            def shift(b, dx=dx, dy=dy):
                ox = torch.full((len(b),), k + dx, device=b.device)
                oy = torch.full((len(b),), k + dy, device=b.device)
                return shifted_crop(b, k, "reflect", ox, oy)
            found.append((f"shift_{name}", shift))
    return found


@torch.no_grad()
def evaluate(model: torch.nn.Module, x: torch.Tensor, y: torch.Tensor, cfg, flips_ok: bool,
             batch_size: int = 1000) -> dict:
    """Accuracy, NLL and ECE (``cfg.bins`` bins) of the softmax averaged over the views of ``x``, in eval mode,
    plus the names of the views."""

    model.eval()
    chosen = views(cfg, flips_ok)
    total = None
    for _, view in chosen:
        p = probabilities(model, view(x), batch_size)
        total = p if total is None else total + p
    return {**summarize_probs(total / len(chosen), y, cfg.bins), "views": [name for name, _ in chosen]}
