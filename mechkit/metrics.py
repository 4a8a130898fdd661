"""Small statistics shared by the analyses: rank-based ROC-AUC (the Mann–Whitney statistic, ties at
their average rank — equal to scikit-learn's ``roc_auc_score``)."""

from __future__ import annotations

import torch
from torch import Tensor

__all__ = ["average_ranks", "binary_auroc"]


def average_ranks(x: Tensor) -> Tensor:
    """1-based ranks along the last dim (float64), ties sharing their average rank."""
    order = x.argsort(-1)
    sorted_x = x.gather(-1, order)
    pos = torch.arange(1, x.shape[-1] + 1, dtype=torch.float64).expand_as(x).clone()
    new_group = torch.ones_like(sorted_x, dtype=torch.bool)
    new_group[..., 1:] = sorted_x[..., 1:] != sorted_x[..., :-1]
    group = new_group.long().cumsum(-1) - 1
    total = torch.zeros_like(pos).scatter_add_(-1, group, pos)
    count = torch.zeros_like(pos).scatter_add_(-1, group, torch.ones_like(pos))
    mean_rank = (total / count.clamp_min(1)).gather(-1, group)
    return torch.empty_like(mean_rank).scatter_(-1, order, mean_rank)


def binary_auroc(scores: Tensor, positive: Tensor) -> Tensor:
    """ROC-AUC of scores ``[..., n]`` for the boolean labels ``positive`` ``[n]``; NaN when one class is absent."""
    n_pos = positive.double().sum()
    n_neg = positive.numel() - n_pos
    if n_pos == 0 or n_neg == 0:
        return torch.full(scores.shape[:-1], float("nan"), dtype=torch.float64)
    ranks = average_ranks(scores)
    return (ranks[..., positive].sum(-1) - n_pos * (n_pos + 1) / 2) / (n_pos * n_neg)
