"""Metrics: accuracy, negative log-likelihood and expected calibration error from class probabilities, and a
training epoch's sums from its per-step tensors."""

from __future__ import annotations

from typing import Any, Optional, Union

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


class EpochSums:
    """A training epoch's sums from its per-step device tensors, for a single run (``members`` None: scalar loss and
    penalty, logits [B, C]) and a stack (``members`` K: loss and penalty [K], logits [K, B, C]) alike: summed data
    loss and penalty (each step's mean weighted by its batch size), number correct, samples seen.

    Nothing is read back to the host. Each member's column is summed on its own ([steps] · [steps]), the order a
    single run's steps are summed in, so a stack member's sums are bitwise its single run's. With ``fresh`` logits
    (new tensors each step) their argmax waits for 64 steps: one op instead of 64 (~2 % of a batch-32 MLP step).
    """

    def __init__(self, device: torch.device, members: Optional[int] = None, fresh: bool = False):
        self.device, self.members, self.fresh = device, members, fresh
        self.losses: list = []
        self.penalties: list = []
        self.sizes: list[int] = []
        self.preds: list = []
        self.targets: list = []
        self.pending: list = []

    def add(self, logits: torch.Tensor, loss: torch.Tensor, penalty: Optional[torch.Tensor],
            y: torch.Tensor) -> None:
        """One step's values; ``y``: labels, or soft targets shaped like ``logits`` (their dominant label counts)."""
        self.losses.append(loss.detach())
        if penalty is not None:
            self.penalties.append(penalty.detach())
        if self.fresh and self.members is None:
            self.pending.append(logits)
            if len(self.pending) == 64:
                self.preds.append(torch.cat(self.pending).argmax(1))
                self.pending = []
        else:  # a compiled step's outputs may be overwritten by its next run: the argmax now
            self.preds.append(logits.detach().argmax(-1))
        self.targets.append(y.argmax(-1) if y.ndim == logits.ndim else y)
        self.sizes.append(logits.shape[-2])

    def result(self) -> Union[dict[str, Any], list[dict[str, Any]]]:
        """{loss, penalty (None without one), correct, seen}; a stack: one such dict per member."""
        if self.pending:
            self.preds.append(torch.cat(self.pending).argmax(1))
            self.pending = []
        K = self.members
        if not self.losses:
            zero = torch.zeros((), device=self.device)
            empty = {"loss": zero, "penalty": None, "correct": zero.long(), "seen": 0}
            return empty if K is None else [dict(empty) for _ in range(K)]
        sizes, seen = self.sizes, sum(self.sizes)
        # Batch sizes as weights, made on the device by fills (at most the last batch is short): a tensor built
        # from the Python list would be a host -> device copy.
        weights = torch.full((len(sizes),), float(sizes[0]), device=self.device)
        for i, size in enumerate(sizes):
            if size != sizes[0]:
                weights[i] = size
        loss = torch.stack(self.losses).float()
        pen = torch.stack(self.penalties).float() if self.penalties else None
        if K is None:
            return {"loss": (loss * weights).sum(), "penalty": (pen * weights).sum() if pen is not None else None,
                    "correct": (torch.cat(self.preds) == torch.cat(self.targets)).sum(), "seen": seen}
        correct = (torch.cat(self.preds, 1) == torch.cat(self.targets, 1)).sum(1)
        return [{"loss": (loss[:, s] * weights).sum(), "correct": correct[s], "seen": seen,
                 "penalty": (pen[:, s] * weights).sum() if pen is not None else None} for s in range(K)]
