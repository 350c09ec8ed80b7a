"""Metrics: accuracy, negative log-likelihood and expected calibration error from class probabilities, and a
training epoch's sums from its per-step tensors."""

from __future__ import annotations

from typing import Any

import torch


def expected_calibration_error(probs: torch.Tensor, y: torch.Tensor, bins: int = 15) -> float:
    """ECE = Σ_b (n_b / N)·|acc_b − conf_b| over ``bins`` equal-width bins of the max-probability confidence.

    15 bins (Guo et al., 2017) by default; some libraries use 10. Bin b holds confidences in (b/B, (b+1)/B],
    the first bin also holds 0.
    """
    conf, pred = probs.max(dim=1)
    return calibration_error(conf, pred == y, bins)


def calibration_error(conf: torch.Tensor, correct: torch.Tensor, bins: int = 15) -> float:
    """ECE from per-sample max-probability confidences and whether each prediction was right."""
    correct = correct.double()
    idx = torch.clamp(torch.ceil(conf.double() * bins).long() - 1, 0, bins - 1)
    n = torch.zeros(bins, dtype=torch.float64, device=conf.device).index_add_(0, idx, torch.ones_like(correct))
    acc = torch.zeros_like(n).index_add_(0, idx, correct)
    cf = torch.zeros_like(n).index_add_(0, idx, conf.double())
    gap = (acc - cf).abs()  # per bin: |Σ correct − Σ confidence| = n_b·|acc_b − conf_b|
    return float(gap.sum() / len(correct))


def summarize_probs(probs: torch.Tensor, y: torch.Tensor, bins: int = 15) -> dict[str, float]:
    """Accuracy, NLL (mean −log p_y) and ECE of averaged probabilities (MC dropout, ensembles, TTA)."""
    nll = -torch.log(probs.gather(1, y.view(-1, 1)).clamp_min(1e-12)).mean()
    acc = (probs.argmax(1) == y).double().mean()
    return {"acc": float(acc), "nll": float(nll), "ece": expected_calibration_error(probs, y, bins)}


def epoch_sums(losses: list, penalties: list, sizes: list[int], preds: list, targets: list,
                device: torch.device) -> dict[str, Any]:
    """train_one_epoch's result from its per-step tensors: summed loss and penalty, number correct, samples."""
    if not losses:
        zero = torch.zeros((), device=device)
        return {"loss": zero, "penalty": None, "correct": zero.long(), "seen": 0}
    # Batch sizes as weights, made on the device by fills (at most the last batch is short): a tensor built
    # from the Python list would be a host -> device copy.
    weights = torch.full((len(sizes),), float(sizes[0]), device=device)
    for i, size in enumerate(sizes):
        if size != sizes[0]:
            weights[i] = size
    return {
        "loss": (torch.stack(losses).float() * weights).sum(),
        "penalty": (torch.stack(penalties).float() * weights).sum() if penalties else None,
        "correct": (torch.cat(preds) == torch.cat(targets)).sum(),
        "seen": sum(sizes),
    }
