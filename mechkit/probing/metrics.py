"""Probe scores as batched tensor math: accuracy, F1, ROC-AUC, bootstrap intervals, concept depth.

Predictions come as ``[..., n]`` tensors (any leading problem dims, e.g. layers); the metrics reduce
the last dim. ROC-AUC uses the rank statistic (ties get average ranks), so it equals
scikit-learn's ``roc_auc_score``; multiclass F1 and AUC are macro averages (one-vs-rest).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from mechkit.metrics import binary_auroc


def accuracy(pred: Tensor, y: Tensor) -> Tensor:
    return (pred == y).float().mean(-1)


def f1(pred: Tensor, y: Tensor, n_classes: int) -> Tensor:
    """Binary: F1 of class 1; multiclass: macro F1 (classes absent from both count as 0, as sklearn)."""
    classes = [1] if n_classes == 2 else range(n_classes)
    out = []
    for c in classes:
        tp = ((pred == c) & (y == c)).float().sum(-1)
        fp = ((pred == c) & (y != c)).float().sum(-1)
        fn = ((pred != c) & (y == c)).float().sum(-1)
        denom = 2 * tp + fp + fn
        out.append(torch.where(denom > 0, 2 * tp / denom.clamp_min(1), torch.zeros_like(tp)))
    return torch.stack(out).mean(0)


def auroc(scores: Tensor, y: Tensor, n_classes: int) -> Tensor:
    """ROC-AUC from decision scores ``[..., n]`` (binary) or ``[..., n, K]`` (one-vs-rest, macro)."""
    if n_classes == 2:
        return binary_auroc(scores, y == 1)
    return torch.stack([binary_auroc(scores[..., c], y == c) for c in range(n_classes)]).mean(0)


def bootstrap_interval(correct: Tensor, *, n_boot: int = 1000, level: float = 0.95,
                       seed: int = 0) -> tuple[Tensor, Tensor]:
    """Percentile interval of the accuracy from per-item correctness ``[..., n]`` (items resampled)."""
    n = correct.shape[-1]
    g = torch.Generator().manual_seed(seed)
    draws = torch.randint(0, n, (n_boot, n), generator=g)
    means = correct.float()[..., draws].mean(-1)  # [..., n_boot]
    tail = (1 - level) / 2
    return means.quantile(tail, dim=-1), means.quantile(1 - tail, dim=-1)


@dataclass(frozen=True)
class ConceptDepth:
    """Where a concept becomes linearly readable, as fractions ``(i + 1) / L`` of the depth.

    ``jump``: first layer whose accuracy rises ≥ 10% over the previous one while the lower
    confidence bound clears chance + 0.05, holding for two consecutive layers (None if never);
    ``converging``: first layer from which every layer up to the best is within 0.02 of the best;
    ``peak``: the best layer.
    """

    jump: float | None
    converging: float
    peak: float
    peak_accuracy: float


def concept_depth(acc: Tensor, lower: Tensor, chance: float, *, rise: float = 0.1, margin: float = 0.05,
                  tolerance: float = 0.02) -> ConceptDepth:
    """METHODS §1.1 concept depth from accuracies ``[L]`` and their lower confidence bounds ``[L]``."""
    a, lo = acc.tolist(), lower.tolist()
    n = len(a)
    clears = [b > chance + margin for b in lo]
    jump = None
    for i in range(n):
        rose = i == 0 or a[i] - a[i - 1] >= rise * a[i - 1]
        if rose and clears[i] and (i + 1 == n or clears[i + 1]):
            jump = (i + 1) / n
            break
    peak = max(range(n), key=lambda i: a[i])
    converging = peak
    while converging > 0 and all(a[peak] - a[j] <= tolerance for j in range(converging - 1, peak + 1)):
        converging -= 1
    return ConceptDepth(jump, (converging + 1) / n, (peak + 1) / n, a[peak])
