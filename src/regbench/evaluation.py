"""Evaluating a model: the per-epoch evaluation (NLL, accuracy, ECE), weight norms, and the one batched
softmax helper every averaged-probability evaluation (MC dropout, snapshot ensembles, test-time augmentation)
is built on."""

from __future__ import annotations

from contextlib import nullcontext
from typing import Callable, ContextManager, Iterator

import torch
import torch.nn.functional as F
from torch import nn

from regbench.metrics import calibration_error


def batch_logits(model: nn.Module, x: torch.Tensor, batch_size: int,
                 autocast: Callable[[], ContextManager] = nullcontext) -> Iterator[tuple[int, torch.Tensor]]:
    """(start index, logits) of ``x`` taken ``batch_size`` images at a time, in the model's current mode."""
    for i in range(0, len(x), batch_size):
        with autocast():
            logits = model(x[i:i + batch_size])
        yield i, logits  # outside the autocast: what the caller computes from the logits runs in full precision


@torch.no_grad()
def probabilities(model: nn.Module, x: torch.Tensor, batch_size: int) -> torch.Tensor:
    """softmax(model(x)) in float64, ``batch_size`` images at a time, in the model's current mode (eval for an
    ensemble member or a TTA view, dropout active for MC dropout)."""
    return torch.cat([torch.softmax(logits.double(), 1) for _, logits in batch_logits(model, x, batch_size)])


@torch.no_grad()
def evaluate(model: nn.Module, x: torch.Tensor, y: torch.Tensor, batch_size: int,
             autocast: Callable[[], ContextManager] = nullcontext, bins: int = 15) -> dict[str, float]:
    """Mean cross-entropy (NLL), accuracy and expected calibration error of ``model`` in eval mode."""
    model.eval()
    loss_sum = torch.zeros((), device=x.device, dtype=torch.float64)
    conf, correct = [], []
    for i, logits in batch_logits(model, x, batch_size, autocast):
        yb = y[i:i + batch_size]
        logits = logits.float()
        loss_sum += F.cross_entropy(logits, yb, reduction="sum")
        c, pred = torch.softmax(logits, dim=1).max(dim=1)
        conf.append(c)
        correct.append(pred == yb)
    conf_t, correct_t = torch.cat(conf), torch.cat(correct)
    n = len(y)
    return {"loss": loss_sum.item() / n, "acc": correct_t.double().mean().item(),
            "ece": calibration_error(conf_t, correct_t, bins)}


def weight_norms(model: nn.Module) -> tuple[float, float]:
    """(Σ|w|, √Σw²) over the weights (parameters with >= 2 dimensions: dense and conv kernels)."""
    ws = [p.detach() for p in model.parameters() if p.ndim >= 2]
    l1 = torch.stack([w.abs().sum() for w in ws]).sum()
    l2 = torch.stack([w.pow(2).sum() for w in ws]).sum().sqrt()
    return l1.item(), l2.item()
